"""Compiling the step pieces: in priority order on worker threads, optionally finishing in the background.

`PieceCompiler` lowers and compiles each piece (a key such as `("forward", T, S)` and a function that
lowers it) on `workers` threads, most likely needed first, logging `compiling step pieces: done/total,
elapsed, about N s left` as it goes (`jengine.progress`). `wait(keys)` blocks until those pieces are
compiled, moving any still queued to the front: warm-up waits for the pieces a server needs first
and serves while the rest compile; a step whose bucket is not compiled yet waits for it the same way
(the runner counts those waits), so no step ever lowers or compiles on the serving thread.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, Optional

from jengine.progress import ProgressLog

logger = logging.getLogger("jengine.worker.model_runner")

Lower = Callable[[], Any]  # returns a `jax.stages.Lowered`


class PieceCompiler:
    """Compiles `pieces` (key -> lower function, in priority order) on daemon worker threads."""

    def __init__(self, pieces: Sequence[tuple[Hashable, Lower]], workers: int) -> None:
        self._lower = dict(pieces)
        self._queue: list[Hashable] = [key for key, _ in pieces]
        self._done = {key: threading.Event() for key in self._queue}
        self._errors: dict[Hashable, BaseException] = {}
        self._lock = threading.Lock()
        self._stopped = False
        self._finished = threading.Event()
        self.total = len(self._queue)
        self.progress = ProgressLog(logger, "compiling step pieces", self.total, "pieces")
        self.seconds: Optional[float] = None  # wall time until every piece was compiled
        if not self._queue:
            self._finish()
        self._threads = [threading.Thread(target=self._work, name=f"jengine-compile-{i}", daemon=True)
                         for i in range(max(1, min(workers, self.total)))]
        for t in self._threads:
            t.start()

    @property
    def all_done(self) -> bool:
        return self._finished.is_set()

    def ready(self, keys: Iterable[Hashable]) -> bool:
        return self.all_done or all(self._done[k].is_set() for k in keys)

    def wait(self, keys: Iterable[Hashable]) -> None:
        """Blocks until every piece in `keys` is compiled (queued ones jump the queue); re-raises a compile error."""
        keys = list(keys)
        with self._lock:
            missing = [k for k in keys if k not in self._done]
            if missing:
                raise KeyError(f"no step piece {missing[0]!r}: it is not one of the compiled buckets")
            front = [k for k in keys if k in self._queue]
            if front:
                self._queue = front + [k for k in self._queue if k not in front]
        for k in keys:
            self._done[k].wait()
            if k in self._errors:
                raise RuntimeError(f"compiling step piece {k!r} failed") from self._errors[k]

    def wait_all(self) -> None:
        self.wait(list(self._done))

    def stop(self, timeout: float = 30.0) -> None:
        """Drops the queued pieces and joins the workers (each finishes the piece it is compiling)."""
        with self._lock:
            self._stopped = True
            self._queue.clear()
        for t in self._threads:
            t.join(timeout)

    def _work(self) -> None:
        while True:
            with self._lock:
                if self._stopped or not self._queue:
                    return
                key = self._queue.pop(0)
            try:
                self._lower[key]().compile()
            except BaseException as e:  # noqa: BLE001 - reported to whoever waits for this piece
                logger.error("compiling step piece %r failed: %r", key, e)
                self._errors[key] = e
            self._done[key].set()
            self.progress.advance()
            if self.progress.done == self.total:
                self._finish()

    def _finish(self) -> None:
        self.seconds = self.progress.elapsed
        self._finished.set()
