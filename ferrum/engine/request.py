"""A request's life inside the engine, and what callers get back from it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from ferrum.errors import RequestFailedError
from ferrum.sampling import SamplingParams

if TYPE_CHECKING:
    from ferrum.sampling import SampledToken


class RequestStatus(str, enum.Enum):
    WAITING = "waiting"  # queued, or preempted and queued again
    RUNNING = "running"  # has KV blocks and gets a slice every step
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # a stop token or stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # cancelled by the caller
    ERROR = "error"  # something failed while it ran; see RequestOutput.error


@dataclass
class RequestMetrics:
    """Timestamps (``time.perf_counter`` seconds) and counts of one request."""

    arrival_time: float
    num_prompt_tokens: int
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_generated_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    num_preemptions: int = 0
    num_drafted_tokens: int = 0  # speculative decoding: tokens proposed by the drafter and verified
    num_accepted_tokens: int = 0  # of those, the ones the target model agreed with
    num_spec_steps: int = 0  # verification steps (each emits 1 + the accepted drafts)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens (0 when nothing was drafted)."""
        return self.num_accepted_tokens / self.num_drafted_tokens if self.num_drafted_tokens else 0.0

    @property
    def tokens_per_spec_step(self) -> float:
        """Tokens emitted per verification step (1 + accepted drafts, averaged; 0 without speculation)."""
        return 1 + self.num_accepted_tokens / self.num_spec_steps if self.num_spec_steps else 0.0

    @property
    def ttft(self) -> float | None:
        """Time to first token, from arrival."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if self.finish_time is None or self.first_token_time is None or self.num_generated_tokens < 2:
            return None
        return (self.finish_time - self.first_token_time) / (self.num_generated_tokens - 1)

    @property
    def latency(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time


@dataclass(frozen=True)
class RequestOutput:
    """A request's state after a step: everything so far plus what is new.

    ``token_ids`` and ``logprobs`` are read from the request's append-only lists when first asked for, so a
    step's outputs nobody reads in whole (a stream's, which takes the ``new_*`` fields) do not copy every token
    so far: per request and step that copy grew with the output."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    text: str | None  # None when the model has no tokenizer
    new_token_ids: tuple[int, ...]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None
    stop_reason: int | str | None  # the stop token id or stop string that ended it
    metrics: RequestMetrics
    error: RequestFailedError | None = None  # set when finish_reason is ERROR
    metadata: Mapping[str, Any] = field(default_factory=dict)  # as given to add_request
    #: With metadata ``ferrum_require_full_logits``: float32 ``[positions, vocab]``, row ``i`` the
    #: logits after token ``i`` of prompt + output (predicting token ``i + 1``), for every position
    #: computed so far; the same rows ``forward_verify`` gives. ``None`` otherwise.
    full_logits: np.ndarray | None = None
    #: With logprobs: the pick of the end-of-sequence or stop token that ended the request (``stop_reason``),
    #: which ``token_ids`` and ``logprobs`` leave out. None otherwise.
    stop_logprobs: SampledToken | None = None
    _tokens: list[int] = field(default_factory=list, repr=False, compare=False)  # the request's, appended to later
    _picks: list[SampledToken] | None = field(default=None, repr=False, compare=False)  # likewise
    _count: int = 0  # how many of them this output holds

    @cached_property
    def token_ids(self) -> tuple[int, ...]:
        return tuple(self._tokens[: self._count])

    @cached_property
    def logprobs(self) -> tuple[SampledToken, ...] | None:
        """One per token when logprobs were asked for."""
        return None if self._picks is None else tuple(self._picks[: self._count])


OutputCallback = Callable[[RequestOutput], None]


class LogitRows:
    """A request's logits, one row per computed position, appended to in place.

    Every step's output carries all rows so far; concatenating them anew each step would copy
    ``positions x vocab`` floats per step (quadratic in the length). Rows live in one buffer
    that doubles when full, and an output gets a read-only view of the filled rows: a later
    append writes past the view, a doubling moves on to a new buffer, and ``truncate`` copies
    into a new one, so a view handed out never changes.
    """

    def __init__(self) -> None:
        self._buffer: np.ndarray | None = None
        self._length = 0

    def __len__(self) -> int:
        return self._length

    def put(self, rows: np.ndarray, start: int) -> None:
        """Rows for positions ``start ..``; any held from ``start`` on (a recompute) are dropped first."""
        if start > self._length:
            raise ValueError(f"logit rows from position {start} leave a gap after {self._length} held rows")
        if start < self._length:
            self.truncate(start)
        end = start + len(rows)
        if self._buffer is None or end > len(self._buffer):
            self._regrow(max(end, 2 * self._length, 16), rows.shape[1:])
        self._buffer[start:end] = rows
        self._length = end

    def truncate(self, length: int) -> None:
        """Keep the rows of positions ``.. length - 1``, in a new buffer (views handed out keep theirs)."""
        if length < self._length:
            self._length = length
            self._regrow(len(self._buffer), self._buffer.shape[1:])

    def view(self) -> np.ndarray:
        """The rows so far, read-only (call it once there is one)."""
        rows = self._buffer[: self._length]
        rows.flags.writeable = False
        return rows

    def _regrow(self, capacity: int, row_shape: tuple[int, ...]) -> None:
        buffer = np.empty((capacity, *row_shape), dtype=np.float32)
        if self._buffer is not None:
            buffer[: self._length] = self._buffer[: self._length]
        self._buffer = buffer


