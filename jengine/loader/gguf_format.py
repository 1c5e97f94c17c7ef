"""Reads llama.cpp GGUF files: metadata -> ModelConfig, tensors dequantized to float32 numpy.

llama.cpp's converter permutes the rows of Q and K (and their biases) for the `llama` architecture so
that its interleaved RoPE works; we undo it to get back the HF "rotate half" layout the model uses.
"""
from __future__ import annotations

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
_BIG_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's per-head row interleave of Q/K weights (rows = heads * head_dim)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFCheckpoint:
    """Metadata and tensors of one GGUF file (memory-mapped by `gguf.GGUFReader`)."""

    def __init__(self, path: str):
        self.path = path
        self.reader = gguf.GGUFReader(path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.metadata: dict[str, Any] = {}
        for key, field in self.reader.fields.items():
            if key in _BIG_ARRAYS:
                continue
            self.metadata[key] = field.contents()
        if "tokenizer.ggml.tokens" in self.reader.fields:
            self.metadata["tokenizer.ggml.tokens"] = range(len(self.reader.fields["tokenizer.ggml.tokens"].data))

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
        # a plain ndarray view: dequantizing a np.memmap pays subclass overhead on every row slice
        return np.asarray(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type), dtype=np.float32)

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
