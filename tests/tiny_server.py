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
