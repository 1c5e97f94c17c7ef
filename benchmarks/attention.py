"""Micro-benchmark of the paged-attention backends on decode-heavy and prefill-heavy batches.

For each available backend (`reference` everywhere, `cpu` on a CPU with a C++ compiler, `gpu` on a
GPU, `tpu` on a TPU) it first checks
the backend's output against the reference (run at `highest` matmul precision) on the case's random
data, then times one jitted `ragged_paged_attention` call: the median over repeats of a burst of
back-to-back calls, so host dispatch overlaps device work as it does in the engine. It reports
achieved memory bandwidth (bytes of KV read + Q read + O written, over time), TFLOP/s (QK^T and PV
of the causal pairs only), and both as fractions of what this device measured in the same run:
copy bandwidth (a big array copy, read + write counted) and matrix rate (a big bfloat16 matmul on
random data). `--tunings` also times variants of the GPU kernel's `GpuTuning`. Writes JSON with
the machine and versions.

    python benchmarks/attention.py                 # full shapes on an accelerator, --small on the CPU
    python benchmarks/attention.py --small --out /tmp/attention.json
    python benchmarks/attention.py --tunings "kv_block_tokens=128;prefill_rows=128,prefill_warps=8"
"""
from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jengine import pallas_kernels as pk


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 2, burst: int = 1) -> float:
    """Median seconds per call of `fn()` (returns a jax.Array) over `repeats` bursts of `burst`
    back-to-back calls, each burst timed until its last result is ready, after `warmup` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = [fn() for _ in range(burst)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - t0) / burst)
    return statistics.median(times)


def copy_bandwidth(nbytes: int, repeats: int, burst: int) -> float:
    """Bytes/s of a jitted array copy (read + write counted) on random data."""
    x = jax.random.normal(jax.random.PRNGKey(1), (nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a * 1.5 + 1.0)  # one full read and one full write
    sec = median_seconds(lambda: f(x), repeats, burst=burst)
    return 2 * x.nbytes / sec


def matmul_rate(n: int, repeats: int, burst: int) -> float:
    """FLOP/s of a bfloat16 [n, n] @ [n, n] matmul with float32 accumulation, on random data."""
    ka, kb = jax.random.split(jax.random.PRNGKey(2))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    sec = median_seconds(lambda: f(a, b), repeats, burst=burst)
    return 2 * n**3 / sec


def make_case(name: str, seqs: list[tuple[int, int]], hq: int, hkv: int, d: int, page_size: int, dtype: Any) -> dict:
    """A batch of (total length, new tokens) sequences with pages in shuffled order."""
    rng = np.random.default_rng(0)
    pages = [math.ceil(n / page_size) for n, _ in seqs]
    num_pages = sum(pages) + 1
    order = 1 + rng.permutation(num_pages - 1)
    tables = np.zeros((len(seqs), max(pages)), np.int32)
    it = 0
    for s, p in enumerate(pages):
        tables[s, :p] = order[it: it + p]
        it += p
    q_lens = [q for _, q in seqs]
    T = sum(q_lens)
    kv_bytes = sum(n for n, _ in seqs) * hkv * d * 2 * jnp.dtype(dtype).itemsize
    qo_bytes = 2 * T * hq * d * jnp.dtype(dtype).itemsize
    pairs = sum(sum(n - q + i + 1 for i in range(q)) for n, q in seqs)  # causal (query, key) pairs
    return dict(
        name=name, seqs=seqs, seed=len(name), hq=hq, hkv=hkv, d=d, page_size=page_size, dtype=jnp.dtype(dtype).name,
        num_pages=num_pages, tables=tables, T=T, bytes=kv_bytes + qo_bytes, flops=4 * d * hq * pairs,
        seq_lens=np.array([n for n, _ in seqs], np.int32),
        query_start_loc=np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32),
    )


def case_inputs(case: dict, backend: str) -> tuple:
    """(q, cache, seq_lens, block_tables, query_start_loc, num_seqs) with fresh random q and KV."""
    dtype = jnp.dtype(case["dtype"])
    kq, kkv = jax.random.split(jax.random.PRNGKey(case["seed"]))
    cache = pk.new_kv_cache(case["num_pages"], case["page_size"], case["hkv"], case["d"], dtype, backend=backend)
    slots = np.concatenate([case["tables"][s, np.arange(n) // case["page_size"]] * case["page_size"]
                            + np.arange(n) % case["page_size"] for s, (n, _) in enumerate(case["seqs"])])
    kv = jax.random.normal(kkv, (2, len(slots), case["hkv"], case["d"]), dtype)
    cache = pk.write_kv(cache, kv[0], kv[1], jnp.asarray(slots, jnp.int32), backend=backend)
    q = jax.random.normal(kq, (case["T"], case["hq"], case["d"]), dtype)
    return (q, cache, jnp.asarray(case["seq_lens"]), jnp.asarray(case["tables"]),
            jnp.asarray(case["query_start_loc"]), jnp.asarray([len(case["seqs"])], jnp.int32))


def attention_fn(case: dict, backend: str, tuning: dict | None = None) -> Callable:
    """The jitted attention call; a Pallas backend off its own platform runs in interpret mode (slow)."""
    kw = dict(sm_scale=1 / math.sqrt(case["d"]))
    if pk.runs_interpreted(backend):
        kw["interpret"] = True
    if tuning:  # a GPU kernel variant: call the backend module directly
        from jengine.pallas_kernels import gpu

        return jax.jit(functools.partial(gpu.ragged_paged_attention, tuning=gpu.GpuTuning(**tuning), **kw))
    return jax.jit(functools.partial(pk.ragged_paged_attention, backend=backend, **kw))


def reference_output(case: dict) -> np.ndarray:
    """The reference backend's output at highest matmul precision, as float32."""
    with jax.default_matmul_precision("highest"):
        out = attention_fn(case, "reference")(*case_inputs(case, "reference"))
    return np.asarray(out.astype(jnp.float32))


