"""The persistent batch (jengine/worker/input_batch.py): the device table gathers the same sampling
tensors the host builder makes, only changed slots are sent, slots are reused and evicted correctly,
and an engine keeps its outputs and compiles nothing while rows with mixed parameters join, leave
and move between slots; a steady all-greedy decode step sends only its ragged inputs and slots."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jengine import LLM, SamplingParams
from jengine.sampler import RowState, apply_min_tokens_and_penalties, build_sampling_tensors
from jengine.worker.input_batch import (
    RowTable, apply_blocks, apply_params, apply_penalty_rows, commit_penalty_tokens, gather_sampling_tensors, penalty_state_bytes,
)
from jengine.worker.model_runner import kv_budget_from_stats
from tiny_models import make_tiny_checkpoint

V = 64


def table(max_num_seqs: int = 6, groups: int = 1) -> RowTable:
    return RowTable(max_num_seqs=max_num_seqs, num_groups=groups, max_pages_per_seq=5, vocab_size=V, max_stop_tokens=4,
                    max_logit_bias=3, max_logprobs=5, num_speculative_tokens=2)


def seq(rid: str, prompt: list[int], outputs: list[int], pages: list[int], drafts: tuple = (), groups: tuple = ()) -> Any:
    req = SimpleNamespace(request_id=rid, prompt_token_ids=prompt, output_token_ids=outputs)
    return SimpleNamespace(request=req, block_ids=pages, spec_token_ids=list(drafts), group_block_ids=groups)


class DeviceTable:
    """The device half, as the runner keeps it: initial arrays, updated by the jitted scatters."""

    def __init__(self, rows: RowTable):
        self.rows = rows
        self.params = jax.tree.map(jnp.asarray, rows.initial_params())
        self.blocks = jnp.asarray(rows.initial_blocks())
        self.penalties = jax.tree.map(jnp.asarray, rows.initial_penalties())
        self.step_penalties: Any = None

    def step(self, scheduled: list, sampling_rows: list, num_rows: int) -> tuple[list[int], np.ndarray, Any]:
        slots, row_slots, update, penalties, _ = self.rows.prepare(scheduled, sampling_rows, num_rows)
        if update.param_slots is not None:
            self.params = apply_params(self.params, update.param_slots, update.params)
        if update.block_slots is not None:
            self.blocks = apply_blocks(self.blocks, update.block_slots, update.blocks)
        if update.penalty_slots is not None:
            self.penalties = apply_penalty_rows(self.penalties, update.penalty_slots, update.penalty_rows)
        self.step_penalties = jax.tree.map(jnp.asarray, penalties if penalties is not None else self.rows.neutral_penalties(num_rows))
        no_prev = jnp.zeros(num_rows, jnp.int32)
        self.penalties = commit_penalty_tokens(self.penalties, jnp.asarray(row_slots), self.step_penalties, no_prev, V)
        return slots, row_slots, update


PARAMS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05, seed=3, logprobs=2),
    SamplingParams(temperature=1.0, min_tokens=4, stop_token_ids=[9, 11], logit_bias={3: 2.0, 60: -1.5}),
    SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True, stop_token_ids=[5], presence_penalty=0.5,
                   frequency_penalty=0.3, repetition_penalty=1.2),
    SamplingParams(temperature=0.5, top_k=V, top_p=1.0, logprobs=0),
]


def effective_counts(t: Any) -> np.ndarray:
    """Each row's output counts as the sampler sees them: its penalty row plus its pending drafts."""
    counts = np.asarray(t.output_counts)[np.asarray(t.penalty_rows)].copy()
    for r, ids in enumerate(np.asarray(t.pending_ids)):
        for i in ids[ids < V]:
            counts[r, i] += 1
    return counts


PENALTY_FIELDS = {"output_counts", "prompt_bits", "penalty_rows", "pending_ids"}


