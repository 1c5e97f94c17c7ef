"""The engine's side of speculative decoding: who gets drafts, how a step's tokens become accepted runs.

    Speculator(config, draft=None).propose(running)   before `schedule()`: n-gram drafts on eligible requests,
                                                       or k slots the draft model fills
    Speculator.fill(scheduled)                         after `schedule()`: the draft model's drafts (draft_model)
    Speculator.expand(scheduled, rows) -> rows         one sampling row per logits row of the step
    Speculator.accept(scheduled, token_ids) -> tokens  per scheduled row: None, or its accepted tokens

A row that verifies k drafts d_0..d_{k-1} gets k + 1 logits rows (its last known token and each draft).
The sampler draws t_i at each of them exactly as it would draw the request's next token after d_0..d_{i-1}:
the sampling row of position i sees the output extended by those drafts, so its `min_tokens` state and
its random stream (`fold_in(seed, output index)`) are those of that output index. The row keeps d_i while
t_i == d_i and then adds the first t_j that differs (or t_k when all match).

For n-gram drafts (a point mass on d_i) that rule is rejection sampling: d_i is accepted with probability
p_i(d_i), and on rejection t_j is a draw from p_j conditioned on differing from d_j, which is the residual
max(p_j - q_j, 0) normalised. So every emitted token follows the target distribution after temperature,
top-k, top-p, min-p and logit_bias; greedy rows reproduce decoding one token at a time exactly, and a
seeded request draws the same uniform for each output index with or without speculation, so its tokens
are identical too. The draft model (`jengine.spec_decode.draft_model`) drafts greedily, so its q is a
point mass as well and the same rule applies; drafts sampled from a non-degenerate q would need
`rejection.rejection_sample` instead.

An n-gram draft's length varies, so it is proposed before `schedule()` and the scheduler trims it to the
room the row has. The draft model always drafts k tokens: `propose` reserves k slots (placeholders) that
the scheduler trims the same way, and `fill` runs the draft model over the scheduled rows and writes the
drafts into them before the target step builds its inputs.

Penalties count the drafts before a position in that position's row only (the request's penalty
history keeps committed tokens), and the logprobs of an accepted run are those of each position's
row, so requests with penalties or logprobs speculate too. Structured outputs would need a mask per
draft position; those requests run without drafts in the same batch (see `can_speculate`). A request whose drafts
were all rejected stops proposing for a while, doubling the pause on each miss (up to `MAX_BACKOFF`
steps), so text that does not repeat itself costs little. That state (`spec_token_ids`, `spec_misses`,
`spec_backoff`) lives on the request, so it ends with it; the speculator keeps only its statistics.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from jengine.config import SpeculativeConfig
from jengine.request import Request
from jengine.sampling_params import SamplingParams
from jengine.spec_decode.ngram import NgramProposer

if TYPE_CHECKING:
    from jengine.spec_decode.draft_model import DraftModel

MAX_BACKOFF = 16


@dataclasses.dataclass
class SpecDecodeStats:
    """Counters with vLLM's meaning: drafts proposed, draft tokens verified, draft tokens accepted."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


def can_speculate(params: SamplingParams) -> bool:
    """Whether the per-position sampling rows reproduce this request's one-token-at-a-time sampling."""
    return getattr(params, "structured_outputs", None) is None


class Speculator:
    def __init__(self, config: SpeculativeConfig, draft: Optional["DraftModel"] = None):
        self.k = config.num_speculative_tokens
        self.draft = draft  # the draft model (method "draft_model"), else n-gram drafts
        self.proposer = NgramProposer(self.k, config.prompt_lookup_min, config.prompt_lookup_max) if draft is None else None
        self.stats = SpecDecodeStats()

    def propose(self, running: Sequence[Request]) -> None:
        """Sets `spec_token_ids` on each running request that decodes next and may speculate: its n-gram
        draft, or k placeholder slots that `fill` replaces with the draft model's tokens."""
        for req in running:
            req.spec_token_ids = []
            if not req.decodes_next or not can_speculate(req.sampling_params):
                continue
            if req.spec_backoff > 0:
                req.spec_backoff -= 1
                continue
            req.spec_token_ids = [0] * self.k if self.proposer is None else self.proposer.propose(req.all_token_ids)

    def fill(self, scheduled: Sequence[Any]) -> None:
        """After `schedule()`: the draft model drafts into the rows' reserved slots (and keeps its KV in step
        with every scheduled row); nothing to do for n-gram drafts."""
        if self.draft is not None:
            self.draft.propose(scheduled)

    @staticmethod
    def expand(scheduled: Sequence[Any], rows: Sequence[Any]) -> list[Any]:
        """The sampling rows of the step's logits rows: for a row verifying drafts, its state at each
        position, with the output extended by the drafts before that position."""
        out: list[Any] = []
        for seq, row in zip(scheduled, rows):
            out.append(row)
            drafts = seq.spec_token_ids
            if drafts:
                output = list(row.output_token_ids)
                out.extend(dataclasses.replace(row, output_token_ids=output + drafts[:i], num_committed_outputs=len(output))
                           for i in range(1, len(drafts) + 1))
        return out

    def accept(self, scheduled: Sequence[Any], token_ids: Sequence[int] | np.ndarray) -> list[Optional[list[int]]]:
        """Groups the per-logits-row tokens into each row's output run (see the module docstring)."""
        result: list[Optional[list[int]]] = []
        cursor = 0
        for seq in scheduled:
            drafts = seq.spec_token_ids
            picked = [int(t) for t in token_ids[cursor:cursor + len(drafts) + 1]]
            cursor += len(drafts) + 1
            if not seq.samples:
                result.append(None)
                if self.draft is not None:
                    self.draft.commit(seq, None)
                continue
            n = 0
            while n < len(drafts) and drafts[n] == picked[n]:
                n += 1
            result.append(picked[:n + 1])
            if drafts:
                self._record(seq.request, len(drafts), n)
            if self.draft is not None:
                self.draft.commit(seq, n)
        return result

    def _record(self, req: Request, num_drafts: int, num_accepted: int) -> None:
        self.stats.num_drafts += 1
        self.stats.num_draft_tokens += num_drafts
        self.stats.num_accepted_tokens += num_accepted
        if num_accepted:
            req.spec_misses = 0
            return
        req.spec_misses += 1
        req.spec_backoff = min(2 ** (req.spec_misses - 1), MAX_BACKOFF)
