"""Reads llama.cpp GGUF files: metadata -> ModelConfig, tensors dequantized to float32 numpy.

The header (key/values and tensor table) is parsed here with `struct` rather than `gguf.GGUFReader`:
the reader builds numpy views for every element of the ~100k-entry tokenizer arrays, which takes
4-15 s for SmolLM2 on a 2-core machine, against ~0.1 s here. Tensor data stays a memory map, and
`gguf.quants.dequantize` (the `gguf` package) does the dequantization.

Tensor names and any layout fixes (llama.cpp permutes the Q/K rows of `llama` files for its
interleaved RoPE) belong to the model family (`gguf_names`, `from_gguf_tensor` in `jengine.models`).
"""
from __future__ import annotations

import dataclasses
import mmap
import struct
from typing import Any

import gguf
import numpy as np

from jengine.models import get_gguf_model_class, get_model_class
from jengine.models.config import ModelConfig

# GGUF value type id -> struct format (8 = string, 9 = array are handled in `_read_value`)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


@dataclasses.dataclass
class GGUFTensor:
    name: str
    tensor_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (ggml's dims reversed)
    data: np.ndarray  # raw bytes [*shape[:-1], bytes_per_row], a view of the file's memory map


def read_gguf(path: str) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
    """(metadata, tensors) of a little-endian GGUF v2/v3 file."""
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if buf[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (need a little-endian v2 or v3 file)")
    pos = 24

    def read(fmt: str):
        nonlocal pos
        vals = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return vals[0]

    def read_str() -> str:
        nonlocal pos
        n = read("<Q")
        pos += n
        return bytes(buf[pos - n : pos]).decode("utf-8", errors="replace")

    def read_value(vtype: int) -> Any:
        if vtype == 8:
            return read_str()
        if vtype == 9:
            itype, count = read("<I"), read("<Q")
            return [read_value(itype) for _ in range(count)]
        return read(_SCALARS[vtype])

    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = read_str()
        meta[key] = read_value(read("<I"))
    infos = []
    for _ in range(n_tensors):
        name = read_str()
        dims = [read("<Q") for _ in range(read("<I"))]
        infos.append((name, dims, read("<I"), read("<Q")))
    align = int(meta.get("general.alignment", 32))
    start = (pos + align - 1) // align * align
    file = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = {}
    for name, dims, ttype, offset in infos:
        qtype = gguf.GGMLQuantizationType(ttype)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        shape = tuple(int(d) for d in reversed(dims))
        row_bytes = shape[-1] // block * type_size
        nbytes = int(np.prod(shape[:-1], dtype=np.int64)) * row_bytes
        raw = np.asarray(file[start + offset : start + offset + nbytes])  # plain ndarray view, no memmap overhead
        tensors[name] = GGUFTensor(name, qtype, shape, raw.reshape(*shape[:-1], row_bytes))
    return meta, tensors


class GGUFCheckpoint:
    """Metadata and tensors of one GGUF file."""

    def __init__(self, path: str):
        self.path = path
        self.metadata, self.tensors = read_gguf(path)

    def config(self) -> ModelConfig:
        freq = self.get("rope_freqs.weight") if "rope_freqs.weight" in self.tensors else None
        return get_gguf_model_class(self.metadata.get("general.architecture")).config_from_gguf(
            self.metadata,
            tie_word_embeddings="output.weight" not in self.tensors,
            freq_factors=None if freq is None else tuple(freq.tolist()),
        )

    def get(self, name: str) -> np.ndarray:
        """One tensor dequantized to float32 in numpy's (PyTorch's) [out, in] order."""
        t = self.tensors[name]
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(t.shape)

    def fetch_for(self, cfg: ModelConfig):
        """A `fetch(name, layer)` in the model's layout (see jengine.loader.weights), by the family's name map."""
        family = get_model_class(cfg.architecture)
        names = family.gguf_names(cfg)

        def fetch(name: str, layer: int | None) -> np.ndarray:
            template, transpose = names[name]
            w = family.from_gguf_tensor(name, self.get(template.format(i=layer)), cfg, self.metadata)
            return w.T if transpose else w

        return fetch
