"""Asynchronous scheduling end to end: the same outputs as synchronous steps, nothing compiled after
warm-up, late stops that waste at most one row and never emit its token, aborts of requests with a
step in flight, and penalised and structured-output rows scheduled asynchronously too.

Each comparison runs one engine per mode on the same tiny checkpoint (shared compilation cache), or
for the default model (SmolLM2) one engine switched between the modes while idle.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

from jengine import LLM, SamplingParams
from jengine.config import EngineArgs
from jengine.engine.core import resolve_async_scheduling
from jengine.structured_output import StructuredOutputsParams
from tiny_models import make_tiny_checkpoint

LIMITS = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32)


def random_prompts(seed: int, lengths: list[int], vocab: int = 320) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(2, vocab, size=k).tolist() for k in lengths]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "llama")


@pytest.fixture(scope="module")
def engines(ckpt, xla_cache_dir) -> dict[bool, LLM]:
    return {mode: LLM(ckpt, compilation_cache_dir=xla_cache_dir, async_scheduling=mode, **LIMITS) for mode in (False, True)}


def summary(outs: list[Any]) -> list[Any]:
    """Everything a caller sees of a request's outputs, but metrics and num_cached_tokens (a late stop
    holds its sequence slot one step longer, which can move the admission of a waiting request by a step
    and so its prefix-cache hit). Logprob values are rounded: a batch of another shape (the wasted row
    of a late stop) changes them in the 6th digit, as it does between synchronous batches."""
    def lps(entries):
        if entries is None:
            return None
        return [{t: (round(lp.logprob, 3), lp.rank, lp.decoded_token) for t, lp in e.items()} if e is not None else None for e in entries]

    return [(o.request_id is not None, lps(o.prompt_logprobs),
             [(c.index, c.text, list(c.token_ids), c.finish_reason, c.stop_reason, lps(c.logprobs),
               None if c.cumulative_logprob is None else round(c.cumulative_logprob, 3)) for c in o.outputs])
            for o in outs]


def rows_per_request(llm: LLM) -> dict[str, int]:
    """Counts each request's rows in the steps the runner prepares from now on (instance-level wrapper)."""
    counts: dict[str, int] = {}
    prepare = llm.engine.runner.prepare

    def counting(scheduled, *args, **kwargs):
        for seq in scheduled:
            counts[seq.request_id] = counts.get(seq.request_id, 0) + 1
        return prepare(scheduled, *args, **kwargs)

    llm.engine.runner.prepare = counting
    return counts


def test_default_and_where_it_is_off():
    assert EngineArgs().create_engine_config().scheduler.async_scheduling is None
    assert resolve_async_scheduling(None, EngineArgs().create_engine_config()) is True
    assert resolve_async_scheduling(False, EngineArgs().create_engine_config()) is False
    spec = EngineArgs(speculative_config={"method": "ngram", "num_speculative_tokens": 2}).create_engine_config()
    assert resolve_async_scheduling(True, spec) is False
    with pytest.raises(ValueError, match="async_scheduling"):
        EngineArgs(async_scheduling="yes").create_engine_config()  # type: ignore[arg-type]


def test_cli_flag(ckpt):
    from jengine.cli import engine_args_from, parse_args

    assert engine_args_from(parse_args(["serve", ckpt])).async_scheduling is None
    assert engine_args_from(parse_args(["serve", ckpt, "--async-scheduling"])).async_scheduling is True
    assert engine_args_from(parse_args(["generate", ckpt, "--no-async-scheduling"])).async_scheduling is False


def test_same_outputs_with_chunked_prefill_prefix_caching_n_and_stops(engines):
    tok = engines[False].get_tokenizer()
    shared = random_prompts(2, [40])[0]  # longer than the 32-token budget: chunked prefill
    prompts = [shared + tail for tail in random_prompts(3, [3, 9, 20])] + random_prompts(4, [5, 17, 60, 11]) + random_prompts(10, [8, 13])
    base = engines[False].generate({"prompt_token_ids": prompts[4]}, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    stop_str = tok.decode(base.token_ids)[4:7]
    params = [
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=7, max_tokens=20, n=3),
        SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=11, max_tokens=15, logprobs=3),
        SamplingParams(temperature=0.0, max_tokens=16, prompt_logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=[stop_str]),
        SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[base.token_ids[0]], min_tokens=3),
        SamplingParams(temperature=1.0, seed=5, max_tokens=9, min_tokens=4, logit_bias={7: 3.0}),
        SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True, repetition_penalty=1.3, presence_penalty=0.5),
        SamplingParams(temperature=0.9, seed=8, max_tokens=12, frequency_penalty=0.6, n=2),
    ]
    results = {}
    for mode, llm in engines.items():
        first = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        again = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)  # prefix-cache hits
        results[mode] = (summary(first), summary(again))
        assert llm.engine.compilations_after_warmup == 0
        kv = llm.engine.kv_cache_manager
        assert kv.num_free_pages == kv.num_usable_pages and not llm.engine.has_unfinished_requests()
    assert results[True] == results[False]
    stopped = results[True][0][4][2][0]
    assert stopped[3] == "stop" and stopped[4] == stop_str
    assert engines[True].engine.scheduler.prefix_cache_hits > 0


