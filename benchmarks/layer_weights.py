"""Reading layer weights out of stacked arrays on the CPU: copied per step against read in place.

    python benchmarks/layer_weights.py                 # table + benchmarks/results/layer_weights_cpu.json
    python benchmarks/layer_weights.py --rounds 5 --repeats 30

The models scan their layers over weights stacked `[L, in, out]`. XLA's CPU dot copies a slice of a
stack into a buffer of its own before reading it, so every step copied each layer's matrices; the
layers now multiply them in place with the native kernel (`pallas_kernels/cpu_linear.cc`). This
times the projections alone of SmolLM2-135M's 30 layers (hidden 576, FFN 1536, 3 KV heads of 64:
the seven matrices per layer, 425 MB of float32 weights, random values) at 1 to 32 rows, three ways:

    copy       the scan indexes the stacks, `x @ w[layer]` (what every step did before)
    in_place   the scan passes (stack, layer) to the native kernel, q/k/v and gate/up in one call
               each (`stacked_linears`, `stacked_linear`: what a step does now)
    per_layer  unrolled over 30 separate arrays, `x @ w` (XLA's dot with no copy: its own speed)

Each side runs in its own process, the sides one after the other, `--rounds` times, so load from
other work falls on each alike; a child reports the median of `--repeats` timed calls. The table
gives the median over rounds and the weight bytes read per second.

A second table times the tied LM head, logits = x @ embed.T over SmolLM2's [49152, 576] float32
embedding (113 MB): XLA's dot (`cpu_linear.lm_head_reference`, what `compute_logits` runs without
the in-place path) against the native kernel (`cpu_linear.lm_head`), alternating in one process
over 4 copies of the matrix in turn so that each call reads one the last-level cache has mostly
dropped, as in a decode step.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import result_json
import side_process  # benchmarks/side_process.py: the script's folder is on sys.path

L, H, F, KV = 30, 576, 1536, 192
SHAPES = {"wq": (H, H), "wk": (H, KV), "wv": (H, KV), "wo": (H, H), "w_gate": (H, F), "w_up": (H, F), "w_down": (F, H)}
WEIGHT_BYTES = 4 * L * sum(a * b for a, b in SHAPES.values())
SIDES = ("copy", "in_place", "per_layer")
V = 49152
HEAD_BYTES = 4 * V * H
HEADS = ("xla", "native")


def head_child(rows_list: list[int], repeats: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jengine.pallas_kernels import cpu_linear

    if not cpu_linear.available():
        raise SystemExit("the native CPU kernel is unavailable (no C++ compiler?)")
    rng = np.random.default_rng(0)
    embeds = [jnp.asarray(rng.standard_normal((V, H), np.float32) * 0.02) for _ in range(4)]
    fns = {"xla": jax.jit(cpu_linear.lm_head_reference), "native": jax.jit(cpu_linear.lm_head)}
    out: dict[str, dict[str, float]] = {k: {} for k in HEADS}
    for rows in rows_list:
        x = jnp.asarray(rng.standard_normal((rows, H), np.float32))
        want = np.asarray(fns["xla"](x, embeds[0]))
        np.testing.assert_allclose(np.asarray(fns["native"](x, embeds[0])), want, rtol=1e-4, atol=1e-4)
        times: dict[str, list[float]] = {k: [] for k in HEADS}
        for i in range(repeats):
            for k in HEADS:
                e = embeds[(2 * i + HEADS.index(k)) % len(embeds)]
                start = time.perf_counter()
                fns[k](x, e).block_until_ready()
                times[k].append(time.perf_counter() - start)
        for k in HEADS:
            out[k][str(rows)] = statistics.median(times[k])
    side_process.emit(out)


def child(side: str, rows_list: list[int], repeats: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jengine.pallas_kernels import cpu_linear

    if side == "in_place" and not cpu_linear.available():
        raise SystemExit("the native CPU kernel is unavailable (no C++ compiler?)")
    rng = np.random.default_rng(0)
    stacks = {n: jnp.asarray(rng.standard_normal((L, *s), np.float32) * 0.02) for n, s in SHAPES.items()}

    def layer(x, mm, many=None):
        """The seven projections of a Llama layer (attention and norms left out); `many` runs the ones
        that read the same input together, as the model does (q/k/v, gate/up)."""
        many = many or (lambda x, names: [mm(x, n) for n in names])
        q, k, v = many(x, ["wq", "wk", "wv"])
        x = x + mm(q + jnp.pad(k + v, ((0, 0), (0, H - KV))), "wo")
        gate, up = many(x, ["w_gate", "w_up"])
        return x + mm(jax.nn.silu(gate) * up, "w_down")

    if side == "per_layer":
        args = [{n: a[i] for n, a in stacks.items()} for i in range(L)]
        args = jax.block_until_ready(jax.device_put(args))
        del stacks

        @jax.jit
        def fn(ws, x):
            for w in ws:
                x = layer(x, lambda x, n, w=w: x @ w[n])
            return x
    else:
        args = stacks
        if side == "copy":
            def mm_at(ws, i):
                return lambda x, n: x @ jax.lax.dynamic_index_in_dim(ws[n], i, keepdims=False)
        else:
            def mm_at(ws, i):
                return lambda x, n: cpu_linear.stacked_linear(x, ws[n], i)

        def many_at(ws, i):
            if side == "copy":
                return None
            return lambda x, names: cpu_linear.stacked_linears(x, [ws[n] for n in names], i)

        @jax.jit
        def fn(ws, x):
            return jax.lax.scan(lambda x, i: (layer(x, mm_at(ws, i), many_at(ws, i)), None), x, jnp.arange(L))[0]

    out = {}
    for rows in rows_list:
        x = jnp.asarray(rng.standard_normal((rows, H), np.float32))
        fn(args, x).block_until_ready()  # compile
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(args, x).block_until_ready()
            times.append(time.perf_counter() - start)
        out[str(rows)] = statistics.median(times)
    side_process.emit(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,4,8,16,32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "layer_weights_cpu.json"))
    ap.add_argument("--side", choices=(*SIDES, "head"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    if args.side == "head":
        head_child(rows, args.repeats)
        return
    if args.side:
        child(args.side, rows, args.repeats)
        return
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in SIDES}
    head_runs: list[dict[str, dict[str, float]]] = []
    for _ in range(args.rounds):
        for side in SIDES:
            runs[side].append(side_process.run([sys.executable, __file__, "--side", side, "--rows", args.rows, "--repeats", str(args.repeats)]))
        head_runs.append(side_process.run([sys.executable, __file__, "--side", "head", "--rows", args.rows, "--repeats", str(args.repeats)]))
    table = {}
    print(f"{'rows':>5} " + " ".join(f"{s + ' ms':>14}" for s in SIDES) + f" {'copy/in_place':>14} {'in_place GB/s':>14}")
    for r in rows:
        med = {s: statistics.median(run[str(r)] for run in runs[s]) for s in SIDES}
        ratio = statistics.median(a[str(r)] / b[str(r)] for a, b in zip(runs["copy"], runs["in_place"]))
        table[str(r)] = {**{f"{s}_ms": med[s] * 1e3 for s in SIDES}, "copy_over_in_place": ratio,
                         "in_place_weight_gb_per_s": WEIGHT_BYTES / med["in_place"] / 1e9}
        print(f"{r:>5} " + " ".join(f"{med[s] * 1e3:>14.1f}" for s in SIDES) + f" {ratio:>13.2f}x {table[str(r)]['in_place_weight_gb_per_s']:>14.1f}")
    head_table = {}
    print(f"\nLM head, [{V}, {H}] float32\n{'rows':>5} {'xla ms':>10} {'native ms':>10} {'xla/native':>11} {'native GB/s':>12}")
    for r in rows:
        med = {k: statistics.median(run[k][str(r)] for run in head_runs) for k in HEADS}
        ratio = statistics.median(run["xla"][str(r)] / run["native"][str(r)] for run in head_runs)
        head_table[str(r)] = {"xla_ms": med["xla"] * 1e3, "native_ms": med["native"] * 1e3, "xla_over_native": ratio,
                              "native_weight_gb_per_s": HEAD_BYTES / med["native"] / 1e9}
        print(f"{r:>5} {med['xla'] * 1e3:>10.2f} {med['native'] * 1e3:>10.2f} {ratio:>10.2f}x {HEAD_BYTES / med['native'] / 1e9:>12.1f}")
    result = {
        "benchmark": "layer_weights", "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average": os.getloadavg(), "weight_bytes": WEIGHT_BYTES, "rounds": args.rounds, "repeats": args.repeats,
        "rows": table, "raw": runs, "lm_head": {"rows": head_table, "raw": head_runs},
    }
    result_json.write(args.out, result, indent=1)


if __name__ == "__main__":
    main()
