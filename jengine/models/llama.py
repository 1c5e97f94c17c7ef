"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3) as one Flax NNX model.

Parameters (names are what sharding rules key on; L = layers, H = hidden, V = vocab, F = FFN,
D = head_dim, Hq/Hkv = query/KV heads). All matrices are stored [in, out] so `x @ w` is the matmul:

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

The layers run under `jax.lax.scan` over the stacked weights with the KV cache in the carry, so
compile time does not grow with depth and XLA updates the (donated) cache in place.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jengine.attention import AttentionMetadata, paged_attention
from jengine.models.config import ModelConfig
from jengine.models.rope import apply_rope, cos_sin, inv_frequencies


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
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


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF-style RMSNorm: normalise in float32, cast back, then scale."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


class StackedLayers(nnx.Module):
    """Holds the per-layer weights stacked on a leading layer axis (`layers.*` parameters)."""

    def __init__(self, params: Mapping[str, jax.Array]):
        self.names = tuple(sorted(params))
        for name, value in params.items():
            setattr(self, name, nnx.Param(value))

    def arrays(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in self.names}


class LlamaForCausalLM(nnx.Module):
    """Decoder-only Llama-family transformer over a paged KV cache.

    Built from already-loaded arrays (`params` keyed as in `param_shapes`); see `jengine.loader`.
    """

    param_shapes = staticmethod(param_shapes)

    def __init__(self, config: ModelConfig, params: Mapping[str, jax.Array]):
        expected = param_shapes(config)
        if set(params) != set(expected):
            raise ValueError(f"parameter names differ: missing {set(expected) - set(params)}, extra {set(params) - set(expected)}")
        for name, shape in expected.items():
            if tuple(params[name].shape) != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {tuple(params[name].shape)}")
        self.config = config
        self.embed = nnx.Param(params["embed"])
        self.layers = StackedLayers({k.removeprefix("layers."): v for k, v in params.items() if k.startswith("layers.")})
        self.final_norm = nnx.Param(params["final_norm"])
        self.lm_head = None if config.tie_word_embeddings else nnx.Param(params["lm_head"])

    @property
    def dtype(self) -> Any:
        return self.embed[...].dtype

    def __call__(
        self, kv_cache: Any, token_ids: jax.Array, positions: jax.Array, md: AttentionMetadata
    ) -> tuple[Any, jax.Array]:
        """Runs the new tokens[T] through all layers; returns (kv_cache, final-normed hidden[T, H])."""
        cfg = self.config
        x = jnp.take(self.embed[...], token_ids, axis=0)
        cos, sin = cos_sin(positions, inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))

        def body(carry, xs):
            x, cache = carry
            p, layer = xs
            x, cache = _decoder_layer(cfg, p, layer, x, cache, cos, sin, md)
            return (x, cache), None

        xs = (self.layers.arrays(), jnp.arange(cfg.num_layers, dtype=jnp.int32))
        (x, kv_cache), _ = jax.lax.scan(body, (x, kv_cache), xs)
        return kv_cache, rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """hidden[S, H] -> logits[S, V] in float32 (accumulated in float32, no float32 weight copy)."""
        w = self.embed[...] if self.lm_head is None else self.lm_head[...]
        return jnp.einsum("sh,vh->sv", hidden.astype(w.dtype), w, preferred_element_type=jnp.float32)


def _decoder_layer(
    cfg: ModelConfig,
    p: Mapping[str, jax.Array],
    layer: jax.Array,
    x: jax.Array,
    cache: Any,
    cos: jax.Array,
    sin: jax.Array,
    md: AttentionMetadata,
) -> tuple[jax.Array, Any]:
    """One pre-norm block: attention then SwiGLU MLP, both residual."""
    T, D = x.shape[0], cfg.head_dim
    h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
    q, k, v = h @ p["wq"], h @ p["wk"], h @ p["wv"]
    if cfg.attention_bias:
        q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
    q = q.reshape(T, cfg.num_heads, D)
    k = k.reshape(T, cfg.num_kv_heads, D)
    v = v.reshape(T, cfg.num_kv_heads, D)
    if cfg.qk_norm:
        q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    cache, o = paged_attention(cache, layer, q, k, v, md, sm_scale=D**-0.5, sliding_window=cfg.sliding_window)
    o = o.reshape(T, cfg.q_size).astype(x.dtype) @ p["wo"]
    if cfg.o_bias:
        o = o + p["bo"]
    x = x + o
    h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
    x = x + (jax.nn.silu(h @ p["w_gate"]) * (h @ p["w_up"])) @ p["w_down"]
    return x, cache
