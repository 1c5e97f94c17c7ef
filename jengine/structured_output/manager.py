"""`StructuredOutputManager`: one grammar matcher per constrained sequence, and the step's token masks.

The engine talks to it through three calls, so the grammar work can move (e.g. onto the host while the
device runs the previous step) without touching the step loop:

    start(params, name) -> seq       compile (cached) and start a matcher; ValueError when invalid
    fill_bitmask(seqs, out)          out[i] = packed allowed-token bits for seqs[i]
    accept(seq, token_ids)           advance a matcher with sampled tokens

The manager keeps no per-request state: each `ConstrainedSequence` lives on its request
(`Request.structured_output`) and ends with it.

Masks are int32 words, bit `t % 32` of word `t // 32` set when token `t` is allowed (llguidance's
layout, which `jengine.sampler` unpacks on the device). When a grammar is complete only EOS is
allowed, so the sequence ends with finish reason `stop`.

With reasoning markers (`jengine.structured_output.reasoning`) a sequence is unmasked while it
thinks, and its matcher sees only the tokens after the one that completes the end marker.
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import numpy as np

from jengine.structured_output.backend import GrammarCompiler
from jengine.structured_output.params import StructuredOutputsParams
from jengine.structured_output.reasoning import ReasoningMarkers

logger = logging.getLogger(__name__)


def bitmask_words(vocab_size: int) -> int:
    """int32 words per row of a packed token bitmask."""
    return (int(vocab_size) + 31) // 32


# Where a constrained sequence is (the three thinking phases exist only with reasoning markers).
ANSWER = "answer"  # the matcher decides every token
THINKING = "thinking"  # unmasked until the end marker's text appears
OPENING = "opening"  # the first token: the grammar's tokens or the first token of the start marker
FORCING = "forcing"  # the rest of a multi-token start marker


class ConstrainedSequence:
    """One constrained sequence: its matcher and, for reasoning models, where its answer starts."""

    __slots__ = ("name", "matcher", "phase", "forced", "tail")

    def __init__(self, matcher: Any, phase: str, name: str = "") -> None:
        self.name = name  # its request id, for log lines
        self.matcher = matcher
        self.phase = phase
        self.forced: list[int] = []  # FORCING: the start marker's tokens still to come
        self.tail = ""  # THINKING: the last characters written, to find the end marker


class StructuredOutputManager:
    """Per-sequence matchers over one `GrammarCompiler` (see the module docstring)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int],
                 reasoning: Optional[ReasoningMarkers] = None) -> None:
        self.compiler = GrammarCompiler(tokenizer, vocab_size, eos_token_ids)
        self._tokenizer = tokenizer
        self.reasoning = reasoning
        self._start_ids: list[int] = []
        if reasoning is not None and not reasoning.thinks_from_start:
            self._start_ids = [int(t) for t in tokenizer.encode(reasoning.start, add_special_tokens=False)]
        self.vocab_size = int(vocab_size)
        self.num_words = bitmask_words(vocab_size)
        self._eos_only = np.zeros(self.num_words, np.int32)
        for t in self.compiler.eos_token_ids:
            if 0 <= t < self.vocab_size:
                self._eos_only.view(np.uint32)[t // 32] |= np.uint32(1 << (t % 32))
        self._executor: Any = None

    def validate(self, params: StructuredOutputsParams) -> None:
        """Raises ValueError (naming the field) when the constraint cannot be compiled; caches it."""
        self.compiler.compile(params)

    def start(self, params: StructuredOutputsParams, name: str = "") -> ConstrainedSequence:
        """A new sequence under `params` (compiled once, then from the cache), in its start state."""
        r = self.reasoning
        phase = ANSWER if r is None else THINKING if r.thinks_from_start else OPENING if self._start_ids else ANSWER
        return ConstrainedSequence(self.compiler.compile(params), phase, name)

    def fill_bitmask(self, seqs: Sequence[ConstrainedSequence], out: np.ndarray) -> None:
        """Writes the next-token mask of each sequence into `out[i]` (int32 [len(seqs), num_words]).

        A matcher that hit an error (a parser limit) allows only EOS: the sequence ends instead of
        sampling from an empty set.
        """
        if out.shape != (len(seqs), self.num_words) or out.dtype != np.int32 or not out.flags["C_CONTIGUOUS"]:
            raise ValueError(f"bitmask buffer must be C-contiguous int32 [{len(seqs)}, {self.num_words}]")
        if not seqs:
            return
        graded = [i for i, q in enumerate(seqs) if q.phase in (ANSWER, OPENING)]
        if graded:
            self._fill_from_matchers([seqs[i].matcher for i in graded], graded, out)
        for i, q in enumerate(seqs):
            if q.phase == ANSWER and q.matcher.is_error():
                logger.warning("structured output of %s stopped: %s", q.name, q.matcher.get_error())
                out[i] = self._eos_only
            elif q.phase == OPENING:
                _allow(out[i], self._start_ids[0])
            elif q.phase == THINKING:
                out[i] = -1
            elif q.phase == FORCING:
                out[i] = 0
                _allow(out[i], q.forced[0])
        # Bits past the model's vocabulary (the last word's tail) are never sampled; clear them anyway.
        tail = self.vocab_size % 32
        if tail:
            out[:, -1] &= np.int32((1 << tail) - 1)

    def _fill_from_matchers(self, matchers: Sequence[Any], rows: Sequence[int], out: np.ndarray) -> None:
        from llguidance import LLExecutor
        from llguidance.numpy import fill_next_token_bitmask_par

        if self._executor is None:
            self._executor = LLExecutor()
        ll_words = bitmask_words(self.compiler.ll_tokenizer.vocab_size)
        whole = ll_words == self.num_words and len(rows) == out.shape[0]
        target = out if whole else np.zeros((len(rows), ll_words), np.int32)
        fill_next_token_bitmask_par(self._executor, [(m, j) for j, m in enumerate(matchers)], target)
        if target is not out:
            out[list(rows)] = target[:, : self.num_words]

    def accept(self, q: ConstrainedSequence, token_ids: Sequence[int]) -> bool:
        """Advances the sequence by its new tokens; False when the matcher refused one (it then stays
        in its error state and only allows EOS)."""
        tokens = [int(t) for t in token_ids]
        while tokens and q.phase != ANSWER:
            self._advance_thinking(q, tokens.pop(0))
        if not tokens:
            return True
        ok = q.matcher.consume_tokens(tokens)
        if not ok:
            logger.warning("structured output of %s rejected tokens %s: %s", q.name, tokens, q.matcher.get_error())
        return ok

    def _advance_thinking(self, q: ConstrainedSequence, token: int) -> None:
        """One token before the answer: opens, continues or ends the thinking."""
        assert self.reasoning is not None  # only reasoning markers leave a sequence outside ANSWER
        if q.phase == OPENING:
            if token != self._start_ids[0]:
                q.phase = ANSWER
                q.matcher.consume_tokens([token])
                return
            q.forced = self._start_ids[1:]
            q.phase = FORCING if q.forced else THINKING
        elif q.phase == FORCING:
            q.forced = q.forced[1:] if q.forced and q.forced[0] == token else []
            q.phase = FORCING if q.forced else THINKING
        else:
            end = self.reasoning.end
            q.tail = (q.tail + self._tokenizer.decode([token], skip_special_tokens=False))[-(len(end) + 32):]
            if end in q.tail:
                q.phase = ANSWER

    @staticmethod
    def is_terminated(q: Optional[ConstrainedSequence]) -> Optional[bool]:
        """True once the sequence's grammar can take nothing but EOS (None: not constrained)."""
        return None if q is None else q.phase == ANSWER and bool(q.matcher.is_stopped())


def _allow(row: np.ndarray, token: int) -> None:
    row.view(np.uint32)[token // 32] |= np.uint32(1 << (token % 32))
