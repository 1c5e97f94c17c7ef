"""Offline throughput: jengine vs Hugging Face transformers `generate` on one synthetic workload.

Workload (fixed by seed): N requests, prompts of random token ids with lengths uniform in
[input_min, input_max], output lengths uniform in [output_min, output_max], `ignore_eos`, greedy.
Each side runs in its own process (two thread pools on a small machine distort each other):

    python benchmarks/throughput.py                       # jengine + HF at batch 1, 8, 32
    python benchmarks/throughput.py --sides jengine       # jengine only
    python benchmarks/throughput.py --sides jengine,jengine:reference   # attention backends A/B
    python benchmarks/throughput.py --load-format dummy --dtype bfloat16 --model /path/to/llama3-8b-config

Hugging Face runs static, left-padded batches to the longest output of each batch (as vLLM's own
`hf` baseline does), on CUDA when torch sees a GPU, in `--dtype` (float32 for `auto`), with random
weights under `--load-format dummy`; only each request's own output tokens count. Batch size 1 is slow on a CPU, so
it runs on the first `--hf-bs1-prompts` requests and its rates are measured on those. Prints a
table with requests/s, output tokens/s, total tokens/s and the ratio of jengine to the best HF
configuration; writes JSON with the machine and versions.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time



def _default_model() -> str:
    from jengine.loader import default_model_path

    return default_model_path()


def run_jengine(a: argparse.Namespace, prompts, out_lens, attention_backend: str | None) -> dict:
    from jengine import LLM
    from jengine.bench import run_offline

    t0 = time.perf_counter()
    llm = LLM(
        model=a.model, dtype=a.dtype, load_format=a.load_format, max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens, tensor_parallel_size=a.tensor_parallel_size,
        max_model_len=a.max_model_len, enable_prefix_caching=False, attention_backend=attention_backend,
    )
    startup = time.perf_counter() - t0
    result = run_offline(llm, prompts, out_lens)
    result.update(side=a.side, attention_backend=llm.engine.runner.backend, startup_s=startup, compilations_after_warmup=llm.engine.compilations_after_warmup)
    return result


def run_hf(a: argparse.Namespace, prompts, out_lens, batch_size: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads or os.cpu_count() or 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, a.dtype) if a.dtype != "auto" else torch.float32
    path = a.model
    if a.load_format == "dummy":  # random weights of the checkpoint's shapes, as jengine's dummy format
        from transformers import AutoConfig

        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    elif path.endswith(".gguf"):
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.to(device).eval()
    if batch_size == 1:
        prompts, out_lens = prompts[: a.hf_bs1_prompts], out_lens[: a.hf_bs1_prompts]
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    t0 = time.perf_counter()
    produced = 0
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            batch, lens = prompts[i:i + batch_size], out_lens[i:i + batch_size]
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, p in enumerate(batch):
                ids[r, width - len(p):] = torch.tensor(p)
                mask[r, width - len(p):] = 1
            new = max(lens)
            model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                           max_new_tokens=new, min_new_tokens=new, pad_token_id=pad)
            produced += sum(lens)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return {"side": f"hf_bs{batch_size}", "elapsed_s": elapsed, "num_requests": len(prompts),
            "prompt_tokens": sum(map(len, prompts)), "output_tokens": produced}


def _rates(r: dict) -> dict:
    e = r["elapsed_s"]
    r["requests_per_s"] = r["num_requests"] / e
    r["output_tokens_per_s"] = r["output_tokens"] / e
    r["total_tokens_per_s"] = (r["prompt_tokens"] + r["output_tokens"]) / e
    return r


def _child(a: argparse.Namespace) -> None:
    vocab = a.vocab_size
    from jengine.bench import make_workload

    prompts, out_lens = make_workload(a.num_prompts, a.input_min, a.input_max, a.output_min, a.output_max, vocab, a.seed)
    if a.side.startswith("jengine"):  # "jengine" or "jengine:<attention backend>"
        result = run_jengine(a, prompts, out_lens, a.side.partition(":")[2] or None)
    else:
        result = run_hf(a, prompts, out_lens, int(a.side.removeprefix("hf_bs")))
    with open(a.result_file, "w") as f:
        json.dump(_rates(result), f)


def _vocab_size(model: str) -> int:
    if model.endswith(".gguf"):
        from jengine.loader.gguf_format import GGUFCheckpoint

        return GGUFCheckpoint(model).config().vocab_size
    from jengine.loader import read_hf_config

    return read_hf_config(model).vocab_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--input-min", type=int, default=16)
    p.add_argument("--input-max", type=int, default=512)
    p.add_argument("--output-min", type=int, default=16)
    p.add_argument("--output-max", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sides", default="jengine,hf_bs1,hf_bs8,hf_bs32")
    p.add_argument("--hf-bs1-prompts", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="runs per side; medians are reported")
    p.add_argument("--glibc-tunables", default="glibc.malloc.hugetlb=1",
                   help="GLIBC_TUNABLES for every side's process (default: transparent huge pages for large "
                        "allocations, as `make serve` deploys jengine); '' leaves the environment as it is")
    p.add_argument("--out", default="benchmarks/results/throughput.json")
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    p.add_argument("--vocab-size", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    a.model = a.model or _default_model()
    if a.side:
        _child(a)
        return

    vocab = _vocab_size(a.model)
    results = {}
    for side in a.sides.split(","):
        runs = []
        for _ in range(a.repeats):
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
                path = tmp.name
            cmd = [sys.executable, __file__, "--side", side, "--result-file", path, "--vocab-size", str(vocab)] + [
                arg for arg in sys.argv[1:]
            ]
            env = dict(os.environ, GLIBC_TUNABLES=a.glibc_tunables) if a.glibc_tunables else None
            subprocess.run(cmd, check=True, env=env)
            with open(path) as f:
                runs.append(json.load(f))
            os.unlink(path)
        med = sorted(runs, key=lambda r: r["output_tokens_per_s"])[len(runs) // 2]
        med["repeats"] = [r["output_tokens_per_s"] for r in runs]
        results[side] = med
        print(f"{side}: {med['output_tokens_per_s']:.1f} output tok/s", flush=True)

    hf = [r for k, r in results.items() if k.startswith("hf")]
    best = max(hf, key=lambda r: r["output_tokens_per_s"]) if hf else None
    print()
    print(f"{'side':<10} {'requests':>8} {'req/s':>8} {'out tok/s':>10} {'total tok/s':>12} {'elapsed s':>10} {'vs best HF':>10}")
    for side, r in results.items():
        ratio = f"{r['output_tokens_per_s'] / best['output_tokens_per_s']:.2f}x" if best else "-"
        print(f"{side:<10} {r['num_requests']:>8} {r['requests_per_s']:>8.2f} {r['output_tokens_per_s']:>10.1f} {r['total_tokens_per_s']:>12.1f} {r['elapsed_s']:>10.1f} {ratio:>10}")
    import jax

    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "jax_backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind},
        "versions": {"python": platform.python_version(), "jax": jax.__version__},
        "workload": {k: getattr(a, k) for k in ("model", "num_prompts", "input_min", "input_max", "output_min", "output_max", "seed", "dtype", "load_format")},
        "environment": {"GLIBC_TUNABLES": a.glibc_tunables or os.environ.get("GLIBC_TUNABLES", "")},
        "results": results,
        "best_hf": best["side"] if best else None,
        "ratio_vs_best_hf": (results["jengine"]["output_tokens_per_s"] / best["output_tokens_per_s"]) if best and "jengine" in results else None,
    }
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
