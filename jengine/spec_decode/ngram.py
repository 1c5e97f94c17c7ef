"""Prompt-lookup (n-gram) drafts: continue the text the way it went after an earlier copy of its ending.

Copy-heavy requests (edit, repeat or summarise a given text, change code) keep reproducing spans of
their own context. The proposer looks for the row's last n tokens earlier in its prompt and output,
longest n first (`prompt_lookup_max` down to `prompt_lookup_min`), and proposes the up to k tokens
that followed the latest such occurrence. No model runs, so a draft costs microseconds of host time.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramProposer:
    """Drafts up to `k` tokens from the row's own history (vLLM's `ngram` method and parameter names)."""

    def __init__(self, k: int, prompt_lookup_min: int = 1, prompt_lookup_max: int = 4):
        if k < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {k}")
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ValueError(
                f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {prompt_lookup_min} and {prompt_lookup_max}"
            )
        self.k, self.min_n, self.max_n = k, prompt_lookup_min, prompt_lookup_max

    def propose(self, token_ids: Sequence[int] | np.ndarray) -> list[int]:
        """The draft for a row whose prompt and output so far are `token_ids` (empty when nothing matches)."""
        tokens = np.asarray(token_ids, dtype=np.int64)
        size = len(tokens)
        for n in range(min(self.max_n, size - 1), self.min_n - 1, -1):
            # Windows that start early enough to be followed by at least one token, compared with the suffix.
            windows = sliding_window_view(tokens[: size - 1], n)
            hits = np.flatnonzero((windows == tokens[size - n :]).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n  # the latest earlier occurrence
                return tokens[start : start + self.k].tolist()
        return []
