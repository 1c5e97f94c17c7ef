"""Shared host-graph planning for the Pallas ragged paged-attention kernels (GPU and TPU).

The kernels see a static grid of *query tiles*. A tile is `bq` consecutive new tokens of one sequence
for one KV head, with the query heads of that KV head's group folded into the rows: row
`r = i * group_pad + g` is token `i` of the tile and query head `g` of the group. Everything ragged
(which sequence a tile belongs to, where its tokens sit in `[T]`, which KV positions it may see) is
computed here in plain `jax.numpy` and handed to the kernel as a small int32 table `meta[NT, 8]`.

Two groups are planned separately, each with its own tile size:
- decode: one tile per sequence row, `bq = 1`, active only for rows with exactly one new token;
- prefill: rows with two or more new tokens, cut into `bq`-token tiles; the static tile count
  `ceil(T / bq) + min(S, T // 2)` bounds every possible ragged batch.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from . import reference

# Columns of the per-tile `meta` table.
SEQ, KV_LO, KV_END, POS0, QN = 0, 1, 2, 3, 4
META_COLS = 8


class TilePlan(NamedTuple):
    """The tiles of one group: `meta[NT, 8]` int32 and the `[NT, bq]` token index of each tile row."""

    meta: jax.Array
    token_idx: jax.Array  # index into [T] of each (tile, token) row; T when the row is not a real token


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def seq_info(seq_lens: jax.Array, query_start_loc: jax.Array, num_seqs: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
    """(q_lens[S], seq_lens[S]) with rows past `num_seqs` forced to zero."""
    n = jnp.minimum(jnp.reshape(num_seqs, (-1,))[0], num_rows).astype(jnp.int32)
    real = jnp.arange(num_rows) < n
    q_lens = jnp.where(real, query_start_loc[1:] - query_start_loc[:-1], 0).astype(jnp.int32)
    return q_lens, jnp.where(real, seq_lens, 0).astype(jnp.int32)


def _meta(seq, q0, qn, q_lens, seq_lens, sliding_window: int | None) -> jax.Array:
    """meta rows for tiles (seq, first token q0 within the new tokens, qn valid tokens; qn == 0: idle)."""
    pos0 = seq_lens[seq] - q_lens[seq] + q0  # absolute position of the tile's first token
    kv_end = jnp.where(qn > 0, pos0 + qn, 0)  # keys < kv_end (causal end of the tile's last token)
    kv_lo = jnp.zeros_like(pos0) if sliding_window is None else jnp.maximum(pos0 - sliding_window + 1, 0)
    kv_lo = jnp.where(qn > 0, kv_lo, 0)
    zeros = jnp.zeros_like(seq)
    return jnp.stack([seq, kv_lo, kv_end, pos0, qn, zeros, zeros, zeros], axis=1).astype(jnp.int32)


def plan_decode(q_lens, seq_lens, query_start_loc, num_tokens: int, sliding_window: int | None) -> TilePlan:
    """One single-token tile per sequence row; rows without exactly one new token are idle."""
    S = q_lens.shape[0]
    seq = jnp.arange(S, dtype=jnp.int32)
    qn = (q_lens == 1).astype(jnp.int32)
    meta = _meta(seq, jnp.zeros_like(seq), qn, q_lens, seq_lens, sliding_window)
    tok = jnp.where(qn > 0, query_start_loc[:S], num_tokens)[:, None]
    return TilePlan(meta, tok.astype(jnp.int32))


def num_prefill_tiles(num_tokens: int, num_rows: int, bq: int) -> int:
    """Static bound on the prefill tiles of any batch of `num_tokens` tokens over `num_rows` rows."""
    return -(-num_tokens // bq) + min(num_rows, num_tokens // 2)


def plan_prefill(q_lens, seq_lens, query_start_loc, num_tokens: int, bq: int, sliding_window: int | None) -> TilePlan:
    """`bq`-token tiles over every row with two or more new tokens, in row order."""
    S = q_lens.shape[0]
    NT = num_prefill_tiles(num_tokens, S, bq)
    is_pre = q_lens > 1
    tiles_per_row = jnp.where(is_pre, (q_lens + bq - 1) // bq, 0)
    ends = jnp.cumsum(tiles_per_row)
    j = jnp.arange(NT, dtype=jnp.int32)
    # compare_all: one [NT, S] comparison instead of the default binary search's while loop, which an
    # accelerator runs as several small launches (and each attention call plans its tiles anew).
    seq = jnp.minimum(jnp.searchsorted(ends, j, side="right", method="compare_all"), S - 1).astype(jnp.int32)
    first_tile = ends[seq] - tiles_per_row[seq]
    q0 = (j - first_tile) * bq
    active = j < ends[-1]
    qn = jnp.where(active, jnp.clip(q_lens[seq] - q0, 0, bq), 0)
    meta = _meta(seq, q0, qn, q_lens, seq_lens, sliding_window)
    i = jnp.arange(bq, dtype=jnp.int32)[None, :]
    tok = jnp.where(i < qn[:, None], query_start_loc[seq][:, None] + q0[:, None] + i, num_tokens)
    return TilePlan(meta, tok.astype(jnp.int32))


def gather_q(q: jax.Array, token_idx: jax.Array, num_kv_heads: int, group_pad: int, rows: int) -> jax.Array:
    """q[T, Hq, D] -> tiles [NT, Hkv, rows, D] with row i * group_pad + g (zeros where padded)."""
    T, Hq, D = q.shape
    NT, bq = token_idx.shape
    G = Hq // num_kv_heads
    qt = q[jnp.minimum(token_idx, T - 1)].reshape(NT, bq, num_kv_heads, G, D)
    qt = jnp.pad(qt, ((0, 0), (0, 0), (0, 0), (0, group_pad - G), (0, 0)))
    qt = qt.transpose(0, 2, 1, 3, 4).reshape(NT, num_kv_heads, bq * group_pad, D)
    if rows > bq * group_pad:
        qt = jnp.pad(qt, ((0, 0), (0, 0), (0, rows - bq * group_pad), (0, 0)))
    return qt


def combine_splits(acc: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """Merges flash-decoding partials acc[NS, ..., R, D], m/l[NS, ..., R] -> normalized [..., R, D] (0 if empty)."""
    m_all = m.max(axis=0)
    w = jnp.exp(m - m_all[None])
    denom = (w * l).sum(axis=0)
    num = (w[..., None] * acc).sum(axis=0)
    return jnp.where(denom[..., None] > 0, num / jnp.where(denom > 0, denom, 1.0)[..., None], 0.0)


def scatter_out(out: jax.Array, tiles: jax.Array, token_idx: jax.Array, num_q_heads: int, group_pad: int) -> jax.Array:
    """Writes tile outputs [NT, Hkv, rows, D] back into out[T, Hq, D] at their tokens (idle rows dropped)."""
    NT, Hkv, _, D = tiles.shape
    bq = token_idx.shape[1]
    G = num_q_heads // Hkv
    t = tiles[:, :, : bq * group_pad].reshape(NT, Hkv, bq, group_pad, D)[:, :, :, :G]
    t = t.transpose(0, 2, 1, 3, 4).reshape(NT * bq, num_q_heads, D)
    return out.at[token_idx.reshape(-1)].set(t.astype(out.dtype), mode="drop")


SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_PAGE_SIZES = (16, 32, 64, 128)
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# fp8 (e4m3fn, stored as its uint8 bytes): decoded in the kernel, math in q's dtype
CACHE_DTYPES = SUPPORTED_DTYPES + (jnp.float8_e4m3fn, jnp.uint8)


def check_dtype(backend: str, dtype: Any) -> None:
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in CACHE_DTYPES]:
        raise ValueError(f"{backend} attention: unsupported dtype {jnp.dtype(dtype)}; use one of float32, bfloat16, "
                         "float16, float8_e4m3fn")


def compute_dtype(q_dtype: Any, cache_dtype: Any) -> Any:
    """The dtype of the kernels' dots: the cache's, except that an fp8 cache is upcast to q's dtype
    (float32 models keep float32 attention; no fp8 x fp8 dot, which would need q quantized too)."""
    return jnp.dtype(q_dtype) if reference.is_fp8(cache_dtype) else jnp.dtype(cache_dtype)


def load_kv(x: jax.Array, dtype: Any) -> jax.Array:
    """A K or V block loaded in a kernel, in the dots' dtype: an fp8 cache's bytes become e4m3, then `dtype`."""
    if x.dtype == jnp.uint8:
        x = jax.lax.bitcast_convert_type(x, jnp.float8_e4m3fn)
    return x if x.dtype == dtype else x.astype(dtype)


def new_checked_kv_cache(backend: str, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: Any) -> jax.Array:
    """A zeroed `[2, Hkv, pages, page_size, D]` cache, after checking the kernel can serve its shape."""
    if page_size not in SUPPORTED_PAGE_SIZES:
        raise ValueError(f"{backend} attention: unsupported page_size {page_size}; use one of {SUPPORTED_PAGE_SIZES}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{backend} attention: unsupported head_dim {head_dim}; use one of {SUPPORTED_HEAD_DIMS}")
    check_dtype(backend, dtype)
    return jnp.zeros((2, num_kv_heads, num_pages, page_size, head_dim), reference.storage_dtype(dtype))


def check_attention_inputs(backend: str, q: jax.Array, cache: jax.Array, sliding_window: int | None, soft_cap: float | None) -> tuple[int, int]:
    """Validates what both Pallas kernels serve (ValueError naming the input); returns (Hkv, page_size)."""
    hq, d = q.shape[1], q.shape[2]
    if cache.ndim != 5 or cache.shape[0] != 2:
        raise ValueError(f"{backend} attention: cache must be [2, Hkv, pages, page_size, D], got {cache.shape}")
    _, hkv, _, page_size, dc = cache.shape
    if dc != d:
        raise ValueError(f"{backend} attention: q head_dim {d} != cache head_dim {dc}")
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{backend} attention: unsupported head_dim {d}; use one of {SUPPORTED_HEAD_DIMS}")
    if page_size not in SUPPORTED_PAGE_SIZES:
        raise ValueError(f"{backend} attention: unsupported page_size {page_size}; use one of {SUPPORTED_PAGE_SIZES}")
    check_dtype(backend, cache.dtype)
    if hq % hkv:
        raise ValueError(f"{backend} attention: num query heads {hq} must be a multiple of num kv heads {hkv}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"{backend} attention: sliding_window must be >= 1, got {sliding_window}")
    if soft_cap is not None and soft_cap <= 0:
        raise ValueError(f"{backend} attention: soft_cap must be > 0, got {soft_cap}")
    return hkv, page_size

