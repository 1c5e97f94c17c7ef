"""Prometheus metrics with vLLM's names under a `jengine:` prefix, one registry per server.

Counters and histograms are fed by the engine thread through the `StatsSink` interface of
`AsyncEngine` (prometheus_client is thread-safe); gauges and the scheduler's own running totals
(preemptions, prefix-cache queries and hits, compilations after warm-up) are read from the engine's
latest snapshot at scrape time by a custom collector, so a scrape never touches the engine thread.
A private `CollectorRegistry` keeps several servers in one process (tests) from colliding.
"""
from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from jengine.engine.async_engine import AsyncEngine, FinishedRequestStats, IterationStats

PREFIX = "jengine:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Bucket edges in seconds: first-token latency spans milliseconds (GPU) to minutes (long CPU queues).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.1, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class _SnapshotCollector(Collector):
    """Gauges and engine-owned totals from `AsyncEngine.stats()`."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterator:
        s = self.engine.stats()
        labels = ["model_name"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
            g.add_metric([self.model_name], value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            c.add_metric([self.model_name], value)
            return c

        yield gauge("num_requests_running", "Requests in the running batch (sequences, n counts each).", s.num_requests_running)
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", s.num_requests_waiting)
        yield gauge("kv_cache_usage_perc", "Fraction of KV cache pages in use (1 = full).", s.kv_cache_usage)
        yield gauge("engine_healthy", "1 while the engine loop is running.", 1.0 if self.engine.healthy else 0.0)
        yield counter("num_preemptions", "Requests preempted (pages freed, recomputed later).", s.num_preemptions_total)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries_total)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits_total)
        yield counter("compilations_after_warmup", "XLA compilations after warm-up (should stay 0).", s.compilations_after_warmup_total)


class ServerMetrics:
    """Implements `StatsSink`; `render()` gives the Prometheus text exposition."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        r, lab = self.registry, ["model_name"]
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens processed.", lab, registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", lab, registry=r)
        self.request_success = Counter(PREFIX + "request_success", "Finished requests by finish reason (per choice).",
                                       lab + ["finished_reason"], registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token.", lab, buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between consecutive token steps of a request.", lab,
                             buckets=TOKEN_BUCKETS, registry=r)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds", "Mean time per output token after the first, per request.",
                              lab, buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "End-to-end request latency.", lab, buckets=REQUEST_BUCKETS, registry=r)
        self.queue = Histogram(PREFIX + "request_queue_time_seconds", "Time from arrival to first scheduling.", lab,
                               buckets=REQUEST_BUCKETS, registry=r)
        for reason in ("stop", "length", "abort"):  # export zeros so dashboards see the series at once
            self.request_success.labels(model_name, reason)

    def attach(self, engine: AsyncEngine) -> None:
        self.registry.register(_SnapshotCollector(engine, self.model_name))
        engine.stats_sink = self

    # ----- StatsSink ------------------------------------------------------------------------------
    def record_iteration(self, stats: IterationStats) -> None:
        m = self.model_name
        if stats.num_prompt_tokens:
            self.prompt_tokens.labels(m).inc(stats.num_prompt_tokens)
        if stats.num_generation_tokens:
            self.generation_tokens.labels(m).inc(stats.num_generation_tokens)
        for v in stats.time_to_first_tokens:
            self.ttft.labels(m).observe(v)
        for v in stats.inter_token_latencies:
            self.itl.labels(m).observe(v)
        for v in stats.queue_times:
            self.queue.labels(m).observe(v)

    def record_finished(self, stats: FinishedRequestStats) -> None:
        m = self.model_name
        for reason in stats.finish_reasons:
            self.request_success.labels(m, reason).inc()
        self.e2e.labels(m).observe(stats.e2e_latency)
        if stats.time_per_output_token is not None:
            self.tpot.labels(m).observe(stats.time_per_output_token)

    def render(self) -> bytes:
        return generate_latest(self.registry)
