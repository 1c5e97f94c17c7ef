"""The seam between models and the paged-attention kernels.

Models never touch the KV cache directly: each attention layer calls `paged_attention`, which writes
the new tokens' K/V through `jengine.pallas_kernels.write_kv` and attends through
`ragged_paged_attention`. All layers share one cache array whose page space is split per layer:
layer `l` owns pages `[l * pages_per_layer, (l + 1) * pages_per_layer)`, so the host-side page
allocator hands out per-layer page ids and this module offsets them. That keeps the kernel contract
layer-agnostic and lets the model run its layers under `jax.lax.scan` with the cache as a carry that
XLA updates in place.

Layer groups (`jengine.core.kv_cache_layout`). When a model's sliding-window layers keep only the pages
their window sees, each group of layers (full attention, each window) has its own page ids: the
metadata then carries one slot mapping and block table per group (group 0's in the plain fields, the
others' in `group_*`), `group_windows` says which window each group serves and `layer_page_offsets`
where each layer's pages start. A layer picks its group statically from its `sliding_window`, and its
offset from the static table by its (possibly traced) index. A sliding-window group's block tables hold
page 0 (the null page) for pages behind the window; every kernel starts at or after the window's first
page, or reads page 0 and masks it, so the null page's values (finite: padding tokens' K/V) never count.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jengine import pallas_kernels

MODEL_AXIS = "model"  # the mesh axis tensor parallelism splits heads over (jengine.sharding)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Per-step ragged batch layout, built on the host (see `StepInputs` in docs/architecture.md).

    slot_mapping[T]: `page * page_size + offset` for each new token (per-layer page ids; padding -> 0).
    seq_lens[S]: cached context plus new tokens of each sequence (0 for padding rows).
    block_tables[S, P]: per-layer page ids of each sequence (unused entries 0).
    query_start_loc[S + 1]: cumulative new-token counts.
    num_seqs[1]: how many of the S rows are real.
    group_slot_mapping[G - 1, T], group_block_tables[G - 1, S, P]: layer groups 1.. (None with one group).
    """

    slot_mapping: jax.Array | np.ndarray  # numpy on the host, jax.Array inside the jitted step
    seq_lens: jax.Array | np.ndarray
    block_tables: jax.Array | np.ndarray
    query_start_loc: jax.Array | np.ndarray
    num_seqs: jax.Array | np.ndarray
    pages_per_layer: int = dataclasses.field(metadata=dict(static=True), default=0)
    page_size: int = dataclasses.field(metadata=dict(static=True), default=16)
    backend: str | None = dataclasses.field(metadata=dict(static=True), default=None)
    # Tensor parallelism with a Pallas backend: the kernel runs per device under `shard_map` over this
    # mesh's "model" axis (XLA cannot partition a kernel); None on one device or for `reference`.
    mesh: Any = dataclasses.field(metadata=dict(static=True), default=None)
    shard_kv: bool = dataclasses.field(metadata=dict(static=True), default=False)
    interpret: bool = dataclasses.field(metadata=dict(static=True), default=False)  # Pallas interpret mode
    group_slot_mapping: jax.Array | np.ndarray | None = None
    group_block_tables: jax.Array | np.ndarray | None = None
    # Several layer groups: each group's sliding window (None: full attention) and each layer's first page.
    group_windows: tuple[int | None, ...] = dataclasses.field(metadata=dict(static=True), default=())
    layer_page_offsets: tuple[int, ...] = dataclasses.field(metadata=dict(static=True), default=())
    # An fp8 KV cache's per-tensor scales (stored value = x / scale); float caches ignore them.
    k_scale: float = dataclasses.field(metadata=dict(static=True), default=1.0)
    v_scale: float = dataclasses.field(metadata=dict(static=True), default=1.0)

    def num_tokens(self) -> jax.Array:
        """int32[1]: the step's real tokens (the rest of its T is bucket padding)."""
        return jnp.asarray(self.query_start_loc)[-1:]

    def layer_pages(self, layer: jax.Array | int, sliding_window: int | None) -> tuple[Any, Any, Any]:
        """(first page of `layer`, slot mapping, block tables) of the layer's group (per-layer page ids)."""
        if not self.layer_page_offsets:  # one group: every layer owns pages_per_layer pages
            return jnp.asarray(layer, jnp.int32) * self.pages_per_layer, self.slot_mapping, self.block_tables
        # A window no group tracks (one covering max_model_len) is served by the full-attention group,
        # which frees nothing; full attention can never use a sliding-window group's pages.
        key = sliding_window if sliding_window in self.group_windows else None
        if key not in self.group_windows:
            raise ValueError(f"no KV cache group serves sliding window {sliding_window} (groups: {self.group_windows})")
        g = self.group_windows.index(key)
        offset = jnp.asarray(self.layer_page_offsets, jnp.int32)[layer]
        if g == 0:
            return offset, self.slot_mapping, self.block_tables
        assert self.group_slot_mapping is not None and self.group_block_tables is not None
        return offset, self.group_slot_mapping[g - 1], self.group_block_tables[g - 1]


def paged_attention(
    kv_cache: Any,
    layer: jax.Array | int,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    md: AttentionMetadata,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> tuple[Any, jax.Array]:
    """Writes k/v[T, Hkv, D] of the new tokens into layer `layer`'s pages and attends q[T, Hq, D].

    Returns the updated cache and out[T, Hq, D]. `layer` may be a traced scan index.
    """
    page_offset, slot_mapping, block_tables = md.layer_pages(layer, sliding_window)
    slots = slot_mapping + page_offset * md.page_size
    kv_cache = pallas_kernels.write_kv(kv_cache, k, v, slots, backend=md.backend, interpret=md.interpret,
                                       k_scale=md.k_scale, v_scale=md.v_scale)
    attend = functools.partial(
        pallas_kernels.ragged_paged_attention,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, backend=md.backend, interpret=md.interpret,
        k_scale=md.k_scale, v_scale=md.v_scale,
    )
    args = (q, kv_cache, md.seq_lens, block_tables + page_offset, md.query_start_loc, md.num_seqs)
    if md.mesh is None:
        return kv_cache, attend(*args)
    return kv_cache, _per_device(attend, md)(*args)


def _per_device(attend: Any, md: AttentionMetadata) -> Any:
    """The kernel under `shard_map`: each device attends its own query heads.

    With the cache split over KV heads, device i holds query heads whose KV heads it also holds
    (both split contiguously by head). With the cache replicated (fewer KV heads than devices), each
    device attends every query head and keeps the output replicated; XLA then slices its heads.
    """
    heads = P(None, MODEL_AXIS, None)
    meta = (P(), P(), P(), P())
    if md.shard_kv:
        specs, out = (heads, P(None, MODEL_AXIS)) + meta, heads
    else:
        specs, out = (P(), P()) + meta, P()
    return jax.shard_map(attend, mesh=md.mesh, in_specs=specs, out_specs=out, check_vma=False)
