"""Reads llama.cpp GGUF files: metadata -> ModelConfig, tensors dequantized to float32 numpy.

The header (key/values and tensor table) is parsed here with `struct` rather than `gguf.GGUFReader`:
the reader builds numpy views for every element of the ~100k-entry tokenizer arrays, which takes
4-15 s for SmolLM2 on a 2-core machine, against ~0.1 s here. Tensor data stays a memory map, and
`gguf.quants.dequantize` (the `gguf` package) does the dequantization.

Tensor names and any layout fixes (llama.cpp permutes the Q/K rows of `llama` files for its
interleaved RoPE) belong to the model family (`gguf_names`, `from_gguf_tensor` in `jengine.models`).

One file-format fix lives here: llama.cpp first wrote Mixtral's experts one tensor per expert,
`blk.{i}.ffn_{gate,up,down}.{e}.weight`, where newer files stack a layer's experts in one
`blk.{i}.ffn_{gate,up,down}_exps.weight` [E, out, in]. Which form a file has shows in its tensor
names; an old file's per-expert tensors answer for the stacked name (stacked at read time, as
llama.cpp's own loader merged them), so the families see one layout.
"""
from __future__ import annotations

import dataclasses
import mmap
import re
import struct
from typing import Any

import gguf
import numpy as np

from jengine.models import get_gguf_model_class, get_model_class
from jengine.models.base import Source
from jengine.models.config import ModelConfig
from jengine.quantization.gguf import block_f16

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
        nonlocal pos
        if vtype == 8:
            return read_str()
        if vtype != 9:
            return read(_SCALARS[vtype])
        itype, count = read("<I"), read("<Q")
        if itype in _SCALARS:  # a vocabulary's scores or token types: one numpy read, not 50k unpacks
            values = np.frombuffer(buf, dtype=np.dtype(_SCALARS[itype]), count=count, offset=pos)
            pos += values.nbytes
            return values.tolist()
        if itype == 8:  # the vocabulary and merges: the string reader inlined (tens of thousands)
            out = []
            for _ in range(count):
                n = int.from_bytes(buf[pos : pos + 8], "little")
                out.append(buf[pos + 8 : pos + 8 + n].decode("utf-8", errors="replace"))
                pos += 8 + n
            return out
        return [read_value(itype) for _ in range(count)]

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


# llama.cpp's first MoE files: one tensor per expert (`LLM_TENSOR_FFN_*_EXP` "blk.%d.ffn_gate.%d")
_PER_EXPERT = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight")


def per_expert_tensors(path: str, tensors: dict[str, GGUFTensor]) -> dict[str, tuple[str, ...]]:
    """Stacked expert name (`blk.{i}.ffn_gate_exps.weight`) -> the per-expert tensors that make it, in
    expert order, for a file written one tensor per expert; {} for a file with stacked experts.

    Raises ValueError naming the tensors when a layer's experts are not numbered 0..E-1 or differ in
    shape or type (they could not be stacked)."""
    groups: dict[str, dict[int, str]] = {}
    for name in tensors:
        m = _PER_EXPERT.fullmatch(name)
        if m:
            groups.setdefault(f"blk.{m[1]}.ffn_{m[2]}_exps.weight", {})[int(m[3])] = name
    out = {}
    for stacked, parts in groups.items():
        if stacked in tensors:
            raise ValueError(f"GGUF file {path} has both {stacked!r} and per-expert tensors such as {parts[min(parts)]!r}")
        if sorted(parts) != list(range(len(parts))):
            missing = sorted(set(range(max(parts) + 1)) - set(parts))
            raise ValueError(f"GGUF file {path}: per-expert tensors for {stacked!r} lack expert(s) {missing}")
        names = tuple(parts[e] for e in range(len(parts)))
        kinds = {(tensors[n].shape, tensors[n].tensor_type) for n in names}
        if len(kinds) > 1:
            raise ValueError(f"GGUF file {path}: the per-expert tensors {names[0]!r}.. differ in shape or type "
                             f"({', '.join(f'{s} {t.name}' for s, t in sorted(kinds, key=str))})")
        out[stacked] = names
    return out


