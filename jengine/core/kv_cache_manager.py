"""Host-side paged KV cache bookkeeping with automatic prefix caching (pure Python, no device work).

The device holds `num_pages` pages of `page_size` token slots per layer; this module decides which request
owns which page. Page 0 is the null page: padded tokens write there, so it is never handed out.

Prefix caching. Once every token of a page has its KV computed, the page gets a hash chained from the
first page: ``hash((parent_hash, tuple(page_token_ids), extra_keys))``. A map from hash to page lets a
later request with the same prefix (and the same extra keys: LoRA id, cache salt) reuse those pages
instead of recomputing them. The full key is stored with each cached page and compared on lookup, so a
hash collision (Python's tuple hash is not collision-resistant and prompts are user input) is a miss,
never another request's KV.

Free pages sit in one queue in eviction order (head = evicted first). A page whose reference count drops
to 0 keeps its hash and stays findable until it is popped for reuse. A freed request's pages go to the
tail in reverse order, so its last pages (the least likely to be shared) are evicted first; pages with
no hash go to the head, because they hold nothing worth keeping.

Sliding-window groups. A manager built with `sliding_window=W` serves layers that attend only the last W
positions: once a request has computed `c` tokens, no later token reads positions below `c - W + 1`, so the
pages wholly below that go back to the pool (`remove_skipped_pages`) and their block-table entries become
the null page. Their hashes stay, like any freed page's, so a later request can still find them. A prefix
hit for such a group needs only the pages its window still sees (`find_cache_hit`), not the whole prefix.

A request's pages live on the request (`Request.kv_pages[manager]`, a `PageHold`), so they end with it;
the manager indexes its owners by id only for lookups by id (`get_block_table`, `request_ids`).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Optional

from jengine.request import PageHold, Request

NULL_PAGE = 0
_ROOT_HASH = 0x6A656E67696E65  # parent hash of the first page; any fixed value works


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Page allocator: reference counts, an LRU free queue and the prefix-cache map (see module doc)."""

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True, sliding_window: int | None = None) -> None:
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is the reserved null page), got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
        self.num_pages = num_pages
        self.sliding_window = sliding_window
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_cnt: list[int] = [0] * num_pages
        # OrderedDict as an O(1) doubly-linked list: popitem(last=False) evicts, pop(p) takes a cached page
        # out of the middle when a prefix hit revives it.
        self._free: OrderedDict[int, None] = OrderedDict((p, None) for p in range(1, num_pages))
        self._page_hash: list[Optional[int]] = [None] * num_pages
        self._page_key: list[Optional[tuple]] = [None] * num_pages
        self._cached: dict[int, int] = {}  # page hash -> page
        self._owners: dict[str, Request] = {}  # requests holding pages here, by id (their pages: `_hold`)
        self.prefix_cache_queries = 0  # tokens looked up at admission
        self.prefix_cache_hits = 0  # of which found in the cache

    # ---- sizes and stats ----------------------------------------------------------------------------

    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def num_free_pages(self) -> int:
        """Pages with no owner, cached or not (cached ones are reclaimed on demand)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of the non-null pages that some request holds."""
        return 1.0 - len(self._free) / self.num_usable_pages

    @property
    def num_cached_pages(self) -> int:
        return len(self._cached)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def pages_needed(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.page_size)

    # ---- introspection (tests, metrics, debugging) --------------------------------------------------

    def ref_count(self, page: int) -> int:
        return self._ref_cnt[page]

    def free_pages_in_eviction_order(self) -> list[int]:
        return list(self._free)

    def is_cached(self, page: int) -> bool:
        return self._page_hash[page] is not None

    def request_ids(self) -> list[str]:
        """Requests that currently own pages."""
        return list(self._owners)

    def _hold(self, request: Request) -> Optional[PageHold]:
        return request.kv_pages.get(self)

    def _pages_of(self, request_id: str) -> list[int]:
        owner = self._owners.get(request_id)
        hold = None if owner is None else self._hold(owner)
        return [] if hold is None else hold.pages

    def get_block_table(self, request_id: str) -> list[int]:
        """The request's pages in token order (a copy; empty if it owns none; NULL_PAGE where skipped)."""
        return list(self._pages_of(request_id))

    def num_held_pages(self, request_id: str) -> int:
        """Pages the request holds (its block table without the null entries of skipped pages)."""
        return sum(1 for p in self._pages_of(request_id) if p != NULL_PAGE)

    def first_needed_page(self, num_computed_tokens: int) -> int:
        """Index of the request's first page a token at or after `num_computed_tokens` can still attend."""
        if self.sliding_window is None:
            return 0
        return max(0, num_computed_tokens - self.sliding_window + 1) // self.page_size

    # ---- prefix cache -------------------------------------------------------------------------------

    def _ensure_hashes(self, request: Request, num_pages: int) -> list[int]:
        """Extends request.block_hashes to cover its first `num_pages` full pages."""
        hashes = request.block_hashes
        if len(hashes) < num_pages:
            tokens = request.all_token_ids
            ps = self.page_size
            parent = hashes[-1] if hashes else _ROOT_HASH
            for i in range(len(hashes), num_pages):
                parent = hash((parent, tuple(tokens[i * ps : (i + 1) * ps]), request.extra_keys))
                hashes.append(parent)
        return hashes

    def _uses_prefix_cache(self, request: Request) -> bool:
        # prompt_logprobs needs logits at every prompt position, so nothing may be skipped.
        return self.enable_prefix_caching and getattr(request.sampling_params, "prompt_logprobs", None) is None

    def get_computed_pages(self, request: Request) -> tuple[list[int], int]:
        """Longest cached prefix of full pages of the request's tokens, and how many tokens it covers.

        Leaves at least one token to compute (the step that computes it samples the next token), so a
        fully cached prompt recomputes its last page. No side effects: the hit only counts, and the pages
        are only taken, when `allocate_slots` admits the request.
        """
        if not self._uses_prefix_cache(request):
            return [], 0
        pages = self.find_cache_hit(request, (request.num_tokens - 1) // self.page_size)
        return pages, len(pages) * self.page_size

    def _cached_page(self, request: Request, hashes: list[int], i: int) -> Optional[int]:
        """The cached page holding the request's page `i` (its full key compared), else None."""
        page = self._cached.get(hashes[i])
        if page is None:
            return None
        ps = self.page_size
        key = (hashes[i - 1] if i else _ROOT_HASH, tuple(request.all_token_ids[i * ps : (i + 1) * ps]), request.extra_keys)
        return page if self._page_key[page] == key else None

    def find_cache_hit(self, request: Request, max_pages: int) -> list[int]:
        """The longest hit of at most `max_pages` pages: the pages a request that starts computing after
        them needs. Full attention: every page of the prefix. Sliding window: only the pages the window
        still sees at the hit's end (NULL_PAGE before them), found scanning from the longest candidate
        down, since any shorter hit needs an earlier window that may still be cached."""
        hashes = self._ensure_hashes(request, max_pages)
        if self.sliding_window is None:
            pages: list[int] = []
            for i in range(max_pages):
                page = self._cached_page(request, hashes, i)
                if page is None:
                    break
                pages.append(page)
            return pages
        found: dict[int, int] = {}
        end = max_pages
        while end > 0:
            first = self.first_needed_page(end * self.page_size)
            i = end - 1
            while i >= first:
                page = found.get(i)
                if page is None:
                    page = self._cached_page(request, hashes, i)
                if page is None:
                    break
                found[i] = page
                i -= 1
            if i < first:
                return [NULL_PAGE] * first + [found[j] for j in range(first, end)]
            end = i  # page i is missing, so a hit can end at page i at the latest
        return []

    def cache_full_pages(self, request: Request, num_tokens: int) -> None:
        """Registers the request's pages that the first `num_tokens` tokens fill (their KV is computed).

        Call after the step that computed them. A page whose content is already cached under another page
        (two requests computed the same prefix at once) stays unregistered and is recycled first. A
        sliding-window group then gives back the pages no later token can see (registered first, so a
        later request can still find them).
        """
        if self.enable_prefix_caching:
            self._register(request, num_tokens)
        if self.sliding_window is not None:
            self.remove_skipped_pages(request, num_tokens)

    def _register(self, request: Request, num_tokens: int) -> None:
        hold = self._hold(request)
        if hold is None:
            return
        pages = hold.pages
        start = hold.num_hashed
        end = min(num_tokens // self.page_size, len(pages))
        if end <= start:
            return
        hashes = self._ensure_hashes(request, end)
        tokens = request.all_token_ids
        ps = self.page_size
        for i in range(start, end):
            page, h = pages[i], hashes[i]
            if page != NULL_PAGE and self._page_hash[page] is None and h not in self._cached:
                parent = hashes[i - 1] if i else _ROOT_HASH
                self._cached[h] = page
                self._page_hash[page] = h
                self._page_key[page] = (parent, tuple(tokens[i * ps : (i + 1) * ps]), request.extra_keys)
        hold.num_hashed = end

    def remove_skipped_pages(self, request: Request, num_computed_tokens: int) -> None:
        """Sliding window: gives back the request's pages wholly below the window of its next token
        (position `num_computed_tokens`), replacing them with NULL_PAGE in its block table. Cached ones
        go to the tail of the free queue, so they stay findable the longest; the rest are reused first."""
        hold = self._hold(request)
        if hold is None or self.sliding_window is None:
            return
        pages = hold.pages
        start = hold.num_skipped
        end = min(self.first_needed_page(num_computed_tokens), len(pages))
        for i in range(start, end):
            page = pages[i]
            if page == NULL_PAGE:
                continue
            pages[i] = NULL_PAGE
            self._ref_cnt[page] -= 1
            if self._ref_cnt[page] == 0:
                self._free[page] = None
                if self._page_hash[page] is None:
                    self._free.move_to_end(page, last=False)
        if end > start:
            hold.num_skipped = end

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached page (e.g. after weights change). Pages in use stay owned, just unshared."""
        self._cached.clear()
        self._page_hash = [None] * self.num_pages
        self._page_key = [None] * self.num_pages
        return True

    def _drop_hash(self, page: int) -> None:
        h = self._page_hash[page]
        if h is not None:
            if self._cached.get(h) == page:
                del self._cached[h]
            self._page_hash[page] = None
            self._page_key[page] = None

    # ---- allocation ---------------------------------------------------------------------------------

    def _plan(self, request: Request, num_new_tokens: int, new_computed_pages: Sequence[int]) -> tuple[int, int]:
        """(new pages to pop, cached unowned pages to revive) for `allocate_slots`."""
        hold = self._hold(request)
        num_owned = 0 if hold is None else len(hold.pages)
        total_tokens = request.num_computed_tokens + len(new_computed_pages) * self.page_size + num_new_tokens
        num_new_pages = max(0, cdiv(total_tokens, self.page_size) - num_owned - len(new_computed_pages))
        return num_new_pages, sum(1 for p in new_computed_pages if p != NULL_PAGE and self._ref_cnt[p] == 0)

    def can_allocate(self, request: Request, num_new_tokens: int, new_computed_pages: Sequence[int] = ()) -> bool:
        """Whether `allocate_slots` with these arguments would succeed (once skipped pages are given back)."""
        return sum(self._plan(request, num_new_tokens, new_computed_pages)) <= len(self._free)

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_pages: Sequence[int] = ()
    ) -> Optional[list[int]]:
        """Makes the request own pages for num_computed_tokens + len(new_computed_pages) * page_size +
        num_new_tokens tokens and returns its whole page list (a copy).

        `new_computed_pages` (from `get_computed_pages`) is only allowed at first admission, when the
        request owns nothing; they are taken (incref, and out of the free queue if unowned) before any page
        is evicted. Returns None, changing nothing, when there are not enough free pages. A
        sliding-window group first gives back the pages behind the window (never needed again).
        """
        rid = request.request_id
        hold = self._hold(request)
        if hold is not None and new_computed_pages:
            raise ValueError(f"request {rid!r} already owns pages; computed pages only at first admission")
        if self.sliding_window is not None and hold is not None:
            self.remove_skipped_pages(request, request.num_computed_tokens)
        num_new_pages, num_revived = self._plan(request, num_new_tokens, new_computed_pages)
        if num_new_pages > len(self._free) - num_revived:
            return None

        if hold is None:
            if self._owners.get(rid, request) is not request:
                raise ValueError(f"request id {rid!r} already holds pages here under another request")
            hold = request.kv_pages[self] = PageHold([], num_hashed=len(new_computed_pages))
            self._owners[rid] = request
            if self.sliding_window is not None:
                hold.num_skipped = sum(1 for p in new_computed_pages if p == NULL_PAGE)
            if self._uses_prefix_cache(request):
                self.prefix_cache_queries += request.num_tokens
                self.prefix_cache_hits += len(new_computed_pages) * self.page_size
        owned = hold.pages
        for page in new_computed_pages:
            if page != NULL_PAGE:
                if self._ref_cnt[page] == 0:
                    del self._free[page]
                self._ref_cnt[page] += 1
            owned.append(page)
        for _ in range(num_new_pages):
            page, _ = self._free.popitem(last=False)
            self._drop_hash(page)
            self._ref_cnt[page] = 1
            owned.append(page)
        return list(owned)

    def trim(self, request: Request, num_tokens: int) -> None:
        """Returns the request's pages past the first `num_tokens` tokens to the pool (speculative decoding
        wrote KV there for draft tokens that were rejected). Such pages were never registered in the prefix
        cache, since only pages full of computed tokens are."""
        hold = self._hold(request)
        keep = cdiv(num_tokens, self.page_size)
        if hold is None or len(hold.pages) <= keep:
            return
        pages = hold.pages
        if hold.num_hashed > keep:
            raise AssertionError(f"request {request.request_id!r}: a registered page would be trimmed")
        for page in reversed(pages[keep:]):
            if page == NULL_PAGE:
                continue
            self._ref_cnt[page] -= 1
            if self._ref_cnt[page] == 0:
                self._free[page] = None
                self._free.move_to_end(page, last=False)  # nothing worth keeping: reuse these first
        del pages[keep:]

    def free(self, request: Request) -> None:
        """Drops the request's hold on its pages; unowned cached pages stay findable until evicted.
        (The engine reaches this only through `RequestRegistry.free`: a request ending or preempted.)"""
        hold = request.kv_pages.pop(self, None)
        if self._owners.get(request.request_id) is request:
            del self._owners[request.request_id]
        if hold is None:
            return
        for page in reversed(hold.pages):  # last pages reach the eviction end first
            if page == NULL_PAGE:
                continue
            self._ref_cnt[page] -= 1
            if self._ref_cnt[page] == 0:
                self._free[page] = None
                if self._page_hash[page] is None:
                    self._free.move_to_end(page, last=False)
