"""Iteration-level scheduler (vLLM v1 style): each step, every request's computed tokens catch up with its
known tokens as far as a token budget allows.

One `schedule()` call decides one model step:
1. running requests, in order, each get ``min(tokens left to compute, budget)``: 1 for a decode, the next
   chunk for an unfinished prefill (chunked prefill);
2. if nothing was preempted, waiting requests (FCFS, or by (priority, arrival)) are admitted while there
   is budget, a free sequence slot and pages, each starting from its longest prefix-cache hit;
3. when a running request cannot get pages, the least important running request (the last one under
   FCFS; highest (priority, arrival) under "priority") is preempted: its pages are freed and it goes back
   to the front of the waiting queue to be recomputed (prompt + outputs so far).

With layer groups (a `HybridKVCacheManager`: sliding-window and full-attention layers) a request gets pages
only when every group has them, so admission and preemption count pages per group.

`update_from_output` then applies the sampled tokens, checks stop conditions, caches newly full pages and
frees finished requests.

With `async_scheduling` the engine dispatches a step before the previous step's sampled tokens reach the
host: `mark_dispatched` advances each scheduled request right after dispatch (its computed tokens, and a
placeholder for the token its row samples, `Request.num_output_placeholders`), so the next `schedule()`
already gives it the decode row that consumes that token; `update_from_output` then replaces the
placeholder by the real token one step later. A request whose in-flight token is its last by length
(max_tokens, max_model_len) is not scheduled again; one that stops on EOS or a stop string found late
has one extra row in the step already dispatched, whose token is dropped. Every admitted request finishes: `add_request` rejects a request that could
outgrow the whole cache, and a waiting request that cannot get pages while no request of this scheduler
holds any (so nothing will ever free them: pages held outside the scheduler) fails with FINISHED_ERROR
instead of waiting forever.

Every way a request ends here (a stop condition, `finish_requests` for aborts, stop strings and errors, a
request that can never get pages) goes through `_release`, which hands it to the `RequestRegistry`'s
`free` (pages, indexes, per-request state); a preemption frees its pages there too, keeping the record.
"""
from __future__ import annotations

import collections
import dataclasses
import heapq
from collections.abc import Iterable, Iterator, Sequence
from typing import Optional, Union

from jengine.core.hybrid_kv_cache_manager import HybridKVCacheManager
from jengine.core.kv_cache_manager import KVCacheManager
from jengine.core.registry import RequestRegistry
from jengine.request import Request, RequestStatus


@dataclasses.dataclass(slots=True)
class ScheduledSeq:
    """One row of the step: `num_new_tokens` tokens of `request` from position `start`."""

    request: Request
    num_new_tokens: int
    start: int  # num_computed_tokens before the step = position of the first new token
    block_ids: list[int]  # the request's whole page list after allocation (layer group 0's)
    samples: bool  # the step completes the known tokens, so the runner samples a token for this row
    is_decode: bool  # one new token and the prompt already computed
    is_new: bool  # entered the running batch this step (first admission or resumed after preemption)
    # Draft tokens verified this step after the row's last known token (speculative decoding); they are the
    # last len(spec_token_ids) of the num_new_tokens, and the runner returns one token per position.
    spec_token_ids: list[int] = dataclasses.field(default_factory=list)
    num_accepted: int = 0  # output tokens this row appended in update_from_output (after stop truncation)
    # Page lists of layer groups 1.. (sliding-window layers: NULL_PAGE behind the window); empty with one group.
    group_block_ids: tuple[list[int], ...] = ()

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def seq_len(self) -> int:
        """KV length after this step."""
        return self.start + self.num_new_tokens


@dataclasses.dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]  # decode rows first, then prefill chunks
    num_batched_tokens: int
    preempted: list[Request]  # preempted during this schedule() call (runner: drop their state)
    finished_ids: list[str]  # finished/aborted since the previous schedule() (runner: drop their state)

    @property
    def num_seqs(self) -> int:
        return len(self.scheduled)

    @property
    def num_decodes(self) -> int:
        return sum(1 for s in self.scheduled if s.is_decode)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class _FCFSQueue:
    """Waiting queue in arrival order; preempted requests re-enter at the front."""

    def __init__(self) -> None:
        self._q: collections.deque[Request] = collections.deque()

    def add(self, req: Request) -> None:
        self._q.append(req)

    def add_front(self, req: Request) -> None:
        self._q.appendleft(req)

    def peek(self) -> Request:
        return self._q[0]

    def pop(self) -> Request:
        return self._q.popleft()

    def remove(self, req: Request) -> None:
        self._q.remove(req)

    def __len__(self) -> int:
        return len(self._q)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._q)


