"""One engine across several processes (hosts) with JAX's multi-controller runtime.

Every process loads its shards of the weights, builds the same KV cache and compiles the same step
buckets; the mesh spans all processes' devices, so each jitted step is one SPMD program whose
collectives cross hosts. Process 0 (the leader) alone runs the scheduler and the frontends. Each
step it publishes the step's host inputs; workers run the same step on their devices:

    leader:  schedule -> build StepInputs/StepSampling (with the persistent batch's changes) -> publish(n) -> step -> outputs to host
    worker:  fetch(n) -> step -> acknowledge(n)                      (until the leader publishes stop)

Inputs travel through the coordination service's key-value store (`jax.distributed`'s own gRPC
channel), not an XLA broadcast: it needs no compilation per bucket (so serving never compiles), it
works on every backend, and every wait has a deadline, so a dead peer is detected instead of hanging:

- before publishing step n the leader waits (up to `peer_timeout_s`) for every worker's ack of step
  n-1; a missing ack raises `WorkerFailedError`, which the engine turns into failed requests (and
  `jengine serve` into exit status 3);
- a step that fails on the leader (a collective whose peer died: gloo reports the reset connection)
  raises `WorkerFailedError` too, naming the worker that did not finish the step;
- a step that does not finish within `step_timeout_s` (a collective stuck on a dead peer cannot be
  interrupted) makes a watchdog log the error, call `on_fatal` so frontends can fail their requests,
  and exit the process with status 3;
- a worker whose leader goes away (no step within `idle_timeout_s` while the leader's heartbeat key
  stops advancing) exits non-zero as well.

Values are pickled numpy pytrees; keys are deleted once every worker has acknowledged them.
"""
from __future__ import annotations

import logging
import os
import pickle
import sys
import threading
import time
from typing import Any, Callable, Optional

import jax

logger = logging.getLogger(__name__)

_PREFIX = "jengine/step"
STOP = "stop"
EXIT_WORKER_FAILED = 3
PEER_TIMEOUT_S = 60.0  # the leader waits this long for a worker's ack of a step
STEP_TIMEOUT_S = 30.0  # a step running longer is stuck in a collective with a dead peer
PEER_CHECK_S = 5.0  # after a failed step: how long the leader waits for the workers' acks of it
# JAX's own dead-peer detection must come after jengine's deadlines (see `initialize`)
HEARTBEAT_TIMEOUT_S = int(PEER_TIMEOUT_S + STEP_TIMEOUT_S + 30)


class WorkerFailedError(RuntimeError):
    """A peer process of a multi-host engine died or stopped answering."""


_fatal_hooks: list[Callable[[str], None]] = []


def add_fatal_hook(hook: Callable[[str], None]) -> None:
    """Registers `hook(message)`, called before the process exits because a peer died (fail requests here)."""
    _fatal_hooks.append(hook)


def _die(message: str) -> None:
    logger.error(message)
    print(f"jengine: {message}", file=sys.stderr, flush=True)
    for hook in list(_fatal_hooks):
        try:
            hook(message)
        except Exception:  # the process exits regardless
            logger.exception("fatal hook failed")
    exit_after_peer_failure()


def initialize(parallel_config: Any, *, heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S, initialization_timeout_s: int = 300) -> None:
    """`jax.distributed.initialize` from a `ParallelConfig` (no-op for one process).

    Must run before anything touches a JAX backend. On CPU the cross-process collectives use gloo.
    A dead peer is found by jengine's own deadlines (acks, the step watchdog), which are all shorter
    than the coordination service's heartbeat timeout: JAX's reaction to missed heartbeats (it
    terminates the process from C++) is the last resort, not the path. (jaxlib 0.10.2 accepts a
    `missed_heartbeat_callback` in its client factory but cannot call a Python one: it aborts with
    `std::bad_cast`; so none is installed.)
    """
    if parallel_config.num_processes <= 1:
        return
    if not parallel_config.distributed_coordinator:
        raise ValueError("num_processes > 1 needs distributed_coordinator (HOST:PORT of process 0)")
    if not 0 <= parallel_config.process_id < parallel_config.num_processes:
        raise ValueError(f"process_id must be in [0, {parallel_config.num_processes}), got {parallel_config.process_id}")
    jax.distributed.initialize(
        coordinator_address=parallel_config.distributed_coordinator,
        num_processes=parallel_config.num_processes,
        process_id=parallel_config.process_id,
        initialization_timeout=initialization_timeout_s,
        heartbeat_timeout_seconds=heartbeat_timeout_s,
    )
    logger.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )


