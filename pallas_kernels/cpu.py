"""Native CPU backend: ragged paged attention in a C++ kernel called through XLA's FFI.

On the CPU, the `jax.numpy` reference gathers each row's KV pages into a contiguous copy before its
matmuls read them (decode attention runs at about 4 GB/s against the 9 GB/s a stream reaches here)
and pays for whole query-by-key tiles on the causal edge of prefill rows. The kernel in
`cpu_attention.cc` walks the pages in place, once per (row, KV head, 16-token tile), scoring only
the keys each query may see, with a streaming softmax, on XLA's intra-op thread pool. The cache
layout and `write_kv` are the reference's. float16 caches go to the reference. An fp8 (e4m3fn) cache
is read one byte per value and decoded in C++; its per-tensor scales are folded in here (K's into
`sm_scale`, V's into the output), so the kernel itself only decodes.

The kernel is compiled on first use for this CPU (`_native.py`); `available()` says whether that
worked; without a compiler the CPU platform falls back to `reference` (with one warning).
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import _native, reference

logger = logging.getLogger(__name__)

new_kv_cache = reference.new_kv_cache
write_kv = reference.write_kv

TARGET = "jengine_cpu_ragged_paged_attention"
_SOURCE = Path(__file__).with_name("cpu_attention.cc")
_CACHE_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float8_e4m3fn, jnp.uint8)  # uint8: an fp8 cache's e4m3 bytes


@functools.cache
def _load() -> Optional[str]:
    """Builds and registers the kernel; None if it is ready, else why not."""
    reason = _native.load(_SOURCE, {"JengineRaggedPagedAttention": TARGET})
    if reason is not None:
        logger.warning("native CPU attention unavailable (%s); the CPU uses the reference backend", reason)
    return reason


def available() -> bool:
    """Whether the native kernel is built and registered (building it on the first call)."""
    return _load() is None


def ragged_paged_attention(
    q: jax.Array,
    cache: jax.Array,
    seq_lens: jax.Array,
    block_tables: jax.Array,
    query_start_loc: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    interpret: bool = False,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> jax.Array:
    """Causal attention of each sequence's new tokens over its paged context. -> [T, Hq, D]."""
    del interpret
    reason = _load()
    if reason is not None:
        raise RuntimeError(f"attention backend 'cpu' is unavailable: {reason}")
    reference.check_inputs("cpu", q, cache)
    kw: dict[str, Any] = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    if jnp.dtype(cache.dtype) not in {jnp.dtype(d) for d in _CACHE_DTYPES}:  # float16 caches: jax.numpy
        return reference.ragged_paged_attention(q, cache, seq_lens, block_tables, query_start_loc, num_seqs, **kw)
    # fp8 scales: q . (k_scale k) = k_scale (q . k) joins sm_scale (before any soft cap, as in the
    # reference), and the output is linear in V. Float caches have scales 1.
    k_scale, v_scale = reference.kv_scales(cache.dtype, k_scale, v_scale)
    q_lens, seq_lens = reference.real_rows(seq_lens, query_start_loc, num_seqs)
    i32 = lambda x: x.astype(jnp.int32)  # noqa: E731
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    out = call(
        q.astype(jnp.float32), cache, i32(q_lens), i32(seq_lens), i32(block_tables), i32(query_start_loc),
        sm_scale=np.float32(sm_scale * k_scale),
        soft_cap=np.float32(soft_cap or 0.0),
        sliding_window=np.int32(sliding_window or 0),
    )
    if v_scale != 1.0:
        out = out * v_scale
    return out.astype(q.dtype)
