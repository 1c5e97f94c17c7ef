"""Architecture hyperparameters of the Llama family, parsed from HF `config.json` or GGUF metadata.

One frozen (hashable) dataclass so it can be a static argument of jitted code. Both transformers 4
(`rope_theta`, `rope_scaling`) and transformers 5 (`rope_parameters`) spellings are accepted.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

ARCH_LLAMA = "LlamaForCausalLM"
ARCH_MISTRAL = "MistralForCausalLM"
ARCH_QWEN2 = "Qwen2ForCausalLM"
ARCH_QWEN3 = "Qwen3ForCausalLM"

# GGUF `general.architecture` -> HF architecture name.
GGUF_ARCHITECTURES = {"llama": ARCH_LLAMA, "qwen2": ARCH_QWEN2, "qwen3": ARCH_QWEN3}  # Mistral GGUFs use "llama"


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `rope_type`: "linear", "llama3" or "freq_factors" (GGUF `rope_freqs`)."""

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    freq_factors: tuple[float, ...] | None = None  # per-frequency divisors (llama.cpp's rope_freqs)


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the model code needs; no transformers objects, so it is cheap and hashable."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q/k/v projections
    o_bias: bool = False  # bias on the output projection (Llama/Qwen3 `attention_bias`)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    checkpoint_dtype: str | None = None  # "float32", "bfloat16", ... as stored in the checkpoint

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> "ModelConfig":
        """Parses a `config.json` dict (transformers 4 or 5 spelling)."""
        archs = cfg.get("architectures") or []
        if not archs:
            raise ValueError("config.json has no `architectures` entry")
        arch = archs[0]
        if arch not in (ARCH_LLAMA, ARCH_MISTRAL, ARCH_QWEN2, ARCH_QWEN3):
            raise NotImplementedError(f"architecture {arch!r} is not supported")
        if cfg.get("mlp_bias"):
            raise NotImplementedError("mlp_bias=True is not supported")
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        theta, scaling = _parse_rope(cfg)

        if arch == ARCH_QWEN2:
            qkv_bias, o_bias = True, False
        elif arch == ARCH_MISTRAL:
            qkv_bias = o_bias = False
        else:  # Llama and Qwen3 put `attention_bias` on q/k/v and o alike
            qkv_bias = o_bias = bool(cfg.get("attention_bias", False))

        window = None
        if arch == ARCH_MISTRAL:
            window = cfg.get("sliding_window")
        elif arch in (ARCH_QWEN2, ARCH_QWEN3) and cfg.get("use_sliding_window"):
            raise NotImplementedError("Qwen per-layer sliding window (use_sliding_window=True) is not supported")

        eos = cfg.get("eos_token_id")
        eos_ids = tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            o_bias=o_bias,
            qk_norm=arch == ARCH_QWEN3,
            sliding_window=int(window) if window else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            checkpoint_dtype=_dtype_name(cfg.get("dtype") or cfg.get("torch_dtype")),
        )

    @classmethod
    def from_gguf_metadata(
        cls, meta: Mapping[str, Any], *, tie_word_embeddings: bool, freq_factors: tuple[float, ...] | None = None
    ) -> "ModelConfig":
        """Builds the config from GGUF key/values (`{arch}.block_count`, ...).

        `tie_word_embeddings` is whether the file lacks `output.weight`; `freq_factors` is the content of a
        `rope_freqs.weight` tensor when present (llama.cpp's form of Llama 3 RoPE scaling).
        """
        garch = meta["general.architecture"]
        if garch not in GGUF_ARCHITECTURES:
            raise NotImplementedError(f"GGUF architecture {garch!r} is not supported")
        arch = GGUF_ARCHITECTURES[garch]

        def get(key: str, default: Any = None) -> Any:
            return meta.get(f"{garch}.{key}", default)

        hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
        kv_heads = get("attention.head_count_kv", heads)
        head_dim = int(get("attention.key_length") or get("rope.dimension_count") or hidden // heads)
        vocab = get("vocab_size")
        if vocab is None:
            vocab = len(meta["tokenizer.ggml.tokens"])
        scaling = None
        stype = get("rope.scaling.type")
        if freq_factors is not None:
            scaling = RopeScaling("freq_factors", freq_factors=tuple(float(f) for f in freq_factors))
        elif stype not in (None, "none"):
            if stype != "linear":
                raise NotImplementedError(f"GGUF rope scaling {stype!r} is not supported")
            scaling = RopeScaling("linear", factor=float(get("rope.scaling.factor", 1.0)))
        eos = [meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id")]
        eos_ids = tuple(dict.fromkeys(int(e) for e in eos if e is not None))
        window = get("attention.sliding_window")
        bos = meta.get("tokenizer.ggml.bos_token_id")
        return cls(
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=int(get("context_length", 2048)),
            tie_word_embeddings=tie_word_embeddings,
            attention_bias=arch == ARCH_QWEN2,
            o_bias=False,
            qk_norm=arch == ARCH_QWEN3,
            sliding_window=int(window) if window and arch == ARCH_MISTRAL else None,
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=eos_ids,
            checkpoint_dtype=None,
        )


def _dtype_name(d: Any) -> str | None:
    if d is None:
        return None
    return str(d).removeprefix("torch.")


def _parse_rope(cfg: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling` (4)."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    spec = params or scaling
    rtype = spec.get("rope_type", spec.get("type", "default"))
    if rtype in (None, "default"):
        return theta, None
    if rtype not in SUPPORTED_ROPE_TYPES:
        raise NotImplementedError(f"rope_type {rtype!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")
    if rtype == "linear":
        return theta, RopeScaling("linear", factor=float(spec["factor"]))
    return theta, RopeScaling(
        "llama3",
        factor=float(spec["factor"]),
        low_freq_factor=float(spec.get("low_freq_factor", 1.0)),
        high_freq_factor=float(spec.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(spec.get("original_max_position_embeddings", 8192)),
    )
