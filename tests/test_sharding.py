"""Tensor parallelism and multi-process serving on fake CPU devices (`jengine.sharding`).

Every check runs in a fresh subprocess (this file run as a script), because the fake-device count
(`--xla_force_host_platform_device_count`) must be set before JAX starts and the rest of the test
session runs with one device. The child prints one `RESULT <json>` line.

Runner-level cases drive `ModelRunner` directly with hand-built scheduled rows (no scheduler), so the
sharding layer is tested on its own; the `LLM` cases check the engine's integration of it.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = [[5, 6, 7, 8, 9], [12, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49]]
MAX_TOKENS = 8
CHILD_TIMEOUT_S = 420


# ----------------------------------------------------------------------------------------------
# child side
# ----------------------------------------------------------------------------------------------
def _engine_config(model: str, tp: int, **parallel: Any) -> Any:
    from jengine.config import EngineArgs

    return EngineArgs(
        model=model, dtype="float32", tensor_parallel_size=tp, max_num_seqs=2, max_num_batched_tokens=32,
        max_model_len=64, num_gpu_blocks_override=12, compilation_cache_dir="", **parallel,
    ).create_engine_config()


def _build_runner(config: Any) -> tuple[Any, Any]:
    """Loads the model through the plan's `place`, builds the runner with pinned step shardings."""
    from jengine import sharding
    from jengine.loader import load_model
    from jengine.worker.model_runner import ModelRunner

    plan = sharding.plan_for_engine(config)
    loaded = load_model(config.model, dtype=config.dtype, load_format=config.load_format, place=None if plan is None else plan.place)
    runner = ModelRunner(config, loaded, config.scheduler.max_model_len, plan=plan)  # pins its step shardings
    runner.warmup()
    return runner, plan


def _greedy(execute: Any, page_size: int, max_pages: int) -> list[list[int]]:
    """Greedy decoding of PROMPTS as one batch: a prefill step, then one decode step per token."""
    from jengine.sampler import RowState
    from jengine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    reqs = [SimpleNamespace(request_id=f"r{i}", prompt_token_ids=p, output_token_ids=[], sampling_params=params, lora_request=None)
            for i, p in enumerate(PROMPTS)]
    pages = [list(range(1 + i * max_pages, 1 + (i + 1) * max_pages)) for i in range(len(reqs))]
    computed = [0] * len(reqs)
    for _ in range(MAX_TOKENS):
        rows = []
        for i, r in enumerate(reqs):
            total = len(r.prompt_token_ids) + len(r.output_token_ids)
            rows.append(SimpleNamespace(request=r, start=computed[i], num_new_tokens=total - computed[i], block_ids=pages[i]))
        states = [RowState(params, r.prompt_token_ids, r.output_token_ids, seed=0) for r in reqs]
        out = execute(rows, states, sum(s.num_new_tokens for s in rows))
        for i, r in enumerate(reqs):
            computed[i] += rows[i].num_new_tokens
            r.output_token_ids.append(int(out.token_ids[i]))
    return [r.output_token_ids for r in reqs]


def _specs(runner: Any) -> dict[str, Any]:
    import jax

    specs = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(runner.params):
        name = ".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        specs[name] = str(tuple(leaf.sharding.spec)) if hasattr(leaf.sharding, "spec") else "single"
    cache = jax.tree_util.tree_leaves(runner.kv_cache)[0]
    specs["kv_cache"] = str(tuple(cache.sharding.spec)) if hasattr(cache.sharding, "spec") else "single"
    return specs


def _child_runner(model: str, tp: int) -> dict[str, Any]:
    from jengine import sharding

    runner, plan = _build_runner(_engine_config(model, tp))
    tokens = _greedy(runner.execute, runner.page_size, runner.max_pages_per_seq)
    report = sharding.memory_report(runner.params, runner.kv_cache)
    return {
        "tokens": tokens, "specs": _specs(runner), "compiles_after_warmup": runner.compilations_after_warmup,
        "devices_with_weights": sum(1 for v in report.values() if v["weights"] > 0), "memory": report,
    }


