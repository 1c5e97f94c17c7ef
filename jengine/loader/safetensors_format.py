"""Reads HF safetensors checkpoints (single file or sharded with an index) through memory maps.

A tiny reader of our own (8-byte header length, JSON header, raw data) gives numpy views of the
mapped file, including bfloat16 via ml_dtypes, so nothing is read or converted twice.
"""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from jengine.models import get_model_class
from jengine.models.base import Source
from jengine.models.config import ModelConfig

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}

class SafetensorsFile:
    """Lazy numpy views of the tensors of one `.safetensors` file."""

    def __init__(self, path: str):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.header = header
        self.path = path
        self._data_start = 8 + n
        self._mmap: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self.header)

    def get(self, name: str) -> np.ndarray:
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        info = self.header[name]
        begin, end = info["data_offsets"]
        raw = self._mmap[self._data_start + begin : self._data_start + end]
        return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


class SafetensorsCheckpoint:
    """All tensors of a checkpoint directory, by name, across shards."""

    def __init__(self, directory: str):
        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(f"no .safetensors files in {directory}")
        self._files = {f: SafetensorsFile(os.path.join(directory, f)) for f in files}
        self._where = {k: f for f, st in self._files.items() for k in st.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise KeyError(f"tensor {name!r} not found in the checkpoint")
        return self._files[self._where[name]].get(name)

    def fetch_for(self, cfg: ModelConfig):
        """A `fetch(name, layer)` in the model's layout (see jengine.loader.weights), by the family's name map."""
        names = get_model_class(cfg.architecture).hf_names(cfg)

        def fetch(name: str, layer: int | None) -> np.ndarray:
            return Source(*names[name]).read(self.get, layer)

        return fetch
