"""The sampler alone: one `sample()` call over [S, V] logits, per workload, with the top-k / top-p cuts
computed natively (the CPU's radix select, `pallas_kernels/cpu_sampling.cc`) against in `jax.numpy`
(`lax.top_k` candidates and a bisection where they fall short: what accelerators run), in one process.

    python benchmarks/sampler.py                        # S = 64, V = 49152 (SmolLM2's vocabulary)
    python benchmarks/sampler.py --rows 8,64,256 --repeats 20

Logits are random normal times `--scale` (4: flat enough that a top-p of 0.9 needs thousands of
tokens, as at the open positions of real text). Workloads: every row greedy; temperature 0.7; plus
top_p 0.9; temperature 1 with top_k 50 and top_p 0.95; plus min_p 0.05. Each cell is the median of
`--repeats` calls after a compile, the two paths alternating. Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import result_json  # benchmarks/result_json.py: the script's folder is on sys.path

WORKLOADS = {
    "greedy": dict(temperature=0.0),
    "temperature 0.7": dict(temperature=0.7),
    "t 0.7, top_p 0.9": dict(temperature=0.7, top_p=0.9),
    "t 1, top_k 50, top_p 0.95": dict(temperature=1.0, top_k=50, top_p=0.95),
    "t 1, top_p 0.9, min_p 0.05": dict(temperature=1.0, top_p=0.9, min_p=0.05),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="64")
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--scale", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "sampler_cpu.json"))
    args = ap.parse_args()

    import jax
    import numpy as np

    from jengine import sampler
    from jengine.pallas_kernels import cpu_sampling
    from jengine.sampler import RowState, build_sampling_tensors
    from jengine.sampling_params import SamplingParams

    if not cpu_sampling.available():
        raise SystemExit("the native sampling kernel is unavailable (no C++ compiler?)")

    paths = {p: jax.jit(functools.partial(sampler.sample, max_logprobs=0, native=native))
             for p, native in (("native", True), ("jax.numpy", False))}
    rng = np.random.default_rng(0)
    results = []
    print(f"{'rows':>5} {'workload':<28} {'native ms':>10} {'jax.numpy ms':>13} {'ratio':>7}")
    for S in [int(r) for r in args.rows.split(",")]:
        logits = jax.device_put((rng.standard_normal((S, args.vocab)) * args.scale).astype(np.float32))
        for name, kw in WORKLOADS.items():
            rows = [RowState(SamplingParams(seed=i, **kw), [1], [], seed=i) for i in range(S)]
            t = jax.device_put(build_sampling_tensors(rows, S, vocab_size=args.vocab, max_logprobs=0))
            times: dict[str, list[float]] = {p: [] for p in paths}
            for fn in paths.values():
                jax.block_until_ready(fn(logits, t))
            for _ in range(args.repeats):
                for p, fn in paths.items():
                    start = time.perf_counter()
                    jax.block_until_ready(fn(logits, t))
                    times[p].append(time.perf_counter() - start)
            med = {p: 1000 * statistics.median(v) for p, v in times.items()}
            ratio = med["jax.numpy"] / med["native"]
            print(f"{S:>5} {name:<28} {med['native']:>10.2f} {med['jax.numpy']:>13.2f} {ratio:>6.2f}x")
            results.append(dict(rows=S, workload=name, native_ms=med["native"], jax_numpy_ms=med["jax.numpy"], ratio=ratio))
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M"), vocab=args.vocab, scale=args.scale, repeats=args.repeats,
                cpus=os.cpu_count(), jax=jax.__version__, load=os.getloadavg()[0])
    result_json.write(args.out, dict(meta=meta, results=results))


if __name__ == "__main__":
    main()
