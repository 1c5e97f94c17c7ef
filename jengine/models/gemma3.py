"""Gemma 3 (text): Gemma 2's blocks with q/k norms and a RoPE per layer kind.

Differences from Gemma 2 (`gemma2.py`, whose config and forward this reuses):
- `layer_types` defaults to five sliding-window layers then one global (`sliding_window_pattern`);
- q and k get a per-head `(1 + w)` RMSNorm before RoPE (`layers.q_norm`, `layers.k_norm` [L, D]);
- sliding layers use their own RoPE base (`rope_local_base_freq`, 10k), global layers `rope_theta`
  (1M) with the config's RoPE scaling (linear on the larger models);
- no attention logit soft-capping (HF's Gemma 3 attention never applies `attn_logit_softcapping`).

GGUF files are not read yet (llama.cpp stores Gemma norm weights as `1 + w` and leaves the local
RoPE base and the 5:1 pattern implicit; a reader has to undo and restore those).
"""
from __future__ import annotations

from typing import Any, Mapping

from jengine.models.config import RopeScaling, base_fields, parse_rope_spec
from jengine.models.gemma2 import FULL, SLIDING, Gemma2ForCausalLM, GemmaConfig, check_common, layer_types

DEFAULT_THETA = {FULL: 1_000_000.0, SLIDING: 10_000.0}
DEFAULT_PATTERN = 6  # every sixth layer is global


def _rope(cfg: Mapping[str, Any]) -> dict[str, tuple[float, RopeScaling | None]]:
    """(theta, scaling) per layer kind from transformers 5's nested `rope_parameters` or 4's flat keys."""
    params = cfg.get("rope_parameters") or {}
    if FULL in params or SLIDING in params:  # transformers 5
        out = {}
        for kind in (FULL, SLIDING):
            spec = params.get(kind) or {}
            out[kind] = (float(spec.get("rope_theta", DEFAULT_THETA[kind])), parse_rope_spec(spec, f"rope_parameters.{kind}"))
        return out
    flat = params or cfg.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", DEFAULT_THETA[FULL])))
    local = float(cfg.get("rope_local_base_freq", DEFAULT_THETA[SLIDING]))
    return {FULL: (theta, parse_rope_spec(flat)), SLIDING: (local, None)}


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 3 text model over a paged KV cache (see the module docstring)."""

    @classmethod
    def config_from_hf(cls, cfg: Mapping[str, Any]) -> GemmaConfig:
        arch = cfg["architectures"][0]
        check_common(cfg, arch)
        rope = _rope(cfg)
        period = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or DEFAULT_PATTERN)
        return GemmaConfig(
            **{**base_fields(cfg, arch), "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", True))},
            rope_theta=rope[FULL][0],
            rope_scaling=rope[FULL][1],
            local_rope_theta=rope[SLIDING][0],
            local_rope_scaling=rope[SLIDING][1],
            layer_types=layer_types(cfg, arch, period),
            sliding_window=int(cfg["sliding_window"]) if cfg.get("sliding_window") else None,
            query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)),
            final_logit_softcapping=float(cfg["final_logit_softcapping"]) if cfg.get("final_logit_softcapping") else None,
            attention_bias=bool(cfg.get("attention_bias", False)),
            qk_norm=True,
        )
