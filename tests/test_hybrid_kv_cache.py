"""Layer groups of the KV cache: the layout, the sliding-window page manager, the hybrid manager and the
scheduler over it (host side only; the engine-level tests are in test_sliding_window_kv.py)."""
from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Optional

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings

from jengine.core import NULL_PAGE, KVCacheManager, Scheduler, SchedulerOutput
from jengine.core.hybrid_kv_cache_manager import HybridKVCacheManager, make_kv_cache_manager
from jengine.core.kv_cache_layout import (
    KVCacheLayout, build_layout, cdiv, group_layers, size_groups, sliding_pages_needed,
)
from jengine.request import Request
from jengine.sampling_params import SamplingParams
from jengine.worker.step_inputs import build_step_inputs
from test_kv_cache_manager import make_req
from test_scheduler import EOS, req, run_step, workloads

# ---- layout -----------------------------------------------------------------------------------------


def gemma3_like(num_layers=8, window=16):
    kinds = tuple("sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(num_layers))
    return SimpleNamespace(num_layers=num_layers, sliding_window=window, layer_types=kinds)


def test_groups_and_offsets():
    assert group_layers([None] * 3, 100) == [(None, (0, 1, 2))]  # Llama: one group
    assert group_layers([8, None, 8, 4], 100) == [(None, (1,)), (4, (3,)), (8, (0, 2))]
    assert group_layers([8, None, 8], 100, enabled=False) == [(None, (0, 1, 2))]
    assert group_layers([128, None], 100) == [(None, (0, 1))]  # a window covering max_model_len frees nothing
    assert group_layers([8, 8], 100) == [(8, (0, 1))]  # Mistral: one sliding-window group
    layout = build_layout(gemma3_like(), 40, page_size=8, max_model_len=96, max_num_seqs=2, max_num_batched_tokens=16)
    full, local = layout.groups
    assert (full.sliding_window, full.layers, local.sliding_window, local.layers) == (None, (5,), 16, (0, 1, 2, 3, 4, 6, 7))
    assert local.num_pages == sliding_pages_needed(16, 8, 2, 16) == 2 * (2 + 2) + 2 + 1
    assert full.num_pages == min(40 * 8 - 7 * local.num_pages, 2 * 12 + 1)  # the rest, up to what is usable
    offsets = layout.layer_offsets()
    assert offsets[5] == 0 and offsets[0] == full.num_pages and offsets[7] == full.num_pages + 6 * local.num_pages
    assert layout.total_pages == full.num_pages + 7 * local.num_pages
    # Memory too tight for the bound: sliding layers get what one group would give them, no less.
    assert size_groups([(None, (1,)), (4, (0,))], 5, page_size=4, max_num_seqs=8, max_num_batched_tokens=64,
                       max_pages_per_seq=4) == [5, 5]
    one = build_layout(SimpleNamespace(num_layers=3), 9, page_size=8, max_model_len=64, max_num_seqs=2, max_num_batched_tokens=16)
    assert one == KVCacheLayout(8, (one.groups[0],)) and one.groups[0].num_pages == 9 and one.layer_offsets() == (0, 9, 18)
    assert isinstance(make_kv_cache_manager(one), KVCacheManager)
    assert isinstance(make_kv_cache_manager(layout), HybridKVCacheManager)


# ---- the sliding-window manager -----------------------------------------------------------------------


def held(kv: KVCacheManager, rid: str) -> list[int]:
    return [p for p in kv.get_block_table(rid) if p != NULL_PAGE]


def test_sliding_window_gives_back_pages_behind_the_window():
    W, ps = 8, 4
    kv = KVCacheManager(num_pages=20, page_size=ps, sliding_window=W)
    a = make_req("a", range(1, 41))
    # Chunks of 6 tokens, then decode: after each step only the pages of the last W - 1 positions stay.
    while a.num_computed_tokens < a.num_tokens:
        n = min(6, a.num_tokens - a.num_computed_tokens)
        table = kv.allocate_slots(a, n)
        assert table is not None and len(held(kv, "a")) <= cdiv(W - 1 + n, ps) + 1
        first = max(0, a.num_computed_tokens - W + 1) // ps
        assert all(p == NULL_PAGE for p in table[:first]) and NULL_PAGE not in table[first:]
        a.num_computed_tokens += n
        kv.cache_full_pages(a, a.num_computed_tokens)
        assert len(held(kv, "a")) <= W // ps + 1
    for _ in range(5):
        a.append_output_token_ids(3)
        assert kv.allocate_slots(a, 1) is not None and len(held(kv, "a")) <= W // ps + 1
        a.num_computed_tokens += 1
        kv.cache_full_pages(a, a.num_computed_tokens)
    assert kv.num_free_pages == kv.num_usable_pages - len(held(kv, "a"))
    assert kv.num_cached_pages == a.num_computed_tokens // ps  # pages given back stay findable
    kv.free(a)
    assert kv.num_free_pages == kv.num_usable_pages


def test_sliding_window_prefix_hit_needs_only_the_window_and_skips_evicted_pages():
    W, ps = 8, 4
    kv = KVCacheManager(num_pages=30, page_size=ps, sliding_window=W)
    prompt = list(range(1, 42))  # 41 tokens: 10 full pages
    a = make_req("a", prompt)
    pages_a = kv.allocate_slots(a, 41)
    assert pages_a is not None
    a.num_computed_tokens = 41
    kv.cache_full_pages(a, 41)
    assert kv.get_block_table("a") == [NULL_PAGE] * 8 + pages_a[8:]  # positions < 34 are behind the window
    kv.free(a)
    b = make_req("b", prompt + [99])
    hit, tokens = kv.get_computed_pages(b)
    assert tokens == 40 and hit[:8] == [NULL_PAGE] * 8 and hit[8:] == pages_a[8:10]
    # Evict page 8 (needed for a hit of 10 pages) but keep 5..7: the longest hit whose window is cached
    # ends at page 8: it needs pages 6 and 7 only.
    kv._free.move_to_end(pages_a[8], last=False)
    c = make_req("c", list(range(500, 504)))
    assert kv.allocate_slots(c, 4) == [pages_a[8]]
    hit, tokens = kv.get_computed_pages(b)
    assert tokens == 32 and hit == [NULL_PAGE] * 6 + pages_a[6:8]
    table = kv.allocate_slots(b, b.num_tokens - tokens, hit)
    assert table is not None and table[:6] == [NULL_PAGE] * 6 and table[6:8] == pages_a[6:8]
    assert kv.ref_count(pages_a[6]) == 1 and kv.ref_count(pages_a[5]) == 0
    kv.free(b)
    kv.free(c)
    assert kv.num_free_pages == kv.num_usable_pages


# ---- the hybrid manager -------------------------------------------------------------------------------


def hybrid(full_pages: int, local_pages: int, ps: int = 4, window: int = 8, prefix: bool = True) -> HybridKVCacheManager:
    return HybridKVCacheManager([KVCacheManager(full_pages, ps, prefix), KVCacheManager(local_pages, ps, prefix, sliding_window=window)])


def test_hybrid_allocation_is_all_or_nothing():
    kv = hybrid(full_pages=20, local_pages=4)  # 3 usable local pages
    a = make_req("a", range(1, 17))
    assert kv.allocate_slots(a, 13) is None  # 4 local pages: the local group lacks one, nothing is taken anywhere
    assert kv.groups[0].num_free_pages == 19 and kv.get_block_tables("a") == ([], [])
    for n in (8, 4):
        pages = kv.allocate_slots(a, n)
        assert pages is not None
        a.num_computed_tokens += n
        kv.cache_full_pages(a, a.num_computed_tokens)
    assert kv.num_held_pages("a") == (3, 2)  # position 12's window starts at 5: page 0 given back
    pages = kv.allocate_slots(a, 4)
    assert pages is not None and len(pages[0]) == 4 and pages[1][0] == NULL_PAGE and kv.num_held_pages("a") == (4, 3)
    assert 0 < kv.usage < 1
    kv.free(a)
    assert kv.usage == 0.0


def test_only_full_attention_limits_request_length():
    with_full = hybrid(full_pages=5, local_pages=6)
    assert with_full.pages_needed(100) == 25 > with_full.num_usable_pages  # the scheduler rejects it
    two_windows = HybridKVCacheManager([KVCacheManager(6, 4, sliding_window=4), KVCacheManager(6, 4, sliding_window=8)])
    assert two_windows.pages_needed(100) == 0


def test_hybrid_prefix_hit_is_the_shortest_groups_hit():
    kv = hybrid(full_pages=30, local_pages=30)
    prompt = list(range(1, 42))
    a = make_req("a", prompt)
    assert kv.allocate_slots(a, 41) is not None
    a.num_computed_tokens = 41
    kv.cache_full_pages(a, 41)
    full_a = kv.get_block_tables("a")[0]
    kv.free(a)
    # Drop page 9 from the local group's cache only: both groups' hits end at page 9 (36 tokens).
    local = kv.groups[1]
    local._drop_hash(_cached_page(local, prompt, 9))
    b = make_req("b", prompt + [7])
    (full, loc), tokens = kv.get_computed_pages(b)
    assert tokens == 36 and full == full_a[:9] and len(loc) == 9 and loc[:7] == [NULL_PAGE] * 7
    assert kv.allocate_slots(b, b.num_tokens - tokens, (full, loc)) is not None
    assert kv.prefix_cache_hits == 36


def _cached_page(kv: KVCacheManager, prompt: list[int], i: int) -> int:
    probe = make_req("probe", prompt + [0])
    kv._ensure_hashes(probe, i + 1)
    return kv._cached[probe.block_hashes[i]]


# ---- the scheduler over a hybrid manager ----------------------------------------------------------------


def hybrid_sched(full_pages: int, local_pages: int, ps: int = 4, window: int = 8, prefix: bool = True, **kw) -> Scheduler:
    kw = dict(dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256), **kw)
    return Scheduler(hybrid(full_pages, local_pages, ps, window, prefix), **kw)


