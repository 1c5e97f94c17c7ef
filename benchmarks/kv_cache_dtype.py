"""The fp8 KV cache against float: bytes per token, pages for one budget, and CPU decode step time.

    python benchmarks/kv_cache_dtype.py                 # writes benchmarks/results/kv_cache_dtype_cpu.json
    python benchmarks/kv_cache_dtype.py --batches 1 --context 128

Sizing: SmolLM2-135M engines' runners built for one `kv_cache_memory_bytes` budget with a float32
model (cache float32), a bfloat16 model (cache bfloat16) and a float32 model with
`kv_cache_dtype="fp8"`; KV bytes per token and pages per layer come from the placed cache arrays.
Decode step time: SmolLM2 float32 with its float32 cache against the same model with the fp8 cache,
each in its own process one after the other, at batch 1 and 64: every row gets a `--context`-token
prompt prefilled first, then the median wall time of `--steps` engine steps that decode one token
for every row (so each step's attention reads about `batch x context` tokens of KV). Prints a table,
writes JSON.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

import result_json
import side_process  # benchmarks/side_process.py: the script's folder is on sys.path
from decode_steps import median_decode_steps

HERE = os.path.dirname(os.path.abspath(__file__))
SIDES = {"float32": dict(dtype="float32", kv_cache_dtype="auto"), "fp8": dict(dtype="float32", kv_cache_dtype="fp8")}
SIZING = {"float32": ("float32", "auto"), "bfloat16": ("bfloat16", "auto"), "fp8": ("float32", "fp8")}


def kv_sizing(budget: int) -> dict:
    """Per KV dtype: the cache's element type, KV bytes per token (all layers) and pages per layer for `budget`."""
    from jengine.config import EngineArgs
    from jengine.loader import load_model
    from jengine.worker.model_runner import ModelRunner

    out = {}
    for label, (dtype, kv) in SIZING.items():
        cfg = EngineArgs(dtype=dtype, kv_cache_dtype=kv, kv_cache_memory_bytes=budget, max_model_len=2048,
                         compilation_cache_dir="").create_engine_config()
        runner = ModelRunner(cfg, load_model(dtype=dtype), 2048)
        tokens = runner.pages_per_layer * runner.page_size
        out[label] = {"cache_dtype": str(runner.cache_dtype), "kv_bytes_per_token": runner.kv_cache_bytes // tokens,
                      "pages_per_layer": runner.pages_per_layer, "kv_cache_bytes": runner.kv_cache_bytes}
        del runner
    return out


def child_decode(side: str, batches: list[int], steps: int, context: int) -> dict:
    from jengine import LLM

    llm = LLM(max_model_len=context + steps + 16, max_num_seqs=max(batches), max_num_batched_tokens=512,
              compilation_cache_dir="", **SIDES[side])
    core = llm.engine
    return {"cache_dtype": str(core.runner.cache_dtype), "backend": core.runner.backend,
            **median_decode_steps(core, batches, steps, context)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--context", type=int, default=256, help="prompt tokens per row before the timed decode steps")
    ap.add_argument("--budget-mib", type=int, default=256, help="KV budget for the sizing table")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "kv_cache_dtype_cpu.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.child:
        side_process.emit(child_decode(args.child, batches, args.steps, args.context))
        return
    report: dict = {"machine": platform.platform(), "cpus": os.cpu_count(), "context": args.context,
                    "budget_bytes": args.budget_mib << 20, "sizing": kv_sizing(args.budget_mib << 20), "decode_step_s": {}}
    for side in args.sides.split(","):
        report["decode_step_s"][side] = side_process.run(
            [sys.executable, __file__, "--child", side, "--batches", args.batches, "--steps", str(args.steps),
             "--context", str(args.context)])
    print(f"SmolLM2-135M KV cache for a {args.budget_mib} MiB budget")
    for label, row in report["sizing"].items():
        print(f"  {label:9s} {row['cache_dtype']:14s} {row['kv_bytes_per_token']:6d} B/token  {row['pages_per_layer']:6d} pages/layer")
    print(f"decode step, median s (SmolLM2-135M float32, {args.context}-token contexts, CPU)")
    base = report["decode_step_s"].get("float32", {})
    for side, row in report["decode_step_s"].items():
        cells = [f"batch {b}: {row[str(b)] * 1e3:7.1f} ms" + (f" ({base[str(b)] / row[str(b)]:.2f}x float32 KV)" if base else "")
                 for b in batches]
        print(f"  {side:8s} KV " + "   ".join(cells) + f"   compiles after warm-up {row['compilations_after_warmup']}")
    result_json.write(args.out, report)


if __name__ == "__main__":
    main()
