"""MoE step cost on the CPU: a tiny Mixtral-shaped model against a dense one with the same active parameters.

    python benchmarks/moe.py                               # table + benchmarks/results/moe_cpu.json
    python benchmarks/moe.py --repeats 20 --out /tmp/moe.json

The MoE model has 8 experts, top-2, each expert's FFN `F` wide; the dense model is the same Llama
block with one FFN `2F` wide, so both do the same multiply-adds per token (the router's H x 8 aside).
Both run the same jitted forward + logits over a paged cache with random weights (`load_format
"dummy"`), for decode steps (R rows, one new token each, 64 tokens of context) and a prefill step
(one 256-token prompt). A third row runs the MoE experts through `jax.lax.ragged_dot`, whose CPU
lowering multiplies every expert with every row and masks: what the blocked grouped matmul avoids.
Timings are medians of `--repeats` runs, the three models interleaved; the ratio column is MoE over dense.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

H, LAYERS, HEADS, KV_HEADS, VOCAB, EXPERTS, TOP_K = 256, 4, 8, 2, 2048, 8, 2


def config_folder(root: str, moe: bool, ffn: int) -> str:
    """A config.json (no weights) for `load_format="dummy"`."""
    cfg = {
        "model_type": "mixtral" if moe else "llama", "architectures": ["MixtralForCausalLM" if moe else "LlamaForCausalLM"],
        "vocab_size": VOCAB, "hidden_size": H, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "intermediate_size": ffn,
    }
    if moe:
        cfg.update(num_local_experts=EXPERTS, num_experts_per_tok=TOP_K)
    folder = os.path.join(root, "moe" if moe else "dense")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    return folder


def step_fn(model, rows: list[tuple[int, int]], page_size: int = 16):
    """A jitted forward + logits for `rows` = [(context, new tokens)], and its arguments."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jengine.attention import AttentionMetadata
    from jengine.pallas_kernels import new_kv_cache

    cfg = model.config
    per_seq = max((c + n + page_size - 1) // page_size for c, n in rows)
    pages_per_layer = 1 + per_seq * len(rows)
    cache = new_kv_cache(cfg.num_layers * pages_per_layer, page_size, cfg.num_kv_heads, cfg.head_dim, model.dtype)
    ids, pos, slots, qsl, lens = [], [], [], [0], []
    tables = np.zeros((len(rows), per_seq), np.int32)
    for r, (ctx, new) in enumerate(rows):
        pages = [1 + r * per_seq + i for i in range(per_seq)]
        tables[r] = pages
        for p in range(ctx, ctx + new):
            pos.append(p)
            slots.append(pages[p // page_size] * page_size + p % page_size)
        ids += [(7 * r + i) % VOCAB for i in range(new)]
        qsl.append(len(ids))
        lens.append(ctx + new)
    md = AttentionMetadata(
        slot_mapping=jnp.asarray(slots, jnp.int32), seq_lens=jnp.asarray(lens, jnp.int32), block_tables=jnp.asarray(tables),
        query_start_loc=jnp.asarray(qsl, jnp.int32), num_seqs=jnp.asarray([len(rows)], jnp.int32),
        pages_per_layer=pages_per_layer, page_size=page_size,
    )
    graphdef, state = nnx.split(model)
    last = jnp.asarray(qsl[1:], jnp.int32) - 1

    @jax.jit
    def step(state, cache, ids, pos, md):
        m = nnx.merge(graphdef, state)
        cache, hidden = m(cache, ids, pos, md)
        return m.compute_logits(hidden[last])

    args = (state, cache, jnp.asarray(ids, jnp.int32), jnp.asarray(pos, jnp.int32), md)
    step(*args).block_until_ready()  # compile
    return step, args


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ffn", type=int, default=512, help="each expert's FFN width (dense: twice this)")
    ap.add_argument("--decode-rows", default="1,8", help="decode batch sizes")
    ap.add_argument("--prefill", type=int, default=256, help="prefill prompt length")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "moe_cpu.json"))
    args = ap.parse_args()

    import jax

    from jengine.loader import load_model

    root = tempfile.mkdtemp()
    dense = load_model(config_folder(root, False, 2 * args.ffn), load_format="dummy", dtype="float32").model
    moe = load_model(config_folder(root, True, args.ffn), load_format="dummy", dtype="float32").model
    ragged = load_model(config_folder(root, True, args.ffn), load_format="dummy", dtype="float32").model
    ragged.grouped_matmul = "ragged"
    models = {"dense": dense, "moe": moe, "moe_ragged_dot": ragged}
    cases = {f"decode x{r}": [(64, 1)] * r for r in map(int, args.decode_rows.split(","))}
    cases[f"prefill {args.prefill}"] = [(0, args.prefill)]

    results = []
    for case, rows in cases.items():
        steps = {name: step_fn(m, rows) for name, m in models.items()}
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(args.repeats):
            for name, (fn, a) in steps.items():
                t0 = time.perf_counter()
                fn(*a).block_until_ready()
                times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        results.append({"case": case, "tokens": sum(n for _, n in rows), **{f"{k}_ms": round(v, 3) for k, v in med.items()},
                        "moe_over_dense": round(med["moe"] / med["dense"], 3),
                        "ragged_dot_over_dense": round(med["moe_ragged_dot"] / med["dense"], 3)})

    print(f"{'step':<14}{'tokens':>7}{'dense ms':>10}{'MoE ms':>9}{'MoE/dense':>11}{'ragged_dot ms':>15}{'/dense':>8}")
    for r in results:
        print(f"{r['case']:<14}{r['tokens']:>7}{r['dense_ms']:>10.2f}{r['moe_ms']:>9.2f}{r['moe_over_dense']:>11.2f}"
              f"{r['moe_ragged_dot_ms']:>15.2f}{r['ragged_dot_over_dense']:>8.2f}")
    out = {
        "model": {"hidden": H, "layers": LAYERS, "heads": HEADS, "kv_heads": KV_HEADS, "vocab": VOCAB, "experts": EXPERTS,
                  "top_k": TOP_K, "expert_ffn": args.ffn, "dense_ffn": 2 * args.ffn},
        "repeats": args.repeats, "jax": jax.__version__, "backend": jax.default_backend(), "cpus": os.cpu_count(),
        "machine": platform.machine(), "load_average": os.getloadavg(), "results": results,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
