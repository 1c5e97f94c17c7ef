"""On-load fp8: float8 e4m3 (`e4m3fn`, max 448) weights with one scale per output channel.

The step upcasts the fp8 values to the activation dtype for the matmul (every fp8 value is exact in
bfloat16 and float32), which is what a platform without an fp8 matmul (the CPU) must do; the bytes
read per step are still one per weight.
"""
from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from jengine.quantization.int8 import channel_scales
from jengine.quantization.weights import ChannelWeight

FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448


def quantize_fp8(w: np.ndarray, scale_dtype: Any = np.float32) -> ChannelWeight:
    """One layer's float [in, out] matrix -> float8_e4m3fn values and per-output-channel scales."""
    w = np.asarray(w, np.float32)
    scale = channel_scales(w, FP8_MAX, scale_dtype)
    # e4m3fn has no infinity: a value rounding past 448 would become NaN, so clip first.
    q = np.clip(w / scale.astype(np.float32), -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
    return ChannelWeight(q=q, scale=scale)
