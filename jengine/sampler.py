"""On-device sampling over a fixed-shape batch of logits.

`build_sampling_tensors` (host, numpy) turns the per-request state of the S rows of a batch into a
`SamplingTensors` pytree whose array shapes depend only on (S, vocab size, and a fixed config:
`max_stop_tokens`, `max_logprobs`, `max_logit_bias`, the pending-draft width). So the jitted `sample` compiles
once per S bucket whatever the requests ask for; expensive stages are skipped at run time with
`lax.cond` on host-computed scalar flags instead of being specialised at trace time.

Order of operations (as vLLM's V1 sampler does):

0. structured outputs: tokens a row's grammar does not allow get -inf (a packed bitmask from
   `jengine.structured_output`), before everything else, so nothing below can bring them back and
   logprobs are those of the constrained distribution (vLLM masks the logits before its sampler too);
1. raw logprobs: `log_softmax` of the model's logits, before any processing (vLLM's default
   ``logprobs_mode="raw_logprobs"``); only computed when some row asked for logprobs;
2. min_tokens: the EOS and stop token ids of rows that have not yet produced `min_tokens` get -inf;
   then logit_bias: each row's biases are added to their tokens' logits;
3. penalties: repetition (over prompt + output tokens), then frequency and presence (output tokens);
4. greedy rows (temperature 0) take the argmax (ties: lowest id) of the penalised logits;
5. other rows: temperature, min_p, top_k, top_p, then one draw from what is left.

min_tokens and logit_bias touch only the few ids involved (scatters). Penalties read dense per-request
state: each row's output-token counts `[V]` and its prompt's token bits, rows of tables that the engine
keeps on the device across steps (`jengine.worker.input_batch`, counted there as tokens are sampled, so
rows with penalties need no host history and can be scheduled asynchronously); the host builder
makes the same tables for a batch of its own.

Cost notes (2 CPU cores, S=128, V=49152): a full sort of the logits costs ~1.5 s, far more than a decode
step, so nothing here sorts over V. top-k / top-p thresholds come from `lax.top_k` over a small number of
candidates (`num_candidates`, default 64); a row whose top_k is larger, or whose top_p mass is not reached
inside its candidates, gets an exact threshold from a 32-step bisection over the float32 bit patterns
(only run when some row needs it). That is what accelerators run; on the CPU, where XLA's `top_k` over
[64, 49152] alone takes 16 ms and the bisection ~90 ms, both thresholds come from a native radix select
per row instead (`pallas_kernels/cpu_sampling.cc`: the same cut, two passes over a row). Sampling uses one uniform per row and an inverse CDF computed with a
two-level (block, then within-block) cumulative sum, so no [S, V] random numbers are drawn.

Masks are thresholds on values: every token tied with the last kept token is kept too (vLLM does the same
for top-k; for top-p it breaks ties by sort position instead, which only matters for exactly tied logits).

Seeded reproducibility: row r draws its uniform from ``fold_in(key(seed_r), step_r)`` where ``step_r`` is
the number of tokens the request has generated, and every stage is row-wise, so a seeded request gets the
same tokens whatever else shares the batch and whichever row it sits in.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jengine.pallas_kernels import cpu_sampling
from jengine.sampling_params import SamplingParams

_SAMPLING_EPS = 1e-5
DEFAULT_NUM_CANDIDATES = 64
_CDF_BLOCK = 256


# --------------------------------------------------------------------------------------------- pytrees


Tensor = jax.Array | np.ndarray  # a host (numpy) array or a device array
Flag = jax.Array | np.bool_  # a host or device boolean scalar


@dataclasses.dataclass(frozen=True)
class SamplingTensors:
    """Per-row sampling state of a batch of S rows (arrays; shapes fixed by S, V and the config).

    Token-id arrays are padded with V (the vocab size): out-of-range ids are dropped by the scatters.
    Built as numpy arrays on the host, seen as `jax.Array`s inside the jitted step.
    """

    temperature: Tensor  # f32[S]; 0 = greedy (padding rows are greedy)
    top_k: Tensor  # i32[S]; 0 = off
    top_p: Tensor  # f32[S]; 1 = off
    min_p: Tensor  # f32[S]; 0 = off
    presence_penalty: Tensor  # f32[S]
    frequency_penalty: Tensor  # f32[S]
    repetition_penalty: Tensor  # f32[S]; 1 = off
    key_data: Tensor  # u32[S, 2]; threefry2x32 key data made from the row's 64-bit seed
    step: Tensor  # i32[S]; tokens generated so far (the i-th token uses fold_in(key, i))
    output_counts: Tensor  # i32[R, V]; how often each token is in the output, per penalty row (R: the
    #   host builder's S rows, or the persistent batch's slots on the device)
    prompt_bits: Tensor  # i32[R, ceil(V / 32)]; the prompt's tokens, packed as `token_bitmask` (rows
    #   with a repetition penalty; all zero otherwise)
    penalty_rows: Tensor  # i32[S]; each row's penalty row
    pending_ids: Tensor  # i32[S, P]; tokens counted for this row only (a verification row's drafts
    #   before its position: they may yet be rejected); V = none
    banned_token_ids: Tensor  # i32[S, K]; EOS + stop_token_ids of rows below min_tokens
    logit_bias_ids: Tensor  # i32[S, B]; token ids of the row's logit_bias
    logit_bias_values: Tensor  # f32[S, B]; the biases added to those ids' logits
    num_logprobs: Tensor  # i32[S]; top logprobs wanted, -1 = no logprobs at all
    token_bitmask: Tensor  # i32[S, ceil(V / 32)]; bit t % 32 of word t // 32: token t allowed
    #   (all ones for rows without structured outputs)
    all_greedy: Flag  # bool[]; skip temperature / filtering / drawing altogether
    any_top_k_or_p: Flag  # bool[]
    any_processing: Flag  # bool[]; some row has banned ids (min_tokens), a logit_bias or penalties
    any_penalties: Flag  # bool[]; some row has penalties (else the count tables are not read)
    any_logprobs: Flag  # bool[]
    any_constrained: Flag  # bool[]; some row has a token bitmask (else it is not read)


jax.tree_util.register_dataclass(
    SamplingTensors,
    data_fields=[f.name for f in dataclasses.fields(SamplingTensors)],
    meta_fields=[],
)


@dataclasses.dataclass(frozen=True)
class SamplerOutput:
    """What one sampling step returns. Logprob fields are zeros when no row asked for logprobs."""

    token_ids: jax.Array  # i32[S]
    logprobs: jax.Array  # f32[S]; raw logprob of the sampled token
    ranks: jax.Array  # i32[S]; 1-based rank of the sampled token among the raw logprobs (ties count)
    topk_ids: jax.Array  # i32[S, max_logprobs]
    topk_logprobs: jax.Array  # f32[S, max_logprobs]


jax.tree_util.register_dataclass(
    SamplerOutput,
    data_fields=[f.name for f in dataclasses.fields(SamplerOutput)],
    meta_fields=[],
)


# ------------------------------------------------------------------------------------------ host side


def has_repetition_penalty(params: SamplingParams) -> bool:
    """Repetition penalty is on (it is the one penalty that also looks at the prompt)."""
    return abs(params.repetition_penalty - 1.0) > _SAMPLING_EPS


def needs_penalties(params: SamplingParams) -> bool:
    return (abs(params.presence_penalty) > _SAMPLING_EPS or abs(params.frequency_penalty) > _SAMPLING_EPS
            or has_repetition_penalty(params))


@dataclasses.dataclass
class RowState:
    """What the builder needs to know about one running request (one sequence)."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    seed: int  # the request's seed, or one the engine drew for an unseeded request
    eos_token_ids: Sequence[int] = ()
    # Outputs that count for good: a speculative verification row's output ends with draft tokens (see
    # jengine.spec_decode), counted for this row only (`pending_ids`). None: all of `output_token_ids`.
    num_committed_outputs: Optional[int] = None
    # Packed allowed-token bits (int32 [ceil(V / 32)]) of a row with structured outputs; None: all allowed.
    token_bitmask: Optional[np.ndarray] = None
    # Sampled tokens not on the host yet (asynchronous scheduling): they count for the seeded step and
    # min_tokens (and, on the device, for penalties).
    num_placeholder_tokens: int = 0

    @property
    def num_committed(self) -> int:
        """How many of `output_token_ids` count for good (all but a verification row's drafts)."""
        return len(self.output_token_ids) if self.num_committed_outputs is None else self.num_committed_outputs


