"""Building blocks the model families share: one projection, norms, MLPs, the attention call, the layer scan.

Parameters reach these functions as the per-layer slice of a family's stacked weights: a dict
`p` keyed by the family's short names (`p["wq"]`, `p["w_down"]`, ...). Every projection goes through
`linear`, so a quantized weight or a LoRA-wrapped weight can stand in for a plain matrix without a
model file changing: anything that subclasses `Weight` (a registered pytree whose leaves carry the
stacked layer axis first, so the layer scan slices it like an array) applies itself.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from jengine.attention import AttentionMetadata, paged_attention
from jengine.models.rope import apply_rope

Params = Mapping[str, Any]


class Weight:
    """A stand-in for a plain `[in, out]` matrix (quantized, LoRA-wrapped, ...).

    Subclasses are `jax.tree_util.register_dataclass` dataclasses: their array leaves are stacked
    over layers on axis 0 like every `layers.*` parameter, and `apply` sees one layer's slice.
    """

    def apply(self, x: jax.Array) -> jax.Array:
        """x[..., in] -> x @ W [..., out]."""
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the matrix this weight stands for (with the layer axis when stacked)."""
        raise NotImplementedError


def linear(x: jax.Array, w: jax.Array | Weight, bias: jax.Array | None = None) -> jax.Array:
    """The one projection every model calls: x @ w (+ bias), or `w.apply(x)` for a `Weight`."""
    y = w.apply(x) if isinstance(w, Weight) else x @ w
    return y if bias is None else y + bias


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, *, unit_offset: bool = False) -> jax.Array:
    """RMSNorm over the last axis, normalised in float32.

    Llama style (default): cast back to x's dtype, then scale by `weight`. Gemma style
    (`unit_offset=True`): scale by `1 + weight` in float32, then cast (HF's Gemma RMSNorm order).
    """
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if unit_offset:
        return (xf * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
    return weight * xf.astype(x.dtype)


def gated_mlp(h: jax.Array, p: Params, act: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """down(act(gate(h)) * up(h)) over `p["w_gate"]`, `p["w_up"]`, `p["w_down"]`."""
    return linear(act(linear(h, p["w_gate"])) * linear(h, p["w_up"]), p["w_down"])


def swiglu(h: jax.Array, p: Params) -> jax.Array:
    """The Llama-family MLP (SiLU gate)."""
    return gated_mlp(h, p, jax.nn.silu)


def geglu(h: jax.Array, p: Params) -> jax.Array:
    """The Gemma MLP (tanh-approximated GELU gate, HF's `gelu_pytorch_tanh`)."""
    return gated_mlp(h, p, functools.partial(jax.nn.gelu, approximate=True))


def embed(table: jax.Array, token_ids: jax.Array, scale: float | None = None) -> jax.Array:
    """Embedding rows of `token_ids`, times `scale` rounded to the table's dtype (as HF's Gemma does)."""
    x = jnp.take(table, token_ids, axis=0)
    return x if scale is None else x * jnp.asarray(scale, x.dtype)


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Static shape and options of one attention layer (a hashable value; differs per layer kind)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    sm_scale: float
    sliding_window: int | None = None
    soft_cap: float | None = None
    qk_norm: Callable[[jax.Array, jax.Array], jax.Array] | None = None  # per-head norm of q and k, if any


def attention(
    spec: AttentionSpec,
    p: Params,
    h: jax.Array,
    cache: Any,
    layer: jax.Array | int,
    md: AttentionMetadata,
    rope: tuple[jax.Array, jax.Array],
) -> tuple[Any, jax.Array]:
    """Self-attention of the new tokens h[T, H] over the paged cache; returns (cache, out[T, H]).

    q/k/v projections with their biases when `p` has them (`bq`, `bk`, `bv`, `bo`), the optional
    per-head q/k norm (`q_norm`, `k_norm`), RoPE, `paged_attention`, the output projection.
    """
    T, D = h.shape[0], spec.head_dim
    q = linear(h, p["wq"], p.get("bq")).reshape(T, spec.num_heads, D)
    k = linear(h, p["wk"], p.get("bk")).reshape(T, spec.num_kv_heads, D)
    v = linear(h, p["wv"], p.get("bv")).reshape(T, spec.num_kv_heads, D)
    if spec.qk_norm is not None:
        q, k = spec.qk_norm(q, p["q_norm"]), spec.qk_norm(k, p["k_norm"])
    cos, sin = rope
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    cache, o = paged_attention(
        cache, layer, q, k, v, md, sm_scale=spec.sm_scale, sliding_window=spec.sliding_window, soft_cap=spec.soft_cap
    )
    return cache, linear(o.reshape(T, spec.num_heads * D).astype(h.dtype), p["wo"], p.get("bo"))


def pattern_period(kinds: Sequence[Any]) -> int:
    """The shortest period p with kinds[i] == kinds[i % p] for every layer (1 when all layers are alike)."""
    n = len(kinds)
    return next(p for p in range(1, n + 1) if all(kinds[i] == kinds[i % p] for i in range(n)))


def scan_layers(
    layer_fn: Callable[[int, jax.Array | int, Params, Any], Any], params: Params, carry: Any, num_layers: int, period: int = 1
) -> Any:
    """Runs `carry = layer_fn(slot, layer, p, carry)` for every layer, under `jax.lax.scan`.

    Layers are scanned in units of `period` consecutive layers (the repeating pattern of layer kinds,
    e.g. 5 sliding-window layers then 1 global one); `slot = layer % period` is a Python int, so the
    body can pick each slot's static settings (its window, its RoPE). The `num_layers % period` layers
    left after the last whole unit run unrolled after the scan. `params` holds the stacked `[L, ...]`
    weights (arrays or `Weight` pytrees); `p` is one layer's slice. The body is traced once per slot.
    """
    units, tail = divmod(num_layers, period)

    def take(layer: jax.Array | int) -> Params:
        return jax.tree.map(lambda w: jax.lax.dynamic_index_in_dim(w, layer, keepdims=False), params)

    def unit(carry: Any, u: jax.Array) -> tuple[Any, None]:
        for slot in range(period):
            layer = u * period + slot
            carry = layer_fn(slot, layer, take(layer), carry)
        return carry, None

    if units:
        carry, _ = jax.lax.scan(unit, carry, jnp.arange(units, dtype=jnp.int32))
    for slot in range(tail):
        layer = units * period + slot
        carry = layer_fn(slot, layer, take(layer), carry)
    return carry
