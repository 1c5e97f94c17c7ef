"""Paged-attention backends against the reference, and the reference against a dense per-token oracle.

Kernels run on the CPU in interpret mode (GPU: `interpret=True`; TPU: the Mosaic interpreter, about
1000x slower than jax.numpy), so shapes stay tiny and each case is one jitted call that covers several
features at once (decode + prefill + chunked prefill + padding rows and tokens + pages spread over a
large, layer-split page space in random order).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jengine import pallas_kernels as pk

TOL = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2, jnp.float16: 2e-2}
FP8 = jnp.float8_e4m3fn


@dataclass
class Batch:
    """One ragged step: per-sequence (total length, new tokens), in decode-first order."""

    seqs: list[tuple[int, int]]
    hq: int = 4
    hkv: int = 2
    d: int = 64
    page_size: int = 16
    dtype: type = jnp.float32
    pad_rows: int = 1  # extra rows past num_seqs (seq_len 0, q_len 0)
    pad_tokens: int = 3  # extra tokens past query_start_loc[num_seqs]
    layers: int = 3  # the page space is split per layer; the batch lives in a middle layer's pages
    seed: int = 0
    cache_dtype: type | None = None  # None: `dtype`; FP8: an fp8 cache under float `dtype` queries
    k_scale: float = 1.0  # the fp8 cache's per-tensor scales
    v_scale: float = 1.0
    kv_codes: bool = False  # K/V drawn from the finite e4m3 values themselves (every code, exactly stored)
    arrays: dict = field(default_factory=dict)

    def build(self) -> "Batch":
        rng = np.random.default_rng(self.seed)
        ps, S = self.page_size, len(self.seqs) + self.pad_rows
        pages_needed = [math.ceil(n / ps) for n, _ in self.seqs]
        pages_per_layer = sum(pages_needed) + 5
        num_pages = self.layers * pages_per_layer + 1  # + the null page 0
        layer = self.layers // 2
        owned = 1 + layer * pages_per_layer + rng.permutation(pages_per_layer)  # shuffled page order
        P = max(pages_needed) + 1  # one spare column of junk page ids past every sequence's end
        tables = rng.integers(0, num_pages, size=(S, P)).astype(np.int32)
        kd, vd, slots, it = [], [], [], 0
        for s, (n, _) in enumerate(self.seqs):
            tables[s, : pages_needed[s]] = owned[it: it + pages_needed[s]]
            it += pages_needed[s]
            pos = np.arange(n)
            slots.append(tables[s, pos // ps] * ps + pos % ps)
            kd.append(rng.standard_normal((n, self.hkv, self.d)).astype(np.float32))
            vd.append(rng.standard_normal((n, self.hkv, self.d)).astype(np.float32))
            if self.kv_codes:  # K within +-4 (keeps the softmax soft), V over the whole range
                kd[-1] = rng.choice(E4M3_VALUES[np.abs(E4M3_VALUES) <= 4], size=kd[-1].shape) * self.k_scale
                vd[-1] = rng.choice(E4M3_VALUES, size=vd[-1].shape) * self.v_scale
        q_lens = [q for _, q in self.seqs] + [0] * self.pad_rows
        T = sum(q_lens) + self.pad_tokens
        q = rng.standard_normal((T, self.hq, self.d)).astype(np.float32)
        cast = lambda x: np.asarray(jnp.asarray(x, self.dtype).astype(jnp.float32))  # noqa: E731
        self.arrays = dict(
            q=cast(q), k=[cast(x) for x in kd], v=[cast(x) for x in vd], slots=np.concatenate(slots).astype(np.int32),
            seq_lens=np.array([n for n, _ in self.seqs] + [0] * self.pad_rows, np.int32),
            block_tables=tables, query_start_loc=np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32),
            num_seqs=np.array([len(self.seqs)], np.int32), num_pages=num_pages,
        )
        return self

    def cache(self, backend: str, interpret: bool = False):
        a = self.arrays
        c = pk.new_kv_cache(a["num_pages"], self.page_size, self.hkv, self.d, self.cache_dtype or self.dtype, backend=backend)
        k = jnp.asarray(np.concatenate(a["k"]), self.dtype)
        v = jnp.asarray(np.concatenate(a["v"]), self.dtype)
        # Some padding tokens also write (to the null page), as the engine's padding does.
        junk = jnp.ones((4, self.hkv, self.d), self.dtype) * 7
        k, v = jnp.concatenate([k, junk]), jnp.concatenate([v, junk])
        slots = jnp.asarray(np.concatenate([a["slots"], np.arange(4) % self.page_size]), jnp.int32)
        return pk.write_kv(c, k, v, slots, backend=backend, interpret=interpret, k_scale=self.k_scale, v_scale=self.v_scale)

    @property
    def num_real_tokens(self) -> int:
        return int(self.arrays["query_start_loc"][len(self.seqs)])


def run(batch: Batch, backend: str, *, sliding_window=None, soft_cap=None, interpret: bool = False,
        tuning=None) -> np.ndarray:
    """`backend`'s output for the batch; with a `GpuTuning`, the GPU kernel called with those settings."""
    a = batch.arrays
    kw = dict(sm_scale=1 / math.sqrt(batch.d), sliding_window=sliding_window, soft_cap=soft_cap, interpret=interpret,
              k_scale=batch.k_scale, v_scale=batch.v_scale)
    if tuning is not None:
        from jengine.pallas_kernels import gpu

        fn = jax.jit(functools.partial(gpu.ragged_paged_attention, tuning=tuning, **kw))
    else:
        fn = jax.jit(functools.partial(pk.ragged_paged_attention, backend=backend, **kw))
    # float32 matmuls at full precision: on a GPU the default would be TF32 (the oracle must not be).
    with jax.default_matmul_precision("highest"):
        out = fn(jnp.asarray(a["q"], batch.dtype), batch.cache(backend, interpret), jnp.asarray(a["seq_lens"]),
                 jnp.asarray(a["block_tables"]), jnp.asarray(a["query_start_loc"]), jnp.asarray(a["num_seqs"]))
    out = np.asarray(out.astype(jnp.float32))
    assert out.shape == a["q"].shape
    assert np.isfinite(out).all(), "padding must not poison the output with NaN/inf"
    return out


