"""Multi-LoRA serving through `LLM`: greedy tokens equal Hugging Face PEFT's for rows of several adapters
and base rows mixed in one batch (chunked prefill, prefix caching on, more adapters than slots), nothing
compiles when adapters move in and out of slots, and bad adapters are a ValueError naming the problem."""
from __future__ import annotations

import json
import os

import pytest

from jengine import LLM, LoRARequest, SamplingParams
from lora_adapters import ALL_MODULES, make_adapter, peft_model
from test_engine import hf_greedy, random_prompts
from tiny_models import make_tiny_checkpoint

LIMITS = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32)
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "llama")


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory) -> dict[str, LoRARequest]:
    root = tmp_path_factory.mktemp("adapters")
    specs = {
        "qvd": dict(seed=1, r=4, alpha=8),
        "all": dict(seed=2, r=8, alpha=16, targets=ALL_MODULES, use_rslora=True),
        "mlp": dict(seed=3, r=2, alpha=4, targets=("gate_proj", "up_proj", "o_proj")),
    }
    return {name: LoRARequest(name, i + 1, make_adapter(base, str(root / name), **spec)) for i, (name, spec) in enumerate(specs.items())}


@pytest.fixture(scope="module")
def llm(base, xla_cache_dir) -> LLM:
    return LLM(base, compilation_cache_dir=xla_cache_dir, enable_lora=True, max_loras=2, max_lora_rank=8, **LIMITS)


def test_mixed_adapters_and_base_rows_match_peft(llm, base, adapters):
    """Rows of three adapters (two slots) and base rows in one generate call, with a shared 40-token
    prefix (chunked over 32-token steps; the prefix cache must not share KV across adapters)."""
    shared = random_prompts(5, [40])[0]
    tails = random_prompts(6, [3, 7, 2])
    prompts, loras = [], []
    for tail in tails:
        for lora in (None, adapters["qvd"], adapters["all"], adapters["mlp"]):
            prompts.append(shared + tail)
            loras.append(lora)
    refs = {None: base}
    refs.update({name: lora.lora_path for name, lora in adapters.items()})
    expected = {}
    for name, path in refs.items():
        from transformers import AutoModelForCausalLM
        import torch

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval() if name is None else peft_model(base, path)
        expected[name] = [hf_greedy(model, shared + tail, GREEDY.max_tokens) for tail in tails]
    want = [expected[None if lora is None else lora.lora_name][i // 4] for i, lora in enumerate(loras)]
    assert len({tuple(w) for w in want[:4]}) == 4, "each adapter must change the output of the same prompt"

    seen = []
    activate = llm.engine.runner.lora.activate
    llm.engine.runner.lora.activate = lambda reqs: seen.append({r.lora_int_id for r in reqs if r}) or activate(reqs)
    try:
        for _ in range(2):  # the second pass reads the shared prefix from the cache
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False, lora_request=loras)
            assert [o.outputs[0].token_ids for o in outs] == want
    finally:
        llm.engine.runner.lora.activate = activate
    assert all(o.num_cached_tokens >= 32 for o in outs)
    assert max(len(s) for s in seen) == 2 and len(set().union(*seen)) == 3  # never more adapters than slots
    assert llm.engine.runner.lora.loads >= 3  # adapters moved in and out of the two slots
    assert llm.engine.compilations_after_warmup == 0


def test_one_adapter_for_all_prompts_and_chat(llm, base, adapters):
    lora = adapters["all"]
    prompts = random_prompts(7, [5, 11])
    model = peft_model(base, lora.lora_path)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False, lora_request=lora)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(model, p, GREEDY.max_tokens) for p in prompts]
    chat = llm.chat([{"role": "user", "content": "Hello world"}], GREEDY, use_tqdm=False, lora_request=lora)
    text = llm.get_tokenizer().apply_chat_template([{"role": "user", "content": "Hello world"}], add_generation_prompt=True, tokenize=False)
    ids = llm.get_tokenizer().encode(text, add_special_tokens=False)
    assert chat[0].outputs[0].token_ids == hf_greedy(model, ids, GREEDY.max_tokens)
    assert llm.engine.compilations_after_warmup == 0


def _broken(tmp_path, adapters, name, edit) -> LoRARequest:
    """A copy of the 'qvd' adapter with `edit(folder)` applied."""
    import shutil

    folder = tmp_path / name
    shutil.copytree(adapters["qvd"].lora_path, folder)
    edit(folder)
    return LoRARequest(name, 100 + len(name), str(folder))