def test_gathered_sampling_tensors_equal_the_host_builder():
    """Rows with every kind of parameter, outputs growing from step to step (min_tokens on and off, a
    penalised row counted on the device), some sharing a slot (speculative per-position rows, drafts
    counted for their row only) and padding rows: every field and flag matches, and the penalised
    logits are identical."""
    rng = np.random.default_rng(0)
    rows = table()
    dev = DeviceTable(rows)
    prompts = [rng.integers(0, V, size=3 + i).tolist() for i in range(len(PARAMS))]
    outs: list[list[int]] = [[] for _ in PARAMS]
    for trial in range(5):
        scheduled, states = [], []
        for i, p in enumerate(PARAMS):
            outs[i] += rng.integers(0, V, size=int(rng.integers(0, 4))).tolist()  # what the last step accepted
            prompt, out = prompts[i], list(outs[i])
            drafts = (7, 8) if (i in (1, 3) and trial % 2) else ()
            s = seq(f"r{i}", prompt, out, [1 + i], drafts)
            state = RowState(params=p, prompt_token_ids=prompt, output_token_ids=out, seed=100 + i, eos_token_ids=(2,))
            scheduled.append(s)
            states.append(state)
            for k in range(1, len(drafts) + 1):  # per-position rows: the output extended by the drafts before k
                states.append(RowState(params=p, prompt_token_ids=prompt, output_token_ids=out + list(drafts[:k]), seed=100 + i,
                                       eos_token_ids=(2,), num_committed_outputs=len(out)))
        S = len(states) + 2
        _, row_slots, _ = dev.step(scheduled, states, S)
        sample_pos = np.zeros(S, np.int32)
        for j, st in enumerate(states):  # the position of the token each row samples after
            sample_pos[j] = len(st.prompt_token_ids) + len(st.output_token_ids) - 1
        mask = jax.tree.map(jnp.asarray, rows.host_mask(states, S))
        got = gather_sampling_tensors(dev.params, dev.penalties, jnp.asarray(row_slots), jnp.asarray(sample_pos),
                                      dev.step_penalties, mask, V)
        want = build_sampling_tensors(states, S, vocab_size=V, max_stop_tokens=4, max_logprobs=5, max_logit_bias=3)
        n = len(states)  # padding rows' step is meaningless (the builder writes 0)
        for name in sorted(set(want.__dataclass_fields__) - PENALTY_FIELDS):
            a, b = np.asarray(getattr(got, name)), np.asarray(getattr(want, name))
            if name == "step":
                a, b = a[:n], b[:n]
            if name == "banned_token_ids":  # the same set of ids per row (the table drops duplicates, orders stop ids first)
                assert [sorted(set(r) - {V}) for r in a.tolist()] == [sorted(set(r) - {V}) for r in b.tolist()], trial
            else:
                np.testing.assert_array_equal(a, b, err_msg=f"{name} (trial {trial})")
        penalised = [j for j, st in enumerate(states) if st.params.repetition_penalty != 1.0]
        np.testing.assert_array_equal(effective_counts(got)[penalised], effective_counts(want)[penalised])
        np.testing.assert_array_equal(np.asarray(got.prompt_bits)[row_slots[penalised]], np.asarray(want.prompt_bits)[penalised])
        assert (np.asarray(want.pending_ids)[penalised].min() < V) == bool(trial % 2)  # drafts pending in odd trials
        logits = jnp.asarray(rng.standard_normal((S, V)).astype(np.float32) * 3)
        penalise = jax.jit(apply_min_tokens_and_penalties)
        np.testing.assert_array_equal(np.asarray(penalise(logits, got)), np.asarray(penalise(logits, want)), err_msg=f"trial {trial}")


