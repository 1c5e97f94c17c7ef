"""Pre-quantized HF checkpoints: AWQ and GPTQ int4 (packed int32), compressed-tensors W8A16 / FP8.

Each reader turns one layer's checkpoint tensors into the device layout of `weights.py` on the host:

    AWQ (GEMM)   qweight int32 [in, out/8]   (nibble i of a word holds column 8c + AWQ_ORDER[i])
                 qzeros  int32 [in/g, out/8]  scales [in/g, out]          w = (q - z) * s
    GPTQ (v1)    qweight int32 [in/8, out]   (nibble i holds input row 8r + i)
                 qzeros  int32 [in/g, out/8] (stored as zero - 1)  scales [in/g, out]  g_idx [in]
    compressed-tensors  weight int8 / float8_e4m3fn [out, in], weight_scale [out, 1] (channel) or [1] (tensor)

4-bit values are repacked two per byte (`PackedInt4Weight`), with offset = -zero * scale; 8-bit ones
become a `ChannelWeight`. Only what these formats' common checkpoints use is read: 4 bits, groups
that divide the input features, GPTQ without act-order (`desc_act` false), symmetric 8-bit
compressed-tensors with channel or tensor scales; anything else is an error naming the field.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from jengine.models.base import NameMap
from jengine.models.layers import Weight
from jengine.quantization.weights import ChannelWeight, PackedInt4Weight

logger = logging.getLogger(__name__)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's GEMM packing: nibble i of a word holds column AWQ_ORDER[i]


def unpack_int32(words: np.ndarray, axis: int, order: tuple[int, ...] = tuple(range(8))) -> np.ndarray:
    """int32 words holding eight 4-bit values each -> uint8 values, the packed axis 8x longer."""
    words = np.asarray(words).view(np.uint32)
    nib = np.stack([(words >> (4 * i)) & 0xF for i in range(8)], axis=-1).astype(np.uint8)  # [..., 8] by nibble
    vals = np.empty_like(nib)
    vals[..., list(order)] = nib
    vals = np.moveaxis(vals, -1, axis + 1 if axis >= 0 else axis)
    shape = list(words.shape)
    shape[axis] *= 8
    return vals.reshape(shape)


def pack_groups(q: np.ndarray, group: int) -> np.ndarray:
    """uint8 values [in, out] (0..15) -> [in/group, group/2, out]: value k of a group in the low nibble, k + group/2 in the high one."""
    g = q.reshape(q.shape[0] // group, group, q.shape[1])
    half = group // 2
    return (g[:, :half] | (g[:, half:] << 4)).astype(np.uint8)


def int4_weight(q: np.ndarray, zeros: np.ndarray, scales: np.ndarray, group: int, dtype: Any) -> PackedInt4Weight:
    """Unpacked values q [in, out], zeros and scales [in/group, out] -> a `PackedInt4Weight` in `dtype`."""
    s = scales.astype(np.float32)
    return PackedInt4Weight(packed=pack_groups(q, group), scale=s.astype(dtype), offset=(-zeros.astype(np.float32) * s).astype(dtype))


def check_int4_config(method: str, qc: Mapping[str, Any], in_features: Mapping[str, int]) -> int:
    """Validates an AWQ / GPTQ `quantization_config`; returns the group size (-1 means one group)."""
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        raise NotImplementedError(f"{method} quantization_config.bits={bits!r} is not supported (supported: 4)")
    group = int(qc.get("group_size", qc.get("q_group_size", 128)))
    if method == "gptq":
        if qc.get("desc_act"):
            raise NotImplementedError("gptq quantization_config.desc_act=true (act-order) is not supported; re-quantize with desc_act false")
        fmt = qc.get("checkpoint_format", "gptq")
        if fmt != "gptq":
            raise NotImplementedError(f"gptq quantization_config.checkpoint_format={fmt!r} is not supported (supported: 'gptq')")
    else:
        if qc.get("zero_point", True) is not True:
            raise NotImplementedError("awq quantization_config.zero_point=false is not supported")
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise NotImplementedError(f"awq quantization_config.version={version!r} is not supported (supported: 'gemm')")
    for name, n in in_features.items():
        g = n if group == -1 else group
        if g <= 0 or g % 2 or n % g:
            raise ValueError(f"{method} quantization_config.group_size={group} does not divide the {n} input features of {name}")
    return group


class Int4Source:
    """Per-layer `PackedInt4Weight`s of an AWQ or GPTQ checkpoint's projections."""

    def __init__(self, method: str, ckpt: Any, templates: NameMap, names: tuple[str, ...],
                 shapes: Mapping[str, tuple[int, ...]], qc: Mapping[str, Any], dtype: Any):
        self.method, self._ckpt, self._dtype = method, ckpt, dtype
        self._names = frozenset(names)
        self._prefix = {n: templates[n][0].removesuffix(".weight") for n in names}
        self._group = check_int4_config(method, qc, {n: shapes[n][1] for n in names})

    def handles(self, name: str) -> bool:
        return name in self._names

    def fetch(self, name: str, layer: int) -> Weight:
        prefix = self._prefix[name].format(i=layer)

        def get(suffix: str) -> np.ndarray:
            return np.asarray(self._ckpt.get(f"{prefix}.{suffix}"))

        scales = get("scales")
        if self.method == "awq":
            q = unpack_int32(get("qweight"), axis=-1, order=AWQ_ORDER)
            zeros = unpack_int32(get("qzeros"), axis=-1, order=AWQ_ORDER)
        else:
            q = unpack_int32(get("qweight"), axis=0)
            zeros = unpack_int32(get("qzeros"), axis=-1).astype(np.int16) + 1  # GPTQ v1 stores zero - 1
            if f"{prefix}.g_idx" in self._ckpt:
                g_idx = get("g_idx")
                trivial = np.arange(q.shape[0]) // (q.shape[0] // scales.shape[0])
                if not np.array_equal(g_idx, trivial):
                    raise NotImplementedError(f"{prefix}.g_idx is not in input order (act-order); only desc_act=false checkpoints are supported")
        group = q.shape[0] // scales.shape[0]
        if self._group not in (-1, group):
            raise ValueError(f"{prefix}.scales has {scales.shape[0]} groups, but quantization_config.group_size is {self._group}")
        return int4_weight(q, zeros, scales, group, self._dtype)


