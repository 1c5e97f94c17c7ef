"""The model layer: one file per architecture family, built from shared blocks.

    get_model_class(architecture) -> CausalLM subclass       # HF `architectures[0]`
    get_gguf_model_class(general_architecture, metadata) -> CausalLM subclass   # `llama` + experts: MoE
    SUPPORTED_ARCHITECTURES, SUPPORTED_GGUF_ARCHITECTURES
    ModelConfig, RopeScaling                                  (jengine.models.config)

Layout: `config.py` (the fields all families share, parsing helpers), `layers.py` (`linear`, norms,
MLPs, the attention call, the layer scan), `rope.py`, `base.py` (`CausalLM`: the contract a family
implements: config parsing, weight-name maps, partition kinds, forward), and a file per family
(`llama.py`, `gemma2.py`, `gemma3.py`, `phi3.py`, `moe.py`). Adding an architecture means a family file plus a line in the tables below;
the loader and `jengine.sharding` ask the family class for everything architecture-specific.
"""
from __future__ import annotations

from typing import Any, Mapping

from jengine.models.base import CausalLM
from jengine.models.config import ModelConfig, RopeScaling
from jengine.models.gemma2 import Gemma2ForCausalLM
from jengine.models.gemma3 import Gemma3ForCausalLM
from jengine.models.llama import LlamaForCausalLM, param_shapes
from jengine.models.moe import MoeForCausalLM
from jengine.models.phi3 import Phi3ForCausalLM

# HF `architectures[0]` -> family class
_REGISTRY: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "MixtralForCausalLM": MoeForCausalLM,
    "Qwen2MoeForCausalLM": MoeForCausalLM,
    "Qwen3MoeForCausalLM": MoeForCausalLM,
}
# GGUF `general.architecture` -> family class
_GGUF_REGISTRY: dict[str, type[CausalLM]] = {
    "llama": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
    "gemma3": Gemma3ForCausalLM,
    "phi3": Phi3ForCausalLM,
    "qwen2moe": MoeForCausalLM,
    "qwen3moe": MoeForCausalLM,
}
# GGUF architectures whose files with experts (`{arch}.expert_count` > 0) belong to another family:
# llama.cpp writes Mixtral as `llama` with experts.
_GGUF_WITH_EXPERTS: dict[str, type[CausalLM]] = {"llama": MoeForCausalLM}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_REGISTRY)
SUPPORTED_GGUF_ARCHITECTURES: tuple[str, ...] = tuple(_GGUF_REGISTRY)


def get_model_class(architecture: str) -> type[CausalLM]:
    """The family class for an HF architecture name; a clear error for unsupported ones."""
    try:
        return _REGISTRY[architecture]
    except KeyError:
        raise NotImplementedError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        ) from None


def get_gguf_model_class(architecture: str | None, metadata: Mapping[str, Any] | None = None) -> type[CausalLM]:
    """The family class for a GGUF `general.architecture`; a clear error for unsupported ones.

    `metadata` (the file's key/values) tells a `llama` file with experts (Mixtral) from a dense one."""
    if architecture in _GGUF_WITH_EXPERTS and metadata is not None and int(metadata.get(f"{architecture}.expert_count") or 0) > 0:
        return _GGUF_WITH_EXPERTS[architecture]
    try:
        return _GGUF_REGISTRY[architecture]  # type: ignore[index]
    except KeyError:
        raise NotImplementedError(
            f"GGUF architecture {architecture!r} is not supported; supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        ) from None


__all__ = [
    "CausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "LlamaForCausalLM",
    "ModelConfig",
    "MoeForCausalLM",
    "Phi3ForCausalLM",
    "RopeScaling",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_GGUF_ARCHITECTURES",
    "get_gguf_model_class",
    "get_model_class",
    "param_shapes",
]
