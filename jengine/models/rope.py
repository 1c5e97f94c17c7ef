"""Rotary position embeddings (HF "rotate half" layout), with Llama 3 / linear / GGUF scaling.

Inverse frequencies are a host-side numpy constant computed once per config; cos/sin are computed
from the token positions inside the step, so no max-length table has to live on the device.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jengine.models.config import RopeScaling


@functools.lru_cache(maxsize=32)
def inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """The [head_dim // 2] float32 inverse frequencies, after any scaling."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is None:
        pass
    elif scaling.rope_type == "linear":
        inv = inv / scaling.factor
    elif scaling.rope_type == "freq_factors":
        inv = inv / np.asarray(scaling.freq_factors, np.float64)
    elif scaling.rope_type == "llama3":
        inv = _llama3(inv, scaling)
    else:
        raise NotImplementedError(f"rope scaling {scaling.rope_type!r}")
    return inv.astype(np.float32)


def _llama3(inv: np.ndarray, s: RopeScaling) -> np.ndarray:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a linear blend in between."""
    old = s.original_max_position_embeddings
    low_wavelen, high_wavelen = old / s.low_freq_factor, old / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * inv / s.factor + smooth * inv
    out = np.where(wavelen > low_wavelen, inv / s.factor, blended)
    return np.where(wavelen < high_wavelen, inv, out)


def cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [T, head_dim // 2] (float32) for int positions[T]."""
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x[T, H, D] by the angles of cos/sin[T, R // 2]; math in float32, result in x's dtype.

    R < D is partial rotary (Phi-3's `partial_rotary_factor`): the first R features of each head are
    rotated ("rotate half" within them), the other D - R pass through unchanged.
    """
    half = cos.shape[-1]
    xf = x.astype(jnp.float32)
    x1, x2, rest = xf[..., :half], xf[..., half : 2 * half], xf[..., 2 * half :]
    c, s = cos[:, None, :], sin[:, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s, rest], axis=-1).astype(x.dtype)
