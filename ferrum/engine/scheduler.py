"""Continuous batching: which slice of which request runs in the next forward pass.

There are no prefill and decode phases. Every request has a count of
computed tokens chasing its token count; each step hands running requests
(oldest first, so decodes are never starved by new prompts) what they need
under a token budget, then admits waiting requests with what budget is left,
splitting long prompts into chunks. When the KV pool cannot hold the step,
the most recently admitted running request is preempted: its blocks are
freed and it waits at the front of the queue to be recomputed (its sampled
tokens are kept, so its output does not change).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Hashable

from ferrum.engine.request import Request, RequestStatus
from ferrum.errors import InvalidRequestError
from ferrum.paged_kv import PagedKVManager, PrefixMatch
from ferrum.recurrent.snapshots import DEFAULT_BUDGET
from ferrum.spec.config import SpeculativeConfig


#: The type each EngineConfig setting must have (a float or a string there fails later, far from the cause).
_SETTING_TYPES = {"max_num_batched_tokens": int, "max_num_seqs": int, "max_logprobs": int,
                  "enable_prefix_caching": bool, "async_stepping": bool, "prefix_state_bytes": int}
_MAY_BE_NONE = ("max_logprobs", "async_stepping")


@dataclass(frozen=True)
class EngineConfig:
    """Per-step limits. The defaults suit a single-user Mac as well as a small server."""

    max_num_batched_tokens: int = 2048  # query tokens in one forward pass
    max_num_seqs: int = 64  # requests holding KV at once
    enable_prefix_caching: bool = True
    speculative: SpeculativeConfig | None = None  # speculative decoding (off by default)
    #: Issue step N+1 before reading step N's tokens, where the backend can (``async_stepping``).
    #: None: where the backend computes apart from the thread that issues a step (Metal, CUDA, MLX's
    #: evaluation thread: ``BackendInfo.computes_apart``); where a step computes while it is issued
    #: (numpy, torch on a CPU), overlapping would only delay each output by a step.
    async_stepping: bool | None = None
    #: Most top logprobs one request may ask for per token (vLLM's default); None: up to the vocabulary.
    #: Each costs the host a (token, logprob) pair per generated token, so a huge ask is refused.
    max_logprobs: int | None = 20
    #: Hybrid models (Qwen3.5, Qwen3-Next, Granite 4.0-H): bytes the prefix cache may hold in recurrent states
    #: kept at block boundaries (:mod:`ferrum.recurrent.snapshots`), least recently used dropped first; a
    #: match is usable only up to such a state, so 0 turns their prefix caching off. Unused by other models.
    prefix_state_bytes: int = DEFAULT_BUDGET

    def __post_init__(self) -> None:
        for name, kind in _SETTING_TYPES.items():
            value = getattr(self, name)
            if value is None and name in _MAY_BE_NONE:
                continue
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise InvalidRequestError(
                    f"{name} must be {'an integer' if kind is int else 'True or False'}, got {value!r}")
        if self.speculative is not None and not isinstance(self.speculative, SpeculativeConfig):
            raise InvalidRequestError(
                f"speculative must be a SpeculativeConfig (ferrum.spec), got {self.speculative!r}")
        if self.max_logprobs is not None and self.max_logprobs < 0:
            raise InvalidRequestError(f"max_logprobs must be None or >= 0, got {self.max_logprobs!r}")
        if self.prefix_state_bytes < 0:
            raise InvalidRequestError(f"prefix_state_bytes must be >= 0, got {self.prefix_state_bytes}")
        if self.max_num_seqs < 1:
            raise InvalidRequestError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise InvalidRequestError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least max_num_seqs "
                f"({self.max_num_seqs}) so every running request can decode each step"
            )


@dataclass(frozen=True)
class ScheduledChunk:
    """Tokens ``start .. start+len(tokens)-1`` of one request; ``sample`` when they reach its end.

    ``drafts`` are speculative tokens fed after them for verification; their
    blocks are claimed like the tokens', and rejected ones are rolled back.
    """

    request: Request
    start: int
    tokens: list[int]
    sample: bool
    drafts: tuple[int, ...] = ()


@dataclass
class SchedulerStats:
    preemptions: int = 0
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens else 0.0


@dataclass
class _StepPlan:
    budget: int
    claimed_blocks: int = 0
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: bool = False


class Scheduler:
    def __init__(self, kv: PagedKVManager, config: EngineConfig):
        self.kv = kv
        self.config = config
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.stats = SchedulerStats()
        #: Set by the engine with speculative decoding on: draft tokens for decoding requests, by id.
        self.drafter: Callable[[list[Request]], dict[Hashable, list[int]]] | None = None
        #: Set by the engine with speculative decoding on: told of each preempted request (frees its draft KV).
        self.on_preempt: Callable[[Request], None] | None = None
        #: Set by the engine for a model whose recurrent states the prefix cache keeps: prefill chunks end at the
        #: last two block boundaries before a request's end, where those states are kept (ferrum.recurrent.snapshots).
        self.stop_at_state_boundaries = False

    # ------------------------------------------------------------ queue
    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request: Request) -> None:
        """Take a request out of the queues and free its KV blocks at once."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        if request.request_id in self.kv:
            self.kv.release(request.request_id)
        request.status = RequestStatus.FINISHED

    # -------------------------------------------------------------- step
    def schedule(self) -> list[ScheduledChunk]:
        """Plan one forward pass; the KV blocks it needs are guaranteed free."""
        plan = _StepPlan(self.config.max_num_batched_tokens)
        self._schedule_running(plan)
        if self.drafter is not None:
            self._add_drafts(plan)
        if not plan.preempted:
            self._admit_waiting(plan)
        return plan.chunks

    def mark_computed(self, chunks: list[ScheduledChunk]) -> None:
        """The forward pass ran: the scheduled tokens' K/V are in the cache."""
        for chunk in chunks:
            chunk.request.num_computed_tokens += len(chunk.tokens)

    def _fits(self, plan: _StepPlan, blocks: int) -> bool:
        return plan.claimed_blocks + blocks <= self.kv.num_free_blocks

    def _aligned(self, request: Request, start: int, count: int) -> int:
        """``count`` cut so the chunk ends at a boundary where the states are kept, if it would run past one."""
        if self.stop_at_state_boundaries:
            bs = self.kv.block_size
            last = request.num_tokens // bs * bs
            for boundary in (last - bs, last):
                if start < boundary < start + count:
                    return boundary - start
        return count

    def _add_chunk(self, plan: _StepPlan, request: Request, count: int, blocks: int) -> None:
        start = request.num_computed_tokens
        stop = start + count
        plan.chunks.append(ScheduledChunk(request, start, request.token_slice(start, stop), stop == request.num_tokens))
        plan.budget -= count
        plan.claimed_blocks += blocks

    def _schedule_running(self, plan: _StepPlan) -> None:
        index = 0
        while index < len(self.running) and plan.budget > 0:
            request = self.running[index]
            if request.generation_done:  # its last tokens are on the device, to be read (asynchronous stepping)
                index += 1
                continue
            count = self._aligned(request, request.num_computed_tokens,
                                  min(request.num_tokens - request.num_computed_tokens, plan.budget))
            blocks = self.kv.blocks_needed(request.request_id, count)
            while not self._fits(plan, blocks):
                victim = self.running[-1]
                self.preempt(victim)
                plan.preempted = True
                if victim is request:
                    return
            self._add_chunk(plan, request, count, blocks)
            index += 1

    def _add_drafts(self, plan: _StepPlan) -> None:
        """Extend decodes with drafts, as far as the budget and free blocks allow; drafts never preempt."""
        decodes = [i for i, c in enumerate(plan.chunks) if c.sample and len(c.tokens) == 1]
        if not decodes or plan.budget <= 0:
            return
        proposals = self.drafter([plan.chunks[i].request for i in decodes])
        for index in decodes:
            chunk = plan.chunks[index]
            seq_id = chunk.request.request_id
            drafts = list(proposals.get(seq_id, ()))[: plan.budget]
            claimed = self.kv.blocks_needed(seq_id, 1)
            while drafts and not self._fits(plan, self.kv.blocks_needed(seq_id, 1 + len(drafts)) - claimed):
                drafts.pop()
            if drafts:
                plan.claimed_blocks += self.kv.blocks_needed(seq_id, 1 + len(drafts)) - claimed
                plan.budget -= len(drafts)
                plan.chunks[index] = replace(chunk, drafts=tuple(drafts))

    def preempt(self, request: Request) -> None:
        """Free a running request's KV blocks and queue it first, to be computed again from its tokens."""
        self.running.remove(request)
        if request.request_id in self.kv:
            self.kv.release(request.request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.metrics.num_preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(request)
        if self.on_preempt is not None:
            self.on_preempt(request)

    def _admit_waiting(self, plan: _StepPlan) -> None:
        while self.waiting and plan.budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            tokens = request.all_token_ids()
            # positions served by the prefix cache would have no logits for a request that wants them all
            match = self._match(tokens, request.cache_salt) if request.full_logits is None else PrefixMatch((), (), 0)
            count = self._aligned(request, match.num_tokens, min(len(tokens) - match.num_tokens, plan.budget))
            # adopting a cached block nobody holds takes it off the free list too
            revived = sum(1 for b in match.blocks if self.kv.ref_count(b) == 0)
            blocks = -(-(match.num_tokens + count) // self.kv.block_size) - len(match.blocks) + revived
            if not self._fits(plan, blocks):
                return  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            if not request.metrics.num_preemptions:  # the prompt's own hit, as usage reports it (vLLM's rule):
                # a preempted request matching its own blocks again is recompute saved, not prompt tokens cached
                self.stats.prefix_queried_tokens += len(tokens)
                self.stats.prefix_hit_tokens += match.num_tokens
                request.metrics.num_cached_tokens = match.num_tokens
            if match.num_tokens:
                self.kv.adopt(request.request_id, tokens, match, request.cache_salt)
            request.num_computed_tokens = match.num_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._add_chunk(plan, request, count, blocks - revived)

    def _match(self, tokens: list[int], salt: bytes) -> PrefixMatch:
        if self.config.enable_prefix_caching:
            return self.kv.match_prefix(tokens, salt)
        return PrefixMatch((), (), 0)