def exit_after_peer_failure(status: int = EXIT_WORKER_FAILED) -> None:
    """Ends this process at once after a peer died, once its error has been reported.

    A normal exit would run `jax.distributed.shutdown`, whose barrier waits for the dead peer until the
    heartbeat timeout and then aborts; the status would say SIGABRT instead of `status`."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _client() -> Any:
    from jax._src import distributed as _dist  # the coordination-service client; no public handle exists

    client = _dist.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialized")
    return client


class StepChannel:
    """Leader -> workers step messages over the coordination service's key-value store."""

    def __init__(self, peer_timeout_s: float = PEER_TIMEOUT_S):
        self.client = _client()
        self.rank = jax.process_index()
        self.size = jax.process_count()
        self.peer_timeout_ms = int(peer_timeout_s * 1000)

    def publish(self, n: int, payload: Any, ready_timeout_s: float = 600.0) -> None:
        """Leader: waits for every worker's ack of step n-1 (step -1: warmed up), then publishes step n."""
        self.wait_acks(n - 1, None if n > 0 else ready_timeout_s)
        self.client.key_value_set_bytes(f"{_PREFIX}/{n}", pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))

    def wait_acks(self, n: int, timeout_s: Optional[float] = None) -> None:
        timeout_ms = self.peer_timeout_ms if timeout_s is None else int(timeout_s * 1000)
        for rank in range(1, self.size):
            try:
                self.client.blocking_key_value_get_bytes(f"{_PREFIX}/{n}/ack/{rank}", timeout_ms)
            except Exception as exc:  # the client raises XlaRuntimeError (DEADLINE_EXCEEDED / UNAVAILABLE)
                what = "become ready" if n < 0 else f"finish step {n}"
                raise WorkerFailedError(
                    f"worker process {rank} did not {what} within {timeout_ms / 1000:.0f} s "
                    f"(dead or unreachable): {exc}"
                ) from exc
        self._delete(f"{_PREFIX}/{n}")

    def fetch(self, n: int, timeout_s: float) -> Any:
        """Worker: blocks until the leader publishes step n (raises after `timeout_s`)."""
        return pickle.loads(self.client.blocking_key_value_get_bytes(f"{_PREFIX}/{n}", int(timeout_s * 1000)))

    def ack(self, n: int) -> None:
        self.client.key_value_set_bytes(f"{_PREFIX}/{n}/ack/{self.rank}", b"1")

    def _delete(self, key: str) -> None:
        try:
            self.client.key_value_delete(key)  # also deletes the ack keys under it (directory delete)
        except Exception:  # older clients lack it: keys are tiny, leaking them is harmless
            pass


class _Watchdog:
    """Kills the process if a step overruns: a collective waiting on a dead peer never returns."""

    def __init__(self, timeout_s: float, on_fatal: Optional[Callable[[str], None]] = None):
        self.timeout_s = timeout_s
        self.on_fatal = on_fatal
        self._deadline: Optional[float] = None
        self._what = ""
        self._cond = threading.Condition()
        threading.Thread(target=self._run, name="jengine-step-watchdog", daemon=True).start()

    def arm(self, what: str) -> None:
        with self._cond:
            self._deadline, self._what = time.monotonic() + self.timeout_s, what
            self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._deadline = None

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._deadline is None:
                    self._cond.wait()
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                what = self._what
            if self.on_fatal is not None:
                add_fatal_hook(self.on_fatal)
            _die(f"{what} did not finish within {self.timeout_s:.0f} s: a peer process died or hangs; exiting")


def prepare_step(runner: Any, scheduled: Any, sampling_rows: Any, num_batched_tokens: int) -> tuple[Any, Any]:
    """Host inputs of one step: (StepInputs, StepSampling), numpy only. The sampling half carries the
    step's changes to the persistent batch, which every process applies to its own copy before the step."""
    return runner.prepare(scheduled, sampling_rows, num_batched_tokens)


