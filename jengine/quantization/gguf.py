"""GGUF tensors kept quantized: Q8_0, Q4_0, Q4_1 and Q4_K blocks -> the layouts of `weights.py`.

llama.cpp stores a matrix as rows of output features, each a run of blocks along the input features.
One layer's raw blocks are regrouped on the host (no dequantization) into:

    Q8_0  34 B / 32 values: d f16, 32 x int8               -> GroupedWeight    w = q * d
    Q4_0  18 B / 32 values: d f16, 16 B of nibbles          -> PackedInt4Weight w = q * d - 8 d
    Q4_1  20 B / 32 values: d, m f16, 16 B of nibbles        -> PackedInt4Weight w = q * d + m
    Q4_K 144 B / 256 values: d, dmin f16, 12 B of 6-bit scales and mins for 8 sub-blocks of 32,
          128 B of nibbles (32-byte runs: low nibbles one sub-block, high nibbles the next)
                                                             -> PackedInt4Weight w = q * (d sc) - dmin m

Q4_0/Q4_1 keep llama.cpp's nibble order (value k low, k + 16 high), the layout `PackedInt4Weight`
uses; Q4_K's sub-blocks are repacked into it. Scales and offsets are computed in float32 as
`gguf.quants.dequantize` does, then stored in the model's dtype (exact in float32).
"""
from __future__ import annotations

from typing import Any, Mapping

import gguf
import numpy as np

from jengine.models import get_model_class
from jengine.models.base import Source
from jengine.models.config import ModelConfig
from jengine.models.layers import Weight
from jengine.quantization.weights import GroupedWeight, PackedInt4Weight

Q = gguf.GGMLQuantizationType
KEPT_TYPES = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K)


def block_f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 field at byte `start` of every block (blocks [..., bytes]), as float32 [...]."""
    return np.ascontiguousarray(blocks[..., start : start + 2]).view(np.float16)[..., 0].astype(np.float32)


def k4_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins packed in Q4_K's 12 bytes [..., 12] -> two [..., 8] uint8 arrays."""
    s = s.astype(np.uint8)
    lo_sc, lo_m, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([lo_sc & 0x3F, (hi & 0x0F) | ((lo_sc >> 6) << 4)], axis=-1)
    mn = np.concatenate([lo_m & 0x3F, (hi >> 4) | ((lo_m >> 6) << 4)], axis=-1)
    return sc, mn


def gguf_weight(raw: np.ndarray, qtype: Any, dtype: Any) -> Weight:
    """Raw blocks [out, row_bytes] of one matrix stored [out, in] -> its `Weight` over [in, out]."""
    out = raw.shape[0]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    b = raw.reshape(out, -1, size)  # [out, blocks, bytes]
    if qtype == Q.Q8_0:
        q = np.ascontiguousarray(b[..., 2:]).view(np.int8)  # [out, G, 32]
        return GroupedWeight(q=np.ascontiguousarray(q.transpose(1, 2, 0)), scale=block_f16(b, 0).T.astype(dtype))
    if qtype in (Q.Q4_0, Q.Q4_1):
        d = block_f16(b, 0)
        offset = -8.0 * d if qtype == Q.Q4_0 else block_f16(b, 2)
        packed = b[..., 2:] if qtype == Q.Q4_0 else b[..., 4:]
        return PackedInt4Weight(packed=np.ascontiguousarray(packed.transpose(1, 2, 0)), scale=d.T.astype(dtype), offset=offset.T.astype(dtype))
    if qtype == Q.Q4_K:
        d, dmin = block_f16(b, 0), block_f16(b, 2)
        sc, mn = k4_scales_mins(b[..., 4:16])
        scale = (d[..., None] * sc.astype(np.float32)).reshape(out, -1)  # [out, blocks * 8]
        offset = -(dmin[..., None] * mn.astype(np.float32)).reshape(out, -1)
        qs = b[..., 16:].reshape(out, -1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)
        vals = (qs & 0x0F).reshape(out, -1, 32)  # [out, sub-blocks, 32] in value order
        packed = vals[..., :16] | (vals[..., 16:] << 4)
        return PackedInt4Weight(packed=np.ascontiguousarray(packed.transpose(1, 2, 0)), scale=scale.T.astype(dtype), offset=offset.T.astype(dtype))
    raise NotImplementedError(f"GGUF type {qtype.name} is not kept quantized (kept: {', '.join(t.name for t in KEPT_TYPES)})")


class GGUFSource:
    """The projections of a GGUF file whose layers all share one kept type, served from their blocks.

    A projection stored in another type (F16, Q6_K, ...) or in different types across layers (Q4_K_M
    files mix Q4_K and Q6_K) is dequantized to the model's dtype as without quantization."""

    method = "gguf"

    def __init__(self, ckpt: Any, config: ModelConfig, names: tuple[str, ...], dtype: Any):
        self._ckpt, self._config, self._dtype = ckpt, config, dtype
        self._family = get_model_class(config.architecture)
        self._sources = {k: Source(*v) for k, v in self._family.gguf_names(config).items()}
        self._names = frozenset(n for n in names if self._kept(n))

    def _kept(self, name: str) -> bool:
        src = self._sources[name]
        types = {self._ckpt.tensors[src.template.format(i=i)].tensor_type for i in range(self._config.num_layers)}
        return src.transpose and len(types) == 1 and types.pop() in KEPT_TYPES

    def handles(self, name: str) -> bool:
        return name in self._names

    def fetch(self, name: str, layer: int) -> Weight:
        src = self._sources[name]
        t = self._ckpt.tensors[src.template.format(i=layer)]
        # Blocks run along the input features, so a fused tensor's rows (output features) slice whole
        # blocks, and layout fixes permute whole rows of raw blocks alike.
        raw = t.data if src.rows is None else t.data[src.rows[0] : src.rows[1]]
        raw = self._family.from_gguf_tensor(name, raw, self._config, self._ckpt.metadata)
        return gguf_weight(np.asarray(raw), t.tensor_type, self._dtype)


def kept_summary(source: GGUFSource) -> Mapping[str, str]:
    """Parameter -> kept GGUF type name (for logs and benchmarks)."""
    return {n: source._ckpt.tensors[source._sources[n].template.format(i=0)].tensor_type.name for n in sorted(source._names)}
