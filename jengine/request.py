"""Host-side state of one generation request, shared by the scheduler, the KV cache manager and the engine.

A `Request` is the one record of a sequence: besides its tokens and status it holds what each part of the
engine keeps for it (its seed, grammar matcher, speculative-decoding state, its KV pages
in every layer group, and its output state, which points at its parent
request's). Managers index requests by id only where they look them up by id; a request ends in one place,
`jengine.core.registry.RequestRegistry.free`, which drops it from every index and clears that state.

The scheduler's model is vLLM v1's: a request has `num_tokens` known tokens (prompt plus outputs so far)
and `num_computed_tokens` of them have their KV in the cache; each step lets the computed count catch up
with the known count, and a step that makes them equal samples one more token.
"""
from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

from jengine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from jengine.lora.request import LoRARequest


@dataclasses.dataclass(slots=True)
class PageHold:
    """One request's pages in one KV manager (a layer group), kept on the request (`Request.kv_pages`)
    so they end with it; `jengine.core.kv_cache_manager` fills and frees it."""

    pages: list[int]  # in token order; NULL_PAGE where a sliding window gave a page back
    num_hashed: int = 0  # leading pages already registered in the prefix cache
    num_skipped: int = 0  # leading pages already given back (sliding window only)


class RequestStatus(enum.IntEnum):
    """Lifecycle of a request. Every status from FINISHED_STOPPED on is terminal."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2  # lost its pages; waits to be recomputed (prompt + outputs so far)
    FINISHED_STOPPED = 3  # EOS, a stop token, or a stop string (set by the output processor)
    FINISHED_LENGTH = 4  # max_tokens or max_model_len reached
    FINISHED_ABORTED = 5  # client went away or asked to cancel
    FINISHED_ERROR = 6  # the engine could not serve it (e.g. it cannot fit in the KV cache)

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


class Request:
    """One sequence to generate. A plain mutable record: the scheduler and engine read and write its fields.

    Append generated tokens with `append_output_token_ids` (keeps `all_token_ids` in step without copying);
    appending to `output_token_ids` directly also works but costs a rebuild of `all_token_ids` on next read.
    """

    __slots__ = (
        "request_id",
        "prompt_token_ids",
        "sampling_params",
        "eos_token_ids",
        "arrival_time",
        "priority",
        "extra_keys",
        "output_token_ids",
        "num_computed_tokens",
        "num_cached_tokens",
        "num_preemptions",
        "status",
        "stop_reason",
        "block_hashes",
        "spec_token_ids",
        "spec_backoff",
        "num_output_placeholders",
        "lora_request",
        "seed",
        "structured_output",
        "spec_misses",
        "draft_num_valid",
        "kv_pages",
        "output_state",
        "freed",
        "_all_token_ids",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling_params: Optional[SamplingParams] = None,
        eos_token_ids: Union[int, Iterable[int], None] = (),
        arrival_time: Optional[float] = None,
        priority: int = 0,
        extra_keys: tuple = (),
        lora_request: Optional["LoRARequest"] = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.sampling_params = sampling_params if sampling_params is not None else SamplingParams()
        if eos_token_ids is None:
            eos_token_ids = ()
        elif isinstance(eos_token_ids, int):
            eos_token_ids = (eos_token_ids,)
        self.eos_token_ids: tuple[int, ...] = tuple(eos_token_ids)
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.priority = priority  # lower = more urgent (vLLM convention); only used by the "priority" policy
        # Folded into every page hash, so requests with different extra keys (LoRA id, cache salt) never
        # share cached pages.
        self.extra_keys: tuple = tuple(extra_keys)
        self.lora_request = lora_request  # the adapter this request runs with (None: the base model)
        if lora_request is not None:
            self.extra_keys += (("lora", lora_request.lora_int_id),)
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.num_cached_tokens = -1  # prefix-cache hit at first admission; -1 until admitted
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: Union[int, str, None] = None  # the stop token id or stop string that ended it
        # Chained hashes of the full pages of all_token_ids, filled lazily by the KV cache manager. Tokens
        # are append-only, so the list stays valid across preemption.
        self.block_hashes: list[int] = []
        # Draft tokens proposed for the next step (speculative decoding); the step verifies and clears them.
        self.spec_token_ids: list[int] = []
        self.spec_backoff = 0  # steps to skip proposing after drafts that were all rejected
        # Asynchronous scheduling: tokens sampled by a step still on the device (0 or 1); the scheduler
        # counts them as known, and the step that follows reads them on the device.
        self.num_output_placeholders = 0
        # ---- per-request state of the engine's parts (cleared by `release_state` when the request ends) ----
        self.seed: Optional[int] = None  # the sampling seed (the engine draws one for unseeded requests)
        self.structured_output: Any = None  # its grammar matcher (`structured_output.manager.ConstrainedSequence`)
        self.spec_misses = 0  # consecutive verified drafts that were all rejected (sets spec_backoff)
        # Speculation with a draft model: the positions whose draft KV is valid (a prefix), None before any
        self.draft_num_valid: Optional[int] = None
        # Its pages in each KV cache manager (one per layer group) that gave it any, keyed by that manager.
        self.kv_pages: dict[Any, PageHold] = {}
        self.output_state: Any = None  # the output processor's state of this child; it points at its parent's
        self.freed = False  # ended and released (`RequestRegistry.free`)
        self._all_token_ids: list[int] = list(self.prompt_token_ids)

    # ---- tokens -------------------------------------------------------------------------------------

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt + outputs. Read-only view: do not mutate the returned list."""
        if len(self._all_token_ids) != len(self.prompt_token_ids) + len(self.output_token_ids):
            self._all_token_ids = self.prompt_token_ids + self.output_token_ids
        return self._all_token_ids

    def append_output_token_ids(self, token_ids: Union[int, Iterable[int]]) -> None:
        if isinstance(token_ids, int):
            token_ids = (token_ids,)
        all_ids = self.all_token_ids  # resync first in case output_token_ids was edited directly
        for t in token_ids:
            self.output_token_ids.append(t)
            all_ids.append(t)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def decodes_next(self) -> bool:
        """Its prompt is computed and only its last token's KV is missing: the next step is one decode."""
        return self.num_computed_tokens + 1 == self.num_tokens and self.num_computed_tokens >= len(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def release_state(self) -> None:
        """Drops the engine parts' per-request state (the request has ended; pages are freed separately).
        Its seed, tokens and output state stay: the output of its last step is built after this."""
        self.structured_output = None
        self.spec_token_ids = []
        self.spec_misses = self.spec_backoff = 0
        self.draft_num_valid = None

    # ---- status -------------------------------------------------------------------------------------

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> Optional[str]:
        """OpenAI-style finish reason: "stop" | "length" | "abort" | "error", or None while unfinished."""
        return _FINISH_REASONS.get(self.status)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, prompt={self.num_prompt_tokens}, "
            f"output={self.num_output_tokens}, computed={self.num_computed_tokens})"
        )
