"""End-to-end engine tests through `LLM`: greedy parity with Hugging Face, paging, scheduling, API.

Greedy tokens must equal a float32 Hugging Face greedy loop token for token, with prefix caching on
and off, with a token budget smaller than the longest prompt (chunked prefill) and with a KV cache
too small for all requests at once (preemption). Engines share small limits so their compiled step
buckets come from the session's persistent compilation cache.
"""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from engine_state import assert_no_request_state
from jengine import LLM, SamplingParams
from tiny_models import ARCHS, make_tiny_checkpoint

LIMITS = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32)


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation with a plain KV-cached loop (no EOS handling, like ignore_eos)."""
    # transformers renamed the forward's cache argument (and output) from past_key_values to cache.
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out, past = [], None
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            res = model(input_ids=ids, use_cache=True, **{cache_kw: past})
            past = getattr(res, cache_kw)
            tok = int(res.logits[0, -1].argmax())
            out.append(tok)
            ids = torch.tensor([[tok]])
    return out


def random_prompts(seed: int, lengths: list[int], vocab: int = 320) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(2, vocab, size=k).tolist() for k in lengths]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "llama")


@pytest.fixture(scope="module")
def hf_llama(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(tiny_llama, xla_cache_dir) -> LLM:
    return LLM(tiny_llama, compilation_cache_dir=xla_cache_dir, **LIMITS)


GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_parity_each_architecture(arch, tmp_path, xla_cache_dir):
    from transformers import AutoModelForCausalLM

    overrides = {"sliding_window": 24} if arch == "mistral" else {}
    path = make_tiny_checkpoint(tmp_path, arch, **overrides)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = random_prompts(1, [5, 40, 17])  # 40 > budget 32: chunked prefill
    llm = LLM(path, compilation_cache_dir=xla_cache_dir, **LIMITS)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, 12), arch
        assert o.outputs[0].finish_reason == "length"
    assert llm.engine.compilations_after_warmup == 0


@pytest.mark.parametrize("backend", ["gpu", "reference"])
def test_greedy_parity_through_other_attention_backends(tmp_path, xla_cache_dir, backend):
    """The engine on an attention backend other than the platform's default: the Pallas GPU kernel
    (natively on a GPU, in interpret mode elsewhere) and the pure-JAX reference (the CPU's fallback).

    head_dim 64 and three query heads per KV head (SmolLM2's shape), so the kernel serves it; decode,
    chunked prefill and a context past one 64-token KV block all go through it.
    """
    from transformers import AutoModelForCausalLM

    path = make_tiny_checkpoint(tmp_path, "llama", hidden_size=192, num_attention_heads=3, num_key_value_heads=1)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = random_prompts(4, [70, 9])
    llm = LLM(path, compilation_cache_dir=xla_cache_dir, attention_backend=backend, **LIMITS)
    assert llm.engine.runner.backend == backend
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, 12)
    assert llm.engine.compilations_after_warmup == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_float32_models_ask_for_float32_matmuls(tiny_llama, xla_cache_dir, dtype):
    """Accelerators run float32 matmuls at lower precision by default (TF32 on GPUs), which would
    break parity with Hugging Face; a float32 model's step asks for full precision, others do not.
    (The reference backend: with the CPU one every float32 projection and the head are native calls.)"""
    from jengine.worker.step_inputs import empty_step_inputs

    llm = LLM(tiny_llama, dtype=dtype, compilation_cache_dir=xla_cache_dir, max_model_len=32, max_num_seqs=1,
              max_num_batched_tokens=8, attention_backend="reference")
    r = llm.engine.runner
    t, s = r.buckets()[0]
    text = r._forward.lower(r.params, r.kv_cache, empty_step_inputs(t, s, r.max_pages_per_seq, pad_slot=r.rows.pad_slot), r.block_table).as_text()
    dots = [line for line in text.splitlines() if "dot_general" in line]
    assert dots
    assert all(("HIGHEST" in line) == (dtype == "float32") for line in dots)


def test_parity_prefix_caching_on_and_chunked(llm, hf_llama):
    shared = random_prompts(2, [40])[0]
    prompts = [shared + tail for tail in random_prompts(3, [3, 9, 20])] + [shared]
    expected = [hf_greedy(hf_llama, p, 12) for p in prompts]
    first = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in first] == expected
    # Second pass: the shared 32-token prefix (two full pages) comes from the cache.
    again = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == expected
    assert all(o.num_cached_tokens >= 32 for o in again)
    assert llm.engine.scheduler.prefix_cache_hits > 0
    assert llm.engine.compilations_after_warmup == 0


def test_parity_prefix_caching_off(tiny_llama, hf_llama, xla_cache_dir):
    llm = LLM(tiny_llama, compilation_cache_dir=xla_cache_dir, enable_prefix_caching=False, **LIMITS)
    prompts = random_prompts(4, [33, 33, 7])
    prompts[1][:32] = prompts[0][:32]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf_llama, p, 12) for p in prompts]
    assert llm.engine.scheduler.prefix_cache_hits == 0


def test_parity_under_preemption(tiny_llama, hf_llama, xla_cache_dir):
    # 11 usable pages of 16 tokens: four requests of ~50 tokens cannot all stay resident.
    llm = LLM(tiny_llama, compilation_cache_dir=xla_cache_dir, num_gpu_blocks_override=12, enable_prefix_caching=False, **{**LIMITS, "max_model_len": 96})
    prompts = random_prompts(5, [30, 25, 28, 31])
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions_total > 0
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf_llama, p, 24) for p in prompts]
    assert_no_request_state(llm.engine)  # preemption freed pages only; the end freed the rest


def test_no_compilation_after_warmup_mixed_lengths(llm):
    rng = np.random.default_rng(7)
    lengths = rng.integers(1, 100, size=10).tolist()
    params = [SamplingParams(temperature=float(rng.choice([0.0, 0.7])), top_k=int(rng.choice([0, 5])), top_p=float(rng.choice([1.0, 0.9])),
                             max_tokens=int(rng.integers(1, 20)), logprobs=int(rng.choice([0, 3])), presence_penalty=0.5, seed=i)
              for i in range(10)]
    outs = llm.generate([{"prompt_token_ids": p} for p in random_prompts(8, lengths)], params, use_tqdm=False)
    assert all(o.finished for o in outs)
    llm.generate("The quick brown fox", SamplingParams(max_tokens=4, prompt_logprobs=2), use_tqdm=False)
    assert llm.engine.compilations_after_warmup == 0


def test_seeded_request_same_whatever_shares_the_batch(llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True)
    prompt = {"prompt_token_ids": random_prompts(9, [12])[0]}
    alone = llm.generate(prompt, seeded, use_tqdm=False)[0].outputs[0].token_ids
    noise = [{"prompt_token_ids": p} for p in random_prompts(10, [30, 3, 17])]
    mixed = llm.generate(noise[:2] + [prompt] + noise[2:], [SamplingParams(temperature=0.9, max_tokens=20)] * 2 + [seeded] + [SamplingParams(temperature=0.5, max_tokens=5)], use_tqdm=False)
    assert mixed[2].outputs[0].token_ids == alone
    unseeded = llm.generate([prompt] * 2, SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert unseeded[0].outputs[0].token_ids != unseeded[1].outputs[0].token_ids


def test_n_children_share_prompt_and_differ(llm, monkeypatch):
    """n=3 children of a 40-token prompt hold the same physical pages for its two full pages (the later
    children find them in the prefix cache), and sample different continuations."""
    core = llm.engine
    kv = core.kv_cache_manager
    tables: list[dict[str, list[int]]] = []
    step = core.step

    def recording_step():
        out = step()
        tables.append({rid: kv.get_block_table(rid) for rid in kv.request_ids()})
        return out

    monkeypatch.setattr(core, "step", recording_step)
    hits_before = kv.prefix_cache_hits
    prompt = random_prompts(31, [40])[0]  # a prompt no other test uses: nothing of it is cached yet
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert all(len(c.token_ids) == 10 for c in out.outputs)
    full_pages = len(prompt) // kv.page_size
    assert full_pages == 2
    shared = [t for t in tables if len(t) == 3]
    assert shared, "the three children never ran together"
    assert all(len({tuple(pages[:full_pages]) for pages in t.values()}) == 1 for t in shared), shared[0]
    assert kv.prefix_cache_hits - hits_before == 2 * full_pages * kv.page_size  # children 1 and 2 reuse both pages


def test_stop_strings_min_tokens_ignore_eos_and_logprobs(llm):
    tok = llm.get_tokenizer()
    base = llm.generate("Paged attention", SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    text = base.text
    assert len(text) > 6
    stop = text[3:6]  # spans whatever token boundaries fall there
    cut = llm.generate("Paged attention", SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert cut.text == text[: text.index(stop)] and cut.finish_reason == "stop" and cut.stop_reason == stop
    kept = llm.generate("Paged attention", SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop=[stop], include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == text[: text.index(stop) + len(stop)]
    # A stop token that greedy decoding emits: min_tokens masks it until min_tokens are out.
    first = base.token_ids[0]
    stopped = llm.generate("Paged attention", SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[first]), use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == [first] and stopped.finish_reason == "stop" and stopped.stop_reason == first
    held = llm.generate("Paged attention", SamplingParams(temperature=0.0, max_tokens=20, min_tokens=5, stop_token_ids=[first]), use_tqdm=False)[0].outputs[0]
    assert first not in held.token_ids[:5]
    # ignore_eos: the length limit is what ends it.
    assert base.finish_reason == "length" and len(base.token_ids) == 20
    lp = llm.generate("Paged attention", SamplingParams(temperature=0.0, max_tokens=3, logprobs=2), use_tqdm=False)[0].outputs[0]
    assert len(lp.logprobs) == len(lp.token_ids)
    for tid, entry in zip(lp.token_ids, lp.logprobs):
        assert entry[tid].rank == 1 and entry[tid].logprob <= 0.0 and len(entry) >= 2
    assert lp.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(lp.token_ids, lp.logprobs)), rel=1e-5)
    del tok


@pytest.mark.parametrize("pen", [dict(repetition_penalty=1.3, frequency_penalty=0.0, presence_penalty=0.0),
                                 dict(repetition_penalty=1.0, frequency_penalty=0.8, presence_penalty=0.5)])
def test_penalties_match_hf_logits_penalised_by_hand(llm, hf_llama, pen):
    """Greedy with penalties equals a plain HF loop that penalises its logits as vLLM does (on this
    prompt each penalty set changes the greedy tokens: at position 4 and at position 14)."""
    prompt = random_prompts(12, [14])[0]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(16):
            x = hf_llama(torch.tensor([prompt + out])).logits[0, -1].double()
            seen = torch.tensor(sorted(set(prompt + out)))
            x[seen] = torch.where(x[seen] > 0, x[seen] / pen["repetition_penalty"], x[seen] * pen["repetition_penalty"])
            for t in set(out):
                x[t] -= pen["frequency_penalty"] * out.count(t) + pen["presence_penalty"]
            out.append(int(x.argmax()))
    got = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, **pen), use_tqdm=False)
    assert got[0].outputs[0].token_ids == out
    assert not llm.engine.registry.requests  # per-request penalty state ends with the request (it lives on the record)


def test_prompt_logprobs_match_hf(llm, hf_llama):
    prompt = random_prompts(11, [20])[0]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    with torch.no_grad():
        ref = torch.log_softmax(hf_llama(torch.tensor([prompt])).logits[0], -1)
    for i in range(1, len(prompt)):
        assert out.prompt_logprobs[i][prompt[i]].logprob == pytest.approx(float(ref[i - 1, prompt[i]]), abs=1e-4)


def test_chat_applies_template(llm):
    out = llm.chat([{"role": "user", "content": "Hello"}], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    assert out.prompt.startswith("<|user|>Hello") and out.prompt.endswith("<|assistant|>")
    assert out.prompt_token_ids == llm.get_tokenizer().encode(out.prompt, add_special_tokens=False)
    assert len(out.outputs[0].token_ids) == 3 and out.outputs[0].finish_reason == "length"


@pytest.mark.parametrize(
    "prompt, params, field",
    [
        ("", SamplingParams(), "prompt"),
        ({"prompt_token_ids": []}, SamplingParams(), "prompt"),
        ({"prompt_token_ids": list(range(2, 200))}, SamplingParams(), "max_model_len"),
        ({"prompt_token_ids": [5, 100000]}, SamplingParams(), "vocabulary"),
        ("lone \ud800 surrogate", SamplingParams(), "prompt is not valid Unicode"),
        ({"prompt": "\udfff"}, SamplingParams(), "prompt is not valid Unicode"),
    ],
)
def test_bad_prompts_raise_naming_the_field(llm, prompt, params, field):
    with pytest.raises(ValueError, match=field):
        llm.generate(prompt, params, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_chat_message_with_a_lone_surrogate_raises_naming_it(llm):
    messages = [{"role": "system", "content": "ok"}, {"role": "user", "content": "bad \ud800"}]
    with pytest.raises(ValueError, match=r"messages\[1\]\.content is not valid Unicode"):
        llm.chat(messages, SamplingParams(max_tokens=2), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize(
    "kwargs, field",
    [(dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(n=0), "n"), (dict(max_tokens=0), "max_tokens"),
     (dict(logit_bias={"5": 1.0}), "logit_bias"), (dict(logit_bias={-1: 1.0}), "logit_bias"), (dict(logit_bias={5: float("nan")}), "logit_bias"),
     (dict(logit_bias=[(5, 1.0)]), "logit_bias")],
)
def test_bad_sampling_params_raise(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_logit_bias_steers_generation(llm):
    prompt = "Paged attention"
    base = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    forced = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logit_bias={77: 100.0}), use_tqdm=False)[0]
    assert forced.outputs[0].token_ids == [77] * 6
    banned = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logit_bias={base[0]: -100.0}), use_tqdm=False)[0]
    assert banned.outputs[0].token_ids[0] != base[0]
    sampled = llm.generate(prompt, SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=4, ignore_eos=True, logit_bias={91: 100.0}), use_tqdm=False)[0]
    assert [c.token_ids for c in sampled.outputs] == [[91] * 4] * 2
    assert llm.engine.compilations_after_warmup == 0


@pytest.mark.parametrize("bias, message", [({100000: 1.0}, "vocabulary"), ({i: 1.0 for i in range(301)}, "at most 300")])
def test_logit_bias_the_engine_cannot_serve(llm, bias, message):
    with pytest.raises(ValueError, match=f"logit_bias.*{message}"):
        llm.generate("Hi", SamplingParams(logit_bias=bias), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_logprobs_above_max_rejected(llm):
    with pytest.raises(ValueError, match="logprobs"):
        llm.generate("Hi", SamplingParams(logprobs=21), use_tqdm=False)


def test_max_model_len_that_cannot_fit_the_cache(tiny_llama, xla_cache_dir):
    with pytest.raises(ValueError, match="kv_cache_memory_bytes|gpu_memory_utilization"):
        LLM(tiny_llama, compilation_cache_dir=xla_cache_dir, kv_cache_memory_bytes=4096, **LIMITS)


def test_one_validation_point_refuses_before_anything_is_queued(tiny_llama, xla_cache_dir):
    """The engine's request validation (what every frontend calls) and the scheduler's guard apply one
    rule: a prompt of max_model_len tokens leaves no room and is refused (the scheduler used to accept
    it), before any request of the batch is queued; one token shorter runs."""
    llm = LLM(tiny_llama, compilation_cache_dir=xla_cache_dir, num_gpu_blocks_override=4, **{**LIMITS, "max_model_len": 48})
    ok = SamplingParams(max_tokens=4)
    with pytest.raises(ValueError, match="prompt is 48 tokens, but max_model_len is 48: the prompt must leave room"):
        llm.generate([{"prompt_token_ids": [5] * 8}, {"prompt_token_ids": [5] * 48}], [ok, ok], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests() and len(llm.engine.output_processor._parents) == 0
    sched = llm.engine.scheduler
    assert sched.capacity_error(48, None) == llm.engine.scheduler.capacity_error(48, 4) is not None
    assert sched.capacity_error(47, None) is None
    (out,) = llm.generate([{"prompt_token_ids": [5] * 47}], SamplingParams(max_tokens=8), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 1 and out.outputs[0].finish_reason == "length"  # up to max_model_len
