"""Reads llama.cpp GGUF files: metadata -> ModelConfig, tensors dequantized to float32 numpy.

The header (key/values and tensor table) is parsed here with `struct` rather than `gguf.GGUFReader`:
the reader builds numpy views for every element of the ~100k-entry tokenizer arrays, which takes
4-15 s for SmolLM2 on a 2-core machine, against ~0.1 s here. Tensor data stays a memory map, and
`gguf.quants.dequantize` (the `gguf` package) does the dequantization.

llama.cpp's converter permutes the rows of Q and K (and their biases) for the `llama` architecture so
that its interleaved RoPE works; we undo it to get back the HF "rotate half" layout the model uses.
"""
from __future__ import annotations

import dataclasses
import mmap
import struct
from typing import Any

import gguf
import numpy as np

from jengine.models.config import ModelConfig

# our layer parameter -> (GGUF name under `blk.{i}.`, stored [out, in] so needs a transpose)
GGUF_LAYER_NAMES = {
    "attn_norm": ("attn_norm.weight", False),
    "wq": ("attn_q.weight", True),
    "wk": ("attn_k.weight", True),
    "wv": ("attn_v.weight", True),
    "wo": ("attn_output.weight", True),
    "bq": ("attn_q.bias", False),
    "bk": ("attn_k.bias", False),
    "bv": ("attn_v.bias", False),
    "bo": ("attn_output.bias", False),
    "q_norm": ("attn_q_norm.weight", False),
    "k_norm": ("attn_k_norm.weight", False),
    "mlp_norm": ("ffn_norm.weight", False),
    "w_gate": ("ffn_gate.weight", True),
    "w_up": ("ffn_up.weight", True),
    "w_down": ("ffn_down.weight", True),
}
GGUF_GLOBAL_NAMES = {"embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight"}


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's per-head row interleave of Q/K weights (rows = heads * head_dim)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


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
        return ModelConfig.from_gguf_metadata(
            self.metadata,
            tie_word_embeddings="output.weight" not in self.tensors,
            freq_factors=None if freq is None else tuple(freq.tolist()),
        )

    def get(self, name: str) -> np.ndarray:
        """One tensor dequantized to float32 in numpy's (PyTorch's) [out, in] order."""
        t = self.tensors[name]
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(t.shape)

    def fetch_for(self, cfg: ModelConfig):
        """A `fetch(name, layer)` in the model's layout (see jengine.loader.weights)."""
        permute = self.metadata.get("general.architecture") == "llama"

        def fetch(name: str, layer: int | None) -> np.ndarray:
            if layer is None:
                return self.get(GGUF_GLOBAL_NAMES[name])
            short = name.removeprefix("layers.")
            gname, transpose = GGUF_LAYER_NAMES[short]
            w = self.get(f"blk.{layer}.{gname}")
            if permute and short in ("wq", "bq"):
                w = unpermute_rows(w, cfg.num_heads)
            elif permute and short in ("wk", "bk"):
                w = unpermute_rows(w, cfg.num_kv_heads)
            return w.T if transpose else w

        return fetch
