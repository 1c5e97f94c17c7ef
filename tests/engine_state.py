"""Checks that an idle engine holds nothing of any request: the leak checks of the lifecycle and soak tests."""
from __future__ import annotations

from typing import Any, Iterable


def assert_no_request_state(core: Any, records: Iterable[Any] = ()) -> None:
    """Every index of requests is empty and every KV page is back in its pool (prefix-cached pages with no
    owner count as free: the cache evicts them on demand); each of `records` (the `Request`s the engine
    saw) was freed and holds no pages, penalty history, matcher, drafts or live output state."""
    assert core._in_flight is None
    registry = core.registry
    assert not registry.requests, list(registry.requests)
    sched = core.scheduler
    assert sched.requests is registry.requests
    assert not sched.running and len(sched.waiting) == 0 and not sched._finished_in_schedule
    assert not getattr(sched.waiting, "_order", None)
    assert not core.output_processor._parents and core.output_processor.num_unfinished == 0
    kv = core.kv_cache_manager
    for group in getattr(kv, "groups", (kv,)):
        assert not group.request_ids()
        assert group.num_free_pages == group.num_usable_pages
        assert all(group.ref_count(p) == 0 for p in range(1, group.num_pages))
    for r in records:
        assert r.freed and r.is_finished, r
        assert not r.kv_pages and r.structured_output is None, r
        assert not r.spec_token_ids and r.spec_misses == 0 and r.draft_num_valid is None, r
        assert r.output_state is None or r.output_state.freed, r
