"""The sampler's top-k / top-p cut, native on the CPU.

`mass_threshold(x, w, target)`: per row, the largest value v of x with sum(w[x >= v]) >= target
(-inf where target <= 0; the row's smallest value where the whole row falls short). With unit
weights and target k it is the k-th largest value; with the kept probabilities and target p times
their sum, the top-p cut. `jengine.sampler` computes the same in `jax.numpy` with `lax.top_k` over a
few candidates and, where they do not reach the cut, a 32-step bisection over the whole row: each step
a pass over the [S, V] logits, about 90 ms for 64 rows of SmolLM2's vocabulary on 2 cores, and XLA's
CPU `top_k` alone 16 ms. `cpu_sampling.cc` is a radix select per row (two passes over it, sums in
double). Built on first use like the other native kernels (`_native.py`).
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp

from . import _native

logger = logging.getLogger(__name__)

TARGET = "jengine_cpu_mass_threshold"
_SOURCE = Path(__file__).with_name("cpu_sampling.cc")


@functools.cache
def _load() -> Optional[str]:
    reason = _native.load(_SOURCE, {"JengineMassThreshold": TARGET})
    if reason is not None:
        logger.warning("native CPU sampling thresholds unavailable (%s); the sampler bisects in jax.numpy", reason)
    return reason


def available() -> bool:
    """Whether the native kernel is built and registered (building it on the first call)."""
    return _load() is None


def mass_threshold(x: jax.Array, w: Optional[jax.Array], target: jax.Array) -> jax.Array:
    """float32[S]: per row of x[S, V], the largest value v with sum(w[x >= v]) >= target (w None:
    unit weights). CPU only; raises where the kernel could not be built."""
    reason = _load()
    if reason is not None:
        raise RuntimeError(f"native CPU sampling thresholds unavailable: {reason}")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0],), jnp.float32))
    weights = jnp.ones((1,), jnp.float32) if w is None else w.astype(jnp.float32)
    return call(x.astype(jnp.float32), weights, target.astype(jnp.float32))
