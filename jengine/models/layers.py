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
from typing import Any, Callable, ClassVar, Collection, Hashable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jengine.attention import AttentionMetadata, paged_attention
from jengine.pallas_kernels import resolve_backend
from jengine.pallas_kernels.cpu_linear import stacked_linear, stacked_linears, stacked_ragged_dot
from jengine.models.rope import apply_rope

Params = Mapping[str, Any]


class Weight:
    """A stand-in for a plain `[in, out]` matrix (quantized, LoRA-wrapped, ...).

    Subclasses are `jax.tree_util.register_dataclass` dataclasses: their array leaves are stacked
    over layers on axis 0 like every `layers.*` parameter, and `apply` sees one layer's slice.
    """

    __dataclass_fields__: ClassVar[dict[str, Any]]  # declared for type checkers: every subclass is a dataclass

    def apply(self, x: jax.Array) -> jax.Array:
        """x[..., in] -> x @ W [..., out]."""
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the matrix this weight stands for (with the layer axis when stacked)."""
        raise NotImplementedError


def linear(x: jax.Array, w: "jax.Array | Weight | LayerOf", bias: jax.Array | None = None) -> jax.Array:
    """The one projection every model calls: x @ w (+ bias), or `w.apply(x)` for a `Weight`. A
    `LayerOf` (one layer of a stacked matrix, left in its stack by a scan run `in_place`) is read
    where it lies on the CPU (`cpu_linear.stacked_linear`) instead of being copied out first."""
    if isinstance(w, Weight):
        y = w.apply(x)
    elif isinstance(w, LayerOf):
        y = stacked_linear(x, w.stack, w.layer, w.rows)
    else:
        y = x @ w
    return y if bias is None else y + bias


def linears(x: jax.Array, ws: Sequence["jax.Array | Weight | LayerOf"]) -> list[jax.Array]:
    """[linear(x, w) for w in ws], the projections that read the same input: one native call when all
    are layers read in place from their stacks (`cpu_linear.stacked_linears`)."""
    stacked = [w for w in ws if isinstance(w, LayerOf)]
    if len(ws) > 1 and len(stacked) == len(ws) and len({id(w.layer) for w in stacked}) == 1:
        return stacked_linears(x, [w.stack for w in stacked], stacked[0].layer, stacked[0].rows)
    return [linear(x, w) for w in ws]


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
    gate, up = linears(h, [p["w_gate"], p["w_up"]])
    return linear(act(gate) * up, p["w_down"])


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
    q, k, v = (y if b is None else y + b for y, b in zip(linears(h, [p["wq"], p["wk"], p["wv"]]), (p.get("bq"), p.get("bk"), p.get("bv"))))
    q, k, v = q.reshape(T, spec.num_heads, D), k.reshape(T, spec.num_kv_heads, D), v.reshape(T, spec.num_kv_heads, D)
    if spec.qk_norm is not None:
        q, k = spec.qk_norm(q, p["q_norm"]), spec.qk_norm(k, p["k_norm"])
    cos, sin = rope
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    cache, o = paged_attention(
        cache, layer, q, k, v, md, sm_scale=spec.sm_scale, sliding_window=spec.sliding_window, soft_cap=spec.soft_cap
    )
    return cache, linear(o.reshape(T, spec.num_heads * D).astype(h.dtype), p["wo"], p.get("bo"))


def reads_weights_in_place(md: AttentionMetadata) -> bool:
    """Whether the layer scan should leave projection matrices in their stacks for `linear`: on the
    native CPU backend (asked for, or the default one resolves to it) with unsharded weights (a
    sharded stack would need the kernel partitioned)."""
    return md.mesh is None and resolve_backend(md.backend) == "cpu"


def pattern_period(kinds: Sequence[Any]) -> int:
    """The shortest period p with kinds[i] == kinds[i % p] for every layer (1 when all layers are alike)."""
    n = len(kinds)
    return next(p for p in range(1, n + 1) if all(kinds[i] == kinds[i % p] for i in range(n)))


def scan_layers(
    layer_fn: Callable[[int, jax.Array | int, Params, Any], Any], params: Params, carry: Any, num_layers: int, period: int = 1,
    in_place: bool = False, rows: jax.Array | None = None,
) -> Any:
    """Runs `carry = layer_fn(slot, layer, p, carry)` for every layer, under `jax.lax.scan`.

    Layers are scanned in units of `period` consecutive layers (the repeating pattern of layer kinds,
    e.g. 5 sliding-window layers then 1 global one); `slot = layer % period` is a Python int, so the
    body can pick each slot's static settings (its window, its RoPE). The `num_layers % period` layers
    left after the last whole unit run unrolled after the scan. `params` holds the stacked `[L, ...]`
    weights (arrays or `Weight` pytrees); `p` is one layer's slice. The body is traced once per slot.
    """
    slots = [i % period for i in range(num_layers)]
    return scan_layer_kinds(layer_fn, params, carry, slots, max_period=period, in_place=in_place, rows=rows)


class LayerOf(NamedTuple):
    """Index `layer` of a stacked weight the scan leaves whole (`scan_layer_kinds`'s `whole`), for a
    body that reads only part of it (the grouped matmul reads one expert at a time). `rows`: how many
    leading rows of the step's x are real tokens (None: all), so `linear` skips the bucket's padding."""

    stack: Any
    layer: jax.Array | int
    rows: jax.Array | None = None


def layer_segments(kinds: Sequence[Hashable], max_period: int = 8) -> list[tuple[int, int, int]]:
    """Cuts layers of the given kinds into runs that repeat a pattern: [(start, period, units)].

    From each start, the period (at most `max_period`) whose whole repeated units cover the most
    layers wins (the shortest on a tie), if it repeats at least twice; otherwise the layer there runs
    alone (period 1, 1 unit). A regular model is one run (`period` 1 when all layers are alike); an
    irregular one, e.g. one dense layer before 47 sparse ones, is a few runs, never all unrolled.
    """
    n, start, out = len(kinds), 0, []
    while start < n:
        best = (1, 1, 1)  # (layers covered, period, units)
        for p in range(1, min(max_period, n - start) + 1):
            run = p
            while start + run < n and kinds[start + run] == kinds[start + run - p]:
                run += 1
            units = run // p
            if units >= 2 and units * p > best[0]:
                best = (units * p, p, units)
        out.append((start, best[1], best[2]))
        start += best[0]
    return out


def scan_layer_kinds(
    layer_fn: Callable[[Any, jax.Array | int, Params, Any], Any],
    params: Params,
    carry: Any,
    kinds: Sequence[Hashable],
    held_by: Mapping[str, Sequence[int]] | None = None,
    whole: Collection[str] = (),
    max_period: int = 8,
    in_place: bool = False,
    rows: jax.Array | None = None,
) -> Any:
    """Runs `carry = layer_fn(kinds[layer], layer, p, carry)` for every layer, in order.

    Layers of different kinds have different static settings or different parameters (a dense or a
    sparse MLP). They run as the runs of repeating patterns `layer_segments` finds: each run of two
    or more units is one `jax.lax.scan` over its units (each slot of the unit traced once), a lone
    layer runs unrolled. `held_by[name]` lists the layers that hold stacked parameter `name` (default:
    all); its leading axis counts only those layers, and `p` has it only at those layers. Names in
    `whole` are not sliced: `p[name]` is a `LayerOf(stack, index into it)`. `p` otherwise holds one layer's
    slice of every stacked weight (arrays or `Weight` pytrees), as dynamic indexes.

    A dynamic index of a stack is a copy on the CPU (XLA's dot wants its operand in a buffer of its
    own); with `in_place` (see `reads_weights_in_place`) every plain stacked matrix (`[L, in, out]`)
    reaches the body as a `LayerOf`, which `linear` reads where it lies, for the step's first `rows`
    tokens (`AttentionMetadata.num_tokens`: the rest is bucket padding).
    """
    num_layers = len(kinds)
    holders = {n: tuple(held_by.get(n, range(num_layers)) if held_by else range(num_layers)) for n in params}
    rank = {n: {layer: r for r, layer in enumerate(h)} for n, h in holders.items()}
    # the pattern of kinds and of which parameters each layer holds: within a run, every parameter's
    # index then moves by a fixed stride per unit
    signature = [(kinds[i], tuple(i in rank[n] for n in sorted(params))) for i in range(num_layers)]

    def run_layer(start: int, period: int, slot: int, u: jax.Array | int, carry: Any) -> Any:
        first = start + slot  # this slot's layer in the run's first unit
        p: dict[str, Any] = {}
        indexes: dict[tuple[int, int], Any] = {}  # one index value per (rank, stride): stacks of one layer share it
        for name, w in params.items():
            if first not in rank[name]:
                continue
            stride = sum(1 for i in range(start, start + period) if i in rank[name])
            key = (rank[name][first], stride)
            if key not in indexes:
                indexes[key] = rank[name][first] + u * stride
            index = indexes[key]
            if name in whole or (in_place and isinstance(w, jax.Array) and w.ndim == 3):
                p[name] = LayerOf(w, index, rows)
            else:
                p[name] = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False), w)  # noqa: B023
        return layer_fn(kinds[first], first + u * period, p, carry)

    for start, period, units in layer_segments(signature, max_period):
        if units == 1:
            for slot in range(period):
                carry = run_layer(start, period, slot, 0, carry)
            continue

        def unit(carry: Any, u: jax.Array, start: int = start, period: int = period) -> tuple[Any, None]:
            for slot in range(period):
                carry = run_layer(start, period, slot, u, carry)
            return carry, None

        carry, _ = jax.lax.scan(unit, carry, jnp.arange(units, dtype=jnp.int32))
    return carry


# ----- mixture of experts -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MoeSpec:
    """Static routing settings of a sparse MLP layer.

    norm_topk_prob: renormalise the k kept router probabilities to sum to 1 (Mixtral, Qwen3-MoE) or
    keep them as softmax probabilities over all experts (Qwen2-MoE). `grouped`: how the experts run,
    "ragged" (`jax.lax.ragged_dot`), "blocked" (`blocked_expert_ffn`) or "in_place" (`in_place_expert_ffn`,
    the native CPU kernel); None picks "in_place" where `moe_mlp` is told the kernel serves, else
    "blocked" on the CPU, whose `ragged_dot` lowering multiplies every expert with every row and
    masks, else "ragged".
    """

    num_experts: int
    top_k: int
    norm_topk_prob: bool = True
    grouped: str | None = None
    block_rows: int | None = None  # "blocked": rows per block; None: from the step's shape (`default_block_rows`)


def default_block_rows(pairs: int, num_experts: int) -> int:
    """Largest block (rows) of the blocked grouped matmul: a power of two in [8, 256], at least twice
    an expert's even share of the step's (token, expert) pairs.

    Each expert's rows run as one matmul of the smallest block size (a multiple of `block_sizes`'
    step) that holds them, so with twice the share most experts need one matmul and waste at most
    a step's rows. Decode steps get 8: on the CPU a matmul of 8 rows costs about what one row does.
    """
    share = max(1, pairs // num_experts)
    return int(min(256, max(8, 1 << (2 * share - 1).bit_length())))


def block_sizes(block_rows: int) -> tuple[int, ...]:
    """The block sizes up to `block_rows` an expert's last block picks from: multiples of an eighth of
    it (at least 8 rows apart), so an expert's last block wastes fewer than that many rows."""
    step = max(8, block_rows // 8) if block_rows > 8 else block_rows
    return tuple(range(step, block_rows, step)) + (block_rows,)


def route(h: jax.Array, router: jax.Array | Weight, spec: MoeSpec) -> tuple[jax.Array, jax.Array]:
    """Softmax router then top-k: (weights[T, k] in h's dtype, expert ids[T, k] int32), as HF computes them."""
    probs = jax.nn.softmax(linear(h, router).astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, spec.top_k)
    if spec.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights.astype(h.dtype), experts.astype(jnp.int32)


def _expert_act(g: jax.Array, u: jax.Array) -> jax.Array:
    return jax.nn.silu(g) * u


def ragged_expert_ffn(x: jax.Array, group_sizes: jax.Array, p: Params) -> jax.Array:
    """SwiGLU experts over rows x[M, H] sorted by expert: `jax.lax.ragged_dot` with group_sizes[E].

    Rows past `sum(group_sizes)` come out as zeros. On TPU/GPU XLA runs a grouped matmul; the CPU
    lowering computes every expert densely and masks (see `blocked_expert_ffn`).
    """
    g = jax.lax.ragged_dot(x, p["experts_gate"], group_sizes)
    u = jax.lax.ragged_dot(x, p["experts_up"], group_sizes)
    return jax.lax.ragged_dot(_expert_act(g, u).astype(x.dtype), p["experts_down"], group_sizes)


def _expert(w: jax.Array, layer: jax.Array | None, e: jax.Array) -> jax.Array:
    """Expert e's matrix from w[E, ...], or from w[L, E, ...] at `layer` (one read, no layer-slice copy)."""
    if layer is None:
        return jax.lax.dynamic_index_in_dim(w, e, keepdims=False)
    start = (layer, e) + (0,) * (w.ndim - 2)
    return jax.lax.dynamic_slice(w, start, (1, 1, *w.shape[2:])).reshape(w.shape[2:])


def in_place_expert_ffn(x: jax.Array, group_sizes: jax.Array, p: Params, layer: jax.Array | None = None) -> jax.Array:
    """The grouped SwiGLU with the native CPU kernel: three grouped matmuls
    (`cpu_linear.stacked_ragged_dot`) that read each expert with rows where it lies in the stacked
    experts (`[E, ...]`, or `[L, E, ...]` at `layer`), nothing copied and no loop in the program."""
    E = group_sizes.shape[0]
    flat = {k: p[k].reshape(-1, *p[k].shape[-2:]) for k in ("experts_gate", "experts_up", "experts_down")}  # [L * E, in, out]
    base = 0 if layer is None else layer * E
    g = stacked_ragged_dot(x, flat["experts_gate"], base, group_sizes)
    u = stacked_ragged_dot(x, flat["experts_up"], base, group_sizes)
    return stacked_ragged_dot(_expert_act(g, u).astype(x.dtype), flat["experts_down"], base, group_sizes)


def blocked_expert_ffn(
    x: jax.Array, group_sizes: jax.Array, p: Params, block_rows: int = 8, layer: jax.Array | None = None,
    max_group: int | None = None,
) -> jax.Array:
    """The same grouped SwiGLU as `ragged_expert_ffn`, as a loop over the experts that have rows.

    The loop visits only the experts with rows (a data-dependent trip count inside one compiled
    program: shapes stay fixed) and reads each one's three matrices once. An expert's rows run in
    blocks of `block_rows`, the last one (usually the only one) of the smallest of `block_sizes`
    that holds what is left, picked by `lax.switch`: one matmul per expert of about its own rows,
    never every expert over every row. Reading an expert's matrix out of the stack is a copy on the
    CPU (its dot needs a buffer of its own), hence once per expert, not once per block. A block's
    rows past its expert's group are zeroed and rewritten by the next group's blocks, which come
    later in row order. Rows past `sum(group_sizes)` come out as zeros. With `layer`, the expert
    arrays still carry the stacked layer axis ([L, E, ...]): slicing a layer out first would copy
    every expert of the layer on every step. `max_group`: no group has more rows (the step's tokens,
    as a token picks distinct experts); when one block holds it, there is no loop over blocks.
    """
    M, H = x.shape
    C = block_rows
    sizes_c = block_sizes(C)
    E = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    starts = jnp.cumsum(sizes) - sizes
    used = jnp.nonzero(sizes > 0, size=E, fill_value=0)[0].astype(jnp.int32)  # experts with rows, in order
    xp = jnp.concatenate([x, jnp.zeros((C, H), x.dtype)])

    def expert(i: jax.Array, out: jax.Array) -> jax.Array:
        e = used[i]
        w = {k: _expert(p[k], layer, e) for k in ("experts_gate", "experts_up", "experts_down")}

        def block(rows: int, row0: jax.Array, n: jax.Array, out: jax.Array) -> jax.Array:
            """Rows [row0, row0 + n) of this expert, computed as a block of `rows` (>= n) rows."""
            xb = jax.lax.dynamic_slice_in_dim(xp, row0, rows)
            y = _expert_act(xb @ w["experts_gate"], xb @ w["experts_up"]).astype(x.dtype) @ w["experts_down"]
            y = jnp.where((jnp.arange(rows) < n)[:, None], y, 0)
            return jax.lax.dynamic_update_slice_in_dim(out, y.astype(out.dtype), row0, 0)

        def last(row0: jax.Array, n: jax.Array, out: jax.Array) -> jax.Array:
            if len(sizes_c) == 1:
                return block(C, row0, n, out)
            pick = jnp.searchsorted(jnp.asarray(sizes_c, jnp.int32), n)
            branches = [functools.partial(block, r) for r in sizes_c]
            return jax.lax.switch(pick, branches, row0, n, out)

        full = (sizes[e] - 1) // C  # whole blocks before the last one
        if C < (max_group or M):  # a group can outgrow one block
            out = jax.lax.fori_loop(0, full, lambda j, out: block(C, starts[e] + j * C, jnp.int32(C), out), out)
        return last(starts[e] + full * C, sizes[e] - full * C, out)

    out = jax.lax.fori_loop(0, jnp.sum(sizes > 0), expert, jnp.zeros((M + C, H), x.dtype))
    return out[:M]


def moe_mlp(
    h: jax.Array, p: Params, spec: MoeSpec, *, layer: jax.Array | int | None = None, num_tokens: jax.Array | None = None,
    mesh: Any = None, axis: str = "model", in_place: bool = False,
) -> jax.Array:
    """Sparse MLP: route each token to its top-k experts, run them as one grouped matmul, combine.

    `p` holds `router` [H, E] (through `linear`) and the stacked experts `experts_gate`/`experts_up`
    [E, H, F], `experts_down` [E, F, H] (plain arrays: the grouped matmul indexes them by expert).
    The T*k (token, expert) pairs are sorted by expert (fixed shapes: group sizes are an array), the
    experts run over their rows only, and each token sums its experts' outputs times the router weights.
    `layer` given: the expert arrays are the whole stacks [L, E, ...] and this is layer `layer`.
    `num_tokens` given: rows from there on are the step's padding; they go to no expert (output 0).
    `in_place` (the native CPU kernels serve this layer): the experts run as `in_place_expert_ffn`
    unless `spec.grouped` says otherwise.

    Expert parallelism (`mesh` given): the experts are split over `mesh`'s `axis`; every device holds
    all tokens (attention is tensor-parallel, so they are replicated already), runs its own experts
    over the pairs routed to them (pairs for other devices' experts sort to the end and are skipped)
    and the partial sums are added up with one `psum`, the same all-reduce a row-parallel MLP ends with.
    """
    weights, experts = route(h, p["router"], spec)
    grouped = spec.grouped or ("in_place" if in_place else "blocked" if jax.default_backend() == "cpu" else "ragged")
    ex = {k: p[k] for k in ("experts_gate", "experts_up", "experts_down")}
    stacked = layer is not None
    layer = jnp.asarray(0 if layer is None else layer, jnp.int32)
    if num_tokens is not None:  # padding rows: an expert id no device holds, so they sort last and are skipped
        pad = jnp.arange(h.shape[0]) >= num_tokens
        experts = jnp.where(pad[:, None], spec.num_experts, experts)

    def local(h: jax.Array, weights: jax.Array, experts: jax.Array, ex: Params, layer: jax.Array) -> jax.Array:
        T, k = experts.shape
        n_local = ex["experts_gate"].shape[int(stacked)]
        first = jax.lax.axis_index(axis) * n_local if mesh is not None else 0
        key = experts.reshape(-1) - first
        key = jnp.where((key >= 0) & (key < n_local), key, n_local)  # other devices' experts sort last
        order = jnp.argsort(key, stable=True)
        sizes = jnp.bincount(key, length=n_local + 1)[:n_local].astype(jnp.int32)
        token = order // k
        x = jnp.take(h, token, axis=0)
        if grouped == "in_place":
            y = in_place_expert_ffn(x, sizes, ex, layer if stacked else None)
        elif grouped == "ragged":
            one = {n: jax.lax.dynamic_index_in_dim(w, layer, keepdims=False) for n, w in ex.items()} if stacked else ex
            y = ragged_expert_ffn(x, sizes, one)
        else:
            rows = spec.block_rows or default_block_rows(T * k, spec.num_experts)
            y = blocked_expert_ffn(x, sizes, ex, rows, layer if stacked else None, max_group=T)
        # back to (token, k) order with a gather (the inverse permutation) rather than a scatter-add,
        # which the CPU runs row by row; each token then sums its k outputs times their weights
        inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
        y = jnp.take(y, inverse, axis=0).reshape(T, k, -1)
        out = jnp.sum(y.astype(jnp.float32) * weights[..., None].astype(jnp.float32), axis=1).astype(h.dtype)  # one fused loop
        return out if mesh is None else jax.lax.psum(out, axis)

    if mesh is None:
        return local(h, weights, experts, ex, layer)
    from jax.sharding import PartitionSpec as P

    rep, split = P(), P(None, axis) if stacked else P(axis)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(rep, rep, rep, {k: split for k in ex}, rep), out_specs=rep, check_vma=False)
    return fn(h, weights, experts, ex, layer)
