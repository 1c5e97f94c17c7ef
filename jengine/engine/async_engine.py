"""`AsyncEngine` (alias `AsyncLLM`): the asyncio face of `EngineCore`, shared by every frontend.

    engine = AsyncEngine.from_engine_args(EngineArgs(model=...))
    stream = engine.add_request("req-1", prompt_token_ids, SamplingParams(max_tokens=32))
    async for out in stream:          # cumulative RequestOutputs; the last has finished=True
        ...
    stream.cancel()                   # or engine.abort("req-1"): removed at the next step boundary

`EngineCore` is synchronous and not thread-safe, so it lives on one dedicated thread (the engine
loop) that nothing else touches after start-up. The asyncio side talks to it through a command
list (add / abort) that the loop drains between steps, and the loop hands each step's outputs back
with `loop.call_soon_threadsafe`, one call per event loop per step. The event loop therefore never
blocks on the device, and the engine loop never awaits the network.

If the engine loop dies (an exception escapes `step()`), `healthy` turns False, every open stream
raises `EngineDeadError`, and new requests raise it at once: frontends answer 500 / UNAVAILABLE
instead of hanging. Per-request timings (queue time, TTFT, inter-token latency, TPOT, end-to-end)
are measured on the engine thread and passed to an optional `StatsSink` (the Prometheus metrics).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Optional, Protocol

from jengine.sampling_params import SamplingParams

logger = logging.getLogger("jengine.requests")

__all__ = [
    "AsyncEngine",
    "AsyncLLM",
    "EngineDeadError",
    "EngineOverloadedError",
    "EngineStats",
    "FinishedRequestStats",
    "IterationStats",
    "RequestStream",
    "StatsSink",
]


class EngineDeadError(RuntimeError):
    """The engine loop has stopped (crashed or shut down): no request can be served."""


class EngineOverloadedError(RuntimeError):
    """More requests are pending than `max_pending_requests` allows; retry later (HTTP 503)."""


def _spec_decode_totals(speculator: Any) -> Optional[tuple[int, int, int]]:
    if speculator is None:
        return None
    st = speculator.stats
    return st.num_drafts, st.num_draft_tokens, st.num_accepted_tokens


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """A point-in-time snapshot of the scheduler and the compiler, taken on the engine thread."""

    num_requests_running: int = 0
    num_requests_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions_total: int = 0
    prefix_cache_queries_total: int = 0
    prefix_cache_hits_total: int = 0
    compilations_after_warmup_total: int = 0
    bucket_waits_total: int = 0  # steps that waited for a step piece still compiling in the background
    bucket_wait_seconds_total: float = 0.0
    # Speculative decoding (None when it is off): drafts proposed, draft tokens verified, of which accepted.
    spec_decode: Optional[tuple[int, int, int]] = None
    # LoRA (None when it is off): max_loras, and the names of the adapters of running / waiting requests.
    lora: Optional[tuple[int, tuple[str, ...], tuple[str, ...]]] = None
    taken_at: float = 0.0  # time.time() of the snapshot


@dataclasses.dataclass
class IterationStats:
    """What one engine step produced, for counters and per-token histograms."""

    num_prompt_tokens: int = 0  # prompt tokens of requests that got their first token this step
    num_generation_tokens: int = 0
    time_to_first_tokens: list[float] = dataclasses.field(default_factory=list)
    inter_token_latencies: list[float] = dataclasses.field(default_factory=list)
    queue_times: list[float] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class FinishedRequestStats:
    request_id: str
    finish_reasons: list[str]
    num_prompt_tokens: int
    num_generation_tokens: int
    e2e_latency: float
    time_per_output_token: Optional[float]  # None with fewer than 2 tokens per choice
    aborted: bool = False


def _lora_adapters(core: Any, sched: Any) -> Optional[tuple[int, tuple[str, ...], tuple[str, ...]]]:
    lora = getattr(getattr(core, "config", None), "lora", None)
    if lora is None:
        return None

    def names(requests: Any) -> tuple[str, ...]:
        return tuple(sorted({r.lora_request.lora_name for r in requests if getattr(r, "lora_request", None) is not None}))

    return lora.max_loras, names(sched.running), names(sched.waiting)


class StatsSink(Protocol):
    """Receives engine statistics on the engine thread; implementations must be thread-safe."""

    def record_iteration(self, stats: IterationStats) -> None: ...

    def record_finished(self, stats: FinishedRequestStats) -> None: ...


class _Timing:
    """Per-request clocks, owned by the engine thread."""

    __slots__ = ("arrival", "scheduled", "first_token", "last_token", "num_prompt", "num_tokens", "n")

    def __init__(self, arrival: float, num_prompt: int, n: int) -> None:
        self.arrival = arrival
        self.scheduled: Optional[float] = None
        self.first_token: Optional[float] = None
        self.last_token: Optional[float] = None
        self.num_prompt = num_prompt
        self.num_tokens = 0
        self.n = n


_END = object()  # end-of-stream marker (the request was aborted)


class RequestStream:
    """Async iterator over one request's cumulative outputs; `cancel()` aborts the request."""

    def __init__(self, engine: "AsyncEngine", request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self._engine = engine
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._done = False

    @property
    def finished(self) -> bool:
        return self._done

    def _put(self, item: Any) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        # Coalesce: a slow consumer skips intermediate cumulative outputs, never the last one.
        while not self._queue.empty() and not isinstance(item, BaseException) and item is not _END and not item.finished:
            item = self._queue.get_nowait()
        if item is _END:
            self._done = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finished:
            self._done = True
        return item

    def cancel(self) -> None:
        """Aborts the request unless it already finished; safe to call more than once."""
        if not self._done:
            self._done = True
            self._engine.abort(self.request_id)

    async def aclose(self) -> None:
        self.cancel()


class AsyncEngine:
    """Runs an `EngineCore` on its own thread and serves requests to asyncio code."""

    def __init__(
        self,
        core: Any,
        *,
        log_requests: bool = True,
        max_pending_requests: Optional[int] = None,
        stats_sink: Optional[StatsSink] = None,
        idle_wait_s: float = 0.5,
    ) -> None:
        self.core = core
        self.log_requests = log_requests
        self.max_pending_requests = max_pending_requests
        self.stats_sink = stats_sink
        self._idle_wait_s = idle_wait_s
        self._lock = threading.Lock()
        self._commands: list[tuple[str, Any]] = []
        self._wakeup = threading.Event()
        self._streams: dict[str, RequestStream] = {}  # written on the event loop, read on the engine thread
        self._timings: dict[str, _Timing] = {}  # engine thread only
        self._unscheduled: set[str] = set()  # engine thread only
        self._stopping = False
        self._dead_error: Optional[BaseException] = None
        self._death_callbacks: list[Any] = []
        self._stats = EngineStats()
        self._update_stats()
        self._thread = threading.Thread(target=self._run, name="jengine-engine-loop", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, engine_args: Any, **kwargs: Any) -> "AsyncEngine":
        """Builds the `EngineCore` (load, size the cache, compile) on this thread, then starts the loop."""
        from jengine.engine.core import EngineCore

        return cls(EngineCore(engine_args.create_engine_config()), **kwargs)

    # ----- read-only views for frontends ----------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.core.tokenizer

    @property
    def max_model_len(self) -> int:
        return int(self.core.max_model_len)

    @property
    def config(self) -> Any:
        return self.core.config

    @property
    def healthy(self) -> bool:
        return self._dead_error is None and self._thread.is_alive()

    @property
    def dead_error(self) -> Optional[BaseException]:
        return self._dead_error

    @property
    def crashed(self) -> bool:
        """The loop died of an error rather than because `shutdown` asked it to stop."""
        return self._dead_error is not None and not self._stopping

    @property
    def num_pending_requests(self) -> int:
        return len(self._streams)

    def stats(self) -> EngineStats:
        """The latest scheduler snapshot (refreshed after every step)."""
        return self._stats

    def add_death_callback(self, callback: Any) -> None:
        """`callback()` runs on the engine thread when the loop stops, by `shutdown` or by an error
        (`crashed` tells which); e.g. to flip gRPC health or to exit the process."""
        self._death_callbacks.append(callback)

    # ----- LoRA adapters (the adapter cache is locked, so these are safe off the engine thread) -------
    def add_lora(self, lora_request: Any) -> bool:
        """Reads and validates an adapter into the host cache (blocking: call it from a worker thread)."""
        return self.core.add_lora(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        return self.core.remove_lora(lora_int_id)

    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        """Raises ValueError naming the field; reads only immutable config, so safe off the engine thread."""
        self.core.validate_prompt(prompt_token_ids, params)

    # ----- requests -------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        prompt: Optional[str] = None,
        arrival_time: Optional[float] = None,
        priority: int = 0,
        lora_request: Any = None,
    ) -> RequestStream:
        """Validates and queues a request; call from the event loop. Raises ValueError for a bad request,
        EngineDeadError when the loop is gone, EngineOverloadedError when too many are pending."""
        self._check_alive()
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if self.max_pending_requests is not None and len(self._streams) >= self.max_pending_requests:
            raise EngineOverloadedError(f"the engine has {len(self._streams)} requests pending (limit {self.max_pending_requests})")
        prompt_token_ids = [int(t) for t in prompt_token_ids]
        self.validate(prompt_token_ids, params)
        stream = RequestStream(self, request_id, asyncio.get_running_loop())
        self._streams[request_id] = stream
        if self._dead_error is not None:  # died between the check above and the registration
            self._streams.pop(request_id, None)
            raise EngineDeadError(f"the engine loop has stopped: {self._dead_error!r}")
        arrival = time.monotonic() if arrival_time is None else arrival_time
        self._send(("add", (request_id, prompt_token_ids, params, prompt, arrival, priority, lora_request)))
        return stream

    async def generate(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        request_id: str,
        *,
        prompt: Optional[str] = None,
        priority: int = 0,
    ) -> AsyncIterator[Any]:
        """vLLM-style async generator; closing or cancelling it aborts the request."""
        stream = self.add_request(request_id, prompt_token_ids, params, prompt=prompt, priority=priority)
        try:
            async for out in stream:
                yield out
        finally:
            stream.cancel()

    def abort(self, request_id: str) -> None:
        """Aborts a request at the next step boundary (frees its pages); unknown ids are ignored.
        Thread-safe; the request's stream ends without a further output."""
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream._done = True
            stream._put(_END)
        self._send(("abort", request_id))

    def kill(self, error: BaseException) -> None:
        """Marks the engine dead from another thread when its loop cannot get there itself (stuck in a
        collective with a dead peer): every open stream ends with `error`, `/health` turns 503."""
        self._die(error)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stops the engine loop after the current step; open streams get EngineDeadError."""
        self._stopping = True
        self._wakeup.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # ----- internals: event-loop side -------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._dead_error is not None:
            raise EngineDeadError(f"the engine loop has stopped: {self._dead_error!r}")
        if self._stopping or not self._thread.is_alive():
            raise EngineDeadError("the engine is shutting down")

    def _send(self, command: tuple[str, Any]) -> None:
        with self._lock:
            self._commands.append(command)
        self._wakeup.set()

    @staticmethod
    def _deliver(items: list[tuple[RequestStream, Any]]) -> None:
        for stream, item in items:
            if not stream._done or isinstance(item, BaseException):
                stream._put(item)

    # ----- internals: engine thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                self._wakeup.clear()
                with self._lock:
                    commands, self._commands = self._commands, []
                for kind, payload in commands:
                    if kind == "add":
                        self._do_add(*payload)
                    else:
                        self._do_abort(payload)
                if commands:
                    self._update_stats()
                if self._stopping:
                    raise EngineDeadError("the engine was shut down")
                if not self.core.has_unfinished_requests():
                    self._update_stats()
                    self._wakeup.wait(self._idle_wait_s)
                    continue
                start = time.monotonic()
                outputs = self.core.step()
                self._after_step(outputs, start, time.monotonic())
        except BaseException as e:  # noqa: BLE001 - any escape kills the loop; report it, never hang
            self._die(e)

    def _do_add(self, request_id: str, ids: list[int], params: SamplingParams, prompt: Optional[str], arrival: float, priority: int,
                lora_request: Any = None) -> None:
        stream = self._streams.get(request_id)
        if stream is None:  # aborted before the engine saw it
            return
        try:
            self.core.add_request(request_id, ids, params, prompt=prompt, arrival_time=arrival, priority=priority,
                                  **({"lora_request": lora_request} if lora_request is not None else {}))
        except Exception as e:  # noqa: BLE001 - raced past validation (or a bad value it missed): this request only
            if not isinstance(e, ValueError):
                logger.error("request %s could not be added: %r", request_id, e)
                e = ValueError(f"the engine could not add this request: {e}")
            self._streams.pop(request_id, None)
            stream._loop.call_soon_threadsafe(self._deliver, [(stream, e)])
            return
        self._timings[request_id] = _Timing(arrival, len(ids), params.n)
        self._unscheduled.add(request_id)

    def _do_abort(self, request_id: str) -> None:
        timing = self._timings.pop(request_id, None)
        if timing is None:
            return
        self._unscheduled.discard(request_id)
        self.core.abort_request([request_id])
        self._finish_stats(request_id, timing, ["abort"], time.monotonic(), aborted=True)

    def _after_step(self, outputs: list[Any], step_start: float, now: float) -> None:
        it = IterationStats()
        self._mark_scheduled(step_start, it)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, Any]]] = {}
        for out in outputs:
            rid = out.request_id
            timing = self._timings.get(rid)
            if timing is not None:
                self._account(out, timing, step_start, now, it)
            stream = self._streams.pop(rid, None) if out.finished else self._streams.get(rid)
            if stream is not None:
                by_loop.setdefault(stream._loop, []).append((stream, out))
        self._update_stats()  # before delivery: a client that sees this step's output sees its stats
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._deliver, items)
            except RuntimeError:  # that event loop is closed: its consumers are gone
                for stream, _ in items:
                    self.abort(stream.request_id)
        if self.stats_sink is not None and (it.num_generation_tokens or it.queue_times):
            self.stats_sink.record_iteration(it)

    def _mark_scheduled(self, step_start: float, it: IterationStats) -> None:
        if not self._unscheduled:
            return
        requests = getattr(getattr(self.core, "scheduler", None), "requests", None)
        for rid in list(self._unscheduled):
            timing = self._timings.get(rid)
            if timing is None:
                self._unscheduled.discard(rid)
                continue
            req = None if requests is None else (requests.get(rid) or requests.get(f"0_{rid}"))
            # Gone from the scheduler (finished within its first step) or has computed tokens: it ran.
            if req is None or getattr(req, "num_computed_tokens", 1) > 0:
                timing.scheduled = step_start
                it.queue_times.append(max(0.0, step_start - timing.arrival))
                self._unscheduled.discard(rid)

    def _account(self, out: Any, timing: _Timing, step_start: float, now: float, it: IterationStats) -> None:
        num_tokens = sum(len(c.token_ids) for c in out.outputs)
        delta = num_tokens - timing.num_tokens
        if delta > 0:
            it.num_generation_tokens += delta
            if timing.first_token is None:
                timing.first_token = now
                it.num_prompt_tokens += timing.num_prompt
                it.time_to_first_tokens.append(now - timing.arrival)
                if timing.scheduled is None:
                    timing.scheduled = step_start
                    it.queue_times.append(max(0.0, step_start - timing.arrival))
                    self._unscheduled.discard(out.request_id)
            else:
                it.inter_token_latencies.append(now - (timing.last_token or now))
            timing.last_token = now
            timing.num_tokens = num_tokens
        if out.finished:
            self._timings.pop(out.request_id, None)
            self._unscheduled.discard(out.request_id)
            reasons = [str(c.finish_reason or "stop") for c in out.outputs]
            self._finish_stats(out.request_id, timing, reasons, now)

    def _finish_stats(self, rid: str, timing: _Timing, reasons: list[str], now: float, aborted: bool = False) -> None:
        per_choice = timing.num_tokens / max(1, timing.n)
        tpot = None
        if timing.first_token is not None and timing.last_token is not None and per_choice > 1:
            tpot = (timing.last_token - timing.first_token) / (per_choice - 1)
        stats = FinishedRequestStats(rid, reasons, timing.num_prompt, timing.num_tokens, now - timing.arrival, tpot, aborted)
        if self.stats_sink is not None:
            self.stats_sink.record_finished(stats)
        if self.log_requests:
            logger.info(
                "request %s: %s, prompt %d tokens, output %d tokens, latency %.3f s%s",
                rid, ",".join(sorted(set(reasons))), timing.num_prompt, timing.num_tokens, stats.e2e_latency,
                "" if timing.first_token is None else f", ttft {timing.first_token - timing.arrival:.3f} s",
            )

    def _update_stats(self) -> None:
        sched = getattr(self.core, "scheduler", None)
        if sched is None:
            return
        waits, wait_s = getattr(self.core, "bucket_waits", (0, 0.0))
        self._stats = EngineStats(
            num_requests_running=int(getattr(sched, "num_running", 0)),
            num_requests_waiting=int(getattr(sched, "num_waiting", 0)),
            kv_cache_usage=float(getattr(sched, "kv_cache_usage", 0.0)),
            num_preemptions_total=int(getattr(sched, "num_preemptions_total", 0)),
            prefix_cache_queries_total=int(getattr(sched, "prefix_cache_queries", 0)),
            prefix_cache_hits_total=int(getattr(sched, "prefix_cache_hits", 0)),
            compilations_after_warmup_total=int(getattr(self.core, "compilations_after_warmup", 0)),
            bucket_waits_total=waits,
            bucket_wait_seconds_total=wait_s,
            spec_decode=_spec_decode_totals(getattr(self.core, "speculator", None)),
            lora=_lora_adapters(self.core, sched),
            taken_at=time.time(),
        )

    def _die(self, error: BaseException) -> None:
        if isinstance(error, EngineDeadError):
            self._dead_error = error
        else:
            logger.exception("the engine loop died", exc_info=error)
            self._dead_error = error
        dead = error if isinstance(error, EngineDeadError) else EngineDeadError(f"the engine loop died: {error!r}")
        streams = list(self._streams.values())
        self._streams.clear()
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, Any]]] = {}
        for stream in streams:
            by_loop.setdefault(stream._loop, []).append((stream, dead))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._deliver, items)
            except RuntimeError:
                pass
        for callback in self._death_callbacks:
            try:
                callback()
            except Exception:  # noqa: BLE001
                logger.exception("engine death callback failed")


AsyncLLM = AsyncEngine
