"""Phi-3 and Phi-4-mini: the Llama block with fused projections, LongRoPE and partial rotary.

What sets it apart from the Llama family (`llama.py`, whose forward this reuses):
- the checkpoint fuses q/k/v into `self_attn.qkv_proj` and gate/up into `mlp.gate_up_proj`; the
  loader splits them by rows into the Llama parameters (`wq`/`wk`/`wv`, `w_gate`/`w_up`), so tensor
  parallelism shards each part on its own and a quantized or LoRA weight can stand in for each;
- `partial_rotary_factor` (Phi-4-mini: 0.75): only the first `rotary_dim` features of a head rotate;
- LongRoPE (`rope_scaling` type `longrope`, old spellings `su`/`yarn`): inverse frequencies divided
  by a per-frequency `short_factor` or `long_factor`, and cos/sin scaled by an attention factor
  (`attention_factor`, else `sqrt(1 + ln(s) / ln(original_max))` with `s = max_position_embeddings /
  original_max_position_embeddings`).

Which factors a token uses. HF's forward picks one set per call: long when the call's sequence
length (largest position + 1) exceeds `original_max_position_embeddings`, else short; keys already in
its cache keep the rotation they were given. A paged step holds many sequences, so jengine applies
that rule per sequence (row) of the step: a row uses the long factors when its `seq_lens` entry
(cached plus new tokens) exceeds `original_max_position_embeddings`. Per row rather than by
`max_model_len` (always long when the engine allows long contexts), because the per-row rule equals HF
for every sequence that stays within the original context and for every prompt already past it,
the two regimes that cover nearly all requests; a fixed choice by `max_model_len` would give short
requests the long factors, which HF never does.

Where it differs: a sequence that crosses the boundary while decoding. HF's forward then uses the long
factors for the new tokens only (jengine does the same, tested), but HF `generate` drops its cache at
that step and re-runs the whole sequence with the long factors; matching that would need the
scheduler to recompute the sequence (as preemption by recompute does), left for later. Also, a
prefix-cache hit reuses pages whose keys were rotated under the factors of the sequence that wrote them.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jengine.attention import AttentionMetadata
from jengine.models.base import GGUFNameMap, NameMap, Source
from jengine.models.config import base_fields, gguf_base_fields, unsupported_field
from jengine.models.llama import LlamaConfig, LlamaForCausalLM, _GLOBAL_NAMES, _LAYER_NAMES
from jengine.models.rope import cos_sin

ARCH_PHI3 = "Phi3ForCausalLM"
LONGROPE_SPELLINGS = ("longrope", "su", "yarn")  # HF's Phi-3 config maps the old names to longrope


@dataclasses.dataclass(frozen=True)
class LongRope:
    """LongRoPE parameters: per-frequency divisors for short and long contexts, the cos/sin scale."""

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position_embeddings: int
    attention_factor: float


@dataclasses.dataclass(frozen=True)
class Phi3Config(LlamaConfig):
    rotary_dim: int = 0  # features of a head that rotate (head_dim * partial_rotary_factor)
    longrope: LongRope | None = None


def _rope_spec(cfg: Mapping[str, Any]) -> tuple[float, dict[str, Any], float]:
    """(theta, scaling dict, partial_rotary_factor) from transformers 5 or 4 spellings."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    spec = params or scaling
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    partial = float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    return theta, spec, partial


def _longrope(spec: Mapping[str, Any], cfg: Mapping[str, Any], rotary_dim: int) -> LongRope:
    arch = ARCH_PHI3
    orig = int(spec.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings") or 4096)
    factors = {}
    for key in ("short_factor", "long_factor"):
        f = spec.get(key)
        if not isinstance(f, (list, tuple)) or len(f) != rotary_dim // 2:
            raise unsupported_field(arch, f"rope_scaling.{key}", f)
        factors[key] = tuple(float(v) for v in f)
    attn = spec.get("attention_factor")
    if attn is None:
        scale = spec.get("factor") or int(cfg.get("max_position_embeddings", orig)) / orig
        attn = 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(orig))
    return LongRope(factors["short_factor"], factors["long_factor"], orig, float(attn))


def _fused_sources(cfg: Phi3Config, qkv: str, gate_up: str) -> dict[str, Source]:
    """The Llama parameters read as row slices of the fused `[out, in]` tensors (q, k, v rows; gate, up rows)."""
    q, kv, F = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    return {
        "layers.wq": Source(qkv, True, rows=(0, q)),
        "layers.wk": Source(qkv, True, rows=(q, q + kv)),
        "layers.wv": Source(qkv, True, rows=(q + kv, q + 2 * kv)),
        "layers.w_gate": Source(gate_up, True, rows=(0, F)),
        "layers.w_up": Source(gate_up, True, rows=(F, 2 * F)),
    }