def _child_distributed(model: str, coordinator: str, num_processes: int, process_id: int) -> dict[str, Any]:
    import jax

    from jengine.sharding import distributed

    parallel = dict(distributed_coordinator=coordinator, num_processes=num_processes, process_id=process_id)
    config = _engine_config(model, 1, **parallel)
    distributed.initialize(config.parallel, heartbeat_timeout_s=10)
    config = _engine_config(model, jax.device_count(), **parallel)  # the model axis spans every process
    runner, _ = _build_runner(config)
    if process_id != 0:
        steps = distributed.run_worker(runner, idle_timeout_s=120)
        return {"worker_steps": steps, "compiles_after_warmup": runner.compilations_after_warmup}
    leader = distributed.LeaderRunner(runner, peer_timeout_s=30, step_timeout_s=120)
    tokens = _greedy(leader.execute, runner.page_size, runner.max_pages_per_seq)
    leader.shutdown()
    return {"tokens": tokens, "specs": _specs(runner), "compiles_after_warmup": runner.compilations_after_warmup,
            "global_devices": jax.device_count()}


def _child_dead_worker(model: str, coordinator: str, process_id: int, after_steps: int = 0) -> dict[str, Any]:
    """Worker exits right after warm-up (or in the middle of generation, after `after_steps` steps);
    the leader must raise WorkerFailedError naming it, report, and exit 3 (as `jengine serve` does)."""
    import jax

    from jengine.sharding import distributed

    parallel = dict(distributed_coordinator=coordinator, num_processes=2, process_id=process_id)
    distributed.initialize(_engine_config(model, 1, **parallel).parallel)
    runner, _ = _build_runner(_engine_config(model, jax.device_count(), **parallel))
    if process_id != 0:
        if after_steps:
            real_run_step, done = distributed.run_step, []

            def dying_run_step(*args: Any) -> Any:
                if len(done) == after_steps:
                    os._exit(0)  # dies mid-generation without telling anyone
                done.append(1)
                return real_run_step(*args)

            distributed.run_step = dying_run_step
            distributed.run_worker(runner, idle_timeout_s=120)
        os._exit(0)  # dies without telling anyone
    leader = distributed.LeaderRunner(runner, peer_timeout_s=10, step_timeout_s=40, ready_timeout_s=5)
    try:
        _greedy(leader.execute, runner.page_size, runner.max_pages_per_seq)
    except distributed.WorkerFailedError as exc:
        print("RESULT " + json.dumps({"error": str(exc)}), flush=True)
        distributed.exit_after_peer_failure()
    return {"error": None}


def _child_llm(model: str, tp: int, backend: str = "reference", kv_cache_dtype: str = "auto") -> dict[str, Any]:
    from jengine import LLM, SamplingParams

    llm = LLM(model=model, dtype="float32", tensor_parallel_size=tp, max_num_seqs=2, max_num_batched_tokens=32,
              max_model_len=64, num_gpu_blocks_override=12, compilation_cache_dir="", attention_backend=backend,
              kv_cache_dtype=kv_cache_dtype)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True), use_tqdm=False)
    return {"tokens": [list(o.outputs[0].token_ids) for o in outs], "specs": _specs(llm.engine.runner),
            "compiles_after_warmup": llm.engine.compilations_after_warmup, "kv_dtype": str(llm.engine.runner.cache_dtype)}


SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
SPEC_LIMITS = dict(dtype="float32", max_num_seqs=2, max_num_batched_tokens=32, max_model_len=64, num_gpu_blocks_override=24)


def _child_llm_spec(model: str, tp: int, prompts: str) -> dict[str, Any]:
    """`LLM` with n-gram speculative decoding under tensor parallelism."""
    from jengine import LLM, SamplingParams

    llm = LLM(model=model, tensor_parallel_size=tp, speculative_config=SPEC, compilation_cache_dir="", **SPEC_LIMITS)
    outs = llm.generate([{"prompt_token_ids": p} for p in json.loads(prompts)],
                        SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True), use_tqdm=False)
    stats = llm.engine.speculator.stats
    return {"tokens": [list(o.outputs[0].token_ids) for o in outs], "draft_tokens": stats.num_draft_tokens,
            "compiles_after_warmup": llm.engine.compilations_after_warmup}


