"""LoRA adapters over HTTP: the served adapter names (vLLM's `--lora-modules`), which one a request's
`model` field picks, and the runtime load / unload endpoints' logic.

Each adapter name gets a fresh `lora_int_id` whenever it is loaded, so a name unloaded and loaded
again (perhaps from another folder) never meets KV pages or a device slot of its old weights.
Requests already queued keep the `LoRARequest` they were given: unloading a name only stops new
requests from choosing it.
"""
from __future__ import annotations

import itertools
import threading
from typing import Any, Optional, Sequence

from jengine.lora.request import LoRARequest

from .protocol import APIError


def parse_lora_modules(items: Sequence[str]) -> list[tuple[str, str]]:
    """`name=path` items (vLLM's `--lora-modules` form, or its JSON form {"name", "path"}) -> (name, path)."""
    import json

    out = []
    for item in items:
        if item.lstrip().startswith("{"):
            try:
                spec = json.loads(item)
                name, path = spec["name"], spec["path"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"--lora-modules {item!r}: the JSON form needs \"name\" and \"path\"") from None
        else:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--lora-modules {item!r}: expected name=path")
        out.append((str(name), str(path)))
    return out


class LoRAModules:
    """The adapters a server offers by name (thread-safe: loads run on the preprocessing pool)."""

    def __init__(self, engine: Any, base_names: Sequence[str]) -> None:
        self.engine = engine
        self.enabled = getattr(engine.config, "lora", None) is not None
        self.base_names = set(base_names)
        self._by_name: dict[str, LoRARequest] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def get(self, name: Optional[str]) -> Optional[LoRARequest]:
        """The adapter `name` selects (None for the base model or no name); 404 for an unknown name."""
        if not name or name in self.base_names:
            return None
        with self._lock:
            lora = self._by_name.get(name)
        if lora is None:
            raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found", type="NotFoundError")
        return lora

    def known(self, name: Optional[str]) -> bool:
        with self._lock:
            return name in self._by_name

    def list(self) -> list[LoRARequest]:
        with self._lock:
            return list(self._by_name.values())

    def load(self, name: Any, path: Any) -> LoRARequest:
        """Reads and validates the adapter (blocking), then serves it under `name`; 400 naming the problem."""
        if not self.enabled:
            raise APIError(400, "LoRA is not enabled on this server (start it with --enable-lora)", param="lora_name")
        if not isinstance(name, str) or not name:
            raise APIError(400, "lora_name must be a non-empty string", param="lora_name")
        if not isinstance(path, str) or not path:
            raise APIError(400, "lora_path must be a non-empty string", param="lora_path")
        if name in self.base_names:
            raise APIError(400, f"lora_name {name!r} is the base model's name", param="lora_name")
        with self._lock:
            if name in self._by_name:
                raise APIError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name")
            lora = LoRARequest(name, next(self._ids), path)
        try:
            self.engine.add_lora(lora)
        except ValueError as e:
            raise APIError(400, str(e), param="lora_path") from e
        with self._lock:
            if name in self._by_name:  # a concurrent load of the same name won
                raise APIError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name")
            self._by_name[name] = lora
        return lora

    def unload(self, name: Any) -> LoRARequest:
        if not self.enabled:
            raise APIError(400, "LoRA is not enabled on this server (start it with --enable-lora)", param="lora_name")
        if not isinstance(name, str) or not name:
            raise APIError(400, "lora_name must be a non-empty string", param="lora_name")
        with self._lock:
            lora = self._by_name.pop(name, None)
        if lora is None:
            raise APIError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name", code="lora_not_found", type="NotFoundError")
        self.engine.remove_lora(lora.lora_int_id)
        return lora
