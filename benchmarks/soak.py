"""Soak: thousands of mixed requests against `jengine serve`, a quarter of the streams dropped by the
client, then checks that nothing was lost or leaked.

    python benchmarks/soak.py                                    # default model, 2000 requests at concurrency 64
    python benchmarks/soak.py --requests 200 --concurrency 16    # a quick look
    python benchmarks/soak.py --model /path/to/checkpoint --json out.json

The mix: chat and completions, streaming or not, `n` up to 3, logprobs, stop strings, seeded and
greedy sampling, `max_tokens` up to 32. A quarter of the streams are closed by the client after a
random number of events (0 to 5). After the load the script reads `/metrics` until the engine is idle
and reports: requests answered completely, dropped, shed (503), lost (not dropped, not shed, without a
complete answer: must be 0), 5xx answers (must be 0), running and waiting requests and KV pages held
afterwards (must be 0; pages kept only by the prefix cache count as free, as in vLLM), compilations
after warm-up (must be 0), the server's resident memory after warm-up and after the load, and whether
the same greedy request answers the same text before and after.

`run_soak` is the load itself against any base URL; the suite runs a short version of it in-process
(`tests/test_soak.py`). Exits non-zero when a must-be-zero figure is not.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import random
import re
import sys
import time
from typing import Any, Optional

import httpx

PROMPTS = (
    "Tell me about the ocean.",
    "List three colours.",
    "What is two plus two?",
    "Write a short poem about autumn.",
    "Explain what a compiler does.",
    "Name a famous painter.",
    "How do birds fly?",
    "Describe a busy market in the morning.",
)
STOPS = (".", "\n", " the", "!", ",")


@dataclasses.dataclass
class Outcome:
    kind: str  # "ok", "dropped", "shed" (503), "lost"
    status: int = 0
    detail: str = ""


@dataclasses.dataclass
class SoakReport:
    requests: int
    concurrency: int
    completed: int
    dropped: int
    shed: int
    lost: int
    status_5xx: int
    status_4xx: int
    seconds: float
    lost_examples: list[str]

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.status_5xx == 0 and self.status_4xx == 0


def make_request(rng: random.Random, i: int, model: str, drop_fraction: float, max_tokens: int) -> tuple[str, dict[str, Any], Optional[int]]:
    """(path, body, events to read before dropping the stream or None) for request `i`."""
    chat = rng.random() < 0.5
    stream = rng.random() < 0.5
    body: dict[str, Any] = {"model": model, "max_tokens": rng.randint(1, max_tokens), "n": rng.choice((1, 1, 1, 2, 3)), "stream": stream}
    temperature = rng.choice((0.0, 0.7, 1.0))
    body["temperature"] = temperature
    if temperature and rng.random() < 0.5:
        body["seed"] = rng.randrange(2**31)
    if rng.random() < 0.3:
        body["stop"] = [rng.choice(STOPS)]
    prompt = f"{rng.choice(PROMPTS)} (#{i})"
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
        if rng.random() < 0.3:
            body["logprobs"], body["top_logprobs"] = True, rng.randint(0, 3)
        path = "/v1/chat/completions"
    else:
        body["prompt"] = prompt
        if rng.random() < 0.3:
            body["logprobs"] = rng.randint(0, 3)
        path = "/v1/completions"
    drop_after = rng.randint(0, 5) if stream and rng.random() < drop_fraction else None
    return path, body, drop_after


def _complete_json(data: dict[str, Any], n: int) -> str:
    """'' when a non-streamed answer is complete, else what is wrong."""
    choices = data.get("choices") or []
    if sorted(c.get("index") for c in choices) != list(range(n)):
        return f"choices {[c.get('index') for c in choices]} for n={n}"
    bad = [c.get("finish_reason") for c in choices if c.get("finish_reason") not in ("stop", "length")]
    return f"finish reasons {bad}" if bad else ""


def _complete_stream(lines: list[str], n: int) -> str:
    """'' when a stream is complete (every choice finished, no error event, ends with [DONE])."""
    if not lines or lines[-1] != "data: [DONE]":
        return f"stream ended with {lines[-1:]!r}"
    finished: dict[int, str] = {}
    for line in lines[:-1]:
        event = json.loads(line.removeprefix("data: "))
        if "error" in event:
            return f"error event {event['error']}"
        for c in event.get("choices", ()):
            if c.get("finish_reason"):
                finished[c["index"]] = c["finish_reason"]
    if sorted(finished) != list(range(n)) or any(r not in ("stop", "length") for r in finished.values()):
        return f"finish reasons {finished} for n={n}"
    return ""


async def _one(client: httpx.AsyncClient, path: str, body: dict[str, Any], drop_after: Optional[int]) -> Outcome:
    try:
        if not body["stream"]:
            r = await client.post(path, json=body)
            if r.status_code != 200:
                return Outcome("shed" if r.status_code == 503 else "lost", r.status_code, r.text[:200])
            wrong = _complete_json(r.json(), body["n"])
            return Outcome("lost", 200, wrong) if wrong else Outcome("ok", 200)
        lines: list[str] = []
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return Outcome("shed" if r.status_code == 503 else "lost", r.status_code, r.text[:200])
            async for line in r.aiter_lines():
                if not line:
                    continue
                lines.append(line)
                if drop_after is not None and len(lines) > drop_after:
                    return Outcome("dropped", 200)  # leaving the block closes the connection mid-stream
        wrong = _complete_stream(lines, body["n"])
        return Outcome("lost", 200, wrong) if wrong else Outcome("ok", 200)
    except (httpx.HTTPError, ValueError) as e:
        return Outcome("lost", 0, repr(e))


async def run_soak(base_url: str, model: str, *, requests: int, concurrency: int, drop_fraction: float = 0.25,
                   max_tokens: int = 32, seed: int = 0, api_key: Optional[str] = None, timeout_s: float = 300.0) -> SoakReport:
    """Sends `requests` mixed requests with at most `concurrency` in flight; classifies every answer."""
    rng = random.Random(seed)
    specs = [make_request(rng, i, model, drop_fraction, max_tokens) for i in range(requests)]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    outcomes: list[Outcome] = []
    queue: asyncio.Queue[tuple[str, dict[str, Any], Optional[int]]] = asyncio.Queue()
    for s in specs:
        queue.put_nowait(s)
    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout_s, limits=limits) as client:
        async def worker() -> None:
            while not queue.empty():
                outcomes.append(await _one(client, *queue.get_nowait()))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.monotonic() - t0
    count = lambda kind: sum(o.kind == kind for o in outcomes)  # noqa: E731
    return SoakReport(
        requests=requests, concurrency=concurrency, completed=count("ok"), dropped=count("dropped"), shed=count("shed"),
        lost=count("lost"), status_5xx=sum(o.status >= 500 and o.status != 503 for o in outcomes),
        status_4xx=sum(400 <= o.status < 500 for o in outcomes), seconds=seconds,
        lost_examples=[f"{o.status} {o.detail}" for o in outcomes if o.kind == "lost"][:5],
    )


# ----- what the server says after the load -------------------------------------------------------
def metric(text: str, name: str) -> float:
    """The value of a metric family's only (or first) series in Prometheus text."""
    m = re.search(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text, re.M)
    if m is None:
        raise KeyError(f"{name} is not in /metrics")
    return float(m.group(1))


