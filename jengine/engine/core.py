"""`EngineCore`: the heart of the engine, one `step()` at a time.

    Scheduler.schedule() -> ModelRunner.execute() -> Scheduler.update_from_output() -> OutputProcessor

With asynchronous scheduling (`async_scheduling`) a step is dispatched to the device before the previous
step's sampled tokens reach the host: `step()` schedules and dispatches step N+1 (its rows that consume
step N's tokens read them on the device), then fetches step N's tokens and processes its outputs while the
device runs step N+1. Penalties are counted on the device (`jengine.worker.input_batch`). A step with
structured-output rows splits around its forward: once the forward of N+1 is on the device, the host
takes step N's tokens, advances the grammars and only then writes N+1's masks and enqueues its
sampler, so the grammar work overlaps the forward. Speculative decoding and several processes run
synchronously (their drafts and broadcast inputs need the host's tokens).

It owns the model runner (device), the KV cache manager, request registry and scheduler (host), and the
output processor (detokenization, stop strings, logprobs). A sequence's state lives on its `Request`
record and every way it ends (finish, stop string, abort, error) goes through `RequestRegistry.free`.
Frontends drive it: `LLM` calls `step()` in a loop; the asyncio engine runs it on its own thread.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from jengine.config import EngineConfig, default_compilation_cache_dir
from jengine import sharding
from jengine.core.hybrid_kv_cache_manager import make_kv_cache_manager
from jengine.core.registry import RequestRegistry
from jengine.core.scheduler import Scheduler, SchedulerOutput
from jengine.engine.output_processor import OutputProcessor
from jengine.loader import load_model
from jengine.lora.request import LoRARequest
from jengine.outputs import RequestOutput
from jengine.request import Request, RequestStatus
from jengine.sampler import RowState, build_sampling_tensors
from jengine.sampling_params import SamplingParams
from jengine.sharding import distributed
from jengine.spec_decode.speculator import Speculator
from jengine.engine.validation import RequestValidator
from jengine.structured_output.manager import StructuredOutputManager
from jengine.structured_output.reasoning import get_reasoning_markers
from jengine.tokenizer import load_tokenizer
from jengine.worker.model_runner import MAX_LOGIT_BIAS, MAX_STOP_TOKENS, InFlightStep, ModelRunner, PrevTokens
from jengine.worker.step_inputs import logit_rows

logger = logging.getLogger(__name__)


def enable_compilation_cache(directory: Optional[str]) -> None:
    """Turns on JAX's persistent compilation cache ("" disables it)."""
    if directory == "":
        return
    jax.config.update("jax_compilation_cache_dir", directory or default_compilation_cache_dir())
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def resolve_async_scheduling(requested: Optional[bool], config: EngineConfig) -> bool:
    """Whether the engine schedules asynchronously: as asked, else on for accelerators and on the CPU
    (benchmarks/host_overhead.py: it hides the host's work between steps there too). Never with
    speculative decoding or several processes, whose steps need the host's tokens (logged)."""
    if requested is None:
        requested = True
    if requested and config.speculative is not None:
        logger.info("async_scheduling: off, speculative decoding drafts from the host's tokens")
        return False
    if requested and config.parallel.num_processes > 1:
        logger.info("async_scheduling: off with several processes (each step's inputs are broadcast from the host)")
        return False
    return bool(requested)


@dataclasses.dataclass
class _Flight:
    """A step on the device whose outputs the host has not seen yet."""

    sched: SchedulerOutput
    step: InFlightStep
    rows: dict[str, int]  # request id -> the row that samples its next token


