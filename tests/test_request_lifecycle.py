"""A request's state lives on its record and ends in one place (`RequestRegistry.free`): after a mixed
workload (n > 1, penalties, structured outputs, logprobs, a stop string, an abort mid-stream, a request
that fails in the step, refused duplicates), with n-gram speculation and with asynchronous scheduling,
every index is empty, every page is back in the pool and every record let go of its state."""
from __future__ import annotations

import re

import pytest

from engine_state import assert_no_request_state
from jengine import LLM, SamplingParams, StructuredOutputsParams
from tiny_models import make_tiny_checkpoint

SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
LIMITS = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32)
LOOP = [11, 12, 13, 14, 15, 16, 17, 18]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "llama")


@pytest.mark.parametrize("mode", ["ngram", "async"])
def test_mixed_workload_leaves_nothing_behind(tiny_llama, xla_cache_dir, monkeypatch, mode):
    llm = LLM(tiny_llama, compilation_cache_dir=xla_cache_dir, speculative_config=SPEC if mode == "ngram" else None, **LIMITS)
    core = llm.engine
    assert core.async_scheduling == (mode == "async")
    (ref,) = llm.generate([{"prompt_token_ids": LOOP * 4}], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    text = ref.outputs[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), "the tiny model's text must have something to stop on"

    records = []
    add = core.scheduler.add_request
    monkeypatch.setattr(core.scheduler, "add_request", lambda req: (records.append(req), add(req))[1])
    regex = StructuredOutputsParams(regex=r"[0-9]{2,6}")
    work = {
        "pen": ([5, 6, 7, 8], SamplingParams(n=2, temperature=0.8, seed=1, max_tokens=10, ignore_eos=True,
                                             presence_penalty=0.5, frequency_penalty=0.3)),
        "json": ([9, 10, 11], SamplingParams(n=2, temperature=1.0, seed=2, max_tokens=10, structured_outputs=regex)),
        "loop": (LOOP * 4, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop=[stop])),
        "lp": ([20, 21, 22, 23, 24], SamplingParams(temperature=0.0, max_tokens=6, logprobs=2, prompt_logprobs=1)),
        "gone": (LOOP * 3, SamplingParams(n=2, temperature=0.0, max_tokens=40, ignore_eos=True)),
    }
    for rid, (prompt, params) in work.items():
        core.add_request(rid, prompt, params)
    # Refused while being queued: a parent id in use, and a child id in use; the live ones are untouched.
    with pytest.raises(ValueError, match="'pen' is already in use"):
        core.add_request("pen", [1, 2], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="'0_pen' is already in use"):
        core.add_request("0_pen", [1, 2], SamplingParams(max_tokens=2))
    assert set(core.output_processor.child_ids("pen")) == {"0_pen", "1_pen"} and "0_pen" not in core.output_processor._parents
    # One that slips past validation and cannot be run: the step fails it alone ("error").
    monkeypatch.setattr(core, "validate_prompt", lambda ids, params: None)
    core.add_request("bad", [3, 4], SamplingParams(max_tokens=4, logit_bias={i: 1.0 for i in range(301)}))
    monkeypatch.undo()  # validation back; records were captured above

    finals, gone_tokens = {}, 0
    for _ in range(400):
        if not core.has_unfinished_requests():
            break
        for out in core.step():
            if out.request_id == "gone":
                gone_tokens = sum(len(c.token_ids) for c in out.outputs)
                assert not out.finished
            if out.finished:
                finals[out.request_id] = out
        if gone_tokens and "gone" in core.output_processor._parents:
            core.abort_request(["gone", "gone", "never-added"])  # mid-stream; repeats and unknown ids are ignored
            assert "gone" not in core.output_processor._parents
    assert not core.has_unfinished_requests()

    assert set(finals) == {"pen", "json", "loop", "lp", "bad"}, set(finals)
    assert finals["bad"].outputs[0].finish_reason == "error"
    loop = finals["loop"].outputs[0]
    assert loop.finish_reason == "stop" and loop.stop_reason == stop and stop not in loop.text
    assert all(re.fullmatch(r"[0-9]{0,6}", c.text) for c in finals["json"].outputs)
    assert [len(c.token_ids) for c in finals["pen"].outputs] == [10, 10]
    assert len(finals["lp"].outputs[0].logprobs) == len(finals["lp"].outputs[0].token_ids)
    ids = sorted(r.request_id for r in records)
    assert ids == sorted(["0_pen", "1_pen", "0_json", "1_json", "loop", "lp", "0_gone", "1_gone", "0_pen", "bad"])
    assert {r.status.name for r in records if r.request_id.endswith("gone")} == {"FINISHED_ABORTED"}
    if mode == "ngram":
        assert core.speculator.stats.num_drafts > 0
    assert_no_request_state(core, records)
    assert core.compilations_after_warmup == 0
