"""Speculative decoding with a draft model (`speculative_config={"method": "draft_model", "model": PATH, ...}`).

Every engine here runs one workload (chunked prefill, shared prefixes, n > 1, greedy and seeded sampling,
top-k/top-p with min_tokens, penalties, logprobs, and a prompt_logprobs request that runs unspeculated in
the same batch) and must return what the engine returns without speculation, token for token and
logprob for logprob (a structured-output request runs without drafts in the same batch). Drafts are greedy, so the accept rule is exact rejection sampling and seeded rows
draw the same tokens as without speculation. With the target as its own draft the greedy rows accept
(nearly) every draft, which can only happen if the draft's KV cache follows the target's positions
exactly, through chunked prefill, preemption and prefix-cache hits; with a different random draft almost
every draft is rejected, the other path. Nothing may compile after warm-up, on one device and on two.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
LIMITS = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32)
LOOP = [11, 12, 13, 14, 15, 16, 17, 18]
PROMPTS = [LOOP * 5, LOOP * 4 + [30, 31], [40, 41, 42] * 3, LOOP * 4 + [32], LOOP * 3, [50, 51, 52, 53, 54] * 4, [60, 61, 62] * 5]
GREEDY_REQUESTS = {"0", "1", "4"}  # the request ids (prompt index) whose rows are greedy


def _params() -> list[Any]:
    from jengine import SamplingParams, StructuredOutputsParams

    return [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=2),
            SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, n=2),
            SamplingParams(temperature=0.8, seed=7, max_tokens=16, ignore_eos=True, n=2, logprobs=1),
            SamplingParams(temperature=0.3, top_k=5, top_p=0.9, seed=3, min_tokens=12, max_tokens=20),
            SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, repetition_penalty=1.3),
            SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, prompt_logprobs=2),
            SamplingParams(temperature=1.0, seed=2, max_tokens=14, structured_outputs=StructuredOutputsParams(regex=r"[0-9]{2,6}"))]


def _summary(outs: list[Any]) -> list[Any]:
    """Tokens, text, finish reasons, (prompt) logprobs as (token, rank, value) lists (compared by `_same`)."""
    def lps(entries: Any) -> Any:
        if entries is None:
            return None
        return [None if e is None else sorted((t, lp.rank, lp.logprob) for t, lp in e.items()) for e in entries]

    return [(lps(o.prompt_logprobs), [(c.text, list(c.token_ids), c.finish_reason, lps(c.logprobs)) for c in o.outputs]) for o in outs]


def _same(got: list[Any], want: list[Any]) -> bool:
    """Equal summaries, logprob values within 1e-4: a batch of another shape (verification rows, a
    prefix recomputed after preemption) changes them in the 6th digit."""
    def flat(summary: Any) -> list[Any]:
        out: list[Any] = []
        for item in summary if isinstance(summary, (list, tuple)) else [summary]:
            out.extend(flat(item) if isinstance(item, (list, tuple)) else [item])
        return out

    a, b = flat(got), flat(want)
    return len(a) == len(b) and all(x == y or (isinstance(x, float) and isinstance(y, float) and abs(x - y) <= 1e-4)
                                    for x, y in zip(a, b)) and _shape(got) == _shape(want)


def _shape(summary: Any) -> Any:
    return [_shape(x) for x in summary] if isinstance(summary, (list, tuple)) else type(summary).__name__


def _run(llm: Any) -> tuple[list[Any], dict[str, list[int]]]:
    """The workload's summarised outputs, and per request (prompt index) [drafts verified, drafts accepted]."""
    per_request: dict[str, list[int]] = {}
    speculator = llm.engine.speculator
    if speculator is not None:
        record = speculator._record

        def counting(req: Any, num_drafts: int, num_accepted: int) -> None:
            entry = per_request.setdefault(req.request_id.split("_")[-1], [0, 0])
            entry[0] += num_drafts
            entry[1] += num_accepted
            record(req, num_drafts, num_accepted)

        speculator._record = counting
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], _params(), use_tqdm=False)
    return _summary(outs), per_request


def _draft(path: str, k: int = 3) -> dict[str, Any]:
    return {"method": "draft_model", "model": path, "num_speculative_tokens": k}


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("target"), "llama")


@pytest.fixture(scope="module")
def other_draft(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Another random model with the target's vocabulary: 1 layer, other weights."""
    from tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("draft"), "llama", seed=1, num_hidden_layers=1)


@pytest.fixture(scope="module")
def plain(target: str, xla_cache_dir: str) -> list[Any]:
    from jengine import LLM

    return _run(LLM(target, compilation_cache_dir=xla_cache_dir, **LIMITS))[0]


