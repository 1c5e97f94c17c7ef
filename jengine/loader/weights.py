"""Shared weight assembly: per-layer host tensors -> stacked, typed, placed parameters.

Each format gives a `fetch(name, layer)` that returns one tensor already in the model's layout
(`[in, out]` matrices, possibly a numpy view of a memory map). Stacking writes each layer straight
into one preallocated array of the target dtype, so the only host copy is the stacked parameter,
which `place` hands to the device before the next parameter is read.

With a quantization `LayerSource` (`jengine.quantization`), the parameters it handles are fetched one
layer at a time as `Weight`s with numpy leaves and stacked leaf by leaf the same way: a quantized
matrix never exists in float beyond one layer, on the host or the device. `place` then receives the
stacked `Weight` and places each leaf.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jengine.models.layers import Weight
from jengine.progress import ProgressLog

Place = Callable[[str, Any], Any]  # (name, np array or Weight of np arrays) -> jax array or Weight
Fetch = Callable[[str, "int | None"], np.ndarray]

logger = logging.getLogger(__name__)

NP_DTYPES: dict[str, Any] = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def default_place(name: str, array: Any) -> Any:
    """Puts a host array (or each leaf of a host `Weight`) on the default device."""
    return jax.tree.map(jnp.asarray, array)


def assemble(
    shapes: dict[str, tuple[int, ...]], fetch: Fetch, dtype: str, place: Place | None = None, quantized: Any = None
) -> dict[str, Any]:
    """Builds every parameter in `shapes`; `layers.*` ones are stacked over `fetch(name, i)`.

    `quantized`: a `jengine.quantization.LayerSource`; the `layers.*` parameters it handles are
    stacked from its per-layer `Weight`s instead.

    Logs `loading weights: done/total tensors` (one per layer of a stacked one) every few seconds."""
    place = place or default_place
    np_dtype = NP_DTYPES[dtype]
    params: dict[str, jax.Array] = {}
    total = sum(shape[0] if name.startswith("layers.") else 1 for name, shape in shapes.items())
    progress = ProgressLog(logger, "loading weights", total, "tensors")
    for name, shape in shapes.items():
        out: Weight | np.ndarray
        if quantized is not None and name.startswith("layers.") and quantized.handles(name):
            out = _stack_weight(name, shape, quantized, progress)
        elif name.startswith("layers."):
            out = stacked = np.empty(shape, np_dtype)
            for i in range(shape[0]):
                stacked[i] = _checked(name, fetch(name, i), shape[1:])
                progress.advance()
        else:
            out = np.asarray(_checked(name, fetch(name, None), shape), dtype=np_dtype)
            progress.advance()
        params[name] = place(name, out)
        del out
    return params


def _stack_weight(name: str, shape: tuple[int, ...], source: Any, progress: ProgressLog) -> Weight:
    """Stacks `source.fetch(name, i)` over layers into one host `Weight` (each leaf preallocated)."""
    stacked: Weight | None = None
    leaves_of = jax.tree_util.tree_leaves
    for i in range(shape[0]):
        layer = source.fetch(name, i)
        if tuple(layer.shape) != tuple(shape[1:]):
            raise ValueError(f"checkpoint tensor for {name} has shape {tuple(layer.shape)}, model expects {tuple(shape[1:])}")
        if stacked is None:
            stacked = jax.tree.map(lambda a: np.empty((shape[0], *np.shape(a)), np.asarray(a).dtype), layer)
        for dst, src in zip(leaves_of(stacked), leaves_of(layer)):
            dst[i] = src
        progress.advance()
    assert stacked is not None
    return stacked


def _checked(name: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"checkpoint tensor for {name} has shape {tuple(array.shape)}, model expects {tuple(shape)}")
    return array