def np_e4m3(x: np.ndarray, *, saturate: bool = True) -> np.ndarray:
    """x rounded to nearest-even on the float8 e4m3fn grid (3 mantissa bits; subnormal step 2^-9),
    saturating at +-448: plain numpy arithmetic, independent of any fp8 cast."""
    x = np.asarray(x, np.float64)
    if saturate:
        x = np.clip(x, -448.0, 448.0)
    a = np.abs(x)
    step = 2.0 ** (np.floor(np.log2(np.maximum(a, 2.0**-6))) - 3)  # below 2^-6 the subnormal step
    return (np.sign(x) * np.round(a / step) * step).astype(np.float32)  # np.round: half to even


# Every finite e4m3fn value (256 codes less the two NaNs), built from the format's definition.
E4M3_VALUES = np.array(sorted({s * (m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
                               for s in (1, -1) for e in range(16) for m in range(8) if (e, m) != (15, 7)}), np.float32)


def dense_oracle(batch: Batch, *, sliding_window=None, soft_cap=None, quantize=None) -> np.ndarray:
    """Naive per-token attention straight from the generated K/V (no pages, no cache); with
    `quantize`, K and V are first passed through it as `quantize(x / scale) * scale`."""
    a = batch.arrays
    out = np.zeros_like(a["q"])
    g = batch.hq // batch.hkv
    for s, (n, qn) in enumerate(batch.seqs):
        ks, vs = a["k"][s], a["v"][s]
        if quantize is not None:
            ks, vs = quantize(ks / batch.k_scale) * batch.k_scale, quantize(vs / batch.v_scale) * batch.v_scale
        k = np.repeat(ks, g, axis=1)
        v = np.repeat(vs, g, axis=1)
        for i in range(qn):
            t, p = a["query_start_loc"][s] + i, n - qn + i
            lo = 0 if sliding_window is None else max(0, p - sliding_window + 1)
            sc = np.einsum("hd,khd->hk", a["q"][t], k[lo: p + 1]) / math.sqrt(batch.d)
            if soft_cap is not None:
                sc = soft_cap * np.tanh(sc / soft_cap)
            w = np.exp(sc - sc.max(axis=1, keepdims=True))
            out[t] = np.einsum("hk,khd->hd", w / w.sum(axis=1, keepdims=True), v[lo: p + 1])
    return out


def rel_err(x: np.ndarray, ref: np.ndarray, n: int) -> float:
    return float(np.linalg.norm(x[:n] - ref[:n]) / np.linalg.norm(ref[:n]))


def check(batch: Batch, backend: str, tuning=None, **kw) -> None:
    """`backend` against the reference: natively on its own platform, in interpret mode elsewhere."""
    ref = run(batch, "reference", **kw)
    out = run(batch, backend, interpret=pk.runs_interpreted(backend), tuning=tuning, **kw)
    err = rel_err(out, ref, batch.num_real_tokens)
    assert err < TOL[batch.dtype], f"{backend}: relative error {err:.2e}"


# decode x2 (one ending mid-page, one on a page boundary), chunked prefill (context + new tokens),
# a fresh prompt ending mid-page.
MIXED = [(37, 1), (32, 1), (45, 7), (23, 23)]


# ---------------------------------------------------------------- the reference against the oracle


@pytest.mark.parametrize("window,cap", [(None, None), (9, 5.0)])
def test_reference_matches_dense_oracle(window, cap):
    b = Batch(MIXED + [(130, 1), (70, 66)], hq=6, hkv=2).build()
    ref = run(b, "reference", sliding_window=window, soft_cap=cap)
    dense = dense_oracle(b, sliding_window=window, soft_cap=cap)
    assert rel_err(ref, dense, b.num_real_tokens) < 1e-5
    if window is not None:  # the comparison can fail: an off-by-one window is caught
        assert rel_err(ref, dense_oracle(b, sliding_window=window + 1, soft_cap=cap), b.num_real_tokens) > 1e-3


@pytest.mark.parametrize("window", [None, 70])
def test_reference_decode_items_straddle_trips(window):
    # The reference cuts decode rows into 64-token work items and takes S items per loop trip: with
    # three rows of 300, 129 and 64 tokens (5 + 3 + 1 items) and S = 4, rows split across trips, one
    # trip mixes rows, and the prefill row has no decode items at all.
    b = Batch([(300, 1), (129, 1), (64, 1), (40, 9)], hq=6, hkv=2, pad_rows=0).build()
    ref = run(b, "reference", sliding_window=window)
    assert rel_err(ref, dense_oracle(b, sliding_window=window), b.num_real_tokens) < 1e-5


def test_reference_decode_merges_across_item_buffers():
    # Decode items are buffered and merged into their rows once every few trips. With S = 3 rows
    # (3 items a trip), the second row's items must straddle the end of the first buffer, so its
    # running state is rescaled between two merges.
    from jengine.pallas_kernels.reference import _DECODE_KV_TOKENS, _DECODE_TRIPS_PER_MERGE

    buffer = 3 * _DECODE_TRIPS_PER_MERGE  # items per merge
    first = (buffer - 10) * _DECODE_KV_TOKENS  # row 0 ends 10 items before the merge ...
    second = 20 * _DECODE_KV_TOKENS + 5  # ... and row 1 runs 11 items past it
    b = Batch([(first, 1), (second, 1), (70, 1)], hq=6, hkv=2, pad_rows=0).build()
    ref = run(b, "reference")
    assert rel_err(ref, dense_oracle(b), b.num_real_tokens) < 1e-5


def test_reference_decode_more_rows_than_items_per_trip():
    # A trip takes at most _DECODE_ITEMS_PER_TRIP items, so with more decode rows than that a trip
    # ends inside the batch's rows and later trips start mid-row; one short prefill row rides along.
    from jengine.pallas_kernels.reference import _DECODE_ITEMS_PER_TRIP

    rng = np.random.default_rng(3)
    rows = [(int(n), 1) for n in rng.integers(1, 200, size=_DECODE_ITEMS_PER_TRIP + 9)] + [(20, 7)]
    b = Batch(rows, hq=6, hkv=2).build()
    assert b.arrays["block_tables"].shape[0] > _DECODE_ITEMS_PER_TRIP
    ref = run(b, "reference")
    assert rel_err(ref, dense_oracle(b), b.num_real_tokens) < 1e-5


@pytest.mark.parametrize("window", [None, 100])
def test_reference_prefill_tilings(window):
    # Prefill rows pick their query-block tiling by length: one row in each tiling, two of them
    # chunked (context before the new tokens), none a multiple of its block size.
    b = Batch([(30, 1), (50, 50), (150, 120), (340, 300)], hq=6, hkv=2).build()
    ref = run(b, "reference", sliding_window=window)
    assert rel_err(ref, dense_oracle(b, sliding_window=window), b.num_real_tokens) < 1e-5


# ---------------------------------------------------------------- GPU kernel (Triton), interpret mode


DECODE_ONLY = [(5, 1), (16, 1), (17, 1), (100, 1), (1, 1)]
PREFILL_ONLY = [(19, 19), (40, 12), (3, 2)]  # one fresh prompt, one chunked prefill, one tiny


@pytest.mark.parametrize("seqs,hq,hkv,d,ps,dtype", [
    (MIXED, 6, 2, 64, 16, jnp.float32),           # GQA 3 (group padded to a power of two)
    (MIXED, 2, 2, 128, 32, jnp.bfloat16),         # MHA
    (PREFILL_ONLY, 8, 2, 256, 64, jnp.float16),   # GQA 4, largest head dim, no decode rows
    (DECODE_ONLY, 8, 1, 64, 128, jnp.bfloat16),   # MQA, largest page, no prefill rows
    (MIXED, 9, 3, 64, 16, jnp.bfloat16),          # SmolLM2's heads
], ids=["gqa3-f32", "mha-bf16", "prefill-d256-f16", "decode-mqa-ps128", "smollm2"])
def test_gpu_matches_reference(seqs, hq, hkv, d, ps, dtype):
    check(Batch(seqs, hq=hq, hkv=hkv, d=d, page_size=ps, dtype=dtype).build(), "gpu")


def test_gpu_sliding_window_and_soft_cap():
    check(Batch(MIXED + [(90, 1)], hq=8, hkv=2, page_size=16).build(), "gpu", sliding_window=20, soft_cap=3.0)


@pytest.mark.parametrize("unmasked_inner_blocks", [True, False])
def test_gpu_window_spanning_many_blocks(unmasked_inner_blocks):
    """Contexts several 64-token KV blocks past a 150-token window: blocks before the window, masked
    blocks at its start, whole blocks inside it and the masked causal edge, for decode, chunked
    prefill and a fresh prompt; with and without the unmasked inner-block loop."""
    from jengine.pallas_kernels import gpu

    b = Batch([(400, 1), (300, 40), (130, 130)], hq=8, hkv=2, page_size=16).build()
    check(b, "gpu", sliding_window=150, tuning=gpu.GpuTuning(unmasked_inner_blocks=unmasked_inner_blocks))


def test_gpu_long_context_decode():
    """One sequence over 1000 tokens: the decode path splits the KV length (flash-decoding)."""
    check(Batch([(1203, 1)], hq=4, hkv=2, page_size=32, pad_rows=0).build(), "gpu")


# ---------------------------------------------------------------- native CPU kernel (C++ XLA FFI)


def _native_cpu():
    from jengine.pallas_kernels import _native, cpu

    if _native.compiler() is None:  # a compiler that is there but fails to build the kernel fails the tests
        pytest.skip("no C++ compiler on PATH: the CPU platform uses the reference backend")
    assert cpu._load() is None, cpu._load()
    return cpu


@pytest.mark.parametrize("seqs,hq,hkv,d,ps,dtype", [
    (MIXED, 6, 2, 64, 16, jnp.float32),                 # GQA 3; prefill tiles on the page-16 fast path
    ([(300, 120), (50, 50), (17, 1)], 8, 2, 128, 16, jnp.bfloat16),  # head_dim 128 fast path, bfloat16
    (MIXED + [(300, 1)], 2, 2, 128, 32, jnp.bfloat16),  # MHA, page 32: the generic path for every row
    (DECODE_ONLY, 8, 1, 64, 128, jnp.float32),          # MQA, largest page, no prefill rows
    (PREFILL_ONLY, 8, 2, 256, 64, jnp.float16),         # float16 cache: the reference serves it
    # decode rows past 256 tokens are split into 256-token items: 5 items, 1 (exactly 256), 2, 1 token
    ([(1203, 1), (256, 1), (257, 1), (1, 1), (70, 33)], 9, 3, 64, 16, jnp.float32),
], ids=["gqa3-f32", "d128-bf16", "mha-bf16-ps32", "decode-mqa-ps128", "f16-reference", "split-decode"])
def test_cpu_matches_reference(seqs, hq, hkv, d, ps, dtype):
    _native_cpu()
    b = Batch(seqs, hq=hq, hkv=hkv, d=d, page_size=ps, dtype=dtype).build()
    check(b, "cpu")
    if dtype == jnp.float32:  # and against the dense oracle, tightly
        assert rel_err(run(b, "cpu"), dense_oracle(b), b.num_real_tokens) < 1e-5


@pytest.mark.parametrize("ps", [16, 32])
def test_cpu_sliding_window_and_soft_cap(ps):
    # A 300-token window: over a 700-token decode row it starts inside the row's second 256-token
    # item; over a 200-token chunk after 300 cached tokens it moves with every query. Page 16 takes
    # the prefill fast path, page 32 the generic one.
    _native_cpu()
    b = Batch([(700, 1), (300, 1), (90, 1), (40, 9), (500, 200)], hq=8, hkv=2, page_size=ps).build()
    kw = dict(sliding_window=300, soft_cap=3.0)
    check(b, "cpu", **kw)
    out = run(b, "cpu", **kw)
    assert rel_err(out, dense_oracle(b, **kw), b.num_real_tokens) < 1e-5
    assert rel_err(out, dense_oracle(b, sliding_window=301, soft_cap=3.0), b.num_real_tokens) > 1e-3


def test_cpu_is_the_cpu_default_and_falls_back_without_a_compiler(monkeypatch, caplog):
    cpu = _native_cpu()
    assert pk.resolve_backend(None) == "cpu"
    assert not pk.runs_interpreted("cpu")
    from jengine.pallas_kernels import _native

    monkeypatch.setattr(_native, "compiler", lambda: None)
    with caplog.at_level("WARNING"):
        assert "no C++ compiler" in cpu._load.__wrapped__()
    assert "native CPU attention unavailable" in caplog.text
    monkeypatch.setattr(cpu, "_load", lambda: "no C++ compiler (c++) on PATH")
    assert pk.resolve_backend(None) == "reference"
    with pytest.raises(RuntimeError, match="unavailable"):
        b = Batch(MIXED).build()
        run(b, "cpu")


def test_gpu_backend_falls_back_to_reference_with_one_warning_when_pallas_triton_is_gone(monkeypatch, caplog):
    """A JAX without Pallas' Triton backend (deprecated in 0.11): the GPU kernel cannot import, so the
    reference kernel serves, with one warning naming the cause, instead of a failed start."""
    import sys

    assert pk.resolve_backend("gpu") == "gpu"  # this JAX has it (interpret mode on the CPU)
    from jax.experimental import pallas

    monkeypatch.setitem(sys.modules, "jax.experimental.pallas.triton", None)  # importing it now raises ImportError
    monkeypatch.delattr(pallas, "triton", raising=False)
    monkeypatch.delitem(sys.modules, "jengine.pallas_kernels.gpu")
    monkeypatch.setattr(pk, "_gpu_import_error", [])
    with caplog.at_level("WARNING"):
        assert pk.resolve_backend("gpu") == "reference"
        assert pk.resolve_backend("gpu") == "reference"
    warnings = [r for r in caplog.records if "Pallas GPU attention kernel cannot be imported" in r.getMessage()]
    assert len(warnings) == 1 and "using the reference" in warnings[0].getMessage()


def test_cpu_kernel_build_is_cached_per_source_and_machine(monkeypatch, tmp_path):
    from jengine.pallas_kernels import _native

    cpu = _native_cpu()
    monkeypatch.setenv("JENGINE_CACHE_DIR", str(tmp_path))
    cxx = _native.compiler()
    first = _native.build(cpu._SOURCE, cxx)
    assert first.parent == tmp_path / "cpu_kernels" and first.stat().st_size > 0
    stamp = first.stat().st_mtime_ns
    assert _native.build(cpu._SOURCE, cxx) == first and first.stat().st_mtime_ns == stamp  # reused, not rebuilt
    from jengine.pallas_kernels import cpu_linear

    assert _native.build(cpu_linear._SOURCE, cxx) != first  # another source: another library
    monkeypatch.setattr(_native, "FLAGS", _native.FLAGS + ("-DJENGINE_TEST_FLAG=1",))
    assert _native.build(cpu._SOURCE, cxx) != first  # other flags: another library
    monkeypatch.setattr(_native, "FLAGS", _native.FLAGS + ("-DNOT_CXX(",))
    with pytest.raises(RuntimeError, match="failed"):
        _native.build(cpu._SOURCE, cxx)


# ---------------------------------------------------------------- native CPU projection (stacked weights)


def _native_linear():
    from jengine.pallas_kernels import _native, cpu_linear

    if _native.compiler() is None:
        pytest.skip("no C++ compiler on PATH: layers copy their weights out of the stack")
    assert cpu_linear._load() is None, cpu_linear._load()
    return cpu_linear


@pytest.mark.parametrize("rows,k,n,dtype", [
    (1, 96, 128, jnp.float32),     # one decode row, whole 64-column blocks
    (2, 64, 600, jnp.float32),     # two rows: two 256-column blocks, then a 64-column one and 24 columns
    (7, 80, 200, jnp.float32),     # 4 + 3 rows; a last block 8 columns wide
    (32, 64, 64, jnp.bfloat16),    # the widest step it serves, bfloat16 weights widened in C++
    (3, 40, 24, jnp.bfloat16),     # fewer columns than one block
])
def test_cpu_stacked_linear_matches_numpy(rows, k, n, dtype):
    cl = _native_linear()
    rng = np.random.default_rng(rows * 1000 + n)
    stack = jnp.asarray(rng.standard_normal((3, k, n)), dtype)
    x = jnp.asarray(rng.standard_normal((rows, k)), dtype)
    f = jax.jit(cl.native)
    for layer in range(3):
        want = np.asarray(x, np.float64) @ np.asarray(stack[layer], np.float64)
        got = np.asarray(f(x, stack, jnp.int32(layer)), np.float64)
        tol = 1e-5 if dtype == jnp.float32 else 2e-2  # bfloat16: the output is rounded to bfloat16
        assert np.abs(got - want).max() <= tol * np.abs(want).max(), layer


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpu_stacked_ragged_dot_matches_numpy(dtype):
    """Groups with no rows, one group past the rows, an offset into the stack (a later layer's
    experts), a width not a multiple of the 64-column block; rows past the groups come out zero."""
    cl = _native_linear()
    rng = np.random.default_rng(7)
    M, K, N = 23, 40, 100
    stack = jnp.asarray(rng.standard_normal((12, K, N)), dtype)
    x = jnp.asarray(rng.standard_normal((M, K)), dtype)
    f = jax.jit(cl.stacked_ragged_dot)
    for base, sizes in [(0, [3, 0, 9, 1, 0, 6]), (6, [0, 0, 0, 0, 0, 20]), (6, [5, 30, 0, 0, 0, 0])]:
        got = np.asarray(f(x, stack, jnp.int32(base), jnp.asarray(sizes, jnp.int32)), np.float64)
        want, row = np.zeros((M, N)), 0
        for e, n in enumerate(sizes):
            n = min(n, M - row)
            want[row:row + n] = np.asarray(x[row:row + n], np.float64) @ np.asarray(stack[base + e], np.float64)
            row += n
        tol = 1e-5 if dtype == jnp.float32 else 2e-2
        assert np.abs(got - want).max() <= tol * np.abs(want).max(), (base, sizes)
        assert not got[row:].any()
        assert cl.RAGGED_TARGET in f.lower(x, stack, jnp.int32(base), jnp.asarray(sizes, jnp.int32)).compile().as_text()


@pytest.mark.parametrize("rows,dtype", [(1, jnp.float32), (3, jnp.float32), (2, jnp.bfloat16)])
def test_cpu_stacked_linears_is_each_projection_in_one_call(rows, dtype):
    """Three matrices of different widths (256-column, 64-column and narrower blocks) read the same x
    in one native call; each output equals its own matmul. Mixed weight dtypes go one by one."""
    cl = _native_linear()
    rng = np.random.default_rng(rows)
    stacks = [jnp.asarray(rng.standard_normal((3, 48, n)), dtype) for n in (300, 64, 20)]
    x = jnp.asarray(rng.standard_normal((rows, 48)), dtype)
    f = jax.jit(cl.stacked_linears)
    outs = f(x, stacks, jnp.int32(1))
    for out, s in zip(outs, stacks):
        want = np.asarray(x, np.float64) @ np.asarray(s[1], np.float64)
        tol = 1e-5 if dtype == jnp.float32 else 2e-2
        assert out.shape == (rows, s.shape[2]) and np.abs(np.asarray(out, np.float64) - want).max() <= tol * np.abs(want).max()
    hlo = f.lower(x, stacks, jnp.int32(1)).compile().as_text()
    assert hlo.count(f'custom_call_target="{cl.MULTI_TARGET}"') == 1
    mixed = [stacks[0].astype(jnp.float32), stacks[1].astype(jnp.bfloat16)]
    assert cl.MULTI_TARGET not in f.lower(x, mixed, jnp.int32(1)).compile().as_text()


def test_cpu_linear_calls_from_several_threads_at_once():
    """The kernels share one set of helper threads: calls made at the same time from several threads
    (each helper serves one call; the callers finish what the helpers miss) all come out right."""
    import concurrent.futures

    cl = _native_linear()
    rng = np.random.default_rng(5)
    stack = jnp.asarray(rng.standard_normal((2, 64, 600)), jnp.float32)
    head = jnp.asarray(rng.standard_normal((900, 64)), jnp.float32)
    xs = [jnp.asarray(rng.standard_normal((1 + i % 3, 64)), jnp.float32) for i in range(4)]
    lin, hd = jax.jit(cl.native), jax.jit(cl.lm_head)

    def work(i: int) -> float:
        x, err = xs[i], 0.0
        want_lin = np.asarray(x, np.float64) @ np.asarray(stack[1], np.float64)
        want_head = np.asarray(x, np.float64) @ np.asarray(head, np.float64).T
        for _ in range(10):
            err = max(err, np.abs(np.asarray(lin(x, stack, jnp.int32(1))) - want_lin).max() / np.abs(want_lin).max(),
                      np.abs(np.asarray(hd(x, head)) - want_head).max() / np.abs(want_head).max())
        return err

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        errs = list(pool.map(work, range(4)))
    assert max(errs) <= 1e-5, errs


def test_stacked_linear_serves_small_steps_natively_and_wide_ones_through_xla():
    """Up to MAX_ROWS rows the compiled step calls the kernel and holds no copy of a layer's matrix;
    wider steps, a leading batch shape and float16 weights take XLA's dot, with the same values."""
    cl = _native_linear()
    rng = np.random.default_rng(0)
    stack = jnp.asarray(rng.standard_normal((4, 48, 80)), jnp.float32)
    f = jax.jit(cl.stacked_linear)
    for shape in [(cl.MAX_ROWS, 48), (cl.MAX_ROWS + 1, 48), (2, 3, 48)]:
        x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        hlo = f.lower(x, stack, jnp.int32(2)).compile().as_text()
        rows = int(np.prod(shape[:-1]))
        assert (cl.TARGET in hlo) == (rows <= cl.MAX_ROWS)
        if rows <= cl.MAX_ROWS:
            assert "f32[48,80]" not in hlo and "f32[1,48,80]" not in hlo  # the layer's matrix is never materialised
        np.testing.assert_allclose(np.asarray(f(x, stack, jnp.int32(2))), np.asarray(x) @ np.asarray(stack[2]), rtol=1e-5, atol=1e-5)
    half = stack.astype(jnp.float16)
    x = jnp.ones((2, 48), jnp.float16)
    assert cl.TARGET not in f.lower(x, half, jnp.int32(1)).compile().as_text()


@pytest.mark.parametrize("rows,vocab,hidden,dtype", [
    (1, 1000, 96, jnp.float32),     # one decode row; 1000 = 7 blocks of 128 vocabulary rows + 104
    (3, 131, 20, jnp.float32),      # odd vocabulary (a tail of 3 rows) and a hidden size under one vector
    (5, 257, 40, jnp.bfloat16),     # 4 + 1 rows of x; bfloat16 weights widened in C++
    (32, 70, 33, jnp.bfloat16),     # the most rows it serves; hidden 33 = 2 vectors + 1
])
def test_cpu_lm_head_matches_numpy(rows, vocab, hidden, dtype):
    """Logits x @ w.T with w [V, H] read in place: the native head equals float64 numpy of x rounded
    to w's dtype (what the XLA head computes), and its compiled form holds the kernel's call."""
    cl = _native_linear()
    rng = np.random.default_rng(vocab + rows)
    w = jnp.asarray(rng.standard_normal((vocab, hidden)), dtype)
    x = jnp.asarray(rng.standard_normal((rows, hidden)), jnp.float32)
    f = jax.jit(cl.lm_head)
    got = f(x, w)
    assert got.dtype == jnp.float32 and got.shape == (rows, vocab)
    want = np.asarray(x.astype(dtype), np.float64) @ np.asarray(w, np.float64).T
    assert np.abs(np.asarray(got, np.float64) - want).max() <= 1e-5 * np.abs(want).max()
    np.testing.assert_allclose(np.asarray(got), np.asarray(cl.lm_head_reference(x, w)), rtol=1e-4, atol=1e-4)
    assert cl.HEAD_TARGET in f.lower(x, w).compile().as_text()


def test_lm_head_serves_few_rows_natively_and_many_through_xla():
    cl = _native_linear()
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((50, 16)), jnp.float32)
    f = jax.jit(cl.lm_head)
    for rows in (cl.MAX_ROWS, cl.MAX_ROWS + 1):
        x = jnp.asarray(rng.standard_normal((rows, 16)), jnp.float32)
        assert (cl.HEAD_TARGET in f.lower(x, w).compile().as_text()) == (rows <= cl.MAX_ROWS)
        np.testing.assert_allclose(np.asarray(f(x, w)), np.asarray(x) @ np.asarray(w).T, rtol=1e-5, atol=1e-5)
    half = w.astype(jnp.float16)
    assert cl.HEAD_TARGET not in f.lower(jnp.ones((2, 16), jnp.float32), half).compile().as_text()


