"""``Engine``: many requests at once over one ``LlmExecutor``.

Each :meth:`Engine.step` asks the scheduler for one unified batch (decodes and
prefill chunks of many requests), runs it as **one** forward pass, samples the
requests whose chunk reached their end (on the backend, from logits that
never leave it), then applies stop conditions and detokenizes.

With speculative decoding (``EngineConfig.speculative``) a decoding request's
item also carries its drafted tokens, in the same pass as everyone else's
decodes and prefill chunks, with logits for all of its positions; the
confirmed drafts are emitted together and the rejected ones' KV is cut back
with ``truncate_kv`` (see :mod:`ferrum.spec`).

Asynchronous stepping (``EngineConfig.async_stepping``, on backends whose
plugin implements ``sample_on_device``): the sampled ids stay on the device
and feed the next step's embedding directly (:class:`ferrum.device_tokens.DeviceToken`),
so step N+1 is issued before the host reads step N; the host then applies
step N's stop conditions and detokenizes while the device computes. A
request that step N ended drops the one extra token step N+1 computed for
it, with its KV. Steps whose sampling needs host tokens (penalties over the
history, full logits, speculative drafts) run synchronously through the
same path; so do backends without the op.

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
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from ferrum.engine.metrics import EngineMetrics, MetricsRecorder
from ferrum.engine.request import FinishReason, LogitRows, OutputCallback, Request, RequestOutput
from ferrum.engine.scheduler import EngineConfig, ScheduledChunk, Scheduler
from ferrum.errors import (
    ContextLengthExceededError,
    InvalidRequestError,
    KVCacheExhaustedError,
    RequestFailedError,
    UnsupportedFeatureError,
)
from ferrum.device_tokens import DeviceToken
from ferrum.executor import LlmExecutor
from ferrum.executor_api import UnifiedBatch
from ferrum.metadata import check_metadata, require_full_logits
from ferrum.model import DecoderOnlyLLM, ForwardItem, ForwardOutput
from ferrum.sampling import (
    DeviceSample,
    RequestSampler,
    SampledToken,
    SampleResult,
    SamplingParams,
    UNUSABLE,
    picks_of,
    sample_batch_on_device,
)
from ferrum.spec.config import require_draft_method
from ferrum.spec.speculator import Speculator
from ferrum.spec.verify import accepted, row_samplers, spend_draws
from ferrum.stop import StopStringFilter
from ferrum.structured import matcher_for, prepare as prepare_structured
from ferrum.tokenizer import IncrementalDetokenizer, Tokenizer


class _SampleCall:
    """One ``sample_on_device`` call; its host result is read once, on first need."""

    def __init__(self, sample: DeviceSample, size: int):
        self.sample, self.size = sample, size
        self._result: SampleResult | None = None
        self._error: Exception | None = None

    def result(self) -> SampleResult:
        if self._result is None and self._error is None:
            try:
                self._result = self.sample.read()
            except Exception as error:  # the device work failed: every row of the call shares the failure
                self._error = error
        if self._error is not None:
            raise self._error
        return self._result


@dataclass(frozen=True)
class _Pending:
    """One chunk's picks: rows ``first ..`` of a sampling call, one per sampler."""

    call: _SampleCall
    first: int
    samplers: list[RequestSampler]

    def device_token(self) -> DeviceToken:
        return DeviceToken(self.call.sample.ids, self.first, self.call.size)

    def picks(self) -> list[SampledToken]:
        return picks_of(self.call.result(), self.samplers, self.first)


@dataclass(frozen=True)
class _Step:
    """A sampled step whose picks the host reads now, or next step (``lagged``)."""

    pending: list[tuple[ScheduledChunk, _Pending]]
    lagged: bool