@dataclass(eq=False)
class Request:
    """Scheduling state (token counts) plus the per-request sampling and text state.

    ``num_computed_tokens`` chases ``num_tokens``: the prompt, then one more
    with every sampled token. A request whose every token but the last is
    computed is decoding; anything less is (chunked) prefill.

    With asynchronous stepping the newest tokens may still be on the device:
    ``lagged`` holds them (:class:`ferrum.device_tokens.DeviceToken`, oldest first)
    after ``output_token_ids`` until the host reads them; they count in
    ``num_tokens`` and the next step feeds them as they are.
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    max_total_tokens: int  # prompt + output may not exceed this (context length)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    metrics: RequestMetrics = None  # type: ignore[assignment]
    # Set by the engine: sampler, detokenizer, stop-string filter, output callback.
    sampler: Any = None
    detokenizer: Any = None
    stop_filter: Any = None
    on_output: OutputCallback | None = None
    text: str = ""
    logprobs: list[SampledToken] | None = None
    stop_pick: SampledToken | None = None  # with logprobs: the stop token's (not among output_token_ids)
    reported_tokens: int = 0
    reported_text: int = 0
    error: RequestFailedError | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    lora: str | None = None  # the LoRA adapter it runs with (held on the model's registry until it finishes)
    cache_salt: bytes = b""  # what keys its KV blocks besides its tokens (the adapter's digest)
    #: Host logits of computed positions, in order, when the metadata asks for them (else None).
    full_logits: LogitRows | None = None
    #: Sampled tokens the host has not read yet (asynchronous stepping), oldest first.
    lagged: list[Any] = field(default_factory=list)

    def keep_logits(self, rows: np.ndarray, start: int) -> None:
        """Store the logits of positions ``start ..``; rows of positions past a recompute are replaced."""
        self.full_logits.put(rows, start)

    def trim_logits(self, length: int) -> None:
        """Forget the logits of positions ``length`` on (preemption, rejected drafts)."""
        self.full_logits.truncate(length)

    def __post_init__(self) -> None:
        if self.metrics is None:
            self.metrics = RequestMetrics(time.perf_counter(), len(self.prompt_token_ids))

    @property
    def num_tokens(self) -> int:
        """Prompt, output and the lagged tokens still on the device."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + len(self.lagged)

    @property
    def num_host_tokens(self) -> int:
        """Prompt and output: the tokens the host has read."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def generation_done(self) -> bool:
        """Every token it may have is sampled (max_tokens or the context): only reading them is left."""
        return (
            len(self.output_token_ids) + len(self.lagged) >= self.params.max_tokens
            or self.num_tokens >= self.max_total_tokens
        )

    def token_slice(self, start: int, stop: int) -> list[Any]:
        """Token ids ``start .. stop-1`` of prompt followed by output (then lagged device tokens)."""
        prompt = self.prompt_token_ids
        if stop <= len(prompt):
            return list(prompt[start:stop])
        out = self.output_token_ids + self.lagged if self.lagged else self.output_token_ids
        if start >= len(prompt):
            return out[start - len(prompt) : stop - len(prompt)]
        return list(prompt[start:]) + out[: stop - len(prompt)]

    def all_token_ids(self) -> list[int]:
        return self.token_slice(0, self.num_tokens)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def snapshot(self) -> RequestOutput:
        """The output so far; ``new_*`` hold what appeared since the last snapshot."""
        count = len(self.output_token_ids)
        new_tokens = tuple(self.output_token_ids[self.reported_tokens :])
        new_text = self.text[self.reported_text :]
        self.reported_tokens, self.reported_text = count, len(self.text)
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            text=self.text if self.detokenizer is not None else None,
            new_token_ids=new_tokens,
            new_text=new_text,
            finished=self.finished,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            metrics=self.metrics,
            error=self.error,
            metadata=self.metadata,
            full_logits=self.full_logits.view() if self.full_logits else None,
            stop_logprobs=self.stop_pick,
            _tokens=self.output_token_ids,
            _picks=self.logprobs,
            _count=count,
        )
