"""Mixture-of-experts families: Mixtral, Qwen2-MoE, Qwen3-MoE (the Llama block with a sparse MLP).

Attention is the Llama family's (`llama.py`): Mixtral like Mistral (optional sliding window),
Qwen2-MoE like Qwen2 (q/k/v biases), Qwen3-MoE like Qwen3 (per-head q/k RMSNorm). The MLP is
`layers.moe_mlp`: a softmax router, the top-k experts per token, a grouped matmul over the tokens
sorted by expert. What differs between the three:

    Mixtral     top-k weights renormalised to sum to 1
    Qwen3-MoE   renormalised when `norm_topk_prob` (true in the released models)
    Qwen2-MoE   `norm_topk_prob` false: the softmax probabilities as they are; plus a shared expert
                (a SwiGLU MLP every token runs) scaled by `sigmoid(shared_expert_gate(h))`

Parameters: the Llama family's attention and norm parameters, then per layer

    layers.router          [L, H, E]
    layers.experts_gate    [L, E, H, F]     layers.experts_up [L, E, H, F]     layers.experts_down [L, E, F, H]
    layers.w_gate/w_up     [L, H, Fs]       layers.w_down     [L, Fs, H]       (Qwen2-MoE shared expert)
    layers.shared_gate     [L, H, 1]                                           (Qwen2-MoE)

Expert weights are plain arrays (the grouped matmul indexes them by expert); under expert
parallelism (`enable_expert_parallel`) they are split over the model axis by expert (partition kind
EXPERT), else replicated. Every layer must be sparse: Qwen's `decoder_sparse_step` > 1 or a non-empty
`mlp_only_layers` (dense layers between sparse ones, which no released Qwen MoE model uses) are
refused by name.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax

from jengine.attention import AttentionMetadata
from jengine.models import layers as nn
from jengine.models.base import COLUMN, EXPERT, REPLICATED, ROW, NameMap, Source
from jengine.models.config import base_fields, parse_rope, unsupported_field
from jengine.models.llama import _PARTITION, LlamaConfig, LlamaForCausalLM

ARCH_MIXTRAL = "MixtralForCausalLM"
ARCH_QWEN2_MOE = "Qwen2MoeForCausalLM"
ARCH_QWEN3_MOE = "Qwen3MoeForCausalLM"
ARCHITECTURES = (ARCH_MIXTRAL, ARCH_QWEN2_MOE, ARCH_QWEN3_MOE)


@dataclasses.dataclass(frozen=True)
class MoeConfig(LlamaConfig):
    """`intermediate_size` is each expert's FFN width; the shared expert's is `shared_expert_intermediate_size`."""

    num_experts: int = 8
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0  # 0: no shared expert

    @property
    def tp_ffn_size(self) -> int:
        """The FFN width tensor parallelism splits (the shared expert's; experts are split by expert)."""
        return self.shared_expert_intermediate_size


def _check_all_sparse(cfg: Mapping[str, Any], arch: str) -> None:
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    if step != 1:
        raise unsupported_field(arch, "decoder_sparse_step", step)
    only = list(cfg.get("mlp_only_layers") or [])
    if only:
        raise unsupported_field(arch, "mlp_only_layers", only)


class MoeForCausalLM(LlamaForCausalLM[MoeConfig]):
    """Mixtral / Qwen2-MoE / Qwen3-MoE over a paged KV cache (see the module docstring)."""

    config_class = MoeConfig
    expert_mesh: Any = None  # a Mesh whose "model" axis splits the experts (expert parallelism), or None
    grouped_matmul: str | None = None  # "ragged" / "blocked" / None: the platform's choice (see `layers.MoeSpec`)
    unscanned = ("experts_gate", "experts_up", "experts_down")  # each block reads its expert from the stack

    @classmethod
    def config_from_hf(cls, cfg: Mapping[str, Any]) -> MoeConfig:
        arch = cfg["architectures"][0]
        if arch not in ARCHITECTURES:
            raise NotImplementedError(f"architecture {arch!r} is not a mixture-of-experts family ({', '.join(ARCHITECTURES)})")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise unsupported_field(arch, "hidden_act", act)
        if arch != ARCH_MIXTRAL and cfg.get("use_sliding_window"):
            raise unsupported_field(arch, "use_sliding_window", cfg["use_sliding_window"])
        theta, scaling = parse_rope(cfg)
        base = base_fields(cfg, arch)
        if arch == ARCH_MIXTRAL:
            experts, norm, shared = int(cfg.get("num_local_experts", 8)), True, 0
            window = cfg.get("sliding_window")
            qkv_bias = o_bias = False
        else:
            _check_all_sparse(cfg, arch)
            experts = int(cfg.get("num_experts", 8))
            base["intermediate_size"] = int(cfg.get("moe_intermediate_size") or base["intermediate_size"])
            norm = bool(cfg.get("norm_topk_prob", arch == ARCH_QWEN3_MOE))
            shared = int(cfg.get("shared_expert_intermediate_size") or 0) if arch == ARCH_QWEN2_MOE else 0
            window = None
            if arch == ARCH_QWEN2_MOE:
                qkv_bias, o_bias = bool(cfg.get("qkv_bias", True)), False
            else:
                qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
        top_k = int(cfg.get("num_experts_per_tok", 2))
        if not 1 <= top_k <= experts:
            raise unsupported_field(arch, "num_experts_per_tok", top_k)
        return MoeConfig(
            **base,
            rope_theta=theta,
            rope_scaling=scaling,
            attention_bias=qkv_bias,
            o_bias=o_bias,
            qk_norm=arch == ARCH_QWEN3_MOE,
            sliding_window=int(window) if window else None,
            num_experts=experts,
            num_experts_per_tok=top_k,
            norm_topk_prob=norm,
            shared_expert_intermediate_size=shared,
        )

    @classmethod
    def config_from_gguf(cls, meta: Mapping[str, Any], *, tie_word_embeddings: bool, freq_factors: Any = None) -> MoeConfig:
        raise NotImplementedError(f"{cls.__name__} cannot be read from GGUF files yet")

    @classmethod
    def param_shapes(cls, cfg: MoeConfig) -> dict[str, tuple[int, ...]]:
        L, H, E, F = cfg.num_layers, cfg.hidden_size, cfg.num_experts, cfg.intermediate_size
        shapes = {k: v for k, v in super().param_shapes(cfg).items() if k not in ("layers.w_gate", "layers.w_up", "layers.w_down")}
        shapes.update({
            "layers.router": (L, H, E),
            "layers.experts_gate": (L, E, H, F),
            "layers.experts_up": (L, E, H, F),
            "layers.experts_down": (L, E, F, H),
        })
        Fs = cfg.shared_expert_intermediate_size
        if Fs:
            shapes.update({"layers.w_gate": (L, H, Fs), "layers.w_up": (L, H, Fs), "layers.w_down": (L, Fs, H), "layers.shared_gate": (L, H, 1)})
        return shapes

    @classmethod
    def hf_names(cls, cfg: MoeConfig) -> NameMap:
        names = super().hf_names(cfg)
        E = cfg.num_experts
        if cfg.architecture == ARCH_MIXTRAL:
            moe, gate, up, down = "block_sparse_moe", "w1", "w3", "w2"
        else:
            moe, gate, up, down = "mlp", "gate_proj", "up_proj", "down_proj"
        layer = f"model.layers.{{i}}.{moe}"
        names.update({
            "layers.router": (f"{layer}.gate.weight", True),
            "layers.experts_gate": Source(f"{layer}.experts.{{e}}.{gate}.weight", True, experts=E),
            "layers.experts_up": Source(f"{layer}.experts.{{e}}.{up}.weight", True, experts=E),
            "layers.experts_down": Source(f"{layer}.experts.{{e}}.{down}.weight", True, experts=E),
            "layers.w_gate": (f"{layer}.shared_expert.gate_proj.weight", True),
            "layers.w_up": (f"{layer}.shared_expert.up_proj.weight", True),
            "layers.w_down": (f"{layer}.shared_expert.down_proj.weight", True),
            "layers.shared_gate": (f"{layer}.shared_expert_gate.weight", True),
        })
        return names

    @classmethod
    def partition_kinds(cls, cfg: MoeConfig) -> dict[str, str]:
        return {
            **_PARTITION,
            "layers.router": REPLICATED, "layers.shared_gate": REPLICATED,
            "layers.experts_gate": EXPERT, "layers.experts_up": EXPERT, "layers.experts_down": EXPERT,
            "layers.w_gate": COLUMN, "layers.w_up": COLUMN, "layers.w_down": ROW,
        }

    def mlp(self, h: jax.Array, p: nn.Params, layer: Any, stacked: nn.Params, md: AttentionMetadata) -> jax.Array:
        cfg = self.config
        spec = nn.MoeSpec(cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob, grouped=self.grouped_matmul)
        num_tokens = md.query_start_loc[md.num_seqs[0]]  # the step's real tokens; the rest is bucket padding
        out = nn.moe_mlp(h, {**p, **stacked}, spec, layer=layer, num_tokens=num_tokens, mesh=self.expert_mesh)
        if cfg.shared_expert_intermediate_size:
            out = out + jax.nn.sigmoid(nn.linear(h, p["shared_gate"])) * nn.swiglu(h, p)
        return out
