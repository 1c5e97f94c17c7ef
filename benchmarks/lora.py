"""Multi-LoRA offline throughput: requests spread over 4 adapters against the base model alone.

    python benchmarks/lora.py                                  # SmolLM2-135M, 4 adapters of rank 8, slots of rank 16
    python benchmarks/lora.py --num-prompts 64 --out benchmarks/results/lora_cpu.json

The workload is the throughput benchmark's (`jengine.bench.make_workload`: random prompts, uniform
input and output lengths, greedy, `ignore_eos`), shortened by default so that both sides finish in a
few minutes on a 2-core CPU. Sides, each in its own process, one after the other:
- base: the engine without LoRA (`enable_lora=False`);
- lora: `enable_lora=True, max_loras=4, max_lora_rank=16`, request i running adapter i % 4;
- lora-base (with `--sides`): LoRA enabled, every request on the base model (the cost of the slots alone).
With `--repeats 2` the sides run base, lora, lora, base (each run a fresh process) and the table gives
each side's mean, so load from other work on a shared machine falls on both sides alike.
The adapters are PEFT folders written here with random A and B (rank `--rank`, every attention and
MLP projection), so they change the output like trained ones. Prints a table (output tokens/s, ratio
to base) and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import side_process  # benchmarks/side_process.py: the script's folder is on sys.path

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapters(model: str, root: str, count: int, rank: int) -> list[str]:
    """PEFT folders with random A/B for every projection of `model` (shapes from its family)."""
    import numpy as np
    from safetensors.numpy import save_file

    from jengine.loader import load_model
    from jengine.lora.peft import lora_targets
    from jengine.models import get_model_class

    cfg = load_model(model, load_format="dummy").config  # the shapes only (random weights load fast)
    targets = lora_targets(get_model_class(cfg.architecture), cfg)
    paths = []
    for n in range(count):
        rng = np.random.default_rng(n)
        tensors = {}
        for t in targets.values():
            for i in range(cfg.num_layers):
                key = f"base_model.model.{t.template.format(i=i)}"
                tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, t.in_features)) / np.sqrt(t.in_features)).astype(np.float32)
                tensors[f"{key}.lora_B.weight"] = (0.05 * rng.standard_normal((t.out_features, rank))).astype(np.float32)
        path = os.path.join(root, f"adapter{n}")
        os.makedirs(path, exist_ok=True)
        save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(MODULES)}, f)
        paths.append(path)
    return paths


def run_side(a: argparse.Namespace) -> dict:
    from jengine import LLM, LoRARequest
    from jengine.bench import make_workload, run_offline

    lora = a.side != "base"
    t0 = time.perf_counter()
    llm = LLM(model=a.model, max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens, max_model_len=a.max_model_len,
              enable_prefix_caching=False, **(dict(enable_lora=True, max_loras=4, max_lora_rank=a.max_lora_rank) if lora else {}))
    startup = time.perf_counter() - t0
    prompts, out_lens = make_workload(a.num_prompts, a.input_min, a.input_max, a.output_min, a.output_max, llm.engine.vocab_size, a.seed)
    if a.side == "lora":
        adapters = [LoRARequest(f"adapter{i}", i + 1, p) for i, p in enumerate(json.loads(a.adapters))]
        requests = [adapters[i % len(adapters)] for i in range(len(prompts))]
        generate = llm.generate
        llm.generate = lambda items, params, use_tqdm: generate(items, params, use_tqdm=use_tqdm, lora_request=requests)
    result = run_offline(llm, prompts, out_lens)
    result.update(side=a.side, startup_s=startup, compilations_after_warmup=llm.engine.compilations_after_warmup)
    if lora:
        result["slot_loads"] = llm.engine.runner.lora.loads
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--num-prompts", type=int, default=48)
    p.add_argument("--input-min", type=int, default=16)
    p.add_argument("--input-max", type=int, default=256)
    p.add_argument("--output-min", type=int, default=16)
    p.add_argument("--output-max", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=384)
    p.add_argument("--sides", default="base,lora")
    p.add_argument("--repeats", type=int, default=1, help="runs per side, in mirrored order (ABBA...); means are reported")
    p.add_argument("--out", default="benchmarks/results/lora_cpu.json")
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--adapters", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.model is None:
        from jengine.loader import default_model_path

        a.model = default_model_path()
    if a.side:
        side_process.emit(run_side(a))
        return 0
    with tempfile.TemporaryDirectory() as root:
        adapters = write_adapters(a.model, root, 4, a.rank)
        sides = a.sides.split(",")
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        for rep in range(a.repeats):
            for side in sides if rep % 2 == 0 else sides[::-1]:
                cmd = [sys.executable, __file__, "--side", side, "--adapters", json.dumps(adapters)] + [
                    f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
                    if k not in ("side", "adapters", "sides", "out", "repeats") and v is not None]
                runs[side].append(side_process.run(cmd))
    results = {}
    for side, rs in runs.items():  # the mean over runs (two runs per side have no middle one)
        results[side] = {**rs[0], "runs_output_tokens_per_s": [r["output_tokens_per_s"] for r in rs],
                         "output_tokens_per_s": sum(r["output_tokens_per_s"] for r in rs) / len(rs),
                         "total_tokens_per_s": sum(r["total_tokens_per_s"] for r in rs) / len(rs),
                         "compilations_after_warmup": max(r["compilations_after_warmup"] for r in rs)}
    base = results.get("base", {}).get("output_tokens_per_s")
    print("| side | requests | output tok/s (mean) | each run | total tok/s | vs base | compilations after warm-up |")
    print("|---|---|---|---|---|---|---|")
    for side, r in results.items():
        ratio = f"{r['output_tokens_per_s'] / base:.2f}x" if base else "-"
        each = ", ".join(f"{x:.1f}" for x in r["runs_output_tokens_per_s"])
        print(f"| {side} | {r['num_requests']} | {r['output_tokens_per_s']:.1f} | {each} | {r['total_tokens_per_s']:.1f} | {ratio} | "
              f"{r['compilations_after_warmup']} |")
    if a.out:
        import jax

        meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                "jax": jax.__version__, "model": os.path.basename(a.model), "load_average": os.getloadavg(),
                "args": {k: v for k, v in vars(a).items() if k not in ("side", "adapters")}}
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
