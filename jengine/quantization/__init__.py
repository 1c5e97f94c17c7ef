"""Quantized weights: which methods exist, and the per-layer sources the loader stacks.

jengine keeps quantized weights quantized on the device and dequantizes inside each projection:
the attention and MLP projections of every decoder layer (the `layers.*` matrices that tensor
parallelism splits by columns or rows) become `Weight` pytrees (`weights.py`) that `linear` applies,
so no model file knows about quantization; embeddings, norms and the LM head stay in the model's
dtype, as vLLM and llm-compressor leave them. A method is either applied on load to a float
checkpoint (`int8`, `fp8`: one scale per output channel, because one outlier channel then costs only
its own resolution and the scale can be applied to the matmul's [T, out] result instead of the
matrix) or read from a checkpoint that is already quantized. Each method gives the loader a
`LayerSource`: `handles(name)` and `fetch(name, layer)` -> one layer's `Weight` with numpy leaves;
`jengine.loader.weights.assemble` stacks the layers into preallocated host buffers and places each
leaf (sharded with its channels under tensor parallelism), so no full float copy of a quantized
matrix is ever built.

This module only names the methods (imported by the CLI, which stays free of JAX); `loading.py` builds
the sources, `weights.py` holds the `Weight` classes, one module per format does the host-side work.
"""
from __future__ import annotations

from typing import Optional

ON_LOAD_METHODS: tuple[str, ...] = ("int8", "fp8")
# Methods a checkpoint's `quantization_config.quant_method` may name (read, never re-quantized).
CHECKPOINT_METHODS: tuple[str, ...] = ("awq", "gptq", "compressed-tensors")
# GGUF files: the blocks of Q8_0 / Q4_0 / Q4_1 / Q4_K projections stay quantized (asked for, not automatic).
GGUF_METHOD = "gguf"
# Every value `quantization=` / `--quantization` accepts (None: the checkpoint's own, else float).
QUANTIZATION_METHODS: tuple[str, ...] = (*ON_LOAD_METHODS, *CHECKPOINT_METHODS, GGUF_METHOD)


def check_method(quantization: Optional[str]) -> None:
    """Raises a ValueError naming an unknown `quantization` value and the supported ones."""
    if quantization is not None and quantization not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization {quantization!r} is not supported; supported: {', '.join(QUANTIZATION_METHODS)}")


__all__ = ["CHECKPOINT_METHODS", "GGUF_METHOD", "ON_LOAD_METHODS", "QUANTIZATION_METHODS", "check_method"]