def _child_llm_moe(model: str, tp: int, expert_parallel: str) -> dict[str, Any]:
    """`LLM` on a MoE model; also the bytes of expert weights each device holds."""
    import jax
    from flax import nnx

    from jengine import LLM, SamplingParams, sharding

    llm = LLM(model=model, dtype="float32", tensor_parallel_size=tp, enable_expert_parallel=expert_parallel == "ep",
              max_num_seqs=2, max_num_batched_tokens=32, max_model_len=64, num_gpu_blocks_override=12, compilation_cache_dir="")
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True), use_tqdm=False)
    expert_bytes: dict[str, int] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(llm.engine.runner.params):
        if "experts_" in jax.tree_util.keystr(path):
            for shard in leaf.addressable_shards:
                expert_bytes[str(shard.device)] = expert_bytes.get(str(shard.device), 0) + shard.data.nbytes
    return {"tokens": [list(o.outputs[0].token_ids) for o in outs], "specs": _specs(llm.engine.runner),
            "compiles_after_warmup": llm.engine.compilations_after_warmup, "expert_bytes": expert_bytes,
            "memory": sharding.memory_report(llm.engine.runner.params, llm.engine.runner.kv_cache),
            "shard_map_experts": nnx.merge(llm.engine.runner.graphdef, llm.engine.runner.params).expert_mesh is not None}


def _child_main(argv: list[str]) -> None:
    case, devices, args = argv[0], int(argv[1]), argv[2:]
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, HERE)
    if case == "runner":
        result = _child_runner(args[0], int(args[1]))
    elif case == "llm":
        result = _child_llm(args[0], int(args[1]), *args[2:])  # [backend [kv_cache_dtype]]
    elif case == "llm_spec":
        result = _child_llm_spec(args[0], int(args[1]), args[2])
    elif case == "llm_moe":
        result = _child_llm_moe(args[0], int(args[1]), args[2])
    elif case == "distributed":
        result = _child_distributed(args[0], args[1], int(args[2]), int(args[3]))
    elif case == "dead_worker":
        result = _child_dead_worker(args[0], args[1], int(args[2]), int(args[3]))
    elif case == "plan":
        from jengine import sharding

        result = {"error": None}
        try:
            sharding.plan_for_engine(_engine_config(args[0], int(args[1])))
        except ValueError as exc:
            result["error"] = str(exc)
    else:
        raise SystemExit(f"unknown case {case}")
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------
# parent side
# ----------------------------------------------------------------------------------------------
def _spawn(*args: Any) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, __file__, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _result(proc: subprocess.Popen, timeout: float = CHILD_TIMEOUT_S) -> dict[str, Any]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"child timed out after {timeout} s:\n{out[-4000:]}") from exc
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"child failed (rc {proc.returncode}):\n{out[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def _run(*args: Any) -> dict[str, Any]:
    return _result(_spawn(*args))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    """2 layers, 8 query / 2 KV heads (head_dim 8), FFN 128, vocab 320."""
    from tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tp"), arch="llama", num_attention_heads=8, num_key_value_heads=2)


