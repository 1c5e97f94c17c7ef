"""Prometheus metrics under vLLM's exact names (`vllm:` prefix, labels `model_name` and `engine`).

Dashboards and load-aware routers written for vLLM (queue depth, KV-cache usage, latency histograms)
read jengine's `/metrics` unchanged: every `vllm:` series here is one vLLM exports, with its meaning.
Series vLLM has no name for (engine health, compilations after warm-up, requests that waited for a
step bucket still compiling) use a `jengine:` prefix instead, so the `vllm:` namespace holds nothing
vLLM would not.

Counters and histograms are fed by the engine thread through the `StatsSink` interface of
`AsyncEngine` (prometheus_client is thread-safe); gauges and the engine's own running totals
(preemptions, prefix-cache queries and hits, compilations, bucket waits) are read from the engine's
latest snapshot at scrape time by a custom collector, so a scrape never touches the engine thread.
A private `CollectorRegistry` keeps several servers in one process (tests) from colliding.
"""
from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from jengine.engine.async_engine import AsyncEngine, FinishedRequestStats, IterationStats

VLLM = "vllm:"  # vLLM's own names, meanings and labels
JENGINE = "jengine:"  # series vLLM does not have
LABELS = ["model_name", "engine"]  # vLLM's label set; one engine per server, index "0"
ENGINE_INDEX = "0"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Bucket edges in seconds: first-token latency spans milliseconds (GPU) to minutes (long CPU queues).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.1, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000)


class _SnapshotCollector(Collector):
    """Gauges and engine-owned totals from `AsyncEngine.stats()`."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.values = [model_name, ENGINE_INDEX]

    def collect(self) -> Iterator:
        s = self.engine.stats()

        def family(kind: type, name: str, doc: str, value: float):
            f = kind(name, doc, labels=LABELS)
            f.add_metric(self.values, value)
            return f

        yield family(GaugeMetricFamily, VLLM + "num_requests_running", "Number of requests in model execution batches.", s.num_requests_running)
        yield family(GaugeMetricFamily, VLLM + "num_requests_waiting", "Number of requests waiting to be processed.", s.num_requests_waiting)
        yield family(GaugeMetricFamily, VLLM + "kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", s.kv_cache_usage)
        yield family(CounterMetricFamily, VLLM + "num_preemptions", "Cumulative number of preemptions from the engine.", s.num_preemptions_total)
        yield family(CounterMetricFamily, VLLM + "prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.", s.prefix_cache_queries_total)
        yield family(CounterMetricFamily, VLLM + "prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", s.prefix_cache_hits_total)
        yield family(GaugeMetricFamily, JENGINE + "engine_healthy", "1 while the engine loop is running.", 1.0 if self.engine.healthy else 0.0)
        yield family(CounterMetricFamily, JENGINE + "compilations_after_warmup", "XLA compilations after warm-up (should stay 0).", s.compilations_after_warmup_total)
        yield family(CounterMetricFamily, JENGINE + "step_bucket_waits", "Engine steps that waited for their step bucket to finish compiling in the background.", s.bucket_waits_total)
        if s.spec_decode is not None:  # as vLLM: these series exist when speculative decoding is configured
            drafts, draft_tokens, accepted = s.spec_decode
            yield family(CounterMetricFamily, VLLM + "spec_decode_num_drafts", "Number of spec decoding drafts.", drafts)
            yield family(CounterMetricFamily, VLLM + "spec_decode_num_draft_tokens", "Number of draft tokens.", draft_tokens)
            yield family(CounterMetricFamily, VLLM + "spec_decode_num_accepted_tokens", "Number of accepted tokens.", accepted)
        if s.lora is not None:  # as vLLM: an info gauge whose labels name the adapters, valued at the snapshot time
            max_lora, running, waiting = s.lora
            info = GaugeMetricFamily(VLLM + "lora_requests_info", "Running stats on lora requests.",
                                     labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"])
            info.add_metric([str(max_lora), ",".join(waiting), ",".join(running)], s.taken_at)
            yield info
        yield family(CounterMetricFamily, JENGINE + "step_bucket_wait_seconds", "Seconds engine steps spent waiting for step buckets compiling in the background.", s.bucket_wait_seconds_total)


class ServerMetrics:
    """Implements `StatsSink`; `render()` gives the Prometheus text exposition."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(VLLM + name, doc, LABELS, buckets=buckets, registry=r)

        self.prompt_tokens = Counter(VLLM + "prompt_tokens", "Number of prefill tokens processed.", LABELS, registry=r)
        self.generation_tokens = Counter(VLLM + "generation_tokens", "Number of generation tokens processed.", LABELS, registry=r)
        self.request_success = Counter(VLLM + "request_success", "Count of successfully processed requests (per choice, by finish reason).",
                                       LABELS + ["finished_reason"], registry=r)
        self.ttft = histogram("time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", TOKEN_BUCKETS)
        # vLLM still exports its older per-token series under this name (deprecated in favour of the one above).
        self.tpot_per_token = histogram("time_per_output_token_seconds",
                                        "Histogram of time per output token in seconds. DEPRECATED: use vllm:inter_token_latency_seconds.",
                                        TOKEN_BUCKETS)
        self.request_tpot = histogram("request_time_per_output_token_seconds", "Histogram of time_per_output_token_seconds per request.", TOKEN_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", REQUEST_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", REQUEST_BUCKETS)
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Number of prefill tokens processed.", TOKEN_COUNT_BUCKETS)
        self.request_generation_tokens = histogram("request_generation_tokens", "Number of generation tokens processed.", TOKEN_COUNT_BUCKETS)
        # Export every series at zero from the start (as vLLM does), so dashboards and routers see them at once.
        for metric in (self.prompt_tokens, self.generation_tokens, self.ttft, self.itl, self.tpot_per_token, self.request_tpot,
                       self.e2e, self.queue, self.request_prompt_tokens, self.request_generation_tokens):
            metric.labels(model_name, ENGINE_INDEX)
        for reason in ("stop", "length", "abort"):
            self.request_success.labels(model_name, ENGINE_INDEX, reason)

    def attach(self, engine: AsyncEngine) -> None:
        self.registry.register(_SnapshotCollector(engine, self.model_name))
        engine.stats_sink = self

    # ----- StatsSink ------------------------------------------------------------------------------
    def record_iteration(self, stats: IterationStats) -> None:
        m = (self.model_name, ENGINE_INDEX)
        if stats.num_prompt_tokens:
            self.prompt_tokens.labels(*m).inc(stats.num_prompt_tokens)
        if stats.num_generation_tokens:
            self.generation_tokens.labels(*m).inc(stats.num_generation_tokens)
        for v in stats.time_to_first_tokens:
            self.ttft.labels(*m).observe(v)
        for v in stats.inter_token_latencies:
            self.itl.labels(*m).observe(v)
            self.tpot_per_token.labels(*m).observe(v)
        for v in stats.queue_times:
            self.queue.labels(*m).observe(v)

    def record_finished(self, stats: FinishedRequestStats) -> None:
        m = (self.model_name, ENGINE_INDEX)
        for reason in stats.finish_reasons:
            self.request_success.labels(*m, reason).inc()
        self.e2e.labels(*m).observe(stats.e2e_latency)
        self.request_prompt_tokens.labels(*m).observe(stats.num_prompt_tokens)
        self.request_generation_tokens.labels(*m).observe(stats.num_generation_tokens)
        if stats.time_per_output_token is not None:
            self.request_tpot.labels(*m).observe(stats.time_per_output_token)

    def render(self) -> bytes:
        return generate_latest(self.registry)