class Phi3ForCausalLM(LlamaForCausalLM[Phi3Config]):
    """Phi-3 / Phi-4-mini over a paged KV cache (see the module docstring)."""

    config_class = Phi3Config

    @classmethod
    def config_from_hf(cls, cfg: Mapping[str, Any]) -> Phi3Config:
        arch = cfg["architectures"][0]
        if arch != ARCH_PHI3:
            raise NotImplementedError(f"architecture {arch!r} is not Phi-3 ({ARCH_PHI3})")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise unsupported_field(arch, "hidden_act", act)
        base = base_fields(cfg, arch)
        theta, spec, partial = _rope_spec(cfg)
        rotary_dim = int(base["head_dim"] * partial)
        if rotary_dim % 2 or not 0 < rotary_dim <= base["head_dim"]:
            raise unsupported_field(arch, "partial_rotary_factor", partial)
        rtype = spec.get("rope_type") or spec.get("type") or "default"
        longrope = None
        if rtype in LONGROPE_SPELLINGS:
            longrope = _longrope(spec, cfg, rotary_dim)
        elif rtype not in (None, "default"):
            raise NotImplementedError(f"{arch}: rope_scaling type {rtype!r} is not supported (supported: default, longrope)")
        window = cfg.get("sliding_window")
        return Phi3Config(
            **base,
            rope_theta=theta,
            rope_scaling=None,
            sliding_window=int(window) if window else None,
            rotary_dim=rotary_dim,
            longrope=longrope,
        )

    @classmethod
    def hf_names(cls, cfg: Phi3Config) -> NameMap:
        names: NameMap = {k: (hf, False) for k, (hf, _) in _GLOBAL_NAMES.items()}
        for k, (hf, _, t) in _LAYER_NAMES.items():
            names[f"layers.{k}"] = (f"model.layers.{{i}}.{hf}", t)
        names.update(_fused_sources(cfg, "model.layers.{i}.self_attn.qkv_proj.weight", "model.layers.{i}.mlp.gate_up_proj.weight"))
        return names

    @classmethod
    def config_from_gguf(cls, meta: Mapping[str, Any], *, tie_word_embeddings: bool, freq_factors: Any = None,
                         rope_factors: Mapping[str, tuple[float, ...]] | None = None) -> Phi3Config:
        """llama.cpp's `phi3` metadata: `rope.dimension_count` is the rotary part of a head (not the head
        size), LongRoPE's factors are the `rope_factors_{short,long}` tensors."""
        def get(key: str, default: Any = None) -> Any:
            return meta.get(f"phi3.{key}", default)

        if freq_factors is not None:
            raise NotImplementedError("phi3 GGUF: a rope_freqs tensor is not supported (LongRoPE factors are rope_factors_*)")
        base = gguf_base_fields(meta, ARCH_PHI3, tie_word_embeddings=tie_word_embeddings)
        base["head_dim"] = int(get("attention.key_length") or base["hidden_size"] // base["num_heads"])
        rotary_dim = int(get("rope.dimension_count") or base["head_dim"])
        if rotary_dim % 2 or not 0 < rotary_dim <= base["head_dim"]:
            raise unsupported_field(ARCH_PHI3, "phi3.rope.dimension_count", rotary_dim)
        longrope = None
        if rope_factors:
            spec = {f"{k}_factor": list(rope_factors.get(k, ())) for k in ("short", "long")}
            spec["original_max_position_embeddings"] = get("rope.scaling.original_context_length")
            spec["attention_factor"] = get("rope.scaling.attn_factor")
            longrope = _longrope(spec, {"max_position_embeddings": base["max_position_embeddings"]}, rotary_dim)
        window = get("attention.sliding_window")
        return Phi3Config(**base, rope_scaling=None, sliding_window=int(window) if window else None,
                          rotary_dim=rotary_dim, longrope=longrope)

    @classmethod
    def gguf_names(cls, cfg: Phi3Config) -> GGUFNameMap:
        """llama.cpp keeps the fused tensors (`attn_qkv`, and `ffn_up` holding gate then up): split by rows."""
        names: GGUFNameMap = {k: (g, False) for k, (_, g) in _GLOBAL_NAMES.items()}
        names.update({f"layers.{k}": (f"blk.{{i}}.{g}", t) for k, (_, g, t) in _LAYER_NAMES.items()})
        names.update(_fused_sources(cfg, "blk.{i}.attn_qkv.weight", "blk.{i}.ffn_up.weight"))
        return names

    def rope(self, positions: jax.Array, md: AttentionMetadata) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        base = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.rotary_dim, 2, dtype=np.float64) / cfg.rotary_dim))
        lr = cfg.longrope
        if lr is None:
            return cos_sin(positions, base.astype(np.float32))
        short = (base / np.asarray(lr.short_factor, np.float64)).astype(np.float32)
        long = (base / np.asarray(lr.long_factor, np.float64)).astype(np.float32)
        # each token's row -> that row's sequence length -> long factors past the original context
        token = jnp.arange(positions.shape[0], dtype=jnp.int32)
        row = jnp.searchsorted(md.query_start_loc[1:], token, side="right")
        row_len = md.seq_lens[jnp.minimum(row, md.seq_lens.shape[0] - 1)]
        inv = jnp.where((row_len > lr.original_max_position_embeddings)[:, None], jnp.asarray(long), jnp.asarray(short))
        angles = positions.astype(jnp.float32)[:, None] * inv
        return jnp.cos(angles) * lr.attention_factor, jnp.sin(angles) * lr.attention_factor