def test_native_projections_compute_only_the_real_rows():
    """A step's bucket pads its tokens (one decode row runs in a bucket of 8): given `rows`, the
    projection, the grouped q/k/v-style call and the head compute x's first `rows` rows (equal to
    numpy) and leave the padding rows zero; a count past the bucket is clamped, 0 computes nothing."""
    cl = _native_linear()
    rng = np.random.default_rng(11)
    T, K = 8, 48
    stacks = [jnp.asarray(rng.standard_normal((2, K, n)), jnp.float32) for n in (300, 64)]
    head = jnp.asarray(rng.standard_normal((200, K)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((T, K)), jnp.float32)
    one, many, hd = jax.jit(cl.stacked_linear), jax.jit(cl.stacked_linears), jax.jit(cl.lm_head)
    full = [np.asarray(x, np.float64) @ np.asarray(s[1], np.float64) for s in stacks]
    full_head = np.asarray(x, np.float64) @ np.asarray(head, np.float64).T
    for rows in (1, 3, 0, T, T + 5):
        real = min(rows, T)
        n = jnp.asarray([rows], jnp.int32)  # a traced count, as the model passes it
        outs = [one(x, stacks[0], jnp.int32(1), n), *many(x, stacks, jnp.int32(1), n), hd(x, head, n)]
        for got, want in zip(outs, [full[0], *full, full_head]):
            got = np.asarray(got, np.float64)
            assert np.abs(got[:real] - want[:real]).max(initial=0) <= 1e-5 * np.abs(want).max(), rows
            assert not got[real:].any(), rows
    hlo = one.lower(x, stacks[0], jnp.int32(1), jnp.asarray([1], jnp.int32)).compile().as_text()
    assert cl.TARGET in hlo


def _oracle_threshold(x: np.ndarray, w: np.ndarray, target: float) -> float:
    """The largest value v of x with sum(w[x >= v]) >= target, by a full sort (float64 sums)."""
    if not target > 0:
        return -np.inf
    vals = np.unique(x[w > 0])[::-1]
    mass = np.array([w[x >= v].sum(dtype=np.float64) for v in vals])
    hit = np.flatnonzero(mass >= target)
    return float(vals[hit[0]]) if hit.size else float(x.min())


def test_cpu_mass_threshold_matches_a_full_sort():
    """The sampler's native cut: unit weights (the k-th largest value, ties counted), probabilities (the
    top-p cut), zero weights and -inf logits (banned tokens), no cut (target 0 -> -inf), a target past
    the row's mass (-> its smallest value), values in one narrow range (the radix select's last levels)."""
    from jengine.pallas_kernels import _native, cpu_sampling

    if _native.compiler() is None:
        pytest.skip("no C++ compiler: the sampler computes its cuts in jax.numpy")
    assert cpu_sampling.available()
    rng = np.random.default_rng(3)
    S, V = 9, 700
    x = (rng.standard_normal((S, V)) * 3).astype(np.float32)
    x[1] = np.round(x[1])  # many ties
    x[2, :50] = -np.inf
    x[3] = (1.0 + rng.random(V) * 1e-4).astype(np.float32)  # one exponent, a few mantissa bits apart
    w = np.exp(x - x.max(axis=1, keepdims=True)).astype(np.float32)
    w[4, rng.random(V) < 0.5] = 0.0
    targets = np.array([0.9, 0.5, 0.3, 0.7, 0.95, 0.0, 2.0, 1e-9, 1.0], np.float32) * w.sum(axis=1)
    got = np.asarray(jax.jit(cpu_sampling.mass_threshold)(jnp.asarray(x), jnp.asarray(w), jnp.asarray(targets)))
    for s in range(S):
        assert got[s] == _oracle_threshold(x[s], w[s].astype(np.float64), float(targets[s])), s
    ks = np.array([1, 5, 40, 700, 0, 3, 701, 2, 100], np.float32)
    got = np.asarray(jax.jit(lambda a, k: cpu_sampling.mass_threshold(a, None, k))(jnp.asarray(x), jnp.asarray(ks)))
    for s in range(S):
        assert got[s] == _oracle_threshold(x[s], np.ones(V), float(ks[s])), s
        if 0 < ks[s] <= V:
            assert got[s] == np.sort(x[s])[::-1][int(ks[s]) - 1]


def test_num_logit_rows_counts_the_real_logits_rows():
    """The head's real rows come from the step's logits indices (strictly increasing, padding 0)."""
    from jengine.worker.step_inputs import num_logit_rows

    for indices, want in [([4, 9, 10, 0, 0, 0, 0, 0], 3), ([0, 0, 0, 0], 1), ([0, 3, 4, 5], 4), ([7, 0], 1)]:
        assert int(jax.jit(num_logit_rows)(jnp.asarray(indices, jnp.int32))[0]) == want, indices


# ---------------------------------------------------------------- TPU kernel (Mosaic interpreter)


def test_tpu_mixed_gqa3_f32():
    check(Batch(MIXED, hq=6, hkv=2, page_size=16).build(), "tpu")


def test_tpu_window_cap_mqa_bf16():
    b = Batch([(50, 1), (30, 9)], hq=4, hkv=1, d=128, page_size=32, dtype=jnp.bfloat16, pad_tokens=1).build()
    check(b, "tpu", sliding_window=20, soft_cap=4.0)


def test_tpu_long_context_decode_d256_f16():
    check(Batch([(1100, 1)], hq=2, hkv=1, d=256, page_size=128, dtype=jnp.float16, pad_rows=0, pad_tokens=1).build(), "tpu")


# ---------------------------------------------------------------- inputs the kernels cannot serve


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_unsupported_inputs_raise(backend):
    with pytest.raises(ValueError, match="head_dim"):
        pk.new_kv_cache(8, 16, 1, 96, jnp.float32, backend=backend)
    with pytest.raises(ValueError, match="page_size"):
        pk.new_kv_cache(8, 8, 1, 64, jnp.float32, backend=backend)
    with pytest.raises(ValueError, match="dtype"):
        pk.new_kv_cache(8, 16, 1, 64, jnp.int8, backend=backend)
    cache = pk.new_kv_cache(8, 16, 2, 64, jnp.float32, backend=backend)
    args = (jnp.ones((1,), jnp.int32), jnp.ones((1, 1), jnp.int32), jnp.array([0, 1], jnp.int32), jnp.ones((1,), jnp.int32))
    with pytest.raises(ValueError, match="head_dim"):
        pk.ragged_paged_attention(jnp.ones((1, 2, 128)), cache, *args, sm_scale=1.0, backend=backend, interpret=True)
    with pytest.raises(ValueError, match="multiple"):
        pk.ragged_paged_attention(jnp.ones((1, 3, 64)), cache, *args, sm_scale=1.0, backend=backend, interpret=True)
    with pytest.raises(ValueError, match="cache"):
        page_major = jnp.zeros((8, 16, 2, 2, 64), jnp.float32)  # [pages, page_size, 2, Hkv, D]: not this layout
        pk.ragged_paged_attention(jnp.ones((1, 2, 64)), page_major, *args, sm_scale=1.0, backend=backend, interpret=True)


def test_gpu_tuning_rejects_what_triton_cannot_tile():
    from jengine.pallas_kernels import gpu

    with pytest.raises(ValueError, match="kv_block_tokens"):
        gpu.GpuTuning(kv_block_tokens=48)
    with pytest.raises(ValueError, match="num_stages"):
        gpu.GpuTuning(num_stages=0)
    assert gpu.GpuTuning(decode_warps=8, prefill_rows=128).prefill_rows == 128


# ---------------------------------------------------------------- fp8 (e4m3fn) KV cache, every backend


def test_np_e4m3_rounds_onto_the_e4m3_grid():
    # The oracle's quantizer: every output is an e4m3 value, the nearest one (ties to even), saturated.
    x = np.concatenate([np.random.default_rng(0).standard_normal(4000) * 10.0 ** np.random.default_rng(1).uniform(-4, 3, 4000),
                        [0.0, 448.0, 460.0, 1e6, -1e6, 2.0**-10, 3 * 2.0**-10, 17.0, 19.0]])
    q = np_e4m3(x)
    assert np.isin(q, E4M3_VALUES).all()
    clipped = np.clip(x, -448, 448)
    dist = np.abs(E4M3_VALUES[None, :] - clipped[:, None]).min(axis=1)
    np.testing.assert_allclose(np.abs(q - clipped), dist, rtol=0, atol=1e-12)
    # ties to even mantissa: 17 = 16 + half a step of 2 -> 16; 19 -> 20; 2^-10 (half the subnormal step) -> 0
    assert q[-4] == 0.0 and q[-3] == 2.0**-8 and q[-2] == 16.0 and q[-1] == 20.0
    assert q[-8] == q[-7] == q[-6] == 448.0 and q[-5] == -448.0


@pytest.mark.parametrize("backend", ["reference", "gpu", "tpu"])
def test_fp8_write_kv_stores_the_numpy_quantization(backend):
    # write_kv divides by the per-tensor scale, saturates at 448 and rounds to nearest even; the stored
    # bytes equal the independent numpy quantization exactly, for K and V with different scales.
    rng = np.random.default_rng(5)
    k = (rng.standard_normal((40, 2, 64)) * 10.0 ** rng.uniform(-3, 2, (40, 2, 64))).astype(np.float32)
    v = (rng.standard_normal((40, 2, 64)) * 50).astype(np.float32)
    k[0, 0, :4] = [1e5, -1e5, 447.9 * 0.25, 1e-7]  # saturates, saturates, rounds to 448, rounds to 0
    ks, vs = 0.25, 0.125
    cache = pk.new_kv_cache(8, 16, 2, 64, FP8, backend=backend)
    assert cache.dtype == jnp.uint8 and cache.nbytes == 2 * 2 * 8 * 16 * 64  # e4m3 bytes, one per value
    slots = rng.permutation(np.arange(16, 8 * 16))[:40].astype(np.int32)
    cache = pk.write_kv(cache, jnp.asarray(k), jnp.asarray(v), jnp.asarray(slots), backend=backend,
                        interpret=pk.runs_interpreted(backend), k_scale=ks, v_scale=vs)
    assert cache.dtype == jnp.uint8
    values = jax.lax.bitcast_convert_type(cache, FP8).astype(jnp.float32)
    flat = np.asarray(values).reshape(2, 2, -1, 64)[:, :, slots].transpose(0, 2, 1, 3)
    np.testing.assert_array_equal(flat[0], np_e4m3(k / ks))
    np.testing.assert_array_equal(flat[1], np_e4m3(v / vs))
    assert np.isfinite(flat).all() and flat[0, 0, 0, 0] == 448.0 and flat[0, 0, 0, 1] == -448.0


FP8_MIXED = MIXED + [(130, 1), (70, 66)]


def test_reference_fp8_matches_quantize_dequantize_oracle():
    # The reference's fp8 path = float attention over numpy-quantized K/V. k_scale 0.02 spreads K over
    # e4m3's binades; v_scale 0.004 saturates the largest V values (|v| > 1.8). Window and cap on.
    b = Batch(FP8_MIXED, hq=6, hkv=2, cache_dtype=FP8, k_scale=0.02, v_scale=0.004).build()
    kw = dict(sliding_window=9, soft_cap=5.0)
    ref = run(b, "reference", **kw)
    n = b.num_real_tokens
    assert rel_err(ref, dense_oracle(b, quantize=np_e4m3, **kw), n) < 1e-5
    # The check can fail: the float (unquantized) oracle and one without saturation are both far off.
    assert rel_err(ref, dense_oracle(b, **kw), n) > 1e-3
    assert rel_err(ref, dense_oracle(b, quantize=functools.partial(np_e4m3, saturate=False), **kw), n) > 1e-3


@pytest.mark.parametrize("seqs,hq,hkv,d,ps,codes,window,cap", [
    # page-16 fast path for prefill tiles, split decode rows (1203 tokens: 5 items), window and cap
    (MIXED + [(1203, 1), (300, 120)], 9, 3, 64, 16, False, 300, 3.0),
    # head_dim 128, page 32: the generic path for every row; K/V drawn from every e4m3 code
    (MIXED + [(300, 1)], 2, 2, 128, 32, True, None, None),
], ids=["fast-split-window-cap", "generic-all-codes"])
def test_cpu_fp8_matches_reference(seqs, hq, hkv, d, ps, codes, window, cap):
    # The C++ kernel decodes e4m3 bytes itself (a table built from the format): against the reference,
    # which reads the same cache through XLA's converts, to float32 rounding.
    _native_cpu()
    b = Batch(seqs, hq=hq, hkv=hkv, d=d, page_size=ps, cache_dtype=FP8, k_scale=0.05, v_scale=0.5, kv_codes=codes).build()
    kw = dict(sliding_window=window, soft_cap=cap)
    out = run(b, "cpu", **kw)
    assert rel_err(out, run(b, "reference", **kw), b.num_real_tokens) < 1e-5
    # and against the independent numpy quantize-dequantize oracle (exact for K/V already on the grid)
    assert rel_err(out, dense_oracle(b, quantize=np_e4m3, **kw), b.num_real_tokens) < 1e-5
    if codes:
        assert rel_err(out, dense_oracle(b, **kw), b.num_real_tokens) < 1e-5


def test_gpu_fp8_matches_reference():
    # SmolLM2's heads (group 3 padded to 4), decode + chunked prefill + prompt, window and soft cap.
    b = Batch(MIXED, hq=9, hkv=3, page_size=16, cache_dtype=FP8, k_scale=0.05, v_scale=0.5).build()
    check(b, "gpu", sliding_window=30, soft_cap=4.0)


def test_tpu_fp8_matches_reference():
    check(Batch([(37, 1), (12, 5)], hq=4, hkv=2, page_size=16, cache_dtype=FP8, k_scale=0.05, v_scale=0.5,
                pad_tokens=1).build(), "tpu")
