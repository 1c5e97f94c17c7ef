"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3): pre-norm blocks, SwiGLU, one RoPE.

Parameters (L = layers, H = hidden, V = vocab, F = FFN, D = head_dim, Hq/Hkv = query/KV heads),
matrices stored [in, out]:

    embed              [V, H]
    layers.attn_norm   [L, H]          layers.mlp_norm  [L, H]
    layers.wq          [L, H, Hq*D]    layers.bq        [L, Hq*D]   (attention_bias)
    layers.wk          [L, H, Hkv*D]   layers.bk        [L, Hkv*D]  (attention_bias)
    layers.wv          [L, H, Hkv*D]   layers.bv        [L, Hkv*D]  (attention_bias)
    layers.wo          [L, Hq*D, H]    layers.bo        [L, H]      (o_bias)
    layers.q_norm      [L, D]          layers.k_norm    [L, D]      (qk_norm, Qwen3)
    layers.w_gate      [L, H, F]       layers.w_up      [L, H, F]
    layers.w_down      [L, F, H]
    final_norm         [H]
    lm_head            [V, H]          (absent when embeddings are tied; same layout as `embed`)

The four architectures differ only in config: Qwen2 has q/k/v biases, Qwen3 per-head q/k RMSNorm
and an explicit head_dim, Mistral one sliding window for every layer, Llama optional biases on all
four projections. All layers are alike, so they run as one `lax.scan`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, TypeVar

import jax
import numpy as np

from jengine.attention import AttentionMetadata
from jengine.models import layers as nn
from jengine.models.base import COLUMN, COLUMN_KV, REPLICATED, ROW, VOCAB, CausalLM, GGUFNameMap, NameMap
from jengine.models.config import ModelConfig, RopeScaling, base_fields, gguf_base_fields, parse_rope, unsupported_field
from jengine.models.rope import cos_sin, inv_frequencies

ARCH_LLAMA = "LlamaForCausalLM"
ARCH_MISTRAL = "MistralForCausalLM"
ARCH_QWEN2 = "Qwen2ForCausalLM"
ARCH_QWEN3 = "Qwen3ForCausalLM"
ARCHITECTURES = (ARCH_LLAMA, ARCH_MISTRAL, ARCH_QWEN2, ARCH_QWEN3)
# GGUF `general.architecture` -> HF architecture (Mistral GGUFs say "llama")
GGUF_ARCHITECTURES = {"llama": ARCH_LLAMA, "qwen2": ARCH_QWEN2, "qwen3": ARCH_QWEN3}


@dataclasses.dataclass(frozen=True)
class LlamaConfig(ModelConfig):
    attention_bias: bool = False  # biases on q/k/v projections
    o_bias: bool = False  # bias on the output projection (Llama/Qwen3 `attention_bias`)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    sliding_window: int | None = None  # Mistral: every layer


# our layer parameter -> (HF name under `model.layers.{i}.`, GGUF name under `blk.{i}.`, stored [out, in])
_LAYER_NAMES = {
    "attn_norm": ("input_layernorm.weight", "attn_norm.weight", False),
    "wq": ("self_attn.q_proj.weight", "attn_q.weight", True),
    "wk": ("self_attn.k_proj.weight", "attn_k.weight", True),
    "wv": ("self_attn.v_proj.weight", "attn_v.weight", True),
    "wo": ("self_attn.o_proj.weight", "attn_output.weight", True),
    "bq": ("self_attn.q_proj.bias", "attn_q.bias", False),
    "bk": ("self_attn.k_proj.bias", "attn_k.bias", False),
    "bv": ("self_attn.v_proj.bias", "attn_v.bias", False),
    "bo": ("self_attn.o_proj.bias", "attn_output.bias", False),
    "q_norm": ("self_attn.q_norm.weight", "attn_q_norm.weight", False),
    "k_norm": ("self_attn.k_norm.weight", "attn_k_norm.weight", False),
    "mlp_norm": ("post_attention_layernorm.weight", "ffn_norm.weight", False),
    "w_gate": ("mlp.gate_proj.weight", "ffn_gate.weight", True),
    "w_up": ("mlp.up_proj.weight", "ffn_up.weight", True),
    "w_down": ("mlp.down_proj.weight", "ffn_down.weight", True),
}
_GLOBAL_NAMES = {
    "embed": ("model.embed_tokens.weight", "token_embd.weight"),
    "final_norm": ("model.norm.weight", "output_norm.weight"),
    "lm_head": ("lm_head.weight", "output.weight"),
}
_PARTITION = {
    "embed": VOCAB, "lm_head": VOCAB, "final_norm": REPLICATED,
    "layers.attn_norm": REPLICATED, "layers.mlp_norm": REPLICATED, "layers.q_norm": REPLICATED, "layers.k_norm": REPLICATED,
    "layers.wq": COLUMN, "layers.bq": COLUMN, "layers.wk": COLUMN_KV, "layers.bk": COLUMN_KV,
    "layers.wv": COLUMN_KV, "layers.bv": COLUMN_KV, "layers.wo": ROW, "layers.bo": REPLICATED,
    "layers.w_gate": COLUMN, "layers.w_up": COLUMN, "layers.w_down": ROW,
}


