"""Synthetic offline workloads, shared by `jengine bench` and `benchmarks/throughput.py`.

A workload is fixed by its seed: prompts of random token ids (lengths uniform in a range) and output
lengths uniform in a range, generated greedily with `ignore_eos` so every request produces exactly
its output length.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np


def make_workload(n: int, input_min: int, input_max: int, output_min: int, output_max: int, vocab: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """(prompts as token-id lists, output lengths) for `n` requests."""
    rng = np.random.default_rng(seed)
    in_lens = rng.integers(input_min, input_max + 1, size=n)
    out_lens = rng.integers(output_min, output_max + 1, size=n)
    # Skip the lowest ids (special tokens in most vocabularies) so prompts are ordinary tokens.
    low = min(100, vocab // 2)
    prompts = [rng.integers(low, vocab, size=int(k)).tolist() for k in in_lens]
    return prompts, [int(x) for x in out_lens]


def run_offline(llm: Any, prompts: list[list[int]], out_lens: list[int]) -> dict[str, float]:
    """Generates the workload with `llm` and returns counts, elapsed seconds and rates."""
    from jengine.sampling_params import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=k, ignore_eos=True) for k in out_lens]
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    if produced != sum(out_lens):
        raise RuntimeError(f"generated {produced} tokens, expected {sum(out_lens)}")
    prompt_tokens = sum(map(len, prompts))
    return {
        "num_requests": len(prompts), "prompt_tokens": prompt_tokens, "output_tokens": produced, "elapsed_s": elapsed,
        "requests_per_s": len(prompts) / elapsed, "output_tokens_per_s": produced / elapsed,
        "total_tokens_per_s": (prompt_tokens + produced) / elapsed,
    }
