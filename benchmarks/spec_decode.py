"""Speculative decoding (n-gram drafts, optionally a draft model) against plain decoding, single stream, on the default model.

    python benchmarks/spec_decode.py                         # SmolLM2-135M float32, k = 3
    python benchmarks/spec_decode.py --num-speculative-tokens 4 --out benchmarks/results/spec_decode_cpu.json
    python benchmarks/spec_decode.py --draft-layers 6         # adds a draft_model side: SmolLM2's first 6 layers
    python benchmarks/spec_decode.py --draft-model PATH       # adds a draft_model side with a checkpoint of SmolLM2's vocabulary

Two prompt sets, each request run alone (one stream), greedy, at most `--max-tokens` tokens:
- copy-heavy: chat prompts that ask the model to repeat, edit or continue a given text or code, so the
  answer reproduces spans of the prompt (what prompt-lookup drafts are for); each ends at EOS;
- random: prompts of random token ids, run to `--max-tokens` (`ignore_eos`); drafts match only when
  the model starts repeating itself (speculation must back off when they fail and cost next to nothing).
No smaller model with SmolLM2's vocabulary is installed, so `--draft-layers N` builds one: SmolLM2
truncated to its first N decoder layers (same embeddings, final norm and LM head; an untrained
early-exit draft, saved as float32 safetensors under ~/.cache/jengine/bench-drafts by Hugging Face
transformers from the same GGUF). Each side (plain, ngram, draft_model) runs in its own process, one after the other. Time per output token is the
request's time after its first token divided by the tokens after the first. Prints a table with the
median per set, the ratio plain / ngram (above 1 means speculation is faster) and the acceptance
rate; writes JSON. Greedy outputs of both sides must be identical (checked).
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

TEXT = (
    "The paged KV cache stores the keys and values of every request in fixed-size pages. A block table maps "
    "each sequence to its pages, so sequences can grow without copying and share the pages of a common prefix."
)
CODE = (
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "def factorial(n):\n    result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result\n"
)
COPY_HEAVY = [
    f"Repeat the following text exactly, word for word:\n\n{TEXT}",
    f"Rewrite this code with type hints added, keeping everything else the same:\n\n{CODE}",
    f"Copy this paragraph and replace the word 'pages' with 'blocks':\n\n{TEXT}",
    f"Here is some code:\n\n{CODE}\nPrint the code again unchanged.",
]


def truncated_draft(num_layers: int) -> str:
    """SmolLM2-135M cut to its first `num_layers` decoder layers, written once as a safetensors checkpoint."""
    out = os.path.join(os.path.expanduser("~"), ".cache", "jengine", "bench-drafts", f"smollm2-135m-first{num_layers}")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    import torch
    from transformers import AutoModelForCausalLM

    from jengine.loader import default_model_path

    gguf = default_model_path()
    full = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32)
    config = full.config
    config.num_hidden_layers = num_layers
    if hasattr(config, "quantization_config"):  # the GGUF's dequantized weights are plain float32 now
        del config.quantization_config
    draft = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, _ = draft.load_state_dict(full.state_dict(), strict=False)  # keys of layers >= num_layers are left over
    assert not missing, missing
    draft.save_pretrained(out, safe_serialization=True)
    return out


def run_side(side: str, k: int, max_tokens: int, num_random: int, draft: str | None = None) -> dict:
    import numpy as np

    from jengine import LLM, SamplingParams

    spec = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 1, "prompt_lookup_max": 4} if side == "ngram" else None
    if side == "draft_model":
        spec = {"method": "draft_model", "model": draft, "num_speculative_tokens": k}
    llm = LLM(max_model_len=1024, max_num_seqs=4, max_num_batched_tokens=256, speculative_config=spec)
    tok = llm.get_tokenizer()
    sets = {
        "copy-heavy": [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True),
                                  add_special_tokens=False) for p in COPY_HEAVY],
        "random": [np.random.default_rng(i).integers(100, 49000, size=200).tolist() for i in range(num_random)],
    }
    result: dict = {"side": side, "sets": {}}
    for name, prompts in sets.items():
        # Chat answers end at EOS as they would in use; random prompts have no answer to end, so they run to max_tokens.
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=name == "random")
        tpots, outputs = [], []
        before = dict(vars(llm.engine.speculator.stats)) if llm.engine.speculator else None
        for ids in prompts:
            ids = list(ids)
            first = None
            engine = llm.engine
            engine.add_request("r", ids, params)
            tokens: list[int] = []
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if first is None and out.outputs[0].token_ids:
                        first = time.perf_counter()
                    tokens = out.outputs[0].token_ids
            end = time.perf_counter()
            tpots.append((end - first) / max(len(tokens) - 1, 1))
            outputs.append(list(tokens))
        entry = {"tpot_ms": [t * 1e3 for t in tpots], "median_tpot_ms": statistics.median(tpots) * 1e3, "outputs": outputs}
        if before is not None:
            stats = vars(llm.engine.speculator.stats)
            drafted = stats["num_draft_tokens"] - before["num_draft_tokens"]
            accepted = stats["num_accepted_tokens"] - before["num_accepted_tokens"]
            entry.update(draft_tokens=drafted, accepted_tokens=accepted, acceptance_rate=accepted / drafted if drafted else 0.0)
        result["sets"][name] = entry
    result["compilations_after_warmup"] = llm.engine.compilations_after_warmup
    if side == "draft_model":
        result["draft_seconds"] = llm.engine.speculator.draft.propose_seconds  # host + device time of the draft passes
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-speculative-tokens", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--num-random", type=int, default=4)
    ap.add_argument("--draft-model", default=None, help="add a draft_model side with this checkpoint (SmolLM2's vocabulary)")
    ap.add_argument("--draft-layers", type=int, default=None, help="add a draft_model side: SmolLM2's first N layers")
    ap.add_argument("--out", default=None)
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    draft = a.draft_model or (truncated_draft(a.draft_layers) if a.draft_layers else None)
    if a.side:
        side_process.emit(run_side(a.side, a.num_speculative_tokens, a.max_tokens, a.num_random, draft))
        return 0
    sides = {}
    for side in ("plain", "ngram") + (("draft_model",) if draft else ()):
        cmd = [sys.executable, __file__, "--side", side, "--num-speculative-tokens", str(a.num_speculative_tokens),
               "--max-tokens", str(a.max_tokens), "--num-random", str(a.num_random)] + (["--draft-model", draft] if draft else [])
        sides[side] = side_process.run(cmd)
    print(f"| prompt set | plain ms/token | side (k={a.num_speculative_tokens}) | ms/token | speed-up | acceptance rate | same greedy output |")
    print("|---|---|---|---|---|---|---|")
    for name in sides["plain"]["sets"]:
        p = sides["plain"]["sets"][name]
        for side in [s for s in sides if s != "plain"]:
            n = sides[side]["sets"][name]
            same = p["outputs"] == n["outputs"]
            print(f"| {name} | {p['median_tpot_ms']:.1f} | {side} | {n['median_tpot_ms']:.1f} | {p['median_tpot_ms'] / n['median_tpot_ms']:.2f}x | "
                  f"{n['acceptance_rate']:.0%} | {'yes' if same else 'NO'} |")
    if a.out:
        import jax

        meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                "jax": jax.__version__, "model": "SmolLM2-135M-Instruct float32", "max_tokens": a.max_tokens, "draft_model": draft}
        with open(a.out, "w") as f:
            json.dump({"meta": meta, "sides": sides}, f, indent=1)
    return 0 if all(sides["plain"]["sets"][k]["outputs"] == sides[s]["sets"][k]["outputs"] for s in sides for k in sides["plain"]["sets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
