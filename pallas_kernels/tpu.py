"""Ragged paged attention for TPUs: a Pallas Mosaic kernel driven by scalar-prefetched page tables.

Cache layout: one array `[2, num_kv_heads, num_pages, page_size, head_dim]` (K at index 0, V at 1),
the same as the GPU backend, so one (K or V, head, page) block is a `page_size x head_dim` tile whose
shape equals the array's last two dimensions (always a legal Mosaic block).

Grid `(tiles, kv heads, kv blocks)`. The per-tile table and the block tables are scalar-prefetched
into SMEM; the BlockSpec index maps look up the page of each grid step, so the Pallas pipeline
double-buffers page DMAs with no hand-written copies. A KV block is `pages_per_block` pages, passed
as that many K and V operands (each one page). Steps outside a tile's causal/sliding-window span
clamp to an already-fetched block (no DMA) and skip compute. The decode group (`bq = 1`) and the
prefill group (`bq` tokens per tile) are two launches with their own tile sizes (see `_tiling`).

Page sizes 16/32/64/128 (16 is the minimum: a bfloat16 page then fills whole (16, 128) tiles), head
dims 64/128/256, float32/bfloat16/float16 caches, and fp8 (e4m3fn) caches: each page is fetched as fp8
and upcast to q's dtype in the kernel, the per-tensor scales folded into `sm_scale` and the output
(untested on a TPU: Mosaic tiles 8-bit arrays by (32, 128), so page_size 16 may not lower there). With `interpret=True` it runs in the TPU interpreter
(`pltpu.InterpretParams`, what `pltpu.force_tpu_interpret_mode()` switches on) on any backend (very slowly; tests use tiny shapes).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jengine.pallas_kernels import _tiling as tiling
from jengine.pallas_kernels import reference

SUPPORTED_HEAD_DIMS, SUPPORTED_PAGE_SIZES, SUPPORTED_DTYPES = tiling.SUPPORTED_HEAD_DIMS, tiling.SUPPORTED_PAGE_SIZES, tiling.SUPPORTED_DTYPES
_KV_BLOCK_TOKENS = 128  # KV tokens per grid step
_DECODE_MIN_ROWS = 8  # f32 sublane count
_PREFILL_ROWS = 128  # query rows (tokens x padded group) per prefill tile
_M_INIT = -1e30


def new_kv_cache(num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: Any) -> jax.Array:
    """A zeroed cache `[2, num_kv_heads, num_pages, page_size, head_dim]` (the reference's layout)."""
    return tiling.new_checked_kv_cache("tpu", num_pages, page_size, num_kv_heads, head_dim, dtype)


# The KV write is the reference's scatter: the layouts are the same (not fused into the kernel yet).
write_kv = reference.write_kv


def _block_range(meta_ref, t, block_k: int):
    """[first, end) KV blocks tile `t` may see."""
    base = t * tiling.META_COLS
    lo = meta_ref[base + tiling.KV_LO] // block_k
    hi = (meta_ref[base + tiling.KV_END] + block_k - 1) // block_k
    return lo, jnp.maximum(hi, lo)


def _kernel(meta_ref, tables_ref, q_ref, *refs, sm_scale: float, soft_cap: float | None,
            sliding_window: int | None, group_pad: int, pages_per_block: int, precision: Any) -> None:
    """One grid step: fold one KV block into the running softmax of (tile, kv head)."""
    k_refs = refs[:pages_per_block]
    v_refs = refs[pages_per_block: 2 * pages_per_block]
    o_ref, m_sc, l_sc, acc_sc = refs[2 * pages_per_block:]
    t, j = pl.program_id(0), pl.program_id(2)
    rows = q_ref.shape[0]
    page_size = k_refs[0].shape[0]
    block_k = pages_per_block * page_size
    base = t * tiling.META_COLS
    kv_end = meta_ref[base + tiling.KV_END]
    pos0 = meta_ref[base + tiling.POS0]
    lo, hi = _block_range(meta_ref, t, block_k)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _M_INIT, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when((j >= lo) & (j < hi))
    def _step():
        q = q_ref[...]
        qpos = pos0 + lax.broadcasted_iota(jnp.int32, (rows, page_size), 0) // group_pad
        for i in range(pages_per_block):
            k = k_refs[i][...]
            v = v_refs[i][...]
            k, v = tiling.load_kv(k, q.dtype), tiling.load_kv(v, q.dtype)  # fp8 bytes: decoded after the one-byte load
            s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                                preferred_element_type=jnp.float32) * sm_scale
            if soft_cap is not None:
                s = soft_cap * jnp.tanh(s / soft_cap)
            kpos = (j * block_k + i * page_size) + lax.broadcasted_iota(jnp.int32, (rows, page_size), 1)
            mask = (kpos <= qpos) & (kpos < kv_end)
            if sliding_window is not None:
                mask = mask & (kpos > qpos - sliding_window)
            s = jnp.where(mask, s, _M_INIT)
            m_prev = m_sc[...]
            m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
            p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
            alpha = jnp.exp(m_prev - m_new)
            l_sc[...] = l_sc[...] * alpha + p.sum(axis=1, keepdims=True)
            pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32)
            acc_sc[...] = acc_sc[...] * alpha + pv
            m_sc[...] = m_new

    @pl.when(j == pl.num_programs(2) - 1)
    def _finish():
        l = l_sc[...]
        o_ref[...] = jnp.where(l > 0, acc_sc[...] / jnp.where(l > 0, l, 1.0), 0.0).astype(o_ref.dtype)


