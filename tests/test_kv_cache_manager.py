"""Tests of the paged KV cache manager: allocation, reference counts, prefix caching, eviction order."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jengine.core.kv_cache_manager import NULL_PAGE, KVCacheManager
from jengine.request import Request
from jengine.sampling_params import SamplingParams


def make_req(rid: str, tokens, **kw) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=16), eos_token_ids=(0,), **kw)


def admit(kv: KVCacheManager, req: Request) -> list[int]:
    """First admission the way the scheduler does it: prefix lookup, allocate the rest, mark computed."""
    pages, num_computed = kv.get_computed_pages(req)
    table = kv.allocate_slots(req, req.num_tokens - num_computed, pages)
    assert table is not None
    req.num_computed_tokens = req.num_tokens
    kv.cache_full_pages(req, req.num_computed_tokens)
    return table


def check_invariants(kv: KVCacheManager) -> None:
    owners: dict[int, int] = {}
    for rid in kv.request_ids():
        table = kv.get_block_table(rid)
        assert NULL_PAGE not in table
        assert len(set(table)) == len(table), "a request owns a page twice"
        for p in table:
            owners[p] = owners.get(p, 0) + 1
    free = kv.free_pages_in_eviction_order()
    assert NULL_PAGE not in free
    assert len(set(free)) == len(free)
    assert not set(free) & set(owners), "a page is both free and owned"
    assert len(free) + len(owners) == kv.num_usable_pages
    for p in range(kv.num_pages):
        assert kv.ref_count(p) == owners.get(p, 0)


def test_allocation_and_null_page():
    kv = KVCacheManager(num_pages=5, page_size=4)
    a = make_req("a", range(1, 11))  # 10 tokens -> 3 pages
    table = kv.allocate_slots(a, 10)
    assert table is not None and len(table) == 3 and NULL_PAGE not in table
    assert kv.num_free_pages == 1
    assert kv.usage == pytest.approx(0.75)
    # Growing within the last page needs nothing new; crossing into a 4th page takes the last free one.
    a.num_computed_tokens = 10
    assert kv.allocate_slots(a, 2) == table
    grown = kv.allocate_slots(a, 3)
    assert grown[:3] == table and len(grown) == 4 and NULL_PAGE not in grown
    assert kv.num_free_pages == 0
    check_invariants(kv)
    kv.free(a)
    assert kv.num_free_pages == 4 and kv.usage == 0.0
    assert kv.get_block_table("a") == []
    check_invariants(kv)


def test_failure_has_no_side_effects():
    kv = KVCacheManager(num_pages=4, page_size=2, enable_prefix_caching=True)
    a = make_req("a", [1, 2, 3, 4, 5])
    admit(kv, a)  # 3 pages, 2 full ones cached
    kv.free(a)
    b = make_req("b", [1, 2, 3, 4, 9, 9, 9, 9, 9])  # hits 2 pages, needs 3 more: only 1 free besides them
    pages, n = kv.get_computed_pages(b)
    assert n == 4
    before = (kv.free_pages_in_eviction_order(), [kv.ref_count(p) for p in range(4)], kv.prefix_cache_queries)
    assert kv.allocate_slots(b, b.num_tokens - n, pages) is None
    after = (kv.free_pages_in_eviction_order(), [kv.ref_count(p) for p in range(4)], kv.prefix_cache_queries)
    assert before == after
    assert kv.request_ids() == []
    assert kv.get_computed_pages(make_req("c", [1, 2, 3, 4, 7]))[1] == 4  # the cached pages survived
    check_invariants(kv)


def test_prefix_hit_shares_pages_and_counts_stats():
    kv = KVCacheManager(num_pages=16, page_size=4)
    prefix = list(range(100, 112))  # 3 full pages
    a = make_req("a", prefix + [1, 2])
    ta = admit(kv, a)
    b = make_req("b", prefix + [7, 8, 9])
    pages, n = kv.get_computed_pages(b)
    assert pages == ta[:3] and n == 12
    tb = kv.allocate_slots(b, b.num_tokens - n, pages)
    assert tb[:3] == ta[:3] and tb[3] not in ta
    for p in ta[:3]:
        assert kv.ref_count(p) == 2
    assert kv.prefix_cache_queries == a.num_tokens + b.num_tokens
    assert kv.prefix_cache_hits == 12
    check_invariants(kv)
    # Different extra keys (cache salt / LoRA) never share.
    c = make_req("c", prefix + [5], extra_keys=("salt",))
    assert kv.get_computed_pages(c) == ([], 0)
    # prompt_logprobs needs every prompt position: no lookup, no stats.
    d = Request("d", prefix + [5], SamplingParams(prompt_logprobs=1))
    assert kv.get_computed_pages(d) == ([], 0)
    q = kv.prefix_cache_queries
    kv.allocate_slots(d, d.num_tokens)
    assert kv.prefix_cache_queries == q
    check_invariants(kv)


def test_fully_cached_prompt_recomputes_last_token():
    kv = KVCacheManager(num_pages=16, page_size=4)
    tokens = list(range(1, 9))  # exactly 2 full pages
    admit(kv, make_req("a", tokens))
    pages, n = kv.get_computed_pages(make_req("b", tokens))
    assert n == 4 and len(pages) == 1  # the page holding the last token is recomputed
    pages, n = kv.get_computed_pages(make_req("c", tokens + [42]))
    assert n == 8 and len(pages) == 2


def test_cached_free_page_is_revived_then_evicted_and_rehashed():
    kv = KVCacheManager(num_pages=4, page_size=2)
    a = make_req("a", [1, 2, 3])
    ta = admit(kv, a)
    kv.free(a)
    assert kv.num_free_pages == 3 and kv.is_cached(ta[0])
    b = make_req("b", [1, 2, 5])
    pages, n = kv.get_computed_pages(b)
    assert pages == [ta[0]] and n == 2
    tb = kv.allocate_slots(b, 1, pages)
    assert tb[0] == ta[0] and kv.ref_count(ta[0]) == 1
    assert ta[0] not in kv.free_pages_in_eviction_order()
    kv.free(b)
    # Take every page: cached contents are evicted and their hashes dropped.
    c = make_req("c", [9] * 6)
    kv.allocate_slots(c, 6)
    assert kv.num_free_pages == 0 and kv.num_cached_pages == 0
    assert kv.get_computed_pages(make_req("d", [1, 2, 3]))[1] == 0
    check_invariants(kv)


def test_lru_eviction_order():
    kv = KVCacheManager(num_pages=9, page_size=2)
    a = make_req("a", [1, 2, 3, 4, 5, 6, 7])  # 3 full cached pages + 1 partial (uncached)
    b = make_req("b", [11, 12, 13, 14, 15])  # 2 full cached pages + 1 partial
    ta, tb = admit(kv, a), admit(kv, b)
    assert kv.num_free_pages == 1
    kv.free(a)
    kv.free(b)
    order = kv.free_pages_in_eviction_order()
    # Uncached partial pages go first, then a's pages last-first, then b's pages last-first.
    unhashed = [p for p in order if not kv.is_cached(p)]
    assert {ta[3], tb[2]} <= set(unhashed) and len(unhashed) == 3
    assert order[: len(unhashed)] == unhashed
    assert order[len(unhashed):] == [ta[2], ta[1], ta[0], tb[1], tb[0]]
    # Allocating 4 pages consumes the unhashed ones and then a's last full page only.
    c = make_req("c", [50] * 8)
    assert kv.allocate_slots(c, 8)[3] == ta[2]
    assert kv.get_computed_pages(make_req("a2", [1, 2, 3, 4, 5, 6, 7, 8]))[1] == 4
    assert kv.get_computed_pages(make_req("b2", [11, 12, 13, 14, 15]))[1] == 4
    # A prefix hit takes ta[0] out of the middle of the queue; eviction continues with ta[1].
    d = make_req("d", [1, 2, 99])
    pages, n = kv.get_computed_pages(d)
    assert pages == [ta[0]]
    assert kv.allocate_slots(d, 1, pages) == [ta[0], ta[1]]
    assert kv.free_pages_in_eviction_order() == [tb[1], tb[0]]
    check_invariants(kv)


def test_reset_prefix_cache():
    kv = KVCacheManager(num_pages=8, page_size=2)
    a = make_req("a", [1, 2, 3, 4, 5])
    ta = admit(kv, a)
    assert kv.num_cached_pages == 2
    assert kv.reset_prefix_cache()
    assert kv.num_cached_pages == 0
    assert kv.get_computed_pages(make_req("b", [1, 2, 3, 4, 5]))[1] == 0
    assert kv.get_block_table("a") == ta  # owned pages are untouched
    kv.free(a)
    check_invariants(kv)


def test_prefix_caching_disabled():
    kv = KVCacheManager(num_pages=8, page_size=2, enable_prefix_caching=False)
    admit(kv, make_req("a", [1, 2, 3, 4, 5]))
    assert kv.num_cached_pages == 0
    assert kv.get_computed_pages(make_req("b", [1, 2, 3, 4, 5])) == ([], 0)


def test_hash_collision_is_a_miss():
    """Even if two different pages hashed alike, the stored key check refuses the foreign page."""
    kv = KVCacheManager(num_pages=8, page_size=2)
    a = make_req("a", [1, 2, 3])
    admit(kv, a)
    b = make_req("b", [7, 8, 9])
    b.block_hashes = list(a.block_hashes)  # forge a colliding hash chain
    assert kv.get_computed_pages(b) == ([], 0)


def test_duplicate_content_from_concurrent_requests_stays_consistent():
    kv = KVCacheManager(num_pages=8, page_size=2)
    a, b = make_req("a", [1, 2, 3]), make_req("b", [1, 2, 3])
    ta = kv.allocate_slots(a, 3)
    tb = kv.allocate_slots(b, 3)  # both miss: computed in the same step
    for r in (a, b):
        r.num_computed_tokens = 3
        kv.cache_full_pages(r, 3)
    assert kv.num_cached_pages == 1
    kv.free(b)
    assert not kv.is_cached(tb[0])
    assert kv.free_pages_in_eviction_order()[0] == tb[0]  # duplicate content is recycled first
    c = make_req("c", [1, 2, 9])
    assert kv.get_computed_pages(c)[0] == [ta[0]]
    check_invariants(kv)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_operations_keep_refcounts_consistent(data):
    """Random admit/grow/free sequences: counts match owners, and a prefix hit returns pages whose
    recorded contents equal the request's tokens (checked against a shadow copy of each page)."""
    page_size = data.draw(st.integers(1, 4))
    kv = KVCacheManager(num_pages=data.draw(st.integers(2, 12)), page_size=page_size)
    content: dict[int, list[int]] = {}  # shadow of what each page holds, written at "compute" time
    live: dict[str, Request] = {}
    for step in range(data.draw(st.integers(1, 40))):
        op = data.draw(st.sampled_from(["admit", "grow", "free"]))
        if op == "admit":
            tokens = data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=12))
            req = make_req(f"r{step}", tokens)
            pages, n = kv.get_computed_pages(req)
            for i, p in enumerate(pages):
                assert content[p] == tokens[i * page_size : (i + 1) * page_size]
            table = kv.allocate_slots(req, req.num_tokens - n, pages)
            if table is None:
                continue
            assert len(table) * page_size >= req.num_tokens
            for i in range(n // page_size, len(table)):
                assert kv.ref_count(table[i]) == 1, "writing into a shared page"
                content[table[i]] = tokens[i * page_size : (i + 1) * page_size]
            req.num_computed_tokens = req.num_tokens
            kv.cache_full_pages(req, req.num_tokens)
            live[req.request_id] = req
        elif op == "grow" and live:
            req = live[data.draw(st.sampled_from(sorted(live)))]
            new = data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=4))
            start = req.num_tokens
            req.append_output_token_ids(new)
            table = kv.allocate_slots(req, len(new))
            if table is None:
                del req.output_token_ids[-len(new):]
                continue
            tokens = req.all_token_ids
            for i in range(start // page_size, len(table)):
                assert kv.ref_count(table[i]) == 1, "writing into a shared page"
                content[table[i]] = tokens[i * page_size : (i + 1) * page_size]
            req.num_computed_tokens = req.num_tokens
            kv.cache_full_pages(req, req.num_tokens)
        elif op == "free" and live:
            kv.free(live.pop(data.draw(st.sampled_from(sorted(live)))))
        check_invariants(kv)
    for req in live.values():
        kv.free(req)
    check_invariants(kv)
    assert kv.num_free_pages == kv.num_usable_pages