def check_backend(case: dict, backend: str, ref: np.ndarray, tuning: dict | None = None) -> float:
    """‖out - ref‖ / ‖ref‖ over the case's tokens (a NaN or inf anywhere counts as inf)."""
    out = np.asarray(attention_fn(case, backend, tuning)(*case_inputs(case, backend)).astype(jnp.float32))
    if not np.isfinite(out).all():
        return float("inf")
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def time_backend(case: dict, backend: str, repeats: int, burst: int, tuning: dict | None = None) -> float:
    f, args = attention_fn(case, backend, tuning), case_inputs(case, backend)
    return median_seconds(lambda: f(*args), repeats, burst=burst)


def profile_breakdown(fn: Callable[[], Any], calls: int, top: int = 12) -> list[tuple[str, float]]:
    """Device time per call of each kernel (XLA fusion or Pallas kernel) `fn` launches, from a profiler trace.

    Reads the Perfetto trace `jax.profiler` writes; on an accelerator only the device's events count,
    on the CPU the host's (where XLA's ops run). Returns [(event name, microseconds per call)], largest first.
    """
    jax.block_until_ready(fn())
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            jax.block_until_ready([fn() for _ in range(calls)])
        paths = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
        if not paths:
            return []
        with gzip.open(paths[0]) as fh:
            trace = json.load(fh)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {pid for pid, name in procs.items() if "/device:" in name}
    keep = device_pids or set(procs)
    totals: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in keep and not e["name"].startswith("$"):  # "$": Python frames
            totals[e["name"]] += float(e.get("dur", 0))
    return [(name, us / calls) for name, us in totals.most_common(top)]


def parse_tunings(spec: str | None) -> list[dict]:
    """"k=v,k=v;k=v" -> [{k: int(v), ...}, ...] (GpuTuning fields)."""
    out = []
    for variant in (spec or "").split(";"):
        if variant.strip():
            out.append({k.strip(): int(v) for k, v in (kv.split("=") for kv in variant.split(","))})
    return out