def idle_state(base_url: str, api_key: Optional[str] = None, wait_s: float = 30.0) -> dict[str, float]:
    """Running / waiting requests, KV usage and compilations after warm-up, once the engine is idle
    (or after `wait_s`, whatever they are then)."""
    deadline = time.monotonic() + wait_s
    while True:
        text = httpx.get(f"{base_url}/metrics", timeout=10).text
        state = {
            "num_requests_running": metric(text, "vllm:num_requests_running"),
            "num_requests_waiting": metric(text, "vllm:num_requests_waiting"),
            "kv_cache_usage_perc": metric(text, "vllm:kv_cache_usage_perc"),
            "compilations_after_warmup": metric(text, "jengine:compilations_after_warmup_total"),
        }
        busy = state["num_requests_running"] or state["num_requests_waiting"] or state["kv_cache_usage_perc"]
        if not busy or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


def greedy_text(base_url: str, model: str, api_key: Optional[str] = None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"model": model, "prompt": "The three primary colours are", "max_tokens": 16, "temperature": 0.0}
    r = httpx.post(f"{base_url}/v1/completions", json=body, headers=headers, timeout=120)
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


# ----- the benchmark: a real `jengine serve` subprocess ----------------------------------------------
def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def served_model(base_url: str) -> str:
    return httpx.get(f"{base_url}/v1/models", timeout=10).json()["data"][0]["id"]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint to serve (default: jengine serve's default model)")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--drop-fraction", type=float, default=0.25, help="fraction of streams the client drops mid-way")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "soak.json"))
    ap.add_argument("serve_args", nargs="*", help="extra `jengine serve` flags (after --)")
    args = ap.parse_args(argv)

    from startup import ServerRun  # benchmarks/startup.py: the same launcher, on the user's caches

    cache_root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    flags = [*([args.model] if args.model else []), "--no-compile-in-background", "--disable-log-requests", *args.serve_args]
    server = ServerRun(cache_root, flags, timeout=600)
    proc, base = server.proc, f"http://127.0.0.1:{server.port}"
    try:
        model = served_model(base)
        before = greedy_text(base, model)
        asyncio.run(run_soak(base, model, requests=min(64, args.requests), concurrency=args.concurrency, seed=args.seed + 1))
        idle_state(base)
        rss_warm = rss_bytes(proc.pid)  # after a first round, so allocator pools and caches are sized
        report = asyncio.run(run_soak(base, model, requests=args.requests, concurrency=args.concurrency,
                                      drop_fraction=args.drop_fraction, max_tokens=args.max_tokens, seed=args.seed))
        state = idle_state(base)
        rss_after = rss_bytes(proc.pid)
        after = greedy_text(base, model)
    finally:
        server.stop()
    growth = rss_after / rss_warm - 1.0
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "model": model, **dataclasses.asdict(report), "after_load": state,
        "rss_after_warmup_mib": round(rss_warm / 2**20, 1), "rss_after_load_mib": round(rss_after / 2**20, 1),
        "rss_growth_percent": round(100 * growth, 2), "greedy_same_before_and_after": before == after,
    }
    leaks = state["num_requests_running"] + state["num_requests_waiting"] + state["kv_cache_usage_perc"]
    passed = report.ok and leaks == 0 and state["compilations_after_warmup"] == 0 and before == after
    result["passed"] = passed
    rows = [
        ("requests", report.requests), ("concurrency", report.concurrency), ("completed", report.completed),
        ("dropped by the client", report.dropped), ("shed (503)", report.shed), ("lost", report.lost),
        ("5xx", report.status_5xx), ("4xx", report.status_4xx), ("seconds", f"{report.seconds:.1f}"),
        ("running / waiting after", f"{state['num_requests_running']:.0f} / {state['num_requests_waiting']:.0f}"),
        ("KV pages in use after", f"{100 * state['kv_cache_usage_perc']:.2f} %"),
        ("compilations after warm-up", f"{state['compilations_after_warmup']:.0f}"),
        ("RSS after warm-up / after load", f"{result['rss_after_warmup_mib']} / {result['rss_after_load_mib']} MiB ({result['rss_growth_percent']:+.2f} %)"),
        ("same greedy text before and after", before == after),
    ]
    print(f"\nsoak: {model} on {result['machine']}, {result['date']}")
    for k, v in rows:
        print(f"  {k:<34} {v}")
    if report.lost_examples:
        print("  lost:", *report.lost_examples, sep="\n    ")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}; {'PASSED' if passed else 'FAILED'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
