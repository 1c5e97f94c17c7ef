"""The device mesh every sharded array lives on: axes ("data", "model"), Auto axis types.

`jax.make_mesh` gives Explicit axes on JAX 0.10 (where `with_sharding_constraint` raises and
sharding-in-types rules apply), so the mesh is built with `Mesh(devices, names)` directly, which
keeps Auto axes on every JAX version jengine supports: XLA's partitioner propagates the parameter
shardings through the step and inserts the collectives.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

AXES = ("data", "model")


def make_mesh(tensor_parallel_size: int, data_parallel_size: int = 1, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A `data x model` mesh over the first `data * tensor` devices (all processes' devices by default).

    Devices are taken in `jax.devices()` order, which groups each process's devices together, so a
    model axis that fits on one host stays on that host (fast interconnect) and only spans hosts
    when it must.
    """
    if tensor_parallel_size < 1 or data_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size and data_parallel_size must be >= 1, got {tensor_parallel_size}, {data_parallel_size}")
    pool = list(jax.devices() if devices is None else devices)
    need = tensor_parallel_size * data_parallel_size
    if need > len(pool):
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} x data_parallel_size={data_parallel_size} needs {need} devices, "
            f"but only {len(pool)} are visible ({jax.process_count()} process(es), {jax.local_device_count()} local device(s) each; "
            f"platform {pool[0].platform if pool else 'none'})"
        )
    grid = np.array(pool[:need], dtype=object).reshape(data_parallel_size, tensor_parallel_size)
    return Mesh(grid, AXES)


__all__ = ["AXES", "make_mesh"]
