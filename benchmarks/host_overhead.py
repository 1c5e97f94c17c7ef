"""Host time on the critical path of a decode step, with a model so small that the device time is small.

    python benchmarks/host_overhead.py                      # 1, 64 and 256 decode rows, 40 timed steps each
    python benchmarks/host_overhead.py --rows 1,256 --steps 100 --out benchmarks/results/host_overhead.json

A tiny Llama (2 layers, hidden 64) with random weights and SmolLM2's 49152-token vocabulary (the
default model's tokenizer) keeps the sampler's work realistic while the forward pass costs little.
For each row count R, R requests with 8-token prompts decode greedily (`ignore_eos`) until every one
is in decode, then `--steps` steps are timed piece by piece:

- schedule: `Scheduler.schedule` (which rows run, pages);
- inputs: the bucketed step inputs and sampling tensors (`ModelRunner.prepare`);
- device: dispatch, forward + sample, and the copy of the sampled tokens back (`ModelRunner.run`);
- outputs: scheduler update, detokenization, stop checks and `RequestOutput`s.

Today's step is synchronous, so the device waits through schedule + inputs + outputs between two
steps: that sum is the gap the asynchronous step loop (issue: step v2) must hide. Each row count
runs in its own process. Prints a table of medians and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import side_process  # benchmarks/side_process.py: the script's folder is on sys.path

PIECES = ("schedule", "inputs", "device", "outputs")


def tiny_config_folder(root: str) -> str:
    """A Llama config (no weights) with SmolLM2's vocabulary size, for `load_format="dummy"`."""
    folder = os.path.join(root, "tiny-llama")
    os.makedirs(folder, exist_ok=True)
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
        "eos_token_id": 2, "bos_token_id": 1,
    }
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    return folder


def measure(rows: int, steps: int, max_num_batched_tokens: int) -> dict:
    """Runs in a child process: times `steps` decode steps of `rows` rows, piece by piece."""
    from jengine import LLM, SamplingParams
    from jengine.loader import default_model_path

    folder = tiny_config_folder(tempfile.mkdtemp())
    llm = LLM(model=folder, tokenizer=default_model_path(), load_format="dummy", max_model_len=1024,
              max_num_seqs=max(rows, 8), max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=False)
    engine = llm.engine
    times: dict[str, list[float]] = {k: [] for k in PIECES}

    def timed(name: str, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times[name].append(time.perf_counter() - t0)
        return wrapper

    # Instance-level wrappers for measurement only: the classes are untouched.
    engine.scheduler.schedule = timed("schedule", engine.scheduler.schedule)
    engine.runner.prepare = timed("inputs", engine.runner.prepare)
    engine.runner.run = timed("device", engine.runner.run)
    update, process = engine.scheduler.update_from_output, engine.output_processor.process
    engine.scheduler.update_from_output = timed("outputs", update)
    engine.output_processor.process = timed("outputs", process)

    params = SamplingParams(temperature=0.0, max_tokens=steps + 64, ignore_eos=True)
    for i in range(rows):
        engine.add_request(f"r{i}", [100 + (i * 7 + j) % 1000 for j in range(8)], params)
    while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in list(engine.scheduler.waiting) + list(engine.scheduler.running)):
        engine.step()
    for k in times:
        times[k].clear()
    walls = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - t0)
    assert len(engine.scheduler.running) == rows, "every row must still be decoding"
    outputs = [a + b for a, b in zip(times["outputs"][0::2], times["outputs"][1::2])]
    med = {k: statistics.median(v) * 1e3 for k, v in (("schedule", times["schedule"]), ("inputs", times["inputs"]),
                                                     ("device", times["device"]), ("outputs", outputs))}
    med["step"] = statistics.median(walls) * 1e3
    med["host_gap"] = med["schedule"] + med["inputs"] + med["outputs"]
    return {"rows": rows, "steps": steps, "median_ms": med, "compilations_after_warmup": engine.compilations_after_warmup}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,64,256", help="comma-separated decode row counts (default 1,64,256)")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per row count (default 40)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--out", default=None, help="JSON path (default: print only)")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        side_process.emit(measure(a.child, a.steps, a.max_num_batched_tokens))
        return 0

    results = []
    for rows in [int(r) for r in a.rows.split(",")]:
        cmd = [sys.executable, __file__, "--child", str(rows), "--steps", str(a.steps), "--max-num-batched-tokens", str(a.max_num_batched_tokens)]
        results.append(side_process.run(cmd))

    print("| rows | step ms | schedule ms | inputs ms | device ms | outputs ms | host gap ms (device idle) | gap share |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        m = r["median_ms"]
        print(f"| {r['rows']} | {m['step']:.2f} | {m['schedule']:.2f} | {m['inputs']:.2f} | {m['device']:.2f} | "
              f"{m['outputs']:.2f} | {m['host_gap']:.2f} | {m['host_gap'] / m['step']:.0%} |")
    if a.out:
        import jax

        meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__, "mode": "synchronous"}
        with open(a.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
