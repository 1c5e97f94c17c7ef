"""Mixture-of-experts families against HF transformers in float32, and the grouped expert matmul
against a per-token reference (both implementations, with and without tokens for absent experts)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jengine.loader import load_model, read_hf_config
from jengine.models import ModelConfig
from jengine.models import layers as nn
from test_models import TINY_CONFIG, check_parity
from tiny_models import PagedRunner, make_tiny_checkpoint


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_hf_parity(tmp_path, arch):
    path = make_tiny_checkpoint(tmp_path, arch)
    cfg = read_hf_config(path)
    assert (cfg.num_experts, cfg.num_experts_per_tok) == (8, 2)
    assert cfg.norm_topk_prob == (arch != "qwen2_moe")
    assert cfg.shared_expert_intermediate_size == (48 if arch == "qwen2_moe" else 0)
    check_parity(path)


def test_moe_ragged_batch_matches_one_at_a_time(tmp_path):
    """Two sequences in one step route their tokens independently: same logits as each alone."""
    path = make_tiny_checkpoint(tmp_path, "qwen3_moe", tokenizer=False)
    model = load_model(path).model
    a, b = [5, 17, 42, 99, 3, 250, 77], [7, 300, 21, 4, 150]
    together = PagedRunner(model).step([(0, a), (1, b)])
    alone = [PagedRunner(model).step([(0, a)])[0], PagedRunner(model).step([(0, b)])[0]]
    for x, y in zip(together, alone):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)


def _reference_moe(h, p, spec):
    weights, experts = nn.route(h, p["router"], spec)
    out = np.zeros(h.shape, np.float32)
    for t in range(h.shape[0]):
        for j in range(spec.top_k):
            e = int(experts[t, j])
            g, u = h[t] @ p["experts_gate"][e], h[t] @ p["experts_up"][e]
            out[t] += float(weights[t, j]) * ((g * jax.nn.sigmoid(g) * u) @ p["experts_down"][e])
    return out


@pytest.mark.parametrize("grouped,block_rows", [("ragged", 8), ("blocked", 1), ("blocked", 3), ("blocked", 64)])
def test_grouped_expert_matmul_matches_per_token_reference(grouped, block_rows):
    """Skewed routing (a router that prefers two experts, so most groups are empty or large)."""
    E, H, F, T = 8, 16, 12, 13
    rng = np.random.default_rng(0)
    p = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in
         [("router", (H, E)), ("experts_gate", (E, H, F)), ("experts_up", (E, H, F)), ("experts_down", (E, F, H))]}
    p["router"] = p["router"].at[:, 3].add(3.0).at[:, 6].add(2.0)
    h = jnp.asarray(rng.standard_normal((T, H)), jnp.float32)
    for norm in (True, False):
        spec = nn.MoeSpec(E, 2, norm_topk_prob=norm, grouped=grouped, block_rows=block_rows)
        ours = jax.jit(lambda h, p: nn.moe_mlp(h, p, spec))(h, p)  # noqa: B023 (jitted and called at once; a default argument would become a traced input)
        np.testing.assert_allclose(ours, _reference_moe(np.asarray(h), {k: np.asarray(v) for k, v in p.items()}, spec),
                                   atol=2e-5, rtol=2e-5)


def test_padding_rows_go_to_no_expert_and_block_sizes():
    E, H, F, T = 4, 8, 6, 10
    rng = np.random.default_rng(1)
    p = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in
         [("router", (H, E)), ("experts_gate", (E, H, F)), ("experts_up", (E, H, F)), ("experts_down", (E, F, H))]}
    h = jnp.asarray(rng.standard_normal((T, H)), jnp.float32)
    spec = nn.MoeSpec(E, 2)
    full = nn.moe_mlp(h, p, spec)
    cut = jax.jit(lambda h, n: nn.moe_mlp(h, p, spec, num_tokens=n))(h, jnp.int32(7))
    np.testing.assert_allclose(cut[:7], full[:7], atol=1e-5)
    assert not np.any(np.asarray(cut[7:]))
    assert [nn.default_block_rows(m, 8) for m in (2, 16, 512, 4096, 10**6)] == [8, 8, 32, 256, 256]


def test_router_renormalisation_rules():
    logits = jnp.asarray([[2.0, 1.0, 0.0, -1.0]])
    router = jnp.eye(4)
    w, e = nn.route(logits, router, nn.MoeSpec(4, 2, norm_topk_prob=False))
    probs = jax.nn.softmax(logits)[0]
    assert e.tolist() == [[0, 1]] and np.allclose(w[0], probs[:2])
    w, _ = nn.route(logits, router, nn.MoeSpec(4, 2, norm_topk_prob=True))
    assert np.allclose(w[0], probs[:2] / probs[:2].sum())


@pytest.mark.parametrize("arch,field,value", [
    ("Qwen3MoeForCausalLM", "decoder_sparse_step", 2),
    ("Qwen2MoeForCausalLM", "mlp_only_layers", [0]),
    ("Qwen2MoeForCausalLM", "use_sliding_window", True),
    ("MixtralForCausalLM", "num_experts_per_tok", 9),
])
def test_moe_unsupported_config_is_named(arch, field, value):
    with pytest.raises(NotImplementedError, match=field):
        ModelConfig.from_hf_config({**TINY_CONFIG, "architectures": [arch], field: value})