class _PriorityQueue:
    """Waiting queue ordered by (priority, arrival_time, order of add_request)."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, Request]] = []
        self._order: dict[str, int] = {}
        self._counter = 0

    def key(self, req: Request) -> tuple[int, float, int]:
        """The request's place in the order (given on its first `add` and kept until `forget`): the
        scheduler preempts the running request that comes last in it, so ties in (priority, arrival)
        cannot make two requests preempt each other in turn forever."""
        order = self._order.get(req.request_id)
        if order is None:
            order = self._order[req.request_id] = self._counter
            self._counter += 1
        return req.priority, req.arrival_time, order

    def add(self, req: Request) -> None:
        heapq.heappush(self._heap, (*self.key(req), req))

    add_front = add  # a preempted request keeps its key, which already puts it ahead of later arrivals

    def peek(self) -> Request:
        return self._heap[0][3]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[3]

    def remove(self, req: Request) -> None:
        self._heap = [e for e in self._heap if e[3] is not req]
        heapq.heapify(self._heap)
        self._order.pop(req.request_id, None)

    def forget(self, req: Request) -> None:
        self._order.pop(req.request_id, None)

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return (e[3] for e in sorted(self._heap, key=lambda e: e[:3]))


def max_kv_tokens(prompt_len: int, max_tokens: Optional[int], max_model_len: int) -> int:
    """The most tokens whose KV a request can ever need: its final sampled token is never computed."""
    final = max(max_model_len, prompt_len + 1)
    if max_tokens is not None:
        final = min(final, prompt_len + max_tokens)
    return final - 1


class Scheduler:
    """Decides each step's batch and owns the waiting/running queues (see module doc)."""

    def __init__(
        self,
        kv_cache_manager: Union[KVCacheManager, HybridKVCacheManager],
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        policy: str = "fcfs",
        long_prefill_token_threshold: int = 0,
        max_loras: int = 0,
        async_scheduling: bool = False,
        registry: Optional[RequestRegistry] = None,
    ) -> None:
        if policy not in ("fcfs", "priority"):
            raise ValueError(f"policy must be 'fcfs' or 'priority', got {policy!r}")
        for name, value in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens), ("max_model_len", max_model_len)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if long_prefill_token_threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be >= 0, got {long_prefill_token_threshold}")
        if registry is not None and registry.kv_cache_manager is not kv_cache_manager:
            raise ValueError("the request registry must free pages to the scheduler's KV cache manager")
        self.kv_cache_manager = kv_cache_manager
        # Unfinished requests by id (`requests`) and where they end (`free`); shared with the engine.
        self.registry = registry if registry is not None else RequestRegistry(kv_cache_manager)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.policy = policy
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self.max_loras = max_loras  # distinct LoRA adapters the running batch may hold (0: no limit)
        self.async_scheduling = async_scheduling  # see the module doc: mark_dispatched, placeholders
        self.waiting: Union[_FCFSQueue, _PriorityQueue] = _FCFSQueue() if policy == "fcfs" else _PriorityQueue()
        self.running: list[Request] = []
        self.num_preemptions_total = 0
        self._finished_ids: list[str] = []  # reported by the next schedule()
        self._finished_in_schedule: list[Request] = []  # errors found in schedule(), returned by next update

    # ---- queue state --------------------------------------------------------------------------------

    @property
    def requests(self) -> dict[str, Request]:
        """Unfinished requests by id (the registry's index)."""
        return self.registry.requests

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running) or len(self.waiting) > 0

    @property
    def prefix_cache_queries(self) -> int:
        return self.kv_cache_manager.prefix_cache_queries

    @property
    def prefix_cache_hits(self) -> int:
        return self.kv_cache_manager.prefix_cache_hits

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_cache_manager.usage

    # ---- admission and removal ----------------------------------------------------------------------

    def max_kv_tokens(self, req: Request) -> int:
        """The most tokens whose KV this request can ever need (its final sampled token is never computed)."""
        return max_kv_tokens(req.num_prompt_tokens, req.sampling_params.max_tokens, self.max_model_len)

    def capacity_error(self, prompt_len: int, max_tokens: Optional[int]) -> Optional[str]:
        """Why a request of this size can never run here (None: it can): the rules the engine's request
        validation applies (`jengine.engine.validation`) and `add_request` guards."""
        if prompt_len >= self.max_model_len:
            return (f"prompt is {prompt_len} tokens, but max_model_len is {self.max_model_len}: the prompt must leave "
                    f"room for at least one generated token")
        kv = self.kv_cache_manager
        need = kv.pages_needed(max_kv_tokens(prompt_len, max_tokens, self.max_model_len))
        if need > kv.num_usable_pages:
            return (f"prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) can need {need} KV pages of "
                    f"{kv.page_size} tokens, but the cache has only {kv.num_usable_pages}; lower max_tokens or enlarge the KV cache")
        return None

    def add_request(self, req: Request) -> None:
        """Queues a new, validated request. ValueError for a duplicate id, and (a guard: the engine's
        validation refuses these first, with the same rule) an empty prompt or one that can never fit."""
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        why = "the prompt is empty" if req.num_prompt_tokens == 0 else self.capacity_error(req.num_prompt_tokens, req.sampling_params.max_tokens)
        if why is not None:
            raise ValueError(f"request {req.request_id!r}: {why}")
        req.status = RequestStatus.WAITING
        self.registry.add(req)
        self.waiting.add(req)

    def finish_requests(
        self,
        request_ids: Union[str, Iterable[str]],
        status: RequestStatus,
        stop_reason: Union[int, str, None] = None,
    ) -> list[Request]:
        """Ends requests from outside the step (abort, stop string found by the output processor).

        Frees their pages at once; unknown or already finished ids are ignored. Returns those it ended.
        """
        if not status.is_finished:
            raise ValueError(f"status must be a finished status, got {status.name}")
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        ended = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            req.status = status
            if stop_reason is not None:
                req.stop_reason = stop_reason
            self._release(req)
            ended.append(req)
        return ended

    def abort_requests(self, request_ids: Union[str, Iterable[str]]) -> list[Request]:
        return self.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def _release(self, req: Request) -> None:
        """Ends a finished request (already out of the running list / waiting queue): the registry frees
        its pages and drops it from every index; the next schedule() reports its id."""
        if isinstance(self.waiting, _PriorityQueue):
            self.waiting.forget(req)
        self.registry.free(req)
        self._finished_ids.append(req.request_id)

    def _preempt(self, req: Request) -> None:
        self.registry.free(req, keep_record=True)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.add_front(req)

    def _fail(self, req: Request, why: str) -> None:
        req.status = RequestStatus.FINISHED_ERROR
        req.stop_reason = why
        self._release(req)
        self._finished_in_schedule.append(req)

    def _pick_victim(self) -> Request:
        if isinstance(self.waiting, _PriorityQueue):
            return max(self.running, key=self.waiting.key)
        return self.running[-1]

    def _chunk(self, num_tokens: int, budget: int) -> int:
        if self.long_prefill_token_threshold:
            num_tokens = min(num_tokens, self.long_prefill_token_threshold)
        return min(num_tokens, budget)

    # ---- the step -----------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        kv = self.kv_cache_manager
        budget = self.max_num_batched_tokens
        rows: dict[str, ScheduledSeq] = {}  # insertion order = scheduling order
        preempted: list[Request] = []

        # 1. Running requests, in order.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            pending = req.num_output_placeholders
            if pending and self._reaches_length_limit(req, pending):
                i += 1  # its token in flight is its last: nothing more to compute
                continue
            n = self._chunk(req.num_tokens + pending - req.num_computed_tokens, budget)
            drafts = self._drafts(req, n, budget)
            while True:
                pages = kv.allocate_slots(req, n + len(drafts))
                if pages is not None:
                    break
                if drafts:  # verify no drafts rather than preempt anyone for them
                    drafts = []
                    continue
                victim = self._pick_victim()
                index = self.running.index(victim)
                del self.running[index]
                row = rows.pop(victim.request_id, None)
                if row is not None:
                    budget += row.num_new_tokens
                self._preempt(victim)
                preempted.append(victim)
                if index < i:
                    i -= 1
                if victim is req:
                    break
            if pages is None:
                continue  # req left running; self.running[i] is already the next one
            rows[req.request_id] = self._row(req, n, pages, is_new=False, drafts=drafts)
            budget -= n + len(drafts)
            i += 1

        # 2. Waiting requests, unless this step had to preempt (no room to grow, so none to admit). A request
        # whose adapter would take the running batch past max_loras adapters is passed over (it keeps its place).
        adapters = {r.lora_request.lora_int_id for r in self.running if r.lora_request is not None}
        passed_over: list[Request] = []
        while not preempted and len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting.peek()
            lora_id = req.lora_request.lora_int_id if req.lora_request is not None else None
            if self.max_loras and lora_id is not None and lora_id not in adapters and len(adapters) >= self.max_loras:
                passed_over.append(self.waiting.pop())
                continue
            computed_pages, num_computed = kv.get_computed_pages(req)
            n = self._chunk(req.num_tokens - num_computed, budget)
            pages = kv.allocate_slots(req, n, computed_pages)  # type: ignore[arg-type]  # what its own get_computed_pages gave
            if pages is None:
                if not self.running:  # no request of ours holds pages, so waiting cannot help
                    self.waiting.pop()
                    self._fail(req, "KV cache too small for this request")
                    continue
                break  # head-of-line: wait for pages to free up
            self.waiting.pop()
            req.num_computed_tokens = num_computed
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_computed
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            rows[req.request_id] = self._row(req, n, pages, is_new=True)
            budget -= n
            if lora_id is not None:
                adapters.add(lora_id)
        for req in reversed(passed_over):
            self.waiting.add_front(req)

        decodes = [r for r in rows.values() if r.is_decode]
        prefills = [r for r in rows.values() if not r.is_decode]
        finished_ids, self._finished_ids = self._finished_ids, []
        return SchedulerOutput(
            scheduled=decodes + prefills,
            num_batched_tokens=self.max_num_batched_tokens - budget,
            preempted=preempted,
            finished_ids=finished_ids,
        )

    def _reaches_length_limit(self, req: Request, pending: int) -> bool:
        """The request ends by length once its `pending` in-flight tokens arrive (as `_check_stop` decides)."""
        max_tokens = req.sampling_params.max_tokens
        return ((max_tokens is not None and req.num_output_tokens + pending >= max_tokens)
                or req.num_tokens + pending >= self.max_model_len)

    def mark_dispatched(self, output: SchedulerOutput) -> None:
        """Asynchronous scheduling: the step is on the device, so its rows count as computed now and each
        sampling row leaves a placeholder for its token (see the module doc). Pages these rows fill with
        known tokens join the prefix cache now, as a synchronous step's would after it: the device runs
        steps in order, so a later step that reads them finds them written."""
        kv = self.kv_cache_manager
        for row in output.scheduled:
            req = row.request
            req.num_computed_tokens += row.num_new_tokens
            if row.samples:
                req.num_output_placeholders += 1
            kv.cache_full_pages(req, min(req.num_computed_tokens, req.num_tokens))

    def _drafts(self, req: Request, n: int, budget: int) -> list[int]:
        """The request's proposed drafts this decode row can verify: within the token budget, and never
        enough to pass max_model_len or max_tokens even if all are accepted (plus the token of its own)."""
        spec, req.spec_token_ids = req.spec_token_ids, []
        if not spec or n != 1 or not req.decodes_next:
            return []
        room = min(budget - 1, self.max_model_len - req.num_tokens - 1)
        max_tokens = req.sampling_params.max_tokens
        if max_tokens is not None:
            room = min(room, max_tokens - req.num_output_tokens - 1)
        return spec[:max(room, 0)]

    @staticmethod
    def _row(req: Request, n: int, pages: Union[list[int], tuple[list[int], ...]], is_new: bool, drafts: Sequence[int] = ()) -> ScheduledSeq:
        start = req.num_computed_tokens
        groups = pages if isinstance(pages, tuple) else (pages,)  # a hybrid manager's pages: one list per group
        return ScheduledSeq(
            request=req,
            num_new_tokens=n + len(drafts),
            start=start,
            block_ids=groups[0],
            group_block_ids=groups[1:],
            samples=start + n == req.num_tokens + req.num_output_placeholders,
            is_decode=n == 1 and start >= req.num_prompt_tokens,
            is_new=is_new,
            spec_token_ids=list(drafts),
        )

    def update_from_output(self, output: SchedulerOutput, sampled_token_ids: Sequence[Union[None, int, Sequence[int]]]) -> list[Request]:
        """Applies one step's results; returns the requests that finished since the last call.

        `sampled_token_ids[k]` is what `output.scheduled[k]` produced: None for rows that do not sample,
        else its token, or for a row that verified drafts its accepted tokens (the accepted drafts, then
        the token of its own: 1 to len(drafts) + 1 tokens). Tokens are appended one at a time, so a stop
        condition met inside an accepted run ends the output right there. Rows of requests finished in
        between (aborted after schedule()) are skipped.

        With `async_scheduling` the rows were advanced by `mark_dispatched` already; here each sampling row's
        placeholder becomes its token, also for a request preempted since (it recomputes with that token).
        """
        if len(sampled_token_ids) != len(output.scheduled):
            raise ValueError(f"got {len(sampled_token_ids)} sampled tokens for {len(output.scheduled)} scheduled rows")
        for row, token in zip(output.scheduled, sampled_token_ids):
            if row.samples and token is None and row.request.status == RequestStatus.RUNNING:
                raise ValueError(f"row of request {row.request_id!r} samples but got no token")
        kv = self.kv_cache_manager
        newly_finished, self._finished_in_schedule = self._finished_in_schedule, []
        for row, sampled in zip(output.scheduled, sampled_token_ids):
            req = row.request
            if self.async_scheduling and row.samples and req.num_output_placeholders:
                req.num_output_placeholders -= 1
            preempted = self.async_scheduling and req.status in (RequestStatus.PREEMPTED, RequestStatus.WAITING)
            if req.status != RequestStatus.RUNNING and not preempted:
                continue
            tokens = [] if sampled is None else [int(sampled)] if isinstance(sampled, int) else [int(t) for t in sampled]
            if not 1 <= len(tokens) <= len(row.spec_token_ids) + 1 and row.samples:
                raise ValueError(f"row of request {row.request_id!r} verified {len(row.spec_token_ids)} drafts but got {len(tokens)} tokens")
            if preempted:  # preempted after this step was dispatched: keep its token, recompute later
                self._append_preempted(row, tokens if row.samples else [], newly_finished)
                continue
            if not self.async_scheduling:  # (asynchronous: mark_dispatched counted them)
                # KV is valid for the known tokens and the accepted drafts, not for the rejected ones.
                req.num_computed_tokens += row.num_new_tokens - len(row.spec_token_ids) + max(len(tokens) - 1, 0)
            row.num_accepted = 0
            if row.samples:
                for token in tokens:
                    req.append_output_token_ids(token)
                    row.num_accepted += 1
                    self._check_stop(req)
                    if req.is_finished:
                        break
            kv.cache_full_pages(req, min(req.num_computed_tokens, req.num_tokens))
            if req.is_finished:
                self._release(req)
                newly_finished.append(req)
            elif row.spec_token_ids:
                kv.trim(req, req.num_tokens)
        if newly_finished:
            self.running = [r for r in self.running if not r.is_finished]
        return newly_finished

    def _append_preempted(self, row: ScheduledSeq, tokens: Sequence[int], newly_finished: list[Request]) -> None:
        req = row.request
        row.num_accepted = 0
        for token in tokens:
            req.append_output_token_ids(token)
            row.num_accepted += 1
            self._check_stop(req)
            if req.is_finished:
                self.waiting.remove(req)
                self._release(req)
                newly_finished.append(req)
                return

    def _check_stop(self, req: Request) -> None:
        """Stop token checks (after min_tokens), then the length limits; sets the finished status."""
        params = req.sampling_params
        last = req.output_token_ids[-1]
        num_out = len(req.output_token_ids)
        if num_out >= params.min_tokens:
            if not params.ignore_eos and last in req.eos_token_ids:
                req.status = RequestStatus.FINISHED_STOPPED
                return
            if last in (params.stop_token_ids or ()):
                req.status = RequestStatus.FINISHED_STOPPED
                req.stop_reason = last
                return
        if (params.max_tokens is not None and num_out >= params.max_tokens) or req.num_tokens >= self.max_model_len:
            req.status = RequestStatus.FINISHED_LENGTH
