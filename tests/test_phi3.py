"""Phi-3 / Phi-4-mini against HF transformers in float32: fused projections split at load, partial
rotary, LongRoPE with its short/long switch (per sequence, as HF decides it per forward call)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from jengine.loader import load_model, read_hf_config
from jengine.models import ModelConfig
from test_models import PROMPT, TINY_CONFIG, check_parity, hf_greedy, hf_logits, hf_model
from tiny_models import PagedRunner, make_tiny_checkpoint, to_transformers4_config

ORIG = 12  # original_max_position_embeddings of the LongRoPE checkpoints: PROMPT (11) + 2 tokens crosses it
LONGROPE = dict(
    rope_type="longrope", original_max_position_embeddings=ORIG,
    short_factor=[1.0 + 0.3 * i for i in range(6)], long_factor=[3.0 + 2.0 * i for i in range(6)],
)


def longrope_checkpoint(tmp_path) -> str:
    return make_tiny_checkpoint(tmp_path, "phi3", rope_parameters=LONGROPE, max_position_embeddings=64,
                                original_max_position_embeddings=ORIG)


def hf_incremental(hf, prompt: list[int], tokens: list[int]) -> list[np.ndarray]:
    """HF logits of the prompt, then of each token fed one at a time through HF's cache."""
    with torch.no_grad():
        out = hf(torch.tensor([prompt]), use_cache=True)
        logits, cache = [out.logits[0].numpy()], out.past_key_values
        for tok in tokens:
            out = hf(torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
            logits.append(out.logits[0].numpy())
            cache = out.past_key_values
    return logits


def test_phi3_parity_partial_rotary(tmp_path):
    path = make_tiny_checkpoint(tmp_path, "phi3")
    cfg = read_hf_config(path)
    assert cfg.rotary_dim == 12 and cfg.head_dim == 16 and cfg.longrope is None
    check_parity(path)


def test_longrope_switches_to_long_factors_as_hf_forward_does(tmp_path):
    """Prefill under the original context (short factors), decode past it (long factors from the step
    whose sequence length exceeds it, earlier keys kept): per-step logits and greedy tokens equal HF's
    forward with its cache. (HF `generate` differs here on purpose: Phi-3's `prepare_inputs_for_generation`
    drops the cache at the switch and re-runs the whole sequence with the long factors.)"""
    path = longrope_checkpoint(tmp_path)
    cfg = read_hf_config(path)
    assert cfg.longrope.original_max_position_embeddings == ORIG
    assert cfg.longrope.attention_factor == pytest.approx(np.sqrt(1 + np.log(64 / ORIG) / np.log(ORIG)))
    hf = hf_model(path)
    runner = PagedRunner(load_model(path).model)
    (ours,) = runner.step([(0, PROMPT)])
    tokens, outs = [], [ours]
    for _ in range(4):  # sequence lengths 12 (short), 13, 14, 15 (long)
        tokens.append(int(outs[-1][-1].argmax()))
        outs.append(runner.step([(0, [tokens[-1]])])[0])
    ref = hf_incremental(hf, PROMPT, tokens)
    for mine, theirs in zip(outs, ref):
        np.testing.assert_allclose(mine, theirs, atol=1e-4, rtol=1e-4)
    assert tokens == [int(r[-1].argmax()) for r in ref[:-1]]
    assert tokens[:2] == hf_greedy(hf, PROMPT, 2)  # before the switch, generate agrees too
    # the switch changes the logits: with the short factors throughout, the long-context steps differ
    hf.model.rotary_emb.long_inv_freq = hf.model.rotary_emb.original_inv_freq.clone()
    assert not np.allclose(hf_incremental(hf, PROMPT, tokens)[-1], ref[-1], atol=1e-3)


def test_longrope_long_prompt_and_mixed_batch(tmp_path):
    """A prompt past the original context uses the long factors for all its tokens (HF's prefill);
    in one step beside a short sequence, each row keeps its own choice."""
    path = longrope_checkpoint(tmp_path)
    long_prompt = PROMPT + [33, 44, 55]  # 14 > ORIG
    check_parity(path, prompt=long_prompt, decode_steps=2)
    hf = hf_model(path)
    runner = PagedRunner(load_model(path).model, max_tokens=24)
    short, long = runner.step([(0, PROMPT[:6]), (1, long_prompt)])
    np.testing.assert_allclose(short, hf_logits(hf, PROMPT[:6]), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(long, hf_logits(hf, long_prompt), atol=1e-4, rtol=1e-4)


def test_phi3_config_spellings_and_errors(tmp_path):
    path = longrope_checkpoint(tmp_path)
    new = read_hf_config(path)
    to_transformers4_config(path)
    assert read_hf_config(path) == new
    base = {**TINY_CONFIG, "architectures": ["Phi3ForCausalLM"], "partial_rotary_factor": 0.75}
    old = ModelConfig.from_hf_config({**base, "rope_scaling": {**LONGROPE, "type": "su", "rope_type": None}})
    assert old.longrope is not None
    with pytest.raises(NotImplementedError, match="'dynamic' is not supported"):
        ModelConfig.from_hf_config({**base, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    with pytest.raises(NotImplementedError, match="short_factor"):
        ModelConfig.from_hf_config({**base, "rope_scaling": {**LONGROPE, "short_factor": [1.0, 2.0]}})
    with pytest.raises(NotImplementedError, match="hidden_act='gelu'"):
        ModelConfig.from_hf_config({**base, "hidden_act": "gelu"})


@pytest.mark.parametrize("quant", ["F32", "Q8_0"])
def test_phi3_gguf_matches_transformers_gguf_loading(tmp_path, quant):
    """A tiny `phi3` GGUF written as llama.cpp's converter does (fused `attn_qkv`, gate and up fused in
    `ffn_up`, no key length): our split by rows against transformers' own GGUF loader, greedy tokens
    and logits. Full rotary here: transformers' GGUF mapping drops `rope.dimension_count`."""
    import os

    from test_gguf import hf_from_gguf
    from tiny_models import make_tiny_gguf

    path = make_tiny_gguf(tmp_path, "phi3", quant=quant, partial_rotary_factor=1.0)
    loaded = load_model(path, dtype="float32")
    assert loaded.config.architecture == "Phi3ForCausalLM" and loaded.config.rotary_dim == loaded.config.head_dim == 16
    hf = hf_from_gguf(path)
    runner = PagedRunner(loaded.model)
    (ours,) = runner.step([(0, PROMPT)])
    np.testing.assert_allclose(ours, hf_logits(hf, PROMPT), atol=1e-4, rtol=1e-4)
    tokens = [int(ours[-1].argmax())]
    for _ in range(3):
        (ours,) = runner.step([(0, [tokens[-1]])])
        tokens.append(int(ours[-1].argmax()))
    assert tokens == hf_greedy(hf, PROMPT, 4)
    if quant == "F32":  # lossless: the same model as the checkpoint the file was written from
        (st,) = PagedRunner(load_model(os.path.join(tmp_path, "tiny-phi3-0"), dtype="float32").model).step([(0, PROMPT)])
        (again,) = PagedRunner(loaded.model).step([(0, PROMPT)])
        np.testing.assert_allclose(again, st, atol=1e-5, rtol=1e-5)


def test_phi3_gguf_partial_rotary_and_longrope_metadata(tmp_path):
    """`rope.dimension_count` (the rotary part), the `rope_factors_*` tensors and the original context
    length give the same config, and the same logits past the original context, as the HF checkpoint."""
    from tiny_models import make_tiny_gguf

    path = make_tiny_gguf(tmp_path, "phi3", rope_parameters=LONGROPE, max_position_embeddings=64, original_max_position_embeddings=ORIG)
    ours = load_model(path, dtype="float32")
    ref = load_model(str(tmp_path / "tiny-phi3-0"), dtype="float32")
    keep = ("rotary_dim", "head_dim", "rope_theta", "max_position_embeddings", "num_kv_heads", "intermediate_size")
    assert {k: getattr(ours.config, k) for k in keep} == {k: getattr(ref.config, k) for k in keep}
    lr, ref_lr = ours.config.longrope, ref.config.longrope
    assert ours.config.rotary_dim == 12 and lr.original_max_position_embeddings == ORIG
    assert lr.attention_factor == pytest.approx(ref_lr.attention_factor)
    for k in ("short_factor", "long_factor"):  # GGUF stores them as float32
        np.testing.assert_allclose(getattr(lr, k), getattr(ref_lr, k), rtol=1e-6)
    prompt = PROMPT + [3, 4, 5]  # past the original context: the long factors
    (a,) = PagedRunner(ours.model).step([(0, prompt)])
    (b,) = PagedRunner(ref.model).step([(0, prompt)])
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_phi3_gguf_kept_quantized_slices_fused_blocks(tmp_path):
    """`quantization="gguf"` keeps Q8_0 blocks: the fused tensors' row slices are whole blocks."""
    from tiny_models import make_tiny_gguf

    path = make_tiny_gguf(tmp_path, "phi3", quant="Q8_0")
    from jengine.quantization.weights import GroupedWeight

    kept = load_model(path, dtype="float32", quantization="gguf")
    layers = kept.model.layers.arrays()
    assert all(isinstance(layers[k], GroupedWeight) for k in ("wq", "wk", "wv", "w_gate", "w_up"))
    (a,) = PagedRunner(kept.model).step([(0, PROMPT)])
    (b,) = PagedRunner(load_model(path, dtype="float32").model).step([(0, PROMPT)])
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