def run_step(runner: Any, inputs: Any, sampling: Any) -> Any:
    """Runs one prepared step on the devices; returns host outputs."""
    return runner.run(inputs, sampling)


class LeaderRunner:
    """Wraps process 0's `ModelRunner`: publishes each step's inputs before running it.

    Delegates every other attribute to the runner, so `EngineCore` uses it unchanged
    (`engine.runner = LeaderRunner(engine.runner)`).
    """

    def __init__(self, runner: Any, *, peer_timeout_s: float = PEER_TIMEOUT_S, step_timeout_s: float = STEP_TIMEOUT_S,
                 ready_timeout_s: float = 600.0, on_fatal: Optional[Callable[[str], None]] = None):
        self._runner = runner
        self._channel = StepChannel(peer_timeout_s)
        self._ready_timeout_s = ready_timeout_s
        if on_fatal is not None:
            add_fatal_hook(on_fatal)
        self._watchdog = _Watchdog(step_timeout_s, None)
        self._n = 0
        self._closed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def execute(self, scheduled: Any, sampling_rows: Any, num_batched_tokens: int, fill_masks: Any = None) -> Any:
        inputs, sampling = prepare_step(self._runner, scheduled, sampling_rows, num_batched_tokens)
        if fill_masks is not None:  # the workers need the masks in the message: filled before it is sent
            fill_masks(sampling.token_bitmask)
        self._channel.publish(self._n, (inputs, sampling), self._ready_timeout_s)
        self._watchdog.arm(f"step {self._n}")
        try:
            out = run_step(self._runner, inputs, sampling)
        except Exception as exc:
            # A collective that fails (gloo: "connection reset by peer") means a peer died mid-step; the
            # processes are out of step either way, so the multi-host engine cannot go on. Name the
            # worker that did not finish the step when there is one.
            self._watchdog.disarm()
            self._channel.wait_acks(self._n, PEER_CHECK_S)
            raise WorkerFailedError(f"step {self._n} failed on the leader while every worker finished it: {exc}") from exc
        finally:
            self._watchdog.disarm()
        self._n += 1
        return out

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Tells the workers to return from `run_worker` (call once, before the leader exits)."""
        if self._closed:
            return
        self._closed = True
        self._channel.peer_timeout_ms = int(timeout_s * 1000)
        self._channel.publish(self._n, STOP)
        self._channel.wait_acks(self._n)


def run_worker(runner: Any, *, idle_timeout_s: float = 3600.0, step_timeout_s: float = STEP_TIMEOUT_S) -> int:
    """A worker's serving loop: runs every step the leader publishes until it publishes stop.

    Returns the number of steps run. Raises `WorkerFailedError` when the leader is silent for
    `idle_timeout_s` (the caller should exit non-zero); a step stuck past `step_timeout_s` exits the
    process with status 3.
    """
    channel = StepChannel()
    watchdog = _Watchdog(step_timeout_s, None)
    channel.ack(-1)  # warmed up: the leader may publish step 0
    n = 0
    while True:
        try:
            payload = channel.fetch(n, idle_timeout_s)
        except Exception as exc:
            raise WorkerFailedError(f"worker {channel.rank}: no step {n} from the leader within {idle_timeout_s:.0f} s: {exc}") from exc
        if isinstance(payload, str) and payload == STOP:
            channel.ack(n)
            return n
        inputs, sampling = payload
        watchdog.arm(f"worker {channel.rank} step {n}")
        try:
            run_step(runner, inputs, sampling)
        finally:
            watchdog.disarm()
        channel.ack(n)
        n += 1


def agree_min(name: str, value: int, timeout_s: float = 300.0) -> int:
    """The smallest `value` over all processes (e.g. KV pages per layer: every process needs the same cache)."""
    if jax.process_count() == 1:
        return int(value)
    client = _client()
    client.key_value_set(f"jengine/agree/{name}/{jax.process_index()}", str(int(value)))
    values = [int(client.blocking_key_value_get(f"jengine/agree/{name}/{r}", int(timeout_s * 1000))) for r in range(jax.process_count())]
    return min(values)


__all__ = [
    "EXIT_WORKER_FAILED", "add_fatal_hook", "LeaderRunner", "StepChannel", "WorkerFailedError", "agree_min", "initialize",
    "prepare_step", "run_step", "run_worker",
]
