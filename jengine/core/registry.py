"""`RequestRegistry`: the unfinished requests by id, and the one place a request ends.

A request's state lives on its record (`jengine.request.Request`): seed, grammar matcher,
speculative-decoding state, its pages in every layer group and its output state. The parts of the engine keep indexes by id only where they look requests up by id
(this registry's `requests`, the KV cache managers' owners, the output processor's parents), so ending a
request is one call, `free`, whatever ended it: a stop condition, a stop string, max_tokens, an abort
(a client that went away included), an error. Preemption frees only the pages (`keep_record=True`).

Whoever must also let go of a request (the output processor drops a parent once its last child is
freed) registers a callback with `on_free`.
"""
from __future__ import annotations

from typing import Any, Callable

from jengine.request import Request


class RequestRegistry:
    """Unfinished requests by id over one KV cache manager (see the module doc)."""

    def __init__(self, kv_cache_manager: Any) -> None:
        self.kv_cache_manager = kv_cache_manager
        self.requests: dict[str, Request] = {}
        self._on_free: list[Callable[[Request], None]] = []

    def on_free(self, callback: Callable[[Request], None]) -> None:
        """`callback(request)` runs whenever `free` ends a request (not on a preemption)."""
        self._on_free.append(callback)

    def add(self, request: Request) -> None:
        """Indexes a new request; ValueError when its id is already in use."""
        rid = request.request_id
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        if request.freed:
            raise ValueError(f"request {rid!r} has already ended")
        self.requests[rid] = request

    def free(self, request: Request, *, keep_record: bool = False) -> None:
        """Ends `request`: its pages go back to the pool, it leaves every index and its per-request state
        is dropped; then the `on_free` callbacks run. With `keep_record` (a preemption) only its pages
        go back. Freeing a request twice, or one never added (a request refused while being queued),
        is safe: each step happens once."""
        self.kv_cache_manager.free(request)
        if keep_record or request.freed:
            return
        request.freed = True
        if self.requests.get(request.request_id) is request:
            del self.requests[request.request_id]
        request.release_state()
        for callback in self._on_free:
            callback(request)

    def __len__(self) -> int:
        return len(self.requests)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self.requests
