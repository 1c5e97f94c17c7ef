"""Counts the per-step copies of layer weights in the engine's compiled decode step, on this platform.

    python benchmarks/weight_copies.py                          # SmolLM2-135M's shapes (the default model)
    python benchmarks/weight_copies.py --model CONFIG_DIR --load-format dummy --dtype bfloat16

The layers scan over weights stacked `[L, in, out]`; a compiler that materialises a layer's slice
before its matmul copies every matrix of the model each step. This builds the engine (one row,
the smallest step bucket), compiles its forward for the platform JAX runs on, and lists each op of
the optimized HLO that produces an array of a layer matrix's shape from a dynamic slice or a copy.
On the CPU the layers read their matrices in place (`pallas_kernels/cpu_linear.py`): expect none.
On a GPU it shows whether XLA's dynamic-slice fusion feeds the GEMMs in place (see
`benchmarks/gpu_session.sh`, stage `weights`). Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import os
import re
import time

import result_json  # benchmarks/result_json.py: the script's folder is on sys.path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "weight_copies.json"))
    args = ap.parse_args()

    import jax
    from flax import nnx

    from jengine.entrypoints.llm import LLM

    llm = LLM(args.model, load_format=args.load_format, dtype=args.dtype, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=256)
    runner = llm.engine.runner
    t, s = sorted(runner.step_buckets)[0]
    lower = dict(runner._warmup_pieces())[("forward", t, s)]  # the runner's own lowering of that step
    hlo = lower().compile().as_text()
    leaves = jax.tree.leaves(nnx.state(runner.params))
    shapes = sorted({tuple(int(d) for d in a.shape[-2:]) for a in leaves if getattr(a, "ndim", 0) >= 3})
    rows, total = [], 0
    for a, b in shapes:
        shape = rf"\w+\[(1,)*{a},{b}\]"
        hits = [ln.strip()[:160] for ln in hlo.splitlines()
                if re.search(rf"^\s*(ROOT )?%[\w.\-]*(dynamic-slice|dynamic_slice|copy)[\w.\-]* = {shape}", ln)
                or re.search(rf"= {shape}\S* (dynamic-slice|copy)\(", ln)]
        rows.append({"matrix": f"{a}x{b}", "copies_in_step": len(hits), "examples": hits[:2]})
        total += len(hits)
    custom = sorted(set(re.findall(r'custom_call_target="([\w.\-]+)"', hlo)))
    print(f"platform {jax.default_backend()}, step bucket ({t} tokens, {s} rows), {len(hlo)} HLO characters")
    print(f"{'layer matrix':>14} {'copies':>7}")
    for r in rows:
        print(f"{r['matrix']:>14} {r['copies_in_step']:>7}")
    print(f"custom calls: {', '.join(custom) or 'none'}")
    result = {"benchmark": "weight_copies", "date": time.strftime("%Y-%m-%d %H:%M"), "platform": jax.default_backend(),
              "devices": [str(d) for d in jax.devices()], "model": args.model or "default (SmolLM2-135M GGUF)",
              "dtype": args.dtype, "bucket": [t, s], "matrices": rows, "total_copies": total, "custom_calls": custom}
    result_json.write(args.out, result, indent=1)


if __name__ == "__main__":
    main()
