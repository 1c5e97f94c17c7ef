"""Start-up time of the real server: `jengine serve` on loopback, from launch to `GET /health` = 200.

    python benchmarks/startup.py                          # default model, 3 x (cold, warm)
    python benchmarks/startup.py --repeat 5 --output benchmarks/results/startup.json
    python benchmarks/startup.py -- --max-num-seqs 64     # after `--`: extra `jengine serve` flags

Cold: every cache empty (a fresh temporary `XDG_CACHE_HOME` and `JENGINE_CACHE_DIR`: the XLA
compilation cache and the tokenizer cache), except the native CPU attention kernel's build, which is
copied in from the user's cache when there is one (`--cold-kernel` leaves it out too, so the C++
compile counts). Warm: a second start on the caches the cold start filled. Each repeat is one cold
start then one warm start, in separate processes; the table gives medians over the repeats.

Besides the time to `/health`, each start reports where the time went, read from the server's own
log lines (`jengine.progress` and the `engine ready` line): process start and imports until weight
loading begins, loading (weights, tokenizer, KV cache), warm-up (lowering and compiling the step
buckets), and the rest until `/health` answers; then the README's chat request through the `openai`
client (first-request latency and its answer), and the compilations counted after warm-up (must be 0).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Optional

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _user_cache_dir() -> str:
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("JENGINE_CACHE_DIR") or os.path.join(xdg, "jengine")


class ServerRun:
    """One `jengine serve` process: its log lines with arrival times, and when `/health` first answered 200."""

    def __init__(self, cache_root: str, serve_args: list[str], timeout: float) -> None:
        self.port = _free_port()
        env = dict(os.environ, XDG_CACHE_HOME=cache_root, JENGINE_CACHE_DIR=os.path.join(cache_root, "jengine"),
                   GLIBC_TUNABLES=os.environ.get("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1"), PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "jengine.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--log-level", "INFO", "--uvicorn-log-level", "warning", *serve_args]
        self.lines: list[tuple[float, str]] = []
        self.start = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.health_s = self._wait_healthy(timeout)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.perf_counter() - self.start, line.rstrip("\n")))

    def _wait_healthy(self, timeout: float) -> float:
        url = f"http://127.0.0.1:{self.port}/health"
        with httpx.Client(timeout=2.0) as client:
            while time.perf_counter() - self.start < timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError("the server exited during start-up:\n" + "\n".join(line for _, line in self.lines[-20:]))
                try:
                    if client.get(url).status_code == 200:
                        return time.perf_counter() - self.start
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
        raise TimeoutError(f"/health did not answer 200 within {timeout} s")

    def first(self, pattern: str) -> Optional[tuple[float, re.Match]]:
        for t, line in self.lines:
            m = re.search(pattern, line)
            if m:
                return t, m
        return None

    def readme_request(self) -> dict[str, Any]:
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", max_retries=0, timeout=300)
        t0 = time.perf_counter()
        r = client.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0, max_tokens=32, messages=README_MESSAGES)
        return {"first_request_s": time.perf_counter() - t0, "answer": r.choices[0].message.content}

    def metric(self, name: str) -> Optional[float]:
        text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=10).text
        m = re.search(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text, re.M)
        return float(m.group(1)) if m else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)

    def breakdown(self) -> dict[str, Optional[float]]:
        """Phases in seconds from the server's log lines (None where a line is missing)."""
        out: dict[str, Optional[float]] = {"health_s": self.health_s}
        loading = self.first(r"loading weights: ")
        ready = self.first(r"engine ready: .*load ([\d.]+) s, warm-up ([\d.]+) s")
        out["imports_s"] = None
        out["load_s"] = out["warmup_s"] = out["after_ready_s"] = None
        if ready is not None:
            t_ready, m = ready
            out["load_s"], out["warmup_s"] = float(m.group(1)), float(m.group(2))
            out["after_ready_s"] = self.health_s - t_ready
            out["imports_s"] = t_ready - out["load_s"] - out["warmup_s"]
        if loading is not None:
            out["first_progress_line_s"] = loading[0]
        return out


