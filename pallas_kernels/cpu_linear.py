"""One layer's projection read in place from stacked weights, native on the CPU.

The models scan their layers over weights stacked `[L, in, out]`. XLA's CPU dot takes its operand
from a buffer of its own, so `x @ w[layer]` inside the scan copies the layer's matrix out of the
stack every step (a dynamic slice is a fresh buffer there): for a decode step, which is bound by
reading the weights, that is two extra passes over every matrix. `stacked_linear` instead calls
`cpu_linear.cc`, which reads `w[layer]` where it lies, for steps of up to `MAX_ROWS` rows (decode
and small batches, where the weight bytes dominate); wider steps, other dtypes, and platforms other
than the CPU take `x @ w[layer]`, where the copy is small next to the matmul (or, on GPU, XLA reads
the slice in place itself).

`stacked_ragged_dot` is the same for a mixture-of-experts layer: rows sorted by expert times their
experts' matrices, read in place from the stacked experts (`jax.lax.ragged_dot`'s meaning; the CPU
lowering of `ragged_dot` multiplies every expert with every row).

`lm_head` is a decode step's logits, x @ w.T over the [V, H] embedding (or untied head), natively for
few rows: that matrix is the largest single read of a small model's step, and XLA's dot reads it as
fast at one row but 1.3-1.5x slower at 2-8 rows (`benchmarks/layer_weights.py`).

A step's token and logit counts are padded up to buckets (a one-row decode step runs 8 rows): each
function takes `rows`, how many leading rows of x are real, and the native kernels compute only those
(padding rows come out as zeros), so a decode step reads each weight once for its one row instead of
running the wider, slower tiles of 8. Without `rows` every row is real; the XLA fallbacks compute
every row (what padding rows hold is never read).
"""
from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp

from . import _native

logger = logging.getLogger(__name__)

TARGET = "jengine_cpu_stacked_linear"
RAGGED_TARGET = "jengine_cpu_stacked_ragged_dot"
MULTI_TARGET = "jengine_cpu_stacked_linears"
HEAD_TARGET = "jengine_cpu_lm_head"
_SOURCE = Path(__file__).with_name("cpu_linear.cc")
MAX_ROWS = 32  # above this the matmul's own cost hides the copy, and XLA's dot is the faster one
_WEIGHT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


@functools.cache
def _load() -> Optional[str]:
    reason = _native.load(_SOURCE, {"JengineStackedLinear": TARGET, "JengineStackedLinears": MULTI_TARGET,
                                      "JengineStackedRaggedDot": RAGGED_TARGET, "JengineLmHead": HEAD_TARGET})
    if reason is not None:
        logger.warning("native CPU projection unavailable (%s); layers copy their weights out of the stack", reason)
    return reason


def available() -> bool:
    """Whether the native kernel is built and registered (building it on the first call)."""
    return _load() is None


def reference(x: jax.Array, stack: jax.Array, layer: jax.Array | int) -> jax.Array:
    """x @ stack[layer] in `jax.numpy` (the kernel's oracle and fallback)."""
    return x @ jax.lax.dynamic_index_in_dim(stack, layer, keepdims=False)


def _count(rows: jax.Array | int | None, total: int) -> jax.Array:
    """`rows` (real leading rows; None: all `total`) as the kernels' int32[1] operand."""
    return jnp.reshape(jnp.asarray(total if rows is None else rows, jnp.int32), (1,))


def native(x: jax.Array, stack: jax.Array, layer: jax.Array | int, rows: jax.Array | int | None = None) -> jax.Array:
    """The kernel itself: x[T, in] float32 or bfloat16, stack[L, in, out] float32 or bfloat16; only
    x's first `rows` rows are computed (zeros below)."""
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], stack.shape[2]), jnp.float32))
    out = call(x.astype(jnp.float32), stack, jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)), _count(rows, x.shape[0]))
    return out.astype(jnp.result_type(x.dtype, stack.dtype))


def stacked_linear(x: jax.Array, stack: jax.Array, layer: jax.Array | int, rows: jax.Array | int | None = None) -> jax.Array:
    """x[..., in] @ stack[layer] without copying the layer's matrix out of `stack` where the kernel
    serves the shapes (on the CPU: up to `MAX_ROWS` rows, float32 / bfloat16 weights). `rows`: how
    many leading rows of x (flattened) are real; the kernel leaves the others zero."""
    lead, k = x.shape[:-1], x.shape[-1]
    total = math.prod(lead)
    if stack.ndim != 3 or total > MAX_ROWS or jnp.dtype(stack.dtype) not in _WEIGHT_DTYPES or not available():
        return reference(x, stack, layer)
    flat = x.reshape(total, k)
    out = jax.lax.platform_dependent(
        flat, stack, layer, _count(rows, total), cpu=native,
        default=lambda a, w, i, n: reference(a, w, i).astype(jnp.result_type(a.dtype, w.dtype)),
    )
    return out.reshape(*lead, stack.shape[2])


