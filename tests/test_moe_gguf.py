"""Mixture-of-experts GGUF files (llama.cpp's `qwen2moe`, `qwen3moe`, and Mixtral as `llama` with
experts): tiny files written as llama.cpp's converter does, against the HF checkpoint they were written
from (transformers in float32, all three) and against transformers' own GGUF loading (the Qwen ones;
transformers reads a `llama` GGUF as a dense Llama)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from jengine.loader import load_model
from jengine.loader.gguf_format import GGUFCheckpoint
from jengine.models import LlamaForCausalLM, MoeForCausalLM, get_gguf_model_class
from test_gguf import hf_from_gguf
from test_models import PROMPT, hf_greedy, hf_logits, hf_model
from tiny_models import PagedRunner, make_tiny_gguf

torch.set_num_threads(1)
HF_ARCH = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
# transformers' GGUF config mapping drops `expert_feed_forward_length` and `expert_shared_feed_forward_length`
# (it keeps the released models' defaults), so files it reads must have those widths; 4 experts keep them small.
HF_GGUF_SIZES = {
    "qwen2_moe": dict(num_experts=4, moe_intermediate_size=1408, shared_expert_intermediate_size=5632),
    "qwen3_moe": dict(num_experts=4, moe_intermediate_size=768),
}


def greedy(model, prompt: list[int], steps: int) -> tuple[np.ndarray, list[int]]:
    """Prefill logits and `steps` greedy tokens from the paged runner."""
    runner = PagedRunner(model)
    (logits,) = runner.step([(0, prompt)])
    first, tokens = logits, []
    for _ in range(steps):
        tokens.append(int(logits[-1].argmax()))
        (logits,) = runner.step([(0, [tokens[-1]])])
    return first, tokens


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_gguf_matches_the_hf_checkpoint_it_was_written_from(tmp_path, arch):
    """F32 GGUF (lossless): config from the expert keys, stacked experts split per expert and transposed,
    Mixtral's Q/K rows un-permuted; logits and greedy tokens equal transformers on the HF checkpoint."""
    path = make_tiny_gguf(tmp_path, arch)
    loaded = load_model(path)
    cfg = loaded.config
    assert isinstance(loaded.model, MoeForCausalLM) and cfg.architecture == HF_ARCH[arch]
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.intermediate_size) == (8, 2, 32)
    assert cfg.norm_topk_prob == (arch != "qwen2_moe") and cfg.dense_layers == ()
    assert cfg.shared_expert_intermediate_size == (48 if arch == "qwen2_moe" else 0)
    assert cfg.attention_bias == (arch == "qwen2_moe") and cfg.qk_norm == (arch == "qwen3_moe")
    hf = hf_model(os.path.join(tmp_path, f"tiny-{arch}-0"))
    logits, tokens = greedy(loaded.model, PROMPT, 4)
    np.testing.assert_allclose(logits, hf_logits(hf, PROMPT), atol=1e-4, rtol=1e-4)
    assert tokens == hf_greedy(hf, PROMPT, 4)


@pytest.mark.parametrize("arch,quant", [("qwen2_moe", "Q8_0"), ("qwen3_moe", "F32"), ("qwen3_moe", "Q8_0")])
def test_qwen_moe_gguf_matches_transformers_gguf_loading(tmp_path, arch, quant):
    """Our metadata parsing, dequantization and expert layout against transformers' own GGUF loader
    (a Q8_0 file dequantizes the same blocks on both sides): logits and greedy tokens."""
    path = make_tiny_gguf(tmp_path, arch, quant=quant, **HF_GGUF_SIZES[arch])
    loaded = load_model(path)
    assert loaded.config.num_experts == 4
    hf = hf_from_gguf(path)
    logits, tokens = greedy(loaded.model, PROMPT, 4)
    np.testing.assert_allclose(logits, hf_logits(hf, PROMPT), atol=1e-4, rtol=1e-4)
    assert tokens == hf_greedy(hf, PROMPT, 4)


def test_llama_gguf_with_experts_is_the_moe_family(tmp_path):
    """llama.cpp writes Mixtral as `llama`: the expert count, not the architecture name, picks the family."""
    meta = GGUFCheckpoint(make_tiny_gguf(tmp_path, "mixtral")).metadata
    assert meta["general.architecture"] == "llama" and meta["llama.expert_count"] == 8
    assert get_gguf_model_class("llama", meta) is MoeForCausalLM
    assert get_gguf_model_class("llama", {**meta, "llama.expert_count": 0}) is LlamaForCausalLM
    assert get_gguf_model_class("llama") is LlamaForCausalLM
    assert get_gguf_model_class("qwen3moe") is MoeForCausalLM