def test_only_changes_are_sent_and_slots_are_reused():
    rows = table(max_num_seqs=3)
    dev = DeviceTable(rows)
    p = SamplingParams(temperature=0.0)
    a = seq("a", [1, 2], [], [1, 2])
    b = seq("b", [3], [], [3], groups=())

    def st(s: Any) -> RowState:
        return RowState(params=p, prompt_token_ids=s.request.prompt_token_ids, output_token_ids=[], seed=0)

    slots, _, update = dev.step([a, b], [st(a), st(b)], 4)
    assert slots == [0, 1] and update.param_slots[:2].tolist() == [0, 1] and update.block_slots[:2].tolist() == [0, 1]
    assert update.param_slots.tolist() == [0, 1, 4]  # padded to a bucket with an out-of-range slot: dropped
    slots, _, update = dev.step([a, b], [st(a), st(b)], 4)
    assert slots == [0, 1] and update.empty  # steady state: nothing to send
    a.block_ids.append(7)  # a gains a page: its block-table row only
    _, _, update = dev.step([a, b], [st(a), st(b)], 4)
    assert update.param_slots is None and update.block_slots[0] == 0 and update.blocks[0, 0, :3].tolist() == [1, 2, 7]
    assert np.asarray(dev.blocks)[0, 0, :3].tolist() == [1, 2, 7] and np.asarray(dev.blocks)[0, 1, :1].tolist() == [3]
    # c and d join: c takes the free slot; d finds none free and evicts the least recently used slot the step does not use
    c, d = seq("c", [4], [], [4]), seq("d", [5], [], [5])
    slots, _, _ = dev.step([a, c], [st(a), st(c)], 4)
    assert slots == [0, 2]
    slots, _, update = dev.step([a, c, d], [st(a), st(c), st(d)], 4)
    assert slots == [0, 2, 1] and update.param_slots[0] == 1  # b's slot, b not scheduled since
    slots, _, update = dev.step([b, d], [st(b), st(d)], 4)  # b rejoins: a slot not used by this step, with its full state
    assert slots[1] == 1 and slots[0] in (0, 2) and slots[0] in update.param_slots.tolist() and slots[0] in update.block_slots.tolist()
    rows.release(["a", "b", "c", "d"])
    slots, _, update = dev.step([seq("e", [6], [], [6])], [None], 4)  # a prefill chunk that does not sample yet
    assert update.param_slots is None and update.block_slots is not None  # pages now, parameters once it samples


def test_several_groups_and_errors():
    rows = table(groups=2)
    dev = DeviceTable(rows)
    p = SamplingParams(temperature=0.0)
    s = seq("a", [1], [], [1, 2], groups=([0, 5],))
    dev.step([s], [RowState(params=p, prompt_token_ids=[1], output_token_ids=[], seed=0)], 2)
    assert np.asarray(dev.blocks)[:, 0, :2].tolist() == [[1, 2], [0, 5]]
    s.group_block_ids[0][1] = 0  # a page dropped behind the sliding window changes in place
    _, _, update = dev.step([s], [RowState(params=p, prompt_token_ids=[1], output_token_ids=[], seed=0)], 2)
    assert update.block_slots is not None and np.asarray(dev.blocks)[1, 0, :2].tolist() == [0, 0]
    bad = SamplingParams(temperature=0.0, logit_bias={1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0})
    with pytest.raises(ValueError, match="logit_bias"):
        rows.prepare([seq("b", [1], [], [3])], [RowState(params=bad, prompt_token_ids=[1], output_token_ids=[], seed=0)], 2)


# ---- the engine ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(tmp_path_factory, xla_cache_dir) -> LLM:
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "llama")
    return LLM(ckpt, compilation_cache_dir=xla_cache_dir, max_model_len=96, max_num_seqs=4, max_num_batched_tokens=32)


def outputs(llm: LLM, prompts: list, params: list) -> list:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [[(list(c.token_ids), c.finish_reason, None if c.logprobs is None else [sorted(e) for e in c.logprobs]) for c in o.outputs]
            for o in outs]


