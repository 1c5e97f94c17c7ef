"""The quantized `Weight` classes the model layer applies through `linear` (one per storage layout).

Every class is a `jax.tree_util.register_dataclass` pytree whose array leaves carry the stacked layer
axis first (like every `layers.*` parameter), so the layer scan slices them like arrays and `apply`
sees one layer. `LEAF_AXES` names, for each leaf, what its dimensions after the layer axis are in
terms of the matrix it stands for (`"in"`, `"out"`, or None for an axis tensor parallelism never
splits); the sharding rules derive each leaf's `PartitionSpec` from it, so scales shard with their
channels. Three layouts cover every format:

    ChannelWeight    q[in, out] (int8 or float8_e4m3fn), scale[out]       y = (x @ q) * scale
    GroupedWeight    q[G, g, out] int8, scale[G, out]                     w = q * scale          (GGUF Q8_0)
    PackedInt4Weight packed[G, g/2, out] uint8, scale[G, out], offset[G, out]
                     (two 4-bit values per byte: value k in the low nibble, k + g/2 in the high one)
                                                                          w = q * scale + offset (AWQ, GPTQ, GGUF Q4_*)

Grouped layouts dequantize one layer's matrix inside the step (XLA fuses the unpacking and scaling
into one pass that feeds the dot); the whole float model is never built.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp

from jengine.models.layers import Weight

Axes = tuple["str | None", ...]


def _register(cls: type) -> type:
    fields = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(cls, data_fields=fields, meta_fields=[])


@_register
@dataclasses.dataclass
class ChannelWeight(Weight):
    """Weight-only int8 / fp8 with one scale per output channel (on-load int8/fp8, compressed-tensors)."""

    q: Any  # [..., in, out] int8 or float8_e4m3fn
    scale: Any  # [..., out], the activation dtype

    LEAF_AXES: ClassVar[dict[str, Axes]] = {"q": ("in", "out"), "scale": ("out",)}

    def apply(self, x: jax.Array) -> jax.Array:
        # The per-channel scale commutes with the sum over inputs: scale the [T, out] result, not the matrix.
        return (x @ self.q.astype(x.dtype)) * self.scale.astype(x.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    def dequantize(self) -> jax.Array:
        return self.q.astype(self.scale.dtype) * jnp.expand_dims(self.scale, -2)


@_register
@dataclasses.dataclass
class GroupedWeight(Weight):
    """int8 values with one scale per group of `g` input rows and output channel (GGUF Q8_0)."""

    q: Any  # [..., G, g, out] int8
    scale: Any  # [..., G, out]

    LEAF_AXES: ClassVar[dict[str, Axes]] = {"q": ("in", None, "out"), "scale": ("in", "out")}

    def apply(self, x: jax.Array) -> jax.Array:
        return x @ self.dequantize(x.dtype)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        dtype = dtype or self.scale.dtype
        w = self.q.astype(dtype) * self.scale.astype(dtype)[..., None, :]
        return w.reshape(*w.shape[:-3], w.shape[-3] * w.shape[-2], w.shape[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, G, g, out = self.q.shape
        return (*lead, G * g, out)


@_register
@dataclasses.dataclass
class PackedInt4Weight(Weight):
    """4-bit values packed two per byte with a scale and an offset per group (AWQ, GPTQ, GGUF Q4_0/Q4_1/Q4_K)."""

    packed: Any  # [..., G, g/2, out] uint8
    scale: Any  # [..., G, out]
    offset: Any  # [..., G, out]: w = q * scale + offset (offset = -zero * scale for AWQ/GPTQ)

    LEAF_AXES: ClassVar[dict[str, Axes]] = {"packed": ("in", None, "out"), "scale": ("in", "out"), "offset": ("in", "out")}

    def apply(self, x: jax.Array) -> jax.Array:
        return x @ self.dequantize(x.dtype)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        dtype = dtype or self.scale.dtype
        p = self.packed
        q = jnp.concatenate([p & 0x0F, p >> 4], axis=-2).astype(dtype)  # [..., G, g, out]
        w = q * self.scale.astype(dtype)[..., None, :] + self.offset.astype(dtype)[..., None, :]
        return w.reshape(*w.shape[:-3], w.shape[-3] * w.shape[-2], w.shape[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, G, half, out = self.packed.shape
        return (*lead, G * 2 * half, out)


QUANTIZED_WEIGHTS = (ChannelWeight, GroupedWeight, PackedInt4Weight)


def leaf_axes(weight: Weight) -> dict[str, Axes]:
    """Field name -> matrix axes of that leaf's dimensions after the layer axis."""
    axes = getattr(type(weight), "LEAF_AXES", None)
    if axes is None:
        raise TypeError(f"{type(weight).__name__} does not say how its leaves shard (no LEAF_AXES)")
    return axes


def map_leaves(weight: Weight, fn: Callable[[str, Any, Axes], Any]) -> Weight:
    """A copy of `weight` with each array leaf replaced by `fn(field, leaf, axes)`; nested Weights recurse."""
    changes = {}
    axes = getattr(type(weight), "LEAF_AXES", {})
    for f in dataclasses.fields(weight):
        value = getattr(weight, f.name)
        if isinstance(value, Weight):
            changes[f.name] = map_leaves(value, fn)
        elif value is not None:
            if f.name not in axes:
                raise TypeError(f"{type(weight).__name__}.{f.name}: no entry in LEAF_AXES")
            changes[f.name] = fn(f.name, value, axes[f.name])
    return dataclasses.replace(weight, **changes)


def weight_nbytes(tree: Any) -> int:
    """Bytes of every array leaf of a parameter tree (arrays, `ShapeDtypeStruct`s or `Weight`s)."""
    return sum(int(l.size) * jnp.dtype(l.dtype).itemsize for l in jax.tree_util.tree_leaves(tree))