def seed_to_key_data(seed: int) -> tuple[int, int]:
    """Splits a (possibly negative) 64-bit seed into threefry key words (high, low)."""
    seed &= (1 << 64) - 1
    return (seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF


def build_sampling_tensors(
    rows: Sequence[Optional[RowState]],
    num_rows: int,
    *,
    vocab_size: int,
    max_stop_tokens: int = 8,
    max_logprobs: int = 20,
    max_logit_bias: int = 8,
) -> SamplingTensors:
    """Builds the numpy `SamplingTensors` for a batch of `num_rows` rows (rows past len(rows) pad).

    `None` entries are padding: greedy, no penalties, nothing banned. Penalties see a row's whole prompt
    and output (its committed outputs in `output_counts`, the rest in `pending_ids`). Raises ValueError when a row below min_tokens has more than `max_stop_tokens` EOS + stop
    token ids, has more than `max_logit_bias` logit_bias entries or one outside the vocabulary, or asks
    for more logprobs than `max_logprobs`.
    """
    if len(rows) > num_rows:
        raise ValueError(f"{len(rows)} rows do not fit in a batch of {num_rows}")
    S, V = num_rows, vocab_size
    temperature = np.zeros(S, np.float32)
    top_k = np.zeros(S, np.int32)
    top_p = np.ones(S, np.float32)
    min_p = np.zeros(S, np.float32)
    presence = np.zeros(S, np.float32)
    frequency = np.zeros(S, np.float32)
    repetition = np.ones(S, np.float32)
    key_data = np.zeros((S, 2), np.uint32)
    step = np.zeros(S, np.int32)
    banned = np.full((S, max_stop_tokens), V, np.int32)
    bias_ids = np.full((S, max_logit_bias), V, np.int32)
    bias_values = np.zeros((S, max_logit_bias), np.float32)
    num_logprobs = np.full(S, -1, np.int32)
    bitmask, any_constrained = build_token_bitmask(rows, S, V)
    all_greedy = True
    any_kp = False
    any_banned = False
    any_bias = False

    for i, row in enumerate(rows):
        if row is None:
            continue
        p = row.params
        outs = row.output_token_ids
        n_out = len(outs) + row.num_placeholder_tokens
        step[i] = n_out
        key_data[i] = seed_to_key_data(int(row.seed))
        if p.logprobs is not None:
            if p.logprobs > max_logprobs:
                raise ValueError(f"logprobs={p.logprobs} exceeds max_logprobs={max_logprobs}")
            num_logprobs[i] = p.logprobs
        if n_out < p.min_tokens:
            stops = list(p.stop_token_ids or ())
            if not p.ignore_eos:
                stops.extend(row.eos_token_ids)
            if stops:
                if len(stops) > max_stop_tokens:
                    raise ValueError(
                        f"{len(stops)} EOS/stop token ids exceed max_stop_tokens={max_stop_tokens}")
                banned[i, : len(stops)] = stops
                any_banned = True
        if p.logit_bias:
            if len(p.logit_bias) > max_logit_bias:
                raise ValueError(f"{len(p.logit_bias)} logit_bias entries exceed max_logit_bias={max_logit_bias}")
            ids = np.fromiter(p.logit_bias.keys(), np.int64, len(p.logit_bias))
            if ids.min() < 0 or ids.max() >= V:
                raise ValueError(f"logit_bias has token ids outside the vocabulary [0, {V})")
            bias_ids[i, : ids.size] = ids
            bias_values[i, : ids.size] = np.fromiter(p.logit_bias.values(), np.float32, ids.size)
            any_bias = True
        if needs_penalties(p):
            presence[i] = p.presence_penalty
            frequency[i] = p.frequency_penalty
            repetition[i] = p.repetition_penalty
        if p.temperature < _SAMPLING_EPS:
            continue  # greedy: top-k / top-p / min-p do not apply
        all_greedy = False
        temperature[i] = p.temperature
        if p.top_k > 0 and p.top_k < V:
            top_k[i] = p.top_k
            any_kp = True
        if p.top_p < 1.0 - _SAMPLING_EPS:
            top_p[i] = p.top_p
            any_kp = True
        min_p[i] = p.min_p

    counts, prompt_bits, pending, any_penalties = build_penalty_tensors(rows, S, V)
    any_lp = bool((num_logprobs >= 0).any())
    return SamplingTensors(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        presence_penalty=presence, frequency_penalty=frequency, repetition_penalty=repetition,
        key_data=key_data, step=step, output_counts=counts, prompt_bits=prompt_bits,
        penalty_rows=np.arange(S, dtype=np.int32), pending_ids=pending,
        banned_token_ids=banned, logit_bias_ids=bias_ids, logit_bias_values=bias_values, num_logprobs=num_logprobs,
        all_greedy=np.bool_(all_greedy), any_top_k_or_p=np.bool_(any_kp),
        any_processing=np.bool_(any_banned or any_bias or any_penalties), any_penalties=np.bool_(any_penalties),
        any_logprobs=np.bool_(any_lp), token_bitmask=bitmask, any_constrained=np.bool_(any_constrained),
    )


def build_token_bitmask(rows: Sequence[Optional[RowState]], num_rows: int, vocab_size: int) -> tuple[np.ndarray, bool]:
    """The batch's packed allowed-token bitmask [num_rows, ceil(V / 32)] and whether any row is constrained
    (a shared read-only all-ones array when none is; a writable copy otherwise)."""
    mask_rows = [(i, row.token_bitmask) for i, row in enumerate(rows) if row is not None and row.token_bitmask is not None]
    bitmask = _all_allowed(num_rows, -(-vocab_size // 32))
    if mask_rows:
        bitmask = bitmask.copy()
        for i, m in mask_rows:
            bitmask[i] = m
    return bitmask, bool(mask_rows)


def pack_token_bits(token_ids: Sequence[int], vocab_size: int) -> np.ndarray:
    """The packed presence bits (int32 [ceil(V / 32)], the layout of `token_bitmask`) of `token_ids`."""
    bits = np.zeros(-(-vocab_size // 32) * 32, bool)
    bits[np.asarray(token_ids, np.int64)] = True
    words = np.bitwise_or.reduce(bits.reshape(-1, 32).astype(np.uint32) << np.arange(32, dtype=np.uint32), axis=1)
    return words.view(np.int32)


def penalty_counts(rows: Sequence[Optional[RowState]], num_rows: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(output_counts [num_rows, V], prompt_bits [num_rows, ceil(V / 32)]): each row's committed outputs
    counted, and its prompt's bits where a repetition penalty applies; None rows (and rows past
    len(rows)) stay zero. The host builder's tables, and the rows the persistent batch writes whole."""
    V = vocab_size
    counts = np.zeros((num_rows, V), np.int32)
    prompt_bits = np.zeros((num_rows, -(-V // 32)), np.int32)
    for i, row in enumerate(rows):
        if row is None:
            continue
        counts[i] = np.bincount(np.asarray(row.output_token_ids[:row.num_committed], np.int64), minlength=V)
        if has_repetition_penalty(row.params):
            prompt_bits[i] = pack_token_bits(row.prompt_token_ids, V)
    return counts, prompt_bits


def build_penalty_tensors(rows: Sequence[Optional[RowState]], num_rows: int, vocab_size: int
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """(output_counts [S, V], prompt_bits [S, ceil(V / 32)], pending_ids [S, P], any) of a host-built batch:
    `penalty_counts` of the rows with penalties, and the outputs past `num_committed_outputs` (P: the
    most any row has, at least 1)."""
    pens = [row if row is not None and needs_penalties(row.params) else None for row in rows]
    counts, prompt_bits = penalty_counts(pens, num_rows, vocab_size)
    tails = [list(row.output_token_ids[row.num_committed:]) if row is not None else [] for row in pens]
    pending = np.full((num_rows, max([1, *map(len, tails)])), vocab_size, np.int32)
    for i, tail in enumerate(tails):
        pending[i, :len(tail)] = tail
    return counts, prompt_bits, pending, any(row is not None for row in pens)


@functools.lru_cache(maxsize=16)
def _all_allowed(num_rows: int, num_words: int) -> np.ndarray:
    """The read-only all-ones bitmask of a batch shape (no allocation for unconstrained steps)."""
    mask = np.full((num_rows, num_words), -1, np.int32)
    mask.flags.writeable = False
    return mask


# -------------------------------------------------------------------------------------------- device


def unpack_token_bits(bits: jax.Array, vocab_size: int) -> jax.Array:
    """bool[S, V] from packed bits [S, ceil(V / 32)] (bit t % 32 of word t // 32 is token t)."""
    words = lax.bitcast_convert_type(bits, jnp.uint32)
    unpacked = (words[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & jnp.uint32(1)
    return unpacked.reshape(bits.shape[0], -1)[:, :vocab_size] != 0


def apply_token_bitmask(logits: jax.Array, bitmask: Tensor) -> jax.Array:
    """Sets the logits of tokens whose bit is clear in the packed `bitmask` [S, ceil(V / 32)] to -inf."""
    return jnp.where(unpack_token_bits(jnp.asarray(bitmask), logits.shape[1]), logits, -jnp.inf)


def _constrain(logits: jax.Array, t: SamplingTensors) -> jax.Array:
    """`apply_token_bitmask` where some row is constrained. A select on the batch flag, not a `lax.cond`:
    it runs inside the sampler's branches, and a cond nested in a cond makes XLA's CPU backend copy
    the [S, V] logits into it (5 ms at 64 rows, more than the unpacking it would skip)."""
    return jnp.where(t.any_constrained, apply_token_bitmask(logits, t.token_bitmask), logits)


def apply_penalties(x: jax.Array, t: SamplingTensors) -> jax.Array:
    """Repetition (tokens of the prompt or output), then frequency and presence (output tokens), as vLLM,
    over each row's dense counts. Rows without penalties (neutral values) pass through bit-exactly."""
    S, V = x.shape
    rows = jnp.asarray(t.penalty_rows)
    pending = jnp.asarray(t.pending_ids)
    # Elementwise over [S, V] (one fused loop on the CPU): a scatter of the pending ids would write a copy.
    token = lax.broadcasted_iota(jnp.int32, (S, V), 1)
    counts = jnp.asarray(t.output_counts)[rows]
    for p in range(pending.shape[1]):
        counts = counts + (token == pending[:, p:p + 1])
    counts = counts.astype(jnp.float32)
    seen = unpack_token_bits(jnp.asarray(t.prompt_bits)[rows], V) | (counts > 0)
    rep = t.repetition_penalty[:, None]
    penalised = jnp.where(x > 0, x / rep, x * rep)
    penalised = penalised - t.frequency_penalty[:, None] * counts - t.presence_penalty[:, None] * (counts > 0)
    return jnp.where(seen, penalised, x)


def apply_min_tokens_and_penalties(logits: jax.Array, t: SamplingTensors) -> jax.Array:
    """min_tokens masking, logit_bias, then penalties (`apply_penalties`, only when some row has them).
    min_tokens and logit_bias scatter only the ids involved (padding ids, == V, are dropped)."""
    S, V = logits.shape
    rows = jnp.arange(S, dtype=jnp.int32)[:, None]
    x = logits.at[rows, t.banned_token_ids].set(-jnp.inf, mode="drop")
    x = x.at[rows, t.logit_bias_ids].add(t.logit_bias_values, mode="drop")
    return lax.cond(t.any_penalties, lambda y: apply_penalties(y, t), lambda y: y, x)


def argmax_rows(x: jax.Array, block: int = 256) -> jax.Array:
    """`jnp.argmax(x, axis=-1)` (the first index of each row's maximum) as int32, in two levels: the
    blocks' maxima, then the first block holding the row's maximum. XLA's CPU argmax is a scalar
    variadic reduction (14 ms over [64, 49152] on 2 cores); a plain max reduction and two small
    argmaxes take 0.4 ms. A row with a NaN gets some id in [0, V) (as with jnp.argmax: garbage in)."""
    S, V = x.shape
    nb = -(-V // block)
    if nb * block != V:
        x = jnp.pad(x, ((0, 0), (0, nb * block - V)), constant_values=-jnp.inf)
    blocks = x.reshape(S, nb, block)
    first = jnp.argmax(jnp.max(blocks, axis=-1), axis=-1)
    within = jnp.take_along_axis(blocks, first[:, None, None], axis=1)[:, 0]
    return (first * block + jnp.argmax(within, axis=-1)).astype(jnp.int32)


def _ordered_bits(x: jax.Array) -> jax.Array:
    """Maps float32 to uint32 so that the integer order is the float order (no NaNs expected)."""
    b = lax.bitcast_convert_type(x, jnp.int32)
    b = jnp.where(b < 0, b ^ jnp.int32(0x7FFFFFFF), b)
    return lax.bitcast_convert_type(b ^ jnp.int32(-(2**31)), jnp.uint32)


def _unordered_bits(u: jax.Array) -> jax.Array:
    b = lax.bitcast_convert_type(u, jnp.int32) ^ jnp.int32(-(2**31))
    b = jnp.where(b < 0, b ^ jnp.int32(0x7FFFFFFF), b)
    return lax.bitcast_convert_type(b, jnp.float32)


def _bisect_threshold(keys: jax.Array, score: jax.Array, target: jax.Array) -> jax.Array:
    """Per row, the largest value v of the row with sum(score[keys >= v]) >= target, as a float.

    `keys` are `_ordered_bits` of the values; 32 halvings of the uint32 range find v exactly (it is
    always one of the row's values). Rows where even the full row falls short get their minimum.
    """
    lo = jnp.min(keys, axis=-1)
    hi = jnp.max(keys, axis=-1)

    def body(_, carry):
        lo, hi = carry
        gap = hi - lo
        mid = lo + (gap >> 1) + (gap & 1)
        ok = jnp.sum(jnp.where(keys >= mid[:, None], score, 0.0), axis=-1) >= target
        # mid > lo unless lo == hi; then keep hi (no uint32 underflow when the sum rounds short).
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, jnp.where(mid > lo, mid - 1, lo))

    lo, _ = lax.fori_loop(0, 32, body, (lo, jnp.maximum(hi, lo)))
    return _unordered_bits(lo)


def _filter_weights(xs: jax.Array, row_max: jax.Array, t: SamplingTensors, num_candidates: int,
                    native: Optional[bool] = None) -> tuple[jax.Array, jax.Array]:
    """min_p, then top_k, then top_p on temperature-scaled logits `xs`.

    Returns (weights [S, V]: unnormalised probabilities of the kept tokens, 0 elsewhere; the per-row
    value threshold: tokens with xs >= threshold are kept). The CPU's cuts come from the native radix
    select (`_filter_weights_native`), other platforms' from candidates and bisection (`_filter_weights_xla`);
    `native` True / False forces one (tests, benchmarks). An accelerator's process never builds the
    native kernel (its C++ compile would only add to start-up there).
    """
    if native:
        return _filter_weights_native(xs, row_max, t)
    if native is False or jax.default_backend() != "cpu" or not cpu_sampling.available():
        return _filter_weights_xla(xs, row_max, t, num_candidates)
    return lax.platform_dependent(cpu=lambda: _filter_weights_native(xs, row_max, t),
                                  default=lambda: _filter_weights_xla(xs, row_max, t, num_candidates))


def _min_p_threshold(row_max: jax.Array, t: SamplingTensors) -> jax.Array:
    return jnp.where(t.min_p > 0, row_max + jnp.log(jnp.maximum(t.min_p, 1e-30)), -jnp.inf)


def _filter_weights_native(xs: jax.Array, row_max: jax.Array, t: SamplingTensors) -> tuple[jax.Array, jax.Array]:
    """`_filter_weights` with the native cuts (CPU only): the k-th largest value as the cut of unit
    weights at k, the top-p cut over the probabilities min_p and top_k left. Rows without top-k or
    top-p pass a target of 0 (no cut), so no branch is needed."""
    k_thr = cpu_sampling.mass_threshold(xs, None, jnp.maximum(t.top_k, 0).astype(jnp.float32))
    thr = jnp.maximum(_min_p_threshold(row_max, t), k_thr)
    e = jnp.where(xs >= thr[:, None], jnp.exp(xs - row_max[:, None]), 0.0)
    target = jnp.where(t.top_p < 1.0, t.top_p * jnp.sum(e, axis=-1), 0.0)  # renormalised, as vLLM
    thr = jnp.maximum(thr, cpu_sampling.mass_threshold(xs, e, target))
    return jnp.where(xs >= thr[:, None], e, 0.0), thr


def _filter_weights_xla(xs: jax.Array, row_max: jax.Array, t: SamplingTensors, num_candidates: int
                        ) -> tuple[jax.Array, jax.Array]:
    """`_filter_weights` in `jax.numpy`: thresholds from `lax.top_k` candidates, bisection where they fall short."""
    S, V = xs.shape
    C = min(num_candidates, V)
    min_p_thr = _min_p_threshold(row_max, t)
    k = t.top_k

    def top_k_threshold(_):
        cand = lax.top_k(xs, C)[0]  # [S, C], descending
        k_fast = jnp.take_along_axis(cand, jnp.clip(k - 1, 0, C - 1)[:, None], axis=-1)[:, 0]
        need_bisect = k > C

        def slow(_):
            counts = jnp.minimum(k, V).astype(jnp.float32)
            return _bisect_threshold(_ordered_bits(xs), jnp.float32(1.0), counts)

        k_thr = jnp.where(need_bisect, lax.cond(jnp.any(need_bisect), slow, lambda _: k_fast, None), k_fast)
        return cand, jnp.maximum(min_p_thr, jnp.where(k > 0, k_thr, -jnp.inf))

    def no_top_k(_):
        return jnp.zeros((S, C), xs.dtype), min_p_thr

    cand, thr = lax.cond(t.any_top_k_or_p, top_k_threshold, no_top_k, None)
    e = jnp.where(xs >= thr[:, None], jnp.exp(xs - row_max[:, None]), 0.0)

    def top_p_threshold(_):
        # Over what min_p and top_k left, renormalised (vLLM: softmax of the masked logits).
        target = t.top_p * jnp.sum(e, axis=-1)
        cand_e = jnp.where(cand >= thr[:, None], jnp.exp(cand - row_max[:, None]), 0.0)
        cum = jnp.cumsum(cand_e, axis=-1)
        j = jnp.sum(cum < target[:, None], axis=-1)  # first position whose inclusive mass >= target
        use_p = t.top_p < 1.0
        need_bisect = use_p & (j >= C)
        p_fast = jnp.take_along_axis(cand, jnp.minimum(j, C - 1)[:, None], axis=-1)[:, 0]

        def slow(_):
            return _bisect_threshold(_ordered_bits(xs), e, target)

        p_thr = jnp.where(need_bisect, lax.cond(jnp.any(need_bisect), slow, lambda _: p_fast, None), p_fast)
        return jnp.maximum(thr, jnp.where(use_p, p_thr, -jnp.inf))

    thr = lax.cond(t.any_top_k_or_p, top_p_threshold, lambda _: thr, None)
    return jnp.where(xs >= thr[:, None], e, 0.0), thr


def _inverse_cdf(weights: jax.Array, u: jax.Array) -> jax.Array:
    """Per row, the first index whose cumulative weight reaches u * total (u in (0, 1]).

    Two levels (sums of blocks, then one block) keep the cumulative sums short; the pick always lands
    on a positive weight.
    """
    S, V = weights.shape
    B = _CDF_BLOCK
    nb = -(-V // B)
    w = jnp.pad(weights, ((0, 0), (0, nb * B - V))).reshape(S, nb, B)
    block_cum = jnp.cumsum(jnp.sum(w, axis=-1), axis=-1)  # [S, nb]
    target = u * block_cum[:, -1]
    blk = jnp.sum(block_cum < target[:, None], axis=-1)
    pos_blocks = jnp.where(block_cum > jnp.concatenate(
        [jnp.zeros((S, 1), w.dtype), block_cum[:, :-1]], axis=-1), jnp.arange(nb), -1)
    blk = jnp.minimum(blk, jnp.max(pos_blocks, axis=-1))  # rounding: never past the last non-empty block
    before = jnp.where(blk > 0, jnp.take_along_axis(block_cum, jnp.maximum(blk - 1, 0)[:, None], -1)[:, 0], 0.0)
    inner = w[jnp.arange(S), blk]  # [S, B]
    inner_cum = jnp.cumsum(inner, axis=-1)
    idx = jnp.sum(inner_cum < (target - before)[:, None], axis=-1)
    last_pos = jnp.max(jnp.where(inner > 0, jnp.arange(B), 0), axis=-1)
    idx = jnp.minimum(idx, last_pos)
    return (blk * B + idx).astype(jnp.int32)


def _row_uniforms(t: SamplingTensors) -> jax.Array:
    """One uniform in (0, 1] per row from fold_in(key(seed), step): independent of the batch."""

    def one(kd, step):
        key = jax.random.wrap_key_data(kd, impl="threefry2x32")
        return jax.random.uniform(jax.random.fold_in(key, step), (), jnp.float32)

    return 1.0 - jax.vmap(one)(t.key_data, t.step)


def _logprob_outputs(logits: jax.Array, tokens: jax.Array, t: SamplingTensors,
                     max_logprobs: int) -> tuple[jax.Array, ...]:
    """Logprobs of the sampled tokens and the top ones, from the (bitmask-constrained) raw logits."""
    S = logits.shape[0]

    def compute(_):
        lp = jax.nn.log_softmax(_constrain(logits, t), axis=-1)
        tok_lp = jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]
        rank = jnp.sum(lp >= tok_lp[:, None], axis=-1).astype(jnp.int32)
        if max_logprobs:
            top_lp, top_ids = lax.top_k(lp, max_logprobs)
        else:
            top_lp, top_ids = jnp.zeros((S, 0), jnp.float32), jnp.zeros((S, 0), jnp.int32)
        return tok_lp, rank, top_ids.astype(jnp.int32), top_lp

    def skip(_):
        return (jnp.zeros(S, jnp.float32), jnp.zeros(S, jnp.int32),
                jnp.zeros((S, max_logprobs), jnp.int32), jnp.zeros((S, max_logprobs), jnp.float32))

    return lax.cond(t.any_logprobs, compute, skip, None)


def _scale(x: jax.Array, t: SamplingTensors) -> tuple[jax.Array, jax.Array]:
    temp = jnp.where(t.temperature > 0, t.temperature, 1.0)
    xs = x / temp[:, None]
    return xs, jnp.max(xs, axis=-1)


def filtered_logits(logits: jax.Array, t: SamplingTensors, *,
                    num_candidates: int = DEFAULT_NUM_CANDIDATES, native: Optional[bool] = None) -> jax.Array:
    """The logits each row samples from: processed, temperature-scaled, removed tokens at -inf.

    Greedy rows get their (masked, penalised) logits unscaled and unfiltered. For tests and debugging;
    `sample` computes the same thing without materialising it. `native` picks the cuts' computation
    (True: the CPU kernel, False: candidates and bisection; None: the platform's, as `sample`).
    """
    x = apply_min_tokens_and_penalties(_constrain(logits.astype(jnp.float32), t), t)
    xs, row_max = _scale(x, t)
    _, thr = _filter_weights(xs, row_max, t, num_candidates, native)
    kept = jnp.where(xs >= thr[:, None], xs, -jnp.inf)
    return jnp.where((t.temperature > 0)[:, None], kept, x)


def sample(logits: jax.Array, t: SamplingTensors, *, max_logprobs: int = 20,
           num_candidates: int = DEFAULT_NUM_CANDIDATES, native: Optional[bool] = None) -> SamplerOutput:
    """Picks one token per row of `logits` [S, V] (float32). Jittable; `max_logprobs` (the width of
    the top-logprobs outputs), `num_candidates` and `native` (how the top-k / top-p cuts are computed,
    see `_filter_weights`) are static: use `sample_jit` or close over them."""
    logits = logits.astype(jnp.float32)

    def processed() -> jax.Array:
        return apply_min_tokens_and_penalties(_constrain(logits, t), t)

    def drawn(_):
        x = processed()
        xs, row_max = _scale(x, t)
        w, _ = _filter_weights(xs, row_max, t, num_candidates, native)
        return jnp.where(t.temperature > 0, _inverse_cdf(w, _row_uniforms(t)), argmax_rows(x))

    # Three branches side by side, none nested in another (on the CPU a cond inside a cond copies the
    # [S, V] logits into it): the common greedy batch with nothing to mask, ban or penalise takes the
    # argmax of the raw logits; a greedy batch that needs processing, of the processed ones; a batch
    # with sampled rows draws. The bitmask is a select inside the branches that read it.
    plain = t.all_greedy & jnp.logical_not(t.any_processing) & jnp.logical_not(t.any_constrained)
    branch = jnp.where(plain, 0, jnp.where(t.all_greedy, 1, 2)).astype(jnp.int32)
    tokens = lax.switch(branch, [lambda _: argmax_rows(logits), lambda _: argmax_rows(processed()), drawn], None)
    tok_lp, rank, top_ids, top_lp = _logprob_outputs(logits, tokens, t, max_logprobs)
    return SamplerOutput(token_ids=tokens, logprobs=tok_lp, ranks=rank, topk_ids=top_ids,
                         topk_logprobs=top_lp)


sample_jit = jax.jit(sample, static_argnames=("max_logprobs", "num_candidates", "native"))


def prompt_logprobs(logits: jax.Array, next_token_ids: jax.Array, k: int
                    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Raw logprobs for prompt positions: position i's logits predict `next_token_ids[i]`.

    Returns (token_logprobs[T], token_ranks[T] (1-based, ties count), topk_ids[T, k], topk_logprobs[T, k]).
    `k` is static. Padding positions may carry any id in [0, V); their results are meaningless.
    """
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    tok_lp = jnp.take_along_axis(lp, next_token_ids[:, None].astype(jnp.int32), axis=-1)[:, 0]
    rank = jnp.sum(lp >= tok_lp[:, None], axis=-1).astype(jnp.int32)
    if k:
        top_lp, top_ids = lax.top_k(lp, k)
    else:
        top_lp, top_ids = jnp.zeros((lp.shape[0], 0), jnp.float32), jnp.zeros((lp.shape[0], 0), jnp.int32)
    return tok_lp, rank, top_ids.astype(jnp.int32), top_lp


prompt_logprobs_jit = jax.jit(prompt_logprobs, static_argnames=("k",))
