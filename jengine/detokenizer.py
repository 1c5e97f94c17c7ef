"""Incremental detokenization and stop strings.

`IncrementalDetokenizer` turns a growing list of output token ids into text deltas. It decodes a small
window (a few already-emitted tokens for context, plus the tokens not yet emitted) with the tokenizer's own
`decode`, so it works for any Hugging Face tokenizer; the context keeps leading-space rules of
SentencePiece-style tokenizers right. A byte-level BPE token can carry part of a UTF-8 character, which
`decode` shows as U+FFFD: while the window's text ends with U+FFFD nothing is emitted, so a multi-byte
character (emoji, CJK) is never split across deltas. `finish()` flushes what is still held, so the
concatenated deltas equal ``tokenizer.decode(output_ids, skip_special_tokens=...)`` for byte-level BPE
tokenizers.

`StopChecker` finds stop strings in the accumulated text (a stop string may span tokens) and says how many
trailing characters a stream must hold back because they could still become a stop string.
`StopStringDetokenizer` combines both: it is what the output processor keeps per sequence.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

from jengine.sampling_params import SamplingParams

_REPLACEMENT = "\ufffd"
# How many prompt tokens to decode as context before the first output token (vLLM uses 5 too).
_PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns output token ids, given a few at a time, into text without splitting characters.

    `spaces_between_special_tokens` only matters to slow (Python) tokenizers; it is passed to `decode`
    only when it is False, since fast tokenizers ignore it.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self._decode_kwargs: dict[str, Any] = {"skip_special_tokens": skip_special_tokens}
        if not spaces_between_special_tokens:
            self._decode_kwargs["spaces_between_special_tokens"] = False
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        if context and self._decode(context).endswith(_REPLACEMENT):
            context = []  # the prompt ends inside a character: its bytes would leak into the output
        self._ids: list[int] = context  # context + output ids
        self._num_context = len(context)
        self._prefix_offset = 0  # window start: emitted tokens kept as context
        self._read_offset = len(context)  # first token whose text has not been emitted
        self.output_text = ""

    @property
    def token_ids(self) -> list[int]:
        """The output token ids seen so far."""
        return self._ids[self._num_context:]

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), **self._decode_kwargs)

    def _step(self, flush: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) and not flush:
            return ""
        if new_text.endswith(_REPLACEMENT) and not flush:
            return ""  # the last token ends inside a character: wait for the rest of its bytes
        delta = new_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self.output_text += delta
        return delta

    def update(self, new_token_ids: Sequence[int]) -> str:
        """Appends tokens; returns the text they completed (possibly "" while a character is partial)."""
        if not new_token_ids:
            return ""
        self._ids.extend(int(t) for t in new_token_ids)
        return self._step(flush=False)

    def finish(self) -> str:
        """Emits whatever is still held (incomplete bytes become U+FFFD, as a full decode shows them)."""
        if self._read_offset == len(self._ids):
            return ""
        return self._step(flush=True)


@dataclasses.dataclass(frozen=True)
class StopMatch:
    """A stop string found in the text: the text is to be cut to `truncate_to` characters."""

    stop_str: str
    truncate_to: int


class StopChecker:
    """Finds stop strings in accumulated output text (vLLM semantics, earliest match wins)."""

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        self.stop = [s for s in stop if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self.max_stop_len = max((len(s) for s in self.stop), default=0)

    def check(self, text: str, new_char_count: int) -> Optional[StopMatch]:
        """The earliest stop string that ends inside the last `new_char_count` characters of `text`.

        Only those can be new: older ones were found when their last character arrived. Ties (two stop
        strings starting at the same place) go to the one listed first. The match keeps the stop string
        iff include_stop_str_in_output.
        """
        if not self.stop or new_char_count <= 0:
            return None
        best: Optional[tuple[int, str]] = None
        for s in self.stop:
            start = max(0, len(text) - new_char_count - len(s) + 1)
            idx = text.find(s, start)
            if idx >= 0 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return None
        idx, s = best
        return StopMatch(s, idx + len(s) if self.include_stop_str_in_output else idx)

    def holdback(self, text: str) -> int:
        """How many trailing characters of `text` a stream must not send yet: the longest suffix that is
        a proper prefix of a stop string (it may still become one). 0 when stop strings are kept in the
        output, since then such a prefix is output text either way."""
        if self.include_stop_str_in_output or not self.stop:
            return 0
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best


class StopStringDetokenizer:
    """Per-sequence text state: incremental detokenization, stop strings, and streaming deltas."""

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        self.detokenizer = IncrementalDetokenizer(
            tokenizer, prompt_token_ids, params.skip_special_tokens, params.spaces_between_special_tokens)
        self.stop_checker = StopChecker(params.stop or [], params.include_stop_str_in_output)
        self.include_stop_str_in_output = params.include_stop_str_in_output
        self.output_text = ""
        self.stop_reason: Optional[str] = None
        self._sent = 0  # characters of output_text already returned as deltas

    def _absorb(self, delta: str) -> Optional[str]:
        if self.stop_reason is not None or not delta:
            return None
        self.output_text += delta
        match = self.stop_checker.check(self.output_text, len(delta))
        if match is None:
            return None
        self.output_text = self.output_text[:match.truncate_to]
        self.stop_reason = match.stop_str
        return match.stop_str

    def update(self, new_token_ids: Sequence[int], stop_terminated: bool = False) -> Optional[str]:
        """Adds this step's tokens; returns the stop string if one now ends the sequence.

        `stop_terminated`: the last token is EOS or a stop token id that ends the sequence; its text is
        left out unless include_stop_str_in_output (as vLLM does), and held-back bytes are flushed.
        """
        ids = list(new_token_ids)
        if stop_terminated and ids and not self.include_stop_str_in_output:
            ids.pop()
        found = self._absorb(self.detokenizer.update(ids))
        if stop_terminated and found is None:
            found = self.finish()
        return found

    def finish(self) -> Optional[str]:
        """The sequence ends for another reason (length, stop token): flush held-back bytes."""
        return self._absorb(self.detokenizer.finish())

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """Text to send now: the new part (`delta`) or all of it, holding back a possible stop-string
        prefix unless `finished`."""
        end = len(self.output_text)
        if not finished:
            end = max(self._sent, end - self.stop_checker.holdback(self.output_text))
        start = self._sent if delta else 0
        self._sent = max(self._sent, end)
        return self.output_text[start:end]
