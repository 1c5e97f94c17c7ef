"""Gemma 3 (text): Gemma 2's blocks with q/k norms and a RoPE per layer kind.

Differences from Gemma 2 (`gemma2.py`, whose config and forward this reuses):
- `layer_types` defaults to five sliding-window layers then one global (`sliding_window_pattern`);
- q and k get a per-head `(1 + w)` RMSNorm before RoPE (`layers.q_norm`, `layers.k_norm` [L, D]);
- sliding layers use their own RoPE base (`rope_local_base_freq`, 10k), global layers `rope_theta`
  (1M) with the config's RoPE scaling (linear on the larger models);
- no attention logit soft-capping (HF's Gemma 3 attention never applies `attn_logit_softcapping`).

GGUF files (`general.architecture` "gemma3", e.g. the Gemma 3 270M Q4_K_M on PyPI) are read too.
llama.cpp's converter changes three things a reader has to undo or restore:
- every `*norm.weight` is stored as `1 + w` (llama.cpp's RMSNorm multiplies by the weight alone), so
  `from_gguf_tensor` subtracts 1 to get back HF's `w` (the forward adds the 1 again);
- the local RoPE base and the 5:1 sliding/global pattern are not in the metadata: the defaults of HF's
  `Gemma3TextConfig` are taken (`rope_local_base_freq` 10000, `sliding_window_pattern` 6), as
  transformers' own GGUF loader does; `gemma3.attention.sliding_window` gives the window;
- `query_pre_attn_scalar` is not stored either: HF's default 256 (the Gemma 3 models up to 1B use
  it; it equals their head_dim). No final logit soft-capping, no RoPE scaling (HF's defaults).
Q and K rows are not permuted for Gemma (only llama.cpp's `llama` converter does that).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from jengine.models.base import GGUFNameMap
from jengine.models.config import RopeScaling, base_fields, gguf_base_fields, parse_rope_spec
from jengine.models.gemma2 import FULL, SLIDING, Gemma2ForCausalLM, GemmaConfig, check_common, layer_types

DEFAULT_THETA = {FULL: 1_000_000.0, SLIDING: 10_000.0}
DEFAULT_PATTERN = 6  # every sixth layer is global
DEFAULT_QUERY_PRE_ATTN_SCALAR = 256.0
ARCH = "Gemma3ForCausalLM"

# our parameter -> (GGUF name, stored [out, in]); layer names are under `blk.{i}.`
GGUF_LAYER_NAMES = {
    "attn_norm": ("attn_norm.weight", False),
    "wq": ("attn_q.weight", True),
    "wk": ("attn_k.weight", True),
    "wv": ("attn_v.weight", True),
    "wo": ("attn_output.weight", True),
    "q_norm": ("attn_q_norm.weight", False),
    "k_norm": ("attn_k_norm.weight", False),
    "post_attn_norm": ("post_attention_norm.weight", False),
    "pre_mlp_norm": ("ffn_norm.weight", False),
    "post_mlp_norm": ("post_ffw_norm.weight", False),
    "w_gate": ("ffn_gate.weight", True),
    "w_up": ("ffn_up.weight", True),
    "w_down": ("ffn_down.weight", True),
}
GGUF_GLOBAL_NAMES = {"embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight"}


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

    @classmethod
    def config_from_gguf(cls, meta: Mapping[str, Any], *, tie_word_embeddings: bool, freq_factors: Any = None) -> GemmaConfig:
        garch = meta["general.architecture"]
        if freq_factors is not None:
            raise NotImplementedError("gemma3 GGUF: a rope_freqs tensor is not supported")
        if meta.get(f"{garch}.rope.scaling.type") not in (None, "none"):
            raise NotImplementedError(f"gemma3 GGUF: rope scaling {meta[f'{garch}.rope.scaling.type']!r} is not supported")
        base = gguf_base_fields(meta, ARCH, tie_word_embeddings=tie_word_embeddings)
        window = meta.get(f"{garch}.attention.sliding_window")
        return GemmaConfig(
            **base,
            local_rope_theta=DEFAULT_THETA[SLIDING],
            layer_types=layer_types({"num_hidden_layers": base["num_layers"]}, ARCH, DEFAULT_PATTERN),
            sliding_window=int(window) if window else None,
            query_pre_attn_scalar=DEFAULT_QUERY_PRE_ATTN_SCALAR,
            qk_norm=True,
        )

    @classmethod
    def gguf_names(cls, cfg: GemmaConfig) -> GGUFNameMap:
        names: GGUFNameMap = {k: (g, False) for k, g in GGUF_GLOBAL_NAMES.items()}
        names.update({f"layers.{k}": (f"blk.{{i}}.{g}", t) for k, (g, t) in GGUF_LAYER_NAMES.items()})
        return names

    @classmethod
    def from_gguf_tensor(cls, name: str, w: np.ndarray, cfg: GemmaConfig, meta: Mapping[str, Any]) -> np.ndarray:
        """llama.cpp stores Gemma's norm weights as `1 + w`; HF's (and our forward's) convention is `w`."""
        return w - np.float32(1.0) if name.endswith("norm") else w
