"""Model registry: HF `architectures[0]` name -> model class.

    get_model_class(architecture) -> type        SUPPORTED_ARCHITECTURES
    ModelConfig, RopeScaling                     (jengine.models.config)
    param_shapes(config) -> {name: shape}        (per model class, `cls.param_shapes`)
"""
from __future__ import annotations

from jengine.models.config import ModelConfig, RopeScaling
from jengine.models.llama import LlamaForCausalLM, param_shapes

_REGISTRY: dict[str, type] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_REGISTRY)


def get_model_class(architecture: str) -> type:
    """The model class for an HF architecture name; a clear error for unsupported ones."""
    try:
        return _REGISTRY[architecture]
    except KeyError:
        raise NotImplementedError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        ) from None


__all__ = ["ModelConfig", "RopeScaling", "LlamaForCausalLM", "get_model_class", "param_shapes", "SUPPORTED_ARCHITECTURES"]
