"""Speculative decoding building blocks: the n-gram proposer and the rejection sampler.

The rejection sampler is checked statistically on a fixed-logit "model" (the target's distribution p is
the same at every position, so the emitted tokens must be i.i.d. draws from p whatever the drafts were):
a chi-square goodness-of-fit test per output position, with fixed seeds, for drafts sampled from a draft
distribution q and for point-mass (n-gram style) drafts, with p holding zeros as top-k/top-p leave them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jengine.spec_decode import NgramProposer, rejection_sample


def test_ngram_proposes_what_followed_the_latest_match():
    prop = NgramProposer(k=3, prompt_lookup_min=1, prompt_lookup_max=3)
    #             the suffix [7, 8] occurred twice before; the latest occurrence was followed by 4, 5, 6
    history = [7, 8, 1, 2, 9, 7, 8, 4, 5, 6, 3, 7, 8]
    assert prop.propose(history) == [4, 5, 6]
    assert prop.propose([1, 2, 3, 4]) == []  # nothing repeats
    assert prop.propose([5, 6, 9, 5, 6]) == [9, 5, 6]  # a match may run into the suffix itself
    assert NgramProposer(k=5).propose([1, 2, 3, 1, 2]) == [3, 1, 2]  # fewer than k left
    # the longest n wins: with n = 2 the suffix [3, 4] follows 0; with n = 1 the latest 4 is followed by 9
    assert NgramProposer(k=1, prompt_lookup_min=1, prompt_lookup_max=2).propose([3, 4, 0, 4, 9, 3, 4]) == [0]
    assert NgramProposer(k=1, prompt_lookup_min=1, prompt_lookup_max=1).propose([3, 4, 0, 4, 9, 3, 4]) == [9]
    assert NgramProposer(k=2, prompt_lookup_min=3, prompt_lookup_max=3).propose([1, 2, 3, 4, 2, 3]) == []


@pytest.mark.parametrize("kwargs", [{"k": 0}, {"k": 2, "prompt_lookup_min": 0}, {"k": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2}])
def test_ngram_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        NgramProposer(**kwargs)


def _uniforms(key, shape):
    return 1.0 - jax.random.uniform(key, shape, jnp.float32)  # (0, 1], as the sampler draws them


def test_greedy_rows_keep_drafts_equal_to_the_argmax():
    V, K = 10, 4
    argmax = np.array([[3, 1, 4, 1, 5], [2, 7, 1, 8, 2], [9, 9, 9, 9, 9]])
    probs = jax.nn.one_hot(argmax, V)
    drafts = jnp.array([[3, 1, 0, 1], [2, 7, 1, 8], [9, 9, 9, 9]])
    tokens, num = rejection_sample(probs, drafts, jnp.array([4, 4, 2]), _uniforms(jax.random.key(0), (3, K + 1)))
    tokens, num = np.asarray(tokens), np.asarray(num)
    assert num.tolist() == [3, 5, 3]  # stop at the first mismatch, all four plus the bonus, both drafts plus one
    assert tokens[0, :3].tolist() == [3, 1, 4] and tokens[1].tolist() == [2, 7, 1, 8, 2] and tokens[2, :3].tolist() == [9, 9, 9]


def _emitted_by_position(tokens, num, K):
    return [tokens[num > i, i] for i in range(K + 1)]


@pytest.mark.parametrize("draft_kind", ["sampled", "point_mass"])
def test_rejection_sampling_keeps_the_target_distribution(draft_kind):
    rng = np.random.default_rng(0)
    V, K, S = 6, 3, 60000
    p = rng.dirichlet(np.ones(V))
    p[4] = 0.0  # a token the target cannot produce (top-k / top-p leave zeros like this)
    p /= p.sum()
    q = rng.dirichlet(np.ones(V))
    target = jnp.broadcast_to(jnp.asarray(p, jnp.float32), (S, K + 1, V))
    if draft_kind == "sampled":
        drafts = rng.choice(V, size=(S, K), p=q)
        draft_probs = jnp.broadcast_to(jnp.asarray(q, jnp.float32), (S, K, V))
    else:  # deterministic drafts: each row always drafts the same tokens, some of them impossible
        drafts = np.tile(np.array([[0, 4, 2]]), (S, 1))
        drafts[::2] = [1, 1, 5]
        draft_probs = None
    num_draft = rng.integers(0, K + 1, size=S)
    tokens, num = rejection_sample(target, jnp.asarray(drafts, jnp.int32), jnp.asarray(num_draft, jnp.int32),
                                   _uniforms(jax.random.key(1), (S, K + 1)), draft_probs)
    tokens, num = np.asarray(tokens), np.asarray(num)
    assert ((num >= 1) & (num <= num_draft + 1)).all()
    for pos, emitted in enumerate(_emitted_by_position(tokens, num, K)):
        counts = np.bincount(emitted, minlength=V)
        assert counts[4] == 0, "a token of probability 0 was emitted"
        keep = p > 0
        chi = stats.chisquare(counts[keep], f_exp=p[keep] * len(emitted))
        assert chi.pvalue > 1e-3, (pos, counts, p * len(emitted))
    if draft_kind == "sampled":  # acceptance rate of one draft: sum_x min(p(x), q(x))
        first = num_draft > 0
        accepted = (num[first] > 1).mean()
        assert abs(accepted - np.minimum(p, q).sum()) < 0.01


# ---------------------------------------------------------------------------------- scheduler and KV pages


def _sched(num_pages=32, page_size=4, **kw):
    from jengine.core.kv_cache_manager import KVCacheManager
    from jengine.core.scheduler import Scheduler

    kv = KVCacheManager(num_pages, page_size, enable_prefix_caching=True)
    return Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=kw.pop("budget", 64), max_model_len=kw.pop("max_model_len", 64)), kv


def _decoding(sched, prompt, **params):
    from jengine.request import Request
    from jengine.sampling_params import SamplingParams

    params.setdefault("max_tokens", 32)
    r = Request("a", prompt, SamplingParams(temperature=0.0, **params), eos_token_ids=(1,))
    sched.add_request(r)
    out = sched.schedule()
    sched.update_from_output(out, [[50]])  # the prompt's step samples one token
    return r


def test_rejected_drafts_roll_back_their_kv_pages():
    sched, kv = _sched()
    r = _decoding(sched, list(range(10, 17)))  # 7 prompt tokens + 1 output: 8 tokens, 7 computed
    free_before = kv.num_free_pages
    r.spec_token_ids = [60, 61, 62, 63, 64, 65]
    out = sched.schedule()
    (row,) = out.scheduled
    assert row.num_new_tokens == 7 and row.spec_token_ids == [60, 61, 62, 63, 64, 65] and row.samples
    assert len(row.block_ids) == 4 and kv.num_free_pages == free_before - 2  # KV for positions 7..13
    sched.update_from_output(out, [[60, 61, 99]])  # two drafts accepted, then the target's own token
    assert r.output_token_ids == [50, 60, 61, 99]
    assert r.num_computed_tokens == 10  # the last known token and the two accepted drafts
    assert len(kv.get_block_table("a")) == 3 and kv.num_free_pages == free_before - 1  # the rejected page went back
    assert not any(kv.is_cached(p) for p in kv.get_block_table("a")[2:])  # the page with a rejected draft is not shared
    # the next step recomputes from the first unconfirmed position
    out = sched.schedule()
    assert (out.scheduled[0].start, out.scheduled[0].num_new_tokens) == (10, 1)


def test_drafts_never_outrun_max_tokens_or_the_model_length():
    sched, _ = _sched(max_model_len=12)
    r = _decoding(sched, list(range(10, 17)), max_tokens=3)  # one output so far, two more allowed
    r.spec_token_ids = [60, 61, 62, 63]
    (row,) = sched.schedule().scheduled
    assert row.spec_token_ids == [60]  # one draft plus the token of its own: the last two outputs
    sched2, _ = _sched(max_model_len=10)
    r2 = _decoding(sched2, list(range(10, 17)))  # 8 tokens; 10 at most
    r2.spec_token_ids = [60, 61, 62]
    (row,) = sched2.schedule().scheduled
    assert row.spec_token_ids == [60]


def test_a_stop_inside_an_accepted_run_ends_the_output_there():
    sched, kv = _sched()
    r = _decoding(sched, list(range(10, 17)))
    r.spec_token_ids = [60, 1, 62]
    out = sched.schedule()
    finished = sched.update_from_output(out, [[60, 1, 62, 70]])  # EOS (1) accepted in the middle
    assert finished == [r] and r.output_token_ids == [50, 60, 1] and r.finish_reason == "stop"
    assert "a" not in kv.request_ids() and kv.num_free_pages == kv.num_usable_pages  # released, nothing leaked


# ---------------------------------------------------------------------------------------------- engine

SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
ENGINE_LIMITS = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "llama")


def test_output_is_identical_with_ngram_speculation(tiny_llama, xla_cache_dir):
    """Greedy and seeded sampled tokens with speculation equal those without, with chunked prefill (budget
    32 < prompt 40), prefix caching (prompts share a prefix), n > 1, min_tokens, top-k/top-p and a request
    with a penalty that runs unspeculated in the same batch; drafts are proposed and accepted for greedy
    and for sampled requests; no page leaks; nothing compiles after warm-up."""
    from jengine import LLM, SamplingParams

    loop = [11, 12, 13, 14, 15, 16, 17, 18]
    prompts = [loop * 5, loop * 4 + [30, 31], [40, 41, 42] * 3, loop * 4 + [32], loop * 3]
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    params = [greedy, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, n=2),
              SamplingParams(temperature=0.8, seed=7, max_tokens=16, ignore_eos=True, n=2),
              SamplingParams(temperature=0.3, top_k=5, top_p=0.9, seed=3, min_tokens=12, max_tokens=20),
              SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, repetition_penalty=1.3)]
    results = {}
    for spec in (None, SPEC):
        llm = LLM(tiny_llama, compilation_cache_dir=xla_cache_dir, speculative_config=spec, **ENGINE_LIMITS)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        results[spec is not None] = [[o.token_ids for o in out.outputs] for out in outs]
        assert llm.engine.compilations_after_warmup == 0
        if spec is not None:
            stats = llm.engine.speculator.stats
            assert stats.num_drafts > 0 and stats.num_accepted_tokens > 0, stats
            assert llm.engine.kv_cache_manager.num_free_pages == llm.engine.kv_cache_manager.num_usable_pages
            sampled_only = llm.engine.speculator.stats.__class__()
            llm.engine.speculator.stats = sampled_only
            llm.generate([{"prompt_token_ids": loop * 5}], params[2], use_tqdm=False)
            assert sampled_only.num_drafts > 0, "a sampled request must be speculated too"
    assert results[True] == results[False]


def test_stop_string_inside_an_accepted_run(tiny_llama, xla_cache_dir):
    """A stop string completed by a token in the middle of an accepted run ends the text and tokens there."""
    from jengine import LLM, SamplingParams

    loop = [11, 12, 13, 14, 15, 16, 17, 18]
    plain = LLM(tiny_llama, compilation_cache_dir=xla_cache_dir, **ENGINE_LIMITS)
    (ref,) = plain.generate([{"prompt_token_ids": loop * 5}], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    text = ref.outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), "the tiny model's text must have something to stop on"
    outs = {}
    for spec in (None, SPEC):
        llm = plain if spec is None else LLM(tiny_llama, compilation_cache_dir=xla_cache_dir, speculative_config=spec, **ENGINE_LIMITS)
        (out,) = llm.generate([{"prompt_token_ids": loop * 5}], SamplingParams(temperature=0.0, max_tokens=24, stop=[stop]), use_tqdm=False)
        outs[spec is None] = (out.outputs[0].text, out.outputs[0].token_ids, out.outputs[0].finish_reason)
    assert outs[True] == outs[False] and outs[True][2] == "stop"


@pytest.mark.parametrize("bad, field", [
    ({"method": "eagle", "num_speculative_tokens": 2}, "speculative_config.method"),
    ({"method": "ngram"}, "speculative_config.num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "speculative_config.num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5, "prompt_lookup_max": 2}, "speculative_config.prompt_lookup_min"),
    ({"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 1}, "speculative_config"),
])
def test_bad_speculative_config_is_named(bad, field):
    from jengine.config import EngineArgs

    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        EngineArgs(speculative_config=bad).create_engine_config()


def test_spec_decode_counters_use_vllm_names():
    """The engine's speculation counters reach /metrics as vLLM's three counters, only when speculation is on."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, generate_latest

    from jengine.engine.async_engine import EngineStats
    from jengine.server.metrics import _SnapshotCollector

    def scrape(stats: EngineStats) -> str:
        registry = CollectorRegistry()
        registry.register(_SnapshotCollector(SimpleNamespace(stats=lambda: stats, healthy=True), "m"))
        return generate_latest(registry).decode()

    text = scrape(EngineStats(spec_decode=(3, 9, 5)))
    for name, value in (("num_drafts", 3), ("num_draft_tokens", 9), ("num_accepted_tokens", 5)):
        assert f'vllm:spec_decode_{name}_total{{engine="0",model_name="m"}} {float(value)}' in text, name
    assert "spec_decode" not in scrape(EngineStats())