def test_local_group_shortage_preempts():
    # Plenty of full-attention pages, few local ones: two long prompts in chunks cannot both hold their
    # window plus a chunk, so the later one is preempted, then both finish.
    s = hybrid_sched(full_pages=64, local_pages=8, max_num_batched_tokens=16)
    a, b = req("a", list(range(10, 40)), max_tokens=3, ignore_eos=True), req("b", list(range(50, 80)), max_tokens=3, ignore_eos=True)
    s.add_request(a)
    s.add_request(b)
    preempted = 0
    for _ in range(40):
        out, _ = run_step(s)
        preempted += len(out.preempted)
        assert all(len([p for p in row.group_block_ids[0] if p != NULL_PAGE]) <= cdiv(7 + row.num_new_tokens, 4) + 1 for row in out.scheduled)
        if not s.has_unfinished_requests():
            break
    assert preempted > 0 and a.is_finished and b.is_finished
    assert all(m.num_free_pages == m.num_usable_pages for m in s.kv_cache_manager.groups)


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_local_group_shortage_with_tied_requests_finishes(policy):
    # Two chunked prompts of equal priority and arrival that cannot both hold their window plus a chunk:
    # the one that comes later in the scheduler's order is preempted each time, so the other finishes
    # (picking the victim by (priority, arrival) alone let them preempt each other in turn forever).
    s = hybrid_sched(full_pages=33, local_pages=13, ps=1, window=7, max_num_batched_tokens=5, max_model_len=31, policy=policy,
                     long_prefill_token_threshold=3)
    a, b = req("a", list(range(10, 22)), max_tokens=3, ignore_eos=True), req("b", list(range(50, 62)), max_tokens=3, ignore_eos=True)
    s.add_request(a)
    s.add_request(b)
    for _ in range(200):
        run_step(s)
        if not s.has_unfinished_requests():
            break
    assert a.is_finished and b.is_finished and s.num_preemptions_total > 0
    assert all(m.num_free_pages == m.num_usable_pages for m in s.kv_cache_manager.groups)