def _set_config(folder, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("name, edit, message", [
    ("missing", lambda f: __import__("shutil").rmtree(f), "does not exist"),
    ("badjson", lambda f: (f / "adapter_config.json").write_text("{not json"), "not valid JSON"),
    ("badtensors", lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage"), "not a valid safetensors"),
    ("noweights", lambda f: os.remove(f / "adapter_model.safetensors"), "adapter_model.safetensors is missing"),
    ("rank", lambda f: _set_config(f, r=16), "above max_lora_rank=8"),
    ("target", lambda f: _set_config(f, target_modules=["q_proj", "wte_proj"]), "target module 'wte_proj'"),
    ("dora", lambda f: _set_config(f, use_dora=True), "use_dora"),
])
def test_bad_adapters_raise_naming_the_problem(llm, adapters, tmp_path, name, edit, message):
    bad = _broken(tmp_path, adapters, name, edit)
    with pytest.raises(ValueError, match=message) as info:
        llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False, lora_request=bad)
    assert repr(name) in str(info.value)
    assert not llm.engine.has_unfinished_requests()  # nothing was queued
    assert llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False, lora_request=adapters["qvd"])[0].outputs[0].token_ids


def test_rank_mismatch_between_config_and_tensors(llm, adapters, tmp_path):
    bad = _broken(tmp_path, adapters, "shapes", lambda f: _set_config(f, r=2))
    with pytest.raises(ValueError, match="do not match r=2"):
        llm.add_lora(bad)


def test_lora_request_checks(llm, base, adapters, xla_cache_dir):
    with pytest.raises(ValueError, match="lora_int_id"):
        LoRARequest("x", 0, adapters["qvd"].lora_path)
    with pytest.raises(ValueError, match="already used"):
        llm.add_lora(LoRARequest("other", adapters["qvd"].lora_int_id, adapters["all"].lora_path))
    with pytest.raises(ValueError, match="lora_request has 1 entries for 2 prompts"):
        llm.generate([[5, 6], [7, 8]], GREEDY, use_tqdm=False, lora_request=[adapters["qvd"]])
    with pytest.raises(ValueError, match="max_cpu_loras"):
        LLM(base, enable_lora=True, max_loras=2, max_cpu_loras=1)


def test_lora_needs_enable_lora(base, adapters, xla_cache_dir):
    plain = LLM(base, compilation_cache_dir=xla_cache_dir, **LIMITS)
    with pytest.raises(ValueError, match="enable_lora"):
        plain.generate([[5, 6, 7]], GREEDY, use_tqdm=False, lora_request=adapters["qvd"])


def test_scheduler_runs_at_most_max_loras_adapters():
    """Requests of a third adapter wait (keeping their place) while two adapters run; base rows still join."""
    from jengine.core.kv_cache_manager import KVCacheManager
    from jengine.core.scheduler import Scheduler
    from jengine.request import Request

    sched = Scheduler(KVCacheManager(64, 4), max_num_seqs=8, max_num_batched_tokens=64, max_model_len=32, max_loras=2)
    loras = [LoRARequest(f"a{i}", i, f"/adapters/{i}") for i in (1, 2, 3)]
    order = [loras[0], loras[2], loras[1], None, loras[2], loras[1], loras[0]]
    for i, lora in enumerate(order):
        sched.add_request(Request(str(i), [5, 6, 7], SamplingParams(max_tokens=1), lora_request=lora))
    out = sched.schedule()
    assert [s.request_id for s in out.scheduled] == ["0", "1", "3", "4", "6"]
    assert [r.request_id for r in sched.waiting] == ["2", "5"]  # the third adapter's requests, in order
    sched.update_from_output(out, [[9]] * len(out.scheduled))
    assert [s.request_id for s in sched.schedule().scheduled] == ["2", "5"]
    # Pages cached under one adapter are never offered to another (nor to the base model).
    a, b = (Request(n, list(range(2, 12)), lora_request=l) for n, l in (("x", loras[0]), ("y", loras[1])))
    assert a.extra_keys != b.extra_keys != Request("z", [1]).extra_keys