class GGUFCheckpoint:
    """Metadata and tensors of one GGUF file (an old file's per-expert tensors read as stacked ones)."""

    def __init__(self, path: str):
        self.path = path
        self.metadata, self.tensors = read_gguf(path)
        self.expert_parts = per_expert_tensors(path, self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape in numpy order (a stacked one made of per-expert tensors: [E, *part])."""
        parts = self.expert_parts.get(name)
        return (len(parts), *self.tensors[parts[0]].shape) if parts else self.tensors[name].shape

    def config(self) -> ModelConfig:
        freq = self.get("rope_freqs.weight") if "rope_freqs.weight" in self.tensors else None
        # Phi-3's LongRoPE factors are tensors too; only families that read them are given them.
        longrope = {k: tuple(self.get(f"rope_factors_{k}.weight").tolist()) for k in ("short", "long")
                    if f"rope_factors_{k}.weight" in self.tensors}
        return get_gguf_model_class(self.metadata.get("general.architecture"), self.metadata).config_from_gguf(
            self.metadata,
            tie_word_embeddings="output.weight" not in self.tensors,
            freq_factors=None if freq is None else tuple(freq.tolist()),
            **({"rope_factors": longrope} if longrope else {}),
        )

    def get(self, name: str) -> np.ndarray:
        """One tensor dequantized to float32 in numpy's (PyTorch's) [out, in] order."""
        if name in self.expert_parts:
            return np.stack([self.get(part) for part in self.expert_parts[name]])
        t = self.tensors.get(name)
        if t is None:
            arch = self.metadata.get("general.architecture")
            raise KeyError(f"GGUF file {self.path} ({arch}) has no tensor {name!r}")
        fast = _DEQUANTIZE.get(t.tensor_type)
        if fast is not None:
            return fast(t.data.reshape(-1, gguf.GGML_QUANT_SIZES[t.tensor_type][1])).reshape(t.shape)
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(t.shape)

    def fetch_for(self, cfg: ModelConfig):
        """A `fetch(name, layer)` in the model's layout (see jengine.loader.weights), by the family's name map."""
        family = get_model_class(cfg.architecture)
        family.check_gguf_tensors(cfg, self.tensors.keys() | self.expert_parts.keys())
        names, shapes = family.gguf_names(cfg), family.param_shapes(cfg)

        def fetch(name: str, layer: int | None) -> np.ndarray:
            src = Source(*names[name])
            w = family.from_gguf_tensor(name, src._replace(transpose=False).read(self.get, layer), cfg, self.metadata)
            # a stacked-expert tensor [E, out, in] transposes per expert: swap the last two axes
            w = np.swapaxes(w, -1, -2) if src.transpose and w.ndim >= 2 else w
            expected = shapes[name][1:] if layer is not None else shapes[name]
            if tuple(w.shape) != tuple(expected):
                tensor = src.template.format(i=layer if src.layers is None or layer is None else src.layers[layer])
                stored = self.shape(tensor)
                raise ValueError(f"GGUF tensor {tensor!r} of shape {stored} does not fit {name}: {cfg.architecture} "
                                 f"expects {tuple(expected)} (in [in, out] order), the tensor gives {tuple(w.shape)}")
            return w

        return fetch


# Whole-tensor dequantization of the commonest llama.cpp block types. `gguf.quants.dequantize` does the
# same arithmetic a few rows at a time (bounded memory, Python overhead per group); one pass over the
# tensor loads the default model's weights several times faster. Same float32 operations, same bits.
def _halves(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte `start` of every block, as float32 [n_blocks, 1] (to scale each block's row)."""
    return block_f16(blocks, start)[:, None]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 16] packed bytes -> [n, 32] values 0..15: low nibbles are elements 0-15, high ones 16-31."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1)


def _q8_0(blocks: np.ndarray) -> np.ndarray:  # 2-byte scale d, 32 int8: d * q
    return blocks[:, 2:].view(np.int8).astype(np.float32) * _halves(blocks, 0)


def _q4_0(blocks: np.ndarray) -> np.ndarray:  # 2-byte scale d, 16 packed bytes: d * (q - 8)
    return _halves(blocks, 0) * (_nibbles(blocks[:, 2:]).astype(np.int8) - np.int8(8)).astype(np.float32)


def _q4_1(blocks: np.ndarray) -> np.ndarray:  # 2-byte scale d and minimum m, 16 packed bytes: d * q + m
    return _halves(blocks, 0) * _nibbles(blocks[:, 4:]).astype(np.float32) + _halves(blocks, 2)


_DEQUANTIZE = {
    gguf.GGMLQuantizationType.Q8_0: _q8_0,
    gguf.GGMLQuantizationType.Q4_0: _q4_0,
    gguf.GGMLQuantizationType.Q4_1: _q4_1,
}
