"""Engine metrics: latency per request, throughput, queue and KV occupancy, cache hits."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ferrum.engine.request import Request
from ferrum.engine.scheduler import SchedulerStats
from ferrum.executor_api import ExecutorStatus
from ferrum.paged_kv import PagedKVManager


@dataclass(frozen=True)
class EngineMetrics:
    """A snapshot. Latencies are means over finished requests, in seconds."""

    num_waiting: int
    num_running: int
    num_finished: int
    num_steps: int
    prompt_tokens: int
    generated_tokens: int  # tokens sampled, a final stop token included
    batched_tokens: int  # query tokens run through the model (prefill chunks + decodes)
    mean_ttft_s: float
    mean_tpot_s: float
    throughput_tok_s: float  # generated tokens per second of stepping
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_free: int
    kv_blocks_cached: int
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    prefix_cache_hit_rate: float
    preemptions: int
    executor: ExecutorStatus
    spec_drafted_tokens: int = 0  # speculative decoding: draft tokens verified
    spec_accepted_tokens: int = 0  # of those, accepted
    spec_steps: int = 0  # verification steps over all requests

    @property
    def spec_acceptance_rate(self) -> float:
        return self.spec_accepted_tokens / self.spec_drafted_tokens if self.spec_drafted_tokens else 0.0

    @property
    def spec_tokens_per_step(self) -> float:
        """Tokens a request emitted per verification step (1 + accepted drafts; 0 without speculation)."""
        return 1 + self.spec_accepted_tokens / self.spec_steps if self.spec_steps else 0.0


class MetricsRecorder:
    """Accumulates what :class:`EngineMetrics` reports."""

    def __init__(self) -> None:
        self.finished_count = 0
        self.steps = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.batched_tokens = 0
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.tpot_sum = 0.0
        self.tpot_count = 0
        self.busy_s = 0.0
        self.spec_drafted = 0
        self.spec_accepted = 0
        self.spec_steps = 0

    def arrived(self, request: Request) -> None:
        self.prompt_tokens += len(request.prompt_token_ids)

    def stepped(self, step_start: float, query_tokens: int) -> None:
        end = time.perf_counter()
        self.steps += 1
        self.batched_tokens += query_tokens
        self.busy_s += end - step_start

    def took_token(self) -> None:
        """A request took a sampled token (counted as read, not as computed: with overlapping steps, a request
        that ended at one step drops the token the next one computed for it)."""
        self.generated_tokens += 1

    def verified(self, drafted: int, accepted: int) -> None:
        """A request's drafts were verified (its accepted drafts count as generated tokens as it takes them)."""
        self.spec_drafted += drafted
        self.spec_accepted += accepted
        self.spec_steps += 1

    def finished(self, request: Request) -> None:
        self.finished_count += 1
        m = request.metrics
        if m.ttft is not None:
            self.ttft_sum += m.ttft
            self.ttft_count += 1
        if m.tpot is not None:
            self.tpot_sum += m.tpot
            self.tpot_count += 1

    def snapshot(
        self, num_waiting: int, num_running: int, kv: PagedKVManager, scheduler: SchedulerStats,
        executor: ExecutorStatus,
    ) -> EngineMetrics:
        return EngineMetrics(
            num_waiting=num_waiting,
            num_running=num_running,
            num_finished=self.finished_count,
            num_steps=self.steps,
            prompt_tokens=self.prompt_tokens,
            generated_tokens=self.generated_tokens,
            batched_tokens=self.batched_tokens,
            mean_ttft_s=self.ttft_sum / self.ttft_count if self.ttft_count else 0.0,
            mean_tpot_s=self.tpot_sum / self.tpot_count if self.tpot_count else 0.0,
            throughput_tok_s=self.generated_tokens / self.busy_s if self.busy_s else 0.0,
            kv_blocks_total=kv.num_blocks,
            kv_blocks_used=kv.num_used_blocks,
            kv_blocks_free=kv.num_free_blocks,
            kv_blocks_cached=kv.num_cached_blocks,
            prefix_cache_queried_tokens=scheduler.prefix_queried_tokens,
            prefix_cache_hit_tokens=scheduler.prefix_hit_tokens,
            prefix_cache_hit_rate=scheduler.prefix_cache_hit_rate,
            preemptions=scheduler.preemptions,
            executor=executor,
            spec_drafted_tokens=self.spec_drafted,
            spec_accepted_tokens=self.spec_accepted,
            spec_steps=self.spec_steps,
        )
