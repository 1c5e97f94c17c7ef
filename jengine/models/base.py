"""The contract every model family implements, and what the families share of it.

A family is a `CausalLM` subclass in its own file. Its class methods are what the rest of the
engine asks of it (the loader, `jengine.sharding`, the registry); its instance is the Flax NNX
model the runner calls:

    config_from_hf(config_json) -> ModelConfig            config_from_gguf(metadata, ...) -> ModelConfig
    param_shapes(cfg) -> {name: shape}                     partition_kinds(cfg) -> {name: COLUMN | ROW | ...}
    hf_names(cfg) -> {name: Source | (template, transpose)} gguf_names(cfg) -> {name: Source | (template, transpose)}
    from_gguf_tensor(name, array, cfg, metadata) -> array  (llama.cpp layout fixes; default: none)
    check_gguf_tensors(cfg, tensor_names)                  (a file the family cannot read, said why; default: none)
    model(kv_cache, token_ids[T], positions[T], md) -> (kv_cache, hidden[T, H])
    model.compute_logits(hidden[S, H], md=None, rows=None) -> logits[S, V] (float32)

Parameter names are flat: `embed`, `final_norm`, `lm_head` and `layers.<short>` stacked over a
leading layer axis; matrices are stored `[in, out]` (so `linear(x, w)` is `x @ w`). Name templates
use `{i}` for the layer index; `transpose` says the checkpoint stores the matrix `[out, in]`. A
`Source` can also take a row slice of a fused tensor (Phi-3's `qkv_proj`), stack per-expert tensors
(`{e}` in the template) or map a parameter's stacked index to the layers that hold it.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Collection, Generic, Mapping, NamedTuple, TypeVar

import jax
import numpy as np
from flax import nnx

from jengine.attention import AttentionMetadata
from jengine.models.config import ModelConfig
from jengine.models.layers import reads_weights_in_place
from jengine.pallas_kernels.cpu_linear import lm_head, lm_head_reference

# What tensor parallelism does with a parameter (`jengine.sharding.rules` turns these into specs):
COLUMN = "column"  # output features split over the model axis (last axis; biases too)
COLUMN_KV = "column_kv"  # like COLUMN, but only when the model axis divides the KV heads, else replicated
ROW = "row"  # input features split (axis -2); XLA all-reduces the partial sums
VOCAB = "vocab"  # rows of the embedding / LM head split when the model axis divides the vocabulary
REPLICATED = "replicated"
EXPERT = "expert"  # stacked experts (axis 1 of `[L, E, ...]`) split over the model axis under expert parallelism
PARTITION_KINDS = (COLUMN, COLUMN_KV, ROW, VOCAB, REPLICATED, EXPERT)


class Source(NamedTuple):
    """Where one parameter comes from in an HF checkpoint (a plain `(template, transpose)` pair works too).

    rows: a `(start, stop)` slice of the stored tensor's first axis, i.e. of the output features of a
    fused projection stored `[out, in]` (Phi-3's `qkv_proj`, `gate_up_proj`), taken before transposing.
    experts: > 0 for a parameter stacked over experts: the template has `{e}` and the per-expert
    tensors are stacked on a new leading axis (after the layer axis the loader adds).
    layers: the checkpoint layer each stacked index reads (for parameters only some layers hold).
    """

    template: str
    transpose: bool
    rows: tuple[int, int] | None = None
    experts: int = 0
    layers: tuple[int, ...] | None = None

    def read(self, get: Callable[[str], np.ndarray], layer: int | None) -> np.ndarray:
        """The tensor for stacked index `layer` (None for unstacked ones) in the model's layout."""
        i = layer if self.layers is None or layer is None else self.layers[layer]

        def one(name: str) -> np.ndarray:
            w = get(name)
            if self.rows is not None:
                w = w[self.rows[0] : self.rows[1]]
            return w.T if self.transpose else w

        if self.experts:
            return np.stack([one(self.template.format(i=i, e=e)) for e in range(self.experts)])
        return one(self.template.format(i=i))


NameMap = dict[str, "Source | tuple[str, bool]"]
# GGUF maps: `rows` of fused tensors as in HF maps; no `experts`: llama.cpp stacks a layer's experts in one
# tensor [E, out, in], and `transpose` swaps its last two axes (per expert)
GGUFNameMap = dict[str, "Source | tuple[str, bool]"]


class StackedLayers(nnx.Module):
    """Holds the per-layer weights stacked on a leading layer axis (`layers.*` parameters)."""

    def __init__(self, params: Mapping[str, Any]):
        self.names = tuple(sorted(params))
        for name, value in params.items():
            setattr(self, name, nnx.Param(value))

    def arrays(self) -> dict[str, Any]:
        """Name -> stacked weight: an array, or a `Weight` pytree (hence `get_value`, not `[...]`)."""
        return {name: getattr(self, name).get_value() for name in self.names}


ConfigT = TypeVar("ConfigT", bound=ModelConfig)


class CausalLM(nnx.Module, Generic[ConfigT]):
    """Shared parts of a decoder-only model: parameter checks and holding, the LM head.

    Subclasses set `config_class` and implement the class methods in the module docstring and
    `__call__`. Built from already-loaded arrays keyed as in `param_shapes` (see `jengine.loader`).
    Generic over the family's config class, so a family's methods see its own config fields.
    """

    config_class: ClassVar[type[ModelConfig]] = ModelConfig

    def __init__(self, config: ConfigT, params: Mapping[str, Any]):
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        expected = self.param_shapes(config)
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

    # ----- what the loader and the sharding rules ask of a family ------------------------------
    @classmethod
    def config_from_hf(cls, cfg: Mapping[str, Any]) -> ModelConfig:
        raise NotImplementedError

    @classmethod
    def config_from_gguf(cls, meta: Mapping[str, Any], *, tie_word_embeddings: bool, freq_factors: Any = None) -> ModelConfig:
        raise NotImplementedError(f"{cls.__name__} cannot be read from GGUF files")

    @classmethod
    def param_shapes(cls, cfg: ConfigT) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    @classmethod
    def hf_names(cls, cfg: ConfigT) -> NameMap:
        raise NotImplementedError

    @classmethod
    def gguf_names(cls, cfg: ConfigT) -> GGUFNameMap:
        raise NotImplementedError(f"{cls.__name__} cannot be read from GGUF files")

    @classmethod
    def from_gguf_tensor(cls, name: str, w: np.ndarray, cfg: ConfigT, meta: Mapping[str, Any]) -> np.ndarray:
        """A GGUF tensor (after dequantization, before transposing) in the HF checkpoint's convention."""
        return w

    @classmethod
    def check_gguf_tensors(cls, cfg: ConfigT, tensor_names: Collection[str]) -> None:
        """Raises, saying why, for a GGUF file whose tensors do not make the model `cfg` describes,
        before any is read. The default checks nothing: a missing tensor is named when it is read."""

    @classmethod
    def partition_kinds(cls, cfg: ConfigT) -> dict[str, str]:
        raise NotImplementedError

    # ----- the model ----------------------------------------------------------------------------
    @property
    def dtype(self) -> Any:
        return self.embed[...].dtype

    def __call__(self, kv_cache: Any, token_ids: jax.Array, positions: jax.Array, md: AttentionMetadata) -> tuple[Any, jax.Array]:
        """Runs the new tokens[T] through all layers; returns (kv_cache, final-normed hidden[T, H])."""
        raise NotImplementedError

    def compute_logits(self, hidden: jax.Array, md: AttentionMetadata | None = None, rows: jax.Array | None = None) -> jax.Array:
        """hidden[S, H] -> logits[S, V] in float32 (accumulated in float32, no float32 weight copy).

        `md`, the step's metadata: where the layers read their weights in place (`reads_weights_in_place`:
        the CPU, unsharded), so does the head, natively for few rows (`cpu_linear.lm_head`: as fast as
        XLA's dot at one row, 1.3-1.5x faster at 2-8, which XLA reads the [V, H] matrix slower for, and
        on the library's helper threads), for hidden's first `rows` rows (the rest is the bucket's
        padding; None: all); without `md`, or else, XLA's dot over every row."""
        w = self.embed[...] if self.lm_head is None else self.lm_head[...]
        if md is not None and reads_weights_in_place(md):
            return lm_head(hidden, w, rows)
        return lm_head_reference(hidden, w)