def stacked_linears(x: jax.Array, stacks: list[jax.Array], layer: jax.Array | int, rows: jax.Array | int | None = None) -> list[jax.Array]:
    """[x @ s[layer] for s in stacks] in one native call where `stacked_linear` would serve each (the
    projections that read the same input: q, k and v; gate and up), else one by one. `rows` as
    `stacked_linear`'s."""
    lead, k = x.shape[:-1], x.shape[-1]
    total = math.prod(lead)
    dtypes = {jnp.dtype(s.dtype) for s in stacks}
    if (len(stacks) < 2 or any(s.ndim != 3 for s in stacks) or len(dtypes) != 1 or total > MAX_ROWS
            or dtypes.pop() not in _WEIGHT_DTYPES or not available()):
        return [stacked_linear(x, s, layer, rows) for s in stacks]
    widths = [int(s.shape[2]) for s in stacks]
    out_dtype = jnp.result_type(x.dtype, stacks[0].dtype)

    def native_many(a: jax.Array, i: jax.Array, n: jax.Array, *ws: jax.Array) -> jax.Array:
        call = jax.ffi.ffi_call(MULTI_TARGET, jax.ShapeDtypeStruct((a.shape[0], sum(widths)), jnp.float32))
        return call(a.astype(jnp.float32), jnp.reshape(i.astype(jnp.int32), (1,)), n, *ws).astype(out_dtype)

    def xla_many(a: jax.Array, i: jax.Array, n: jax.Array, *ws: jax.Array) -> jax.Array:
        return jnp.concatenate([reference(a, w, i).astype(out_dtype) for w in ws], axis=-1)

    flat = x.reshape(total, k)
    y = jax.lax.platform_dependent(flat, jnp.asarray(layer, jnp.int32), _count(rows, total), *stacks, cpu=native_many, default=xla_many)
    outs, start = [], 0
    for w in widths:
        outs.append(y[:, start:start + w].reshape(*lead, w))
        start += w
    return outs


def ragged_reference(x: jax.Array, stack: jax.Array, base: jax.Array | int, group_sizes: jax.Array) -> jax.Array:
    """`stacked_ragged_dot` in `jax.numpy` (the kernel's oracle): `jax.lax.ragged_dot` over the
    matrices stack[base : base + E]."""
    E = group_sizes.shape[0]
    w = jax.lax.dynamic_slice_in_dim(stack, jnp.asarray(base, jnp.int32), E)
    return jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes.astype(jnp.int32))


def stacked_ragged_dot(x: jax.Array, stack: jax.Array, base: jax.Array | int, group_sizes: jax.Array) -> jax.Array:
    """Rows x[M, in] sorted by group: group e's rows times stack[base + e] ([G, in, out] matrices),
    read in place; rows past `sum(group_sizes)` come out as zeros. On the CPU with float32 /
    bfloat16 weights the native kernel (only groups with rows are read), else `ragged_reference`."""
    if jnp.dtype(stack.dtype) not in _WEIGHT_DTYPES or not available():
        return ragged_reference(x, stack, base, group_sizes)

    def native_ragged(a: jax.Array, w: jax.Array, b: jax.Array, sizes: jax.Array) -> jax.Array:
        call = jax.ffi.ffi_call(RAGGED_TARGET, jax.ShapeDtypeStruct((a.shape[0], w.shape[2]), jnp.float32))
        out = call(a.astype(jnp.float32), w, jnp.reshape(b.astype(jnp.int32), (1,)), sizes.astype(jnp.int32))
        return out.astype(jnp.result_type(a.dtype, w.dtype))

    return jax.lax.platform_dependent(
        x, stack, jnp.asarray(base, jnp.int32), group_sizes, cpu=native_ragged,
        default=lambda a, w, b, sizes: ragged_reference(a, w, b, sizes).astype(jnp.result_type(a.dtype, w.dtype)),
    )


def lm_head_reference(x: jax.Array, w: jax.Array) -> jax.Array:
    """x[T, H] @ w[V, H]^T in float32 (`lm_head`'s oracle and fallback): x is rounded to w's dtype
    first, the products accumulated in float32, as the model's head always did."""
    return jnp.einsum("sh,vh->sv", x.astype(w.dtype), w, preferred_element_type=jnp.float32)


def lm_head(x: jax.Array, w: jax.Array, rows: jax.Array | int | None = None) -> jax.Array:
    """Logits x[T, H] @ w[V, H]^T in float32, `w` (the embedding or an untied head) read in place by
    the native kernel on the CPU for up to `MAX_ROWS` rows and float32 / bfloat16 weights: a decode
    step's head is a stream over the whole [V, H] matrix, one contiguous row per logit. Else (or on
    other platforms) `lm_head_reference`. `rows`: how many leading rows of x are real (the kernel
    leaves the others' logits zero)."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[0] > MAX_ROWS or jnp.dtype(w.dtype) not in _WEIGHT_DTYPES or not available():
        return lm_head_reference(x, w)

    def native_head(a: jax.Array, e: jax.Array, n: jax.Array) -> jax.Array:
        call = jax.ffi.ffi_call(HEAD_TARGET, jax.ShapeDtypeStruct((a.shape[0], e.shape[0]), jnp.float32))
        return call(a.astype(e.dtype).astype(jnp.float32), e, n)  # x rounded to w's dtype, as the reference does

    return jax.lax.platform_dependent(x, w, _count(rows, x.shape[0]), cpu=native_head,
                                      default=lambda a, e, n: lm_head_reference(a, e))
