"""``Engine``: many requests at once over one ``LlmExecutor``.

Each :meth:`Engine.step` asks the scheduler for one unified batch (decodes and
prefill chunks of many requests), runs it as **one** forward pass, samples the
requests whose chunk reached their end (on the backend, from logits that
never leave it), then applies stop conditions and detokenizes.

Requests are added and aborted from any thread: those calls only queue a
command, which the next step applies before it schedules. So an abort frees
the request's blocks before the next forward pass and never races one.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ferrum.engine.metrics import EngineMetrics, MetricsRecorder
from ferrum.engine.request import FinishReason, OutputCallback, Request, RequestOutput
from ferrum.engine.scheduler import EngineConfig, ScheduledChunk, Scheduler
from ferrum.errors import (
    ContextLengthExceededError,
    InvalidRequestError,
    KVCacheExhaustedError,
    RequestFailedError,
)
from ferrum.executor import LlmExecutor
from ferrum.executor_api import UnifiedBatch
from ferrum.model import ForwardItem
from ferrum.sampling import RequestSampler, SamplingParams, sample_batch
from ferrum.stop import StopStringFilter
from ferrum.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass(frozen=True)
class _Failure:
    """Stands in for a pick when sampling one request failed."""

    error: Exception
    what: str


class Engine:
    """Continuous batching, prefix caching, preemption and sampling for one model."""

    def __init__(
        self, executor: LlmExecutor, tokenizer: Tokenizer | None = None, config: EngineConfig | None = None
    ):
        self.executor = executor
        self.model = executor.model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.scheduler = Scheduler(self.model.kv, self.config)
        self._requests: dict[str, Request] = {}
        self._inbox: deque[Callable[[], RequestOutput | None]] = deque()
        self._step_lock = threading.Lock()
        self._registry_lock = threading.Lock()
        self._ids = itertools.count()
        self._metrics = MetricsRecorder()
        eos = set(self.model.config.eos_token_ids)
        if tokenizer is not None:
            eos.update(tokenizer.eos_token_ids)
        self._eos_ids = frozenset(eos)

    # ------------------------------------------------------------ requests
    def add_request(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        on_output: OutputCallback | None = None,
    ) -> str:
        """Queue a request; it joins the batch at the next step. Thread-safe.

        Bad input is refused here, before it can reach a batch shared with
        other requests. ``on_output`` is called (on the stepping thread) with
        every new output of this request.
        """
        params = params or SamplingParams()
        with self._registry_lock:
            request = self._new_request(prompt_token_ids, params, request_id)
            request.on_output = on_output
            self._requests[request.request_id] = request
        self._inbox.append(lambda: self._admit(request))
        return request.request_id

    def abort(self, request_id: str) -> None:
        """Cancel a request and free its KV blocks. Thread-safe.

        Applied at once unless a step is running, else before the next forward pass.
        """
        self._inbox.append(lambda: self._abort(request_id))
        if self._step_lock.acquire(blocking=False):
            try:
                self._drain_inbox()
            finally:
                self._step_lock.release()

    def has_unfinished(self) -> bool:
        return bool(self._inbox) or self.scheduler.has_unfinished()

    def _new_request(self, prompt: Sequence[int], params: SamplingParams, request_id: str | None) -> Request:
        cfg = self.model.config
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        elif request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        tokens = tuple(int(t) for t in prompt)
        if not tokens:
            raise InvalidRequestError("the prompt is empty; give at least one token")
        bad = [t for t in tokens if not 0 <= t < cfg.vocab_size]
        if bad:
            raise InvalidRequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
        if len(tokens) >= cfg.max_seq_len:
            raise ContextLengthExceededError(
                f"the prompt has {len(tokens)} tokens but the context length is {cfg.max_seq_len}; "
                "shorten the prompt so at least one token can be generated"
            )
        max_total = min(cfg.max_seq_len, len(tokens) + params.max_tokens)
        kv = self.model.kv
        if -(-max_total // kv.block_size) > kv.num_blocks:
            raise InvalidRequestError(
                f"this request may need {max_total} tokens of KV cache but the pool holds "
                f"{kv.num_blocks * kv.block_size}; lower max_tokens or load the model with more KV blocks"
            )
        for kind, ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
            outside = [t for t in ids if not 0 <= t < cfg.vocab_size]
            if outside:
                raise InvalidRequestError(
                    f"{kind} token {outside[0]} is outside the vocabulary [0, {cfg.vocab_size})"
                )
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer; this model has none, use stop_token_ids")
        request = Request(request_id, tokens, params, max_total)
        request.sampler = RequestSampler(params, tokens)
        if self.tokenizer is not None:
            request.detokenizer = IncrementalDetokenizer(self.tokenizer, tokens)
            request.stop_filter = StopStringFilter(params.stop)
        if params.logprobs:
            request.logprobs = []
        return request

    def _admit(self, request: Request) -> None:
        self.scheduler.add(request)
        self._metrics.arrived(request)

    def _abort(self, request_id: str) -> RequestOutput | None:
        request = self._requests.get(request_id)
        if request is None or request.finished:
            return None
        return self._finish(request, FinishReason.ABORT)

    # ---------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Run one forward pass over the scheduled batch; outputs of requests that changed."""
        with self._step_lock:
            outputs = self._drain_inbox()
            chunks = self.scheduler.schedule()
            if not chunks:
                if self.scheduler.waiting and not self.scheduler.running:
                    raise KVCacheExhaustedError(
                        f"no KV blocks free for the next request: {self.model.kv.num_used_blocks} blocks are "
                        "held by sequences outside this engine; release them (LlmExecutor.release_cache)"
                    )
                return outputs
            started = time.perf_counter()
            for chunk in chunks:
                if chunk.request.metrics.first_scheduled_time is None:
                    chunk.request.metrics.first_scheduled_time = started
            picks = self._run_batch(chunks, outputs)
            for request, pick in picks:
                outputs.append(self._accept_or_fail(request, pick))
            self._metrics.stepped(started, sum(len(c.tokens) for c in chunks), len(picks))
            return outputs

    # ------------------------------------------------------ fault isolation
    def _run_batch(self, chunks: list[ScheduledChunk], outputs: list[RequestOutput]) -> list[tuple[Request, Any]]:
        """Forward and sample one step; what fails ends only the requests it must.

        A failed pass is rolled back by the model; if it held several
        requests, each is run again alone so one bad request cannot fail the
        rest. A failed sampling call is retried row by row with the random
        draws taken back, so the others still get the tokens they would have.
        """
        try:
            out, _ = self._forward(chunks)
        except Exception as error:
            if len(chunks) == 1:
                outputs.append(self._fail(chunks[0].request, error, "the forward pass failed"))
                return []
            picks = []
            for chunk in chunks:
                picks += self._run_batch([chunk], outputs)
            return picks
        self.scheduler.mark_computed(chunks)
        sampling = [c.request for c in chunks if c.sample]
        if not sampling:
            return []
        states = [r.sampler.rng_state() for r in sampling]
        try:
            return list(zip(sampling, sample_batch(self.model.ops, out.logits, [r.sampler for r in sampling])))
        except Exception:
            for request, state in zip(sampling, states):
                request.sampler.rewind(state)
        picks: list[tuple[Request, Any]] = []
        ops = self.model.ops
        for row, request in enumerate(sampling):
            try:
                logits = ops.take_rows(out.logits, ops.from_numpy(np.array([row], dtype=np.int32), None))
                picks.append((request, sample_batch(ops, logits, [request.sampler])[0]))
            except Exception as error:
                picks.append((request, _Failure(error, "sampling failed")))
        return picks

    def _forward(self, chunks: list[ScheduledChunk]):
        items = tuple(ForwardItem(c.request.request_id, c.tokens, c.start, c.sample) for c in chunks)
        return self.executor.run(UnifiedBatch(items), to_host=False)

    def _accept_or_fail(self, request: Request, pick: Any) -> RequestOutput:
        if isinstance(pick, _Failure):
            return self._fail(request, pick.error, pick.what)
        try:
            return self._accept(request, pick)
        except Exception as error:  # detokenizer or stop filter
            return self._fail(request, error, "handling its new token failed")

    def _fail(self, request: Request, error: BaseException, what: str) -> RequestOutput:
        """End ``request`` with ``error`` (frees its blocks); the engine goes on with the others."""
        if request.finished:
            return request.snapshot()
        failure = RequestFailedError(f"request {request.request_id!r}: {what}: {type(error).__name__}: {error}")
        failure.__cause__ = error
        request.error = failure
        return self._finish(request, FinishReason.ERROR)

    def _drain_inbox(self) -> list[RequestOutput]:
        outputs = []
        while self._inbox:
            out = self._inbox.popleft()()
            if out is not None:
                outputs.append(out)
        return outputs

    def _accept(self, request: Request, pick) -> RequestOutput:
        token = pick.token
        now = time.perf_counter()
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = now
        params = request.params
        if token in params.stop_token_ids or (token in self._eos_ids and not params.ignore_eos):
            request.stop_reason = token
            return self._finish(request, FinishReason.STOP)
        request.output_token_ids.append(token)
        request.sampler.record(token)
        request.metrics.num_generated_tokens += 1
        if request.logprobs is not None:
            request.logprobs.append(pick)
        if request.detokenizer is not None:
            request.text += request.stop_filter.feed(request.detokenizer.push(token))
            if request.stop_filter.stopped:
                request.stop_reason = request.stop_filter.matched
                return self._finish(request, FinishReason.STOP)
        if len(request.output_token_ids) >= params.max_tokens or request.num_tokens >= request.max_total_tokens:
            return self._finish(request, FinishReason.LENGTH)
        return self._emit(request)

    def _finish(self, request: Request, reason: FinishReason) -> RequestOutput:
        self.scheduler.finish(request)
        request.finish_reason = reason
        ended_early = reason in (FinishReason.ABORT, FinishReason.ERROR)
        if request.detokenizer is not None and not request.stop_filter.stopped and not ended_early:
            request.text += request.stop_filter.feed(request.detokenizer.flush()) + request.stop_filter.flush()
        request.metrics.finish_time = time.perf_counter()
        self._metrics.finished(request)
        with self._registry_lock:
            del self._requests[request.request_id]
        return self._emit(request)

    def _emit(self, request: Request) -> RequestOutput:
        out = request.snapshot()
        callback = request.on_output
        if callback is not None:
            try:
                callback(out)
            except Exception as error:  # e.g. a consumer whose event loop is gone
                request.on_output = None
                if not request.finished:
                    return self._fail(request, error, "its output callback failed")
        return out

    # ------------------------------------------------------------- helpers
    def run_until_done(self) -> Iterator[RequestOutput]:
        """Step until every request has finished, yielding each output."""
        while self.has_unfinished():
            yield from self.step()

    def metrics(self) -> EngineMetrics:
        kv, stats = self.model.kv, self.scheduler.stats
        return self._metrics.snapshot(
            num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running),
            kv=kv,
            scheduler=stats,
            executor=self.executor.status(),
        )
