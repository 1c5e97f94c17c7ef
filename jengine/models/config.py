"""The fields every model family shares, plus the parsing helpers the families' config readers use.

`ModelConfig` is frozen (hashable) because it is a static argument of jitted code. Each family
subclasses it with its own extra fields (`LlamaConfig`, `GemmaConfig`) and parses HF `config.json`
(transformers 4 and 5 spellings) and GGUF metadata itself; `ModelConfig.from_hf_config` and
`ModelConfig.from_gguf_metadata` only look the family up in the registry and hand over.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping


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
    """What the engine needs of any model: sizes, cache shape, vocabulary, special tokens.

    No transformers objects, so it is cheap and hashable. Family subclasses add their own fields.
    """

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
        """Parses a `config.json` dict with the parser of the family that `architectures[0]` names."""
        from jengine.models import get_model_class

        archs = cfg.get("architectures") or []
        if not archs:
            raise ValueError("config.json has no `architectures` entry")
        return get_model_class(archs[0]).config_from_hf(cfg)

    @classmethod
    def from_gguf_metadata(
        cls, meta: Mapping[str, Any], *, tie_word_embeddings: bool, freq_factors: tuple[float, ...] | None = None
    ) -> "ModelConfig":
        """Parses GGUF key/values with the family that `general.architecture` names.

        `tie_word_embeddings` is whether the file lacks `output.weight`; `freq_factors` is the content of a
        `rope_freqs.weight` tensor when present (llama.cpp's form of Llama 3 RoPE scaling).
        """
        from jengine.models import get_gguf_model_class

        return get_gguf_model_class(meta.get("general.architecture"), meta).config_from_gguf(
            meta, tie_word_embeddings=tie_word_embeddings, freq_factors=freq_factors
        )


# ----- helpers for the families' parsers ------------------------------------------------------


def dtype_name(d: Any) -> str | None:
    """`config.json`'s `dtype`/`torch_dtype` ("torch.bfloat16" or "bfloat16") as a plain name."""
    return None if d is None else str(d).removeprefix("torch.")


def eos_ids(eos: Any) -> tuple[int, ...]:
    """An `eos_token_id` entry (int, list or None) as a tuple."""
    if isinstance(eos, (list, tuple)):
        return tuple(int(e) for e in eos)
    return () if eos is None else (int(eos),)


def parse_rope_spec(spec: Mapping[str, Any], where: str = "rope_scaling") -> RopeScaling | None:
    """A `rope_parameters` / `rope_scaling` dict -> RopeScaling (None for plain RoPE).

    Raises NotImplementedError naming the type for anything but default, linear and llama3.
    """
    rtype = spec.get("rope_type", spec.get("type", "default"))
    if rtype in (None, "default"):
        return None
    if rtype not in SUPPORTED_ROPE_TYPES:
        raise NotImplementedError(f"{where}: rope_type {rtype!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")
    if rtype == "linear":
        return RopeScaling("linear", factor=float(spec["factor"]))
    return RopeScaling(
        "llama3",
        factor=float(spec["factor"]),
        low_freq_factor=float(spec.get("low_freq_factor", 1.0)),
        high_freq_factor=float(spec.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(spec.get("original_max_position_embeddings", 8192)),
    )


def parse_rope(cfg: Mapping[str, Any], default_theta: float = 10000.0) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling` (4)."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", default_theta)))
    return theta, parse_rope_spec(params or scaling)


def unsupported_field(arch: str, field: str, value: Any) -> NotImplementedError:
    """The error for a config field set to a value this family cannot run (raise it)."""
    return NotImplementedError(f"{arch}: config field {field}={value!r} is not supported")


def base_fields(cfg: Mapping[str, Any], arch: str) -> dict[str, Any]:
    """The `ModelConfig` fields read the same way by every family from `config.json`."""
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    return dict(
        architecture=arch,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids(cfg.get("eos_token_id")),
        checkpoint_dtype=dtype_name(cfg.get("dtype") or cfg.get("torch_dtype")),
    )


def gguf_base_fields(meta: Mapping[str, Any], arch: str, *, tie_word_embeddings: bool) -> dict[str, Any]:
    """The `ModelConfig` fields read the same way by every family from GGUF `{general.architecture}.*` keys."""
    garch = meta["general.architecture"]

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{garch}.{key}", default)

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    vocab = get("vocab_size")
    if vocab is None:
        vocab = len(meta["tokenizer.ggml.tokens"])
    eos = [meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id")]
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return dict(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length") or get("rope.dimension_count") or hidden // heads),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
        checkpoint_dtype=None,
    )
