"""Tensor parallelism over a `jax.sharding` mesh, and one engine across hosts (imported as `jengine.sharding`).

    make_mesh(tensor_parallel_size, data_parallel_size=1, devices=None) -> Mesh      # axes ("data", "model")
    plan_for_engine(engine_config) -> TensorParallelPlan | None                      # None: nothing to shard
    plan.place(name, np_array) -> jax.Array          # loader hook: each device gets only its slice
    plan.place_cache(cache_or_thunk) -> cache        # runner hook: KV cache split over KV heads
    plan.jit_kwargs(in_kinds, out_kinds, params=, kv_cache=) -> dict   # pinned in/out shardings for jax.jit
    pin_runner_shardings(runner, plan)               # the runner's three jitted pieces, pinned
    memory_report(params, kv_cache) / format_memory_report(report)
    distributed.initialize(parallel_config), distributed.LeaderRunner, distributed.run_worker

See README.md in this folder for the rules and the multi-host protocol.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

from jengine.sharding.mesh import AXES, make_mesh
from jengine.sharding.rules import (
    KV_HEAD_AXIS,
    PinnedJit,
    TensorParallelPlan,
    check_tensor_parallel_size,
    format_memory_report,
    memory_report,
    partition_spec,
    pin_runner_shardings,
    shards_kv_heads,
    valid_tensor_parallel_sizes,
)

logger = logging.getLogger(__name__)


def read_model_config(model: Optional[str], load_format: str = "auto") -> Any:
    """The `ModelConfig` of a checkpoint without reading its weights (rules need head counts first)."""
    from jengine.loader import default_model_path, read_hf_config, tie_if_lm_head_absent

    path = default_model_path() if model is None else os.path.expanduser(model)
    if os.path.isfile(path) and path.endswith(".gguf"):
        from jengine.loader.gguf_format import GGUFCheckpoint

        return GGUFCheckpoint(path).config()
    config = read_hf_config(path)
    if load_format != "dummy":
        from jengine.loader.safetensors_format import SafetensorsCheckpoint

        config = tie_if_lm_head_absent(config, SafetensorsCheckpoint(path))  # as load_model decides
    return config


def plan_for_engine(engine_config: Any, model_config: Any = None) -> Optional[TensorParallelPlan]:
    """The plan for an `EngineConfig`: None when one process serves on one device (nothing to shard).

    Validates the tensor-parallel size against the model's head counts before any weight is read.
    """
    from jengine import pallas_kernels

    par = engine_config.parallel
    if par.tensor_parallel_size == 1 and par.num_processes == 1:
        return None
    if model_config is None:
        model_config = read_model_config(engine_config.model, engine_config.load_format)
    if par.num_processes > 1:
        import jax

        if par.tensor_parallel_size != jax.device_count():
            raise ValueError(
                f"with num_processes={par.num_processes} the model axis must span every process's devices: "
                f"tensor_parallel_size must be {jax.device_count()} ({jax.process_count()} processes x "
                f"{jax.local_device_count()} local devices), got {par.tensor_parallel_size}"
            )
    mesh = make_mesh(par.tensor_parallel_size)
    expert_parallel = par.enable_expert_parallel and getattr(model_config, "num_experts", None) is not None
    if par.enable_expert_parallel and not expert_parallel:
        logger.warning("enable_expert_parallel: %s has no experts; ignored", model_config.architecture)
    return TensorParallelPlan(mesh, model_config, backend=pallas_kernels.resolve_backend(engine_config.attention_backend),
                              expert_parallel=expert_parallel)


__all__ = [
    "AXES",
    "KV_HEAD_AXIS",
    "PinnedJit",
    "TensorParallelPlan",
    "check_tensor_parallel_size",
    "format_memory_report",
    "make_mesh",
    "memory_report",
    "partition_spec",
    "pin_runner_shardings",
    "plan_for_engine",
    "read_model_config",
    "shards_kv_heads",
    "valid_tensor_parallel_sizes",
]