@pytest.fixture(scope="module")
def tp1_tokens(tiny_llama: str) -> list[list[int]]:
    res = _run("runner", 1, tiny_llama, 1)
    assert res["specs"]["kv_cache"] == "single"
    return res["tokens"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


COL, ROW, VOCAB, REP = "(None, None, 'model')", "(None, 'model', None)", "('model', None)", "()"


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_tensor_parallel_matches_tp1(tiny_llama: str, tp1_tokens: list[list[int]], tp: int) -> None:
    res = _run("runner", 8, tiny_llama, tp)
    assert res["tokens"] == tp1_tokens
    specs = res["specs"]
    kv = COL if tp == 2 else REP  # 2 KV heads: split at TP 2, replicated at TP 4 and 8
    expected = {
        "layers.wq": COL, "layers.w_gate": COL, "layers.w_up": COL, "layers.wk": kv, "layers.wv": kv,
        "layers.wo": ROW, "layers.w_down": ROW, "embed": VOCAB, "lm_head": VOCAB,
        "layers.attn_norm": REP, "layers.mlp_norm": REP, "final_norm": REP,
        "kv_cache": "(None, 'model', None, None, None)" if tp == 2 else REP,
    }
    got = {k: v for k, v in specs.items() if any(k == e or k.startswith(e + ".") for e in expected)}
    for name, spec in expected.items():
        matches = [v for k, v in got.items() if k == name or k.startswith(name + ".")]
        assert matches == [spec], f"{name}: {matches} != {spec}"
    assert res["compiles_after_warmup"] == 0
    assert res["devices_with_weights"] == tp
    # Column/row-parallel weights are split: each device holds less than the whole model.
    per_device = [v["weights"] for v in res["memory"].values() if v["weights"]]
    assert max(per_device) < sum(per_device) / tp * 1.5 or tp == 1


def test_smollm2_tp3_matches_tp1() -> None:
    from jengine.loader import default_model_path

    try:
        path = default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    one, three = _spawn("runner", 1, path, 1), _spawn("runner", 8, path, 3)
    one, three = _result(one), _result(three)
    assert three["tokens"] == one["tokens"]
    assert three["specs"]["kv_cache"] == "(None, 'model', None, None, None)"  # 3 KV heads over 3 devices
    assert three["compiles_after_warmup"] == 0


def test_indivisible_head_count_fails_with_valid_sizes() -> None:
    from jengine.loader import default_model_path

    try:
        path = default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    res = _run("plan", 8, path, 2)
    assert res["error"] is not None and "tensor_parallel_size=2" in res["error"] and "sizes that work: 1, 3" in res["error"]


def test_two_processes_match_one(tiny_llama: str, tp1_tokens: list[list[int]]) -> None:
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [_spawn("distributed", 2, tiny_llama, coordinator, 2, pid) for pid in (0, 1)]
    leader, worker = (_result(p) for p in procs)
    assert leader["global_devices"] == 4
    assert leader["tokens"] == tp1_tokens
    assert worker["worker_steps"] == MAX_TOKENS
    assert leader["compiles_after_warmup"] == 0 and worker["compiles_after_warmup"] == 0


@pytest.mark.parametrize("after_steps", [0, 2], ids=["before-first-step", "mid-generation"])
def test_dead_worker_fails_the_leader(tiny_llama: str, after_steps: int) -> None:
    """One outcome whichever way the worker dies: the leader raises WorkerFailedError naming worker 1
    (a missing ready ack, or a step whose collective failed and that the worker never acknowledged),
    reports it and exits 3, well before JAX's own heartbeat timeout would abort it."""
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [_spawn("dead_worker", 2, tiny_llama, coordinator, pid, after_steps) for pid in (0, 1)]
    leader = procs[0]
    try:
        out, _ = leader.communicate(timeout=CHILD_TIMEOUT_S)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    assert leader.returncode == 3 and len(lines) == 1, out[-3000:]
    error = json.loads(lines[0][len("RESULT "):])["error"]
    expected = "become ready" if after_steps == 0 else f"finish step {after_steps}"
    assert error.startswith(f"worker process 1 did not {expected} within 5 s (dead or unreachable)"), error


@pytest.mark.parametrize("tp", [2])
def test_llm_tensor_parallel_size(tiny_llama: str, tp1_tokens: list[list[int]], tp: int) -> None:
    """The engine wires the plan in: `LLM(tensor_parallel_size=N)` shards and never recompiles."""
    res = _run("llm", 8, tiny_llama, tp)
    assert res["tokens"] == tp1_tokens
    assert any(v == COL for k, v in res["specs"].items() if k.startswith("layers.wq"))
    assert res["compiles_after_warmup"] == 0


def test_speculative_decoding_under_tensor_parallelism(tiny_llama: str) -> None:
    """n-gram drafts verified by a model sharded over 2 devices: the greedy tokens of one device without
    speculation. Prompts of many distinct ids, so the tokens the random model writes occur in them and
    the proposer drafts."""
    import random

    from jengine import LLM, SamplingParams

    ids = list(range(2, 320))
    random.Random(0).shuffle(ids)
    prompts = [ids[:50], ids[100:140]]
    child = _spawn("llm_spec", 8, tiny_llama, 2, json.dumps(prompts))
    plain = LLM(model=tiny_llama, compilation_cache_dir="", **SPEC_LIMITS)
    want = [list(o.outputs[0].token_ids) for o in plain.generate(
        [{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True), use_tqdm=False)]
    res = _result(child)
    assert res["tokens"] == want
    assert res["draft_tokens"] > 0 and res["compiles_after_warmup"] == 0


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_expert_parallel_matches_one_device(tmp_path: Any, arch: str) -> None:
    """`LLM(tensor_parallel_size=8, enable_expert_parallel=True)` on 8 fake devices: one of the 8
    experts per device (each device holds 1/8 of the expert bytes), the same greedy tokens as one
    device, and no compilation after warm-up."""
    from tiny_models import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path, arch, num_attention_heads=8, num_key_value_heads=2)
    one, ep = _spawn("llm_moe", 1, path, 1, "no"), _spawn("llm_moe", 8, path, 8, "ep")
    one, ep = _result(one), _result(ep)
    assert ep["tokens"] == one["tokens"]
    assert ep["compiles_after_warmup"] == 0
    assert ep["shard_map_experts"] and not one["shard_map_experts"]  # each device runs its own experts
    for name in ("layers.experts_gate", "layers.experts_up", "layers.experts_down"):
        assert [v for k, v in ep["specs"].items() if k.startswith(name)] == ["(None, 'model', None, None)"], name
    assert [v for k, v in ep["specs"].items() if k.startswith("layers.router")] == [REP]
    total = sum(one["expert_bytes"].values())
    assert len(ep["expert_bytes"]) == 8 and set(ep["expert_bytes"].values()) == {total // 8}
    # the memory report: every device holds at most the one-device weights less 7/8 of the experts
    (single,) = one["memory"].values()
    assert all(v["weights"] <= single["weights"] - total * 7 // 8 for v in ep["memory"].values())


def test_expert_parallel_size_must_divide_the_experts(tmp_path: Any) -> None:
    from jengine import sharding
    from jengine.config import EngineArgs
    from jengine.loader import read_hf_config
    from tiny_models import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path, "mixtral", num_attention_heads=12, hidden_size=96, num_key_value_heads=2,
                                num_local_experts=8, tokenizer=False)
    cfg = read_hf_config(path)
    with pytest.raises(ValueError, match="divide the 8 experts; sizes that work: 1, 2, 4"):
        sharding.check_tensor_parallel_size(cfg, 3, expert_parallel=True)
    sharding.check_tensor_parallel_size(cfg, 3)  # without expert parallelism the experts are replicated
    assert EngineArgs(model=path, enable_expert_parallel=True).create_engine_config().parallel.enable_expert_parallel


@pytest.mark.parametrize("backend", ["gpu", "cpu"])
def test_attention_kernel_under_tensor_parallelism(tmp_path: Any, backend: str) -> None:
    """The GPU Pallas kernel (interpret mode on the CPU) and the native CPU kernel run per device under
    shard_map: with the cache split over KV heads (TP 2) and replicated (TP 4 > 2 KV heads), greedy
    tokens equal TP 1's (on the reference)."""
    from tiny_models import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path, "llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2)  # head_dim 64
    expected = _run("llm", 1, path, 1)["tokens"]
    for tp in (2, 4):
        res = _run("llm", 4, path, tp, backend)
        assert res["tokens"] == expected, f"tp={tp}"
        assert res["compiles_after_warmup"] == 0


def test_fp8_kv_cache_under_tensor_parallelism(tiny_llama: str) -> None:
    """An fp8 KV cache split over KV heads (TP 2, native CPU kernel per device under shard_map): greedy
    tokens equal one device's with the same fp8 cache, and nothing compiles after warm-up."""
    expected = _run("llm", 1, tiny_llama, 1, "cpu", "fp8")
    assert expected["kv_dtype"] == "float8_e4m3fn"
    res = _run("llm", 2, tiny_llama, 2, "cpu", "fp8")
    assert res["kv_dtype"] == "float8_e4m3fn"
    assert res["specs"]["kv_cache"] == "(None, 'model', None, None, None)"
    assert res["tokens"] == expected["tokens"]
    assert res["compiles_after_warmup"] == 0


if __name__ == "__main__":
    _child_main(sys.argv[1:])