def test_each_draft_position_samples_as_that_output_index():
    """Position i of a verifying row is sampled as the request's output index n + i would be: same random
    stream (step), and min_tokens still banning EOS exactly while n + i < min_tokens."""
    from types import SimpleNamespace

    from jengine.sampler import RowState, build_sampling_tensors
    from jengine.sampling_params import SamplingParams
    from jengine.spec_decode.speculator import Speculator

    row = RowState(params=SamplingParams(temperature=0.7, seed=5, min_tokens=6), prompt_token_ids=[3, 4],
                   output_token_ids=[9, 9, 9, 9], seed=5, eos_token_ids=(1,))
    seqs = [SimpleNamespace(spec_token_ids=[7, 8, 9]), SimpleNamespace(spec_token_ids=[])]
    rows = Speculator.expand(seqs, [row, row])
    assert [len(r.output_token_ids) for r in rows] == [4, 5, 6, 7, 4]
    assert rows[2].output_token_ids == [9, 9, 9, 9, 7, 8]
    t = build_sampling_tensors(rows, 8, vocab_size=32)
    assert np.asarray(t.step)[:5].tolist() == [4, 5, 6, 7, 4]
    banned = np.asarray(t.banned_token_ids)
    assert [1 in banned[i] for i in range(5)] == [True, True, False, False, True]  # min_tokens = 6


