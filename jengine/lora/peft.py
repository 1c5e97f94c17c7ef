"""Reading PEFT LoRA adapter folders (`adapter_config.json` + `adapter_model.safetensors`).

An adapter is checked against the model it will run on before any request uses it: every tensor
must name a layer projection the model family has (found from the family's Hugging Face weight
names, so every architecture the model layer serves takes adapters without a table here), with
the shapes the projection implies, and a rank within `max_lora_rank`. A fused module the family splits
at load (Phi-3's `qkv_proj`, `gate_up_proj`) adapts each part: the parts share `lora_A` and each takes
its rows of `lora_B`, which is exactly the fused module's delta. Anything else is a
`ValueError` naming the file, field or tensor.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Mapping

import numpy as np

from jengine.lora.request import LoRARequest

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


@dataclasses.dataclass(frozen=True)
class LoRATarget:
    """One projection an adapter may adapt: our stacked parameter and its HF module path per layer."""

    param: str  # "layers.wq"
    module: str  # "q_proj": the name PEFT's target_modules uses
    template: str  # "model.layers.{i}.self_attn.q_proj"
    in_features: int
    out_features: int
    rows: tuple[int, int] | None = None  # the slice of a fused projection's outputs this parameter is (Phi-3's qkv_proj)


def lora_targets(model_class: Any, cfg: Any) -> dict[str, LoRATarget]:
    """The projections of a model family that take adapters, keyed by our parameter name.

    Every per-layer matrix the checkpoint stores `[out, in]` under `<module path>.weight` is a linear
    projection: exactly what PEFT wraps (norms are vectors; embeddings and the LM head are not per layer;
    expert stacks are 4-D and not adapted). A fused checkpoint module that the family splits at load
    (Phi-3's `qkv_proj` into `wq`/`wk`/`wv`) gives one target per part, with the rows it takes.
    """
    shapes = model_class.param_shapes(cfg)
    targets: dict[str, LoRATarget] = {}
    for name, entry in model_class.hf_names(cfg).items():
        template, transpose = entry[0], entry[1]
        rows, layers = getattr(entry, "rows", None), getattr(entry, "layers", None)
        shape = shapes.get(name)
        if (not name.startswith("layers.") or shape is None or len(shape) != 3 or not transpose
                or not template.endswith(".weight") or layers is not None):
            continue
        path = template.removesuffix(".weight")
        targets[name] = LoRATarget(name, path.rsplit(".", 1)[-1], path, int(shape[1]), int(shape[2]), rows)
    return targets


def _by_module(targets: Mapping[str, LoRATarget]) -> dict[str, list[LoRATarget]]:
    """PEFT module name -> the parameters it feeds (several for a fused projection)."""
    out: dict[str, list[LoRATarget]] = {}
    for t in targets.values():
        out.setdefault(t.module, []).append(t)
    return out


@dataclasses.dataclass
class LoRAAdapter:
    """An adapter on the host, ready for a device slot: per targeted parameter `A [L, in, r]` and
    `B [L, r, out]` (float32, the scale folded into B; layers the adapter leaves alone are zero)."""

    request: LoRARequest
    rank: int
    scale: float
    weights: dict[str, tuple[np.ndarray, np.ndarray]]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def _fail(request: LoRARequest, what: str) -> ValueError:
    return ValueError(f"LoRA adapter {request.lora_name!r} ({request.lora_path}): {what}")


def read_adapter_config(request: LoRARequest) -> dict[str, Any]:
    path = request.lora_path
    if not os.path.isdir(path):
        raise _fail(request, "lora_path does not exist or is not a folder")
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise _fail(request, f"{CONFIG_FILE} is missing (a PEFT LoRA folder holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise _fail(request, f"{CONFIG_FILE} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise _fail(request, f"{CONFIG_FILE} must hold a JSON object")
    return config


def _check_config(request: LoRARequest, config: Mapping[str, Any], targets: Mapping[str, LoRATarget], max_rank: int) -> tuple[int, float]:
    """Validates the fields jengine reads or cannot honour; returns (rank, scale)."""
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise _fail(request, f"peft_type is {peft_type!r}; only 'LORA' adapters are supported")
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise _fail(request, f"r must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise _fail(request, f"rank r={rank} is above max_lora_rank={max_rank} (raise --max-lora-rank)")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise _fail(request, f"lora_alpha must be a number, got {alpha!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise _fail(request, f"{key} (per-module ranks or alphas) is not supported")
    for key in ("use_dora", "modules_to_save"):
        if config.get(key):
            raise _fail(request, f"{key} is not supported")
    if config.get("bias", "none") != "none":
        raise _fail(request, f"bias={config.get('bias')!r} is not supported (only 'none')")
    modules = config.get("target_modules")
    known = _by_module(targets)
    if isinstance(modules, (list, tuple)):
        for module in modules:
            short = str(module).rsplit(".", 1)[-1]
            if short not in known:
                raise _fail(request, f"target module {module!r} is not a projection of this model (supported: {sorted(known)})")
    elif modules is not None and not isinstance(modules, str):
        raise _fail(request, f"target_modules must be a list of module names or a string, got {modules!r}")
    use_rslora = bool(config.get("use_rslora", False))
    scale = float(alpha) / (math.sqrt(rank) if use_rslora else rank)
    return rank, scale


def load_adapter(request: LoRARequest, targets: Mapping[str, LoRATarget], num_layers: int, max_rank: int) -> LoRAAdapter:
    """Reads and validates one PEFT adapter folder for a model with these `targets` (see module docstring)."""
    from jengine.loader.safetensors_format import SafetensorsFile

    config = read_adapter_config(request)
    rank, scale = _check_config(request, config, targets, max_rank)
    weights_path = os.path.join(request.lora_path, WEIGHTS_FILE)
    if not os.path.isfile(weights_path):
        raise _fail(request, f"{WEIGHTS_FILE} is missing (only safetensors adapters are read)")
    try:
        tensors = SafetensorsFile(weights_path)
        keys = tensors.keys()
    except Exception as e:  # noqa: BLE001 - any parse failure is a malformed file
        raise _fail(request, f"{WEIGHTS_FILE} is not a valid safetensors file ({e})") from None
    modules = _by_module(targets)
    where = {group[0].template.format(i=i): (group, i) for group in modules.values() for i in range(num_layers)}
    found: dict[str, dict[str, np.ndarray]] = {}  # module path -> {"A": ..., "B": ...}
    for key in keys:
        m = _KEY.match(key.removeprefix(_PEFT_PREFIX))
        if m is None or m.group("module") not in where:
            raise _fail(request, f"tensor {key!r} is not a LoRA A/B matrix of a projection this model has (supported modules: {sorted(modules)})")
        try:
            array = np.asarray(tensors.get(key), dtype=np.float32)
        except Exception as e:  # noqa: BLE001
            raise _fail(request, f"tensor {key!r} cannot be read ({e})") from None
        found.setdefault(m.group("module"), {})[m.group("ab")] = array
    if not found:
        raise _fail(request, f"{WEIGHTS_FILE} holds no LoRA tensors")
    weights: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for module, pair in found.items():
        group, layer = where[module]
        if set(pair) != {"A", "B"}:
            raise _fail(request, f"{module} has lora_{next(iter(pair))} but not its other half")
        a, b = pair["A"], pair["B"]
        in_features = group[0].in_features
        out_features = max(t.out_features if t.rows is None else t.rows[1] for t in group)
        if a.shape != (rank, in_features) or b.shape != (out_features, rank):
            raise _fail(request, f"{module}: lora_A {a.shape} / lora_B {b.shape} do not match r={rank} and the "
                                 f"projection's [{out_features}, {in_features}]")
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise _fail(request, f"{module} holds non-finite values")
        for target in group:  # a fused projection: every part shares A, each takes its rows of B
            part = b if target.rows is None else b[target.rows[0] : target.rows[1]]
            if target.param not in weights:
                weights[target.param] = (np.zeros((num_layers, target.in_features, rank), np.float32),
                                         np.zeros((num_layers, rank, target.out_features), np.float32))
            weights[target.param][0][layer] = a.T
            weights[target.param][1][layer] = part.T * scale
    return LoRAAdapter(request, rank, scale, weights)
