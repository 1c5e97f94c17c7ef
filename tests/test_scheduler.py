"""Tests of the iteration-level scheduler: deterministic behaviour and randomized invariants.

The property test drives the scheduler with a fake runner that keeps a shadow KV cache (which token sits
in which page slot): every row must find exactly its own tokens in the pages of its block table, which
catches wrong prefix hits, pages shared while written, and lost pages after preemption.
"""
from __future__ import annotations

import random
from typing import Callable, Optional

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from jengine.core import NULL_PAGE, KVCacheManager, Scheduler, SchedulerOutput
from jengine.request import Request, RequestStatus
from jengine.sampling_params import SamplingParams

EOS = 1


def make_sched(num_pages=64, page_size=4, *, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256,
               policy="fcfs", long_prefill_token_threshold=0, prefix=True) -> Scheduler:
    kv = KVCacheManager(num_pages, page_size, enable_prefix_caching=prefix)
    return Scheduler(kv, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                     max_model_len=max_model_len, policy=policy,
                     long_prefill_token_threshold=long_prefill_token_threshold)


def req(rid: str, prompt, arrival: float = 0.0, priority: int = 0, **params) -> Request:
    params.setdefault("max_tokens", 4)
    return Request(rid, prompt, SamplingParams(**params), eos_token_ids=(EOS,), arrival_time=arrival, priority=priority)


def run_step(sched: Scheduler, token_for: Callable[[Request], int] = lambda r: 7):
    out = sched.schedule()
    tokens = [token_for(row.request) if row.samples else None for row in out.scheduled]
    return out, sched.update_from_output(out, tokens)