LlamaConfigT = TypeVar("LlamaConfigT", bound=LlamaConfig)


class LlamaForCausalLM(CausalLM[LlamaConfigT]):
    """Decoder-only Llama-family transformer over a paged KV cache."""

    config_class = LlamaConfig

    @classmethod
    def config_from_hf(cls, cfg: Mapping[str, Any]) -> LlamaConfig:
        arch = cfg["architectures"][0]
        if arch not in ARCHITECTURES:
            raise NotImplementedError(f"architecture {arch!r} is not in the Llama family ({', '.join(ARCHITECTURES)})")
        if cfg.get("mlp_bias"):
            raise unsupported_field(arch, "mlp_bias", cfg["mlp_bias"])
        if arch in (ARCH_QWEN2, ARCH_QWEN3) and cfg.get("use_sliding_window"):
            raise unsupported_field(arch, "use_sliding_window", cfg["use_sliding_window"])
        theta, scaling = parse_rope(cfg)
        if arch == ARCH_QWEN2:
            qkv_bias, o_bias = True, False
        elif arch == ARCH_MISTRAL:
            qkv_bias = o_bias = False
        else:  # Llama and Qwen3 put `attention_bias` on q/k/v and o alike
            qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
        window = cfg.get("sliding_window") if arch == ARCH_MISTRAL else None
        return LlamaConfig(
            **base_fields(cfg, arch),
            rope_theta=theta,
            rope_scaling=scaling,
            attention_bias=qkv_bias,
            o_bias=o_bias,
            qk_norm=arch == ARCH_QWEN3,
            sliding_window=int(window) if window else None,
        )

    @classmethod
    def config_from_gguf(cls, meta: Mapping[str, Any], *, tie_word_embeddings: bool, freq_factors: Any = None) -> LlamaConfig:
        arch = GGUF_ARCHITECTURES[meta["general.architecture"]]
        return LlamaConfig(
            **gguf_base_fields(meta, arch, tie_word_embeddings=tie_word_embeddings),
            rope_scaling=gguf_rope_scaling(meta, freq_factors),
            attention_bias=arch == ARCH_QWEN2,
            qk_norm=arch == ARCH_QWEN3,
            sliding_window=None,  # Mistral GGUFs say `llama`: nothing marks a window as in use
        )

    @classmethod
    def param_shapes(cls, cfg: LlamaConfigT) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every parameter the model holds for `cfg` (see module docstring)."""
        L, H, F, D = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        shapes: dict[str, tuple[int, ...]] = {
            "embed": (cfg.vocab_size, H),
            "layers.attn_norm": (L, H),
            "layers.wq": (L, H, cfg.q_size),
            "layers.wk": (L, H, cfg.kv_size),
            "layers.wv": (L, H, cfg.kv_size),
            "layers.wo": (L, cfg.q_size, H),
            "layers.mlp_norm": (L, H),
            "layers.w_gate": (L, H, F),
            "layers.w_up": (L, H, F),
            "layers.w_down": (L, F, H),
            "final_norm": (H,),
        }
        if cfg.attention_bias:
            shapes.update({"layers.bq": (L, cfg.q_size), "layers.bk": (L, cfg.kv_size), "layers.bv": (L, cfg.kv_size)})
        if cfg.o_bias:
            shapes["layers.bo"] = (L, H)
        if cfg.qk_norm:
            shapes.update({"layers.q_norm": (L, D), "layers.k_norm": (L, D)})
        if not cfg.tie_word_embeddings:
            shapes["lm_head"] = (cfg.vocab_size, H)
        return shapes

    @classmethod
    def hf_names(cls, cfg: LlamaConfigT) -> NameMap:
        names: NameMap = {k: (hf, False) for k, (hf, _) in _GLOBAL_NAMES.items()}
        names.update({f"layers.{k}": (f"model.layers.{{i}}.{hf}", t) for k, (hf, _, t) in _LAYER_NAMES.items()})
        return names

    @classmethod
    def gguf_names(cls, cfg: LlamaConfigT) -> GGUFNameMap:
        names: GGUFNameMap = {k: (g, False) for k, (_, g) in _GLOBAL_NAMES.items()}
        names.update({f"layers.{k}": (f"blk.{{i}}.{g}", t) for k, (_, g, t) in _LAYER_NAMES.items()})
        return names

    @classmethod
    def from_gguf_tensor(cls, name: str, w: np.ndarray, cfg: LlamaConfigT, meta: Mapping[str, Any]) -> np.ndarray:
        """Undoes the Q/K row permutation llama.cpp's converter applies for the `llama` architecture."""
        if meta.get("general.architecture") != "llama":
            return w
        if name in ("layers.wq", "layers.bq"):
            return unpermute_rows(w, cfg.num_heads)
        if name in ("layers.wk", "layers.bk"):
            return unpermute_rows(w, cfg.num_kv_heads)
        return w

    @classmethod
    def partition_kinds(cls, cfg: LlamaConfigT) -> dict[str, str]:
        return dict(_PARTITION)

    def rope(self, positions: jax.Array, md: AttentionMetadata) -> tuple[jax.Array, jax.Array]:
        """cos, sin [T, rotary_dim // 2] of the new tokens (Phi-3 overrides this for LongRoPE)."""
        cfg = self.config
        return cos_sin(positions, inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))

    def __call__(self, kv_cache: Any, token_ids: jax.Array, positions: jax.Array, md: AttentionMetadata) -> tuple[Any, jax.Array]:
        cfg = self.config
        rope = self.rope(positions, md)
        spec = nn.AttentionSpec(
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, sm_scale=cfg.head_dim**-0.5, sliding_window=cfg.sliding_window,
            qk_norm=functools.partial(nn.rms_norm, eps=cfg.rms_norm_eps) if cfg.qk_norm else None,
        )

        def layer(slot: int, i: Any, p: nn.Params, carry: Any) -> Any:
            x, cache = carry
            cache, o = nn.attention(spec, p, nn.rms_norm(x, p["attn_norm"], cfg.rms_norm_eps), cache, i, md, rope)
            x = x + o
            x = x + nn.swiglu(nn.rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps), p)
            return x, cache

        x = nn.embed(self.embed[...], token_ids)
        x, kv_cache = nn.scan_layers(layer, self.layers.arrays(), (x, kv_cache), cfg.num_layers,
                                     in_place=nn.reads_weights_in_place(md), rows=md.num_tokens())
        return kv_cache, nn.rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)


def gguf_rope_scaling(meta: Mapping[str, Any], freq_factors: Any = None) -> RopeScaling | None:
    """RoPE scaling of a Llama-block GGUF: a `rope_freqs` tensor (Llama 3), else `rope.scaling.type` linear."""
    garch = meta["general.architecture"]
    stype = meta.get(f"{garch}.rope.scaling.type")
    if freq_factors is not None:
        return RopeScaling("freq_factors", freq_factors=tuple(float(f) for f in freq_factors))
    if stype in (None, "none"):
        return None
    if stype != "linear":
        raise NotImplementedError(f"GGUF rope scaling {stype!r} is not supported (supported: linear)")
    return RopeScaling("linear", factor=float(meta.get(f"{garch}.rope.scaling.factor", 1.0)))


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's per-head row interleave of Q/K weights (rows = heads * head_dim)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


param_shapes = LlamaForCausalLM.param_shapes  # kept for callers of `jengine.models.llama.param_shapes`
