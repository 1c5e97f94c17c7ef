"""Partition rules: where each parameter and the KV cache live on the ("data", "model") mesh.

Megatron-style tensor parallelism expressed as `PartitionSpec`s; XLA's partitioner (GSPMD) inserts
the collectives (an all-reduce after each row-parallel matmul, gathers for the vocab-parallel
embedding and LM head). Each model family says what every parameter is (`partition_kinds` in
`jengine.models`); parameters are stored `[in, out]` with a leading layer axis for `layers.*`:

    COLUMN      output features (last axis; biases too)   e.g. P(None, None, "model")
    COLUMN_KV   like COLUMN when the model axis divides the KV heads, else replicated
    ROW         input features (axis -2)                  e.g. P(None, "model", None)
    VOCAB       rows of the embedding / LM head            P("model", None)
    EXPERT      stacked MoE experts [L, E, ...]: by expert  P(None, "model", None, None) under expert
                parallelism (`enable_expert_parallel`), else replicated
    REPLICATED  norms, output biases; unknown names are replicated with a warning

K/V projections and the KV cache are sharded over KV heads only when the model axis divides the KV
head count; otherwise (e.g. 2 KV heads on 4 devices) they are replicated, so every device holds the
KV heads its query heads need. Query heads and the FFN width must divide by the model axis: a size
that does not fails at start with the sizes that work (padding heads would change the checkpoint's
math and waste memory). The vocabulary is replicated when the model axis does not divide it.

A quantized projection (`jengine.quantization`) is a `Weight` pytree; each of its leaves is split
like the matrix along the matrix axes the leaf's `LEAF_AXES` names (a per-output-channel scale with
its columns, a per-group scale of a row-parallel matrix with its groups of rows).

`TensorParallelPlan` bundles the mesh, these rules, the loader's `place` hook, the runner's
`place_cache` hook, the jit shardings of the step, and the per-device memory report.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jengine.models import get_model_class
from jengine.models.base import COLUMN, COLUMN_KV, EXPERT, PARTITION_KINDS, REPLICATED, ROW, VOCAB
from jengine.models.config import ModelConfig
from jengine.models.layers import Weight
from jengine.worker.input_batch import apply_blocks, apply_params, apply_penalty_rows

logger = logging.getLogger(__name__)

MODEL = "model"

# Axis of the KV heads in each attention backend's cache layout (see `jengine.pallas_kernels`).
KV_HEAD_AXIS = {"reference": 1, "cpu": 1, "gpu": 1, "tpu": 1}


def valid_tensor_parallel_sizes(cfg: ModelConfig, max_size: Optional[int] = None) -> list[int]:
    """Model-axis sizes whose shards hold whole query heads and equal slices of the FFN."""
    ffn = _tp_ffn(cfg)
    limit = max_size if max_size is not None else math.gcd(cfg.num_heads, ffn)
    return [n for n in range(1, limit + 1) if cfg.num_heads % n == 0 and ffn % n == 0]


def _tp_ffn(cfg: ModelConfig) -> int:
    """The FFN width the model axis splits (MoE families: their shared expert's, 0 when none)."""
    return int(getattr(cfg, "tp_ffn_size", cfg.intermediate_size))


def check_tensor_parallel_size(cfg: ModelConfig, tp: int, expert_parallel: bool = False) -> None:
    """Raises a ValueError naming the sizes that work when `tp` does not divide heads and FFN
    (and, under expert parallelism, the experts)."""
    experts = getattr(cfg, "num_experts", None)
    if expert_parallel and experts is not None and experts % tp:
        sizes = [n for n in valid_tensor_parallel_sizes(cfg) if experts % n == 0]
        raise ValueError(
            f"enable_expert_parallel with tensor_parallel_size={tp} needs the size to divide the {experts} experts; "
            f"sizes that work: {', '.join(map(str, sizes))}"
        )
    if tp >= 1 and cfg.num_heads % tp == 0 and _tp_ffn(cfg) % tp == 0:
        return
    sizes = valid_tensor_parallel_sizes(cfg)
    raise ValueError(
        f"tensor_parallel_size={tp} does not divide this model's {cfg.num_heads} query heads and FFN width "
        f"{_tp_ffn(cfg)}; sizes that work: {', '.join(map(str, sizes))} "
        f"(KV heads: {cfg.num_kv_heads}; they are sharded when the size divides them, replicated otherwise)"
    )


def shards_kv_heads(cfg: ModelConfig, tp: int) -> bool:
    """True when K/V projections and the KV cache are split over KV heads (else replicated)."""
    return tp > 1 and cfg.num_kv_heads % tp == 0


def partition_spec(name: str, shape: tuple[int, ...], cfg: ModelConfig, tp: int, expert_parallel: bool = False) -> P:
    """The `PartitionSpec` of parameter `name`, from the kind its model family gives it."""
    kind = get_model_class(cfg.architecture).partition_kinds(cfg).get(name)
    if kind is None:
        logger.warning("no partition rule for parameter %r; replicating it", name)
        return P()
    if tp == 1 or kind == REPLICATED or (kind == COLUMN_KV and not shards_kv_heads(cfg, tp)):
        return P()
    if kind == EXPERT:
        return P(None, MODEL, *([None] * (len(shape) - 2))) if expert_parallel else P()
    nd = len(shape)
    if kind in (COLUMN, COLUMN_KV):
        return P(*([None] * (nd - 1)), MODEL)
    if kind == ROW:
        return P(*([None] * (nd - 2)), MODEL, None)
    if kind == VOCAB:
        return P(MODEL, None) if shape[0] % tp == 0 else P()
    raise ValueError(f"{name}: unknown partition kind {kind!r} (known: {PARTITION_KINDS})")


def _check_divisible(name: str, shape: tuple[int, ...], spec: P, mesh: Mesh) -> None:
    for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axis is not None and dim % mesh.shape[axis] != 0:
            raise ValueError(f"{name}: dimension {dim} of shape {shape} does not divide over mesh axis {axis!r} of size {mesh.shape[axis]}")


def _device_put_sharded(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Builds a global array from host data, copying to each (local) device only its own slice."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: np.ascontiguousarray(array[index]))


@dataclasses.dataclass
class TensorParallelPlan:
    """Mesh + rules for one model; hands out the loader and runner hooks."""

    mesh: Mesh
    model_config: ModelConfig
    backend: str = "reference"
    expert_parallel: bool = False  # split MoE experts over the model axis (partition kind EXPERT)

    def __post_init__(self) -> None:
        check_tensor_parallel_size(self.model_config, self.tp, self.expert_parallel)
        if self.backend not in KV_HEAD_AXIS:
            raise ValueError(f"unknown attention backend {self.backend!r}; expected one of {sorted(KV_HEAD_AXIS)}")

    @property
    def tp(self) -> int:
        return int(self.mesh.shape[MODEL])

    @property
    def shard_kv(self) -> bool:
        return shards_kv_heads(self.model_config, self.tp)

    @property
    def kv_shards(self) -> int:
        """How many ways the KV cache is split (divide whole-cache bytes by this for per-device bytes)."""
        return self.tp if self.shard_kv else 1

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    # ----- parameters ---------------------------------------------------------------------------
    def spec(self, name: str, shape: tuple[int, ...]) -> P:
        return partition_spec(name, tuple(shape), self.model_config, self.tp, self.expert_parallel)

    def param_specs(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, P]:
        return {name: self.spec(name, shape) for name, shape in shapes.items()}

    def place(self, name: str, array: Any) -> Any:
        """The loader's `place` hook: puts one host parameter (array or `Weight`) straight onto the mesh, sharded."""
        if isinstance(array, Weight):
            return self._place_weight(name, array)
        spec = self.spec(name, array.shape)
        _check_divisible(name, tuple(array.shape), spec, self.mesh)
        return _device_put_sharded(array, NamedSharding(self.mesh, spec))

    def _place_weight(self, name: str, weight: Weight) -> Weight:
        """Each leaf split as the matrix `weight` stands for is, along the matrix axes its `LEAF_AXES` name."""
        from jengine.quantization.weights import map_leaves

        matrix = tuple(self.spec(name, weight.shape))
        matrix = (None,) * (len(weight.shape) - len(matrix)) + matrix
        lead = len(weight.shape) - 2  # the layer axis of a stacked `[L, in, out]` matrix
        axis_of = {"in": matrix[-2], "out": matrix[-1], None: None}

        def put(field: str, leaf: np.ndarray, axes: tuple) -> jax.Array:
            spec = P(*((None,) * lead + tuple(axis_of[a] for a in axes)))
            _check_divisible(f"{name}.{field}", tuple(leaf.shape), spec, self.mesh)
            return _device_put_sharded(leaf, NamedSharding(self.mesh, spec))

        return map_leaves(weight, put)

    # ----- KV cache -----------------------------------------------------------------------------
    def cache_spec(self, ndim: int) -> P:
        if not self.shard_kv:
            return P()
        axis = KV_HEAD_AXIS[self.backend]
        return P(*([None] * axis + [MODEL] + [None] * (ndim - axis - 1)))

    def cache_shardings(self, cache: Any) -> Any:
        return jax.tree.map(lambda leaf: NamedSharding(self.mesh, self.cache_spec(len(leaf.shape))), cache)

    def place_cache(self, cache: Any) -> Any:
        """The runner's `place_cache` hook: the cache on the mesh, split over KV heads when they divide.

        Pass a zero-argument callable that builds the cache (e.g. `lambda: new_kv_cache(...)`) to have
        it created directly in shards, never whole on one device; an existing cache is resharded.
        """
        if callable(cache):
            shapes = jax.eval_shape(cache)
            return jax.jit(cache, out_shardings=self.cache_shardings(shapes))()
        return jax.device_put(cache, self.cache_shardings(cache))

    # ----- the jitted step ----------------------------------------------------------------------
    def jit_kwargs(self, in_kinds: Sequence[str], out_kinds: "Sequence[str] | str", *, params: Any = None, kv_cache: Any = None) -> dict[str, Any]:
        """`jax.jit` keyword arguments pinning every argument's and result's sharding.

        Kinds: "params" (the parameters' own shardings), "cache" (the KV cache's), "replicated" (host
        inputs, logits, sampled tokens). Pinning keeps the donated cache's sharding identical from call
        to call and makes warm-up's `ShapeDtypeStruct` arguments compile exactly the executables that
        serving then uses (no recompilation); replicated host inputs are also what multi-process jit
        requires for numpy arguments, and replicated results can be read by every process. E.g.

            forward: jit_kwargs(("params", "cache", "replicated"), ("cache", "replicated", "replicated"), params=p, kv_cache=c)
            sample:  jit_kwargs(("replicated", "replicated"), "replicated")
        """
        table: dict[str, Any] = {"replicated": self.replicated}
        if params is not None:
            table["params"] = jax.tree.map(lambda x: x.sharding, params)
        if kv_cache is not None:
            table["cache"] = self.cache_shardings(kv_cache)

        def pick(kind: str) -> Any:
            if kind not in table:
                raise ValueError(f"sharding kind {kind!r} needs its tree (params= / kv_cache=) or is unknown")
            return table[kind]

        outs = pick(out_kinds) if isinstance(out_kinds, str) else tuple(pick(k) for k in out_kinds)
        return {"in_shardings": tuple(pick(k) for k in in_kinds), "out_shardings": outs}

    # ----- memory -------------------------------------------------------------------------------
    def memory_report(self, params: Any, kv_cache: Any) -> dict[str, dict[str, int]]:
        return memory_report(params, kv_cache)


class PinnedJit:
    """`jax.jit` with pinned shardings whose `lower()` accepts sharding-less `ShapeDtypeStruct`s.

    Warm-up lowers with `ShapeDtypeStruct`s; one without a sharding lowers to an executable that the
    later call with a real (replicated, committed) array does not reuse, so serving would compile
    again. `lower()` fills each missing sharding in from the pinned `in_shardings`.
    """

    def __init__(self, fn: Any, **jit_kwargs: Any):
        self._in_shardings = jit_kwargs.get("in_shardings")
        self._jitted = jax.jit(fn, **jit_kwargs)

    def __call__(self, *args: Any) -> Any:
        return self._jitted(*args)

    def lower(self, *args: Any) -> Any:
        if self._in_shardings is not None:
            args = tuple(_with_shardings(a, s) for a, s in zip(args, self._in_shardings))
        return self._jitted.lower(*args)


def _with_shardings(arg: Any, shardings: Any) -> Any:
    def fill(leaf: Any, sharding: Any) -> Any:
        if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
        return leaf

    if isinstance(shardings, jax.sharding.Sharding):  # one sharding for the whole argument tree
        return jax.tree.map(lambda leaf: fill(leaf, shardings), arg)
    return jax.tree.map(fill, arg, shardings)


def pin_runner_shardings(runner: Any, plan: TensorParallelPlan) -> None:
    """Re-jits a `ModelRunner`'s step pieces with pinned shardings (call before `warmup()`).

    What `ModelRunner.__init__` should do itself when it is given a plan; kept here so the
    sharding layer can be tested on its own.
    """
    rep = "replicated"  # host inputs, and the persistent batch's tables (jengine.worker.input_batch)
    forward = plan.jit_kwargs(("params", "cache", rep, rep), ("cache", rep, rep, rep), params=runner.params, kv_cache=runner.kv_cache)
    lora = getattr(runner, "lora", None)  # LoRA adapter stacks keep the shardings the manager gave them
    forward["in_shardings"] += (jax.tree.map(lambda x: x.sharding, lora.stacks) if lora is not None else {},)
    runner._forward = PinnedJit(runner._forward_fn, donate_argnums=(1,), **forward)
    runner._sample = PinnedJit(runner._sample_fn, donate_argnums=(2,), **plan.jit_kwargs((rep,) * 8, rep))
    runner._prompt_lp = PinnedJit(runner._prompt_logprobs_fn, **plan.jit_kwargs(("params", rep, rep), rep, params=runner.params))
    runner._apply_params = PinnedJit(apply_params, **plan.jit_kwargs((rep, rep, rep), rep))
    runner._apply_blocks = PinnedJit(apply_blocks, **plan.jit_kwargs((rep, rep, rep), rep))
    runner._apply_penalty_rows = PinnedJit(apply_penalty_rows, donate_argnums=(0,), **plan.jit_kwargs((rep, rep, rep), rep))


def memory_report(params: Any, kv_cache: Any) -> dict[str, dict[str, int]]:
    """Bytes of weights and KV cache held by each local device: {device: {"weights", "kv_cache"}}."""
    report: dict[str, dict[str, int]] = {}

    def add(tree: Any, key: str) -> None:
        for leaf in jax.tree_util.tree_leaves(tree):
            if not isinstance(leaf, jax.Array):
                continue
            for shard in leaf.addressable_shards:
                entry = report.setdefault(str(shard.device), {"weights": 0, "kv_cache": 0})
                entry[key] += shard.data.size * shard.data.dtype.itemsize

    add(params, "weights")
    add(kv_cache, "kv_cache")
    return report


def format_memory_report(report: Mapping[str, Mapping[str, int]]) -> str:
    """One line per device, for start-up logging."""
    mib = 2**20
    lines = [f"{dev}: weights {v['weights'] / mib:.1f} MiB, KV cache {v['kv_cache'] / mib:.1f} MiB" for dev, v in sorted(report.items())]
    return "per-device memory: " + "; ".join(lines)


__all__ = [
    "KV_HEAD_AXIS",
    "PinnedJit",
    "TensorParallelPlan",
    "check_tensor_parallel_size",
    "format_memory_report",
    "memory_report",
    "partition_spec",
    "pin_runner_shardings",
    "shards_kv_heads",
    "valid_tensor_parallel_sizes",
]
