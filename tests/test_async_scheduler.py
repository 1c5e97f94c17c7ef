"""The scheduler under asynchronous scheduling, against the synchronous scheduler.

A fake device samples token f(request, position), so a request's output does not depend on when or in
which batch it ran: the synchronous and the asynchronous step loops must then give every request the
same tokens and finish status, under chunked prefill, prefix caching and preemption. The fake device
keeps a shadow KV cache written with the tokens it knows (the host's, plus the ones it sampled and the
host has not seen yet): every row must read exactly its own tokens from its pages.
"""
from __future__ import annotations

from typing import Optional

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jengine.core import NULL_PAGE, KVCacheManager, Scheduler, SchedulerOutput
from jengine.request import Request, RequestStatus
from jengine.sampling_params import SamplingParams

EOS = 1


def token_at(rid: str, pos: int, eos_every: int) -> int:
    """The fake model's token for position `pos` of request `rid` (EOS now and then)."""
    h = (hash(rid) * 31 + pos * 7919) % 1000003
    return EOS if eos_every and h % eos_every == 0 else 2 + h % 3


class ShadowDevice:
    """Runs steps in order on a shadow KV cache; knows sampled tokens before the host does."""

    def __init__(self, kv: KVCacheManager, eos_every: int) -> None:
        self.kv = kv
        self.eos_every = eos_every
        self.slots: dict[int, list[Optional[int]]] = {}
        self.device_tokens: dict[str, list[int]] = {}  # per request: the tokens the device has (host's + in flight)
        self.samples: dict[str, int] = {}  # tokens sampled per request

    def run(self, out: SchedulerOutput) -> list[Optional[int]]:
        ps = self.kv.page_size
        sampled: list[Optional[int]] = []
        for row in out.scheduled:
            r, table = row.request, row.block_ids
            tokens = self.device_tokens.setdefault(r.request_id, list(r.all_token_ids))
            if len(tokens) < r.num_tokens:  # recomputed after preemption: the host has everything now
                tokens[:] = r.all_token_ids
            assert NULL_PAGE not in table and len(table) * ps >= row.start + row.num_new_tokens
            for pos in range(row.start):
                assert self.slots[table[pos // ps]][pos % ps] == tokens[pos], (r, pos)
            for pos in range(row.start, row.start + row.num_new_tokens):
                assert pos < len(tokens), "a row computes a token nobody sampled"
                self.slots.setdefault(table[pos // ps], [None] * ps)[pos % ps] = tokens[pos]
            if row.samples:
                tok = token_at(r.request_id, row.start + row.num_new_tokens, self.eos_every)
                del tokens[row.start + row.num_new_tokens:]
                tokens.append(tok)
                self.samples[r.request_id] = self.samples.get(r.request_id, 0) + 1
                sampled.append(tok)
            else:
                sampled.append(None)
        return sampled


def make(w: dict, async_scheduling: bool) -> Scheduler:
    kv = KVCacheManager(w["num_pages"], w["page_size"], enable_prefix_caching=w["prefix"])
    return Scheduler(kv, max_num_seqs=w["max_num_seqs"], max_num_batched_tokens=w["max_num_batched_tokens"],
                     max_model_len=w["max_model_len"], policy=w["policy"], async_scheduling=async_scheduling)


def drive(w: dict, async_scheduling: bool) -> dict[str, tuple[list[int], RequestStatus]]:
    s = make(w, async_scheduling)
    kv = s.kv_cache_manager
    device = ShadowDevice(kv, w["eos_every"])
    reqs = []
    for i, sp in enumerate(w["specs"]):
        params = SamplingParams(max_tokens=sp["max_tokens"], ignore_eos=sp["ignore_eos"], stop_token_ids=sp["stop"])
        r = Request(f"r{i}", sp["prompt"], params, eos_token_ids=(EOS,))
        try:
            s.add_request(r)
        except ValueError:
            continue
        reqs.append(r)
    in_flight: Optional[tuple[SchedulerOutput, list]] = None
    for _ in range(3000):
        if not (s.has_unfinished_requests() or in_flight):
            break
        out = s.schedule()
        for row in out.scheduled:
            assert row.request.status == RequestStatus.RUNNING and row.num_new_tokens >= 1
            assert row.request.num_output_placeholders <= 1
        sampled = device.run(out)
        if async_scheduling:
            s.mark_dispatched(out)
            if in_flight is not None:
                s.update_from_output(*in_flight)
            in_flight = (out, sampled) if out.scheduled else None
        else:
            s.update_from_output(out, sampled)
    assert not s.has_unfinished_requests() and in_flight is None, "did not finish"
    assert kv.num_free_pages == kv.num_usable_pages and not kv.request_ids()
    assert all(r.num_output_placeholders == 0 for r in reqs)
    for r in reqs:  # no sampled token is lost; asynchronous steps waste at most one row past a stop
        assert len(r.output_token_ids) <= device.samples.get(r.request_id, 0) <= len(r.output_token_ids) + async_scheduling
    return {r.request_id: (list(r.output_token_ids), r.status) for r in reqs}


@st.composite
def workloads(draw):
    page_size = draw(st.sampled_from([1, 2, 4]))
    max_model_len = draw(st.integers(8, 40))
    prefixes = draw(st.lists(st.lists(st.integers(2, 4), min_size=1, max_size=12), min_size=1, max_size=3))
    specs = [dict(prompt=draw(st.sampled_from(prefixes)) + draw(st.lists(st.integers(2, 4), max_size=8)),
                  max_tokens=draw(st.one_of(st.none(), st.integers(1, 12))), ignore_eos=draw(st.booleans()),
                  stop=draw(st.sampled_from([[], [3]])))
             for _ in range(draw(st.integers(1, 10)))]
    return dict(page_size=page_size, num_pages=draw(st.integers(2, 30)), max_num_seqs=draw(st.integers(1, 8)),
                max_num_batched_tokens=draw(st.integers(1, 32)), max_model_len=max_model_len,
                policy=draw(st.sampled_from(["fcfs", "priority"])), prefix=draw(st.booleans()),
                eos_every=draw(st.sampled_from([0, 5, 17])), specs=specs)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(workloads())
def test_async_scheduler_gives_the_same_outputs_as_sync(w):
    assert drive(w, async_scheduling=True) == drive(w, async_scheduling=False)


def test_placeholder_row_then_fix_up():
    kv = KVCacheManager(16, 4)
    s = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, async_scheduling=True)
    r = Request("a", [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True), eos_token_ids=(EOS,))
    s.add_request(r)
    first = s.schedule()
    assert [(x.num_new_tokens, x.samples) for x in first.scheduled] == [(3, True)]
    s.mark_dispatched(first)
    assert (r.num_computed_tokens, r.num_output_placeholders, r.output_token_ids) == (3, 1, [])
    second = s.schedule()  # before the first step's token is known: a decode row over the placeholder
    assert [(x.start, x.num_new_tokens, x.samples, x.is_decode) for x in second.scheduled] == [(3, 1, True, True)]
    s.mark_dispatched(second)
    assert s.update_from_output(first, [[9]]) == []
    assert (r.output_token_ids, r.num_output_placeholders, r.num_computed_tokens) == ([9], 1, 4)
    third = s.schedule()
    s.mark_dispatched(third)
    s.update_from_output(second, [[10]])
    assert s.schedule().scheduled == []  # its third token, in flight, is its last (max_tokens=3)
    assert s.update_from_output(third, [[11]]) == [r] and r.status == RequestStatus.FINISHED_LENGTH
    assert r.output_token_ids == [9, 10, 11] and kv.num_free_pages == kv.num_usable_pages


def test_eos_found_late_drops_the_extra_row_and_frees_pages():
    kv = KVCacheManager(16, 4)
    s = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, async_scheduling=True)
    r = Request("a", [5, 6, 7], SamplingParams(max_tokens=10), eos_token_ids=(EOS,))
    s.add_request(r)
    first = s.schedule()
    s.mark_dispatched(first)
    second = s.schedule()
    s.mark_dispatched(second)
    assert s.update_from_output(first, [[EOS]]) == [r]  # EOS: the row of `second` is wasted
    assert kv.num_free_pages == kv.num_usable_pages and not s.has_unfinished_requests()
    assert s.update_from_output(second, [[4]]) == [] and r.output_token_ids == [EOS]


def test_token_of_a_request_preempted_in_flight_is_kept():
    kv = KVCacheManager(4, 4)  # 3 usable pages
    s = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, async_scheduling=True)
    a = Request("a", [2] * 4, SamplingParams(max_tokens=6, ignore_eos=True), eos_token_ids=(EOS,))
    b = Request("b", [3] * 3, SamplingParams(max_tokens=6, ignore_eos=True), eos_token_ids=(EOS,))
    s.add_request(a)
    s.add_request(b)
    first = s.schedule()  # a: 4 tokens (1 page), b: 3 tokens (1 page)
    s.mark_dispatched(first)
    second = s.schedule()  # a's decode needs a second page; b's still fits in its first
    s.mark_dispatched(second)
    s.update_from_output(first, [[4], [4]])
    third = s.schedule()  # b's next decode needs a page: b (the last running) is preempted
    assert [p.request_id for p in third.preempted] == ["b"] and b.num_output_placeholders == 1
    s.mark_dispatched(third)
    s.update_from_output(second, [[5], [6]])  # b's token sampled before its preemption arrives now: kept
    assert b.status == RequestStatus.PREEMPTED and b.output_token_ids == [4, 6] and b.num_output_placeholders == 0
    in_flight = (third, [[7] if row.samples else None for row in third.scheduled])
    while s.has_unfinished_requests() or in_flight:
        out = s.schedule()
        s.mark_dispatched(out)
        if in_flight:
            s.update_from_output(*in_flight)
        in_flight = (out, [[7] if row.samples else None for row in out.scheduled]) if out.scheduled else None
    assert a.output_token_ids == [4, 5, 7, 7, 7, 7] and b.output_token_ids == [4, 6, 7, 7, 7, 7]
    assert kv.num_free_pages == kv.num_usable_pages