class Engine:
    """Continuous batching, prefix caching, preemption and sampling for one model."""

    def __init__(
        self, executor: LlmExecutor, tokenizer: Tokenizer | None = None, config: EngineConfig | None = None,
        draft_model: DecoderOnlyLLM | None = None,
    ):
        """``draft_model`` drafts for ``config.speculative`` with method ``"draft"`` (same vocabulary)."""
        self.executor = executor
        self.model = executor.model
        self.tokenizer = tokenizer
        self.config = self._fit_config(config or EngineConfig())
        self.scheduler = Scheduler(self.model.kv, self.config)
        snapshots = self.model.snapshots
        self.scheduler.stop_at_state_boundaries = snapshots is not None and snapshots.budget >= snapshots.state_bytes
        self._speculator: Speculator | None = None
        if draft_model is not None:
            require_draft_method(self.config.speculative)
        if draft_model is not None and draft_model.config.arch.recurrent:
            raise UnsupportedFeatureError(
                f"the draft model ({draft_model.config.model_type!r}) has recurrent layers, which cannot be rolled "
                "back past its rejected drafts; choose a draft model whose layers all attend (or n-gram speculation)")
        if draft_model is not None and draft_model is self.model:
            raise InvalidRequestError("the draft model is the target model itself, whose KV it would overwrite; load "
                                      "a second copy (ferrum.load's draft_model=PATH does)")
        if self.config.speculative is not None:
            self._speculator = Speculator(self.config.speculative, self.model.config.vocab_size, draft_model,
                                          self.config.max_num_batched_tokens)
            self.scheduler.drafter = self._speculator.propose
            self.scheduler.on_preempt = self._speculator.preempted
        #: Steps may overlap: the backend leaves sampled ids on the device, nothing needs them on the host first.
        wanted, info = self.config.async_stepping, self.model.backend.info
        if wanted is None:
            wanted = info.device != "cpu" if info.computes_apart is None else info.computes_apart
        #: Whether steps overlap (decode steps issue before the last one is read; some steps still run
        #: synchronously, e.g. with penalties or full-logits metadata).
        self.overlaps_steps = wanted and executor.capabilities().async_stepping and self._speculator is None
        self._in_flight: _Step | None = None  # the step issued last, not read yet
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
        metadata: Mapping[str, Any] | None = None,
        lora: str | None = None,
    ) -> str:
        """Queue a request; it joins the batch at the next step. Thread-safe.

        Bad input is refused here, before it can reach a batch shared with
        other requests. ``on_output`` is called (on the stepping thread) with
        every new output of this request. ``metadata`` travels with the
        request down to the executor (see :mod:`ferrum.metadata`). ``lora``
        (or metadata ``ferrum_lora_adapter`` / ``ferrum_lora_path``) names an
        adapter on the model (``model.adapters``); it stays loaded until the
        request finishes.
        """
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be a ferrum.SamplingParams, not {type(params).__name__} "
                                      "(ferrum.LLM's calls also take a mapping of its options)", param="params")
        if request_id is not None and not isinstance(request_id, str):
            raise InvalidRequestError(f"request_id must be a string, not {type(request_id).__name__}",
                                      param="request_id")
        if on_output is not None and not callable(on_output):
            raise InvalidRequestError(f"on_output must be a function taking each RequestOutput, not "
                                      f"{type(on_output).__name__}", param="on_output")
        with self._registry_lock:
            request = self._new_request(prompt_token_ids, params, request_id, metadata)
            lora = self.model.adapters.resolve(lora, request.metadata)
            if lora is not None:
                request.lora, request.cache_salt = lora, self.model.adapters.acquire(lora)
            request.on_output = on_output
            self._requests[request.request_id] = request
        self._inbox.append(lambda: self._admit(request))
        return request.request_id

    def abort(self, request_id: str) -> None:
        """Cancel a request and free its KV blocks. Thread-safe.

        Applied at once unless a step is running, else before the next forward pass; either way the next
        step returns its final output.
        """
        self._inbox.append(lambda: self._abort(request_id))
        if self._step_lock.acquire(blocking=False):
            try:
                self._requeue(self._drain_inbox())
            finally:
                self._step_lock.release()

    def _fit_config(self, config: EngineConfig) -> EngineConfig:
        """``config`` for a model with recurrent layers (Qwen3-Next, Qwen3.5, Granite 4.0-H): its prefix cache keeps
        their states within ``prefix_state_bytes`` (none with prefix caching off), and it cannot roll them back past
        rejected drafts (that needs a state per token), so speculative decoding is refused."""
        if not self.model.config.arch.recurrent:
            return config
        if config.speculative is not None:
            raise UnsupportedFeatureError(
                f"speculative decoding cannot run {self.model.config.model_type!r}: its recurrent layers cannot be "
                "rolled back past rejected draft tokens; turn speculative decoding off for this model")
        self.model.snapshots.budget = config.prefix_state_bytes if config.enable_prefix_caching else 0
        return config

    def _requeue(self, outputs: list[RequestOutput]) -> None:
        """Outputs made outside a step's return (an abort applied at once, a step stopped half way), handed
        out first by the next step."""
        for out in reversed(outputs):
            self._inbox.appendleft(lambda out=out: out)

    def apply_pending(self) -> list[RequestOutput]:
        """Apply queued adds and aborts now, without a forward pass (before a stepping thread stops)."""
        with self._step_lock:
            return self._drain_inbox()

    def prepare_structured_outputs(self) -> bool:
        """Ready structured outputs ahead of the first request that asks for one (building the grammar
        engine's view of the tokenizer takes a fraction of a second, once); False where they cannot run
        (no tokenizer, llguidance missing). Thread-safe."""
        return prepare_structured(self.tokenizer, self.model.config.vocab_size, self._eos_ids)

    def has_unfinished(self) -> bool:
        """Whether :meth:`step` has work: requests queued or running, a step issued whose tokens the host has not
        read, or an output waiting to be returned (an abort applied while the engine was idle leaves its final
        output for the next step, which is when a caller looping on this learns of it)."""
        return bool(self._inbox) or self.scheduler.has_unfinished() or self._in_flight is not None

    def _new_request(
        self, prompt: Sequence[int], params: SamplingParams, request_id: str | None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Request:
        cfg = self.model.config
        metadata = check_metadata(metadata)
        if request_id is None:
            request_id = next(i for i in (f"req-{n}" for n in self._ids) if i not in self._requests)
        elif request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        tokens = tuple(prompt)
        odd = next((t for t in tokens if not isinstance(t, (int, np.integer)) or isinstance(t, (bool, np.bool_))), None)
        if odd is not None:
            raise InvalidRequestError(f"prompt token ids must be integers, got {odd!r}", param="prompt")
        tokens = tuple(int(t) for t in tokens)
        if not tokens:
            raise InvalidRequestError("the prompt is empty; give at least one token", param="prompt")
        bad = [t for t in tokens if not 0 <= t < cfg.vocab_size]
        if bad:
            raise InvalidRequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})",
                                      param="prompt")
        if len(tokens) > cfg.max_seq_len:
            raise ContextLengthExceededError(
                f"the prompt has {len(tokens)} tokens but the context length is {cfg.max_seq_len}; "
                "shorten the prompt", param="prompt"
            )
        # a prompt filling the context still gives one token, as vLLM's does (scoring reads its logits): the
        # last token is never fed back, so it needs no position in the cache
        max_total = min(max(cfg.max_seq_len, len(tokens) + 1), len(tokens) + params.max_tokens)
        kv = self.model.kv
        if -(-min(max_total, cfg.max_seq_len) // kv.block_size) > kv.num_blocks:
            pool = kv.num_blocks * kv.block_size
            prompt_alone = len(tokens) >= pool
            raise ContextLengthExceededError(  # the pool is this engine's context: the request can never run
                f"this request may need {max_total} tokens of KV cache (a {len(tokens)}-token prompt) but the pool "
                f"holds {pool}; {'shorten the prompt' if prompt_alone else 'lower max_tokens'} or load the model "
                "with more KV blocks", param="prompt" if prompt_alone else "max_tokens"
            )
        for kind, ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
            outside = [t for t in ids if not 0 <= t < cfg.vocab_size]
            if outside:
                raise InvalidRequestError(
                    f"{kind} token {outside[0]} is outside the vocabulary [0, {cfg.vocab_size})", param=kind
                )
        cap = min(cfg.vocab_size, self.config.max_logprobs if self.config.max_logprobs is not None else cfg.vocab_size)
        if params.logprobs > cap:
            raise InvalidRequestError(
                f"logprobs={params.logprobs} asks for more top logprobs per token than this engine returns "
                f"({cap}); ask for at most {cap}"
                + ("" if cap == cfg.vocab_size else " or raise EngineConfig(max_logprobs=...)"), param="logprobs"
            )
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer; this model has none, use stop_token_ids",
                                      param="stop")
        matcher = (matcher_for(params, self.tokenizer, cfg.vocab_size, self._eos_ids, tokens)
                   if params.structured else None)
        request = Request(request_id, tokens, params, max_total, metadata=metadata)
        request.sampler = RequestSampler(params, tokens, matcher)
        if require_full_logits(metadata):
            request.full_logits = LogitRows()
        if self.tokenizer is not None:
            skip_special = params.skip_special_tokens is not False  # None (unset) skips them
            request.detokenizer = IncrementalDetokenizer(self.tokenizer, tokens, skip_special)
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
        """Issue one forward pass over the scheduled batch; outputs of requests that changed.

        With overlap, the outputs are those of the step issued before this one
        (read while this one computes); otherwise of this one.
        """
        with self._step_lock:
            outputs = self._drain_inbox()
            try:
                return self._step(outputs)
            except BaseException:
                self._recover(outputs)
                raise

    def _step(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        chunks = self.scheduler.schedule()
        previous, self._in_flight = self._in_flight, None
        if not chunks and previous is None:
            if self.scheduler.waiting and not self.scheduler.running:
                raise KVCacheExhaustedError(
                    f"no KV blocks free for the next request: {self.model.kv.num_used_blocks} blocks are "
                    "held by sequences outside this engine; release them (LlmExecutor.release_cache)"
                )
            return outputs
        started = time.perf_counter()
        issued = self._issue(chunks, started, outputs) if chunks else None
        if previous is not None:
            self._read(previous, outputs)
        if issued is not None:
            if not issued.lagged:
                self._read(issued, outputs)
            elif any(not chunk.request.finished for chunk, _ in issued.pending):
                self._in_flight = issued
            else:  # all it computed were extra tokens: nothing to read, but no work is left running either
                self.model.flush()
            self._metrics.stepped(started, sum(len(c.tokens) + len(c.drafts) for c in chunks))
        return outputs

    def _recover(self, outputs: list[RequestOutput]) -> None:
        """A step stopped half way (Ctrl-C in a caller stepping the engine, or an error no request owns): what
        it already emitted goes out with the next step, and every running request is computed again from the
        tokens the host holds (tokens of the lost steps, still on the device, are sampled again). Without
        this, a request could be left with its KV counted as computed but no token to feed next, or waiting on
        a step that will never be read."""
        self._in_flight = None
        self.model.flush()
        self._requeue(outputs)
        for request in list(self.scheduler.running):
            request.lagged.clear()
            self.scheduler.preempt(request)

    def _issue(self, chunks: list[ScheduledChunk], started: float, outputs: list[RequestOutput]) -> _Step:
        """Run the forward pass and start sampling; with overlap the picks stay on the device."""
        for chunk in chunks:
            if chunk.request.metrics.first_scheduled_time is None:
                chunk.request.metrics.first_scheduled_time = started
        pending = self._run_batch(chunks, outputs)
        lagged = self.overlaps_steps and not any(_needs_host_tokens(chunk) for chunk, _ in pending)
        if lagged:
            for chunk, picks in pending:
                chunk.request.lagged.append(picks.device_token())
        return _Step(pending, lagged)

    def _read(self, step: _Step, outputs: list[RequestOutput]) -> None:
        """Take a step's picks to the host: stop checks, detokenizing, outputs.

        A request that ended since (at the previous read, an abort, a failure)
        drops its pick: the extra token was computed into KV it no longer holds.
        """
        kv = self.model.kv
        for chunk, pending in step.pending:
            request = chunk.request
            if request.finished:
                continue
            if step.lagged:
                request.lagged.pop(0)
            try:
                picks = pending.picks()
            except Exception as error:
                outputs.append(self._fail(request, error, "reading its sampled tokens failed"))
                continue
            kv.fill(request.request_id, request.num_host_tokens, picks[0].token)  # keys a block it completes
            outputs.append(self._accept_or_fail(chunk, picks))

    # ------------------------------------------------------ fault isolation
    def _run_batch(
        self, chunks: list[ScheduledChunk], outputs: list[RequestOutput]
    ) -> list[tuple[ScheduledChunk, _Pending]]:
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
            pending = []
            for chunk in chunks:
                pending += self._run_batch([chunk], outputs)
            return pending
        self.scheduler.mark_computed(chunks)
        self._keep_full_logits(chunks, out)
        sampling = [c for c in chunks if c.sample]
        if not sampling:
            return []
        states = [c.request.sampler.rng_state() for c in sampling]
        try:
            return list(zip(sampling, self._sample(sampling, out)))
        except Exception:
            for chunk, state in zip(sampling, states):
                chunk.request.sampler.rewind(state)
        pending = []
        for chunk in sampling:
            try:
                pending.append((chunk, self._sample([chunk], out)[0]))
            except Exception as error:
                outputs.append(self._fail(chunk.request, error, "sampling failed"))
        return pending

    def _sample(self, chunks: list[ScheduledChunk], out: ForwardOutput) -> list[_Pending]:
        """One sampling call over the chunks' last rows (every verified position of drafted ones)."""
        ops = self.model.ops
        rows: list[int] = []
        samplers: list[RequestSampler] = []
        for chunk in chunks:
            first, count = out.rows[chunk.request.request_id]
            rows += range(first + count - 1 - len(chunk.drafts), first + count)
            sampler = chunk.request.sampler
            samplers += row_samplers(sampler, chunk.drafts) if chunk.drafts else [sampler]
        logits = out.logits
        if rows != list(range(sum(count for _, count in out.rows.values()))):
            logits = ops.take_rows(logits, ops.from_numpy(np.asarray(rows, dtype=np.int32), None))
        call = _SampleCall(sample_batch_on_device(ops, logits, samplers), len(samplers))
        pending, first = [], 0
        for chunk in chunks:
            count = 1 + len(chunk.drafts)
            pending.append(_Pending(call, first, samplers[first : first + count]))
            first += count
        return pending

    def _forward(self, chunks: list[ScheduledChunk]):
        items = tuple(
            ForwardItem(
                c.request.request_id, c.tokens + list(c.drafts), c.start, c.sample,
                full_logits=bool(c.drafts) or c.request.full_logits is not None, metadata=c.request.metadata,
                adapter=c.request.lora,
            )
            for c in chunks
        )
        return self.executor.run(UnifiedBatch(items), to_host=False)

    def _keep_full_logits(self, chunks: list[ScheduledChunk], out: ForwardOutput) -> None:
        """Copy the rows of requests that asked for every position's logits to the host."""
        wanted = [c for c in chunks if c.request.full_logits is not None]
        if not wanted:
            return
        host = self.model.ops.to_numpy(out.logits)
        for chunk in wanted:
            first, count = out.rows[chunk.request.request_id]
            chunk.request.keep_logits(np.array(host[first : first + count], dtype=np.float32), chunk.start)

    def _verify(self, chunk: ScheduledChunk, picks: list[SampledToken]) -> list[SampledToken]:
        """Keep the picks that confirm the drafts (plus one); roll the KV of the rejected ones back."""
        request = chunk.request
        emitted = accepted(chunk.drafts, picks)
        spend_draws(request.sampler, len(emitted))
        kept = chunk.start + len(emitted)  # the fed token and the accepted drafts
        request.num_computed_tokens = kept
        if len(emitted) <= len(chunk.drafts):
            self.executor.truncate_kv(request.request_id, kept)
        if request.full_logits is not None:
            request.trim_logits(kept)
        return emitted

    def _accept_or_fail(self, chunk: ScheduledChunk, picks: list[SampledToken]) -> RequestOutput:
        request = chunk.request
        try:
            if not chunk.drafts:
                return self._accept(request, picks)
            picks = self._verify(chunk, picks)

            def taken(count: int) -> None:  # the accepted drafts are the picks but the last, less those a stop cut
                accepted = min(len(picks) - 1, count)
                self._speculator.verified(request, len(chunk.drafts), accepted)
                self._metrics.verified(len(chunk.drafts), accepted)

            return self._accept(request, picks, taken)
        except Exception as error:  # KV rollback, detokenizer or stop filter
            return self._fail(request, error, "handling its new tokens failed")

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

    def _accept(self, request: Request, picks: Sequence[SampledToken],
                taken: Callable[[int], None] | None = None) -> RequestOutput:
        """Append the new tokens in order until one ends the request; one output for them all. ``taken`` hears
        how many were appended before that output is made."""
        for count, pick in enumerate(picks, 1):
            reason = self._append(request, pick)
            if reason is not None:
                if taken is not None:
                    taken(count)
                return self._finish(request, reason)
        if taken is not None:
            taken(len(picks))
        return self._emit(request)

    def _append(self, request: Request, pick: SampledToken) -> FinishReason | None:
        """Take one token; the reason when it ends the request."""
        token = pick.token
        if token == UNUSABLE:
            raise FloatingPointError(
                "the model's logits hold NaN: a weight is broken, or the compute dtype overflowed (float16 does where "
                "bfloat16 and float32 do not); load the model with dtype=\"bfloat16\" or \"float32\"")
        now = time.perf_counter()
        self._metrics.took_token()
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = now
        params = request.params
        if token in params.stop_token_ids or (token in self._eos_ids and not params.ignore_eos):
            request.stop_reason = token
            if request.logprobs is not None:
                request.stop_pick = pick
            return FinishReason.STOP
        request.output_token_ids.append(token)
        request.sampler.record(token)
        request.metrics.num_generated_tokens += 1
        if request.logprobs is not None:
            request.logprobs.append(pick)
        if request.detokenizer is not None:
            request.text += request.stop_filter.feed(request.detokenizer.push(token))
            if request.stop_filter.stopped:
                request.stop_reason = request.stop_filter.matched
                return FinishReason.STOP
        if request.sampler.matcher is not None and request.sampler.matcher.complete:
            return FinishReason.STOP  # the structured output is whole: only the end of sequence could follow
        if len(request.output_token_ids) >= params.max_tokens or request.num_host_tokens >= request.max_total_tokens:
            return FinishReason.LENGTH
        return None

    def _finish(self, request: Request, reason: FinishReason) -> RequestOutput:
        ended_early = reason in (FinishReason.ABORT, FinishReason.ERROR)
        if request.detokenizer is not None and not request.stop_filter.stopped and not ended_early:
            try:  # first, while a failure can still end the request as one
                request.text += request.stop_filter.feed(request.detokenizer.flush()) + request.stop_filter.flush()
            except Exception as error:
                return self._fail(request, error, "decoding the end of its text failed")
            if request.stop_filter.stopped:  # the last character completed a stop string
                reason, request.stop_reason = FinishReason.STOP, request.stop_filter.matched
        self.scheduler.finish(request)
        request.lagged.clear()  # a token still on the device is dropped with its KV
        if self._speculator is not None:
            self._speculator.forget(request)
        if request.lora is not None:
            self.model.adapters.release(request.lora)
        request.finish_reason = reason
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


def _needs_host_tokens(chunk: ScheduledChunk) -> bool:
    """Whether the request's next step needs this step's picks on the host before it is issued:
    penalties over the token history, every position's logits, speculative drafts, a grammar."""
    request = chunk.request
    return (request.params.needs_history or request.full_logits is not None or bool(chunk.drafts)
            or request.sampler.matcher is not None)
