"""The timed part the decode-step benchmarks share (`quantization.py`, `kv_cache_dtype.py`).

    median_decode_steps(core, batches, steps, prompt_len) -> {"1": s, "64": s, ..., "compilations_after_warmup": n}

For each batch size: `batch` greedy rows of `prompt_len` tokens are prefilled untimed, then `steps`
decode steps are timed one by one (the median is kept), then the rows run to their end.
"""
from __future__ import annotations

import statistics
import time
from typing import Any


def median_decode_steps(core: Any, batches: list[int], steps: int, prompt_len: int) -> dict[str, Any]:
    """Median seconds of one decode step of `core` (an `EngineCore`) at each batch size."""
    from jengine import SamplingParams

    result: dict[str, Any] = {}
    for b in batches:
        params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)
        for i in range(b):
            core.add_request(f"{b}-{i}", [1 + (7 * i + j) % 4000 for j in range(prompt_len)], params)
        while len(core.scheduler.waiting) or any(r.num_computed_tokens < len(r.prompt_token_ids) for r in core.scheduler.running):
            core.step()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            core.step()
            times.append(time.perf_counter() - t0)
        while core.has_unfinished_requests():
            core.step()
        result[str(b)] = statistics.median(times)
    result["compilations_after_warmup"] = core.compilations_after_warmup
    return result
