"""On-load int8: weight-only, symmetric, one scale per output channel (scale = max|w| / 127)."""
from __future__ import annotations

from typing import Any

import numpy as np

from jengine.quantization.weights import ChannelWeight


def channel_scales(w: np.ndarray, qmax: float, dtype: Any) -> np.ndarray:
    """max|w| / qmax per output channel (w is [in, out]), rounded to the storage dtype; 1 for an all-zero channel.

    Rounding the scale first and quantizing with the rounded value keeps q * scale the closest
    representable product in the dtype the step computes in."""
    amax = np.max(np.abs(w), axis=0)
    scale = (amax / qmax).astype(dtype)
    return np.where(scale == 0, np.asarray(1, dtype), scale).astype(dtype)


def quantize_int8(w: np.ndarray, scale_dtype: Any = np.float32) -> ChannelWeight:
    """One layer's float [in, out] matrix -> int8 values and per-output-channel scales (numpy leaves)."""
    w = np.asarray(w, np.float32)
    scale = channel_scales(w, 127.0, scale_dtype)
    q = np.clip(np.rint(w / scale.astype(np.float32)), -127, 127).astype(np.int8)
    return ChannelWeight(q=q, scale=scale)
