"""`LoRAWeight`: a projection plus the adapter delta of each token's slot (the punica idea, as two matmuls).

The device holds every slot's adapter side by side: `a [L, in, S*R]` and `b [L, S*R, out]`
(slot s owns columns / rows `[s*R, (s+1)*R)`, each adapter padded with zeros to R = max_lora_rank
and its scale folded into b). A step computes `u = x @ a` for all slots at once, zeroes in each
token's row every slot but its own (slot -1: all of them, the base model), then `u @ b`. That is two
dense matmuls of width S*R instead of a gather of per-token matrices, which suits a handful of slots
on every backend; with no adapter token in the step, `lax.cond` skips both.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jengine.models.layers import Weight, linear


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, token_slot: jax.Array, rank: int) -> jax.Array:
    """x[T, in] -> sum over the token's slot s of (x @ a[:, s]) @ b[s] (zero for slot -1), [T, out]."""

    def delta(x: jax.Array) -> jax.Array:
        u = linear(x, a.astype(x.dtype))
        owner = jnp.arange(a.shape[-1], dtype=jnp.int32) // rank
        u = jnp.where(owner == token_slot[..., None], u, jnp.zeros((), u.dtype))
        return linear(u, b.astype(x.dtype))

    def none(x: jax.Array) -> jax.Array:
        return jnp.zeros((*x.shape[:-1], b.shape[-1]), x.dtype)

    return jax.lax.cond(jnp.any(token_slot >= 0), delta, none, x)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoRAWeight(Weight):
    """`base` (a matrix or any `Weight`, e.g. a quantized one) plus each token's adapter delta.

    Leaves are stacked over layers like every `layers.*` parameter (`token_slot` is the step's slot
    per token broadcast over layers), so the layer scan hands `apply` one layer's slice.
    """

    base: Any  # [L, in, out] or a Weight
    a: jax.Array  # [L, in, S*R]
    b: jax.Array  # [L, S*R, out]
    token_slot: jax.Array  # [L, T] int32, -1 = no adapter
    rank: int = dataclasses.field(metadata=dict(static=True))

    def apply(self, x: jax.Array) -> jax.Array:
        return linear(x, self.base) + lora_delta(x, self.a, self.b, self.token_slot, self.rank)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)