def rows(out: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    return [(r.request_id, r.start, r.num_new_tokens, r.samples) for r in out.scheduled]


# ---- deterministic behaviour ------------------------------------------------------------------------

def test_add_request_validation():
    s = make_sched(num_pages=5, page_size=4, max_model_len=32)
    with pytest.raises(ValueError, match="empty"):
        s.add_request(req("e", []))
    with pytest.raises(ValueError, match=r"33.*32"):
        s.add_request(req("long", [5] * 33))
    # The same rule as the engine's request validation: the prompt must leave room for one token.
    with pytest.raises(ValueError, match=r"32.*32.*room"):
        s.add_request(req("full", [5] * 32))
    assert s.capacity_error(12, 4) is None and "room" in s.capacity_error(32, 1)
    with pytest.raises(ValueError, match="KV pages"):
        s.add_request(req("big", [5] * 10, max_tokens=20))  # 29 KV tokens = 8 pages > 4
    with pytest.raises(ValueError, match="KV pages"):
        s.add_request(req("none", [5] * 10, max_tokens=None))  # up to max_model_len
    s.add_request(req("ok", [5] * 10, max_tokens=7))  # 16 KV tokens = 4 pages
    with pytest.raises(ValueError, match="already"):
        s.add_request(req("ok", [5]))
    assert s.num_waiting == 1


def test_chunked_prefill_splits_long_prompt():
    s = make_sched(max_num_batched_tokens=4)
    r = req("a", list(range(10, 20)), max_tokens=2, ignore_eos=True)
    s.add_request(r)
    out, _ = run_step(s)
    assert rows(out) == [("a", 0, 4, False)] and out.num_batched_tokens == 4 and out.scheduled[0].is_new
    out, _ = run_step(s)
    assert rows(out) == [("a", 4, 4, False)] and not out.scheduled[0].is_new
    out, _ = run_step(s)
    assert rows(out) == [("a", 8, 2, True)] and r.output_token_ids == [7]
    out, done = run_step(s)
    assert rows(out) == [("a", 10, 1, True)] and out.scheduled[0].is_decode
    assert done == [r] and r.finish_reason == "length" and r.output_token_ids == [7, 7]
    assert s.kv_cache_manager.num_free_pages == s.kv_cache_manager.num_usable_pages


def test_decodes_first_and_prefill_chunked_to_remaining_budget():
    s = make_sched(max_num_batched_tokens=8)
    a = req("a", [2, 3, 4], max_tokens=5, ignore_eos=True)
    s.add_request(a)
    run_step(s)  # a's prompt done, one token sampled
    b = req("b", list(range(20, 40)), max_tokens=2)
    s.add_request(b)
    out, _ = run_step(s)
    assert rows(out) == [("a", 3, 1, True), ("b", 0, 7, False)]
    assert [r.is_decode for r in out.scheduled] == [True, False]
    assert out.num_batched_tokens == 8


def test_long_prefill_token_threshold_caps_chunks():
    s = make_sched(max_num_batched_tokens=64, long_prefill_token_threshold=5)
    s.add_request(req("a", list(range(2, 14))))
    s.add_request(req("b", list(range(2, 5))))
    out, _ = run_step(s)
    assert rows(out) == [("a", 0, 5, False), ("b", 0, 3, True)]


def test_max_num_seqs_limits_admission():
    s = make_sched(max_num_seqs=2)
    for i in range(3):
        s.add_request(req(f"r{i}", [2, 3]))
    out, _ = run_step(s)
    assert [r.request_id for r in out.scheduled] == ["r0", "r1"]
    assert s.num_running == 2 and s.num_waiting == 1


def test_prefix_cache_hit_in_scheduler():
    s = make_sched(page_size=4)
    shared = list(range(100, 112))
    a = req("a", shared + [1, 2], max_tokens=1)
    s.add_request(a)
    run_step(s)
    assert a.num_cached_tokens == 0 and a.is_finished
    b = req("b", shared + [9], max_tokens=1)
    s.add_request(b)
    out, _ = run_step(s)
    assert rows(out) == [("b", 12, 1, True)]
    assert b.num_cached_tokens == 12
    assert s.prefix_cache_hits == 12 and s.prefix_cache_queries == a.num_prompt_tokens + b.num_prompt_tokens


def test_stop_conditions():
    s = make_sched(max_model_len=12)
    scripted = {"eos": [5, EOS], "minTok": [EOS, EOS, 5], "ignore": [EOS, EOS, EOS],
                "stoptok": [5, 9, 5], "maxlen": [5] * 20, "none": [5] * 20}
    s.add_request(req("eos", [2, 3]))
    s.add_request(req("minTok", [2, 3], min_tokens=2))
    s.add_request(req("ignore", [2, 3], ignore_eos=True, max_tokens=3))
    s.add_request(req("stoptok", [2, 3], stop_token_ids=[9]))
    s.add_request(req("maxlen", [2] * 8, max_tokens=10))
    s.add_request(req("none", [2] * 9, max_tokens=None))
    finished: dict[str, Request] = {}
    for _ in range(20):
        _, done = run_step(s, lambda r: scripted[r.request_id][r.num_output_tokens])
        finished.update((r.request_id, r) for r in done)
    assert not s.has_unfinished_requests()
    expect = {
        "eos": ("stop", None, [5, EOS]),
        "minTok": ("stop", None, [EOS, EOS]),  # the first EOS came before min_tokens
        "ignore": ("length", None, [EOS, EOS, EOS]),
        "stoptok": ("stop", 9, [5, 9]),
        "maxlen": ("length", None, [5] * 4),  # 8 + 4 = max_model_len
        "none": ("length", None, [5] * 3),
    }
    for rid, (reason, stop_reason, output) in expect.items():
        r = finished[rid]
        assert (r.finish_reason, r.stop_reason, r.output_token_ids) == (reason, stop_reason, output), rid


def test_prompt_one_short_of_max_model_len_gets_one_token():
    s = make_sched(max_model_len=8)
    with pytest.raises(ValueError, match="room"):  # the engine's rule: a prompt must leave room for a token
        s.add_request(req("full", [3] * 8, max_tokens=None))
    r = req("a", [3] * 7, max_tokens=None)
    s.add_request(r)
    _, done = run_step(s)
    assert done == [r] and r.finish_reason == "length" and r.num_output_tokens == 1


def test_abort_waiting_and_running_frees_pages_and_reports_ids():
    s = make_sched(max_num_seqs=1)
    a, b = req("a", [2, 3, 4, 5, 6]), req("b", [2, 3])
    s.add_request(a)
    s.add_request(b)
    run_step(s)
    kv = s.kv_cache_manager
    assert kv.get_block_table("a") and s.num_waiting == 1
    assert s.abort_requests(["b", "missing"]) == [b]
    assert s.abort_requests("a") == [a]
    assert a.finish_reason == b.finish_reason == "abort"
    assert kv.num_free_pages == kv.num_usable_pages and not s.has_unfinished_requests()
    out = s.schedule()
    assert sorted(out.finished_ids) == ["a", "b"] and out.is_empty
    assert s.schedule().finished_ids == []


def test_abort_between_schedule_and_update_skips_row():
    s = make_sched()
    a, b = req("a", [2, 3]), req("b", [4, 5])
    s.add_request(a)
    s.add_request(b)
    out = s.schedule()
    s.abort_requests("a")
    done = s.update_from_output(out, [7, 7])
    assert done == [] and a.output_token_ids == [] and b.output_token_ids == [7]
    assert s.num_running == 1


def test_finish_requests_for_stop_string():
    s = make_sched()
    a = req("a", [2, 3])
    s.add_request(a)
    run_step(s)
    assert s.finish_requests("a", RequestStatus.FINISHED_STOPPED, stop_reason="\n\n") == [a]
    assert a.finish_reason == "stop" and a.stop_reason == "\n\n"
    with pytest.raises(ValueError):
        s.finish_requests("a", RequestStatus.RUNNING)


def test_update_checks_token_count():
    s = make_sched()
    s.add_request(req("a", [2, 3]))
    out = s.schedule()
    with pytest.raises(ValueError, match="1 scheduled"):
        s.update_from_output(out, [])
    with pytest.raises(ValueError, match="samples"):
        s.update_from_output(out, [None])
    assert s.update_from_output(out, [7]) == []


def test_preemption_victim_goes_to_front_and_completes():
    # 6 usable pages of 2 tokens. a and b each need up to 3 pages alone plus growth: they collide.
    s = make_sched(num_pages=7, page_size=2, max_num_seqs=2, max_num_batched_tokens=32, max_model_len=64)
    a = req("a", [2, 3, 4], arrival=0, max_tokens=8, ignore_eos=True)
    b = req("b", [5, 6, 7], arrival=1, max_tokens=8, ignore_eos=True)
    c = req("c", [8, 9], arrival=2, max_tokens=1, ignore_eos=True)
    def counting(r: Request) -> int:
        return 10 + r.num_output_tokens

    for r in (a, b):
        s.add_request(r)
    run_step(s, counting)
    s.add_request(c)
    seen_preempted = []
    b_outputs_at_preemption = None
    for _ in range(200):
        out, _ = run_step(s, counting)
        if out.preempted:
            seen_preempted += out.preempted
            if b_outputs_at_preemption is None:
                assert out.preempted == [b]  # the latest-arrived running request
                assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
                assert s.kv_cache_manager.get_block_table("b") == []
                assert list(s.waiting)[:2] == [b, c]  # in front of the earlier-waiting c
                assert "b" not in [row.request_id for row in out.scheduled]
                b_outputs_at_preemption = list(b.output_token_ids)
        if not s.has_unfinished_requests():
            break
    assert b_outputs_at_preemption is not None and b.num_preemptions >= 1
    assert s.num_preemptions_total == len(seen_preempted)
    for r in (a, b):
        assert r.finish_reason == "length"
        assert r.output_token_ids == [10 + i for i in range(8)]  # nothing lost or repeated by recompute
    assert c.is_finished
    assert s.kv_cache_manager.num_free_pages == s.kv_cache_manager.num_usable_pages


def test_preempted_request_reuses_its_own_cached_pages():
    s = make_sched(num_pages=9, page_size=2, max_num_batched_tokens=64, max_model_len=64)
    a = req("a", [2] * 6, arrival=0, max_tokens=6, ignore_eos=True)
    b = req("b", [3] * 6, arrival=1, max_tokens=6, ignore_eos=True)
    s.add_request(a)
    s.add_request(b)
    resumed_start = None
    for _ in range(100):
        out, _ = run_step(s)
        for row in out.scheduled:
            if row.request is b and row.is_new and b.num_preemptions:
                resumed_start = row.start
        if not s.has_unfinished_requests():
            break
    assert b.num_preemptions >= 1 and resumed_start is not None and resumed_start > 0


def test_priority_policy_orders_admission_and_preemption():
    s = make_sched(max_num_seqs=1, policy="priority")
    s.add_request(req("low", [2, 3], arrival=0, priority=5, max_tokens=1))
    s.add_request(req("high", [2, 3], arrival=1, priority=-1, max_tokens=1))
    s.add_request(req("mid", [2, 3], arrival=2, priority=0, max_tokens=1))
    order = [run_step(s)[0].scheduled[0].request_id for _ in range(3)]
    assert order == ["high", "mid", "low"]
    # FCFS admits in arrival order instead.
    f = make_sched(max_num_seqs=1)
    for rid, arr, pr in (("low", 0, 5), ("high", 1, -1)):
        f.add_request(req(rid, [2, 3], arrival=arr, priority=pr, max_tokens=1))
    assert run_step(f)[0].scheduled[0].request_id == "low"


def test_priority_preempts_least_urgent_not_last():
    s = make_sched(num_pages=7, page_size=2, max_num_batched_tokens=32, policy="priority")
    low = req("low", [2, 3, 4], arrival=0, priority=5, max_tokens=8, ignore_eos=True)
    high = req("high", [5, 6, 7], arrival=1, priority=0, max_tokens=8, ignore_eos=True)
    s.add_request(low)
    s.add_request(high)
    victims = []
    for _ in range(100):
        out, _ = run_step(s)
        victims += out.preempted
        if not s.has_unfinished_requests():
            break
    assert victims and victims[0] is low
    assert high.num_preemptions == 0 and high.finish_reason == low.finish_reason == "length"


@pytest.mark.parametrize("hog_when", ["before_admission", "while_running"])
def test_request_that_cannot_get_pages_fails_instead_of_hanging(hog_when):
    s = make_sched(num_pages=5, page_size=2, max_model_len=64)
    kv = s.kv_cache_manager
    hog = Request("hog", [1] * 6)
    r = req("a", [2, 3], max_tokens=4, ignore_eos=True)
    s.add_request(r)
    finished = []
    if hog_when == "while_running":
        finished += run_step(s)[1]
        assert r.status == RequestStatus.RUNNING and len(kv.get_block_table("a")) == 1
    # Everything else is held outside this scheduler, so no preemption can make room.
    assert kv.allocate_slots(hog, 2 * kv.num_free_pages) is not None and kv.num_free_pages == 0
    for _ in range(10):
        finished += run_step(s)[1]
        if not s.has_unfinished_requests():
            break
    assert finished == [r] and r.finish_reason == "error" and isinstance(r.stop_reason, str)
    assert r.num_preemptions == (1 if hog_when == "while_running" else 0)  # it preempted itself first
    assert kv.get_block_table("a") == []


# ---- randomized invariants ----------------------------------------------------------------------

class ShadowRunner:
    """Fake model runner: checks and writes a shadow KV cache, samples random tokens (EOS sometimes)."""

    def __init__(self, kv: KVCacheManager, rng: random.Random, eos_prob: float) -> None:
        self.kv = kv
        self.rng = rng
        self.eos_prob = eos_prob
        self.slots: dict[int, list[Optional[int]]] = {}

    def execute(self, out: SchedulerOutput) -> list[Optional[int]]:
        ps = self.kv.page_size
        for row in out.scheduled:
            r, table = row.request, row.block_ids
            tokens = r.all_token_ids
            assert table == self.kv.get_block_table(r.request_id)
            assert NULL_PAGE not in table and len(table) * ps >= row.start + row.num_new_tokens
            for pos in range(row.start):  # the KV this row attends to must be its own tokens
                assert self.slots[table[pos // ps]][pos % ps] == tokens[pos], (r, pos)
            for pos in range(row.start, row.start + row.num_new_tokens):
                page = table[pos // ps]
                assert self.kv.ref_count(page) == 1 and not self.kv.is_cached(page), "write to a shared page"
                self.slots.setdefault(page, [None] * ps)[pos % ps] = tokens[pos]
        sampled = []
        for row in out.scheduled:
            if not row.samples:
                sampled.append(None)
            elif self.rng.random() < self.eos_prob:
                sampled.append(EOS)
            else:
                sampled.append(self.rng.randint(2, 4))  # tiny vocab: outputs repeat, so prefixes collide
        return sampled


def check_schedule(s: Scheduler, out: SchedulerOutput) -> None:
    assert out.num_batched_tokens == sum(r.num_new_tokens for r in out.scheduled) <= s.max_num_batched_tokens
    assert len(out.scheduled) <= s.num_running <= s.max_num_seqs
    flags = [r.is_decode for r in out.scheduled]
    assert flags == sorted(flags, reverse=True), "decode rows must come first"
    ids = [r.request_id for r in out.scheduled]
    assert len(set(ids)) == len(ids)
    for row in out.scheduled:
        r = row.request
        assert r.status == RequestStatus.RUNNING and row.num_new_tokens >= 1
        assert row.start == r.num_computed_tokens and row.start + row.num_new_tokens <= r.num_tokens
        assert row.samples == (row.start + row.num_new_tokens == r.num_tokens)
        assert row.is_decode == (row.num_new_tokens == 1 and row.start >= r.num_prompt_tokens)
    for p in out.preempted:
        assert p.status == RequestStatus.PREEMPTED and p.num_computed_tokens == 0 and p.request_id not in ids
    check_state(s)


def check_state(s: Scheduler) -> None:
    kv = s.kv_cache_manager
    running = {r.request_id for r in s.running}
    waiting = [r.request_id for r in s.waiting]
    assert len(running) == len(s.running) and len(set(waiting)) == len(waiting) and not running & set(waiting)
    assert set(s.requests) == running | set(waiting)
    assert all(r.status == RequestStatus.RUNNING for r in s.running)
    assert all(r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED) for r in s.waiting)
    assert set(kv.request_ids()) == running, "only running requests own pages"
    owners: dict[int, int] = {}
    for rid in running:
        table = kv.get_block_table(rid)
        assert table and NULL_PAGE not in table and len(set(table)) == len(table)
        for p in table:
            owners[p] = owners.get(p, 0) + 1
    free = kv.free_pages_in_eviction_order()
    assert NULL_PAGE not in free and not set(free) & set(owners)
    assert len(free) + len(owners) == kv.num_usable_pages
    assert sum(kv.ref_count(p) for p in range(kv.num_pages)) == sum(owners.values())
    assert all(kv.ref_count(p) == owners.get(p, 0) for p in range(kv.num_pages))


@st.composite
def workloads(draw):
    page_size = draw(st.sampled_from([1, 2, 4]))
    max_model_len = draw(st.integers(8, 40))
    prefixes = draw(st.lists(st.lists(st.integers(2, 4), min_size=1, max_size=12), min_size=1, max_size=3))
    specs = []
    for i in range(draw(st.integers(2, 12))):
        prompt = draw(st.sampled_from(prefixes)) + draw(st.lists(st.integers(2, 4), max_size=8))
        specs.append(dict(
            rid=f"r{i}",
            arrive=draw(st.integers(0, 6)),
            prompt=prompt,
            max_tokens=draw(st.one_of(st.none(), st.integers(1, 12))),
            min_tokens=draw(st.integers(0, 2)),
            ignore_eos=draw(st.booleans()),
            stop=draw(st.sampled_from([[], [3]])),
            priority=draw(st.integers(-2, 2)),
            abort_at=draw(st.one_of(st.none(), st.integers(0, 40))),
        ))
    # Size the cache around the largest request so that each one usually fits alone but they collide
    # (preemption); a negative margin makes the largest ones get rejected.
    def kv_tokens(sp):
        final = max(max_model_len, len(sp["prompt"]) + 1)
        if sp["max_tokens"] is not None:
            final = min(final, len(sp["prompt"]) + sp["max_tokens"])
        return final - 1

    largest = max(-(-kv_tokens(sp) // page_size) for sp in specs)
    num_pages = max(2, 1 + largest + draw(st.integers(-1, 4)))
    return dict(
        page_size=page_size,
        num_pages=num_pages,
        max_num_seqs=draw(st.integers(1, 8)),
        max_num_batched_tokens=draw(st.integers(1, 32)),
        max_model_len=max_model_len,
        policy=draw(st.sampled_from(["fcfs", "priority"])),
        threshold=draw(st.sampled_from([0, 0, 3])),
        prefix=draw(st.sampled_from([True, True, False])),
        eos_prob=draw(st.sampled_from([0.0, 0.05, 0.3])),
        seed=draw(st.integers(0, 2**16)),
        specs=specs,
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(workloads())
def test_random_workloads_keep_invariants_and_finish(w):
    s = make_sched(w["num_pages"], w["page_size"], max_num_seqs=w["max_num_seqs"],
                   max_num_batched_tokens=w["max_num_batched_tokens"], max_model_len=w["max_model_len"],
                   policy=w["policy"], long_prefill_token_threshold=w["threshold"], prefix=w["prefix"])
    kv = s.kv_cache_manager
    runner = ShadowRunner(kv, random.Random(w["seed"]), w["eos_prob"])
    admitted: dict[str, Request] = {}
    finished: dict[str, Request] = {}
    reported_ids: set[str] = set()
    pending = sorted(w["specs"], key=lambda sp: sp["arrive"])
    abort_at = {sp["rid"]: sp["abort_at"] for sp in w["specs"]}
    step = 0
    max_steps = 3000
    while (pending or s.has_unfinished_requests()) and step < max_steps:
        while pending and pending[0]["arrive"] <= step:
            sp = pending.pop(0)
            min_tokens = sp["min_tokens"] if sp["max_tokens"] is None else min(sp["min_tokens"], sp["max_tokens"])
            params = SamplingParams(max_tokens=sp["max_tokens"], min_tokens=min_tokens,
                                    ignore_eos=sp["ignore_eos"], stop_token_ids=sp["stop"])
            r = Request(sp["rid"], sp["prompt"], params, eos_token_ids=(EOS,), arrival_time=float(step),
                        priority=sp["priority"])
            try:
                s.add_request(r)
            except ValueError:
                too_long = len(sp["prompt"]) >= w["max_model_len"]  # a prompt must leave room for one token
                assert too_long or kv.pages_needed(s.max_kv_tokens(r)) > kv.num_usable_pages
                continue
            admitted[r.request_id] = r
        for rid, r in admitted.items():
            if abort_at[rid] == step and not r.is_finished:
                assert s.abort_requests(rid) == [r]
                finished[rid] = r
        out = s.schedule()
        reported_ids.update(out.finished_ids)
        check_schedule(s, out)
        sampled = runner.execute(out)
        if step % 7 == 3 and out.scheduled:  # sometimes abort a scheduled request before the update
            victim = out.scheduled[-1].request
            s.abort_requests(victim.request_id)
            finished[victim.request_id] = victim
        for r in s.update_from_output(out, sampled):
            assert r.request_id not in finished
            finished[r.request_id] = r
        check_state(s)
        step += 1
    assert step < max_steps, "requests did not finish"
    event(f"preemptions>0: {s.num_preemptions_total > 0}")
    event(f"prefix hits>0: {kv.prefix_cache_hits > 0}")
    event(f"rejected>0: {len(admitted) < len(w['specs'])}")
    reported_ids.update(s.schedule().finished_ids)
    assert set(finished) == set(admitted) == reported_ids
    assert kv.num_free_pages == kv.num_usable_pages
    for r in finished.values():
        sp = r.sampling_params
        assert r.is_finished and r.finish_reason in ("stop", "length", "abort", "error")
        assert r.finish_reason != "error"  # add_request already rejected every request that could not fit
        out_len = r.num_output_tokens
        if sp.max_tokens is not None:
            assert out_len <= sp.max_tokens
        assert r.num_tokens <= max(w["max_model_len"], r.num_prompt_tokens + 1)
        if r.finish_reason == "stop":
            last = r.output_token_ids[-1]
            assert out_len >= sp.min_tokens and ((last == EOS and not sp.ignore_eos) or last in sp.stop_token_ids)
        if r.finish_reason == "length":
            assert out_len == sp.max_tokens or r.num_tokens >= w["max_model_len"]
