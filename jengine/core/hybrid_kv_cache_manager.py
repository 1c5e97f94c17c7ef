"""Page bookkeeping for a model whose layers fall into several groups (`jengine.core.kv_cache_layout`).

One `KVCacheManager` per group, each with its own pool and block tables; this class makes them act as
one for the scheduler: a request is admitted or grows only when every group has the pages (so admission
and preemption count pages per group), a prefix hit is the longest one every group can serve, and
`allocate_slots` returns one page list per group (group 0 first).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from jengine.core.kv_cache_layout import KVCacheLayout
from jengine.core.kv_cache_manager import KVCacheManager
from jengine.request import Request

GroupPages = tuple[list[int], ...]


class HybridKVCacheManager:
    """The same interface as `KVCacheManager` over one manager per layer group (see module doc).

    Sizes and stats the scheduler reads without a group (`num_usable_pages`, `pages_needed`,
    `num_free_pages`) are group 0's: the full-attention group, whose need grows with the context.
    Sliding-window groups are sized so that one sequence of any length always fits (`size_groups`), so
    with no full-attention group `pages_needed` is 0: no request is too long for the cache.
    """

    def __init__(self, managers: Sequence[KVCacheManager], layer_counts: Sequence[int] | None = None) -> None:
        if len(managers) < 2:
            raise ValueError("a hybrid KV cache manager needs at least two groups")
        if len({m.page_size for m in managers}) != 1:
            raise ValueError("every group must use the same page size")
        self.groups = tuple(managers)
        self.page_size = managers[0].page_size
        self.enable_prefix_caching = managers[0].enable_prefix_caching
        self._weights = tuple(layer_counts) if layer_counts is not None else (1,) * len(managers)

    # ---- sizes and stats (group 0's, except usage) --------------------------------------------------

    @property
    def num_usable_pages(self) -> int:
        return self.groups[0].num_usable_pages

    @property
    def num_free_pages(self) -> int:
        return self.groups[0].num_free_pages

    @property
    def num_cached_pages(self) -> int:
        return self.groups[0].num_cached_pages

    @property
    def usage(self) -> float:
        """Fraction of the KV memory (pages times layers, over every group) that some request holds."""
        held = sum(w * (m.num_usable_pages - m.num_free_pages) for m, w in zip(self.groups, self._weights))
        return held / sum(w * m.num_usable_pages for m, w in zip(self.groups, self._weights))

    @property
    def prefix_cache_queries(self) -> int:
        return self.groups[0].prefix_cache_queries

    @property
    def prefix_cache_hits(self) -> int:
        return self.groups[0].prefix_cache_hits

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.groups[0].prefix_cache_hit_rate

    def pages_needed(self, num_tokens: int) -> int:
        first = self.groups[0]
        return first.pages_needed(num_tokens) if first.sliding_window is None else 0

    def request_ids(self) -> list[str]:
        return self.groups[0].request_ids()

    def get_block_table(self, request_id: str) -> list[int]:
        return self.groups[0].get_block_table(request_id)

    def get_block_tables(self, request_id: str) -> GroupPages:
        return tuple(m.get_block_table(request_id) for m in self.groups)

    def num_held_pages(self, request_id: str) -> tuple[int, ...]:
        """Pages the request holds in each group (per layer of the group)."""
        return tuple(m.num_held_pages(request_id) for m in self.groups)

    # ---- prefix cache -------------------------------------------------------------------------------

    def get_computed_pages(self, request: Request) -> tuple[GroupPages, int]:
        """The longest prefix hit every group can serve: each group's pages for it, and its tokens.

        Each group's hit of at most k pages is at most k long; shrinking k to the shortest one and asking
        again settles in a few rounds (a full-attention hit is any prefix of a longer one; a sliding
        window's is the longest whose window pages are still cached)."""
        if not self.groups[0]._uses_prefix_cache(request):
            return tuple([] for _ in self.groups), 0
        k = (request.num_tokens - 1) // self.page_size
        while True:
            hits = [m.find_cache_hit(request, k) for m in self.groups]
            shortest = min(len(h) for h in hits)
            if shortest == k:
                return tuple(hits), k * self.page_size
            k = shortest

    def cache_full_pages(self, request: Request, num_tokens: int) -> None:
        for m in self.groups:
            m.cache_full_pages(request, num_tokens)

    def reset_prefix_cache(self) -> bool:
        return all([m.reset_prefix_cache() for m in self.groups])

    # ---- allocation ---------------------------------------------------------------------------------

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_pages: Optional[Sequence[Sequence[int]]] = None
    ) -> Optional[GroupPages]:
        """Every group's `allocate_slots`, all or none: None, changing nothing but pages behind a
        window given back, when some group lacks free pages."""
        computed: Sequence[Sequence[int]] = new_computed_pages or tuple(() for _ in self.groups)
        if len(computed) != len(self.groups):
            raise ValueError(f"got computed pages for {len(computed)} groups, the cache has {len(self.groups)}")
        for m in self.groups:
            m.remove_skipped_pages(request, request.num_computed_tokens)  # a no-op for full attention
        if not all(m.can_allocate(request, num_new_tokens, c) for m, c in zip(self.groups, computed)):
            return None
        out = []
        for m, c in zip(self.groups, computed):
            pages = m.allocate_slots(request, num_new_tokens, c)
            assert pages is not None  # checked above
            out.append(pages)
        return tuple(out)

    def trim(self, request: Request, num_tokens: int) -> None:
        for m in self.groups:
            m.trim(request, num_tokens)

    def free(self, request: Request) -> None:
        for m in self.groups:
            m.free(request)


def make_kv_cache_manager(layout: KVCacheLayout, enable_prefix_caching: bool = True) -> KVCacheManager | HybridKVCacheManager:
    """One plain manager for a one-group layout (every model without sliding windows), else a hybrid one."""
    managers = [
        KVCacheManager(g.num_pages, layout.page_size, enable_prefix_caching=enable_prefix_caching, sliding_window=g.sliding_window)
        for g in layout.groups
    ]
    if len(managers) == 1:
        return managers[0]
    return HybridKVCacheManager(managers, [len(g.layers) for g in layout.groups])
