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
