"""Ragged paged attention for NVIDIA GPUs: a Pallas kernel lowered through Triton.

Cache layout: one array `[2, num_kv_heads, num_pages, page_size, head_dim]` (K at index 0, V at 1),
so that one (K or V, head, page) block is a contiguous `page_size x head_dim` tile.

One `pallas_call` body serves two launches (see `_tiling`): the decode group (one token per tile,
flash-decoding: the KV length is cut into `num_splits` parts whose partial softmax states are merged
afterwards in `jax.numpy`) and the prefill group (`bq`-token query tiles, one split). Each program
owns one tile and one KV head and loads every KV block once for all query heads of that head's group;
the group is padded to a power of two and the rows to at least 16, as Triton's `dot` needs. KV is read
`pages_per_block` pages at a time through a gather on the block table.

Supports head_dim 64/128/256, page sizes 16/32/64/128, float32/bfloat16/float16 caches, sliding
window and logit soft cap. An fp8 (e4m3fn) cache is loaded as fp8 (half the bytes of bfloat16) and
upcast to q's dtype inside the kernel; its per-tensor scales are folded into `sm_scale` (K) and the
output (V). Triton casts from e4m3fn on compute capability 8.9 and later only. `interpret=True` runs it on any backend (slowly) for tests.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jengine.pallas_kernels import _tiling as tiling
from jengine.pallas_kernels import reference

SUPPORTED_HEAD_DIMS, SUPPORTED_PAGE_SIZES, SUPPORTED_DTYPES = tiling.SUPPORTED_HEAD_DIMS, tiling.SUPPORTED_PAGE_SIZES, tiling.SUPPORTED_DTYPES
_MIN_ROWS = 16  # Triton's dot wants every operand dimension >= 16
_M_INIT = -1e30


@dataclasses.dataclass(frozen=True)
class GpuTuning:
    """Tile sizes and launch parameters of the GPU kernel (defaults: see benchmarks/README.md).

    `ragged_paged_attention` takes one as `tuning=`; the contract's entry point uses the defaults.
    Powers of two throughout, as Triton's block shapes must be.
    """

    kv_block_tokens: int = 64  # KV tokens per inner step (several pages when pages are small)
    prefill_rows: int = 64  # query rows (tokens x padded group) per prefill tile at D <= 128 (half at D = 256)
    split_tokens: int = 256  # flash-decoding: aim for at least this many KV tokens per split
    max_splits: int = 16
    decode_warps: int | None = None  # None: 4 at D <= 128, 8 at D = 256
    prefill_warps: int | None = None
    num_stages: int = 2
    unmasked_inner_blocks: bool = True  # mask only the blocks at the causal edge and the window's start

    def __post_init__(self) -> None:
        for name in ("kv_block_tokens", "prefill_rows", "split_tokens", "max_splits", "decode_warps", "prefill_warps"):
            value = getattr(self, name)
            if value is not None and (value < 1 or value & (value - 1)):
                raise ValueError(f"GpuTuning.{name} must be a power of two, got {value}")
        if self.num_stages < 1:
            raise ValueError(f"GpuTuning.num_stages must be >= 1, got {self.num_stages}")


DEFAULT_TUNING = GpuTuning()


def new_kv_cache(num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: Any) -> jax.Array:
    """A zeroed cache `[2, num_kv_heads, num_pages, page_size, head_dim]` (the reference's layout)."""
    return tiling.new_checked_kv_cache("gpu", num_pages, page_size, num_kv_heads, head_dim, dtype)


# The KV write is the reference's scatter: the layouts are the same (not fused into the kernel yet).
write_kv = reference.write_kv


def _kernel(meta_ref, tables_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *,
            sm_scale: float, soft_cap: float | None, sliding_window: int | None, group_pad: int,
            pages_per_block: int, blocks_per_split: int, precision: Any, unmasked_inner_blocks: bool) -> None:
    """One (tile, kv head, split): online softmax over the split's KV blocks that the tile may see.

    With `unmasked_inner_blocks`, blocks that every row of the tile sees whole (below the first
    token's position, inside every row's window) skip building and applying the mask; only the
    blocks at the causal edge and the window's start pay for it.
    """
    t, sp = pl.program_id(0), pl.program_id(2)
    rows, _ = q_ref.shape
    page_size = k_ref.shape[-2]
    block_k = pages_per_block * page_size
    seq = meta_ref[t, tiling.SEQ]
    kv_lo = meta_ref[t, tiling.KV_LO]
    kv_end = meta_ref[t, tiling.KV_END]
    pos0 = meta_ref[t, tiling.POS0]

    first_blk = sp * blocks_per_split
    lo = jnp.maximum(kv_lo // block_k, first_blk)
    hi = jnp.maximum(jnp.minimum((kv_end + block_k - 1) // block_k, first_blk + blocks_per_split), lo)

    q = q_ref[...]
    qpos = pos0 + lax.broadcasted_iota(jnp.int32, (rows, block_k), 0) // group_pad

    def body(j, carry, masked: bool):
        acc, m, l = carry
        pages = tables_ref[seq, pl.ds(j * pages_per_block, pages_per_block)]
        k = k_ref[pages].reshape(block_k, -1)
        v = v_ref[pages].reshape(block_k, -1)
        k, v = tiling.load_kv(k, q.dtype), tiling.load_kv(v, q.dtype)  # fp8 bytes: decoded after the one-byte load
        s = plgpu.dot(q, k, trans_b=True, precision=precision) * sm_scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        if masked:
            kpos = j * block_k + lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
            mask = (kpos <= qpos) & (kpos < kv_end)
            if sliding_window is not None:
                mask = mask & (kpos > qpos - sliding_window)
            s = jnp.where(mask, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.exp(s - m_new[:, None])
        alpha = jnp.exp(m - m_new)
        l = l * alpha + p.sum(axis=1)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=precision)
        return acc, m_new, l

    masked = functools.partial(body, masked=True)
    d = q_ref.shape[-1]
    carry = (jnp.zeros((rows, d), jnp.float32), jnp.full((rows,), _M_INIT, jnp.float32), jnp.zeros((rows,), jnp.float32))
    if not unmasked_inner_blocks:
        acc, m, l = lax.fori_loop(lo, hi, masked, carry)
    else:
        # Blocks [inner_lo, inner_hi) need no mask: their last key is at or before the tile's first
        # token (pos0), and with a window their first key is inside the window of its last token
        # (kv_end - 1). The blocks before and after them are masked.
        inner_hi = jnp.clip((pos0 + 1) // block_k, lo, hi)
        inner_lo = lo
        if sliding_window is not None:
            inner_lo = jnp.clip((kv_end - sliding_window + block_k - 1) // block_k, lo, inner_hi)
            carry = lax.fori_loop(lo, inner_lo, masked, carry)
        carry = lax.fori_loop(inner_lo, inner_hi, functools.partial(body, masked=False), carry)
        acc, m, l = lax.fori_loop(inner_hi, hi, masked, carry)
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _launch(q_tiles, meta, tables, cache, *, num_splits: int, blocks_per_split: int, pages_per_block: int,
            group_pad: int, sm_scale, soft_cap, sliding_window, interpret: bool, num_warps: int, num_stages: int,
            unmasked_inner_blocks: bool):
    """Runs the kernel over (tiles, kv heads, splits); returns normalized f32 outputs [NT, Hkv, rows, D]."""
    NT, hkv, rows, d = q_tiles.shape
    _, _, num_pages, page_size, _ = cache.shape
    precision = lax.Precision.HIGHEST if q_tiles.dtype == jnp.float32 else None
    kernel = functools.partial(
        _kernel, sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window, group_pad=group_pad,
        pages_per_block=pages_per_block, blocks_per_split=blocks_per_split, precision=precision,
        unmasked_inner_blocks=unmasked_inner_blocks,
    )
    kv_block = (None, None, num_pages, page_size, d)
    params: dict[str, Any] = {}
    if not interpret:
        params["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(NT, hkv, num_splits),
        in_specs=[
            pl.BlockSpec(meta.shape, lambda t, h, s: (0, 0)),
            pl.BlockSpec(tables.shape, lambda t, h, s: (0, 0)),
            pl.BlockSpec((None, None, rows, d), lambda t, h, s: (t, h, 0, 0)),
            pl.BlockSpec(kv_block, lambda t, h, s: (0, h, 0, 0, 0)),
            pl.BlockSpec(kv_block, lambda t, h, s: (1, h, 0, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, d), lambda t, h, s: (s, t, h, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda t, h, s: (s, t, h, 0)),
            pl.BlockSpec((None, None, None, rows), lambda t, h, s: (s, t, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((num_splits, NT, hkv, rows, d), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, NT, hkv, rows), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, NT, hkv, rows), jnp.float32),
        ],
        interpret=interpret,
        name="jengine_ragged_paged_attention",
        **params,
    )(meta, tables, q_tiles, cache, cache)
    return tiling.combine_splits(acc, m, l)


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
    tuning: GpuTuning = DEFAULT_TUNING,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> jax.Array:
    """Causal attention of each sequence's new tokens over its paged context. -> [T, Hq, D]."""
    T, hq, d = q.shape
    hkv, page_size = tiling.check_attention_inputs("gpu", q, cache, sliding_window, soft_cap)
    S, P = block_tables.shape
    group = hq // hkv
    group_pad = tiling.next_pow2(group)
    out_dtype = q.dtype
    q = q.astype(tiling.compute_dtype(q.dtype, cache.dtype))
    # fp8 scales: (q . k_scale k) = k_scale (q . k) joins sm_scale; the output is linear in V.
    k_scale, v_scale = reference.kv_scales(cache.dtype, k_scale, v_scale)
    sm_scale = sm_scale * k_scale
    q_lens, lens = tiling.seq_info(seq_lens, query_start_loc, num_seqs, S)

    pages_per_block = max(1, tuning.kv_block_tokens // page_size)
    max_blocks = -(-P // pages_per_block)
    num_splits = min(tuning.max_splits, tiling.next_pow2(-(-max_blocks * pages_per_block * page_size // tuning.split_tokens)))
    blocks_per_split = -(-max_blocks // num_splits)
    cols = num_splits * blocks_per_split * pages_per_block
    tables = jnp.pad(block_tables.astype(jnp.int32), ((0, 0), (0, cols - P)))
    warps = 4 if d <= 128 else 8
    kw: dict[str, Any] = dict(group_pad=group_pad, sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window,
              interpret=interpret, pages_per_block=pages_per_block, num_stages=tuning.num_stages,
              unmasked_inner_blocks=tuning.unmasked_inner_blocks)

    out = jnp.zeros((T, hq, d), jnp.float32)
    # Decode group: one token per tile, KV split flash-decoding style.
    dec = tiling.plan_decode(q_lens, lens, query_start_loc, T, sliding_window)
    rows = max(_MIN_ROWS, group_pad)
    qt = tiling.gather_q(q, dec.token_idx, hkv, group_pad, rows)
    o = _launch(qt, dec.meta, tables, cache, num_splits=num_splits, blocks_per_split=blocks_per_split,
                num_warps=tuning.decode_warps or warps, **kw)
    out = tiling.scatter_out(out, o, dec.token_idx, hq, group_pad)
    # Prefill group: bq-token tiles, one split covering the whole (causal) context.
    if T >= 2:
        prefill_rows = tuning.prefill_rows if d <= 128 else tuning.prefill_rows // 2
        bq = max(1, prefill_rows // group_pad)
        bq = min(bq, tiling.next_pow2(T))
        pre = tiling.plan_prefill(q_lens, lens, query_start_loc, T, bq, sliding_window)
        rows = max(_MIN_ROWS, bq * group_pad)
        qt = tiling.gather_q(q, pre.token_idx, hkv, group_pad, rows)
        o = _launch(qt, pre.meta, tables, cache, num_splits=1, blocks_per_split=num_splits * blocks_per_split,
                    num_warps=tuning.prefill_warps or warps, **kw)
        out = tiling.scatter_out(out, o, pre.token_idx, hq, group_pad)
    if v_scale != 1.0:
        out = out * v_scale
    return out.astype(out_dtype)
