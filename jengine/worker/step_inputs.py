"""Fixed-shape step inputs, built on the host in numpy from a `SchedulerOutput`.

Every array's shape depends only on the bucket `(T, S)` and the config, so one compiled step serves
every batch that falls in the bucket. Token buckets are fine where steps are small (every 16 tokens
up to 128, where decode batches and short prompts live, so a 97-row decode or an 80-token prompt pays
for at most 15 padding rows) and grow by 1.5x and 4/3x above. Each token bucket T pairs with at most
two sequence buckets: `min_seq_bucket` for steps of a few rows (a lone prompt must not pay for a
T-row LM head) and `min(T, max_num_seqs)` for the rest, which always fits since every row brings at
least one token. So the number of compiled steps grows with the token buckets only.
"""
from __future__ import annotations

import bisect
import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


FINE_STEP = 16  # token buckets step by this much up to FINE_LIMIT
FINE_LIMIT = 128


def make_token_buckets(smallest: int, largest: int) -> list[int]:
    """Token buckets from `smallest` to `largest` (always included; see the module docstring)."""
    buckets, b = [], max(1, smallest)
    while b < largest:
        buckets.append(b)
        if b < FINE_STEP:
            b *= 2
        elif b < FINE_LIMIT:
            b = (b // FINE_STEP + 1) * FINE_STEP
        else:
            b = b * 3 // 2 if b & (b - 1) == 0 else 1 << b.bit_length()  # 128, 192, 256, 384, ...
    buckets.append(largest)
    return buckets


def seq_bucket_pairs(token_buckets: Sequence[int], min_seq_bucket: int, max_num_seqs: int) -> list[tuple[int, int]]:
    """Every `(T, S)` step shape to compile: per token bucket, the few-rows and the many-rows S."""
    return [
        (t, s) for t in token_buckets
        for s in sorted({pick_seq_bucket(t, 1, min_seq_bucket, max_num_seqs), pick_seq_bucket(t, t, min_seq_bucket, max_num_seqs)})
    ]


def pick_seq_bucket(token_bucket: int, num_rows: int, min_seq_bucket: int, max_num_seqs: int) -> int:
    """The S that `num_rows` rows use in token bucket `token_bucket` (one of `seq_bucket_pairs`)."""
    small = min(min_seq_bucket, max_num_seqs, token_bucket)
    return small if num_rows <= small else min(token_bucket, max_num_seqs)


def pick_bucket(buckets: Sequence[int], n: int) -> int:
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepInputs:
    """The ragged batch of one step (see docs/architecture.md). All int32.

    token_ids, positions, slot_mapping: [T]; seq_lens, logits_indices: [S]; query_start_loc: [S + 1];
    block_tables: [S, max_pages_per_seq] (None when the rows' pages live in the runner's persistent table:
    then seq_slots [S] is each row's slot there, jengine.worker.input_batch); num_seqs: [1]; prompt_next_ids: [T] (the next prompt token
    after each position, -1 where none; used only for prompt logprobs); want_prompt_logprobs: [] bool;
    lora_slots: [T] (the LoRA device slot of each token's adapter, -1 for none or padding);
    group_slot_mapping [G - 1, T], group_block_tables [G - 1, S, max_pages_per_seq]: the same for layer
    groups 1.. of a model with several (sliding-window layers); None with one group;
    prev_token_index: [T] (asynchronous scheduling: where >= 0, the token is not known on the host yet and
    the step reads it from `prev_tokens`, the previous step's sampled tokens, at that row; -1 elsewhere);
    prev_tokens: [P] (the previous step's sampled tokens, padded; a device array in asynchronous steps).
    """

    token_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    query_start_loc: np.ndarray
    seq_lens: np.ndarray
    num_seqs: np.ndarray
    logits_indices: np.ndarray
    prompt_next_ids: np.ndarray
    want_prompt_logprobs: np.ndarray
    lora_slots: np.ndarray
    prev_token_index: np.ndarray
    prev_tokens: Any
    block_tables: np.ndarray | None = None
    seq_slots: np.ndarray | None = None
    group_slot_mapping: np.ndarray | None = None
    group_block_tables: np.ndarray | None = None


def empty_step_inputs(num_tokens: int, num_seqs: int, max_pages_per_seq: int, num_groups: int = 1, num_prev_tokens: int = 1,
                      pad_slot: Optional[int] = None) -> StepInputs:
    """All-padding inputs of one bucket (warm-up, and the base every step fills in). With `pad_slot`, the
    rows' pages come from the persistent table (`seq_slots`, padding rows at `pad_slot`), not block tables."""
    i32 = np.int32
    tables = pad_slot is None
    extra = num_groups - 1
    return StepInputs(
        token_ids=np.zeros(num_tokens, i32),
        positions=np.zeros(num_tokens, i32),
        slot_mapping=np.zeros(num_tokens, i32),
        query_start_loc=np.zeros(num_seqs + 1, i32),
        seq_lens=np.zeros(num_seqs, i32),
        block_tables=np.zeros((num_seqs, max_pages_per_seq), i32) if tables else None,
        seq_slots=None if tables else np.full(num_seqs, pad_slot, i32),
        num_seqs=np.zeros(1, i32),
        logits_indices=np.zeros(num_seqs, i32),
        prompt_next_ids=np.full(num_tokens, -1, i32),
        want_prompt_logprobs=np.zeros((), np.bool_),
        lora_slots=np.full(num_tokens, -1, i32),
        prev_token_index=np.full(num_tokens, -1, i32),
        prev_tokens=np.zeros(num_prev_tokens, i32),
        group_slot_mapping=np.zeros((extra, num_tokens), i32) if extra else None,
        group_block_tables=np.zeros((extra, num_seqs, max_pages_per_seq), i32) if extra and tables else None,
    )


def logit_rows(scheduled: Sequence) -> list[int]:
    """How many logits rows each scheduled row gets: one, or one per position of a row that verifies
    drafts (its last known token and each draft: speculative decoding). Rows are laid out in order."""
    return [1 + len(getattr(seq, "spec_token_ids", ())) for seq in scheduled]


def num_logit_rows(logits_indices: jax.Array | np.ndarray) -> jax.Array:
    """int32[1]: how many leading rows of `logits_indices` are real (inside the jitted step). Real rows
    point at strictly increasing token positions and padding at 0 (`build_step_inputs`), so the last
    real row is the last nonzero entry, or row 0 (a single row at position 0, or an empty step, where
    one row of padding is harmless)."""
    last = jnp.max(jnp.where(logits_indices > 0, jnp.arange(logits_indices.shape[0], dtype=jnp.int32), 0))
    return jnp.reshape(last + 1, (1,)).astype(jnp.int32)


def build_step_inputs(
    scheduled: Sequence, num_tokens: int, num_seqs: int, max_pages_per_seq: int, page_size: int, lora_slots: Sequence[int] = (),
    num_groups: int = 1, seq_slots: Optional[Sequence[int]] = None, pad_slot: int = 0,
) -> StepInputs:
    """Lays the scheduled sequences (decode rows first) into the bucket `(num_tokens, num_seqs)`.

    Each item of `scheduled` has `.request` (with `prompt_token_ids`, `output_token_ids` and
    `sampling_params`), `.start` (tokens already computed), `.num_new_tokens`, `.block_ids` and optionally
    `.spec_token_ids` (drafts: the last of its new tokens). `num_seqs` must hold the rows and their
    logits rows (`logit_rows`). `lora_slots`, when given, is each row's adapter slot (-1: none).
    With `num_groups` > 1 each item also has `.group_block_ids` (the page lists of groups 1..).
    With `seq_slots` (each row's slot in the persistent table), no block tables are built: the step
    gathers them on the device; padding rows get `pad_slot`.
    """
    x = empty_step_inputs(num_tokens, num_seqs, max_pages_per_seq, num_groups, pad_slot=None if seq_slots is None else pad_slot)
    cursor = logit = 0
    for row, seq in enumerate(scheduled):
        n, start = seq.num_new_tokens, seq.start
        end = start + n
        request = seq.request
        prompt = request.prompt_token_ids
        num_prompt = len(prompt)
        drafts = getattr(seq, "spec_token_ids", ())
        known = n - len(drafts)
        # Under asynchronous scheduling the last known token may still be on the device (a placeholder):
        # the slice is then one short and the runner fills that position from `prev_tokens`.
        known_ids = _token_slice(prompt, request.output_token_ids, start, start + known)
        x.token_ids[cursor:cursor + len(known_ids)] = known_ids
        x.token_ids[cursor + known:cursor + n] = drafts
        pos = np.arange(start, end, dtype=np.int32)
        x.positions[cursor:cursor + n] = pos
        pages = np.asarray(seq.block_ids, dtype=np.int32)
        x.slot_mapping[cursor:cursor + n] = pages[pos // page_size] * page_size + pos % page_size
        if x.block_tables is not None:
            x.block_tables[row, :len(pages)] = pages
        if num_groups > 1:
            _fill_groups(x, seq.group_block_ids, row, cursor, pos, page_size)
        x.seq_lens[row] = end
        if lora_slots:
            x.lora_slots[cursor:cursor + n] = lora_slots[row]
        cursor += n
        x.query_start_loc[row + 1] = cursor
        x.logits_indices[logit:logit + len(drafts) + 1] = np.arange(cursor - len(drafts) - 1, cursor)
        logit += len(drafts) + 1
        if request.sampling_params.prompt_logprobs is not None and start < num_prompt:
            # Position p's logits predict prompt token p + 1.
            last = min(end, num_prompt - 1)
            if last > start:
                x.prompt_next_ids[cursor - n:cursor - n + (last - start)] = prompt[start + 1:last + 1]
            x.want_prompt_logprobs = np.ones((), np.bool_)
    rows = len(scheduled)
    if x.seq_slots is not None:
        x.seq_slots[:rows] = seq_slots
    x.query_start_loc[rows + 1:] = cursor
    x.num_seqs[0] = rows
    return x


def _fill_groups(x: StepInputs, group_pages: Sequence[Sequence[int]], row: int, cursor: int, pos: np.ndarray, page_size: int) -> None:
    """Slot mapping and block table of groups 1.. for one row (a sliding window's skipped pages are 0)."""
    assert x.group_slot_mapping is not None
    for g, ids in enumerate(group_pages):
        pages = np.asarray(ids, dtype=np.int32)
        x.group_slot_mapping[g, cursor:cursor + len(pos)] = pages[pos // page_size] * page_size + pos % page_size
        if x.group_block_tables is not None:
            x.group_block_tables[g, row, :len(pages)] = pages


def _token_slice(prompt: Sequence[int], output: Sequence[int], start: int, end: int) -> Sequence[int]:
    """Tokens `[start, end)` of prompt + output without building the whole concatenation."""
    p = len(prompt)
    if start >= p:
        return output[start - p:end - p]
    if end <= p:
        return prompt[start:end]
    return list(prompt[start:]) + list(output[:end - p])
