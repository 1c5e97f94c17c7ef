"""Turns each step's sampled tokens into `RequestOutput`s: text, stop strings, logprobs, metrics.

One `_ParentState` per user request holds its `n` children (the scheduler sees children as separate
requests that share the prompt's cached pages). Each child's `_ChildState` sits on its request record
(`Request.output_state`) and points at the parent's; the processor indexes parents by id (for aborts)
and drops a parent when the registry frees its last child (`release`, an `on_free` callback).

Outputs are cumulative, as vLLM's default: each one carries all text so far, minus a tail that could
still turn into a stop string, so a streaming frontend diffs consecutive outputs to get deltas.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional, Sequence

from jengine.detokenizer import StopStringDetokenizer
from jengine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from jengine.request import Request, RequestStatus
from jengine.sampling_params import SamplingParams


@dataclasses.dataclass(eq=False)  # (eq=False: parent and children refer to each other; identity is what matters)
class _ParentState:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    children: dict[str, "_ChildState"]
    metrics: RequestMetrics
    prompt_logprobs: Optional[list[Optional[dict[int, Logprob]]]] = None
    num_cached_tokens: Optional[int] = None
    num_live: int = 0  # children not freed yet; the parent leaves the index when it reaches 0


@dataclasses.dataclass(eq=False)
class _ChildState:
    parent: _ParentState
    index: int
    detok: StopStringDetokenizer
    logprobs: Optional[list[dict[int, Logprob]]]
    cumulative_logprob: Optional[float]
    finish_reason: Optional[str] = None
    stop_reason: Any = None
    token_ids: Sequence[int] = ()
    freed: bool = False  # its request has ended (`OutputProcessor.release`)


class OutputProcessor:
    """Keeps per-request text state and builds `RequestOutput`s after each step."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._parents: dict[str, _ParentState] = {}  # unfinished user requests by id

    def add_request(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int], params: SamplingParams,
                    children: Sequence[Request], arrival_time: Optional[float]) -> None:
        """Starts the output state of a user request and of each child (on the child's record).
        ValueError when the id is in use (nothing changes then)."""
        if request_id in self._parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        parent = _ParentState(
            request_id, prompt, prompt_token_ids, params, {},
            RequestMetrics(arrival_time=time.monotonic() if arrival_time is None else arrival_time),
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
            num_live=len(children),
        )
        want_lp = params.logprobs is not None
        for index, child in enumerate(children):
            state = _ChildState(parent, index, StopStringDetokenizer(self.tokenizer, prompt_token_ids, params),
                                [] if want_lp else None, 0.0 if want_lp else None)
            parent.children[child.request_id] = child.output_state = state
        self._parents[request_id] = parent

    def child_ids(self, request_id: str) -> list[str]:
        parent = self._parents.get(request_id)
        return list(parent.children) if parent else []

    def release(self, request: Request) -> None:
        """The registry freed this child (`RequestRegistry.on_free`): after the last child of a parent,
        the parent leaves the index. Its state stays on the records, so this step's outputs are still
        built from them."""
        child = request.output_state
        if child is None or child.freed:
            return
        child.freed = True
        parent, pid = child.parent, child.parent.request_id
        parent.num_live -= 1
        if parent.num_live == 0 and self._parents.get(pid) is parent:
            del self._parents[pid]

    @property
    def num_unfinished(self) -> int:
        return len(self._parents)

    # ----- per step -----------------------------------------------------------------------------
    def _decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([int(token_id)])

    def _logprob_entry(self, token: int, lp: float, rank: int, top_ids: Sequence[int], top_lps: Sequence[float], k: int) -> dict[int, Logprob]:
        entry = {int(token): Logprob(float(lp), int(rank), self._decode_token(token))}
        for r, (tid, tlp) in enumerate(zip(top_ids[:k], top_lps[:k]), start=1):
            entry.setdefault(int(tid), Logprob(float(tlp), r, self._decode_token(tid)))
        return entry

    def process(self, scheduled: Sequence[Any], step_out: Any, finished: Sequence[Request]) -> tuple[list[RequestOutput], list[tuple[str, str]]]:
        """Folds one step into the request states.

        Returns the outputs of every request that progressed or finished, and `(child id, stop string)`
        for each child a stop string just ended (the engine finishes those in the scheduler).
        """
        now = time.monotonic()
        touched: dict[int, _ParentState] = {}
        stopped: list[tuple[str, str]] = []
        finished_ids = {r.request_id: r for r in finished}
        cursor = logit_row = 0
        for seq in scheduled:
            req = seq.request
            child = req.output_state
            first_token = cursor
            cursor += seq.num_new_tokens
            row = logit_row + len(seq.spec_token_ids)  # the logits row of the row's last token (see logit_rows)
            logit_row = row + 1
            # A child freed before this step's results (aborted, or finished and reported already) is done.
            if child is None or (child.freed and finished_ids.get(req.request_id) is not req):
                continue
            parent = child.parent
            if parent.metrics.first_scheduled_time is None:
                parent.metrics.first_scheduled_time = now
            if parent.prompt_logprobs is not None and child.index == 0 and step_out is not None and step_out.prompt_logprobs is not None:
                self._add_prompt_logprobs(parent, seq, step_out, first_token)
            if parent.num_cached_tokens is None and req.num_cached_tokens >= 0:
                parent.num_cached_tokens = req.num_cached_tokens
            if not seq.samples or child.finish_reason is not None:
                continue
            if seq.num_accepted == 0:
                continue
            tokens = req.output_token_ids[-seq.num_accepted:]
            params = req.sampling_params
            if parent.metrics.first_token_time is None:
                parent.metrics.first_token_time = now
            parent.metrics.last_token_time = now
            done = finished_ids.get(req.request_id)
            stop_terminated = done is not None and done.status == RequestStatus.FINISHED_STOPPED
            found, kept = None, len(req.output_token_ids)
            for i, t in enumerate(tokens):  # one at a time: a stop string inside a run ends the output there
                last = i == len(tokens) - 1
                found = child.detok.update([t], stop_terminated=stop_terminated and last)
                if found is not None:
                    kept -= len(tokens) - 1 - i
                    break
            if done is not None and not stop_terminated and found is None:
                found = child.detok.finish()
            if found is not None:
                child.finish_reason, child.stop_reason = "stop", found
                if done is None:
                    stopped.append((req.request_id, found))
            elif done is not None:
                child.finish_reason, child.stop_reason = done.finish_reason, done.stop_reason
            if child.logprobs is not None:  # token j of an accepted run was sampled at the row's j-th logits row
                first_row = row - len(seq.spec_token_ids)
                for j, t in enumerate(tokens[: len(tokens) - (len(req.output_token_ids) - kept)]):
                    r = first_row + j
                    lp = float(step_out.logprobs[r])
                    child.logprobs.append(self._logprob_entry(t, lp, step_out.ranks[r], step_out.topk_ids[r], step_out.topk_logprobs[r], params.logprobs))
                    child.cumulative_logprob = (child.cumulative_logprob or 0.0) + lp  # 0.0, not None, with logprobs
            child.token_ids = req.output_token_ids[:kept] if kept < len(req.output_token_ids) else req.output_token_ids
            touched[id(parent)] = parent
        # Requests the scheduler ended without a sampled token this step (errors, aborts).
        for req in finished:
            child = req.output_state
            if child is None:
                continue
            if child.finish_reason is None:
                child.detok.finish()
                child.finish_reason, child.stop_reason = req.finish_reason, req.stop_reason
                child.token_ids = req.output_token_ids
                touched[id(child.parent)] = child.parent
        outputs = [self._make_output(parent, now) for parent in touched.values()]
        return outputs, stopped

    def _add_prompt_logprobs(self, parent: _ParentState, seq: Any, out: Any, first_token: int) -> None:
        num_prompt = len(parent.prompt_token_ids)
        k = parent.params.prompt_logprobs
        assert k is not None and parent.prompt_logprobs is not None  # only called for requests with prompt_logprobs
        for i in range(seq.num_new_tokens):
            pos = seq.start + i  # logits at `pos` predict prompt token pos + 1
            if pos + 1 >= num_prompt or pos + 1 < len(parent.prompt_logprobs):
                continue
            j = first_token + i
            token = parent.prompt_token_ids[pos + 1]
            parent.prompt_logprobs.append(self._logprob_entry(token, out.prompt_logprobs[j], out.prompt_ranks[j], out.prompt_topk_ids[j], out.prompt_topk_logprobs[j], k))

    def _make_output(self, parent: _ParentState, now: float) -> RequestOutput:
        outputs = []
        for child in parent.children.values():
            done = child.finish_reason is not None
            text = child.detok.get_next_output_text(finished=done, delta=False)
            outputs.append(CompletionOutput(
                index=child.index, text=text, token_ids=list(child.token_ids),
                cumulative_logprob=child.cumulative_logprob,
                logprobs=None if child.logprobs is None else list(child.logprobs),
                finish_reason=child.finish_reason, stop_reason=child.stop_reason,
            ))
        finished = all(o.finish_reason is not None for o in outputs)
        if finished:  # (its children are freed by now, or right after: stop strings; `release` drops it)
            parent.metrics.finished_time = now
        return RequestOutput(
            request_id=parent.request_id, prompt=parent.prompt, prompt_token_ids=parent.prompt_token_ids,
            prompt_logprobs=parent.prompt_logprobs, outputs=outputs, finished=finished,
            num_cached_tokens=parent.num_cached_tokens, metrics=parent.metrics,
        )