def test_rows_joining_leaving_and_moving_keep_outputs_and_compile_nothing(llm):
    """More requests than slots, with mixed parameters and lengths: each request's tokens are those it
    gets alone (greedy and seeded sampling do not depend on the batch or the slot), and nothing compiles."""
    rng = np.random.default_rng(1)
    prompts = [rng.integers(2, 300, size=int(k)).tolist() for k in rng.integers(3, 40, size=9)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True),
        SamplingParams(temperature=0.9, seed=4, top_k=8, max_tokens=5, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=1.0, seed=9, top_p=0.8, min_tokens=3, max_tokens=11),
        SamplingParams(temperature=0.0, max_tokens=7, logit_bias={17: 5.0, 40: -2.0}, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=2, min_p=0.1, max_tokens=16, presence_penalty=0.4, repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=12, max_tokens=12, n=2, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=9, min_tokens=9, stop_token_ids=[5, 6]),
        SamplingParams(temperature=0.6, seed=1, max_tokens=6, frequency_penalty=0.5, ignore_eos=True),
    ]
    alone = [outputs(llm, [p], [sp])[0] for p, sp in zip(prompts, params)]
    together = outputs(llm, prompts, params)
    assert together == alone
    again = outputs(llm, prompts[::-1], params[::-1])  # other arrival order: other slots, evictions
    assert again == alone[::-1]
    assert llm.engine.compilations_after_warmup == 0
    assert not llm.engine.runner.rows._slot_of  # every finished request gave its slot back


STEADY = {"inputs.token_ids", "inputs.positions", "inputs.slot_mapping", "inputs.query_start_loc", "inputs.seq_lens",
          "inputs.num_seqs", "inputs.logits_indices", "inputs.prompt_next_ids", "inputs.want_prompt_logprobs",
          "inputs.lora_slots", "inputs.prev_token_index", "inputs.seq_slots", "row_slots"}


def test_steady_greedy_decode_sends_only_ragged_inputs_and_slots(llm):
    """An all-greedy batch with no joins or leaves sends no table update, no extras and no block
    tables: the token, position and KV-slot data, query starts and the rows' slots (by field name)."""
    engine = llm.engine
    sent: list[dict[str, int]] = []
    dispatch = engine.runner.dispatch

    def recording(*args: Any, **kwargs: Any) -> Any:
        step = dispatch(*args, **kwargs)
        sent.append(dict(engine.runner.last_host_inputs))
        return step

    engine.runner.dispatch = recording
    engine.runner.record_host_inputs = True
    try:
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        for i in range(3):
            engine.add_request(f"g{i}", [3 + i, 9, 27, 81], params)
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        del engine.runner.dispatch
        engine.runner.record_host_inputs = False
    assert any(k.startswith("update.") for k in sent[0])  # the first step: joins
    steady = sent[1:-2]  # decode steps (the last ones may see a page gained or the wasted row of a late stop)
    assert steady and all(set(s) == STEADY for s in steady), [sorted(set(s) - STEADY) for s in steady]
    assert all(sum(s.values()) < 2048 for s in steady)  # a few hundred bytes a step at this size
    assert engine.compilations_after_warmup == 0


def test_accelerator_kv_budget_leaves_room_for_the_penalty_table():
    """On an accelerator the KV cache gets `gpu_memory_utilization` of the memory limit less the weights,
    an activation reserve and the persistent batch's penalty table (allocated after the cache: for a
    262k vocabulary and 256 slots it is over 500 MB with its whole-table update); no limit: None (CPU)."""
    table = penalty_state_bytes(256, 262144)
    assert table == 2 * 257 * (262144 + 8192) * 4
    gib = 1 << 30
    stats = {"bytes_limit": 80 * gib, "bytes_in_use": 2 * gib}
    assert kv_budget_from_stats(stats, 0.9, table) == int(80 * gib * 0.9 - 2 * gib - 8 * gib - table)
    assert kv_budget_from_stats({"bytes_limit": gib, "bytes_in_use": gib}, 0.9, table) == 0
    assert kv_budget_from_stats(None, 0.9, table) is None and kv_budget_from_stats({}, 0.9, table) is None
