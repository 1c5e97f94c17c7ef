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
from test_models import TINY_CONFIG, check_parity, hf_greedy, hf_model
from tiny_models import PagedRunner, make_tiny_checkpoint


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_hf_parity(tmp_path, arch):
    path = make_tiny_checkpoint(tmp_path, arch)
    cfg = read_hf_config(path)
    assert (cfg.num_experts, cfg.num_experts_per_tok) == (8, 2)
    assert cfg.norm_topk_prob == (arch != "qwen2_moe")
    assert cfg.shared_expert_intermediate_size == (48 if arch == "qwen2_moe" else 0)
    check_parity(path)


@pytest.mark.parametrize("arch,fields,dense", [
    ("qwen3_moe", {"decoder_sparse_step": 2}, (0, 2)),  # dense/sparse alternate: one scan in units of 2
    ("qwen2_moe", {"mlp_only_layers": [0]}, (0,)),  # a lone dense layer, then a scan of 3 sparse ones
    ("qwen3_moe", {"decoder_sparse_step": 2, "mlp_only_layers": [3]}, (0, 2, 3)),  # dense only at the end
])
def test_qwen_moe_dense_layers_hf_parity(tmp_path, arch, fields, dense):
    """Qwen MoE layers HF builds dense (`mlp_only_layers`, `decoder_sparse_step`) load their
    `mlp.*_proj` weights and run a dense MLP of `intermediate_size`; the rest stay sparse."""
    path = make_tiny_checkpoint(tmp_path, arch, num_hidden_layers=4, intermediate_size=96, **fields)
    cfg = read_hf_config(path)
    assert cfg.dense_layers == dense and cfg.dense_intermediate_size == 96 and cfg.intermediate_size == 32
    shapes = load_model(path, load_format="dummy").model.layers.arrays()
    assert shapes["w_gate"].shape == (len(dense), 64, 96) and shapes["experts_gate"].shape == (4 - len(dense), 8, 64, 32)
    check_parity(path)


def test_dense_layers_through_the_engine_with_int8_weights(tmp_path, xla_cache_dir):
    """`LLM` with on-load int8 on a Qwen2-MoE with a dense first layer: its `[Ld, ...]` dense MLP and
    the shared expert quantized through the `linear` seam; tokens equal HF float32 with those
    projections quantize-dequantized (the experts and router stay float in both)."""
    import torch

    from jengine import LLM
    from jengine.quantization.weights import ChannelWeight
    from test_quantization import FAKE_QUANT, GREEDY, LIMITS, PROJECTIONS, PROMPTS

    path = make_tiny_checkpoint(tmp_path, "qwen2_moe", num_hidden_layers=3, mlp_only_layers=[0])
    hf = hf_model(path)
    with torch.no_grad():
        for name, w in hf.named_parameters():
            if name.split(".")[-2] in PROJECTIONS and w.ndim == 2:  # not the q/k/v biases
                w.copy_(FAKE_QUANT["int8"](w))
    llm = LLM(path, dtype="float32", quantization="int8", compilation_cache_dir=xla_cache_dir, **LIMITS)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == [hf_greedy(hf, p, GREEDY.max_tokens) for p in PROMPTS]
    layers = llm.engine.runner.params["layers"]
    dense, shared = layers["w_gate"].get_value(), layers["shared_w_gate"].get_value()
    assert isinstance(dense, ChannelWeight) and dense.q.shape == (1, 64, 128)
    assert isinstance(shared, ChannelWeight) and shared.q.shape == (2, 64, 48)
    assert llm.engine.compilations_after_warmup == 0


def test_layer_segments_of_dense_and_sparse_patterns():
    d, s = "dense", "sparse"
    assert nn.layer_segments([s] * 6) == [(0, 1, 6)]
    assert nn.layer_segments([d, s] * 3) == [(0, 2, 3)]
    assert nn.layer_segments([d] + [s] * 47) == [(0, 1, 1), (1, 1, 47)]
    assert nn.layer_segments([d, s, d, s, s, s]) == [(0, 2, 2), (4, 1, 2)]
    assert nn.layer_segments([d, s, s]) == [(0, 1, 1), (1, 1, 2)]


def test_scan_layer_kinds_indexes_each_stack_by_its_own_layers():
    """Every layer runs once, in order, and sees its row of the stacks it holds (and only those)."""
    kinds = ("d", "s", "d", "s", "s", "s", "d")
    dense = tuple(i for i, k in enumerate(kinds) if k == "d")
    sparse = tuple(i for i, k in enumerate(kinds) if k == "s")
    params = {"all": jnp.arange(7.0), "d": 100.0 + jnp.asarray(dense, jnp.float32), "s": 200.0 + jnp.asarray(sparse, jnp.float32)}
    seen = []

    def layer(kind, i, p, carry):
        seen.append(kind)
        assert set(p) == {"all", kind}
        mine = p[kind].stack[p[kind].layer] if kind == "s" else p[kind]
        n = carry[-1, 0].astype(jnp.int32)  # layers run so far
        return carry.at[n].set(jnp.stack([i * 1.0, p["all"], mine])).at[-1, 0].add(1)

    scan = jax.jit(lambda params: nn.scan_layer_kinds(layer, params, jnp.zeros((8, 3)), kinds, {"d": dense, "s": sparse}, whole=("s",)))
    out = np.asarray(scan(params))
    assert out[:7].tolist() == [[i, i, (100 if k == "d" else 200) + i] for i, k in enumerate(kinds)]
    assert len(seen) < len(kinds)  # the repeated units were traced once, not unrolled


