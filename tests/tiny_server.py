"""A real jengine server (HTTP, optionally gRPC) on loopback over a tiny checkpoint, for frontend tests."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

from jengine.config import EngineArgs
from jengine.engine.async_engine import AsyncEngine
from jengine.server.api_server import BackgroundServer, ServerSettings
from tiny_models import make_tiny_checkpoint


@contextlib.contextmanager
def tiny_server(tmp_dir: Any, xla_cache_dir: str, max_model_len: int, **settings: Any) -> Iterator[BackgroundServer]:
    """Builds the engine (small limits, shared compilation cache), serves on free ports, stops after."""
    path = make_tiny_checkpoint(tmp_dir, max_position_embeddings=max_model_len)
    args = EngineArgs(model=path, max_model_len=max_model_len, max_num_seqs=8, max_num_batched_tokens=64, compilation_cache_dir=xla_cache_dir)
    engine = AsyncEngine.from_engine_args(args, log_requests=False)
    settings = {"port": 0, "uvicorn_log_level": "warning", **settings}
    srv = BackgroundServer(engine, ServerSettings(model_path=settings.pop("model_path", path), **settings))
    try:
        yield srv
    finally:
        srv.stop()
        engine.shutdown()


def slow_down_steps(engine: AsyncEngine, monkeypatch: Any, delay_s: float = 0.02) -> None:
    """Makes every engine step take at least `delay_s` for the rest of one test.

    A fast machine runs the tiny model's whole generation before a client reads its first chunk;
    tests that cancel or disconnect mid-generation need the request to still be running then.
    """
    step = engine.core.step

    def slow_step() -> Any:
        time.sleep(delay_s)
        return step()

    monkeypatch.setattr(engine.core, "step", slow_step)


class StepWatch:
    """Counts engine steps and records, per request id, how many steps had started when the frontend
    asked to abort it and when the engine thread freed its pages: the two are equal (or one apart
    when the abort lands between steps) if a disconnect frees pages within one step."""

    def __init__(self, engine: AsyncEngine, monkeypatch: Any) -> None:
        core = engine.core
        self.steps = 0
        self.asked: dict[str, int] = {}
        self.freed: dict[str, int] = {}
        self.min_free_pages = core.kv_cache_manager.num_free_pages  # the fewest free pages seen after a step
        step, abort, abort_request = core.step, engine.abort, core.abort_request

        def counting_step() -> Any:
            self.steps += 1
            out = step()
            self.min_free_pages = min(self.min_free_pages, core.kv_cache_manager.num_free_pages)
            return out

        def recording_abort(request_id: str) -> None:
            self.asked.setdefault(request_id, self.steps)
            abort(request_id)

        def recording_abort_request(request_ids: Any) -> None:
            abort_request(request_ids)
            for rid in request_ids:
                self.freed.setdefault(rid, self.steps)

        monkeypatch.setattr(core, "step", counting_step)
        monkeypatch.setattr(engine, "abort", recording_abort)
        monkeypatch.setattr(core, "abort_request", recording_abort_request)


def eventually(cond: Any, timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Polls `cond()` until it is true (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return False
