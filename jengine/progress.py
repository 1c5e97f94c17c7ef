"""Start-up progress as plain log lines: `what: done/total, elapsed, estimate`, every few seconds.

Log lines rather than a terminal bar, so that the progress shows the same under systemd, Docker,
Kubernetes or a pipe as in a terminal; the first and the last step always log, the ones between at
most once per `interval` seconds.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Optional


class ProgressLog:
    """Counts finished units of one start-up phase and logs `what: done/total ...` now and then (thread-safe)."""

    def __init__(self, logger: logging.Logger, what: str, total: int, unit: str = "", interval: float = 2.0) -> None:
        self.logger, self.what, self.total, self.unit, self.interval = logger, what, max(0, int(total)), unit, interval
        self.done = 0
        self.start = time.perf_counter()
        self._last_log: Optional[float] = None
        self._lock = threading.Lock()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            now = time.perf_counter()
            if self.done < self.total and self._last_log is not None and now - self._last_log < self.interval:
                return
            self._last_log = now
            self.logger.info("%s", self.line())

    def line(self) -> str:
        elapsed = self.elapsed
        unit = f" {self.unit}" if self.unit else ""
        text = f"{self.what}: {self.done}/{self.total}{unit} ({100 * self.done / max(1, self.total):.0f}%), {elapsed:.1f} s"
        if 0 < self.done < self.total:
            text += f", about {elapsed / self.done * (self.total - self.done):.0f} s left"
        return text