def test_same_outputs_under_preemption(ckpt, xla_cache_dir):
    prompts = random_prompts(5, [30, 25, 28, 31])
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True), SamplingParams(temperature=1.0, seed=3, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, frequency_penalty=0.8, repetition_penalty=1.2),
              SamplingParams(temperature=1.0, seed=4, max_tokens=24, ignore_eos=True, presence_penalty=0.7)]
    got = {}
    for mode in (False, True):
        llm = LLM(ckpt, compilation_cache_dir=xla_cache_dir, num_gpu_blocks_override=12, enable_prefix_caching=False,
                  async_scheduling=mode, **{**LIMITS, "max_model_len": 96})
        got[mode] = summary(llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False))
        assert llm.engine.scheduler.num_preemptions_total > 0
        kv = llm.engine.kv_cache_manager
        assert kv.num_free_pages == kv.num_usable_pages
        assert llm.engine.compilations_after_warmup == 0
    assert got[True] == got[False]


def test_late_stop_wastes_at_most_one_row_and_never_emits_it(engines):
    prompt = random_prompts(6, [9])[0]
    base = engines[False].generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    stop_token = base.token_ids[3]
    cases = {"stop_token": SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[stop_token]),
             "length": SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)}
    rows, streamed = {}, {}
    for mode, llm in engines.items():
        counts = rows_per_request(llm)
        try:
            for name, params in cases.items():
                llm.engine.add_request(f"{name}-{mode}", prompt, params)
                seen = []
                while llm.engine.has_unfinished_requests():
                    seen += [list(o.outputs[0].token_ids) for o in llm.engine.step()]
                streamed[name, mode] = seen
                rows[name, mode] = counts[f"{name}-{mode}"]
        finally:
            del llm.engine.runner.prepare  # back to the class's method
    for name in cases:
        final = streamed[name, True][-1]
        assert final == streamed[name, False][-1] and streamed[name, True] == streamed[name, False]
        assert all(final[:len(s)] == s for s in streamed[name, True])  # the extra token never shows up
    assert streamed["stop_token", True][-1][-1] == stop_token
    assert rows["stop_token", True] == rows["stop_token", False] + 1  # one row computed past the stop token
    assert rows["length", True] == rows["length", False]  # a length limit is known ahead: nothing wasted


def test_abort_with_a_step_in_flight_frees_pages(engines):
    llm = engines[True]
    core = llm.engine
    prompts = random_prompts(7, [12, 20, 7])
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    for i, p in enumerate(prompts):
        core.add_request(f"ab{i}", p, params)
    for _ in range(4):
        core.step()
    assert core._in_flight is not None and any(s.request_id == "ab1" for s in core._in_flight.sched.scheduled)
    core.abort_request(["ab1"])
    late = []
    finals = {}
    while core.has_unfinished_requests():
        for out in core.step():
            late.append(out.request_id)
            if out.finished:
                finals[out.request_id] = out.outputs[0].token_ids
    assert "ab1" not in late and set(finals) == {"ab0", "ab2"}
    kv = core.kv_cache_manager
    assert kv.num_free_pages == kv.num_usable_pages and not kv.request_ids()
    ref = engines[False].generate([{"prompt_token_ids": prompts[0]}, {"prompt_token_ids": prompts[2]}], params, use_tqdm=False)
    assert [finals["ab0"], finals["ab2"]] == [o.outputs[0].token_ids for o in ref]
    assert core.compilations_after_warmup == 0


def test_penalised_rows_are_scheduled_asynchronously(engines):
    """Penalties are counted on the device: a penalised request's steps are dispatched while its last
    token is still there (a placeholder), and its tokens equal the synchronous engine's."""
    prompts = random_prompts(9, [10, 14])
    params = [SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, repetition_penalty=1.4, frequency_penalty=0.5),
              SamplingParams(temperature=1.0, seed=6, max_tokens=16, ignore_eos=True, presence_penalty=0.8)]
    got = {}
    for mode, llm in engines.items():
        core = llm.engine
        schedule = core.scheduler.schedule
        placeholders: list[int] = []

        def watched(core=core, schedule=schedule, placeholders=placeholders):
            placeholders.append(sum(r.num_output_placeholders for r in core.scheduler.running))
            return schedule()

        core.scheduler.schedule = watched
        try:
            got[mode] = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
        finally:
            del core.scheduler.schedule
        assert (max(placeholders) > 0) == mode  # asynchronous: steps went out before the last token came back
        assert core.compilations_after_warmup == 0
    assert got[True] == got[False]
    plain = engines[False].generate({"prompt_token_ids": prompts[0]}, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
                                    use_tqdm=False)[0].outputs[0].token_ids
    assert plain != got[True][0]  # the penalties changed the greedy tokens


