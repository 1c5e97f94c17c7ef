"""Online serving benchmark: drives any OpenAI-compatible server with streaming completions.

    python benchmarks/serve.py --base-url http://127.0.0.1:8000 --num-prompts 64 --max-concurrency 1 8 32
    python benchmarks/serve.py --request-rate 4 --num-prompts 100          # Poisson arrivals, 4 req/s
    python benchmarks/serve.py --dataset random --vocab-size 49152         # random token-id prompts

Workload (fixed by --seed): `synthetic` prompts are ShareGPT-like text built from a word list with
input lengths drawn uniformly from [input_len * (1 - range_ratio), input_len * (1 + range_ratio)] words
(about one token each); `random` prompts are random token ids (for servers that take token-id prompts).
Each request streams a completion of up to `output_len` tokens with `ignore_eos` (a vLLM extra; other
servers ignore it, so set --output-len below their EOS point or use --no-ignore-eos to disable it).
Arrivals are Poisson at --request-rate (inf = all at once), capped by --max-concurrency.

Reports vLLM's serving metrics: request throughput, output and total token throughput, and
mean / median / p99 of TTFT (time to first token), TPOT (time per output token after the first),
ITL (gap between streamed chunks) and E2E latency. Token counts come from `stream_options.include_usage`
when the server sends usage, otherwise from the number of non-empty chunks. Prints a table per run and
writes JSON (runs, arguments, machine and versions) to --output.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import sys
import time
from typing import Any, Optional

import httpx
import numpy as np

_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they you were her "
    "she there been one all we their has would when if so what can more about no out my up do time will into said only could "
    "other new some these two may first then any like now over such our man me even most made after also did many before must "
    "through back years where much your way well down should because each just those people how too little state good very make "
    "world still own see men work long get here between both life being under never day same another know while last might us "
    "great old year off come since against go came right used take three model engine token cache page batch server request"
).split()


@dataclasses.dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itls: list[float] = dataclasses.field(default_factory=list)
    error: str = ""


def make_prompts(args: argparse.Namespace) -> list[tuple[Any, int]]:
    """(prompt, expected prompt length) per request, deterministic in --seed."""
    rng = np.random.default_rng(args.seed)
    lo = max(1, int(args.input_len * (1 - args.range_ratio)))
    hi = max(lo, int(args.input_len * (1 + args.range_ratio)))
    lens = rng.integers(lo, hi + 1, size=args.num_prompts)
    prompts = []
    for i, n in enumerate(lens):
        if args.dataset == "random":
            prompts.append(([int(t) for t in rng.integers(args.min_token_id, args.vocab_size, size=int(n))], int(n)))
        else:
            words = rng.choice(_WORDS, size=int(n))
            prompts.append((f"Request {i}: " + " ".join(words), int(n)))
    return prompts


def output_lens(args: argparse.Namespace) -> list[int]:
    rng = np.random.default_rng(args.seed + 1)
    lo = max(1, int(args.output_len * (1 - args.range_ratio)))
    hi = max(lo, int(args.output_len * (1 + args.range_ratio)))
    return [int(x) for x in rng.integers(lo, hi + 1, size=args.num_prompts)]


async def one_request(client: httpx.AsyncClient, args: argparse.Namespace, model: str, prompt: Any, max_tokens: int) -> RequestResult:
    payload: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": args.temperature,
                               "stream": True, "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        payload["ignore_eos"] = True
    payload.update(args.extra_body)
    start = time.perf_counter()
    last = start
    result = RequestResult(ok=False)
    chunks = 0
    usage = None
    try:
        async with client.stream("POST", args.endpoint, json=payload) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                if msg.get("usage"):
                    usage = msg["usage"]
                if "error" in msg:
                    result.error = str(msg["error"])[:200]
                    return result
                text = "".join((c.get("text") or "") for c in msg.get("choices") or ())
                if text:
                    now = time.perf_counter()
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    last = now
                    chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = repr(e)[:200]
        return result
    result.latency = time.perf_counter() - start
    result.output_tokens = int(usage["completion_tokens"]) if usage else chunks
    result.prompt_tokens = int(usage["prompt_tokens"]) if usage else 0
    result.ok = chunks > 0
    if not result.ok:
        result.error = "no tokens streamed"
    return result


async def run(args: argparse.Namespace, model: str, concurrency: Optional[int]) -> dict[str, Any]:
    prompts = make_prompts(args)
    outs = output_lens(args)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max(64, concurrency or args.num_prompts), max_keepalive_connections=64)
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    rng = np.random.default_rng(args.seed + 2)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=httpx.Timeout(args.timeout), limits=limits) as client:
        for _ in range(args.warmup):
            await one_request(client, args, model, prompts[0][0], 4)

        async def limited(p: Any, n: int) -> RequestResult:
            if sem is None:
                return await one_request(client, args, model, p, n)
            async with sem:
                return await one_request(client, args, model, p, n)

        start = time.perf_counter()
        tasks = []
        for i, ((p, _), n) in enumerate(zip(prompts, outs)):
            tasks.append(asyncio.ensure_future(limited(p, n)))
            if math.isfinite(args.request_rate) and i + 1 < len(prompts):
                await asyncio.sleep(float(rng.exponential(1.0 / args.request_rate)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    for r, (_, plen) in zip(results, prompts):
        if r.ok and not r.prompt_tokens:
            r.prompt_tokens = plen  # server sent no usage: the word count approximates it
    return summarize(results, duration, concurrency, args.request_rate)


def _stats(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "median": float("nan"), "p99": float("nan")}
    a = np.asarray(values) * scale
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p99": float(np.percentile(a, 99))}


def summarize(results: list[RequestResult], duration: float, concurrency: Optional[int], rate: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tok = sum(r.output_tokens for r in ok)
    in_tok = sum(r.prompt_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    errors = sorted({r.error for r in results if not r.ok})
    return {
        "max_concurrency": concurrency, "request_rate": rate if math.isfinite(rate) else "inf",
        "completed": len(ok), "failed": len(results) - len(ok), "errors": errors[:5], "duration_s": duration,
        "total_input_tokens": in_tok, "total_output_tokens": out_tok,
        "request_throughput": len(ok) / duration, "output_throughput": out_tok / duration, "total_token_throughput": (in_tok + out_tok) / duration,
        "ttft_ms": _stats([r.ttft for r in ok]), "tpot_ms": _stats(tpots), "itl_ms": _stats([x for r in ok for x in r.itls]),
        "e2el_ms": _stats([r.latency for r in ok]),
    }


def print_table(label: str, runs: list[dict[str, Any]]) -> None:
    print(f"\n== {label} ==")
    head = f"{'conc':>5} {'rate':>5} {'ok':>4} {'req/s':>7} {'out tok/s':>9} {'tot tok/s':>9} " + " ".join(
        f"{m + ' ' + s:>13}" for m in ("TTFT", "TPOT", "ITL", "E2E") for s in ("mean", "p50", "p99"))
    print(head + "   (latencies in ms)")
    for r in runs:
        cells = []
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            cells += [f"{r[key][s]:>13.1f}" for s in ("mean", "median", "p99")]
        print(f"{str(r['max_concurrency'] or '-'):>5} {str(r['request_rate']):>5} {r['completed']:>4} {r['request_throughput']:>7.2f} "
              f"{r['output_throughput']:>9.1f} {r['total_token_throughput']:>9.1f} " + " ".join(cells))
        if r["failed"]:
            print(f"      {r['failed']} failed: {r['errors']}")


def _finite(obj: Any) -> Any:
    """NaN/inf (no requests, rate=inf) become None/strings so the JSON is standard."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(), "processor": platform.processor(),
                            "cpu_count": os.cpu_count(), "httpx": httpx.__version__, "numpy": np.__version__}
    return info