def test_penalties_and_logprobs_are_speculated_with_identical_results(tiny_llama, xla_cache_dir):
    """Requests with presence / frequency / repetition penalties and with logprobs now verify drafts: their
    tokens (greedy and seeded), logprobs and top logprobs equal the run without speculation, including a
    stop string that cuts an accepted run (its logprobs end with the kept tokens)."""
    from jengine import LLM, SamplingParams

    import random

    loop = [11, 12, 13, 14, 15, 16, 17, 18]
    # 220 distinct ids: most tokens the random model writes occur in the prompt, so the n-gram proposer
    # drafts for every request (and the drafts of penalised rows get rejected, the case to get right).
    perm = list(range(2, 320))
    random.Random(0).shuffle(perm)
    perm = perm[:220]
    prompts = [perm, perm[::-1], loop * 5, perm[5:] + perm[:5]]
    params = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, repetition_penalty=1.3, logprobs=2),
              SamplingParams(temperature=0.9, seed=5, max_tokens=20, ignore_eos=True, presence_penalty=0.4, frequency_penalty=0.3, n=2),
              SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=0.7, seed=9, max_tokens=20, ignore_eos=True, logprobs=1, frequency_penalty=0.5)]
    results = {}
    for spec in (None, SPEC):
        llm = LLM(tiny_llama, compilation_cache_dir=xla_cache_dir, speculative_config=spec,
                  **{**ENGINE_LIMITS, "max_model_len": 256, "max_num_batched_tokens": 64})
        drafted: set[str] = set()
        if spec is not None:
            record = llm.engine.speculator._record
            llm.engine.speculator._record = lambda req, n, k, record=record, drafted=drafted: (drafted.add(req.request_id), record(req, n, k))
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        results[spec is not None] = outs
        assert llm.engine.compilations_after_warmup == 0
        if spec is not None:
            stats = llm.engine.speculator.stats
            assert stats.num_accepted_tokens > 0, stats
            assert {r.split("_")[0] for r in drafted} == {"0", "1", "2", "3"}  # every request verified drafts
            assert llm.engine.kv_cache_manager.num_free_pages == llm.engine.kv_cache_manager.num_usable_pages
    for plain, spec_out in zip(results[False], results[True]):
        for a, b in zip(plain.outputs, spec_out.outputs):
            assert list(a.token_ids) == list(b.token_ids)
            if a.logprobs is None:
                assert b.logprobs is None
                continue
            assert len(b.logprobs) == len(b.token_ids)
            for la, lb in zip(a.logprobs, b.logprobs):
                assert la.keys() == lb.keys()
                for t in la:
                    assert lb[t].logprob == pytest.approx(la[t].logprob, abs=1e-4) and lb[t].rank == la[t].rank
            assert b.cumulative_logprob == pytest.approx(a.cumulative_logprob, abs=1e-3)
