"""Host time on the critical path of a decode step, and how long the device waits between steps,
synchronous against asynchronous scheduling, with a model so small that the device time is small.

    python benchmarks/host_overhead.py                      # 1, 64 and 256 decode rows, both modes, 40 timed steps each
    python benchmarks/host_overhead.py --rows 1,256 --steps 100 --modes async --out benchmarks/results/host_overhead.json
    python benchmarks/host_overhead.py --workload penalties      # every row with repetition/frequency/presence penalties
    python benchmarks/host_overhead.py --workload structured     # every row under a regex (structured outputs)

A tiny Llama (2 layers, hidden 64) with random weights and SmolLM2's 49152-token vocabulary (the
default model's tokenizer) keeps the sampler's work realistic while the forward pass costs little.
For each row count R, R requests with 8-token prompts decode greedily (`ignore_eos`; `--workload`:
plain, with penalties, or constrained by a regex) until every one is in decode, then `--steps` steps
are timed piece by piece:

- schedule: `Scheduler.schedule` (which rows run, pages);
- inputs: the bucketed step inputs and sampling tensors (`ModelRunner.prepare`);
- dispatch: enqueueing forward + sample on the device (`ModelRunner.dispatch`);
- fetch: waiting for a step's sampled tokens and copying them back (`ModelRunner.fetch`);
- outputs: scheduler update, detokenization, stop checks and `RequestOutput`s.

The device's wait between consecutive steps N and N+1 is max(0, the end of N+1's dispatch - the moment
N's sampled tokens were ready), the moment taken by a watcher thread blocked on N's tokens (the
interpreter's switch interval is lowered so it records promptly). Synchronous steps make the device
wait through outputs + schedule + inputs; asynchronous ones dispatch N+1 before fetching N, so the
device waits only when the host's work per step is longer than the device's. With structured outputs
an asynchronous step's dispatch includes step N's outputs and the grammar masks (they run between
N+1's forward and its sampler), so "dispatch" there overlaps "outputs". Each (rows, mode) side runs in
its own process. Prints a table of medians and writes JSON.
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

PIECES = ("schedule", "inputs", "dispatch", "fetch", "outputs")
MODES = {"sync": False, "async": True}
WORKLOADS = ("greedy", "penalties", "structured")


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


def workload_params(workload: str, max_tokens: int):
    """Every request's sampling parameters under `workload` (greedy decoding in each)."""
    from jengine import SamplingParams
    from jengine.structured_output import StructuredOutputsParams

    extra: dict = {}
    if workload == "penalties":
        extra = dict(repetition_penalty=1.1, frequency_penalty=0.2, presence_penalty=0.1)
    elif workload == "structured":
        extra = dict(structured_outputs=StructuredOutputsParams(regex=r"[a-z ,.]+"))
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **extra)


