"""A short soak in the suite: `benchmarks/soak.py`'s mixed load (chat and completions, streaming or
not, n > 1, logprobs, stop strings, seeds; a quarter of the streams dropped by the client) against a
tiny-model server, then nothing lost, nothing leaked, nothing compiled and the same greedy answer."""
from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import time
from typing import Any

import pytest

from engine_state import assert_no_request_state
from tiny_server import tiny_server

SOAK_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "soak.py")


@pytest.fixture(scope="module")
def soak() -> Any:
    spec = importlib.util.spec_from_file_location("jengine_soak_benchmark", SOAK_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_short_soak_loses_and_leaks_nothing(soak: Any, tmp_path: Any, xla_cache_dir: str) -> None:
    with tiny_server(tmp_path, xla_cache_dir, 256, api_keys=("sk-soak",)) as srv:
        base, key = srv.url, "sk-soak"
        model = srv.serving.model_name
        before = soak.greedy_text(base, model, key)
        report = asyncio.run(soak.run_soak(base, model, requests=120, concurrency=24, max_tokens=12, seed=3, api_key=key))
        state = soak.idle_state(base)
        after = soak.greedy_text(base, model, key)
        core = srv.engine.core
        assert report.lost == 0 and report.status_5xx == 0 and report.status_4xx == 0, report.lost_examples
        assert report.dropped > 0 and report.completed + report.dropped + report.shed == report.requests
        assert state == {"num_requests_running": 0, "num_requests_waiting": 0, "kv_cache_usage_perc": 0,
                         "compilations_after_warmup": 0}, state
        assert core.kv_cache_manager.num_free_pages == core.kv_cache_manager.num_usable_pages
        assert not srv.engine.num_pending_requests and not srv.engine._timings and not srv.engine._unscheduled
        deadline = time.monotonic() + 10  # the engine thread may still be finishing its last step in flight
        while core.has_unfinished_requests() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert_no_request_state(core)  # dropped streams (client disconnects) included
        assert before == after


def test_soak_checks_can_fail(soak: Any) -> None:
    """The completeness checks flag what they exist to flag."""
    assert soak._complete_stream(['data: {"choices": [{"index": 0, "finish_reason": "length"}]}'], 1)  # no [DONE]
    assert soak._complete_stream(['data: {"error": {"message": "x"}}', "data: [DONE]"], 1)
    assert soak._complete_stream(['data: {"choices": [{"index": 0, "finish_reason": "stop"}]}', "data: [DONE]"], 2)
    assert not soak._complete_stream(['data: {"choices": [{"index": 0, "finish_reason": "stop"}]}', "data: [DONE]"], 1)
    assert soak._complete_json({"choices": [{"index": 0, "finish_reason": None}]}, 1)
    assert not soak._complete_json({"choices": [{"index": 1, "finish_reason": "length"}, {"index": 0, "finish_reason": "stop"}]}, 2)
