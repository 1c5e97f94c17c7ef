"""Gemma 2: sliding-window and global layers alternating, soft-capped attention logits and LM logits.

What sets it apart from the Llama family:
- layers alternate between a sliding window and global attention (`layer_types`; by default the
  even-numbered layers slide), so the layer scan runs over units of the repeating pattern;
- norms scale by `1 + w` in float32 (HF's Gemma RMSNorm) and wrap both sublayers: a pre and a post
  norm around attention and around the MLP;
- the MLP is GeGLU (tanh-approximated GELU gate);
- attention scores are scaled by `query_pre_attn_scalar ** -0.5` and soft-capped
  (`cap * tanh(s / cap)`), and so are the final logits;
- embeddings are multiplied by sqrt(hidden), rounded to the model dtype first (as HF does).

Parameters: the Llama family's (`jengine.models.llama`) without `mlp_norm`, plus `layers.post_attn_norm`,
`layers.pre_mlp_norm`, `layers.post_mlp_norm` ([L, H]). Gemma 3 (`gemma3.py`) reuses this file's
config and forward.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jengine.attention import AttentionMetadata
from jengine.models import layers as nn
from jengine.models.base import COLUMN, COLUMN_KV, REPLICATED, ROW, VOCAB, CausalLM, NameMap
from jengine.models.config import ModelConfig, RopeScaling, base_fields, parse_rope, unsupported_field
from jengine.models.rope import cos_sin, inv_frequencies

SLIDING, FULL = "sliding_attention", "full_attention"
GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")


@dataclasses.dataclass(frozen=True)
class GemmaConfig(ModelConfig):
    """Gemma 2 and Gemma 3 (text) hyperparameters beyond the shared ones."""

    layer_types: tuple[str, ...] = ()  # SLIDING or FULL per layer
    sliding_window: int | None = None
    query_pre_attn_scalar: float = 256.0
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    attention_bias: bool = False  # biases on q/k/v/o
    qk_norm: bool = False  # Gemma 3: per-head (1 + w) RMSNorm of q and k
    local_rope_theta: float | None = None  # RoPE base of sliding layers (None: rope_theta)
    local_rope_scaling: RopeScaling | None = None  # RoPE scaling of sliding layers (Gemma 3)

    def rope_for(self, kind: str) -> tuple[float, RopeScaling | None]:
        """(theta, scaling) of a layer kind: Gemma 3 gives sliding layers their own RoPE."""
        if kind == SLIDING and self.local_rope_theta is not None:
            return self.local_rope_theta, self.local_rope_scaling
        return self.rope_theta, self.rope_scaling


# our layer parameter -> (HF name under `model.layers.{i}.`, stored [out, in])
LAYER_NAMES = {
    "attn_norm": ("input_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True),
    "wk": ("self_attn.k_proj.weight", True),
    "wv": ("self_attn.v_proj.weight", True),
    "wo": ("self_attn.o_proj.weight", True),
    "bq": ("self_attn.q_proj.bias", False),
    "bk": ("self_attn.k_proj.bias", False),
    "bv": ("self_attn.v_proj.bias", False),
    "bo": ("self_attn.o_proj.bias", False),
    "q_norm": ("self_attn.q_norm.weight", False),
    "k_norm": ("self_attn.k_norm.weight", False),
    "post_attn_norm": ("post_attention_layernorm.weight", False),
    "pre_mlp_norm": ("pre_feedforward_layernorm.weight", False),
    "post_mlp_norm": ("post_feedforward_layernorm.weight", False),
    "w_gate": ("mlp.gate_proj.weight", True),
    "w_up": ("mlp.up_proj.weight", True),
    "w_down": ("mlp.down_proj.weight", True),
}
GLOBAL_NAMES = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
}
_PARTITION = {
    "embed": VOCAB, "lm_head": VOCAB, "final_norm": REPLICATED,
    "layers.wq": COLUMN, "layers.bq": COLUMN, "layers.wk": COLUMN_KV, "layers.bk": COLUMN_KV,
    "layers.wv": COLUMN_KV, "layers.bv": COLUMN_KV, "layers.wo": ROW, "layers.bo": REPLICATED,
    "layers.w_gate": COLUMN, "layers.w_up": COLUMN, "layers.w_down": ROW,
    **{f"layers.{n}": REPLICATED for n in ("attn_norm", "post_attn_norm", "pre_mlp_norm", "post_mlp_norm", "q_norm", "k_norm")},
}


def check_common(cfg: Mapping[str, Any], arch: str) -> None:
    """Rejects the Gemma config values this forward does not implement, naming the field."""
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in GELU_TANH:
        raise unsupported_field(arch, "hidden_activation", act)
    if cfg.get("use_bidirectional_attention"):
        raise unsupported_field(arch, "use_bidirectional_attention", cfg["use_bidirectional_attention"])


def layer_types(cfg: Mapping[str, Any], arch: str, default_period: int) -> tuple[str, ...]:
    """`layer_types` from the config, else every `default_period`-th layer global, the rest sliding."""
    n = int(cfg["num_hidden_layers"])
    kinds = cfg.get("layer_types")
    if kinds is None:
        return tuple(SLIDING if (i + 1) % default_period else FULL for i in range(n))
    kinds = tuple(kinds)
    bad = sorted(set(kinds) - {SLIDING, FULL})
    if bad or len(kinds) != n:
        raise unsupported_field(arch, "layer_types", list(kinds))
    return kinds


def _float_or_none(v: Any) -> float | None:
    return None if v is None else float(v)


class Gemma2ForCausalLM(CausalLM[GemmaConfig]):
    """Gemma 2 over a paged KV cache (see the module docstring)."""

    config_class = GemmaConfig

    @classmethod
    def config_from_hf(cls, cfg: Mapping[str, Any]) -> GemmaConfig:
        arch = cfg["architectures"][0]
        check_common(cfg, arch)
        theta, scaling = parse_rope(cfg)
        return GemmaConfig(
            **{**base_fields(cfg, arch), "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", True))},
            rope_theta=theta,
            rope_scaling=scaling,
            layer_types=layer_types(cfg, arch, 2),
            sliding_window=int(cfg["sliding_window"]) if cfg.get("sliding_window") else None,
            query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)),
            attn_logit_softcapping=_float_or_none(cfg.get("attn_logit_softcapping")),
            final_logit_softcapping=_float_or_none(cfg.get("final_logit_softcapping")),
            attention_bias=bool(cfg.get("attention_bias", False)),
        )

    @classmethod
    def param_shapes(cls, cfg: GemmaConfig) -> dict[str, tuple[int, ...]]:
        L, H, F, D = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        shapes: dict[str, tuple[int, ...]] = {
            "embed": (cfg.vocab_size, H),
            "layers.wq": (L, H, cfg.q_size),
            "layers.wk": (L, H, cfg.kv_size),
            "layers.wv": (L, H, cfg.kv_size),
            "layers.wo": (L, cfg.q_size, H),
            "layers.w_gate": (L, H, F),
            "layers.w_up": (L, H, F),
            "layers.w_down": (L, F, H),
            **{f"layers.{n}": (L, H) for n in ("attn_norm", "post_attn_norm", "pre_mlp_norm", "post_mlp_norm")},
            "final_norm": (H,),
        }
        if cfg.attention_bias:
            shapes.update({"layers.bq": (L, cfg.q_size), "layers.bk": (L, cfg.kv_size), "layers.bv": (L, cfg.kv_size), "layers.bo": (L, H)})
        if cfg.qk_norm:
            shapes.update({"layers.q_norm": (L, D), "layers.k_norm": (L, D)})
        if not cfg.tie_word_embeddings:
            shapes["lm_head"] = (cfg.vocab_size, H)
        return shapes

    @classmethod
    def hf_names(cls, cfg: GemmaConfig) -> NameMap:
        names: NameMap = {k: (hf, False) for k, hf in GLOBAL_NAMES.items()}
        names.update({f"layers.{k}": (f"model.layers.{{i}}.{hf}", t) for k, (hf, t) in LAYER_NAMES.items()})
        return names

    @classmethod
    def partition_kinds(cls, cfg: GemmaConfig) -> dict[str, str]:
        return dict(_PARTITION)

    def __call__(self, kv_cache: Any, token_ids: jax.Array, positions: jax.Array, md: AttentionMetadata) -> tuple[Any, jax.Array]:
        cfg = self.config
        kinds = cfg.layer_types
        norm = functools.partial(nn.rms_norm, eps=cfg.rms_norm_eps, unit_offset=True)
        ropes, specs = {}, {}
        for kind in sorted(set(kinds)):
            ropes[kind] = cos_sin(positions, inv_frequencies(cfg.head_dim, *cfg.rope_for(kind)))
            specs[kind] = nn.AttentionSpec(
                cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                sm_scale=cfg.query_pre_attn_scalar**-0.5,
                sliding_window=cfg.sliding_window if kind == SLIDING else None,
                soft_cap=cfg.attn_logit_softcapping,
                qk_norm=norm if cfg.qk_norm else None,
            )

        def layer(slot: int, i: Any, p: nn.Params, carry: Any) -> Any:
            x, cache = carry
            kind = kinds[slot]
            cache, o = nn.attention(specs[kind], p, norm(x, p["attn_norm"]), cache, i, md, ropes[kind])
            x = x + norm(o, p["post_attn_norm"])
            x = x + norm(nn.geglu(norm(x, p["pre_mlp_norm"]), p), p["post_mlp_norm"])
            return x, cache

        x = nn.embed(self.embed[...], token_ids, scale=cfg.hidden_size**0.5)
        x, kv_cache = nn.scan_layers(layer, self.layers.arrays(), (x, kv_cache), cfg.num_layers, nn.pattern_period(kinds),
                                      in_place=nn.reads_weights_in_place(md), rows=md.num_tokens())
        return kv_cache, norm(x, self.final_norm[...])

    def compute_logits(self, hidden: jax.Array, md: AttentionMetadata | None = None, rows: jax.Array | None = None) -> jax.Array:
        logits = super().compute_logits(hidden, md, rows)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else cap * jnp.tanh(logits / cap)
