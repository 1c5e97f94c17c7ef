"""Paged-attention backends behind one contract (imported as `jengine.pallas_kernels`).

    new_kv_cache(num_pages, page_size, num_kv_heads, head_dim, dtype, backend=None) -> cache
    write_kv(cache, k[T, Hkv, D], v[T, Hkv, D], slot_mapping[T], backend=None, k_scale=1.0, v_scale=1.0) -> cache
    ragged_paged_attention(q[T, Hq, D], cache, seq_lens[S], block_tables[S, P], query_start_loc[S + 1],
                           num_seqs[1], *, sm_scale, sliding_window=None, soft_cap=None,
                           backend=None, interpret=False, k_scale=1.0, v_scale=1.0) -> out[T, Hq, D]

Backends: `reference` (pure jax.numpy: the test oracle, and the CPU path where no C++ compiler is
found), `cpu` (a native C++ kernel called through XLA's FFI: the CPU default), `gpu` (Pallas on
NVIDIA GPUs) and `tpu` (Pallas Mosaic TPU). `backend=None` picks from `jax.default_backend()`. The
cache's layout belongs to its backend: callers only pass it back to these functions. Sequences come
decode-first; rows past `num_seqs` and tokens past `query_start_loc[num_seqs]` are padding whose
outputs are unspecified. Page 0 is the null page that padding tokens write to.

Cache dtypes: float32, bfloat16, float16, or `KV_FP8` (float8 e4m3fn). An fp8 cache stores
`clip(x / scale, -448, 448)` with one scale for all of K (`k_scale`) and one for all of V (`v_scale`),
vLLM's per-tensor scales, as uint8 e4m3 bytes (`storage_dtype`: XLA's CPU backend moves no f8 data in
place); every backend decodes while it reads. Float caches ignore the scales.
"""
from __future__ import annotations

import importlib
import logging
from types import ModuleType
from typing import Any

import jax
import numpy as np

from .reference import KV_FP8, is_fp8, storage_dtype  # noqa: F401  (re-exported: the fp8 cache's dtype)

logger = logging.getLogger(__name__)

BACKENDS = ("reference", "cpu", "gpu", "tpu")
_DEFAULT_FOR_PLATFORM = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}
_PALLAS = ("gpu", "tpu")


def resolve_backend(backend: str | None = None) -> str:
    """The backend name to use: `backend` if given, else the one for `jax.default_backend()`
    (on the CPU: `cpu` when its native kernel builds, else `reference`)."""
    if backend is None:
        name = _DEFAULT_FOR_PLATFORM.get(jax.default_backend(), "reference")
        if name == "cpu" and not _module("cpu").available():
            name = "reference"
        return "reference" if name == "gpu" and not _gpu_importable() else name
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cpu" and jax.default_backend() != "cpu":
        raise ValueError(f"attention backend 'cpu' runs on the CPU platform only, not {jax.default_backend()!r}")
    return "reference" if backend == "gpu" and not _gpu_importable() else backend


_gpu_import_error: list[BaseException] = []  # filled once: the GPU kernel's import failed


def _gpu_importable() -> bool:
    """Whether the Pallas GPU kernel imports. It is written for Pallas' Triton backend, which JAX 0.11
    deprecates; a JAX without it gets the reference kernel and one warning instead of a failure."""
    if _gpu_import_error:
        return False
    try:
        importlib.import_module(f"{__name__}.gpu")
        return True
    except (ImportError, AttributeError) as e:
        _gpu_import_error.append(e)
        logger.warning("the Pallas GPU attention kernel cannot be imported with jax %s (%r): using the reference "
                       "attention (correct, slower); pin jax<0.12 or report this", jax.__version__, e)
        return False


def runs_interpreted(backend: str | None) -> bool:
    """A Pallas backend asked for on a platform it does not compile for runs in interpret mode there
    (slowly: for checking kernels, and the engine through them, on the CPU)."""
    name = resolve_backend(backend)
    return name in _PALLAS and name != _DEFAULT_FOR_PLATFORM.get(jax.default_backend())


def _module(backend: str | None) -> ModuleType:
    return importlib.import_module(f"{__name__}.{resolve_backend(backend)}")


def new_kv_cache(num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: Any, backend: str | None = None) -> Any:
    """A zeroed paged KV cache in the backend's own layout."""
    return _module(backend).new_kv_cache(num_pages, page_size, num_kv_heads, head_dim, dtype)


def write_kv(cache: Any, k: jax.Array, v: jax.Array, slot_mapping: jax.Array | np.ndarray, backend: str | None = None,
             interpret: bool = False, k_scale: float = 1.0, v_scale: float = 1.0) -> Any:
    """Stores the new tokens' K/V at `slot_mapping` (`page * page_size + offset`), quantized for an fp8 cache."""
    return _module(backend).write_kv(cache, k, v, slot_mapping, interpret=interpret, k_scale=k_scale, v_scale=v_scale)


def ragged_paged_attention(
    q: jax.Array,
    cache: Any,
    seq_lens: jax.Array | np.ndarray,  # the index arrays may be host arrays outside jit
    block_tables: jax.Array | np.ndarray,
    query_start_loc: jax.Array | np.ndarray,
    num_seqs: jax.Array | np.ndarray,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    backend: str | None = None,
    interpret: bool = False,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> jax.Array:
    """Causal attention of each sequence's new tokens over its paged context (see module docstring)."""
    return _module(backend).ragged_paged_attention(
        q, cache, seq_lens, block_tables, query_start_loc, num_seqs,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, interpret=interpret,
        k_scale=k_scale, v_scale=v_scale,
    )
