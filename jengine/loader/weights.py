"""Shared weight assembly: per-layer host tensors -> stacked, typed, placed parameters.

Each format gives a `fetch(name, layer)` that returns one tensor already in the model's layout
(`[in, out]` matrices, possibly a numpy view of a memory map). Stacking writes each layer straight
into one preallocated array of the target dtype, so the only host copy is the stacked parameter,
which `place` hands to the device before the next parameter is read.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jengine.progress import ProgressLog

Place = Callable[[str, np.ndarray], jax.Array]
Fetch = Callable[[str, "int | None"], np.ndarray]

logger = logging.getLogger(__name__)

NP_DTYPES: dict[str, Any] = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def default_place(name: str, array: np.ndarray) -> jax.Array:
    """Puts a host array on the default device."""
    return jnp.asarray(array)


def assemble(
    shapes: dict[str, tuple[int, ...]], fetch: Fetch, dtype: str, place: Place | None = None
) -> dict[str, jax.Array]:
    """Builds every parameter in `shapes`; `layers.*` ones are stacked over `fetch(name, i)`.

    Logs `loading weights: done/total tensors` (one per layer of a stacked one) every few seconds."""
    place = place or default_place
    np_dtype = NP_DTYPES[dtype]
    params: dict[str, jax.Array] = {}
    total = sum(shape[0] if name.startswith("layers.") else 1 for name, shape in shapes.items())
    progress = ProgressLog(logger, "loading weights", total, "tensors")
    for name, shape in shapes.items():
        if name.startswith("layers."):
            out = np.empty(shape, np_dtype)
            for i in range(shape[0]):
                out[i] = _checked(name, fetch(name, i), shape[1:])
                progress.advance()
        else:
            out = np.asarray(_checked(name, fetch(name, None), shape), dtype=np_dtype)
            progress.advance()
        params[name] = place(name, out)
        del out
    return params


def _checked(name: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"checkpoint tensor for {name} has shape {tuple(array.shape)}, model expects {tuple(shape)}")
    return array