def test_kept_quantized_moe_gguf(tmp_path):
    """`quantization="gguf"` keeps the shared expert's Q8_0 blocks (projections, through `linear`); the
    experts and router are plain arrays and load dequantized. Same logits as the dequantized load."""
    from jengine.quantization.weights import GroupedWeight

    path = make_tiny_gguf(tmp_path, "qwen2_moe", quant="Q8_0")
    kept = load_model(path, dtype="float32", quantization="gguf")
    arrays = kept.model.layers.arrays()
    assert isinstance(arrays["shared_w_gate"], GroupedWeight) and isinstance(arrays["wq"], GroupedWeight)
    assert not isinstance(arrays["shared_w_down"], GroupedWeight)  # rows of 48: not whole blocks, stored F32
    assert not isinstance(arrays["experts_gate"], GroupedWeight) and arrays["experts_gate"].shape == (2, 8, 64, 32)
    (ours,) = PagedRunner(kept.model).step([(0, PROMPT)])
    (ref,) = PagedRunner(load_model(path, dtype="float32").model).step([(0, PROMPT)])
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_expert_tensor_of_wrong_shape_is_named(tmp_path):
    def drop_an_expert(t):
        t["blk.1.ffn_up_exps.weight"] = t["blk.1.ffn_up_exps.weight"][:7]

    path = make_tiny_gguf(tmp_path, "qwen3_moe", edit=drop_an_expert)
    with pytest.raises(ValueError, match=r"'blk\.1\.ffn_up_exps\.weight' of shape \(7, 32, 64\) does not fit layers\.experts_up"):
        load_model(path)


def test_missing_expert_tensor_is_named(tmp_path):
    path = make_tiny_gguf(tmp_path, "mixtral", edit=lambda t: t.pop("blk.0.ffn_down_exps.weight"))
    with pytest.raises(KeyError, match=r"has no tensor 'blk\.0\.ffn_down_exps\.weight'"):
        load_model(path)


def test_missing_expert_keys_are_named(tmp_path):
    meta = GGUFCheckpoint(make_tiny_gguf(tmp_path, "qwen2_moe")).metadata
    kw = {"tie_word_embeddings": False}
    with pytest.raises(ValueError, match=r"qwen2moe\.expert_count"):
        MoeForCausalLM.config_from_gguf({k: v for k, v in meta.items() if k != "qwen2moe.expert_count"}, **kw)
    with pytest.raises(NotImplementedError, match=r"qwen2moe\.expert_used_count"):
        MoeForCausalLM.config_from_gguf({**meta, "qwen2moe.expert_used_count": 9}, **kw)
    with pytest.raises(NotImplementedError, match=r"qwen2moe\.expert_gating_func"):
        MoeForCausalLM.config_from_gguf({**meta, "qwen2moe.expert_gating_func": 2}, **kw)


def test_engine_serves_mixtral_gguf(tmp_path, xla_cache_dir):
    """`LLM("x.gguf")` on a Mixtral GGUF (tokenizer from the file's metadata, batched prompts of several
    lengths): greedy tokens equal transformers' on the HF checkpoint; nothing compiles after warm-up."""
    from jengine import LLM
    from test_quantization import GREEDY, LIMITS, PROMPTS

    path = make_tiny_gguf(tmp_path, "mixtral")
    llm = LLM(path, dtype="float32", compilation_cache_dir=xla_cache_dir, **LIMITS)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    hf = hf_model(os.path.join(tmp_path, "tiny-mixtral-0"))
    assert [list(o.outputs[0].token_ids) for o in outs] == [hf_greedy(hf, p, GREEDY.max_tokens) for p in PROMPTS]
    assert llm.engine.compilations_after_warmup == 0


def split_experts(tensors):
    """Rewrites a file's stacked experts as llama.cpp's first Mixtral files had them: one tensor per expert."""
    for name in [n for n in tensors if n.endswith("_exps.weight")]:
        stacked = tensors.pop(name)
        for e in range(stacked.shape[0]):
            tensors[name.replace("_exps.weight", f".{e}.weight")] = stacked[e]


