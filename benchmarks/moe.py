"""MoE step cost on the CPU: a tiny Mixtral-shaped model against a dense one with the same active parameters.

    python benchmarks/moe.py                               # table + benchmarks/results/moe_cpu.json
    python benchmarks/moe.py --repeats 20 --rounds 5 --out /tmp/moe.json

The MoE model has 8 experts, top-2, each expert's FFN `F` wide; the dense model is the same Llama
block with one FFN `2F` wide, so both do the same multiply-adds per token (the router's H x 8 aside).
Both run the same jitted forward + logits over a paged cache with random weights (`load_format
"dummy"`), for decode steps (R rows, one new token each, 64 tokens of context) and a prefill step
(one 256-token prompt). A third side runs the MoE experts through `jax.lax.ragged_dot`, whose CPU
lowering multiplies every expert with every row and masks: what the blocked grouped matmul avoids.

Each side runs in its own process (`--side`; a child prints one RESULT line), the sides one after
the other, `--rounds` times (dense, MoE, ragged_dot, dense, ...), so load from other work on a
shared machine falls on every side alike. A child times each step `--repeats` times and reports the
median and its fastest step; the table gives the median over rounds of the medians, the ratio
columns the median over rounds of each round's ratio to dense and ("fastest") the fastest step of
all rounds against dense's, which on a machine shared with other work is the closer to a quiet one.
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

import result_json
import side_process  # benchmarks/side_process.py: the script's folder is on sys.path

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


SIDES = ("dense", "moe", "moe_ragged_dot")


def cases(decode_rows: str, prefill: int) -> dict[str, list[tuple[int, int]]]:
    out = {f"decode x{r}": [(64, 1)] * r for r in map(int, decode_rows.split(","))}
    out[f"prefill {prefill}"] = [(0, prefill)]
    return out


def run_side(side: str, ffn: int, decode_rows: str, prefill: int, repeats: int) -> dict[str, float]:
    """In a child: the median and the fastest step time (ms) of each case for one side."""
    from jengine.loader import load_model

    root = tempfile.mkdtemp()
    model = load_model(config_folder(root, side != "dense", ffn if side != "dense" else 2 * ffn),
                       load_format="dummy", dtype="float32").model
    if side == "moe_ragged_dot":
        model.grouped_matmul = "ragged"
    out = {}
    for case, rows in cases(decode_rows, prefill).items():
        fn, a = step_fn(model, rows)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(*a).block_until_ready()
            times.append(time.perf_counter() - t0)
        out[case] = statistics.median(times) * 1e3
        out[f"{case} min"] = min(times) * 1e3
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ffn", type=int, default=512, help="each expert's FFN width (dense: twice this)")
    ap.add_argument("--decode-rows", default="1,8", help="decode batch sizes")
    ap.add_argument("--prefill", type=int, default=256, help="prefill prompt length")
    ap.add_argument("--repeats", type=int, default=30, help="timed steps per case in each process")
    ap.add_argument("--rounds", type=int, default=5, help="processes per side, the sides interleaved")
    ap.add_argument("--sides", default=",".join(SIDES), help="which sides to run (dense is needed for the ratios)")
    ap.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: run one side and print RESULT
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "moe_cpu.json"))
    args = ap.parse_args()
    if args.side:
        side_process.emit(run_side(args.side, args.ffn, args.decode_rows, args.prefill, args.repeats))
        return

    import jax

    sides = [s for s in SIDES if s in args.sides.split(",")]
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in sides}
    for r in range(args.rounds):
        for side in sides:
            cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--ffn", str(args.ffn), "--decode-rows",
                   args.decode_rows, "--prefill", str(args.prefill), "--repeats", str(args.repeats)]
            runs[side].append(side_process.run(cmd))
            print(f"round {r + 1}/{args.rounds} {side}: " + ", ".join(f"{c} {t:.2f} ms" for c, t in runs[side][-1].items()), flush=True)

    results = []
    for case, rows in cases(args.decode_rows, args.prefill).items():
        med = {s: statistics.median(run[case] for run in runs[s]) for s in sides}
        row = {"case": case, "tokens": sum(n for _, n in rows), **{f"{s}_ms": round(v, 3) for s, v in med.items()},
               "runs_ms": {s: [round(run[case], 3) for run in runs[s]] for s in sides}}
        row["min_ms"] = {s: round(min(run[f"{case} min"] for run in runs[s]), 3) for s in sides}
        for s in sides:
            if s != "dense" and "dense" in med:
                # the median of each round's ratio: a round's sides ran back to back, under about the same load
                ratios = [run[case] / dense[case] for run, dense in zip(runs[s], runs["dense"])]
                name = "moe" if s == "moe" else "ragged_dot"
                row[f"{name}_over_dense"] = round(statistics.median(ratios), 3)
                # fastest step over every round against dense's: what a machine without other load would show
                row[f"{name}_over_dense_fastest"] = round(row["min_ms"][s] / row["min_ms"]["dense"], 3)
        results.append(row)

    print(f"{'step':<14}{'tokens':>7}{'dense ms':>10}{'MoE ms':>9}{'MoE/dense':>11}{'fastest':>9}"
          f"{'ragged_dot ms':>15}{'/dense':>8}{'fastest':>9}")
    for r in results:
        cell = {k: f"{r[k]:.2f}" if k in r else "-" for k in ("dense_ms", "moe_ms", "moe_over_dense", "moe_over_dense_fastest",
                "moe_ragged_dot_ms", "ragged_dot_over_dense", "ragged_dot_over_dense_fastest")}
        print(f"{r['case']:<14}{r['tokens']:>7}{cell['dense_ms']:>10}{cell['moe_ms']:>9}{cell['moe_over_dense']:>11}"
              f"{cell['moe_over_dense_fastest']:>9}{cell['moe_ragged_dot_ms']:>15}{cell['ragged_dot_over_dense']:>8}"
              f"{cell['ragged_dot_over_dense_fastest']:>9}")
    out = {
        "model": {"hidden": H, "layers": LAYERS, "heads": HEADS, "kv_heads": KV_HEADS, "vocab": VOCAB, "experts": EXPERTS,
                  "top_k": TOP_K, "expert_ffn": args.ffn, "dense_ffn": 2 * args.ffn},
        "repeats": args.repeats, "rounds": args.rounds, "jax": jax.__version__, "backend": jax.default_backend(),
        "cpus": os.cpu_count(), "machine": platform.machine(), "load_average": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": results,
    }
    result_json.write(args.out, out)


if __name__ == "__main__":
    main()
