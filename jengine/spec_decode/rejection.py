"""Rejection sampling of draft tokens against the target model's distributions, on the device.

Per row with n drafts d_0..d_{n-1} (drafted from distributions q_i; a point mass for n-gram drafts) and
the target's processed distributions p_0..p_n at those positions (p_n is the "bonus" position after the
last draft): draft i is accepted with probability min(1, p_i(d_i) / q_i(d_i)), in order, until the first
rejection at j; the row then emits d_0..d_{j-1} plus one token drawn from max(p_j - q_j, 0) normalised
(or from p_n when every draft was accepted). Each emitted token then has exactly the target's
distribution. Greedy rows (p one-hot at the argmax) accept exactly the drafts that equal the target's
argmax and emit the argmax where they stop, so greedy output equals decoding without speculation.

Shapes are fixed: S rows, K draft slots, V tokens; rows with fewer drafts pad theirs and say how many
they have in `num_draft`.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jengine.sampler import _inverse_cdf


def rejection_sample(
    target_probs: jax.Array,
    draft_token_ids: jax.Array,
    num_draft: jax.Array,
    uniforms: jax.Array,
    draft_probs: Optional[jax.Array] = None,
) -> tuple[jax.Array, jax.Array]:
    """Verifies drafts; returns (tokens i32[S, K + 1], num_tokens i32[S]) where row r emits tokens[r, :num_tokens[r]].

    target_probs: f32[S, K + 1, V], the target's distribution at each draft position and the bonus one.
    draft_token_ids: i32[S, K]; num_draft: i32[S] in [0, K].
    uniforms: f32[S, K + 1] in (0, 1]: K acceptance tests, then one for the emitted token of the row's own.
    draft_probs: f32[S, K, V] when drafts were sampled from a draft model; None for point-mass drafts.
    """
    S, K1, V = target_probs.shape
    K = K1 - 1
    drafts = jnp.clip(draft_token_ids, 0, V - 1)
    p_draft = jnp.take_along_axis(target_probs[:, :K], drafts[..., None], axis=-1)[..., 0]  # [S, K]
    q_draft = jnp.ones_like(p_draft) if draft_probs is None else jnp.take_along_axis(draft_probs, drafts[..., None], axis=-1)[..., 0]
    # Accept when u <= p / q, i.e. u * q <= p: probability min(1, p / q) for u uniform in (0, 1]; a draft the
    # target cannot produce (p = 0) is never accepted, and a greedy row's argmax (p = 1) always is.
    accepted = (uniforms[:, :K] * q_draft <= p_draft) & (jnp.arange(K)[None, :] < num_draft[:, None])
    num_accepted = jnp.argmin(jnp.concatenate([accepted, jnp.zeros((S, 1), bool)], axis=1), axis=1).astype(jnp.int32)

    p_stop = jnp.take_along_axis(target_probs, num_accepted[:, None, None], axis=1)[:, 0]  # [S, V]
    if draft_probs is None:
        q_stop = jax.nn.one_hot(jnp.take_along_axis(drafts, jnp.minimum(num_accepted, K - 1)[:, None], 1)[:, 0], V, dtype=p_stop.dtype)
    else:
        q_stop = jnp.take_along_axis(draft_probs, jnp.minimum(num_accepted, K - 1)[:, None, None], axis=1)[:, 0]
    rejected = (num_accepted < num_draft)[:, None]
    residual = jnp.maximum(p_stop - q_stop, 0.0)
    # Rounding can leave no residual mass where p and q (nearly) coincide; the target itself is right then.
    residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p_stop)
    final = _inverse_cdf(jnp.where(rejected, residual, p_stop), uniforms[:, K])

    tokens = jnp.where(jnp.arange(K1)[None, :] < num_accepted[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), 0)
    tokens = tokens.at[jnp.arange(S), num_accepted].set(final)
    return tokens.astype(jnp.int32), num_accepted + 1