def available_backends() -> list[str]:
    platform_name = jax.default_backend()
    native_cpu = platform_name == "cpu" and pk.resolve_backend(None) == "cpu"  # built with the host's compiler
    return ["reference"] + (["cpu"] if native_cpu else []) + (["gpu"] if platform_name in ("gpu", "cuda", "rocm") else []) + (["tpu"] if platform_name == "tpu" else [])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "attention.json"))
    ap.add_argument("--small", action="store_true", default=None, help="small shapes (default on the CPU)")
    ap.add_argument("--full", dest="small", action="store_false", help="full shapes even on the CPU")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--backends", default=None, help="comma-separated subset of the available backends")
    ap.add_argument("--tunings", default=None, help="GPU kernel variants to time too: 'field=v,...;field=v'")
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip the correctness check")
    ap.add_argument("--profile", action="store_true", help="also print each backend's device time per kernel")
    args = ap.parse_args(argv)
    on_cpu = jax.default_backend() == "cpu"
    small = on_cpu if args.small is None else args.small
    repeats = args.repeats or (5 if small else 20)
    burst = 1 if on_cpu else 10
    backends = available_backends() if args.backends is None else args.backends.split(",")
    tunings = parse_tunings(args.tunings)

    dtype = jnp.bfloat16
    if small:
        cases = [make_case("decode 8x256", [(256, 1)] * 8, 8, 2, 64, 16, dtype),
                 make_case("prefill 512", [(512, 512)], 8, 2, 64, 16, dtype)]
        bw = copy_bandwidth(64 << 20, repeats, burst)
        mm = matmul_rate(1024, repeats, burst)
    else:
        cases = [make_case("decode 64x2048", [(2048, 1)] * 64, 32, 8, 128, 16, dtype),
                 make_case("prefill 4096", [(4096, 4096)], 32, 8, 128, 16, dtype),
                 make_case("mixed 32x1k+2x512", [(1024, 1)] * 32 + [(1536, 512)] * 2, 32, 8, 128, 16, dtype),
                 make_case("smollm2 128x512", [(512, 1)] * 128, 9, 3, 64, 16, dtype)]
        bw = copy_bandwidth(1 << 30, repeats, burst)
        mm = matmul_rate(8192, repeats, burst)

    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"measured copy bandwidth {bw / 1e9:.1f} GB/s, bf16 matmul {mm / 1e12:.2f} TFLOP/s\n", flush=True)
    header = f"{'case':<18} {'backend':<28} {'ms':>9} {'GB/s':>8} {'%copy':>6} {'TFLOP/s':>8} {'%mm':>6} {'rel err':>8}"
    print(header)
    print("-" * len(header), flush=True)
    variants = [(b, None) for b in backends] + [("gpu", t) for t in tunings]
    rows = []
    for case in cases:
        ref = reference_output(case) if args.check else None
        for backend, tuning in variants:
            label = backend if tuning is None else "gpu " + ",".join(f"{k}={v}" for k, v in tuning.items())
            try:
                err = check_backend(case, backend, ref, tuning) if args.check else None
                sec = time_backend(case, backend, repeats, burst, tuning)
            except Exception as exc:  # a variant the compiler rejects is reported, not fatal
                print(f"{case['name']:<18} {label:<28} failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                rows.append(dict(case=case["name"], backend=backend, tuning=tuning, error=f"{type(exc).__name__}: {exc}"))
                continue
            gbs, tfs = case["bytes"] / sec, case["flops"] / sec
            rows.append(dict(case=case["name"], backend=backend, tuning=tuning, seconds=sec, bytes=case["bytes"],
                             flops=case["flops"], bandwidth_bytes_per_s=gbs, frac_copy_bandwidth=gbs / bw,
                             flops_per_s=tfs, frac_matmul_rate=tfs / mm, rel_err_vs_reference=err, hq=case["hq"],
                             hkv=case["hkv"], head_dim=case["d"], page_size=case["page_size"], dtype=case["dtype"]))
            err_s = "-" if err is None else f"{err:.1e}"
            print(f"{case['name']:<18} {label:<28} {sec * 1e3:9.3f} {gbs / 1e9:8.1f} {100 * gbs / bw:6.1f} "
                  f"{tfs / 1e12:8.3f} {100 * tfs / mm:6.1f} {err_s:>8}", flush=True)
            if args.profile and tuning is None:
                f, inputs = attention_fn(case, backend), case_inputs(case, backend)
                try:
                    parts = profile_breakdown(lambda f=f, inputs=inputs: f(*inputs), calls=burst)
                except Exception as exc:  # no profiler on this machine: the timings above still stand
                    print(f"    profile failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                    parts = []
                rows[-1]["profile_us_per_call"] = parts
                for name, us in parts:
                    print(f"    {us:10.1f} us  {name[:100]}", flush=True)
    result = dict(
        benchmark="attention", date=time.strftime("%Y-%m-%d"), small=small, repeats=repeats, burst=burst,
        machine=dict(node=platform.node(), processor=platform.processor(), platform=jax.default_backend(),
                     device_kind=dev.device_kind, device_count=jax.device_count(), cpu_count=os.cpu_count()),
        versions=dict(python=sys.version.split()[0], jax=jax.__version__, jaxlib=getattr(jax.lib, "__version__", None)
                      or __import__("jaxlib").__version__),
        copy_bandwidth_bytes_per_s=bw, matmul_flops_per_s=mm, results=rows,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
