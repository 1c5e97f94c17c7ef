"""The model runner: owns the device state (weights, KV cache, the persistent batch) and the jitted step.

    forward(params, kv_cache, StepInputs, block_table, lora) -> (kv_cache, logits[S, V], hidden[T, H], sample_pos[S])
    sample(logits, slot_params, penalty_state, row_slots, sample_pos, StepPenalties, StepMask, prev_tokens)
        -> (SamplerOutput, padded tokens, penalty_state)                                 # gathers SamplingTensors

Per-request state (sampling parameters, seeds, stop tokens, logit bias, penalty counts, block tables)
lives in the persistent batch (`jengine.worker.input_batch`): device arrays indexed by slot, changed by small
bucketed updates when rows join, leave or gain pages, so a step sends only its ragged inputs and slots.

The same compiled forward serves prefill, chunked prefill and decode. Every `(tokens, sequences)`
bucket is compiled at warm-up (on worker threads, most likely needed first, through the persistent
compilation cache; `jengine.worker.warmup`). With `compile_in_background` warm-up returns once the
first pieces are compiled and a step whose piece is still compiling waits for it. A
`jax.monitoring` listener counts every compilation a step triggers, so tests and `/metrics` can
check that serving never compiles.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import threading
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jengine import pallas_kernels
from jengine.attention import AttentionMetadata
from jengine.config import EngineConfig
from jengine.core.kv_cache_layout import build_layout
from jengine.sampler import SamplerOutput, prompt_logprobs, sample
from jengine.worker.input_batch import (
    PenaltyState, RowTable, SlotParams, StepMask, StepPenalties, StepSampling, TableUpdate, apply_blocks, apply_params,
    apply_penalty_rows, commit_penalty_tokens, gather_sampling_tensors, penalty_state_bytes,
)
from jengine.worker.warmup import PieceCompiler
from jengine.worker.step_inputs import (
    StepInputs, build_step_inputs, empty_step_inputs, make_token_buckets, num_logit_rows, pick_bucket, pick_seq_bucket, seq_bucket_pairs,
)

logger = logging.getLogger(__name__)

_CPU_DEFAULT_KV_BYTES = 4 << 30
MAX_STOP_TOKENS = 16  # EOS + stop_token_ids a request below min_tokens may ban
MAX_LOGIT_BIAS = 300  # logit_bias entries per request
_ACTIVATION_RESERVE_FRACTION = 0.1
_TABLE_UPDATES = ("table_params", "table_blocks", "table_penalties")  # the persistent batch's jitted scatters


class _CompileCounter:
    """Counts XLA lowerings that happen while a runner executes a step (listener registered once).

    `execute` marks its thread with the running runner, so each runner counts only the compilations
    its own steps trigger, however many engines share the process.
    """

    _lock = threading.Lock()
    _registered = False
    _active = threading.local()

    @classmethod
    def install(cls) -> None:
        with cls._lock:
            if cls._registered:
                return

            def listener(event: str, duration_secs: float, **kwargs: str | int) -> None:
                runner = getattr(cls._active, "runner", None)
                if runner is not None and event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
                    runner._compilations += 1

            jax.monitoring.register_event_duration_secs_listener(listener)
            cls._registered = True

    @classmethod
    @contextlib.contextmanager
    def watching(cls, runner: "ModelRunner"):
        cls._active.runner = runner
        try:
            yield
        finally:
            cls._active.runner = None


@dataclasses.dataclass
class StepOutputs:
    """What one step sends back to the host (numpy); prompt fields are None unless asked for."""

    token_ids: np.ndarray  # [S] sampled tokens
    logprobs: np.ndarray  # [S] logprob of each sampled token
    ranks: np.ndarray  # [S] 1-based rank of each sampled token
    topk_ids: np.ndarray  # [S, max_logprobs]
    topk_logprobs: np.ndarray  # [S, max_logprobs]
    prompt_logprobs: Optional[np.ndarray]  # [T] logprob of the next prompt token at each position
    prompt_ranks: Optional[np.ndarray]  # [T]
    prompt_topk_ids: Optional[np.ndarray]  # [T, max_logprobs]
    prompt_topk_logprobs: Optional[np.ndarray]  # [T, max_logprobs]


MaskFiller = Callable[[np.ndarray], None]  # writes structured-output masks into a step's host bitmask


@dataclasses.dataclass
class InFlightStep:
    """A dispatched step whose outputs are still on the device (asynchronous scheduling)."""

    out: SamplerOutput
    prompt: Any  # prompt logprobs (4 arrays) or None
    tokens: jax.Array  # i32[max_logit_rows]: the sampled tokens, padded (the next step's `prev_tokens`)


@dataclasses.dataclass
class PrevTokens:
    """What a step needs of the previous, still running one: `rows` are (this step's row, the previous
    step's row that samples its last token) pairs, `tokens` that step's padded sampled tokens."""

    rows: list[tuple[int, int]]
    tokens: jax.Array


def _count_host(sent: Optional[dict[str, int]], name: str, tree: Any) -> None:
    """Adds the bytes of the host (numpy) arrays in `tree`, by field, to `sent`: what a step transfers
    (only when recording: `ModelRunner.record_host_inputs`)."""
    if sent is None:
        return
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if isinstance(leaf, (np.ndarray, np.generic)):
            key = name + jax.tree_util.keystr(path)
            sent[key] = sent.get(key, 0) + int(leaf.nbytes)


def _dtype_bytes(dtype: Any) -> int:
    return jnp.dtype(dtype).itemsize


def kv_cache_dtype(name: str, model_dtype: Any) -> Any:
    """The KV cache's element type for CacheConfig.cache_dtype: "auto" is the model's dtype, "fp8" and
    "fp8_e4m3" vLLM's names for float8 e4m3fn."""
    if name == "auto":
        return jnp.dtype(model_dtype)
    if name in ("fp8", "fp8_e4m3"):
        return jnp.dtype(pallas_kernels.KV_FP8)
    return jnp.dtype(name)


def kv_budget_from_stats(stats: Optional[Mapping[str, int]], utilization: float, later_bytes: int) -> Optional[int]:
    """The KV cache's bytes on an accelerator: `utilization` of its memory limit, less what is in use
    (the weights), an activation reserve (a tenth of the limit) and `later_bytes` the runner allocates
    after the cache; None where the device reports no limit (the CPU)."""
    if not stats or "bytes_limit" not in stats:
        return None
    limit = stats["bytes_limit"]
    return max(0, int(limit * utilization - stats.get("bytes_in_use", 0) - _ACTIVATION_RESERVE_FRACTION * limit - later_bytes))


class ModelRunner:
    """Runs the model over bucketed ragged batches; see the module docstring."""

    def __init__(self, config: EngineConfig, loaded: Any, max_model_len: int, plan: Any = None, extra_page_bytes: int = 0):
        self.config = config
        # Bytes per page that another cache indexed by the same page ids takes (a draft model's: jengine.spec_decode.draft_model).
        self.extra_page_bytes = extra_page_bytes
        self.model_config = mc = loaded.config
        self.dtype = jnp.dtype(loaded.dtype)
        self.cache_dtype = kv_cache_dtype(config.cache.cache_dtype, self.dtype)
        self.backend = pallas_kernels.resolve_backend(config.attention_backend)
        self.interpret = pallas_kernels.runs_interpreted(self.backend)
        if self.interpret:
            logger.warning("attention backend %r on %s runs in Pallas interpret mode (slow)", self.backend, jax.default_backend())
        self.page_size = config.cache.block_size
        self.max_model_len = max_model_len
        self.max_pages_per_seq = math.ceil(max_model_len / self.page_size)
        sc = config.scheduler
        # Rows of a step's logits: one per sequence, or 1 + k for a sequence verifying k drafts.
        spec = config.speculative
        self.max_logit_rows = sc.max_num_seqs * (1 + (spec.num_speculative_tokens if spec else 0))
        self.min_seq_bucket = sc.min_seq_bucket
        self.token_buckets = make_token_buckets(sc.min_token_bucket, sc.max_num_batched_tokens)
        self.step_buckets = seq_bucket_pairs(self.token_buckets, sc.min_seq_bucket, self.max_logit_rows)
        self.seq_buckets = sorted({s for _, s in self.step_buckets})
        self.max_logprobs = config.max_logprobs
        self.vocab_size = mc.vocab_size

        self.plan = plan  # jengine.sharding.TensorParallelPlan, or None on one device
        self.graphdef, self.params = nnx.split(loaded.model)
        uniform_pages = self._num_pages_per_layer()
        if config.parallel.num_processes > 1:
            from jengine.sharding import distributed

            uniform_pages = distributed.agree_min("pages_per_layer", uniform_pages)
        # Layer groups: sliding-window layers get pages for their window only (jengine.core.kv_cache_layout).
        self.kv_layout = build_layout(
            mc, uniform_pages, page_size=self.page_size, max_model_len=max_model_len, max_num_seqs=sc.max_num_seqs,
            max_num_batched_tokens=sc.max_num_batched_tokens, enabled=not sc.disable_hybrid_kv_cache_manager,
        )
        self.num_kv_groups = len(self.kv_layout.groups)
        self.pages_per_layer = self.kv_layout.groups[0].num_pages  # group 0's (every layer's with one group)
        total_pages = self.kv_layout.total_pages
        if self.num_kv_groups > 1:
            logger.info("KV cache layer groups: %s", ", ".join(
                f"{'full attention' if g.sliding_window is None else f'window {g.sliding_window}'}: "
                f"{len(g.layers)} layers x {g.num_pages} pages" for g in self.kv_layout.groups))

        def make_cache() -> Any:
            return pallas_kernels.new_kv_cache(total_pages, self.page_size, mc.num_kv_heads, mc.head_dim, self.cache_dtype, backend=self.backend)

        self.kv_cache = plan.place_cache(make_cache) if plan is not None else make_cache()
        self.kv_cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self.kv_cache))
        self.lora = None  # jengine.lora.manager.LoRAManager when LoRA adapters are enabled
        if config.lora is not None:
            from jengine.lora.manager import LoRAManager
            from jengine.lora.peft import lora_targets
            from jengine.models import get_model_class

            targets = lora_targets(get_model_class(mc.architecture), mc)
            self.lora = LoRAManager(config.lora, targets, mc.num_layers, self.dtype, plan)
        _CompileCounter.install()
        self._compilations = 0  # lowerings during execute(), i.e. after warm-up
        self._forward = jax.jit(self._forward_fn, donate_argnums=(1,))
        self._sample = jax.jit(self._sample_fn, donate_argnums=(2,))
        self._prompt_lp = jax.jit(self._prompt_logprobs_fn)
        self._apply_params = jax.jit(apply_params)
        self._apply_blocks = jax.jit(apply_blocks)
        self._apply_penalty_rows = jax.jit(apply_penalty_rows, donate_argnums=(0,))
        # The persistent batch: the host's slot table and mirror, and the device arrays it updates.
        self.rows = RowTable(
            max_num_seqs=sc.max_num_seqs, num_groups=self.num_kv_groups, max_pages_per_seq=self.max_pages_per_seq,
            vocab_size=self.vocab_size, max_stop_tokens=MAX_STOP_TOKENS, max_logit_bias=MAX_LOGIT_BIAS,
            max_logprobs=self.max_logprobs, num_speculative_tokens=spec.num_speculative_tokens if spec else 0,
        )
        self._host_inputs_only = config.parallel.num_processes > 1  # several processes publish numpy inputs
        self.slot_params: Any = self._place(self.rows.initial_params(), always=True)
        self.block_table: Any = self._place(self.rows.initial_blocks(), always=True)
        self.penalty_state: Any = self._place(self.rows.initial_penalties(), always=True)
        self._unapplied = False  # a prepared table update has not reached the device yet
        self.record_host_inputs = False  # tests: record the bytes of each host array a step sends
        self.last_host_inputs: dict[str, int] = {}
        if plan is not None:
            from jengine.sharding import pin_runner_shardings

            pin_runner_shardings(self, plan)  # stable shardings: warm-up builds what serving runs
        # Penalty data and bitmask of a step without penalised or constrained rows: on the devices, one per seq bucket.
        self._neutral_penalties = {s: self._place(self.rows.neutral_penalties(s)) for s in self.seq_buckets}
        self._neutral_mask = {s: self._place(self.rows.neutral_mask(s)) for s in self.seq_buckets}
        # `prev_tokens` of a step with nothing to read from the previous one. On the devices, placed like the
        # sampler's padded tokens, so warm-up and every step (synchronous or not) use one executable per bucket
        # (with a mesh, a numpy argument and a replicated array lowered apart); several processes publish
        # numpy inputs (and never schedule asynchronously).
        zeros = np.zeros(self.max_logit_rows, np.int32)
        if config.parallel.num_processes > 1:
            self._no_prev_tokens: Any = zeros
        else:
            self._no_prev_tokens = jax.device_put(zeros, plan.replicated) if plan is not None else jax.device_put(zeros)
        self.warmup_seconds = 0.0
        self._compiler: Optional[PieceCompiler] = None
        self.bucket_waits = 0  # steps that waited for a piece still compiling in the background
        self.bucket_wait_seconds = 0.0

    # ----- sizing -------------------------------------------------------------------------------
    def _page_bytes_all_layers(self) -> int:
        mc = self.model_config
        shards = self.plan.kv_shards if self.plan is not None else 1
        own = self.page_size * 2 * mc.num_kv_heads * mc.head_dim * _dtype_bytes(self.cache_dtype) * mc.num_layers // shards
        return own + self.extra_page_bytes

    def _num_pages_per_layer(self) -> int:
        """Pages per layer from the memory budget (page 0 of each layer is the null page)."""
        cc, sc = self.config.cache, self.config.scheduler
        useful_cap = sc.max_num_seqs * self.max_pages_per_seq + 1  # more pages could never be used
        if cc.num_gpu_blocks_override is not None:
            pages = cc.num_gpu_blocks_override
        else:
            budget = cc.kv_cache_memory_bytes
            if budget is None:
                budget = self._device_kv_budget()
            pages = min(int(budget // self._page_bytes_all_layers()), useful_cap)
        if pages < self.max_pages_per_seq + 1:
            need = (self.max_pages_per_seq + 1) * self._page_bytes_all_layers()
            raise ValueError(
                f"max_model_len={self.max_model_len} needs {self.max_pages_per_seq} KV-cache pages of "
                f"{self.page_size} tokens per sequence, but the cache holds only {max(pages - 1, 0)} "
                f"(about {need / 2**20:.0f} MiB needed). Lower max_model_len, or raise "
                f"kv_cache_memory_bytes / gpu_memory_utilization (--kv-cache-memory-bytes, "
                f"--gpu-memory-utilization)."
            )
        return pages

    def _device_kv_budget(self) -> int:
        device = jax.local_devices()[0]
        stats = device.memory_stats() if device.platform != "cpu" else None
        # The persistent batch's penalty table is allocated after the cache is sized: leave room for it.
        later = penalty_state_bytes(self.config.scheduler.max_num_seqs, self.vocab_size)
        budget = kv_budget_from_stats(stats, self.config.cache.gpu_memory_utilization, later)
        return _CPU_DEFAULT_KV_BYTES if budget is None else budget

    def _matmul_precision(self) -> Any:
        """float32 models compute their matmuls in float32 on every platform.

        An accelerator's default precision for a float32 matmul is lower (TF32 on NVIDIA GPUs,
        bfloat16 passes on TPUs), which would break greedy parity with Hugging Face in float32; on
        the CPU it changes nothing.
        """
        return jax.default_matmul_precision("highest") if self.dtype == jnp.float32 else contextlib.nullcontext()

    def _place(self, tree: Any, always: bool = False) -> Any:
        """Puts host arrays on the devices (replicated under a mesh) for arguments that are device arrays
        in every step, so each piece has one executable. With several processes, step inputs stay numpy
        (they are published to the workers) unless `always` (state every process builds itself)."""
        if self._host_inputs_only and not always:
            return tree
        if self.plan is None:
            return jax.device_put(tree)
        sharding = self.plan.replicated
        return jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx]), tree)

    # ----- the step ---------------------------------------------------------------------------
    # The step is three jitted pieces so each compiles only over the shapes it depends on:
    # the model over (T, S) buckets, the sampler over S, prompt logprobs over T.
    def _forward_fn(self, params, kv_cache, inputs: StepInputs, block_table, lora_stacks=None):
        with self._matmul_precision():
            return self._forward_body(params, kv_cache, inputs, block_table, lora_stacks)

    def _forward_body(self, params, kv_cache, inputs: StepInputs, block_table, lora_stacks=None):
        model = nnx.merge(self.graphdef, params)
        if lora_stacks:  # adapters: the targeted projections become LoRAWeights for this step only
            assert self.lora is not None  # stacks exist only when LoRA is enabled
            self.lora.wrap(model.layers, lora_stacks, inputs.lora_slots)
        tables = block_table[:, inputs.seq_slots]  # [G, S, max_pages]: the rows' pages, from the persistent batch
        md = AttentionMetadata(
            slot_mapping=inputs.slot_mapping,
            seq_lens=inputs.seq_lens,
            block_tables=tables[0],
            query_start_loc=inputs.query_start_loc,
            num_seqs=inputs.num_seqs,
            pages_per_layer=self.pages_per_layer,
            page_size=self.page_size,
            backend=self.backend,
            mesh=self.plan.mesh if self.plan is not None and self.backend != "reference" else None,
            shard_kv=self.plan is not None and self.plan.shard_kv,
            interpret=self.interpret,
            **self._group_metadata(inputs, tables),
            k_scale=self.config.cache.k_scale,
            v_scale=self.config.cache.v_scale,
        )
        # Asynchronous scheduling: tokens the host does not know yet come from the previous step's samples.
        token_ids = jnp.where(inputs.prev_token_index >= 0, inputs.prev_tokens[jnp.maximum(inputs.prev_token_index, 0)], inputs.token_ids)
        kv_cache, hidden = model(kv_cache, token_ids, inputs.positions, md)
        logits = model.compute_logits(hidden[inputs.logits_indices], md, num_logit_rows(inputs.logits_indices))
        return kv_cache, logits, hidden, inputs.positions[inputs.logits_indices]

    def _group_metadata(self, inputs: StepInputs, tables: jax.Array) -> dict[str, Any]:
        """AttentionMetadata fields of layer groups 1.. (none with one group)."""
        if self.num_kv_groups == 1:
            return {}
        return dict(
            group_slot_mapping=inputs.group_slot_mapping, group_block_tables=tables[1:],
            group_windows=self.kv_layout.group_windows, layer_page_offsets=self.kv_layout.layer_offsets(),
        )

    def _sample_fn(self, logits, slot_params: SlotParams, penalty: PenaltyState, row_slots, sample_pos,
                   step_penalties: StepPenalties, mask: StepMask, prev_tokens) -> tuple[SamplerOutput, jax.Array, PenaltyState]:
        """The sampler's output over the rows' state gathered from the persistent batch, its tokens padded
        to `max_logit_rows` (the next step's `prev_tokens`, one shape for every bucket so the forward
        compiles once per bucket), and the penalty state with the step's committed tokens counted."""
        penalty = commit_penalty_tokens(penalty, row_slots, step_penalties, prev_tokens, self.vocab_size)
        sampling = gather_sampling_tensors(slot_params, penalty, row_slots, sample_pos, step_penalties, mask, self.vocab_size)
        out = sample(logits, sampling, max_logprobs=self.max_logprobs)
        padded = jnp.zeros(self.max_logit_rows, jnp.int32).at[:out.token_ids.shape[0]].set(out.token_ids.astype(jnp.int32))
        return out, padded, penalty

    def _prompt_logprobs_fn(self, params, hidden, next_ids):
        model = nnx.merge(self.graphdef, params)
        with self._matmul_precision():
            return prompt_logprobs(model.compute_logits(hidden), jnp.maximum(next_ids, 0), self.max_logprobs)

    def buckets(self) -> list[tuple[int, int]]:
        return list(self.step_buckets)

    def warmup(self, background: bool = False) -> None:
        """Compiles every step piece on worker threads (XLA compiles release the GIL), most needed first.

        With `background`, returns once the pieces a lightly loaded server needs first are compiled
        (`first_pieces`) and lets the rest finish on daemon threads; a step that needs a piece still
        compiling waits for it (`bucket_waits`), never compiles itself. Counting starts either way."""
        start = time.perf_counter()
        pieces = self._warmup_pieces()
        self._compiler = PieceCompiler(pieces, workers=os.cpu_count() or 1)
        first = self.first_pieces() if background else [key for key, _ in pieces]
        self._compiler.wait(first)
        self.warmup_seconds = time.perf_counter() - start
        if self._compiler.all_done:
            logger.info("compiled %d step pieces in %.1f s", len(pieces), self.warmup_seconds)
        else:
            logger.info("compiled the %d step pieces needed first in %.1f s; compiling the other %d in the background",
                        len(first), self.warmup_seconds, len(pieces) - len(first))
            threading.Thread(target=self._log_background_done, name="jengine-compile-log", daemon=True).start()

    def _log_background_done(self) -> None:
        compiler = self._compiler
        assert compiler is not None  # started by warm-up, which starts this thread
        compiler.wait_all()
        logger.info("compiled all %d step pieces in %.1f s (%d steps waited for one, %.1f s in all)",
                    compiler.total, compiler.seconds or 0.0, self.bucket_waits, self.bucket_wait_seconds)

    def _warmup_pieces(self) -> list[tuple[tuple, Any]]:
        """(key, lower function) for every piece, in the order a server is likely to need them: small
        prefill and decode steps of a few rows first, then wider steps, then the larger token buckets,
        then prompt logprobs (only requests that ask for them use it)."""
        kv0 = self.kv_cache  # may be donated (deleted) by the time a worker lowers: lowering reads only its shape
        params, hidden_size, maxp = self.params, self.model_config.hidden_size, self.max_pages_per_seq

        lora0 = self._lora_stacks()  # like kv0: lowering reads only shapes and shardings

        blocks0, slots0, pen0 = self.block_table, self.slot_params, self.penalty_state  # replaced by updates: lowering reads only shapes

        def forward(t: int, s: int) -> Any:
            def lower() -> Any:
                inputs = empty_step_inputs(t, s, maxp, self.num_kv_groups, pad_slot=self.rows.pad_slot)
                inputs.prev_tokens = self._no_prev_tokens
                return self._forward.lower(params, kv0, inputs, blocks0, lora0)
            return lower

        def sampler(s: int) -> Any:
            return lambda: self._sample.lower(
                jax.ShapeDtypeStruct((s, self.vocab_size), jnp.float32), slots0, pen0, np.zeros(s, np.int32),
                jax.ShapeDtypeStruct((s,), jnp.int32), self._neutral_penalties[s], self._neutral_mask[s], self._no_prev_tokens)

        def table_update(kind: str, u: int) -> Any:
            x = self.rows.empty_update(u)
            if kind == "table_params":
                return lambda: self._apply_params.lower(slots0, x.param_slots, x.params)
            if kind == "table_penalties":
                return lambda: self._apply_penalty_rows.lower(pen0, x.penalty_slots, x.penalty_rows)
            return lambda: self._apply_blocks.lower(blocks0, x.block_slots, x.blocks)

        def prompt_lp(t: int) -> Any:
            return lambda: self._prompt_lp.lower(params, jax.ShapeDtypeStruct((t, hidden_size), self.dtype), np.zeros(t, np.int32))

        pieces: list[tuple[tuple, Any]] = []
        seen: set[tuple] = set()

        def add(key: tuple, lower: Any) -> None:
            if key not in seen:
                seen.add(key)
                pieces.append((key, lower))

        for key in self.first_pieces():
            if key[0] == "forward":
                add(key, forward(key[1], key[2]))
            elif key[0] == "sample":
                add(key, sampler(key[1]))
            else:
                add(key, table_update(key[0], key[1]))
        for u in self.rows.buckets:  # every table update, also where `first_pieces` leaves one out
            for kind in _TABLE_UPDATES:
                add((kind, u), table_update(kind, u))
        for t, s in sorted(self.step_buckets):
            add(("forward", t, s), forward(t, s))
            add(("sample", s), sampler(s))
        for t in self.token_buckets:
            add(("prompt_logprobs", t), prompt_lp(t))
        return pieces

    def _lora_stacks(self) -> dict:
        return self.lora.stacks if self.lora is not None else {}

    def first_pieces(self) -> list[tuple]:
        """What a server compiles before it answers /health: a short prompt (up to 64 tokens, such as
        a chat question) and decoding a few rows: the narrowest rows' forward buckets up to 64 tokens
        and their sampler. Anything else waits for its piece (about a second each on 2 CPU cores)."""
        s = min(s for _, s in self.step_buckets)
        small = [t for t, ss in self.step_buckets if ss == s and t <= 64] or [min(self.token_buckets)]
        updates = [(kind, u) for u in self.rows.buckets for kind in _TABLE_UPDATES]  # small scatters
        return [*(("forward", t, s) for t in sorted(small)), ("sample", s), *updates]

    def stop_compiling(self) -> None:
        """Stops background compilation (what is queued is dropped; a piece being compiled finishes)."""
        if self._compiler is not None:
            self._compiler.stop()

    @property
    def compilations_after_warmup(self) -> int:
        return self._compilations

    def release(self, request_ids: Sequence[str]) -> None:
        """Frees the persistent-batch slots of requests that finished or were aborted (host only)."""
        self.rows.release(request_ids)

    def prepare(self, scheduled: Sequence[Any], sampling_rows: Sequence[Any], num_batched_tokens: int,
                prev: Optional["PrevTokens"] = None) -> tuple[StepInputs, StepSampling]:
        """Host half of a step: the bucketed numpy inputs, and the sampling half (the logits rows' slots,
        the persistent batch's changes, the penalty data and bitmask when a row needs them): what a
        multi-host leader publishes, and what `dispatch` runs.

        `prev` (asynchronous scheduling): the rows whose last token the previous, still running step
        samples, and that step's padded sampled tokens on the device."""
        t = pick_bucket(self.token_buckets, max(num_batched_tokens, 1))
        s = pick_seq_bucket(t, max(len(sampling_rows), len(scheduled), 1), self.min_seq_bucket, self.max_logit_rows)
        lora_slots: list[int] = []
        if self.lora is not None:
            with _CompileCounter.watching(self):  # a slot write must never compile either
                lora_slots = self.lora.activate([seq.request.lora_request for seq in scheduled])
        if self._unapplied:  # the last prepared update never reached the device: resend every row's state
            self.rows.invalidate()
        try:
            seq_slots, row_slots, update, penalties, any_mask = self.rows.prepare(
                scheduled, sampling_rows, s, dict(prev.rows) if prev is not None else None)
        except BaseException:
            self.rows.invalidate()  # the mirror may hold changes no update carries
            raise
        self._unapplied = not update.empty or penalties is not None
        inputs = build_step_inputs(scheduled, t, s, self.max_pages_per_seq, self.page_size, lora_slots, self.num_kv_groups,
                                   seq_slots=seq_slots, pad_slot=self.rows.pad_slot)
        inputs.prev_tokens = self._no_prev_tokens
        if prev is not None:  # rows whose last token is still on the device: read it from the previous step
            rows = np.fromiter((r for r, _ in prev.rows), np.int32, len(prev.rows))
            srcs = np.fromiter((i for _, i in prev.rows), np.int32, len(prev.rows))
            inputs.prev_token_index[inputs.query_start_loc[rows + 1] - 1] = srcs
            inputs.prev_tokens = prev.tokens
        if penalties is None:
            penalties = self._neutral_penalties[s]
        mask = self.rows.host_mask(sampling_rows, s) if any_mask else self._neutral_mask[s]
        return inputs, StepSampling(row_slots, penalties, mask, update)

    def _await_pieces(self, inputs: StepInputs, update: TableUpdate) -> None:
        """Waits (off the compiler's threads, never compiling here) for this step's pieces if warm-up left them to the background."""
        compiler = self._compiler
        if compiler is None or compiler.all_done:
            return
        t, s = int(inputs.token_ids.shape[0]), int(inputs.seq_lens.shape[0])
        keys = [("forward", t, s), ("sample", s)] + ([("prompt_logprobs", t)] if bool(inputs.want_prompt_logprobs) else [])
        if update.param_slots is not None:
            keys.append(("table_params", update.param_slots.size))
        if update.block_slots is not None:
            keys.append(("table_blocks", update.block_slots.size))
        if update.penalty_slots is not None:
            keys.append(("table_penalties", update.penalty_slots.size))
        if compiler.ready(keys):
            return
        start = time.perf_counter()
        compiler.wait(keys)
        waited = time.perf_counter() - start
        self.bucket_waits += 1
        self.bucket_wait_seconds += waited
        logger.info("a step waited %.2f s for step bucket (%d tokens, %d rows) to finish compiling", waited, t, s)

    def dispatch(self, inputs: StepInputs, sampling: StepSampling, fill_masks: Optional[MaskFiller] = None) -> "InFlightStep":
        """Applies the step's persistent-batch changes, then enqueues forward, sample and optional prompt
        logprobs on the device and returns at once; the results stay on the device until `fetch`.

        `fill_masks(sampling.token_bitmask)` (structured outputs) writes the rows' allowed-token masks
        into the host array after the forward is enqueued and before the sampler reads it: the
        grammar work runs while the device computes the logits."""
        update = sampling.update
        self._await_pieces(inputs, update)
        sent: Optional[dict[str, int]] = {} if self.record_host_inputs else None
        with _CompileCounter.watching(self):
            if update.param_slots is not None:
                self.slot_params = self._apply_params(self.slot_params, update.param_slots, update.params)
                _count_host(sent, "update.params", (update.param_slots, update.params))
            if update.block_slots is not None:
                self.block_table = self._apply_blocks(self.block_table, update.block_slots, update.blocks)
                _count_host(sent, "update.blocks", (update.block_slots, update.blocks))
            if update.penalty_slots is not None:
                self.penalty_state = self._apply_penalty_rows(self.penalty_state, update.penalty_slots, update.penalty_rows)
                _count_host(sent, "update.penalties", (update.penalty_slots, update.penalty_rows))
            _count_host(sent, "inputs", inputs)
            self.kv_cache, logits, hidden, sample_pos = self._forward(self.params, self.kv_cache, inputs, self.block_table, self._lora_stacks())
            if fill_masks is not None:
                fill_masks(sampling.token_bitmask)
            penalties, mask = sampling.penalties, sampling.mask
            if isinstance(penalties.any_penalties, np.generic):  # host-built: over now
                penalties = self._place(penalties)
            if isinstance(mask.any_constrained, np.generic):  # host-built (filled masks included)
                mask = self._place(mask)
            _count_host(sent, "penalties", sampling.penalties)
            _count_host(sent, "mask", sampling.mask)
            _count_host(sent, "row_slots", sampling.row_slots)
            out, padded, self.penalty_state = self._sample(logits, self.slot_params, self.penalty_state, sampling.row_slots,
                                                           sample_pos, penalties, mask, inputs.prev_tokens)
            self._unapplied = False
            prompt = None
            if inputs.want_prompt_logprobs:
                prompt = self._prompt_lp(self.params, hidden, inputs.prompt_next_ids)
        if sent is not None:
            self.last_host_inputs = sent
        return InFlightStep(out, prompt, padded)

    def fetch(self, step: "InFlightStep") -> StepOutputs:
        """Waits for a dispatched step and copies its outputs to the host (numpy)."""
        with _CompileCounter.watching(self):
            out, prompt = jax.device_get((step.out, step.prompt))
        return StepOutputs(
            token_ids=out.token_ids, logprobs=out.logprobs, ranks=out.ranks, topk_ids=out.topk_ids,
            topk_logprobs=out.topk_logprobs,
            prompt_logprobs=None if prompt is None else prompt[0],
            prompt_ranks=None if prompt is None else prompt[1],
            prompt_topk_ids=None if prompt is None else prompt[2],
            prompt_topk_logprobs=None if prompt is None else prompt[3],
        )

    def run(self, inputs: StepInputs, sampling: Any, fill_masks: Optional[MaskFiller] = None) -> StepOutputs:
        """Device half of a step: forward, sample, optional prompt logprobs; numpy outputs."""
        return self.fetch(self.dispatch(inputs, sampling, fill_masks))

    def execute(self, scheduled: Sequence[Any], sampling_rows: Sequence[Any], num_batched_tokens: int,
                fill_masks: Optional[MaskFiller] = None) -> StepOutputs:
        """Runs one step over `scheduled` (decode rows first); returns host-side numpy outputs."""
        return self.run(*self.prepare(scheduled, sampling_rows, num_batched_tokens), fill_masks)