def one_start(cache_root: str, serve_args: list[str], timeout: float, request: bool) -> dict[str, Any]:
    load_before = os.getloadavg()[0]  # other work on the machine shows here: quote medians, compare in one run
    run = ServerRun(cache_root, serve_args, timeout)
    try:
        result = run.breakdown()
        result["loadavg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        if request:
            result.update(run.readme_request())
        result["compilations_after_warmup"] = run.metric("jengine:compilations_after_warmup_total")
        result["bucket_waits"] = run.metric("jengine:step_bucket_waits_total")
    finally:
        run.stop()
    result["log_tail"] = [line for _, line in run.lines if any(w in line for w in ("loading weights", "compiling step", "engine ready", "compiled", "waited"))][-12:]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3, help="cold + warm pairs (default 3)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for /health per start (default 600)")
    p.add_argument("--cold-kernel", action="store_true", help="do not copy the built native CPU kernel into the cold cache")
    p.add_argument("--no-request", action="store_true", help="skip the README chat request after each start")
    p.add_argument("--output", default=None, help="JSON path (default: benchmarks/results/startup-<date>.json)")
    p.add_argument("serve_args", nargs="*", help="extra `jengine serve` flags, after `--`")
    args = p.parse_args()

    runs: list[dict[str, Any]] = []
    for i in range(args.repeat):
        root = tempfile.mkdtemp(prefix="jengine-startup-")
        try:
            if not args.cold_kernel:
                kernels = os.path.join(root, "jengine", "cpu_kernels")
                os.makedirs(kernels, exist_ok=True)
                for so in glob.glob(os.path.join(_user_cache_dir(), "cpu_kernels", "cpu_attention-*.so")):
                    shutil.copy2(so, kernels)
            for kind in ("cold", "warm"):
                r = one_start(root, args.serve_args, args.timeout, not args.no_request)
                r.update(kind=kind, repeat=i)
                runs.append(r)
                print(f"repeat {i} {kind}: /health after {r['health_s']:.1f} s (load {r['load_s']}, warm-up {r['warmup_s']})", flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    keys = ("health_s", "imports_s", "load_s", "warmup_s", "after_ready_s", "first_request_s")
    summary = {}
    for kind in ("cold", "warm"):
        rows = [r for r in runs if r["kind"] == kind]
        summary[kind] = {k: statistics.median(v) for k in keys if (v := [r[k] for r in rows if r.get(k) is not None])}
        summary[kind]["health_s_all"] = [round(r["health_s"], 2) for r in rows]
    print()
    print("| start | /health (median) | all runs | imports | load | warm-up | ready -> /health | first request |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in ("cold", "warm"):
        s = summary[kind]
        f = lambda k, s=s: f"{s[k]:.1f} s" if k in s else "-"  # noqa: E731
        print(f"| {kind} | {f('health_s')} | {', '.join(f'{x:.1f}' for x in s['health_s_all'])} | {f('imports_s')} | {f('load_s')} | "
              f"{f('warmup_s')} | {f('after_ready_s')} | {f('first_request_s')} |")
    answers = {r.get("answer") for r in runs if "answer" in r}
    print(f"\nREADME request answers: {answers}; compilations after warm-up: {sorted({r['compilations_after_warmup'] for r in runs}, key=str)}")

    try:
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    except OSError:
        cpu = platform.processor()
    out = {
        "benchmark": "startup", "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "versions": _versions(), "serve_args": args.serve_args, "summary": summary, "runs": runs,
    }
    path = args.output or os.path.join(ROOT, "benchmarks", "results", f"startup-{time.strftime('%Y%m%d-%H%M')}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {os.path.relpath(path, ROOT)}")


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("jengine", "jax", "jaxlib"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


if __name__ == "__main__":
    main()