def _launch(q_tiles, meta, tables, cache, *, num_blocks: int, pages_per_block: int, group_pad: int,
            sm_scale, soft_cap, sliding_window, interpret: bool):
    """Runs the kernel over (tiles, kv heads, kv blocks) -> f32 outputs [NT, Hkv, rows, D]."""
    NT, hkv, rows, d = q_tiles.shape
    _, _, _, page_size, _ = cache.shape
    cols = tables.shape[1]
    block_k = pages_per_block * page_size
    precision = lax.Precision.HIGHEST if q_tiles.dtype == jnp.float32 else None

    def page_spec(kv: int, i: int) -> pl.BlockSpec:
        def index_map(t, h, j, meta_ref, tables_ref):
            lo, hi = _block_range(meta_ref, t, block_k)
            jj = jnp.clip(j, lo, jnp.maximum(hi - 1, lo))  # outside the span: re-use a fetched block
            seq = meta_ref[t * tiling.META_COLS + tiling.SEQ]
            return kv, h, tables_ref[seq * cols + jj * pages_per_block + i], 0, 0
        return pl.BlockSpec((None, None, None, page_size, d), index_map)

    kernel = functools.partial(
        _kernel, sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window, group_pad=group_pad,
        pages_per_block=pages_per_block, precision=precision,
    )
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(NT, hkv, num_blocks),
        in_specs=[pl.BlockSpec((None, None, rows, d), lambda t, h, j, *_: (t, h, 0, 0))]
        + [page_spec(0, i) for i in range(pages_per_block)]
        + [page_spec(1, i) for i in range(pages_per_block)],
        out_specs=pl.BlockSpec((None, None, rows, d), lambda t, h, j, *_: (t, h, 0, 0)),
        scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32),
                        pltpu.VMEM((rows, d), jnp.float32)],
    )
    call = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((NT, hkv, rows, d), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        name="jengine_ragged_paged_attention_tpu",
        # The TPU interpreter is chosen when the call is built: a `force_tpu_interpret_mode()` context
        # around the call alone would be gone by the time an enclosing `jit` lowers it.
        interpret=pltpu.InterpretParams() if interpret else False,
    )
    operands = [meta.reshape(-1), tables.reshape(-1), q_tiles] + [cache] * (2 * pages_per_block)
    return call(*operands)


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
    T, hq, d = q.shape
    hkv, page_size = tiling.check_attention_inputs("tpu", q, cache, sliding_window, soft_cap)
    S, P = block_tables.shape
    group_pad = tiling.next_pow2(hq // hkv)
    out_dtype = q.dtype
    q = q.astype(tiling.compute_dtype(q.dtype, cache.dtype))
    k_scale, v_scale = reference.kv_scales(cache.dtype, k_scale, v_scale)
    sm_scale = sm_scale * k_scale  # fp8 scales: K's joins sm_scale, V's scales the output
    q_lens, lens = tiling.seq_info(seq_lens, query_start_loc, num_seqs, S)

    pages_per_block = max(1, min(_KV_BLOCK_TOKENS // page_size, P))
    num_blocks = -(-P // pages_per_block)
    tables = jnp.pad(block_tables.astype(jnp.int32), ((0, 0), (0, num_blocks * pages_per_block - P)))
    kw: dict[str, Any] = dict(num_blocks=num_blocks, pages_per_block=pages_per_block, group_pad=group_pad, sm_scale=sm_scale,
              soft_cap=soft_cap, sliding_window=sliding_window, interpret=interpret)

    out = jnp.zeros((T, hq, d), jnp.float32)
    dec = tiling.plan_decode(q_lens, lens, query_start_loc, T, sliding_window)
    qt = tiling.gather_q(q, dec.token_idx, hkv, group_pad, max(_DECODE_MIN_ROWS, group_pad))
    out = tiling.scatter_out(out, _launch(qt, dec.meta, tables, cache, **kw), dec.token_idx, hq, group_pad)
    if T >= 2:
        bq = min(max(1, _PREFILL_ROWS // group_pad), tiling.next_pow2(T))
        pre = tiling.plan_prefill(q_lens, lens, query_start_loc, T, bq, sliding_window)
        qt = tiling.gather_q(q, pre.token_idx, hkv, group_pad, max(_DECODE_MIN_ROWS, bq * group_pad))
        out = tiling.scatter_out(out, _launch(qt, pre.meta, tables, cache, **kw), pre.token_idx, hq, group_pad)
    if v_scale != 1.0:
        out = out * v_scale
    return out.astype(out_dtype)