def test_structured_output_rows_are_scheduled_asynchronously(engines):
    """Structured outputs: a constrained row's step goes out while its last token is still on the device;
    the grammar takes that token between the step's forward and its sampler, so the text obeys the
    grammar and every output (n > 1 seeded, greedy, an unconstrained neighbour) equals the synchronous one."""
    prompts = random_prompts(8, [10, 14, 6])
    params = [SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=2, max_tokens=14, n=2, structured_outputs=StructuredOutputsParams(regex=r"[0-9]{2,6}")),
              SamplingParams(temperature=0.0, max_tokens=20, structured_outputs=StructuredOutputsParams(choice=["alpha beta", "gamma"]))]
    got = {}
    for mode, llm in engines.items():
        core = llm.engine
        schedule = core.scheduler.schedule
        constrained_in_flight = []

        def watched(core=core, schedule=schedule, seen=constrained_in_flight):
            seen.append(any(r.num_output_placeholders and r.structured_output is not None for r in core.scheduler.running))
            return schedule()

        core.scheduler.schedule = watched
        try:
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        finally:
            del core.scheduler.schedule  # back to the class's method
        assert any(constrained_in_flight) == mode
        got[mode] = summary(outs)
        assert [c.text for c in outs[2].outputs] in (["alpha beta"], ["gamma"])
        assert all(re.fullmatch(r"[0-9]{2,6}", c.text) for c in outs[1].outputs), [c.text for c in outs[1].outputs]
        assert core.compilations_after_warmup == 0
        assert not core.registry.requests
    assert got[True] == got[False]


@pytest.fixture(scope="module")
def smol(xla_cache_dir) -> LLM:
    """The default model with the limits other SmolLM2 tests use (their compiled buckets are cached)."""
    return LLM(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=32, compilation_cache_dir=xla_cache_dir, async_scheduling=True)


def switch_mode(llm: LLM, on: bool) -> None:
    """Switches an idle engine between the step loops (a test shortcut: one SmolLM2 load serves both)."""
    assert not llm.engine.has_unfinished_requests()
    llm.engine.async_scheduling = llm.engine.scheduler.async_scheduling = on


def test_smollm2_same_outputs(smol):
    prompts = ["The capital of France is", "Once upon a time, in a small village by the sea,",
               "Here is a list of three prime numbers larger than forty, each with a short reason why it is prime:"]  # > 32 tokens: chunked
    params = [SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), SamplingParams(temperature=0.9, seed=21, max_tokens=12, n=2),
              SamplingParams(temperature=0.0, max_tokens=24, stop=["."], logprobs=2)]
    got = {}
    try:
        for mode in (True, False):
            switch_mode(smol, mode)
            got[mode] = summary(smol.generate(prompts, params, use_tqdm=False))
    finally:
        switch_mode(smol, True)
    assert got[True] == got[False]
    assert "Paris" in got[True][0][2][0][1]
    assert smol.engine.compilations_after_warmup == 0


def test_invalid_token_fails_its_request_and_keeps_the_others(engines):
    """A row whose sampled id is outside the vocabulary (non-finite logits, say) fails its request; the
    other rows of that step already count as computed, so they keep their tokens and finish as usual."""
    core = engines[True].engine
    prompts = random_prompts(9, [6, 11, 8])
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    fetch = core.runner.fetch
    calls = []

    def corrupting_fetch(step):
        out = fetch(step)
        calls.append(None)
        if len(calls) == 4:  # all three rows decode by now; row 0 is the first request's
            out.token_ids = out.token_ids.copy()
            out.token_ids[0] = -1
        return out

    core.runner.fetch = corrupting_fetch
    try:
        for i, p in enumerate(prompts):
            core.add_request(f"iv{i}", p, params)
        finals = {}
        while core.has_unfinished_requests():
            for out in core.step():
                if out.finished:
                    finals[out.request_id] = out.outputs[0]
    finally:
        del core.runner.fetch
    assert finals["iv0"].finish_reason == "error"
    ref = engines[False].generate([{"prompt_token_ids": p} for p in prompts[1:]], params, use_tqdm=False)
    assert [finals["iv1"].token_ids, finals["iv2"].token_ids] == [o.outputs[0].token_ids for o in ref]
    kv = core.kv_cache_manager
    assert kv.num_free_pages == kv.num_usable_pages
