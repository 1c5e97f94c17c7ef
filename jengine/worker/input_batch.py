"""The persistent batch: per-request state that lives on the device across steps, indexed by slot.

Each running request holds a slot in [0, max_num_seqs) (slot `max_num_seqs` is the padding row's:
greedy, nothing to ban, all-zero block tables). Its sampling parameters, seed, stop tokens for
`min_tokens`, logit bias, prompt length (`SlotParams`) and its block-table rows, one per KV layer
group (`[G, slots, max_pages_per_seq]`), sit in fixed-shape device arrays. The host keeps a mirror
and, per step, sends only the slots whose contents changed: a request that joins (or takes a slot
back after eviction) sends its parameters and pages, one that gained or lost pages sends its
block-table rows. Changed slots are padded to a bucket (`update_buckets`) and scattered into the
table by a small jitted function, so nothing compiles after warm-up. A step then sends its ragged
tokens, positions and KV slots plus two index arrays (each scheduled row's slot, each logits row's
slot): the forward gathers its block tables and the sampler its rows' `SamplingTensors` from the
table on the device (`gather_sampling_tensors`). The sampled token's output index (the seed's
`fold_in` step and the `min_tokens` test) is computed there from its position and the prompt length.

Penalties keep dense state per slot (`PenaltyState`: output-token counts `[slots, V]` and the prompt's
token bits), written whole when a request with penalties joins and counted on the device after that:
each step the sampler adds the tokens committed since the slot was last counted (`StepPenalties`:
those the host knows, plus one still on the device from the previous step under asynchronous
scheduling), so penalised rows need no host history and run asynchronously. A verification row's
drafts count for that row only (`pending_ids`). Structured-output bitmasks are the one per-step array
only the host knows (`StepMask`); steps without penalised or constrained rows use neutral copies that
stay on the device.

Slots are keyed by request id. A request keeps its slot until the engine releases it (`release`, when
it finishes or aborts); a preempted request keeps it while slots last, and when a joining request
finds none free, the least recently scheduled slot not used by the step is taken (its owner rejoins
with its full state when it runs again). Several logits rows may share a slot (speculative decoding's
per-position rows: same request state, output index from each position).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jengine.sampler import (
    SamplingTensors, _SAMPLING_EPS, build_token_bitmask, needs_penalties, penalty_counts, seed_to_key_data,
)
from jengine.worker.step_inputs import logit_rows, pick_bucket


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotParams:
    """Sampling state per slot (first axis: slots, or the changed slots of an update). Normalised as
    `build_sampling_tensors` does: greedy rows have temperature 0 and no top-k/top-p/min-p; rows without
    penalties have neutral penalty values; token-id lists are padded with V."""

    temperature: Any  # f32[N]
    top_k: Any  # i32[N]
    top_p: Any  # f32[N]
    min_p: Any  # f32[N]
    presence_penalty: Any  # f32[N]
    frequency_penalty: Any  # f32[N]
    repetition_penalty: Any  # f32[N]
    key_data: Any  # u32[N, 2]
    num_logprobs: Any  # i32[N]; -1: none
    min_tokens: Any  # i32[N]
    stop_ids: Any  # i32[N, K]; EOS + stop_token_ids banned below min_tokens (V: none)
    bias_ids: Any  # i32[N, B]
    bias_values: Any  # f32[N, B]
    prompt_len: Any  # i32[N]; the sampled token's output index is its position + 1 - prompt_len


def empty_slot_params(n: int, vocab_size: int, max_stop_tokens: int, max_logit_bias: int) -> SlotParams:
    """`n` neutral slots (numpy): greedy, nothing banned, biased or penalised."""
    f32, i32 = np.float32, np.int32
    return SlotParams(
        temperature=np.zeros(n, f32), top_k=np.zeros(n, i32), top_p=np.ones(n, f32), min_p=np.zeros(n, f32),
        presence_penalty=np.zeros(n, f32), frequency_penalty=np.zeros(n, f32), repetition_penalty=np.ones(n, f32),
        key_data=np.zeros((n, 2), np.uint32), num_logprobs=np.full(n, -1, i32), min_tokens=np.zeros(n, i32),
        stop_ids=np.full((n, max_stop_tokens), vocab_size, i32), bias_ids=np.full((n, max_logit_bias), vocab_size, i32),
        bias_values=np.zeros((n, max_logit_bias), f32), prompt_len=np.zeros(n, i32),
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PenaltyState:
    """Penalty state per slot on the device (rows: slots, the padding slot last)."""

    counts: Any  # i32[N + 1, V]: how often each token is in the slot's output, as counted so far
    prompt_bits: Any  # i32[N + 1, ceil(V / 32)]: the prompt's tokens (slots with a repetition penalty)


def penalty_state_bytes(num_slots: int, vocab_size: int) -> int:
    """Device bytes of the penalty table for `num_slots` slots (and the padding slot), and of one
    update that rewrites every row: the persistent batch's only arrays that grow with the vocabulary
    (50 MB for the table at 256 slots of SmolLM2's 49152 tokens; 270 MB at a 262k vocabulary)."""
    return 2 * (num_slots + 1) * (vocab_size + -(-vocab_size // 32)) * 4


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepPenalties:
    """One step's penalty data, per logits row (neutral in steps without penalised rows)."""

    commit_ids: Any  # i32[S, A]: tokens the row's slot counts for good before sampling (V: none; first row of a sequence)
    commit_prev: Any  # i32[S]: index into the previous step's sampled tokens of one more such token (-1: none)
    pending_ids: Any  # i32[S, P]: drafts before a verification row's position, counted for that row only
    any_penalties: Any  # bool[]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepMask:
    """One step's structured-output bitmask (rows as the logits rows; all ones in most steps)."""

    token_bitmask: Any  # i32[S, ceil(V / 32)]
    any_constrained: Any  # bool[]


@dataclasses.dataclass
class TableUpdate:
    """Changed slots of one step (numpy, padded to an update bucket with slot index N + 1: dropped)."""

    param_slots: Optional[np.ndarray] = None  # i32[U]
    params: Optional[SlotParams] = None  # [U, ...]
    block_slots: Optional[np.ndarray] = None  # i32[U]
    blocks: Optional[np.ndarray] = None  # i32[G, U, max_pages_per_seq]
    penalty_slots: Optional[np.ndarray] = None  # i32[U]
    penalty_rows: Optional[PenaltyState] = None  # [U, ...]: the joining penalised slots' whole state

    @property
    def empty(self) -> bool:
        return self.param_slots is None and self.block_slots is None and self.penalty_slots is None


@dataclasses.dataclass
class StepSampling:
    """The sampling half of a step's host inputs (what a multi-host leader publishes with `StepInputs`)."""

    row_slots: np.ndarray  # i32[S]: each logits row's slot (the padding slot for rows that do not sample)
    penalties: StepPenalties  # host-built (numpy) when some row has penalties, else the device's neutral one
    mask: StepMask  # host-built when some row is constrained, else the device's neutral one
    update: TableUpdate  # applied to the device table before the step runs

    @property
    def token_bitmask(self) -> Any:
        """The host bitmask structured-output rows' masks are written into (see `ModelRunner.dispatch`)."""
        return self.mask.token_bitmask


def update_buckets(max_num_seqs: int) -> list[int]:
    """Sizes the changed slots of a step are padded to: 4, 16, 64, ... up to max_num_seqs."""
    out, b = [], 4
    while b < max_num_seqs:
        out.append(b)
        b *= 4
    out.append(max_num_seqs)
    return out


def apply_params(table: SlotParams, slots: jax.Array, rows: SlotParams) -> SlotParams:
    """Writes the changed slots' parameters (jitted; out-of-range padding slots are dropped)."""
    return jax.tree.map(lambda t, r: t.at[slots].set(r, mode="drop"), table, rows)


def apply_blocks(blocks: jax.Array, slots: jax.Array, rows: jax.Array) -> jax.Array:
    """Writes the changed slots' block-table rows of every layer group (jitted)."""
    return blocks.at[:, slots].set(rows, mode="drop")


def apply_penalty_rows(state: PenaltyState, slots: jax.Array, rows: PenaltyState) -> PenaltyState:
    """Writes joining penalised slots' whole penalty state (jitted; padding slots are dropped)."""
    return jax.tree.map(lambda t, r: t.at[slots].set(r, mode="drop"), state, rows)


def commit_penalty_tokens(state: PenaltyState, row_slots: jax.Array, step: StepPenalties, prev_tokens: jax.Array,
                          vocab_size: int) -> PenaltyState:
    """Counts the step's committed tokens into their slots' rows (inside the jitted sampler): the host's
    `commit_ids`, and the previous step's sampled token where `commit_prev` points at one."""
    counts = state.counts.at[row_slots[:, None], step.commit_ids].add(1, mode="drop")
    prev = jnp.where(step.commit_prev >= 0, prev_tokens[jnp.maximum(step.commit_prev, 0)], vocab_size)
    return dataclasses.replace(state, counts=counts.at[row_slots, prev].add(1, mode="drop"))


def gather_sampling_tensors(table: SlotParams, penalty: PenaltyState, row_slots: jax.Array, sample_pos: jax.Array,
                            step_penalties: StepPenalties, mask: StepMask, vocab_size: int) -> SamplingTensors:
    """The step's `SamplingTensors` gathered from the table on the device (inside the jitted sampler).

    `sample_pos[i]` is the position of the token whose logits row i samples after, so the sampled
    token's output index (its seeded stream's step, and what `min_tokens` counts) is that + 1 - the
    prompt length; the batch flags are reductions over the gathered rows. The penalty tables are passed
    whole (`penalty_rows` = the rows' slots): the sampler reads them only when some row has penalties."""
    g = jax.tree.map(lambda a: a[row_slots], table)
    step = jnp.maximum(sample_pos + 1 - g.prompt_len, 0).astype(jnp.int32)
    banned = jnp.where((step < g.min_tokens)[:, None], g.stop_ids, vocab_size)
    return SamplingTensors(
        temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, min_p=g.min_p,
        presence_penalty=g.presence_penalty, frequency_penalty=g.frequency_penalty, repetition_penalty=g.repetition_penalty,
        key_data=g.key_data, step=step, output_counts=penalty.counts, prompt_bits=penalty.prompt_bits,
        penalty_rows=row_slots, pending_ids=step_penalties.pending_ids, banned_token_ids=banned, logit_bias_ids=g.bias_ids,
        logit_bias_values=g.bias_values, num_logprobs=g.num_logprobs, token_bitmask=mask.token_bitmask,
        all_greedy=jnp.all(g.temperature == 0),
        any_top_k_or_p=jnp.any((g.top_k > 0) | (g.top_p < 1.0)),
        any_processing=jnp.any(banned < vocab_size) | jnp.any(g.bias_ids < vocab_size) | step_penalties.any_penalties,
        any_logprobs=jnp.any(g.num_logprobs >= 0),
        any_constrained=mask.any_constrained, any_penalties=step_penalties.any_penalties,
    )


@dataclasses.dataclass
class _Slot:
    """The host's record of what the device holds in one slot."""

    owner: Optional[str] = None
    param_key: Optional[tuple] = None  # (params, seed, eos ids) last written; None: nothing valid on the device
    pages: Optional[tuple] = None  # the page lists last written (group 0, then groups 1..)
    penalized: bool = False
    counted: int = 0  # outputs counted into the slot's penalty row (penalised slots)
    last_used: int = -1


class RowTable:
    """The host side of the persistent batch: slot assignment and the mirror of the device table."""

    def __init__(self, *, max_num_seqs: int, num_groups: int, max_pages_per_seq: int, vocab_size: int,
                 max_stop_tokens: int, max_logit_bias: int, max_logprobs: int, num_speculative_tokens: int = 0):
        self.num_slots = max_num_seqs
        self.pad_slot = max_num_seqs  # the padding rows' slot, never written
        self.num_groups, self.max_pages_per_seq = num_groups, max_pages_per_seq
        self.vocab_size, self.max_stop_tokens, self.max_logit_bias = vocab_size, max_stop_tokens, max_logit_bias
        self.max_logprobs = max_logprobs
        # Outputs a slot commits in one step: the last token, plus the drafts a verification accepted.
        self.commit_width = 1 + num_speculative_tokens
        self.pending_width = max(num_speculative_tokens, 1)
        self.buckets = update_buckets(max_num_seqs)
        self._slots = [_Slot() for _ in range(max_num_seqs)]
        self._slot_of: dict[Any, int] = {}
        self._free = list(range(max_num_seqs - 1, -1, -1))  # a stack: lowest slot first
        self._tick = 0

    # ----- the initial device contents ----------------------------------------------------------
    def initial_params(self) -> SlotParams:
        return empty_slot_params(self.num_slots + 1, self.vocab_size, self.max_stop_tokens, self.max_logit_bias)

    def initial_blocks(self) -> np.ndarray:
        return np.zeros((self.num_groups, self.num_slots + 1, self.max_pages_per_seq), np.int32)

    def initial_penalties(self) -> PenaltyState:
        return PenaltyState(*penalty_counts((), self.num_slots + 1, self.vocab_size))

    def neutral_penalties(self, num_rows: int) -> StepPenalties:
        """The penalty data of a step without penalised rows (numpy; the runner keeps a device copy per bucket)."""
        V = self.vocab_size
        return StepPenalties(np.full((num_rows, self.commit_width), V, np.int32), np.full(num_rows, -1, np.int32),
                             np.full((num_rows, self.pending_width), V, np.int32), np.bool_(False))

    def neutral_mask(self, num_rows: int) -> StepMask:
        """The bitmask of a step without structured-output rows (numpy; the runner keeps a device copy per bucket)."""
        return StepMask(np.full((num_rows, -(-self.vocab_size // 32)), -1, np.int32), np.bool_(False))

    def empty_update(self, size: int) -> TableUpdate:
        """An all-padding update of one bucket (warm-up lowers with it)."""
        slots = np.full(size, self.num_slots + 1, np.int32)
        return TableUpdate(slots, empty_slot_params(size, self.vocab_size, self.max_stop_tokens, self.max_logit_bias),
                           slots.copy(), np.zeros((self.num_groups, size, self.max_pages_per_seq), np.int32),
                           slots.copy(), PenaltyState(*penalty_counts((), size, self.vocab_size)))

    # ----- per step -----------------------------------------------------------------------------
    def release(self, request_ids: Sequence[str]) -> None:
        """Frees the slots of requests that finished (their device rows are rewritten on reuse)."""
        for rid in request_ids:
            slot = self._slot_of.pop(rid, None)
            if slot is not None:
                self._slots[slot] = _Slot()
                self._free.append(slot)

    def invalidate(self) -> None:
        """Forgets what the device holds (an update built but never applied): every row is rewritten next time."""
        for s in self._slots:
            s.param_key, s.pages = None, None

    def prepare(self, scheduled: Sequence[Any], sampling_rows: Sequence[Any], num_rows: int,
                prev_rows: Optional[dict[int, int]] = None) -> tuple[list[int], np.ndarray, TableUpdate, Optional[StepPenalties], bool]:
        """For one step: each scheduled row's slot, each logits row's slot (`num_rows`, padded with the
        padding slot, which rows without a sampling state get too), the table changes, the step's penalty
        data (None: no penalised row) and whether some row has a bitmask. `prev_rows` maps a scheduled row
        whose last output is still on the device to the previous step's logits row that samples it.
        Raises ValueError for a row the sampler cannot serve."""
        self._tick += 1
        tick = self._tick
        ids = [seq.request.request_id for seq in scheduled]
        step_ids = set(ids)
        row_slots = np.full(num_rows, self.pad_slot, np.int32)
        seq_slots: list[int] = []
        param_rows: list[tuple[int, Any]] = []
        block_rows: list[tuple[int, tuple]] = []
        penalty_rows: list[tuple[int, Any]] = []  # (slot, row) written whole
        prev_rows = prev_rows or {}
        penalties: Optional[StepPenalties] = None
        any_mask = False
        first = 0
        for j, (seq, rid, n) in enumerate(zip(scheduled, ids, logit_rows(scheduled))):
            slot = self._slot_of.get(rid)
            if slot is None:
                slot = self._take(rid, step_ids)
            rec = self._slots[slot]
            rec.last_used = tick
            seq_slots.append(slot)
            pages = (seq.block_ids, *seq.group_block_ids) if self.num_groups > 1 else (seq.block_ids,)
            if rec.pages is None or not _same_pages(rec.pages, pages):
                if any(len(p) > self.max_pages_per_seq for p in pages):
                    raise ValueError(f"request {rid} has more than {self.max_pages_per_seq} pages")
                rec.pages = tuple(list(p) for p in pages)
                block_rows.append((slot, rec.pages))
            for i in range(first, min(first + n, len(sampling_rows))):
                row = sampling_rows[i]
                if row is None:
                    continue
                row_slots[i] = slot
                if i == first:
                    key = (row.params, row.seed, tuple(row.eos_token_ids), len(row.prompt_token_ids))
                    old = rec.param_key
                    changed = old is None or old[0] is not key[0] or old[1:] != key[1:]
                    if changed:
                        self._check(row)
                        rec.param_key = key
                        rec.penalized = needs_penalties(row.params)
                        param_rows.append((slot, row))
                    if rec.penalized:
                        if penalties is None:
                            penalties = self.neutral_penalties(num_rows)
                            penalties.any_penalties = np.bool_(True)
                        self._commit(rid, rec, slot, row, i, changed, prev_rows.get(j), penalties, penalty_rows)
                elif rec.penalized and penalties is not None:  # a verification row: the drafts before it
                    drafts = row.output_token_ids[row.num_committed:]
                    penalties.pending_ids[i, :len(drafts)] = drafts
                any_mask = any_mask or row.token_bitmask is not None
            first += n
        update = TableUpdate()
        if param_rows:
            update.param_slots, update.params = self._param_update(param_rows)
        if block_rows:
            update.block_slots, update.blocks = self._block_update(block_rows)
        if penalty_rows:
            update.penalty_slots, update.penalty_rows = self._penalty_update(penalty_rows)
        return seq_slots, row_slots, update, penalties, any_mask

    def _commit(self, rid: Any, rec: _Slot, slot: int, row: Any, i: int, joined: bool, prev_row: Optional[int],
                step: StepPenalties, uploads: list[tuple[int, Any]]) -> None:
        """Logits row i's share of the step's penalty data: the outputs its slot has not counted yet, as
        host ids, or by the previous step's row for an output still on the device. A slot that joins (or
        would commit more than a step can) gets its whole counts written instead."""
        known = row.num_committed
        new = row.output_token_ids[rec.counted:known]
        if joined or len(new) > self.commit_width or rec.counted > known:
            uploads.append((slot, row))
            new = ()
        step.commit_ids[i, :len(new)] = new
        if row.num_placeholder_tokens:
            if row.num_placeholder_tokens > 1 or prev_row is None:
                raise ValueError(f"request {rid}: {row.num_placeholder_tokens} outputs not on the host and no "
                                 "previous step row to count them from")
            step.commit_prev[i] = prev_row
        rec.counted = known + row.num_placeholder_tokens

    def host_mask(self, rows: Sequence[Any], num_rows: int) -> StepMask:
        """The structured-output bitmask of this step's rows (numpy)."""
        bitmask, any_mask = build_token_bitmask(rows, num_rows, self.vocab_size)
        return StepMask(bitmask, np.bool_(any_mask))

    # ----- helpers ------------------------------------------------------------------------------
    def _take(self, rid: Any, step_ids: set) -> int:
        if self._free:
            slot = self._free.pop()
        else:  # every slot is held: take the least recently scheduled one this step does not use
            candidates = [i for i, s in enumerate(self._slots) if s.owner not in step_ids]
            if not candidates:
                raise ValueError(f"a step has more rows than the {self.num_slots} slots of the persistent batch")
            slot = min(candidates, key=lambda i: self._slots[i].last_used)
            self._slot_of.pop(self._slots[slot].owner, None)
        self._slots[slot] = _Slot(owner=rid)
        self._slot_of[rid] = slot
        return slot

    def _check(self, row: Any) -> None:
        p, V = row.params, self.vocab_size
        if p.logprobs is not None and p.logprobs > self.max_logprobs:
            raise ValueError(f"logprobs={p.logprobs} exceeds max_logprobs={self.max_logprobs}")
        if p.min_tokens and len(_stop_ids(row)) > self.max_stop_tokens:
            raise ValueError(f"{len(_stop_ids(row))} EOS/stop token ids exceed max_stop_tokens={self.max_stop_tokens}")
        if p.logit_bias:
            if len(p.logit_bias) > self.max_logit_bias:
                raise ValueError(f"{len(p.logit_bias)} logit_bias entries exceed max_logit_bias={self.max_logit_bias}")
            if min(p.logit_bias) < 0 or max(p.logit_bias) >= V:
                raise ValueError(f"logit_bias has token ids outside the vocabulary [0, {V})")

    def _padded_slots(self, slots: list[int]) -> np.ndarray:
        size = pick_bucket(self.buckets, len(slots))
        out = np.full(size, self.num_slots + 1, np.int32)
        out[:len(slots)] = slots
        return out

    def _param_update(self, rows: list[tuple[int, Any]]) -> tuple[np.ndarray, SlotParams]:
        slots = self._padded_slots([s for s, _ in rows])
        x = empty_slot_params(slots.size, self.vocab_size, self.max_stop_tokens, self.max_logit_bias)
        for i, (_, row) in enumerate(rows):
            p = row.params
            x.key_data[i] = seed_to_key_data(int(row.seed))
            x.prompt_len[i] = len(row.prompt_token_ids)
            if p.logprobs is not None:
                x.num_logprobs[i] = p.logprobs
            if p.min_tokens:
                stops = _stop_ids(row)
                x.min_tokens[i] = p.min_tokens
                x.stop_ids[i, :len(stops)] = stops
            if p.logit_bias:
                x.bias_ids[i, :len(p.logit_bias)] = list(p.logit_bias.keys())
                x.bias_values[i, :len(p.logit_bias)] = list(p.logit_bias.values())
            if needs_penalties(p):
                x.presence_penalty[i], x.frequency_penalty[i], x.repetition_penalty[i] = (
                    p.presence_penalty, p.frequency_penalty, p.repetition_penalty)
            if p.temperature < _SAMPLING_EPS:
                continue  # greedy: top-k / top-p / min-p do not apply
            x.temperature[i] = p.temperature
            if 0 < p.top_k < self.vocab_size:
                x.top_k[i] = p.top_k
            if p.top_p < 1.0 - _SAMPLING_EPS:
                x.top_p[i] = p.top_p
            x.min_p[i] = p.min_p
        return slots, x

    def _penalty_update(self, rows: list[tuple[int, Any]]) -> tuple[np.ndarray, PenaltyState]:
        slots = self._padded_slots([s for s, _ in rows])
        return slots, PenaltyState(*penalty_counts([row for _, row in rows], slots.size, self.vocab_size))

    def _block_update(self, rows: list[tuple[int, tuple]]) -> tuple[np.ndarray, np.ndarray]:
        slots = self._padded_slots([s for s, _ in rows])
        blocks = np.zeros((self.num_groups, slots.size, self.max_pages_per_seq), np.int32)
        for i, (_, pages) in enumerate(rows):
            for g, ids in enumerate(pages):
                blocks[g, i, :len(ids)] = ids
        return slots, blocks


def _stop_ids(row: Any) -> list[int]:
    """The ids banned below min_tokens: stop_token_ids, plus EOS unless ignore_eos (duplicates dropped)."""
    p = row.params
    stops = list(p.stop_token_ids or ())
    if not p.ignore_eos:
        stops.extend(row.eos_token_ids)
    return list(dict.fromkeys(int(t) for t in stops))


def _same_pages(old: tuple, new: tuple) -> bool:
    return all(a == (b if type(b) is list else list(b)) for a, b in zip(old, new))
