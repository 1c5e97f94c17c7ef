"""Reference paged attention in pure `jax.numpy`: the kernels' test oracle and the CPU fallback.

Cache layout: one array `[2, num_kv_heads, num_pages, page_size, head_dim]` (K at index 0, V at 1),
the same as the native CPU and the GPU and TPU kernels'. Gathering a sequence's pages per KV head yields contiguous
`[tokens, head_dim]` blocks that feed batched matmuls without transposes (2.5x faster decode on the
CPU than a page-major layout).

Because this is also the CPU path wherever the native `cpu` backend cannot be built (no C++
compiler), it only reads the pages each sequence owns and never makes decode rows pay for
prefill-sized work:

- decode rows (one new token) are cut into work items of one KV chunk each, laid out row after row;
  a `while_loop` takes a fixed number of items a trip whatever rows they belong to, so a batch pays
  for the tokens its rows hold rather than S times its longest row (partial softmaxes merged per row);
- rows with several new tokens (prefill and chunked prefill) are visited one at a time, tiled into
  query blocks, and each block walks only the KV chunks its causal (and sliding-window) span covers.

Everything is computed in float32 and cast back to the query dtype. An fp8 cache (float8 e4m3,
`KV_FP8`, stored as its uint8 bytes: `storage_dtype`) holds `x / scale` with one scale for all K and
one for all V (`k_scale`, `v_scale`): `write_kv` quantizes (saturating at +-448) and the attention
dequantizes each gathered block.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

_DECODE_KV_TOKENS = 64  # KV tokens per decode work item
_DECODE_ITEMS_PER_TRIP = 32  # work items per decode loop trip (fewer when the batch has fewer rows)
_DECODE_TRIPS_PER_MERGE = 16  # decode loop trips whose items' partial softmaxes are merged into their rows at once
# Prefill tilings (min new tokens, query rows per block, KV tokens per inner iteration), by length.
_PREFILL_TILES = ((2, 32, 128), (96, 128, 128), (256, 256, 256))
_MASKED = -1e30
KV_FP8 = jnp.float8_e4m3fn  # the fp8 KV cache's element type (e4m3, no infinities: saturate before casting)
FP8_MAX = 448.0  # the largest finite e4m3fn value


FP8_BYTES = jnp.uint8  # how every backend stores an fp8 cache: the e4m3 bit patterns (see `new_kv_cache`)


def is_fp8(dtype: Any) -> bool:
    """Whether a cache of `dtype` holds e4m3 values: `KV_FP8` itself, or its bytes (`FP8_BYTES`)."""
    return jnp.dtype(dtype) in (jnp.dtype(KV_FP8), jnp.dtype(FP8_BYTES))


def storage_dtype(dtype: Any) -> Any:
    """The element type of a cache asked for as `dtype`: an fp8 cache is stored as its bytes.

    XLA's CPU backend has no f8 data movement: it rewrote a scatter into a float8 cache as a convert
    of the whole cache to float16 and back, every layer of every step (0.74 s for a 184 MB cache
    against 0.1 ms for the same scatter into float32), and a bitcast of the whole cache to bytes
    around the scatter still copied it (0.33 s). Stored as uint8 from the start, writes and page
    gathers move bytes in place; only the gathered blocks are bitcast to e4m3 and upcast.
    """
    return jnp.dtype(FP8_BYTES) if is_fp8(dtype) else jnp.dtype(dtype)


def kv_scales(cache_dtype: Any, k_scale: float, v_scale: float) -> tuple[float, float]:
    """The (k, v) scales that apply to a cache of `cache_dtype`: float caches store K/V as they are."""
    return (float(k_scale), float(v_scale)) if is_fp8(cache_dtype) else (1.0, 1.0)


def quantize_kv(x: jax.Array, scale: float, dtype: Any) -> jax.Array:
    """K or V as a cache of element type `dtype` stores it: cast, or for fp8 divide by the scale,
    saturate to +-448, round to nearest e4m3 (e4m3fn has no infinity: an unclipped overflow would
    become NaN) and keep the bytes."""
    if not is_fp8(dtype):
        return x.astype(dtype)
    y = x.astype(jnp.float32)
    if scale != 1.0:
        y = y / scale
    return lax.bitcast_convert_type(jnp.clip(y, -FP8_MAX, FP8_MAX).astype(KV_FP8), FP8_BYTES)


def dequantize_kv(x: jax.Array, scale: float) -> jax.Array:
    """Cache values -> float32 K or V (an fp8 cache's bytes decoded and multiplied by the scale)."""
    if not is_fp8(x.dtype):
        return x.astype(jnp.float32)
    if x.dtype != KV_FP8:
        x = lax.bitcast_convert_type(x, KV_FP8)
    y = x.astype(jnp.float32)
    return y * scale if scale != 1.0 else y


def new_kv_cache(num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: Any) -> jax.Array:
    """A zeroed cache `[2, num_kv_heads, num_pages, page_size, head_dim]` (fp8: uint8 e4m3 bytes, 0 = +0.0)."""
    return jnp.zeros((2, num_kv_heads, num_pages, page_size, head_dim), storage_dtype(dtype))


def write_kv(cache: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array, *, interpret: bool = False,
             k_scale: float = 1.0, v_scale: float = 1.0) -> jax.Array:
    """Scatters k/v[T, Hkv, D] into slots `page * page_size + offset` (in place when donated); an fp8
    cache stores them quantized with the per-tensor scales."""
    del interpret
    _, hkv, num_pages, page_size, d = cache.shape
    flat = cache.reshape(2, hkv, num_pages * page_size, d)
    kq, vq = quantize_kv(k, k_scale, cache.dtype), quantize_kv(v, v_scale, cache.dtype)
    kv = jnp.stack([kq, vq]).transpose(0, 2, 1, 3)  # [2, Hkv, T, D]
    flat = flat.at[:, :, slot_mapping].set(kv, mode="drop")
    return flat.reshape(cache.shape)


def _scores(s: jax.Array, sm_scale: float, soft_cap: float | None) -> jax.Array:
    s = s * sm_scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    return s


def _online_update(m, l, acc, s, mask, v, pv_spec: str):
    """One step of the streaming softmax: fold masked scores `s[..., K]` and values `v` into (m, l, acc)."""
    s = jnp.where(mask, s, _MASKED)
    m_new = jnp.maximum(m, s.max(axis=-1))
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    alpha = jnp.exp(m - m_new)
    l = l * alpha + p.sum(axis=-1)
    acc = acc * alpha[..., None] + jnp.einsum(pv_spec, p, v)
    return m_new, l, acc


def _per_group(spec: str, a: jax.Array, b: jax.Array, groups: int) -> jax.Array:
    """einsum over axis 2 of `a` (the query heads sharing a KV head) one head at a time.

    For decode the group is tiny (often 1-8 rows), and XLA on the CPU runs a batch of matrix-vector
    products much faster than the same work as a batch of [group x D] matmuls (1.7x here).
    """
    return jnp.stack([jnp.einsum(spec, a[:, :, g], b) for g in range(groups)], axis=2)


def _pad_pages(block_tables: jax.Array, multiple: int) -> jax.Array:
    pad = (-block_tables.shape[1]) % multiple
    return jnp.pad(block_tables, ((0, 0), (0, pad))) if pad else block_tables


def _decode_attention(q, cache, q_lens, seq_lens, block_tables, query_start_loc, *, sm_scale, sliding_window, soft_cap,
                      k_scale=1.0, v_scale=1.0):
    """Attention for every row with exactly one new token; other rows come back as zeros. -> [S, Hq, D].

    Ragged over work items: item = (decode row, one chunk of `_DECODE_KV_TOKENS` of its context), laid
    out row after row. Each `while_loop` trip takes the next B = min(S, `_DECODE_ITEMS_PER_TRIP`)
    items whatever rows they belong to, so a batch pays for the tokens its rows hold (rounded up to a
    chunk per row), not S x its longest row.
    Each item yields a partial softmax (max, sum, weighted values) that a trip stores in a buffer of
    `_DECODE_TRIPS_PER_MERGE` trips' items; once per buffer, a sorted segment max and sum merge them
    into their rows' running state. XLA's CPU scatters are slow per call, so merging once every few
    trips beats both a scatter and a dense one-hot merge per trip (10-17% faster decode attention at
    64-128 rows than the one-hot merge per trip).
    """
    T, Hq, D = q.shape
    S = block_tables.shape[0]
    Hkv, page_size = cache.shape[1], cache.shape[3]
    G = Hq // Hkv
    chunk_pages = max(1, _DECODE_KV_TOKENS // page_size)
    chunk = chunk_pages * page_size
    tables = _pad_pages(block_tables, chunk_pages)
    # Items per trip: a trip's gathered K and V (2 x Hkv x B x chunk x D floats) should stay in
    # cache while its matvecs read them; with B = S = 128 they were 12 MB and the whole decode
    # attention ran 1.5x slower than with B = 32 (2.5x at S = 256).
    B = min(S, _DECODE_ITEMS_PER_TRIP)

    is_decode = q_lens == 1
    lens = jnp.where(is_decode, seq_lens, 0)
    lo = jnp.zeros_like(lens)
    if sliding_window is not None:
        lo = jnp.where(is_decode, jnp.maximum(lens - sliding_window, 0), 0)
    first_chunk = lo // chunk
    num_chunks = jnp.where(is_decode, (lens + chunk - 1) // chunk - first_chunk, 0)
    ends = jnp.cumsum(num_chunks)  # items of row r are [ends[r] - num_chunks[r], ends[r])
    total = ends[-1]
    dq = q[jnp.clip(query_start_loc[:S], 0, T - 1)].astype(jnp.float32).reshape(S, Hkv, G, D).transpose(1, 0, 2, 3)

    NB = _DECODE_TRIPS_PER_MERGE

    def trip(t, m_buf, l_buf, acc_buf):
        """Partial softmax of items [t * B, (t + 1) * B), stored at slot t % NB of the buffers."""
        item = t * B + jnp.arange(B)
        valid = item < total
        row = jnp.minimum(jnp.searchsorted(ends, item, side="right"), S - 1)
        c = first_chunk[row] + item - (ends[row] - num_chunks[row])
        pages = jnp.take_along_axis(tables[row], c[:, None] * chunk_pages + jnp.arange(chunk_pages)[None, :], axis=1)
        k = dequantize_kv(cache[0][:, pages].reshape(Hkv, B, chunk, D), k_scale)
        v = dequantize_kv(cache[1][:, pages].reshape(Hkv, B, chunk, D), v_scale)
        s = _scores(_per_group("hbd,hbkd->hbk", dq[:, row], k, G), sm_scale, soft_cap)  # [Hkv, B, G, chunk]
        kpos = c[:, None] * chunk + jnp.arange(chunk)[None, :]
        mask = (kpos < lens[row][:, None]) & (kpos >= lo[row][:, None]) & valid[:, None]
        s = jnp.where(mask[None, :, None, :], s, _MASKED)
        m_i = s.max(axis=-1)  # [Hkv, B, G]
        p = jnp.where(mask[None, :, None, :], jnp.exp(s - m_i[..., None]), 0.0)
        l_i = p.sum(axis=-1)
        acc_i = _per_group("hbk,hbkd->hbd", p, v, G)  # [Hkv, B, G, D]
        at = (t % NB) * B
        m_buf = lax.dynamic_update_slice_in_dim(m_buf, m_i.transpose(1, 0, 2), at, axis=0)
        l_buf = lax.dynamic_update_slice_in_dim(l_buf, l_i.transpose(1, 0, 2), at, axis=0)
        acc_buf = lax.dynamic_update_slice_in_dim(acc_buf, acc_i.transpose(1, 0, 2, 3), at, axis=0)
        return m_buf, l_buf, acc_buf

    def block(carry):
        """Up to NB trips, then one sorted segment merge of their items into the rows' state."""
        t0, m, l, acc, m_buf, l_buf, acc_buf = carry
        t_end = jnp.minimum(t0 + NB, (total + B - 1) // B)
        _, m_buf, l_buf, acc_buf = lax.while_loop(
            lambda x: x[0] < t_end, lambda x: (x[0] + 1, *trip(*x)), (t0, m_buf, l_buf, acc_buf)
        )
        item = t0 * B + jnp.arange(NB * B)
        seg = jnp.where(item < jnp.minimum(total, t_end * B), jnp.searchsorted(ends, item, side="right"), S)  # S: dropped
        m_new = jnp.maximum(m, jax.ops.segment_max(m_buf, seg, num_segments=S, indices_are_sorted=True))
        w = jnp.exp(m_buf - m_new[jnp.minimum(seg, S - 1)])
        alpha = jnp.exp(m - m_new)
        l = l * alpha + jax.ops.segment_sum(w * l_buf, seg, num_segments=S, indices_are_sorted=True)
        acc = acc * alpha[..., None] + jax.ops.segment_sum(w[..., None] * acc_buf, seg, num_segments=S, indices_are_sorted=True)
        return t_end, m_new, l, acc, m_buf, l_buf, acc_buf

    init = (
        jnp.int32(0),
        jnp.full((S, Hkv, G), _MASKED, jnp.float32),
        jnp.zeros((S, Hkv, G), jnp.float32),
        jnp.zeros((S, Hkv, G, D), jnp.float32),
        jnp.full((NB * B, Hkv, G), _MASKED, jnp.float32),
        jnp.zeros((NB * B, Hkv, G), jnp.float32),
        jnp.zeros((NB * B, Hkv, G, D), jnp.float32),
    )
    _, _, l, acc, *_ = lax.while_loop(lambda carry: carry[0] * B < total, block, init)
    out = acc / jnp.maximum(l, 1e-30)[..., None]  # [S, Hkv, G, D]
    return out.reshape(S, Hq, D)


def _prefill_attention(q, cache, q_lens, seq_lens, block_tables, query_start_loc, *, sm_scale, sliding_window, soft_cap,
                       k_scale=1.0, v_scale=1.0):
    """Attention for every row with two or more new tokens, one sequence at a time. -> [T, Hq, D].

    Each sequence picks its tiling at run time: `_PREFILL_TILES` small query blocks for short rows
    (little causal waste), big ones for long rows (fewer, larger matmuls): against one 64x256 tiling,
    1.6x on 128-token prompts, 1.9x on an 80-token one, 1.25x on 512-token ones.

    The G query heads of a KV head are stacked as rows of one [G * BQ, D] x [D, K] matmul, so scores
    come out with keys minor and the softmax reads them in place (an einsum over [BQ, Hkv, G, D]
    queries let XLA pick a key-major output that every softmax pass then transposed: 1.5x slower).
    """
    T, Hq, D = q.shape
    Hkv, page_size = cache.shape[1], cache.shape[3]
    G = Hq // Hkv
    max_bq = max(bq for _, bq, _ in _PREFILL_TILES)
    # Query heads sharing a KV head become rows of one matmul: [Hkv, G, T, D], sliced per block.
    qp = jnp.pad(q.astype(jnp.float32), ((0, max_bq), (0, 0), (0, 0))).reshape(T + max_bq, Hkv, G, D).transpose(1, 2, 0, 3)
    out0 = jnp.zeros((T + max_bq, Hq, D), jnp.float32)

    def tiled(BQ, kv_tokens):
        chunk_pages = max(1, kv_tokens // page_size)
        chunk = chunk_pages * page_size
        tables = _pad_pages(block_tables, chunk_pages)

        def one_sequence(s, out):
            n, start, total = q_lens[s], query_start_loc[s], seq_lens[s]
            ctx = total - n
            row_pages = tables[s]

            def q_block(b, out):
                q0 = b * BQ
                qb = lax.dynamic_slice_in_dim(qp, start + q0, BQ, axis=2).reshape(Hkv, G * BQ, D)
                rows = q0 + jnp.arange(BQ)
                valid = rows < n
                qpos = jnp.tile(ctx + rows, G)  # row g * BQ + i of the block is query i of head g
                last_pos = ctx + jnp.minimum(q0 + BQ, n) - 1
                lo_first = 0 if sliding_window is None else jnp.maximum(ctx + q0 - sliding_window + 1, 0)

                def kv_chunk(c, carry):
                    m, l, acc = carry
                    pages = lax.dynamic_slice_in_dim(row_pages, c * chunk_pages, chunk_pages)
                    kv = cache[:, :, pages].reshape(2, Hkv, chunk, D)
                    kc, vc = dequantize_kv(kv[0], k_scale), dequantize_kv(kv[1], v_scale)
                    sc = _scores(jnp.einsum("hmd,hkd->hmk", qb, kc), sm_scale, soft_cap)
                    kpos = c * chunk + jnp.arange(chunk)
                    mask = kpos[None, :] <= qpos[:, None]
                    if sliding_window is not None:
                        mask &= kpos[None, :] > qpos[:, None] - sliding_window
                    return _online_update(m, l, acc, sc, mask[None], vc, "hmk,hkd->hmd")

                init = (
                    jnp.full((Hkv, G * BQ), _MASKED, jnp.float32),
                    jnp.zeros((Hkv, G * BQ), jnp.float32),
                    jnp.zeros((Hkv, G * BQ, D), jnp.float32),
                )
                _, l, acc = lax.fori_loop(lo_first // chunk, last_pos // chunk + 1, kv_chunk, init)
                blk = (acc / jnp.maximum(l, 1e-30)[..., None]).reshape(Hkv, G, BQ, D).transpose(2, 0, 1, 3).reshape(BQ, Hq, D)
                cur = lax.dynamic_slice_in_dim(out, start + q0, BQ)
                return lax.dynamic_update_slice_in_dim(out, jnp.where(valid[:, None, None], blk, cur), start + q0, axis=0)

            return lax.fori_loop(0, (n + BQ - 1) // BQ, q_block, out)

        return one_sequence

    branches = [tiled(bq, kv) for _, bq, kv in _PREFILL_TILES]
    thresholds = jnp.asarray([min_len for min_len, _, _ in _PREFILL_TILES[1:]], jnp.int32)
    # Visit only the prefill rows: a conditional per decode row costs a copy of `out` on the CPU.
    is_prefill = q_lens > 1  # q_lens is already 0 on padding rows
    rows = jnp.nonzero(is_prefill, size=q_lens.shape[0], fill_value=0)[0]

    def visit(i, out):
        s = rows[i]
        return lax.switch(jnp.sum(q_lens[s] >= thresholds), branches, s, out)

    out = lax.fori_loop(0, jnp.sum(is_prefill), visit, out0)
    return out[:T]


def check_inputs(backend: str, q: jax.Array, cache: jax.Array) -> None:
    """Raises ValueError unless `cache` is `[2, Hkv, pages, page_size, D]` for q[T, Hq, D] with Hkv | Hq
    (this layout's backends: reference, cpu)."""
    Hq, D = q.shape[1], q.shape[2]
    if cache.ndim != 5 or cache.shape[0] != 2 or cache.shape[4] != D:
        raise ValueError(f"{backend} cache must be [2, Hkv, pages, page_size, {D}], got {cache.shape}")
    if Hq % cache.shape[1]:
        raise ValueError(f"num query heads {Hq} must be a multiple of num kv heads {cache.shape[1]}")


def real_rows(seq_lens: jax.Array, query_start_loc: jax.Array, num_seqs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(new tokens, total length) per row, both 0 on the padding rows past `num_seqs`."""
    S = seq_lens.shape[0]
    real = jnp.arange(S) < jnp.minimum(jnp.reshape(num_seqs, (-1,))[0], S)
    return jnp.where(real, query_start_loc[1:] - query_start_loc[:-1], 0), jnp.where(real, seq_lens, 0)


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
    T = q.shape[0]
    S = block_tables.shape[0]
    check_inputs("reference", q, cache)
    q_lens, seq_lens = real_rows(seq_lens, query_start_loc, num_seqs)
    k_scale, v_scale = kv_scales(cache.dtype, k_scale, v_scale)
    kw = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, k_scale=k_scale, v_scale=v_scale)

    out = _prefill_attention(q, cache, q_lens, seq_lens, block_tables, query_start_loc, **kw)
    dec = _decode_attention(q, cache, q_lens, seq_lens, block_tables, query_start_loc, **kw)
    rows = jnp.where(q_lens == 1, query_start_loc[:S], T)  # non-decode rows scatter out of bounds
    out = out.at[rows].set(dec, mode="drop")
    return out.astype(q.dtype)