class EngineCore:
    """Loads the model, sizes the KV cache, warms up, then serves `add_request` / `step`."""

    def __init__(self, config: EngineConfig):
        self.config = config
        distributed.initialize(config.parallel)  # no-op for one process; must precede any backend use
        enable_compilation_cache(config.compilation_cache_dir)
        t0 = time.perf_counter()
        self.plan = sharding.plan_for_engine(config)  # None: one device, nothing to shard
        place = self.plan.place if self.plan is not None else None
        loaded = load_model(config.model, dtype=config.dtype, load_format=config.load_format, place=place,
                            quantization=config.quantization)
        if self.plan is not None and self.plan.expert_parallel:
            loaded.model.expert_mesh = self.plan.mesh  # its MoE layers run each device's experts under shard_map
        self.model_config = mc = loaded.config
        self.tokenizer = load_tokenizer(loaded.model_path if loaded.gguf_file is None else loaded.gguf_file, config.tokenizer,
                                        trust_remote_code=config.trust_remote_code)
        self.max_model_len = self._resolve_max_model_len(config.scheduler.max_model_len, mc.max_position_embeddings)
        eos = set(mc.eos_token_ids or ())
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            eos.add(int(self.tokenizer.eos_token_id))
        self.eos_token_ids: tuple[int, ...] = tuple(sorted(eos))

        draft = None  # speculative_config.method "draft_model": its weights now, its cache sized with the target's pages
        if config.speculative is not None and config.speculative.method == "draft_model":
            from jengine.spec_decode.draft_model import DraftModel

            draft = DraftModel.load(config, mc, loaded.dtype, self.plan)
        self.runner: ModelRunner | distributed.LeaderRunner = ModelRunner(
            config, loaded, self.max_model_len, plan=self.plan, extra_page_bytes=draft.page_bytes if draft is not None else 0)
        if draft is not None:
            draft.attach(self.runner, self.max_model_len)
        sc = config.scheduler
        self.async_scheduling = resolve_async_scheduling(sc.async_scheduling, config)
        self.kv_cache_manager = make_kv_cache_manager(self.runner.kv_layout, enable_prefix_caching=config.cache.enable_prefix_caching)
        # Unfinished sequences by id and the one place each ends (pages, indexes, per-request state).
        self.registry = RequestRegistry(self.kv_cache_manager)
        self.scheduler = Scheduler(
            self.kv_cache_manager,
            max_num_seqs=sc.max_num_seqs,
            max_num_batched_tokens=sc.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            policy=sc.policy,
            max_loras=config.lora.max_loras if config.lora is not None else 0,
            async_scheduling=self.async_scheduling,
            registry=self.registry,
        )
        self._in_flight: Optional[_Flight] = None  # asynchronous scheduling: the step on the device
        self.output_processor = OutputProcessor(self.tokenizer)
        self.registry.on_free(self.output_processor.release)  # a parent leaves with its last child
        self.registry.on_free(lambda request: self.runner.release([request.request_id]))  # its persistent-batch slot
        self._rng = np.random.default_rng(config.seed)
        reasoning = get_reasoning_markers(config.reasoning_parser) if config.reasoning_parser else None
        self.structured_output = StructuredOutputManager(self.tokenizer, mc.vocab_size, self.eos_token_ids, reasoning)
        self._all_allowed_mask = np.full(self.structured_output.num_words, -1, np.int32)  # a constrained row until filled
        self.validator = RequestValidator(
            vocab_size=mc.vocab_size, max_model_len=self.max_model_len, max_logprobs=config.max_logprobs,
            eos_token_ids=self.eos_token_ids, capacity_error=self.scheduler.capacity_error,
            compile_constraint=self.structured_output.validate,  # compiles once; later requests hit the cache
        )
        self.speculator = Speculator(config.speculative, draft) if config.speculative is not None else None
        self.load_seconds = time.perf_counter() - t0
        # Multi-host steps run under a watchdog: there every piece compiles before serving.
        self.runner.warmup(background=config.compile_in_background and config.parallel.num_processes == 1)
        if draft is not None:
            draft.warmup()
        if self.plan is not None:
            logger.info("per-device memory:\n%s", sharding.format_memory_report(sharding.memory_report(self.runner.params, self.runner.kv_cache)))
        if config.parallel.num_processes > 1 and jax.process_index() == 0:
            self.runner = distributed.LeaderRunner(self.runner)
        logger.info(
            "engine ready: %s, %d layers, KV cache %d pages/layer x %d tokens (%.1f MiB), max_model_len %d, load %.1f s, warm-up %.1f s",
            mc.architecture, mc.num_layers, self.runner.pages_per_layer, config.cache.block_size,
            self.runner.kv_cache_bytes / 2**20, self.max_model_len, self.load_seconds, self.runner.warmup_seconds,
        )

    @staticmethod
    def _resolve_max_model_len(requested: Optional[int], model_max: int) -> int:
        if requested is None:
            return int(model_max)
        if requested > model_max:
            raise ValueError(f"max_model_len={requested} is larger than the model's max_position_embeddings={model_max}")
        return int(requested)

    # ----- requests -----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    def validate_prompt(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        """Raises ValueError naming the field for a prompt or parameters the engine cannot serve (the one
        validation point: `jengine.engine.validation`)."""
        self.validator.validate(prompt_token_ids, params)

    # ----- LoRA adapters ------------------------------------------------------------------------
    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Loads and validates an adapter into the host cache (ValueError naming what is wrong)."""
        if not isinstance(lora_request, LoRARequest):
            raise ValueError(f"lora_request must be a LoRARequest, got {type(lora_request).__name__}")
        if self.runner.lora is None:
            raise ValueError("lora_request given, but LoRA is not enabled (start the engine with enable_lora=True / --enable-lora)")
        self.runner.lora.add(lora_request)
        return True

    def remove_lora(self, lora_int_id: int) -> bool:
        """Drops an adapter's host copy and slot; requests still running with it reload it from its folder."""
        return self.runner.lora is not None and self.runner.lora.remove(lora_int_id)

    def list_loras(self) -> list[LoRARequest]:
        return self.runner.lora.loaded() if self.runner.lora is not None else []

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        prompt: Optional[str] = None,
        arrival_time: Optional[float] = None,
        priority: int = 0,
        lora_request: Optional[LoRARequest] = None,
    ) -> None:
        """Queues a request; `n > 1` forks it into children that share the prompt's cached pages."""
        self.validate_prompt(prompt_token_ids, params)
        if lora_request is not None:
            self.add_lora(lora_request)
        children = []
        for index in range(params.n):
            child_params = params
            if params.n > 1:
                seed = None if params.seed is None else params.seed + index
                child_params = params.clone(n=1, seed=seed)
            child_id = request_id if params.n == 1 else f"{index}_{request_id}"
            req = Request(child_id, prompt_token_ids, child_params, self.eos_token_ids, arrival_time=arrival_time, priority=priority,
                          lora_request=lora_request)
            req.seed = child_params.seed if child_params.seed is not None else int(self._rng.integers(0, 2**31 - 1))
            if child_params.structured_outputs is not None:  # each child its own matcher
                req.structured_output = self.structured_output.start(child_params.structured_outputs, name=child_id)
            children.append(req)
        self.output_processor.add_request(request_id, prompt, list(prompt_token_ids), params, children, arrival_time)
        queued = 0
        try:
            for req in children:
                self.scheduler.add_request(req)
                queued += 1
        except BaseException:  # all or nothing: no child or output state is left behind
            self.scheduler.abort_requests([req.request_id for req in children[:queued]])
            for req in children[queued:]:
                req.status = RequestStatus.FINISHED_ABORTED
                self.registry.free(req)
            raise

    def abort_request(self, request_ids: Sequence[str]) -> None:
        """Aborts requests (by the id given to `add_request`); their pages are freed now, and their
        children's state and the output state go with them (`RequestRegistry.free`)."""
        self.scheduler.abort_requests([c for rid in request_ids for c in self.output_processor.child_ids(rid)])

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self._in_flight is not None

    # ----- the step -----------------------------------------------------------------------------
    def _row_state(self, request: Request) -> RowState:
        assert request.seed is not None  # set by add_request
        return RowState(
            params=request.sampling_params,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
            seed=request.seed,
            eos_token_ids=request.eos_token_ids,
            num_placeholder_tokens=request.num_output_placeholders,
        )

    def _mask_filler(self, scheduled: Sequence, rows: list) -> Optional[Callable[[np.ndarray], None]]:
        """For a step with structured-output rows: marks those rows constrained (a placeholder mask, so the
        sampling tensors get a writable bitmask) and returns the callable that writes their real masks
        into it. The runner calls it once the forward is on the device, so the grammar work overlaps the
        forward; None when no row is constrained."""
        so = self.structured_output
        idx = [i for i, s in enumerate(scheduled) if s.samples and s.request.structured_output is not None]
        if not idx:
            return None
        for i in idx:
            rows[i].token_bitmask = self._all_allowed_mask
        starts = np.concatenate([[0], np.cumsum(logit_rows(scheduled))])  # sampling row of each scheduled row

        def fill(bitmask: np.ndarray) -> None:
            # Asynchronous steps fill after the previous step's tokens were applied: a request that
            # finished there keeps the all-allowed placeholder (its token is dropped).
            live = [i for i in idx if not scheduled[i].request.is_finished]
            masks = np.empty((len(live), so.num_words), np.int32)
            so.fill_bitmask([scheduled[i].request.structured_output for i in live], masks)
            bitmask[starts[live]] = masks

        return fill

    def _accept_structured(self, scheduled: Sequence, sampled: Sequence[Optional[list[int]]]) -> None:
        """Advances the matchers of constrained sequences that are still running by their new token."""
        for s, tokens in zip(scheduled, sampled):
            matcher = s.request.structured_output
            if tokens is not None and not s.request.is_finished and matcher is not None:
                self.structured_output.accept(matcher, tokens[:s.num_accepted])

    def step(self) -> list[RequestOutput]:
        """One scheduling iteration; returns outputs of requests that progressed or finished (under
        asynchronous scheduling: of the step before the one it dispatches)."""
        if self.async_scheduling:
            return self._step_async()
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running)
        sched = self.scheduler.schedule()
        step_out = None
        if sched.scheduled:
            try:
                if self.speculator is not None:
                    self.speculator.fill(sched.scheduled)  # the draft model's drafts, into the slots schedule() reserved
                rows, fill_masks = self._sampling_rows(sched)
                step_out = self.runner.execute(sched.scheduled, rows, sched.num_batched_tokens, fill_masks)
            except Exception as error:  # noqa: BLE001 - a request that slipped past validation must not stop the engine
                return self._fail_unrunnable(sched.scheduled, error)
        return self._process(sched, step_out)

    def _sampling_rows(self, sched: SchedulerOutput) -> tuple[list, Optional[Callable[[np.ndarray], None]]]:
        """The step's sampling rows (one per logits row), and the filler of its structured-output masks."""
        rows = [self._row_state(s.request) if s.samples else None for s in sched.scheduled]
        fill_masks = self._mask_filler(sched.scheduled, rows)
        if self.speculator is not None:
            rows = self.speculator.expand(sched.scheduled, rows)
        return rows, fill_masks

    def _process(self, sched: SchedulerOutput, step_out: Any) -> list[RequestOutput]:
        """Applies a step's sampled tokens (`step_out`, None when nothing ran) and builds the outputs."""
        sampled: list = []
        failed: list[RequestOutput] = []
        if sched.scheduled:
            counts = logit_rows(sched.scheduled)
            ends = np.cumsum(counts)
            ids = np.asarray(step_out.token_ids)[:ends[-1]]
            if ((ids < 0) | (ids >= self.vocab_size)).any():  # rare: find the rows only then, off the common path
                invalid = [s for s, n, end in zip(sched.scheduled, counts, ends)
                           if s.samples and not ((ids[end - n:end] >= 0) & (ids[end - n:end] < self.vocab_size)).all()]
                if invalid:  # non-finite logits (say): fail those requests
                    why = "the sampler produced an invalid token id (non-finite logits?)"
                    if not self.async_scheduling:  # the others recompute this step next time
                        return self._fail_requests([(seq, why) for seq in invalid])
                    # Asynchronous: the others' rows are already counted as computed, so keep their tokens.
                    failed = self._fail_requests([(seq, why) for seq in invalid])
            if self.speculator is not None:
                sampled = self.speculator.accept(sched.scheduled, step_out.token_ids)
            else:
                sampled = [[int(step_out.token_ids[i])] if s.samples and not s.request.is_finished else None
                           for i, s in enumerate(sched.scheduled)]
        finished = self.scheduler.update_from_output(sched, sampled)
        self._accept_structured(sched.scheduled, sampled)
        outputs, stopped = self.output_processor.process(sched.scheduled, step_out, finished)
        for child_id, stop_str in stopped:
            self.scheduler.finish_requests(child_id, RequestStatus.FINISHED_STOPPED, stop_reason=stop_str)
        return failed + outputs

    def _step_async(self) -> list[RequestOutput]:
        """Schedules and dispatches step N+1, then processes step N (on the device until now) while the
        device runs N+1. With structured-output rows N+1's sampler waits for their masks: step N is
        processed (grammars advanced) between N+1's forward and its sampler (see the module doc)."""
        outputs: list[RequestOutput] = []
        prev = self._in_flight
        self._in_flight = None
        sched = self.scheduler.schedule()
        marked = False

        def settle_prev() -> None:  # processes step N, once
            nonlocal prev
            if prev is not None:
                done, prev = prev, None
                outputs.extend(self._process(done.sched, self.runner.fetch(done.step)))

        def mark() -> None:  # step N+1's rows count as computed, before step N's results are applied
            nonlocal marked
            if not marked:
                self.scheduler.mark_dispatched(sched)
                marked = True

        if not sched.scheduled:
            settle_prev()
            return outputs + self._process(sched, None)  # nothing dispatched: report what schedule() ended
        pending = None
        if prev is not None:
            pairs = [(i, prev.rows[s.request_id]) for i, s in enumerate(sched.scheduled) if s.request.num_output_placeholders]
            pending = PrevTokens(pairs, prev.step.tokens) if pairs else None
        try:
            rows, fill_masks = self._sampling_rows(sched)
            inputs, sampling = self.runner.prepare(sched.scheduled, rows, sched.num_batched_tokens, pending)
            if fill_masks is not None:
                fill_masks = self._after_previous_step(fill_masks, mark, settle_prev)
            step = self.runner.dispatch(inputs, sampling, fill_masks)
        except Exception as error:  # noqa: BLE001 - a request that slipped past validation must not stop the engine
            if marked:  # failed between the forward and the sampler: not a request's fault
                raise
            settle_prev()
            return outputs + self._fail_unrunnable(sched.scheduled, error)
        mark()
        self._in_flight = _Flight(sched, step, {s.request_id: i for i, s in enumerate(sched.scheduled) if s.samples})
        settle_prev()  # the device runs step N+1 meanwhile
        return outputs

    @staticmethod
    def _after_previous_step(fill_masks: Callable[[np.ndarray], None], mark: Callable[[], None],
                             settle_prev: Callable[[], None]) -> Callable[[np.ndarray], None]:
        """The mask filler of an asynchronous step: step N is applied first (its tokens advance the grammars)."""
        def fill(bitmask: np.ndarray) -> None:
            mark()
            settle_prev()
            fill_masks(bitmask)
        return fill

    def _fail_unrunnable(self, scheduled: Sequence[Any], error: Exception) -> list[RequestOutput]:
        """The step's host inputs could not be built: finds the requests whose own inputs fail (each
        alone), ends them with finish_reason "error" and returns their outputs; the step is skipped and
        the other rows run again next step (their pages and computed tokens are unchanged). Re-raises
        `error` when no single request explains it: then the engine itself is broken."""
        culprits: list[tuple[Any, str]] = []
        for seq in scheduled:
            if not seq.samples:
                continue
            try:
                build_sampling_tensors([self._row_state(seq.request)], 1, vocab_size=self.vocab_size, max_stop_tokens=MAX_STOP_TOKENS,
                                       max_logprobs=self.config.max_logprobs, max_logit_bias=MAX_LOGIT_BIAS)
            except Exception as e:  # noqa: BLE001 - this request's own fault
                culprits.append((seq, repr(e)))
        if not culprits:
            raise error
        return self._fail_requests(culprits)

    def _fail_requests(self, culprits: Sequence[tuple[Any, str]]) -> list[RequestOutput]:
        """Ends the requests of the (scheduled row, reason) pairs with finish_reason "error" and returns
        their outputs; the step's results are dropped, so the other rows run it again next step (their
        computed tokens did not advance; rewriting the same KV slots gives the same values)."""
        failed = []
        for seq, reason in culprits:
            logger.error("request %s cannot run and is failed: %s", seq.request_id, reason)
            failed += self.scheduler.finish_requests(seq.request_id, RequestStatus.FINISHED_ERROR,
                                                     stop_reason=f"the engine could not run this request: {reason}")
        outputs, _ = self.output_processor.process([], None, failed)
        return outputs

    @property
    def is_worker(self) -> bool:
        """A non-leader process of a multi-host engine: it only runs the steps the leader sends."""
        return self.config.parallel.num_processes > 1 and jax.process_index() != 0

    def run_worker(self) -> int:
        """A worker's whole life: run the leader's steps until it stops. Returns the exit status:
        0 when the leader stopped it, 3 when the leader went silent."""
        try:
            distributed.run_worker(self.runner)
        except distributed.WorkerFailedError as e:
            logger.error("jengine worker %d: %s", jax.process_index(), e)
            return 3
        return 0

    def shutdown(self) -> None:
        """Tells multi-host workers to stop (no-op for one process)."""
        if isinstance(self.runner, distributed.LeaderRunner):
            self.runner.shutdown()
        else:
            self.runner.stop_compiling()

    # ----- stats --------------------------------------------------------------------------------
    @property
    def compilations_after_warmup(self) -> int:
        return self.runner.compilations_after_warmup

    @property
    def bucket_waits(self) -> tuple[int, float]:
        """Steps that waited for a step piece still compiling in the background, and the seconds they waited."""
        return int(getattr(self.runner, "bucket_waits", 0)), float(getattr(self.runner, "bucket_wait_seconds", 0.0))