def test_own_checkpoint_as_draft_accepts_every_greedy_draft_through_preemption(target: str, plain: list[Any], xla_cache_dir: str) -> None:
    """The target as its own draft, in a cache small enough to preempt: identical outputs; the greedy
    requests accept nearly every draft (the draft's KV follows chunked prefill, preemption and prefix
    hits); every page comes back; nothing compiles after warm-up; the vLLM counters count the drafts."""
    from jengine import LLM

    llm = LLM(target, compilation_cache_dir=xla_cache_dir, speculative_config=_draft(target), block_size=8,
              num_gpu_blocks_override=17, **LIMITS)
    got, per_request = _run(llm)
    engine = llm.engine
    assert _same(got, plain), (got, plain)
    assert engine.scheduler.num_preemptions_total > 0 and engine.scheduler.prefix_cache_hits > 0
    for rid in GREEDY_REQUESTS:
        drafts, accepted = per_request[rid]
        assert drafts > 0 and accepted >= 0.9 * drafts, (rid, drafts, accepted)
    assert set(per_request) >= {"2", "3", "4"}, "sampled and penalised requests speculate too"
    assert per_request["5"][0] > 0  # the prompt_logprobs request decodes with drafts after its prompt
    assert "6" not in per_request, "a structured-output request runs without drafts"
    stats = engine.speculator.stats
    assert stats.num_draft_tokens == sum(d for d, _ in per_request.values()) and stats.num_accepted_tokens == sum(a for _, a in per_request.values())
    assert engine.compilations_after_warmup == 0
    assert engine.kv_cache_manager.num_free_pages == engine.kv_cache_manager.num_usable_pages
    from engine_state import assert_no_request_state

    assert_no_request_state(engine)  # finished requests leave no draft state behind (nor pages, nor records)


def test_other_draft_is_verified_into_identical_outputs(target: str, other_draft: str, plain: list[Any], xla_cache_dir: str) -> None:
    """A different random draft (k = 4): most drafts are rejected, and the outputs are still those of the
    engine without speculation; the draft's KV cache is counted in the page budget."""
    from jengine import LLM

    budget = 1 << 20
    llm = LLM(target, compilation_cache_dir=xla_cache_dir, speculative_config=_draft(other_draft, k=4), kv_cache_memory_bytes=budget, **LIMITS)
    got, per_request = _run(llm)
    engine = llm.engine
    assert _same(got, plain), (got, plain)
    stats = engine.speculator.stats
    assert stats.num_drafts > 0 and stats.num_draft_tokens > stats.num_accepted_tokens
    assert engine.compilations_after_warmup == 0
    assert engine.runner.kv_cache_bytes + engine.speculator.draft.kv_cache_bytes <= budget
    assert engine.speculator.draft.kv_cache_bytes > 0


@pytest.mark.parametrize("spec, field", [
    ({"method": "draft_model", "num_speculative_tokens": 2}, "speculative_config.model"),
    ({"method": "draft_model", "model": "/no/such/draft", "num_speculative_tokens": 2}, "speculative_config.model"),
    ({"model": "/no/such/draft", "num_speculative_tokens": 2}, "speculative_config.model"),  # vLLM's older spelling
    ({"method": "draft_model", "model": "TARGET", "num_speculative_tokens": 0}, "speculative_config.num_speculative_tokens"),
    ({"method": "draft_model", "model": "TARGET", "num_speculative_tokens": 65}, "speculative_config.num_speculative_tokens"),
    ({"method": "draft_model", "model": "TARGET"}, "speculative_config.num_speculative_tokens"),
    ({"method": "draft_model", "model": "TARGET", "num_speculative_tokens": 2, "prompt_lookup_max": 3}, "speculative_config.prompt_lookup_max"),
    ({"method": "ngram", "model": "TARGET", "num_speculative_tokens": 2}, "speculative_config.model"),
    ({"method": "medusa", "model": "TARGET", "num_speculative_tokens": 2}, "speculative_config.method"),
])
def test_bad_draft_model_config_is_named(target: str, spec: dict, field: str) -> None:
    from jengine.config import EngineArgs

    spec = {k: target if v == "TARGET" else v for k, v in spec.items()}
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        EngineArgs(model=target, speculative_config=spec).create_engine_config()


def test_vllm_spellings_of_the_method(target: str) -> None:
    from jengine.config import EngineArgs

    def method(spec: dict) -> tuple[str, Any]:
        cfg = EngineArgs(model=target, speculative_config=spec).create_engine_config().speculative
        return cfg.method, cfg.model

    assert method({"model": target, "num_speculative_tokens": 2}) == ("draft_model", target)  # method left out: a draft model
    assert method({"model": "[ngram]", "num_speculative_tokens": 2}) == ("ngram", None)
    assert method({"num_speculative_tokens": 2}) == ("ngram", None)
    with pytest.raises(ValueError, match=r"speculative_config\.method"):
        EngineArgs(model=target, speculative_config=_draft(target), num_processes=2).create_engine_config()


