"""jengine: a pure-JAX/XLA engine that serves large language models.

Public API (shaped like vLLM's): `LLM`, `SamplingParams`, `LoRARequest`, `StructuredOutputsParams`, `RequestOutput`, `CompletionOutput`.
Layout: `config` (the frozen config tree), `models/` + `loader/` (Flax models and checkpoint
loading), `core/` (KV cache manager, scheduler), `worker/` (the jitted step), `engine/` (the step
loop and output processing), `entrypoints/` (the Python API), `cli` (the `jengine` command);
`jengine.pallas_kernels`, `jengine.sharding` and `jengine.server` live in the repository's
top-level folders of those names.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "AsyncEngine", "AsyncLLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "EngineArgs", "LoRARequest", "__version__"]

_LAZY = {
    "LLM": ("jengine.entrypoints.llm", "LLM"),
    "SamplingParams": ("jengine.sampling_params", "SamplingParams"),
    "StructuredOutputsParams": ("jengine.structured_output.params", "StructuredOutputsParams"),
    "RequestOutput": ("jengine.outputs", "RequestOutput"),
    "CompletionOutput": ("jengine.outputs", "CompletionOutput"),
    "EngineArgs": ("jengine.config", "EngineArgs"),
    "LoRARequest": ("jengine.lora.request", "LoRARequest"),
    "AsyncEngine": ("jengine.engine.async_engine", "AsyncEngine"),
    "AsyncLLM": ("jengine.engine.async_engine", "AsyncEngine"),
}


def __getattr__(name: str) -> Any:
    # Lazy so that `import jengine.sampling_params` does not pull in JAX and the model code.
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'jengine' has no attribute {name!r}")


if TYPE_CHECKING:
    from jengine.config import EngineArgs
    from jengine.engine.async_engine import AsyncEngine
    from jengine.engine.async_engine import AsyncEngine as AsyncLLM
    from jengine.entrypoints.llm import LLM
    from jengine.lora.request import LoRARequest
    from jengine.outputs import CompletionOutput, RequestOutput
    from jengine.sampling_params import SamplingParams
    from jengine.structured_output.params import StructuredOutputsParams
