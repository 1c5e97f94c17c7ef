"""Structured outputs: what constraining every request with a JSON schema costs, on the default model.

    python benchmarks/structured_output.py --out benchmarks/results/structured_output_cpu.json

Throughput: the same batch of chat requests (SmolLM2-135M float32, all submitted at once, each
`--max-tokens` long) unconstrained and with every request constrained by a typical schema (10
properties, a nested object, enums; its last field a long string, so constrained answers also run to
`--max-tokens`). Each side runs in its own process, one after the other; output tokens per second
and their ratio (target: at least 0.85x).

Time to first token: one request alone, unconstrained, with a schema never seen (compiled on
arrival; each run a new variant, so nothing is cached) and with a schema seen before (the compiled
grammar comes from the cache): the medians and the difference to unconstrained (target: the cached
schema adds under 5 ms). The llguidance tokenizer is built by a first constrained request before any
timing (once per engine; reported on its own), and the grammar compile time is also timed directly.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import side_process  # benchmarks/side_process.py: the script's folder is on sys.path


def schema(variant: int = 0) -> dict:
    """The typical schema: 10 properties, a nested object, enums; `variant` changes it (a cache miss)."""
    return {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0},
            "name": {"type": "string", "maxLength": 24},
            "email": {"type": "string", "maxLength": 32},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["admin", "user", "guest", f"tier{variant}"]},
            "active": {"type": "boolean"},
            "score": {"type": "number"},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
            "address": {"type": "object", "properties": {"street": {"type": "string", "maxLength": 24}, "city": {"type": "string", "maxLength": 16},
                                                         "country": {"enum": ["FR", "DE", "IT", "ES"]}},
                        "required": ["street", "city", "country"], "additionalProperties": False},
            "notes": {"type": "string", "minLength": 2000},
        },
        "required": ["id", "name", "email", "age", "role", "active", "score", "tags", "address", "notes"],
        "additionalProperties": False,
    }


PROMPT = "Describe a user of our web service as a JSON record with an id, name, email, age, role, address and notes."


def run_side(side: str, num_requests: int, max_tokens: int, ttft_runs: int) -> dict:
    from jengine import LLM, SamplingParams, StructuredOutputsParams

    llm = LLM(max_model_len=512, max_num_seqs=num_requests, max_num_batched_tokens=256)
    engine = llm.engine
    tok = llm.get_tokenizer()
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True), add_special_tokens=False)
    constrained = side == "constrained"
    result: dict = {"side": side}

    def params(so: object = None, **kw: object) -> SamplingParams:
        return SamplingParams(temperature=0.8, seed=kw.pop("seed", 0), max_tokens=kw.pop("max_tokens", max_tokens), ignore_eos=so is None,
                              structured_outputs=so, **kw)

    def run(batch: list[SamplingParams]) -> tuple[float, float, list]:
        """(seconds to the first token of the first request, seconds to the end, finished outputs)."""
        start = time.perf_counter()
        for i, p in enumerate(batch):
            engine.add_request(f"r{i}-{start}", ids, p)
        first, finals = None, []
        while engine.has_unfinished_requests():
            for out in engine.step():
                if first is None and out.outputs[0].token_ids:
                    first = time.perf_counter() - start
                if out.finished:
                    finals.append(out)
        return first or 0.0, time.perf_counter() - start, finals

    if constrained:
        t = time.perf_counter()
        run([params(StructuredOutputsParams(json=schema(-1)), max_tokens=2)])  # builds the llguidance tokenizer
        result["tokenizer_and_first_compile_s"] = time.perf_counter() - t
    run([params(None, max_tokens=4)])  # warm the step path once
    so = StructuredOutputsParams(json=schema(0)) if constrained else None
    _, elapsed, finals = run([params(so, seed=i) for i in range(num_requests)])
    tokens = sum(len(o.outputs[0].token_ids) for o in finals)
    result.update(output_tokens=tokens, elapsed_s=elapsed, output_tokens_per_s=tokens / elapsed,
                  finish_reasons=sorted({o.outputs[0].finish_reason for o in finals}))
    if constrained:
        bad = 0
        for o in finals:  # a cut answer is a valid JSON prefix: check the start and the fields written so far
            bad += not o.outputs[0].text.startswith('{"id": ')
        result["answers_not_starting_as_the_schema_says"] = bad
        # Time to first token of one request alone: unconstrained, uncached schema, cached schema.
        ttft: dict[str, list[float]] = {"unconstrained": [], "uncached": [], "cached": []}
        compile_ms: dict[str, list[float]] = {"uncached": [], "cached": []}
        compiler = engine.structured_output.compiler
        for r in range(ttft_runs):
            ttft["unconstrained"].append(run([params(None, max_tokens=1)])[0])
            ttft["uncached"].append(run([params(StructuredOutputsParams(json=schema(1000 + r)), max_tokens=1)])[0])
            ttft["cached"].append(run([params(StructuredOutputsParams(json=schema(0)), max_tokens=1)])[0])
            t = time.perf_counter()
            compiler.compile(StructuredOutputsParams(json=schema(5000 + r)))
            compile_ms["uncached"].append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            compiler.compile(StructuredOutputsParams(json=schema(0)))
            compile_ms["cached"].append((time.perf_counter() - t) * 1e3)
        base = statistics.median(ttft["unconstrained"])
        result["ttft_ms"] = {k: statistics.median(v) * 1e3 for k, v in ttft.items()}
        result["ttft_added_ms"] = {k: (statistics.median(ttft[k]) - base) * 1e3 for k in ("uncached", "cached")}
        result["compile_ms"] = {k: statistics.median(v) for k, v in compile_ms.items()}
    result["compilations_after_warmup"] = engine.compilations_after_warmup
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--ttft-runs", type=int, default=7)
    ap.add_argument("--out", default=None)
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        side_process.emit(run_side(a.side, a.num_requests, a.max_tokens, a.ttft_runs))
        return 0
    sides = {}
    for side in ("unconstrained", "constrained"):
        cmd = [sys.executable, __file__, "--side", side, "--num-requests", str(a.num_requests), "--max-tokens", str(a.max_tokens),
               "--ttft-runs", str(a.ttft_runs)]
        sides[side] = side_process.run(cmd)
    u, c = sides["unconstrained"], sides["constrained"]
    ratio = c["output_tokens_per_s"] / u["output_tokens_per_s"]
    print(f"| {a.num_requests} requests x {a.max_tokens} tokens | output tokens | seconds | output tok/s |")
    print("|---|---|---|---|")
    for name, s in sides.items():
        print(f"| {name} | {s['output_tokens']} | {s['elapsed_s']:.1f} | {s['output_tokens_per_s']:.1f} |")
    print(f"\nconstrained / unconstrained throughput: {ratio:.2f}x (target >= 0.85x)\n")
    print("| time to first token, one request | median ms | added vs unconstrained (ms) | grammar compile (ms) |")
    print("|---|---|---|---|")
    print(f"| unconstrained | {c['ttft_ms']['unconstrained']:.1f} | - | - |")
    for k in ("uncached", "cached"):
        print(f"| schema {k} | {c['ttft_ms'][k]:.1f} | {c['ttft_added_ms'][k]:+.1f} | {c['compile_ms'][k]:.2f} |")
    print(f"\nllguidance tokenizer + first compile (once per engine): {c['tokenizer_and_first_compile_s']:.2f} s; "
          f"compilations after warm-up: {u['compilations_after_warmup']} / {c['compilations_after_warmup']}")
    if a.out:
        import jax

        meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                "jax": jax.__version__, "model": "SmolLM2-135M-Instruct float32", "num_requests": a.num_requests, "max_tokens": a.max_tokens,
                "load_average_after": os.getloadavg()}
        with open(a.out, "w") as f:
            json.dump({"meta": meta, "throughput_ratio": ratio, "sides": sides}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
