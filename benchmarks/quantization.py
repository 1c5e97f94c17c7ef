"""Quantized weights: bytes on the device per format, and CPU decode step time against float.

    python benchmarks/quantization.py                          # writes benchmarks/results/quantization_cpu.json
    python benchmarks/quantization.py --formats float32,int8 --batches 1

Weight bytes: SmolLM2-135M from the placed arrays of each format (float32, bfloat16, int8, fp8, GGUF
blocks of the default Q4_1 file), and a Llama-3-8B-shaped model computed from the shapes of each
layout (the same per-leaf sizes the placed arrays have; nothing 8B is built). Decode step time:
SmolLM2 float32 against int8 and GGUF-Q4 (`quantization="gguf"`) on the CPU, at batch 1 and 64, each
format in its own process one after the other: all rows prefilled first, then the median wall time
of `--steps` engine steps that decode one token for every row. Prints a table, writes JSON. About
5 minutes on an idle 2-core machine (each side warms up its own step buckets; ~11 minutes shared).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

import result_json
import side_process  # benchmarks/side_process.py: the script's folder is on sys.path
from decode_steps import median_decode_steps

HERE = os.path.dirname(os.path.abspath(__file__))
FORMATS = ("float32", "int8", "gguf")


def _bytes_from_shapes(method: str, shapes: dict, quantized: tuple, dtype_bytes: int) -> int:
    """Bytes of every parameter when the `quantized` projections use `method`'s layout (scales in the model dtype)."""
    total = 0
    for name, shape in shapes.items():
        n = 1
        for d in shape:
            n *= d
        if name not in quantized or method in ("float32", "bfloat16"):
            total += n * dtype_bytes
            continue
        L, n_in, n_out = shape
        if method in ("int8", "fp8"):
            total += n + L * n_out * dtype_bytes
        elif method == "int4-g128":  # AWQ / GPTQ: packed values, scale and offset per 128 inputs
            total += n // 2 + 2 * L * (n_in // 128) * n_out * dtype_bytes
        elif method == "gguf-q4_1":  # 4-bit values, scale and offset per 32 inputs
            total += n // 2 + 2 * L * (n_in // 32) * n_out * dtype_bytes
    return total


def weight_bytes_8b() -> dict:
    from jengine.models.llama import LlamaConfig, LlamaForCausalLM
    from jengine.quantization.loading import projection_names

    cfg = LlamaConfig(architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False)
    shapes = LlamaForCausalLM.param_shapes(cfg)
    names = projection_names(cfg, shapes)
    out = {"float32": _bytes_from_shapes("float32", shapes, names, 4)}
    for method in ("bfloat16", "int8", "fp8", "int4-g128", "gguf-q4_1"):
        out[method] = _bytes_from_shapes(method, shapes, names, 2)  # bf16 model: scales and float parts in bf16
    return out


def weight_bytes_smollm2() -> dict:
    from jengine.loader import load_model
    from jengine.quantization.weights import weight_nbytes

    out = {}
    for label, kw in (("float32", dict(dtype="float32")), ("bfloat16", dict(dtype="bfloat16")),
                      ("int8", dict(dtype="bfloat16", quantization="int8")), ("fp8", dict(dtype="bfloat16", quantization="fp8")),
                      ("gguf-q4_1", dict(dtype="bfloat16", quantization="gguf"))):
        from flax import nnx

        out[label] = weight_nbytes(nnx.state(load_model(**kw).model))
    return out


def child_decode(fmt: str, batches: list[int], steps: int) -> dict:
    from jengine import LLM

    quant = None if fmt == "float32" else fmt
    llm = LLM(dtype="float32", quantization=quant, max_model_len=256, max_num_seqs=max(batches),
              max_num_batched_tokens=128, compilation_cache_dir="")
    return median_decode_steps(llm.engine, batches, steps, 32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "quantization_cpu.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.child:
        side_process.emit(child_decode(args.child, batches, args.steps))
        return
    report = {"machine": platform.platform(), "cpus": os.cpu_count(), "weight_bytes": {}, "decode_step_s": {}}
    report["weight_bytes"]["llama3-8b-shaped"] = weight_bytes_8b()
    report["weight_bytes"]["smollm2-135m"] = weight_bytes_smollm2()
    for fmt in args.formats.split(","):
        report["decode_step_s"][fmt] = side_process.run(
            [sys.executable, __file__, "--child", fmt, "--batches", args.batches, "--steps", str(args.steps)])
    mib = 2**20
    print("weight bytes on the device (MiB)")
    for model, row in report["weight_bytes"].items():
        print(f"  {model:18s} " + "  ".join(f"{k} {v / mib:9.1f}" for k, v in row.items()))
    print("decode step, median s (SmolLM2-135M, float32 activations, CPU)")
    base = report["decode_step_s"].get("float32", {})
    for fmt, row in report["decode_step_s"].items():
        cells = [f"batch {b}: {row[str(b)] * 1e3:7.1f} ms" + (f" ({base[str(b)] / row[str(b)]:.2f}x float32)" if base else "") for b in batches]
        print(f"  {fmt:8s} " + "   ".join(cells) + f"   compiles after warm-up {row['compilations_after_warmup']}")
    result_json.write(args.out, report)


if __name__ == "__main__":
    main()
