"""`StructuredOutputManager`: one grammar matcher per constrained sequence, and the step's token masks.

The engine talks to it through four calls, so the grammar work can move (e.g. onto the host while the
device runs the previous step) without touching the step loop:

    add(request_id, params)          compile (cached) and start a matcher; ValueError when invalid
    fill_bitmask(request_ids, out)   out[i] = packed allowed-token bits for request_ids[i]
    accept(request_id, token_ids)    advance a matcher with sampled tokens
    remove(request_id)               forget a finished / aborted sequence

Masks are int32 words, bit `t % 32` of word `t // 32` set when token `t` is allowed (llguidance's
layout, which `jengine.sampler` unpacks on the device). When a grammar is complete only EOS is
allowed, so the sequence ends with finish reason `stop`.
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import numpy as np

from jengine.structured_output.backend import GrammarCompiler
from jengine.structured_output.params import StructuredOutputsParams

logger = logging.getLogger(__name__)


def bitmask_words(vocab_size: int) -> int:
    """int32 words per row of a packed token bitmask."""
    return (int(vocab_size) + 31) // 32


class StructuredOutputManager:
    """Per-sequence matchers over one `GrammarCompiler` (see the module docstring)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self.compiler = GrammarCompiler(tokenizer, vocab_size, eos_token_ids)
        self.vocab_size = int(vocab_size)
        self.num_words = bitmask_words(vocab_size)
        self._eos_only = np.zeros(self.num_words, np.int32)
        for t in self.compiler.eos_token_ids:
            if 0 <= t < self.vocab_size:
                self._eos_only.view(np.uint32)[t // 32] |= np.uint32(1 << (t % 32))
        self._matchers: dict[str, Any] = {}
        self._executor: Any = None

    def validate(self, params: StructuredOutputsParams) -> None:
        """Raises ValueError (naming the field) when the constraint cannot be compiled; caches it."""
        self.compiler.compile(params)

    def add(self, request_id: str, params: StructuredOutputsParams) -> None:
        self._matchers[request_id] = self.compiler.compile(params)

    def remove(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._matchers

    def __len__(self) -> int:
        return len(self._matchers)

    def fill_bitmask(self, request_ids: Sequence[str], out: np.ndarray) -> None:
        """Writes the next-token mask of each sequence into `out[i]` (int32 [len(ids), num_words]).

        A matcher that hit an error (a parser limit) allows only EOS: the sequence ends instead of
        sampling from an empty set.
        """
        if out.shape != (len(request_ids), self.num_words) or out.dtype != np.int32 or not out.flags["C_CONTIGUOUS"]:
            raise ValueError(f"bitmask buffer must be C-contiguous int32 [{len(request_ids)}, {self.num_words}]")
        if not request_ids:
            return
        from llguidance import LLExecutor
        from llguidance.numpy import fill_next_token_bitmask_par

        if self._executor is None:
            self._executor = LLExecutor()
        ll_words = bitmask_words(self.compiler.ll_tokenizer.vocab_size)
        target = out if ll_words == self.num_words else np.zeros((len(request_ids), ll_words), np.int32)
        fill_next_token_bitmask_par(self._executor, [(self._matchers[r], i) for i, r in enumerate(request_ids)], target)
        if target is not out:
            out[:] = target[:, : self.num_words]
        for i, r in enumerate(request_ids):
            m = self._matchers[r]
            if m.is_error():
                logger.warning("structured output of %s stopped: %s", r, m.get_error())
                out[i] = self._eos_only
        # Bits past the model's vocabulary (the last word's tail) are never sampled; clear them anyway.
        tail = self.vocab_size % 32
        if tail:
            out[:, -1] &= np.int32((1 << tail) - 1)

    def accept(self, request_id: str, token_ids: Sequence[int]) -> bool:
        """Advances the sequence's matcher; False when a token was not allowed (the matcher then stays in
        its error state and only allows EOS)."""
        m = self._matchers.get(request_id)
        if m is None:
            return True
        ok = m.consume_tokens([int(t) for t in token_ids])
        if not ok:
            logger.warning("structured output of %s rejected tokens %s: %s", request_id, list(token_ids), m.get_error())
        return ok

    def is_terminated(self, request_id: str) -> Optional[bool]:
        """True once the sequence's grammar can take nothing but EOS (None: not constrained)."""
        m = self._matchers.get(request_id)
        return None if m is None else bool(m.is_stopped())
