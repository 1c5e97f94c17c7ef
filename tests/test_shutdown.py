"""SIGTERM drains `jengine serve` (a real subprocess on loopback, tiny checkpoint): it stops admitting
(`/health` 503, new requests 503), lets the requests in flight finish, then exits 0; past
`--shutdown-timeout` the ones still running end with an error instead of hanging or being cut silently.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Iterator, Sequence

import httpx
import pytest

from tiny_models import make_tiny_checkpoint
from tiny_server import eventually

MAX_MODEL_LEN = 512
MAX_TOKENS = 480
N = 8  # each request fills the running batch, so the three of them run one after another: a few seconds of work
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), max_position_embeddings=MAX_MODEL_LEN)


class ServeProcess:
    """`python -m jengine.cli serve` on a free loopback port; its stderr is collected line by line."""

    def __init__(self, checkpoint: str, xla_cache_dir: str, *flags: str, prefix: Sequence[str] = ()) -> None:
        cmd = [*(prefix or (sys.executable, "-m", "jengine.cli")), "serve", checkpoint, "--host", "127.0.0.1", "--port", "0",
               "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "8", "--max-num-batched-tokens", "64",
               "--compilation-cache-dir", xla_cache_dir, "--uvicorn-log-level", "warning", "--disable-log-requests", *flags]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO)
        self.lines: list[str] = []
        self.port = 0
        started = threading.Event()

        def read() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line)
                m = re.search(r"HTTP server on http://127\.0\.0\.1:(\d+)", line)
                if m:
                    self.port = int(m.group(1))
                    started.set()
            started.set()

        threading.Thread(target=read, daemon=True).start()
        if not started.wait(180) or not self.port:
            self.proc.kill()
            raise RuntimeError("the server did not start:\n" + "".join(self.lines[-30:]))

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60, **kw)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def serve(checkpoint: str, xla_cache_dir: str) -> Iterator[Any]:
    procs: list[ServeProcess] = []

    def start(*flags: str) -> ServeProcess:
        procs.append(ServeProcess(checkpoint, xla_cache_dir, *flags))
        return procs[-1]

    yield start
    for p in procs:
        p.close()


def _stream_in_background(srv: ServeProcess, count: int) -> tuple[list[threading.Thread], dict[int, list[str]]]:
    """`count` streaming requests of N x MAX_TOKENS tokens; returns their threads and their SSE lines."""
    lines: dict[int, list[str]] = {}

    def one(i: int) -> None:
        body = {"prompt": f"Request {i}", "max_tokens": MAX_TOKENS, "n": N, "ignore_eos": True, "temperature": 0.0, "stream": True}
        got: list[str] = []
        try:
            with srv.client() as c, c.stream("POST", "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if line:
                        got.append(line)
        except httpx.HTTPError as e:  # recorded, and failed on by the test: a stream must end cleanly
            got.append(f"transport error: {e!r}")
        lines[i] = got

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    return threads, lines


def _wait_admitted(srv: ServeProcess, num_sequences: int) -> None:
    """Until the engine holds `num_sequences` sequences (running or waiting), per its metrics."""
    def held(c: httpx.Client) -> float:
        text = c.get("/metrics").text
        return sum(float(m) for m in re.findall(r"^vllm:num_requests_(?:running|waiting)\{[^}]*\} (\S+)$", text, re.M))

    with srv.client() as c:
        assert eventually(lambda: held(c) == num_sequences, 60), "the requests were not all admitted"


def _finish_reasons(lines: list[str]) -> dict[int, str]:
    reasons = {}
    for line in lines:
        if line.startswith("data: {"):
            for choice in json.loads(line[6:]).get("choices", ()):
                if choice.get("finish_reason"):
                    reasons[choice["index"]] = choice["finish_reason"]
    return reasons


def test_sigterm_drains_in_flight_requests_then_exits_0(serve: Any) -> None:
    srv = serve("--shutdown-timeout", "60")
    threads, lines = _stream_in_background(srv, 3)
    _wait_admitted(srv, 3 * N)
    srv.proc.send_signal(signal.SIGTERM)
    with srv.client() as c:
        assert eventually(lambda: c.get("/health").status_code == 503), "readiness must fail while draining"
        refused = c.post("/v1/completions", json={"prompt": "late", "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down" and refused.headers["Retry-After"]
    for t in threads:
        t.join(120)
    for i, got in lines.items():  # every request admitted before SIGTERM finished completely
        assert got[-1] == "data: [DONE]" and not any('"error"' in g for g in got), (i, got[-3:])
        assert _finish_reasons(got) == {k: "length" for k in range(N)}, (i, got[-3:])
    assert srv.proc.wait(60) == 0, srv.log[-3000:]
    assert "drained: no request in flight" in srv.log


def test_shutdown_timeout_ends_what_is_left_with_an_error(serve: Any) -> None:
    srv = serve("--shutdown-timeout", "0.5")
    threads, lines = _stream_in_background(srv, 3)
    _wait_admitted(srv, 3 * N)
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(60) == 0, srv.log[-3000:]
    assert time.monotonic() - t0 < 20
    for t in threads:
        t.join(30)
    assert "they end with an error" in srv.log
    for i, got in lines.items():  # none hangs or is cut silently: an error event, then [DONE]
        assert got and got[-1] == "data: [DONE]" and '"error"' in got[-2], (i, got[-3:])


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "soon"])
def test_bad_shutdown_timeout_is_refused_at_parse(value: str) -> None:
    from jengine.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--shutdown-timeout", value])
    assert build_parser().parse_args(["serve"]).shutdown_timeout == 30.0


FAULT_INJECTOR = """
import os, sys
from jengine.engine.core import EngineCore

_step = EngineCore.step

def step(self):  # the test's fault: the device step raises once the flag file exists
    if os.path.exists(sys.argv[1]):
        raise RuntimeError("injected device fault")
    return _step(self)

EngineCore.step = step
from jengine.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_engine_death_fails_in_flight_requests_then_exits_non_zero(checkpoint: str, xla_cache_dir: str, tmp_path: Any) -> None:
    """A fault in the engine loop: the stream in flight gets an error event and ends, then the process
    exits with status 1 (so an orchestrator restarts it) instead of serving 503s forever."""
    flag = tmp_path / "fault"
    srv = ServeProcess(checkpoint, xla_cache_dir, prefix=[sys.executable, "-c", FAULT_INJECTOR, str(flag)])
    try:
        threads, lines = _stream_in_background(srv, 1)
        _wait_admitted(srv, N)
        flag.touch()
        threads[0].join(60)
        got = lines[0]
        assert got and got[-1] == "data: [DONE]" and '"error"' in got[-2] and "injected device fault" in got[-2], got[-3:]
        assert srv.proc.wait(60) == 1, srv.log[-3000:]
        assert "the engine loop died" in srv.log and "exiting with status 1" in srv.log
    finally:
        srv.close()