def test_qwen_moe_dense_layers_under_tensor_and_expert_parallelism(tmp_path):
    """`LLM(tensor_parallel_size=2, enable_expert_parallel=True)` on 2 fake devices: the dense layers'
    MLP split column/row-wise, the experts split by expert; greedy tokens equal HF's."""
    from test_sharding import MAX_TOKENS, PROMPTS, _result, _spawn

    path = make_tiny_checkpoint(tmp_path, "qwen3_moe", num_hidden_layers=4, decoder_sparse_step=2)
    ep = _result(_spawn("llm_moe", 2, path, 2, "ep"))
    hf = hf_model(path)
    assert ep["tokens"] == [hf_greedy(hf, p, MAX_TOKENS) for p in PROMPTS]
    assert ep["compiles_after_warmup"] == 0 and ep["shard_map_experts"]
    specs = {name: [v for k, v in ep["specs"].items() if k.startswith(name + ".") or k == name]
             for name in ("layers.w_gate", "layers.w_down", "layers.experts_gate")}
    assert specs == {"layers.w_gate": ["(None, None, 'model')"], "layers.w_down": ["(None, 'model', None)"],
                     "layers.experts_gate": ["(None, 'model', None, None)"]}


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


@pytest.mark.parametrize("grouped,block_rows", [("ragged", 8), ("blocked", 1), ("blocked", 3), ("blocked", 9), ("blocked", 64),
                                                ("in_place", None)])
def test_grouped_expert_matmul_matches_per_token_reference(grouped, block_rows):
    """Skewed routing (a router that prefers two experts, so some groups are empty and some large),
    then every token on the same two experts (groups of 13: several blocks of 1, 3 or 9 rows, the
    last one of 8 or 9 rows for blocks of 9, see `block_sizes`)."""
    E, H, F, T = 8, 16, 12, 13
    rng = np.random.default_rng(0)
    p = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in
         [("router", (H, E)), ("experts_gate", (E, H, F)), ("experts_up", (E, H, F)), ("experts_down", (E, F, H))]}
    p["router"] = p["router"].at[:, 3].add(3.0).at[:, 6].add(2.0)
    h = jnp.asarray(rng.standard_normal((T, H)), jnp.float32)
    all_two = ({**p, "router": p["router"].at[0, 3].add(10.0).at[0, 6].add(8.0)}, h.at[:, 0].set(5.0))
    for (pc, hc), norm in [((p, h), True), ((p, h), False), (all_two, True)]:
        spec = nn.MoeSpec(E, 2, norm_topk_prob=norm, grouped=grouped, block_rows=block_rows)
        ours = jax.jit(lambda h, p: nn.moe_mlp(h, p, spec))(hc, pc)  # noqa: B023 (jitted and called at once; a default argument would become a traced input)
        np.testing.assert_allclose(ours, _reference_moe(np.asarray(hc), {k: np.asarray(v) for k, v in pc.items()}, spec),
                                   atol=2e-5, rtol=2e-5)
    assert sorted(np.bincount(np.asarray(nn.route(hc, pc["router"], spec)[1]).ravel(), minlength=E)) == [0] * 6 + [13, 13]


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
    assert [nn.default_block_rows(m, 8) for m in (2, 16, 128, 512, 4096, 10**6)] == [8, 8, 32, 128, 256, 256]
    assert nn.block_sizes(8) == (8,) and nn.block_sizes(3) == (3,)
    assert nn.block_sizes(128) == (16, 32, 48, 64, 80, 96, 112, 128) and nn.block_sizes(32) == (8, 16, 24, 32)


def test_router_renormalisation_rules():
    logits = jnp.asarray([[2.0, 1.0, 0.0, -1.0]])
    router = jnp.eye(4)
    w, e = nn.route(logits, router, nn.MoeSpec(4, 2, norm_topk_prob=False))
    probs = jax.nn.softmax(logits)[0]
    assert e.tolist() == [[0, 1]] and np.allclose(w[0], probs[:2])
    w, _ = nn.route(logits, router, nn.MoeSpec(4, 2, norm_topk_prob=True))
    assert np.allclose(w[0], probs[:2] / probs[:2].sum())


@pytest.mark.parametrize("arch,field,value", [
    ("Qwen3MoeForCausalLM", "decoder_sparse_step", 0),
    ("Qwen2MoeForCausalLM", "mlp_only_layers", "0"),
    ("Qwen2MoeForCausalLM", "use_sliding_window", True),
    ("MixtralForCausalLM", "num_experts_per_tok", 9),
])
def test_moe_unsupported_config_is_named(arch, field, value):
    with pytest.raises(NotImplementedError, match=field):
        ModelConfig.from_hf_config({**TINY_CONFIG, "architectures": [arch], field: value})