def measure(rows: int, steps: int, max_num_batched_tokens: int, mode: str, workload: str = "greedy") -> dict:
    """Runs in a child process: times `steps` decode steps of `rows` rows, piece by piece."""
    import queue
    import threading

    from jengine import LLM
    from jengine.loader import default_model_path

    sys.setswitchinterval(1e-4)  # the watcher thread records a step's end promptly even while the host works
    folder = tiny_config_folder(tempfile.mkdtemp())
    llm = LLM(model=folder, tokenizer=default_model_path(), load_format="dummy", max_model_len=1024,
              max_num_seqs=max(rows, 8), max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=False,
              async_scheduling=MODES[mode])
    engine = llm.engine
    assert engine.async_scheduling == MODES[mode]
    times: dict[str, list[float]] = {k: [] for k in PIECES}
    dispatched: list[float] = []  # end of each step's dispatch
    ready: dict[int, float] = {}  # step index -> when its sampled tokens were ready
    pending: queue.Queue = queue.Queue()

    def watch() -> None:
        while True:
            item = pending.get()
            if item is None:
                return
            index, tokens = item
            tokens.block_until_ready()
            ready[index] = time.perf_counter()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    def timed(name: str, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times[name].append(time.perf_counter() - t0)
        return wrapper

    # Instance-level wrappers for measurement only: the classes are untouched.
    runner = engine.runner
    dispatch = runner.dispatch

    last_tokens: list = []  # the previous step's tokens
    busy: list[bool] = []  # per step: was the previous step still running when this one was dispatched?

    def dispatch_and_watch(*args, **kwargs):
        step = dispatch(*args, **kwargs)
        dispatched.append(time.perf_counter())
        busy.append(bool(last_tokens) and not last_tokens[-1].is_ready())  # a check without the watcher's timing
        last_tokens[:] = [step.tokens]
        pending.put((len(dispatched) - 1, step.tokens))
        return step

    engine.scheduler.schedule = timed("schedule", engine.scheduler.schedule)
    runner.prepare = timed("inputs", runner.prepare)
    runner.dispatch = timed("dispatch", dispatch_and_watch)
    runner.fetch = timed("fetch", runner.fetch)
    update, process = engine.scheduler.update_from_output, engine.output_processor.process
    engine.scheduler.update_from_output = timed("outputs", update)
    engine.output_processor.process = timed("outputs", process)

    params = workload_params(workload, steps + 64)
    for i in range(rows):
        engine.add_request(f"r{i}", [100 + (i * 7 + j) % 1000 for j in range(8)], params)
    while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in list(engine.scheduler.waiting) + list(engine.scheduler.running)):
        engine.step()
    for _ in range(3):  # into the steady state (asynchronous: a step in flight)
        engine.step()
    for k in times:
        times[k].clear()
    first = len(dispatched)
    walls = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - t0)
    last = len(dispatched)
    assert len(engine.scheduler.running) == rows, "every row must still be decoding"
    while engine.has_unfinished_requests() and engine._in_flight is not None and len(ready) < last:
        time.sleep(0.01)
    pending.put(None)
    watcher.join()
    gaps = [max(0.0, dispatched[i] - ready[i - 1]) * 1e3 for i in range(first, last)]
    outputs = [a + b for a, b in zip(times["outputs"][0::2], times["outputs"][1::2])]
    med = {k: statistics.median(v) * 1e3 for k, v in (("schedule", times["schedule"]), ("inputs", times["inputs"]),
                                                     ("dispatch", times["dispatch"]), ("fetch", times["fetch"]), ("outputs", outputs))}
    med["step"] = statistics.median(walls) * 1e3
    med["host_work"] = med["schedule"] + med["inputs"] + med["outputs"]
    med["device_wait"] = statistics.median(gaps)
    return {"rows": rows, "mode": mode, "workload": workload, "steps": steps, "median_ms": med,
            "device_wait_p90_ms": sorted(gaps)[int(0.9 * (len(gaps) - 1))], "device_wait_max_ms": max(gaps),
            "steps_device_never_waited": sum(g == 0.0 for g in gaps),
            "steps_dispatched_while_previous_ran": sum(busy[first:last]), "compilations_after_warmup": engine.compilations_after_warmup}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,64,256", help="comma-separated decode row counts (default 1,64,256)")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per row count (default 40)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--out", default=None, help="JSON path (default: print only)")
    ap.add_argument("--modes", default="sync,async", help="comma-separated step loops to measure (default sync,async)")
    ap.add_argument("--workload", default="greedy", choices=WORKLOADS, help="what every request asks for (default greedy)")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="sync", choices=sorted(MODES), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        side_process.emit(measure(a.child, a.steps, a.max_num_batched_tokens, a.mode, a.workload))
        return 0

    results = []
    modes = a.modes.split(",")
    for rows in [int(r) for r in a.rows.split(",")]:
        for mode in modes:
            cmd = [sys.executable, __file__, "--child", str(rows), "--mode", mode, "--steps", str(a.steps),
                   "--max-num-batched-tokens", str(a.max_num_batched_tokens), "--workload", a.workload]
            results.append(side_process.run(cmd))

    print(f"workload: {a.workload}")
    print("| rows | mode | step ms | schedule ms | inputs ms | dispatch ms | fetch ms | outputs ms | host work ms | device wait ms (median / p90) "
          "| dispatched while the previous step ran |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        m = r["median_ms"]
        print(f"| {r['rows']} | {r['mode']} | {m['step']:.2f} | {m['schedule']:.2f} | {m['inputs']:.2f} | {m['dispatch']:.2f} | "
              f"{m['fetch']:.2f} | {m['outputs']:.2f} | {m['host_work']:.2f} | {m['device_wait']:.2f} / {r['device_wait_p90_ms']:.2f} "
              f"| {r['steps_dispatched_while_previous_ran']}/{r['steps']} |")
    if a.out:
        import jax

        meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
                "load_average": os.getloadavg()}
        with open(a.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