def check_compressed_tensors_config(qc: Mapping[str, Any]) -> None:
    """Validates a compressed-tensors `quantization_config` (symmetric 8-bit weights, channel or tensor scales)."""
    fmt = qc.get("format")
    if fmt not in ("int-quantized", "float-quantized", "naive-quantized"):
        raise NotImplementedError(f"compressed-tensors quantization_config.format={fmt!r} is not supported "
                                  "(supported: int-quantized, float-quantized, naive-quantized)")
    for gname, group in (qc.get("config_groups") or {}).items():
        w = group.get("weights") or {}
        where = f"compressed-tensors quantization_config.config_groups.{gname}.weights"
        if w.get("num_bits") != 8:
            raise NotImplementedError(f"{where}.num_bits={w.get('num_bits')!r} is not supported (supported: 8)")
        if w.get("type") not in ("int", "float"):
            raise NotImplementedError(f"{where}.type={w.get('type')!r} is not supported (supported: int, float)")
        if w.get("strategy") not in ("channel", "tensor"):
            raise NotImplementedError(f"{where}.strategy={w.get('strategy')!r} is not supported (supported: channel, tensor)")
        if w.get("symmetric") is False:
            raise NotImplementedError(f"{where}.symmetric=false is not supported")
        if group.get("input_activations"):
            logger.warning("compressed-tensors %s quantizes activations too; jengine serves it weight-only (activations stay in float)", gname)


class CompressedTensorsSource:
    """Per-layer `ChannelWeight`s of a compressed-tensors W8A16 / FP8 checkpoint's projections."""

    method = "compressed-tensors"

    def __init__(self, ckpt: Any, templates: NameMap, names: tuple[str, ...], qc: Mapping[str, Any], dtype: Any):
        check_compressed_tensors_config(qc)
        self._ckpt, self._dtype = ckpt, dtype
        # A projection the recipe ignored is stored in float without a scale: it loads as a plain matrix.
        self._names = frozenset(n for n in names if templates[n][0].format(i=0) + "_scale" in ckpt)
        self._templates = templates

    def handles(self, name: str) -> bool:
        return name in self._names

    def fetch(self, name: str, layer: int) -> Weight:
        key = self._templates[name][0].format(i=layer)
        w, scale = np.asarray(self._ckpt.get(key)), np.asarray(self._ckpt.get(key + "_scale"), np.float32)
        if w.dtype not in (np.int8, ml_dtypes.float8_e4m3fn):
            raise ValueError(f"{key} is {w.dtype}; compressed-tensors 8-bit weights must be int8 or float8_e4m3fn")
        out = w.shape[0]
        if scale.size not in (1, out):
            raise ValueError(f"{key}_scale has shape {np.shape(self._ckpt.get(key + '_scale'))}; expected [{out}, 1] or [1]")
        scale = np.broadcast_to(scale.reshape(-1), (out,))
        return ChannelWeight(q=np.ascontiguousarray(w.T), scale=scale.astype(self._dtype))