@pytest.mark.parametrize("quant", ["F32", "Q8_0"])
def test_old_mixtral_gguf_with_one_tensor_per_expert(tmp_path, quant):
    """`blk.{i}.ffn_gate.{e}.weight` instead of `ffn_gate_exps`: read as the stacked form; the same weights
    as the newer file (same blocks, so equal logits for Q8_0 too), and F32 equals transformers on the HF checkpoint."""
    old = make_tiny_gguf(tmp_path / "old", "mixtral", quant=quant, edit=split_experts)
    new = make_tiny_gguf(tmp_path / "new", "mixtral", quant=quant)
    ckpt = GGUFCheckpoint(old)
    assert "blk.1.ffn_down.7.weight" in ckpt.tensors and "blk.1.ffn_down_exps.weight" not in ckpt.tensors
    assert ckpt.expert_parts["blk.1.ffn_down_exps.weight"] == tuple(f"blk.1.ffn_down.{e}.weight" for e in range(8))
    assert ckpt.shape("blk.1.ffn_gate_exps.weight") == GGUFCheckpoint(new).tensors["blk.1.ffn_gate_exps.weight"].shape
    loaded = load_model(old)
    logits, tokens = greedy(loaded.model, PROMPT, 4)
    ref_logits, ref_tokens = greedy(load_model(new).model, PROMPT, 4)
    np.testing.assert_array_equal(logits, ref_logits)
    assert tokens == ref_tokens
    if quant == "F32":
        hf = hf_model(os.path.join(tmp_path / "old", "tiny-mixtral-0"))
        np.testing.assert_allclose(logits, hf_logits(hf, PROMPT), atol=1e-4, rtol=1e-4)
        assert tokens == hf_greedy(hf, PROMPT, 4)


def test_per_expert_tensors_that_do_not_stack_are_named(tmp_path):
    def lose_expert_3(t):
        split_experts(t)
        t.pop("blk.0.ffn_up.3.weight")

    with pytest.raises(ValueError, match=r"'blk\.0\.ffn_up_exps\.weight' lack expert\(s\) \[3\]"):
        GGUFCheckpoint(make_tiny_gguf(tmp_path, "mixtral", edit=lose_expert_3))

    def narrow_expert_5(t):
        split_experts(t)
        t["blk.1.ffn_gate.5.weight"] = t["blk.1.ffn_gate.5.weight"][:16]

    with pytest.raises(ValueError, match=r"'blk\.1\.ffn_gate\.0\.weight'\.\. differ in shape"):
        GGUFCheckpoint(make_tiny_gguf(tmp_path / "b", "mixtral", edit=narrow_expert_5))


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe"])
def test_moe_gguf_with_a_dense_layer_is_refused_saying_why(tmp_path, arch):
    """A Qwen MoE model with dense layers (`mlp_only_layers`) has no llama.cpp form: its converter cannot map
    a dense `mlp.gate_proj` for qwen2moe/qwen3moe and its loader needs every layer's router. A file that has
    one anyway (layer 0 as `ffn_gate/up/down`, no router or experts) is refused naming the layer, not loaded wrong."""
    import gguf

    qwen = gguf.MODEL_ARCH.QWEN2MOE if arch == "qwen2_moe" else gguf.MODEL_ARCH.QWEN3MOE
    assert gguf.MODEL_TENSOR.FFN_GATE not in gguf.MODEL_TENSORS[qwen]  # what the converter's tensor map allows

    def dense_layer_0(t):
        for k in [k for k in t if k.startswith("blk.0.ffn_") and k != "blk.0.ffn_norm.weight"]:
            del t[k]
        rng = np.random.default_rng(0)
        t["blk.0.ffn_gate.weight"] = rng.standard_normal((96, 64), np.float32)
        t["blk.0.ffn_up.weight"] = rng.standard_normal((96, 64), np.float32)
        t["blk.0.ffn_down.weight"] = rng.standard_normal((64, 96), np.float32)

    path = make_tiny_gguf(tmp_path, arch, edit=dense_layer_0)
    with pytest.raises(NotImplementedError, match=r"layer\(s\) \[0\] hold a dense MLP .*load the HF checkpoint"):
        load_model(path)
    assert load_model(make_tiny_gguf(tmp_path / "sparse", arch)).config.dense_layers == ()
