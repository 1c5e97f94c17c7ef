"""`LoRAManager`: adapters on the host (LRU, `max_cpu_loras`) and in the device slots (`max_loras`).

Each step, `activate` gives every adapter the step needs a slot: one it already sits in, else a
free slot or the least recently used slot no row of this step needs, written by one jitted,
donating update (the slot index is a traced argument, so loading or evicting never compiles
after start-up). The scheduler guarantees a step never needs more adapters than slots.
"""
from __future__ import annotations

import collections
import logging
import threading
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jengine.lora.peft import LoRAAdapter, LoRATarget, load_adapter
from jengine.lora.request import LoRARequest
from jengine.lora.weight import LoRAWeight

logger = logging.getLogger(__name__)


class LoRAManager:
    """See the module docstring. `stacks` is the device state the jitted step reads:
    {param: {"a": [L, in, S*R], "b": [L, S*R, out]}} for every projection the model can adapt."""

    def __init__(self, config: Any, targets: dict[str, LoRATarget], num_layers: int, dtype: Any, plan: Any = None):
        self.max_loras = config.max_loras
        self.max_rank = config.max_lora_rank
        self.max_cpu_loras = config.max_cpu_loras if config.max_cpu_loras is not None else config.max_loras
        self.targets = targets
        self.num_layers = num_layers
        self.dtype = jnp.dtype(dtype)
        self._host: collections.OrderedDict[int, LoRAAdapter] = collections.OrderedDict()  # LRU, oldest first
        self._paths: dict[int, str] = {}  # every id seen -> its folder (one id must mean one adapter)
        self._slots: list[Optional[int]] = [None] * self.max_loras  # slot -> adapter id
        self._slot_lru: collections.OrderedDict[int, None] = collections.OrderedDict((s, None) for s in range(self.max_loras))
        self.loads = 0  # adapters written into a device slot
        # The engine thread activates; a server loads and unloads adapters from its own threads.
        self._lock = threading.RLock()
        width = self.max_loras * self.max_rank
        shardings = self._shardings(plan, width)
        self.stacks: dict[str, dict[str, jax.Array]] = {}
        for t in targets.values():
            shapes = {"a": (num_layers, t.in_features, width), "b": (num_layers, width, t.out_features)}
            self.stacks[t.param] = {
                k: jax.jit(lambda s=s: jnp.zeros(s, self.dtype), out_shardings=shardings.get((t.param, k)))()
                for k, s in shapes.items()
            }
        # On one device the stacks stay uncommitted like the weights and the cache: a committed input would
        # commit the step's outputs and make the step lower again for arrays warm-up did not see.
        out = jax.tree.map(lambda x: x.sharding, self.stacks) if plan is not None else None
        self._write = jax.jit(self._write_fn, donate_argnums=(0,), out_shardings=out)
        self._zero_adapter = {p: (np.zeros((num_layers, t.in_features, self.max_rank), self.dtype),
                                  np.zeros((num_layers, self.max_rank, t.out_features), self.dtype))
                              for p, t in ((t.param, t) for t in targets.values())}
        self.stacks = self._write(self.stacks, np.int32(0), self._zero_adapter)  # compiles the one update now

    def _shardings(self, plan: Any, width: int) -> dict[tuple[str, str], Any]:
        """A splits its input like a row-parallel projection does (else replicated); B splits its output
        like a column-parallel one (else replicated), so the delta lands sharded like the base output."""
        if plan is None:
            return {}
        from jax.sharding import NamedSharding, PartitionSpec as P

        from jengine.models import get_model_class
        from jengine.models.base import ROW

        kinds = get_model_class(plan.model_config.architecture).partition_kinds(plan.model_config)
        out = {}
        for t in self.targets.values():
            a_shape, b_shape = (self.num_layers, t.in_features, width), (self.num_layers, width, t.out_features)
            row = kinds.get(t.param) == ROW
            out[(t.param, "a")] = NamedSharding(plan.mesh, plan.spec(t.param, a_shape) if row else P())
            out[(t.param, "b")] = NamedSharding(plan.mesh, P() if row else plan.spec(t.param, b_shape))
        return out

    def _write_fn(self, stacks: dict, slot: jax.Array, adapter: dict) -> dict:
        col = slot * self.max_rank
        out = {}
        for param, st in stacks.items():
            a, b = adapter[param]
            out[param] = {
                "a": jax.lax.dynamic_update_slice_in_dim(st["a"], a.astype(self.dtype), col, axis=2),
                "b": jax.lax.dynamic_update_slice_in_dim(st["b"], b.astype(self.dtype), col, axis=1),
            }
        return out

    # ----- the host cache -------------------------------------------------------------------------
    def add(self, request: LoRARequest) -> LoRAAdapter:
        """Loads (validating) the adapter into the host cache, or refreshes its place there."""
        with self._lock:
            known = self._paths.get(request.lora_int_id)
            if known is not None and known != request.lora_path:
                raise ValueError(f"LoRARequest.lora_int_id {request.lora_int_id} is already used by the adapter at {known}; "
                                 f"{request.lora_name!r} at {request.lora_path} needs its own id")
            adapter = self._host.get(request.lora_int_id)
        if adapter is None:  # read from disk outside the lock: the engine thread keeps stepping meanwhile
            adapter = load_adapter(request, self.targets, self.num_layers, self.max_rank)
        with self._lock:
            self._paths[request.lora_int_id] = request.lora_path
            self._host[request.lora_int_id] = adapter
            self._host.move_to_end(request.lora_int_id)
            while len(self._host) > self.max_cpu_loras:
                self._host.popitem(last=False)
        return adapter

    def remove(self, lora_int_id: int) -> bool:
        """Forgets the adapter: its host copy and its slot (requests still running with it reload it)."""
        with self._lock:
            found = self._host.pop(lora_int_id, None) is not None
            for s, held in enumerate(self._slots):
                if held == lora_int_id:
                    self._slots[s] = None
                    found = True
            self._paths.pop(lora_int_id, None)
            return found

    def loaded(self) -> list[LoRARequest]:
        """The adapters held on the host (what `LLM.list_loras` reports)."""
        with self._lock:
            return [a.request for a in self._host.values()]

    # ----- the device slots -----------------------------------------------------------------------
    def activate(self, requests: Sequence[Optional[LoRARequest]]) -> list[int]:
        """The device slot of each row's adapter (-1: none), loading adapters into slots as needed."""
        with self._lock:
            return self._activate(requests)

    def _activate(self, requests: Sequence[Optional[LoRARequest]]) -> list[int]:
        needed = {r.lora_int_id: r for r in requests if r is not None}
        if len(needed) > self.max_loras:
            raise RuntimeError(f"a step needs {len(needed)} adapters but there are {self.max_loras} slots")
        where = {held: s for s, held in enumerate(self._slots) if held is not None}
        for lid, request in needed.items():
            if lid in where:
                continue
            busy = {where[i] for i in needed if i in where}
            slot = next((s for s in self._slot_lru if self._slots[s] is None), None)
            if slot is None:
                slot = next(s for s in self._slot_lru if s not in busy)
            adapter = self.add(request)
            padded = {}
            for param, zero in self._zero_adapter.items():
                if param in adapter.weights:
                    a, b = adapter.weights[param]
                    r = adapter.rank
                    pa, pb = np.zeros_like(zero[0]), np.zeros_like(zero[1])
                    pa[:, :, :r], pb[:, :r, :] = a, b
                    padded[param] = (pa, pb)
                else:
                    padded[param] = zero
            self.stacks = self._write(self.stacks, np.int32(slot), padded)
            self.loads += 1
            evicted = self._slots[slot]
            if evicted is not None:
                where.pop(evicted, None)
            self._slots[slot] = lid
            where[lid] = slot
        for lid in needed:
            self._slot_lru.move_to_end(where[lid])
        return [-1 if r is None else where[r.lora_int_id] for r in requests]

    def wrap(self, layers: Any, stacks: dict, token_slots: jax.Array | np.ndarray) -> None:
        """Inside the jitted step: replaces each adaptable stacked weight of `layers` (the model's
        `StackedLayers`) by a `LoRAWeight` over `stacks` (the traced `self.stacks`) and the step's
        per-token slots. Model files are untouched."""
        slots = jnp.broadcast_to(token_slots, (self.num_layers, token_slots.shape[0]))
        for param, st in stacks.items():
            var = getattr(layers, param.removeprefix("layers."))
            var.set_value(LoRAWeight(var.get_value(), st["a"], st["b"], slots, self.max_rank))