def test_a_draft_that_cannot_serve_is_refused_by_name(target: str, tmp_path: Any) -> None:
    """Another vocabulary, or fewer positions than max_model_len: ValueError naming speculative_config.model."""
    from jengine import LLM
    from tiny_models import make_tiny_checkpoint

    vocab = make_tiny_checkpoint(tmp_path, "llama", vocab_size=384, tokenizer=False)
    with pytest.raises(ValueError, match=r"speculative_config\.model .*vocabulary of 384 tokens, the target 320"):
        LLM(target, speculative_config=_draft(vocab), compilation_cache_dir="", **LIMITS)
    short = make_tiny_checkpoint(tmp_path, "llama", seed=2, max_position_embeddings=64)
    with pytest.raises(ValueError, match=r"speculative_config\.model supports 64 positions"):
        LLM(target, speculative_config=_draft(short), compilation_cache_dir="", **LIMITS)


def test_streaming_server_sends_accepted_runs(target: str, xla_cache_dir: str) -> None:
    """Through the OpenAI server: a streamed completion equals the non-streamed one, some chunks carry
    several tokens (an accepted run arrives in one step), and /metrics counts the drafts."""
    import httpx
    import openai

    from jengine.config import EngineArgs
    from jengine.engine.async_engine import AsyncEngine
    from jengine.server.api_server import BackgroundServer, ServerSettings

    args = EngineArgs(model=target, compilation_cache_dir=xla_cache_dir, speculative_config=_draft(target), **LIMITS)
    engine = AsyncEngine.from_engine_args(args, log_requests=False)
    srv = BackgroundServer(engine, ServerSettings(model_path=target, port=0, uvicorn_log_level="warning"))
    try:
        kw = dict(model=target, prompt="One two three four five", max_tokens=16, temperature=0.0, logprobs=1, extra_body={"ignore_eos": True})
        with openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60) as client:
            whole = client.completions.create(**kw).choices[0]
            chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw) if c.choices]
        assert "".join(c.text for c in chunks) == whole.text
        streamed = sum((c.logprobs.tokens for c in chunks if c.logprobs is not None), [])
        assert streamed == whole.logprobs.tokens and len(streamed) == 16
        assert max(len(c.logprobs.tokens) for c in chunks if c.logprobs is not None) > 1
        with httpx.Client(base_url=srv.url, timeout=30) as http:
            metrics = http.get("/metrics").text
        accepted = [line for line in metrics.splitlines() if line.startswith("vllm:spec_decode_num_accepted_tokens_total")]
        assert accepted and float(accepted[0].split()[-1]) > 0, metrics
        assert engine.core.compilations_after_warmup == 0
    finally:
        srv.stop()
        engine.shutdown()


# ------------------------------------------------------------------------ tensor parallelism (fake devices)

def _child(target: str, tp: int, cache_dir: str) -> dict[str, Any]:
    import jax

    from jengine import LLM, SamplingParams

    llm = LLM(target, tensor_parallel_size=tp, speculative_config=_draft(target), compilation_cache_dir=cache_dir, **LIMITS)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:3]],
                        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    draft = llm.engine.speculator.draft
    leaves = jax.tree_util.tree_leaves(draft.params)
    return {"tokens": [list(o.outputs[0].token_ids) for o in outs], "compiles": llm.engine.compilations_after_warmup,
            "drafts": llm.engine.speculator.stats.num_draft_tokens, "accepted": llm.engine.speculator.stats.num_accepted_tokens,
            "cache_devices": len(jax.tree_util.tree_leaves(draft.kv_cache)[0].sharding.device_set),
            "sharded_cache": not jax.tree_util.tree_leaves(draft.kv_cache)[0].sharding.is_fully_replicated,
            "sharded_params": sum(not leaf.sharding.is_fully_replicated for leaf in leaves)}


def test_draft_model_under_tensor_parallelism(target: str, xla_cache_dir: str) -> None:
    """TP = 2 on fake CPU devices: the draft's weights and KV cache are split over the same mesh by the same
    rules, greedy tokens equal one device's without speculation, the drafts are accepted, nothing compiles
    after warm-up."""
    from jengine import LLM, SamplingParams

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.Popen([sys.executable, __file__, target, "2", xla_cache_dir], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    plain = LLM(target, compilation_cache_dir=xla_cache_dir, **LIMITS)
    want = [list(o.outputs[0].token_ids) for o in plain.generate(
        [{"prompt_token_ids": p} for p in PROMPTS[:3]], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)]
    out, _ = proc.communicate(timeout=600)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, out[-4000:]
    res = json.loads(lines[-1][len("RESULT "):])
    assert res["tokens"] == want
    assert res["compiles"] == 0 and res["drafts"] > 0 and res["accepted"] >= 0.9 * res["drafts"]
    assert res["cache_devices"] == 2 and res["sharded_cache"] and res["sharded_params"] > 0


if __name__ == "__main__":  # the tensor-parallel child: fake devices must be set before JAX starts
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, HERE)
    print("RESULT " + json.dumps(_child(sys.argv[1], int(sys.argv[2]), sys.argv[3])), flush=True)