async def server_model(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=30) as client:
        server: dict[str, Any] = {}
        try:
            v = await client.get("/version")
            if v.status_code == 200:
                server["version"] = v.json()
        except (httpx.HTTPError, ValueError):
            pass
        if args.model:
            return args.model, server
        r = await client.get("/v1/models")
        r.raise_for_status()
        return r.json()["data"][0]["id"], server


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument("--model", default=None, help="default: the first model of /v1/models")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--label", default="server", help="name of this server in the table and JSON")
    p.add_argument("--dataset", choices=["synthetic", "random"], default="synthetic")
    p.add_argument("--vocab-size", type=int, default=49152, help="random dataset: token ids are drawn below this")
    p.add_argument("--min-token-id", type=int, default=100, help="random dataset: skip the first ids (special tokens)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in len * [1 - r, 1 + r]")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrival rate in requests/s (inf: all at once)")
    p.add_argument("--max-concurrency", type=int, nargs="+", default=[0], help="one run per value; 0 = unlimited")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--extra-body", type=json.loads, default={}, help='JSON merged into every request, e.g. \'{"logit_bias": {"2": -100}}\' '
                   "to keep a server without ignore_eos (llama.cpp) from stopping at EOS")
    p.add_argument("--warmup", type=int, default=1, help="short requests before each run (not measured)")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="JSON path (default: benchmarks/results/serve-<label>-<time>.json)")
    args = p.parse_args(argv)

    model, server = asyncio.run(server_model(args))
    runs = []
    for conc in args.max_concurrency:
        runs.append(asyncio.run(run(args, model, conc or None)))
    print_table(f"{args.label} ({model} at {args.base_url}; {args.num_prompts} prompts, {args.dataset} input {args.input_len}, output {args.output_len})", runs)
    out = args.output or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"serve-{args.label}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        args_out = {k: v for k, v in vars(args).items() if k != "api_key"}
        json.dump(_finite({"label": args.label, "model": model, "server": server, "args": args_out, "machine": machine_info(), "runs": runs}), f, indent=2)
    print(f"wrote {out}")
    return 0 if all(r["failed"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
