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
