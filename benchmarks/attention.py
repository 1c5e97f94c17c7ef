"""Micro-benchmark of the paged-attention backends on decode-heavy and prefill-heavy batches.

For each available backend (`reference` everywhere, `gpu` on a GPU, `tpu` on a TPU) it times one
jitted `ragged_paged_attention` call (median of repeats), and reports achieved memory bandwidth
(bytes of KV read + Q read + O written, over time), TFLOP/s (QK^T and PV of the causal pairs only),
and both as fractions of what this device measured in the same run: copy bandwidth (a big array
copy) and matrix rate (a big bfloat16 matmul). Writes JSON with the machine and versions.

    python benchmarks/attention.py                 # full shapes on an accelerator, --small on the CPU
    python benchmarks/attention.py --small --out /tmp/attention.json
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jengine import pallas_kernels as pk


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    """Median wall time of `fn()` (which must block) over `repeats` runs, after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    """Bytes/s of a jitted array copy (read + write counted)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a + 1.0)  # one full read and one full write
    sec = median_seconds(lambda: f(x).block_until_ready(), repeats)
    return 2 * x.nbytes / sec


def matmul_rate(n: int, repeats: int) -> float:
    """FLOP/s of a bfloat16 [n, n] @ [n, n] matmul with float32 accumulation."""
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    sec = median_seconds(lambda: f(a, a).block_until_ready(), repeats)
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
        name=name, seqs=seqs, hq=hq, hkv=hkv, d=d, page_size=page_size, dtype=jnp.dtype(dtype).name,
        num_pages=num_pages, tables=tables, T=T, bytes=kv_bytes + qo_bytes, flops=4 * d * hq * pairs,
        seq_lens=np.array([n for n, _ in seqs], np.int32),
        query_start_loc=np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32),
    )


def time_backend(case: dict, backend: str, repeats: int) -> float:
    dtype = jnp.dtype(case["dtype"])
    key = jax.random.PRNGKey(0)
    cache = pk.new_kv_cache(case["num_pages"], case["page_size"], case["hkv"], case["d"], dtype, backend=backend)
    slots = np.concatenate([case["tables"][s, np.arange(n) // case["page_size"]] * case["page_size"]
                            + np.arange(n) % case["page_size"] for s, (n, _) in enumerate(case["seqs"])])
    kv = jax.random.normal(key, (2, len(slots), case["hkv"], case["d"]), dtype)
    cache = pk.write_kv(cache, kv[0], kv[1], jnp.asarray(slots, jnp.int32), backend=backend)
    q = jax.random.normal(key, (case["T"], case["hq"], case["d"]), dtype)
    f = jax.jit(functools.partial(pk.ragged_paged_attention, sm_scale=1 / math.sqrt(case["d"]), backend=backend))
    args = (q, cache, jnp.asarray(case["seq_lens"]), jnp.asarray(case["tables"]),
            jnp.asarray(case["query_start_loc"]), jnp.asarray([len(case["seqs"])], jnp.int32))
    return median_seconds(lambda: f(*args).block_until_ready(), repeats)


def available_backends() -> list[str]:
    platform_name = jax.default_backend()
    return ["reference"] + (["gpu"] if platform_name in ("gpu", "cuda", "rocm") else []) + (["tpu"] if platform_name == "tpu" else [])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "attention.json"))
    ap.add_argument("--small", action="store_true", default=None, help="small shapes (default on the CPU)")
    ap.add_argument("--full", dest="small", action="store_false", help="full shapes even on the CPU")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--backends", default=None, help="comma-separated subset of the available backends")
    args = ap.parse_args(argv)
    on_cpu = jax.default_backend() == "cpu"
    small = on_cpu if args.small is None else args.small
    repeats = args.repeats or (5 if small else 20)
    backends = available_backends() if args.backends is None else args.backends.split(",")

    dtype = jnp.bfloat16
    if small:
        cases = [make_case("decode 8x256", [(256, 1)] * 8, 8, 2, 64, 16, dtype),
                 make_case("prefill 512", [(512, 512)], 8, 2, 64, 16, dtype)]
        bw = copy_bandwidth(64 << 20, repeats)
        mm = matmul_rate(1024, repeats)
    else:
        cases = [make_case("decode 64x2048", [(2048, 1)] * 64, 32, 8, 128, 16, dtype),
                 make_case("prefill 4096", [(4096, 4096)], 32, 8, 128, 16, dtype)]
        bw = copy_bandwidth(1 << 30, repeats)
        mm = matmul_rate(8192, repeats)

    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"measured copy bandwidth {bw / 1e9:.1f} GB/s, bf16 matmul {mm / 1e12:.2f} TFLOP/s\n")
    header = f"{'case':<16} {'backend':<10} {'ms':>9} {'GB/s':>8} {'%copy':>6} {'TFLOP/s':>8} {'%mm':>6}"
    print(header)
    print("-" * len(header))
    rows = []
    for case in cases:
        for backend in backends:
            sec = time_backend(case, backend, repeats)
            gbs, tfs = case["bytes"] / sec, case["flops"] / sec
            rows.append(dict(case=case["name"], backend=backend, seconds=sec, bytes=case["bytes"], flops=case["flops"],
                             bandwidth_bytes_per_s=gbs, frac_copy_bandwidth=gbs / bw, flops_per_s=tfs,
                             frac_matmul_rate=tfs / mm, hq=case["hq"], hkv=case["hkv"], head_dim=case["d"],
                             page_size=case["page_size"], dtype=case["dtype"]))
            print(f"{case['name']:<16} {backend:<10} {sec * 1e3:9.3f} {gbs / 1e9:8.1f} {100 * gbs / bw:6.1f} "
                  f"{tfs / 1e12:8.3f} {100 * tfs / mm:6.1f}")
    result = dict(
        benchmark="attention", small=small, repeats=repeats,
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
