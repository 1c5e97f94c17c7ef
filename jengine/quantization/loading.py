"""Builds the `LayerSource` the loader stacks quantized parameters from (see the package docstring)."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Protocol

import numpy as np

from jengine.models import get_model_class
from jengine.models.base import COLUMN, COLUMN_KV, ROW
from jengine.models.config import ModelConfig
from jengine.models.layers import Weight
from jengine.quantization.fp8 import quantize_fp8
from jengine.quantization.int8 import quantize_int8
from jengine.quantization import CHECKPOINT_METHODS, GGUF_METHOD, check_method

QUANTIZERS: dict[str, Callable[[np.ndarray, Any], Weight]] = {"int8": quantize_int8, "fp8": quantize_fp8}

Fetch = Callable[[str, "int | None"], np.ndarray]


class LayerSource(Protocol):
    """Where the loader gets the quantized parameters of one checkpoint from."""

    method: str

    def handles(self, name: str) -> bool:
        """True when parameter `name` is loaded as a quantized `Weight`."""

    def fetch(self, name: str, layer: int) -> Weight:
        """One layer of parameter `name` as a `Weight` with numpy leaves (no layer axis)."""


def projection_names(config: ModelConfig, shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, ...]:
    """The stacked `[L, in, out]` projection matrices of the decoder layers (what gets quantized)."""
    kinds = get_model_class(config.architecture).partition_kinds(config)
    return tuple(n for n, s in shapes.items() if n.startswith("layers.") and len(s) == 3 and kinds.get(n) in (COLUMN, COLUMN_KV, ROW))


class OnLoadSource:
    """Quantizes each layer of a float checkpoint's projections as it is read (`int8`, `fp8`)."""

    def __init__(self, method: str, fetch: Fetch, names: tuple[str, ...], scale_dtype: Any):
        self.method, self._quantize, self._fetch = method, QUANTIZERS[method], fetch
        self._names, self._scale_dtype = frozenset(names), scale_dtype

    def handles(self, name: str) -> bool:
        return name in self._names

    def fetch(self, name: str, layer: int) -> Weight:
        return self._quantize(self._fetch(name, layer), self._scale_dtype)


def resolve_method(requested: Optional[str], checkpoint_method: Optional[str], *, is_gguf: bool) -> Optional[str]:
    """The method to load with: the request, else the checkpoint's; a mismatch is an error naming both."""
    check_method(requested)
    if checkpoint_method is not None:
        method = str(checkpoint_method).lower()
        if method not in CHECKPOINT_METHODS:
            raise NotImplementedError(
                f"checkpoint quantization_config.quant_method {checkpoint_method!r} is not supported "
                f"(supported: {', '.join(CHECKPOINT_METHODS) or 'none'})"
            )
        if requested is not None and requested != method:
            raise ValueError(f"quantization={requested!r} does not match the checkpoint's quantization_config.quant_method {method!r}")
        return method
    if requested == GGUF_METHOD and not is_gguf:
        raise ValueError("quantization='gguf' keeps a GGUF file's quantized blocks; this checkpoint is not a .gguf file")
    if requested in CHECKPOINT_METHODS:
        raise ValueError(f"quantization={requested!r} needs a checkpoint quantized with it, but this checkpoint has no quantization_config")
    return requested


def make_source(method: Optional[str], *, config: ModelConfig, shapes: Mapping[str, tuple[int, ...]], fetch: Fetch,
                ckpt: Any, scale_dtype: Any, quant_config: Optional[Mapping[str, Any]] = None) -> Optional[LayerSource]:
    """The `LayerSource` for `method` (None: load every parameter in float).

    `quant_config`: the checkpoint's `quantization_config` (for the methods that read one)."""
    if method is None:
        return None
    names = projection_names(config, shapes)
    if method in QUANTIZERS:
        return OnLoadSource(method, fetch, names, scale_dtype)
    if ckpt is None:
        raise ValueError(f"quantization {method!r} reads its checkpoint's tensors; load_format='dummy' has none")
    if method == GGUF_METHOD:
        from jengine.quantization.gguf import GGUFSource

        return GGUFSource(ckpt, config, names, scale_dtype)
    templates = get_model_class(config.architecture).hf_names(config)
    if method in ("awq", "gptq"):
        from jengine.quantization.int4 import Int4Source

        return Int4Source(method, ckpt, templates, names, shapes, quant_config or {}, scale_dtype)
    if method == "compressed-tensors":
        from jengine.quantization.int4 import CompressedTensorsSource

        return CompressedTensorsSource(ckpt, templates, names, quant_config or {}, scale_dtype)
    raise ValueError(f"quantization {method!r} is not supported here")


__all__ = ["LayerSource", "OnLoadSource", "QUANTIZERS", "make_source", "projection_names", "resolve_method"]
