"""``GET /metrics``: the server and its engine in Prometheus text format.

Engine state (queue, KV blocks, prefix cache, preemptions, lock waits,
token counts) is read from :meth:`Engine.metrics` at scrape time, so it can
never drift from what the engine did; per-request latencies are observed
into histograms as requests finish. Each server owns its registry, so
several apps in one process (tests) do not collide.
"""

from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ferrum.engine import Engine, RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96)


class _EngineCollector(Collector):
    """Reads one engine snapshot per scrape."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        m = self.engine.metrics()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"ferrum_{name}", doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"ferrum_{name}", doc, value=value)

        yield gauge("requests_running", "Requests holding KV blocks and stepping.", m.num_running)
        yield gauge("requests_waiting", "Requests queued (new or preempted).", m.num_waiting)
        yield gauge("kv_blocks_total", "KV cache blocks in the pool.", m.kv_blocks_total)
        yield gauge("kv_blocks_used", "KV cache blocks held by sequences.", m.kv_blocks_used)
        yield gauge("kv_blocks_free", "KV cache blocks free (cached prefix blocks included).", m.kv_blocks_free)
        yield gauge("kv_blocks_cached", "KV blocks keyed for prefix reuse, held by sequences or free.", m.kv_blocks_cached)
        yield gauge("prefix_cache_hit_rate", "Prompt tokens served by the prefix cache / tokens looked up.",
                    m.prefix_cache_hit_rate)
        yield counter("prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache.",
                      m.prefix_cache_queried_tokens)
        yield counter("prefix_cache_hit_tokens", "Prompt tokens served by the prefix cache.",
                      m.prefix_cache_hit_tokens)
        yield gauge("prefix_state_bytes", "Hybrid models: bytes of recurrent states kept for the prefix cache.",
                    m.executor.state_snapshot_bytes)
        yield counter("preemptions", "Requests preempted to free KV blocks.", m.preemptions)
        yield counter("prompt_tokens", "Prompt tokens of requests admitted by the engine.", m.prompt_tokens)
        yield counter("generation_tokens", "Tokens sampled by the engine (final stop tokens included).",
                      m.generated_tokens)
        yield counter("engine_steps", "Forward passes run.", m.num_steps)
        lock = m.executor.lock_wait
        yield counter("executor_lock_acquisitions", "Times the executor's model lock was taken.", lock.acquisitions)
        yield counter("executor_lock_wait_seconds", "Time spent waiting for the executor's model lock.",
                      lock.total_ms / 1000)


class ServerMetrics:
    """The registry behind ``/metrics`` and the per-request observations that feed it."""

    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.requests = Counter(
            "ferrum_requests", "Engine requests (one per choice) by endpoint and finish reason.",
            ["endpoint", "finish_reason"], registry=self.registry,
        )
        self.rejected = Counter(
            "ferrum_requests_rejected", "HTTP requests refused before reaching the engine, by status.",
            ["status"], registry=self.registry,
        )
        self.ttft = Histogram(
            "ferrum_time_to_first_token_seconds", "Arrival to first sampled token.",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.tpot = Histogram(
            "ferrum_time_per_output_token_seconds", "Mean time between output tokens of a request.",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )

    def finished(self, endpoint: str, out: RequestOutput) -> None:
        reason = out.finish_reason.value if out.finish_reason is not None else "abort"
        self.requests.labels(endpoint, reason).inc()
        if out.metrics.ttft is not None:
            self.ttft.observe(out.metrics.ttft)
        if out.metrics.tpot is not None:
            self.tpot.observe(out.metrics.tpot)

    def render(self) -> bytes:
        return generate_latest(self.registry)