def test_lora_delta_matches_a_per_token_reference():
    """The masked two-matmul delta equals each token's own (x @ A_s) @ B_s, and zero for slot -1."""
    import jax.numpy as jnp
    import numpy as np

    from jengine.lora.weight import lora_delta

    rng = np.random.default_rng(0)
    slots, rank, t, d_in, d_out = 3, 4, 7, 6, 5
    x = rng.normal(size=(t, d_in)).astype(np.float32)
    a = rng.normal(size=(d_in, slots * rank)).astype(np.float32)
    b = rng.normal(size=(slots * rank, d_out)).astype(np.float32)
    token_slot = np.array([0, -1, 2, 1, 2, -1, 0], np.int32)
    got = np.asarray(lora_delta(jnp.asarray(x), jnp.asarray(a), jnp.asarray(b), jnp.asarray(token_slot), rank))
    want = np.zeros((t, d_out), np.float32)
    for i, s in enumerate(token_slot):
        if s >= 0:
            want[i] = (x[i] @ a[:, s * rank:(s + 1) * rank]) @ b[s * rank:(s + 1) * rank]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    none = lora_delta(jnp.asarray(x), jnp.asarray(a), jnp.asarray(b), jnp.full(t, -1, jnp.int32), rank)
    assert not np.asarray(none).any()


@pytest.mark.parametrize("arch, targets", [
    ("qwen2", ALL_MODULES), ("gemma3", ALL_MODULES),
    ("phi3", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    ("mixtral", ("q_proj", "k_proj", "v_proj", "o_proj")),
])
def test_other_architectures_match_peft(arch, targets, tmp_path, xla_cache_dir):
    """Biased projections (Qwen2), a layer pattern scanned in units plus an unrolled tail (Gemma 3), fused
    projections the family splits at load (Phi-3: each part shares A and takes its rows of B), and the
    attention of a mixture-of-experts model (Mixtral)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = make_tiny_checkpoint(tmp_path, arch)
    lora = LoRARequest("all", 1, make_adapter(path, str(tmp_path / "all"), seed=4, r=4, alpha=8, targets=targets))
    prompts = random_prompts(8, [6, 9])
    llm = LLM(path, compilation_cache_dir=xla_cache_dir, enable_lora=True, max_loras=1, max_lora_rank=4, **LIMITS)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False, lora_request=[lora, None])
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    want = [hf_greedy(peft_model(path, lora.lora_path), prompts[0], GREEDY.max_tokens), hf_greedy(base, prompts[1], GREEDY.max_tokens)]
    assert [o.outputs[0].token_ids for o in outs] == want
    assert want[0] != hf_greedy(base, prompts[0], GREEDY.max_tokens)
    assert llm.engine.compilations_after_warmup == 0


_TP_CHILD = r"""
import json, sys
from jengine import LLM, LoRARequest, SamplingParams
base, prompts, adapters = json.loads(sys.argv[1])
loras = [None if a is None else LoRARequest(a[0], a[1], a[2]) for a in adapters]
llm = LLM(base, tensor_parallel_size=2, enable_lora=True, max_loras=2, max_lora_rank=8, compilation_cache_dir="",
          max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32)
outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                    use_tqdm=False, lora_request=loras)
stacks = llm.engine.runner.lora.stacks
specs = {f"{p}.{k}": str(v.sharding.spec) for p, st in stacks.items() for k, v in st.items()}
print("RESULT " + json.dumps({"tokens": [o.outputs[0].token_ids for o in outs], "specs": specs,
                              "compiles": llm.engine.compilations_after_warmup}))
"""


def test_tensor_parallel_adapters_match_peft(base, adapters):
    """Two fake CPU devices: A replicated (split with the input of row-parallel projections), B split with
    the output of column-parallel ones; greedy tokens still equal PEFT's for mixed adapter and base rows."""
    import subprocess
    import sys

    import torch
    from transformers import AutoModelForCausalLM

    prompts = random_prompts(9, [6, 10, 4])
    chosen = [adapters["qvd"], None, adapters["all"]]
    models = [peft_model(base, adapters["qvd"].lora_path), AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval(),
              peft_model(base, adapters["all"].lora_path)]
    want = [hf_greedy(m, p, 8) for m, p in zip(models, prompts)]
    arg = json.dumps([base, prompts, [None if a is None else [a.lora_name, a.lora_int_id, a.lora_path] for a in chosen]])
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _TP_CHILD, arg], capture_output=True, text=True, env=env, timeout=600)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(line[len("RESULT "):])
    assert result["tokens"] == want
    assert result["compiles"] == 0
    specs = result["specs"]
    assert specs["layers.wq.a"] == "P()" and specs["layers.wq.b"] == "P(None, None, 'model')"
    assert specs["layers.w_down.a"] == "P(None, 'model', None)" and specs["layers.w_down.b"] == "P()"