class GroupShadowRunner:
    """Checks every group's pages against a shadow cache: each row attends only its own tokens' KV
    within its group's span, and writes only pages it owns alone."""

    def __init__(self, kv: HybridKVCacheManager, rng: random.Random, eos_prob: float) -> None:
        self.kv, self.rng, self.eos_prob = kv, rng, eos_prob
        self.slots: list[dict[int, list[Optional[int]]]] = [{} for _ in kv.groups]

    def execute(self, out: SchedulerOutput) -> list[Optional[int]]:
        ps = self.kv.page_size
        for row in out.scheduled:
            r, tokens = row.request, row.request.all_token_ids
            tables = (row.block_ids, *row.group_block_ids)
            assert tables == self.kv.get_block_tables(r.request_id)
            for g, (m, table) in enumerate(zip(self.kv.groups, tables)):
                first = m.first_needed_page(row.start)
                assert NULL_PAGE not in table[first:] and len(table) * ps >= row.start + row.num_new_tokens
                if m.sliding_window is not None:
                    assert sum(p != NULL_PAGE for p in table) <= cdiv(m.sliding_window - 1 + row.num_new_tokens, ps) + 1
                for pos in range(first * ps, row.start):
                    assert self.slots[g][table[pos // ps]][pos % ps] == tokens[pos], (r, g, pos)
                for pos in range(row.start, row.start + row.num_new_tokens):
                    page = table[pos // ps]
                    assert m.ref_count(page) == 1 and not m.is_cached(page), "write to a shared page"
                    self.slots[g].setdefault(page, [None] * ps)[pos % ps] = tokens[pos]
        return [None if not row.samples else EOS if self.rng.random() < self.eos_prob else self.rng.randint(2, 4)
                for row in out.scheduled]


def check_groups(s: Scheduler) -> None:
    running = {r.request_id for r in s.running}
    for m in s.kv_cache_manager.groups:
        assert set(m.request_ids()) == running
        owners: dict[int, int] = {}
        for rid in running:
            for p in held(m, rid):
                owners[p] = owners.get(p, 0) + 1
        free = m.free_pages_in_eviction_order()
        assert NULL_PAGE not in free and not set(free) & set(owners) and len(free) + len(owners) == m.num_usable_pages
        assert all(m.ref_count(p) == owners.get(p, 0) for p in range(m.num_pages))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(workloads())
def test_random_workloads_over_layer_groups(w):
    ps = w["page_size"]
    window = max(1, w["max_model_len"] // 4)
    local_pages = max(2, cdiv(window - 1 + w["max_num_batched_tokens"], ps) + 2 + w["seed"] % 3)
    s = hybrid_sched(w["num_pages"], local_pages, ps, window, w["prefix"], max_num_seqs=w["max_num_seqs"],
                     max_num_batched_tokens=w["max_num_batched_tokens"], max_model_len=w["max_model_len"],
                     policy=w["policy"], long_prefill_token_threshold=w["threshold"])
    kv = s.kv_cache_manager
    runner = GroupShadowRunner(kv, random.Random(w["seed"]), w["eos_prob"])
    pending = sorted(w["specs"], key=lambda sp: sp["arrive"])
    admitted: list[Request] = []
    step = 0
    while (pending or s.has_unfinished_requests()) and step < 3000:
        while pending and pending[0]["arrive"] <= step:
            sp = pending.pop(0)
            min_tokens = sp["min_tokens"] if sp["max_tokens"] is None else min(sp["min_tokens"], sp["max_tokens"])
            params = SamplingParams(max_tokens=sp["max_tokens"], min_tokens=min_tokens, ignore_eos=sp["ignore_eos"], stop_token_ids=sp["stop"])
            r = Request(sp["rid"], sp["prompt"], params, eos_token_ids=(EOS,), arrival_time=float(step), priority=sp["priority"])
            try:
                s.add_request(r)
            except ValueError:
                continue
            admitted.append(r)
        out = s.schedule()
        sampled = runner.execute(out)
        s.update_from_output(out, sampled)
        check_groups(s)
        step += 1
    assert step < 3000, "requests did not finish"
    event(f"preemptions>0: {s.num_preemptions_total > 0}")
    event(f"prefix hits>0: {kv.prefix_cache_hits > 0}")
    assert all(r.is_finished and r.finish_reason != "error" for r in admitted)
    assert all(m.num_free_pages == m.num_usable_pages for m in kv.groups)


# ---- step inputs ----------------------------------------------------------------------------------------


def test_step_inputs_carry_each_groups_pages():
    r = req("a", list(range(2, 22)))
    seq = SimpleNamespace(request=r, start=12, num_new_tokens=8, block_ids=[3, 4, 5, 6, 7], group_block_ids=([0, 0, 9, 8, 2],))
    x = build_step_inputs([seq], 8, 2, 6, 4, num_groups=2)
    pos = np.arange(12, 20)
    assert x.slot_mapping.tolist() == (np.array([3, 4, 5, 6, 7])[pos // 4] * 4 + pos % 4).tolist()
    assert x.group_slot_mapping is not None and x.group_block_tables is not None
    assert x.group_slot_mapping.shape == (1, 8) and x.group_block_tables.shape == (1, 2, 6)
    assert x.group_slot_mapping[0].tolist() == (np.array([0, 0, 9, 8, 2])[pos // 4] * 4 + pos % 4).tolist()
    assert x.group_block_tables[0, 0].tolist() == [0, 0, 9, 8, 2, 0] and x.group_block_tables[0, 1].tolist() == [0] * 6
    assert build_step_inputs([seq], 8, 2, 6, 4).group_block_tables is None  # one group: nothing extra


@pytest.mark.parametrize("bad", [0])
def test_sliding_window_must_be_positive(bad):
    with pytest.raises(ValueError, match="sliding_window"):
        KVCacheManager(4, 4, sliding_window=bad)


def test_disable_flag_reaches_the_config():
    from jengine.cli import engine_args_from, parse_args

    on = engine_args_from(parse_args(["generate", "m"])).create_engine_config()
    off = engine_args_from(parse_args(["generate", "m", "--disable-hybrid-kv-cache-manager"])).create_engine_config()
    assert not on.scheduler.disable_hybrid_kv_cache_manager and off.scheduler.disable_hybrid_kv_cache_manager
