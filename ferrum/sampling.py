"""Per-request sampling: parameters, per-request state, and batched sampling on the backend.

A batch of requests is sampled by one call of the backend's ``sample`` op on
logits that stay on the device; only the chosen token ids (and logprobs when
asked for) come back. Each request owns its random generator, seeded from
its own seed, and spends exactly one uniform draw per sampled token, so its
tokens do not depend on which other requests share the batch.

Semantics, row by row (:func:`sample_numpy` is the reference):

1. adjust: ``+ logit_bias``, then the repetition penalty on tokens of prompt +
   output (positive logits divided, negative multiplied: the biased logit's sign,
   in vLLM's, mlx-lm's and llama.cpp's order), then ``- presence - frequency * count``;
2. logprobs are the log-softmax of the adjusted logits (before temperature);
3. greedy rows (temperature 0) take the first maximum;
4. other rows: softmax of ``logits / temperature``, sorted by logit (ties:
   lower token id first; by logit, not by probability, which underflows to
   ties at a low temperature), keep the top-k, of those the shortest prefix
   whose mass reaches top-p of theirs (top-p within the top-k renormalised,
   as vLLM, transformers and llama.cpp chain them), and tokens with at least
   ``min_p`` times the top probability, and always the most likely token (a
   top-p that rounds to 0);
   pick by inverse CDF: the first sorted token whose cumulative kept mass
   exceeds ``uniform * total``. The logprobs' top tokens are in that order.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ferrum.errors import InvalidRequestError

_INT32_MAX = int(np.iinfo(np.int32).max)
#: The token a row whose logits hold NaN picks: no token at all, so its request fails instead of going on.
UNUSABLE = -1
#: Largest float32 below 1, so a uniform never selects past the kept mass.
_BELOW_ONE = float(np.nextafter(np.float32(1.0), np.float32(0.0)))


def _bad(message: str, param: str | None = None) -> None:
    raise InvalidRequestError(f"invalid sampling parameters: {message}", param=param)


#: Logit bias and the presence and frequency penalties: beyond 1e4 either way a bias already forces or bans
#: its token (logits span tens), and past float32's range it turned into inf and NaN logprobs.
_LOGIT_RANGE = "in [-1e4, 1e4]"


def _within_logit_range(value: float) -> bool:
    return -1e4 <= value <= 1e4


def _integer(name: str, value: Any, minimum: int, param: str | None = None) -> None:
    """``value`` an integer of at least ``minimum``; ``param`` names the field it came from (default ``name``)."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        _bad(f"{name} must be an integer >= {minimum}, got {value!r}", param or name)


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _number(name: str, value: Any, ok: Callable[[float], bool] | None = None, rule: str = "",
            param: str | None = None) -> None:
    if not isinstance(value, (int, float, np.number)) or isinstance(value, bool) or not math.isfinite(value):
        _bad(f"{name} must be a finite number{' ' + rule if rule else ''}, got {value!r}", param or name)
    if ok is not None and not ok(float(value)):
        _bad(f"{name} must be {rule}, got {value!r}", param or name)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. The defaults give greedy decoding of up to 256 tokens.

    vLLM's spellings of "none" are taken too: ``max_tokens=None`` runs to the context length, ``top_k=-1`` is
    off, and ``None`` for ``stop``, ``stop_token_ids``, ``logit_bias`` or ``logprobs`` is none."""

    max_tokens: int | None = 256  # None: up to the context length
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 (or -1) = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()
    stop: Sequence[str] = ()  # stop strings, not part of the output
    ignore_eos: bool = False
    logprobs: int = 0  # top-n logprobs to return per token
    #: Leave special tokens (``[TOOL_CALLS]``, ``<|python_tag|>``...) out of the text, as tokenizers decode by
    #: default; the token ids are unchanged either way. ``None``: leave them out, except from a chat reply
    #: whose structure is special tokens (gpt-oss's harmony channels), which would read garbled without them.
    skip_special_tokens: bool | None = None
    #: Structured output (:mod:`ferrum.structured`): ``True`` for any JSON object, or a JSON schema (a
    #: mapping, or a pydantic model whose schema it is) the output must match; every token the grammar does
    #: not allow next is forbidden.
    json_schema: bool | Mapping[str, Any] | None = None
    #: Structured output by a Lark grammar in llguidance's dialect (``%json {...}`` embeds a schema,
    #: ``<[id]>`` names a special token); instead of ``json_schema``.
    grammar: str | None = None
    #: With ``json_schema`` or ``grammar``, for a reasoning model: the tags it thinks between (``("<think>",
    #: "</think>")``, each one token of its vocabulary). The thinking is left free and the grammar applies to
    #: the answer after the closing tag (:mod:`ferrum.structured.thinking`).
    reasoning_tags: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        """Type- and range-check every field (NaN, infinities and bools included) and normalise collections."""
        for name, none in (("max_tokens", _INT32_MAX), ("stop", ()), ("stop_token_ids", ()), ("logit_bias", {}),
                           ("logprobs", 0)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, none)
        if self.top_k == -1 and isinstance(self.top_k, (int, np.integer)) and not isinstance(self.top_k, bool):
            object.__setattr__(self, "top_k", 0)
        _integer("max_tokens", self.max_tokens, 1)
        _number("temperature", self.temperature, lambda v: 0 <= v <= _FLOAT32_MAX,  # the sampler's float32
                ">= 0 and at most float32's largest, 3.4e38")
        _integer("top_k", self.top_k, 0)
        _number("top_p", self.top_p, lambda v: 0 < v <= 1, "in (0, 1]")
        _number("min_p", self.min_p, lambda v: 0 <= v <= 1, "in [0, 1]")
        # beyond 1e4 either way it already removes (or forces) the seen tokens; further, float32 logits overflow
        _number("repetition_penalty", self.repetition_penalty, lambda v: 1e-4 <= v <= 1e4, "in [1e-4, 1e4]")
        for name in ("presence_penalty", "frequency_penalty"):
            _number(name, getattr(self, name), _within_logit_range, _LOGIT_RANGE)
        _integer("logprobs", self.logprobs, 0)
        if self.seed is not None:
            _integer("seed", self.seed, 0)
        if not isinstance(self.ignore_eos, bool):
            _bad(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        if self.skip_special_tokens is not None and not isinstance(self.skip_special_tokens, bool):
            _bad(f"skip_special_tokens must be True, False or None, got {self.skip_special_tokens!r}")
        if not isinstance(self.logit_bias, Mapping):
            _bad(f"logit_bias must map token ids to numbers, got {type(self.logit_bias).__name__}")
        bias = {}
        for token, value in self.logit_bias.items():
            _integer("a logit_bias token id", token, 0, "logit_bias")
            _number(f"logit_bias[{token}]", value, _within_logit_range, _LOGIT_RANGE, "logit_bias")
            bias[int(token)] = float(value)
        stop_ids = (self.stop_token_ids,) if isinstance(self.stop_token_ids, (int, np.integer)) else self.stop_token_ids
        if isinstance(stop_ids, (str, bytes, Mapping)) or not isinstance(stop_ids, Iterable):
            _bad(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        stop_ids = tuple(stop_ids)
        for token in stop_ids:
            _integer("a stop token id", token, 0, "stop_token_ids")
        stops = (self.stop,) if isinstance(self.stop, str) else self.stop
        if isinstance(stops, Mapping) or not isinstance(stops, Iterable):
            _bad(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        stops = tuple(stops)  # once: an iterator checked first would be stored empty
        if any(not isinstance(t, str) or not t for t in stops):
            _bad(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        if callable(getattr(self.json_schema, "model_json_schema", None)):  # a pydantic model (class)
            object.__setattr__(self, "json_schema", self.json_schema.model_json_schema())
        if not (self.json_schema is None or self.json_schema is True or isinstance(self.json_schema, Mapping)):
            _bad(f"json_schema must be True (any JSON object), a JSON schema object or a pydantic model, "
                 f"got {self.json_schema!r}")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            _bad(f"grammar must be a non-empty Lark grammar, got {self.grammar!r}")
        if self.grammar is not None and self.json_schema is not None:
            _bad("give json_schema or grammar, not both")
        if self.reasoning_tags is not None:
            tags = self.reasoning_tags
            if (isinstance(tags, str) or not isinstance(tags, Iterable)
                    or len(tags := tuple(tags)) != 2 or not all(isinstance(t, str) and t for t in tags)
                    or tags[0] == tags[1]):
                _bad(f"reasoning_tags must be two different non-empty strings (opening, closing), "
                     f"got {self.reasoning_tags!r}")
            if not self.structured:
                _bad("reasoning_tags says where a structured output starts; give json_schema or grammar with it")
            object.__setattr__(self, "reasoning_tags", tags)
        object.__setattr__(self, "logit_bias", bias)
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in stop_ids))
        object.__setattr__(self, "stop", tuple(stops))

    @property
    def structured(self) -> bool:
        """A grammar (``json_schema`` or ``grammar``) decides which tokens may come next."""
        return self.json_schema is not None or self.grammar is not None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_history(self) -> bool:
        return (
            self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
        )


@dataclass(frozen=True)
class SamplingBatch:
    """What the ``sample`` op needs, one row per sequence, as host numpy arrays.

    Penalties and logit bias are *sparse*: entry ``j`` adds ``adjust_offset[j]``
    to ``logits[adjust_rows[j], adjust_tokens[j]]`` (API 1.11: a logit bias the
    repetition penalty then scales), rescales it by ``adjust_scale[j]`` (the
    repetition penalty: divide if positive, multiply if not) and then adds
    ``adjust_shift[j]``. So they run on the device without a dense
    ``[n, vocab]`` upload. A ``(row, token)`` pair appears at most once (a token a
    grammar forbids has only its ``-inf`` shift), so a backend may scatter the
    entries in any order.
    """

    temperature: np.ndarray  # float32 [n]; 0 = greedy
    top_k: np.ndarray  # int32 [n]; 0 = off
    top_p: np.ndarray  # float32 [n]; 1 = off
    min_p: np.ndarray  # float32 [n]; 0 = off
    uniform: np.ndarray  # float32 [n] in [0, 1); ignored for greedy rows
    num_logprobs: int  # top-n logprobs wanted (max over rows); 0 = none
    adjust_rows: np.ndarray  # int32 [m]
    adjust_tokens: np.ndarray  # int32 [m]
    adjust_scale: np.ndarray  # float32 [m]
    adjust_shift: np.ndarray  # float32 [m]
    #: float32 [m], added before the scale; zeros wherever the scale is 1 (a bias then goes in the shift, so a
    #: plugin written before API 1.11, which ignores this, errs only where a penalised token is also biased)
    adjust_offset: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.adjust_offset is None:
            object.__setattr__(self, "adjust_offset", np.zeros(len(self.adjust_rows), dtype=np.float32))

    @property
    def all_greedy(self) -> bool:
        return not self.temperature.any()


@dataclass(frozen=True)
class SampleResult:
    """What the ``sample`` op returns, as host numpy arrays."""

    tokens: np.ndarray  # int64 [n]
    logprobs: np.ndarray | None = None  # float32 [n], of the chosen tokens
    top_tokens: np.ndarray | None = None  # int64 [n, num_logprobs], best first
    top_logprobs: np.ndarray | None = None  # float32 [n, num_logprobs]
    #: bool [n]: the rows whose logits hold NaN, whose picks mean nothing (a broken weight, a float16
    #: overflow); None where the backend does not tell (API 1.8 and before).
    unusable: np.ndarray | None = None


@dataclass(frozen=True)
class DeviceSample:
    """What the ``sample_on_device`` op returns: the picks left on the backend, read on demand.

    ``ids`` (backend int32 ``[n]``) can feed the next step's embedding before
    the host has seen them; ``read`` waits for the device and returns the
    :class:`SampleResult`. Reading later than issuing is what lets the host
    build step N+1 while the device computes step N.
    """

    ids: Any
    read: Callable[[], SampleResult]


@dataclass(frozen=True)
class SampledToken:
    """One request's pick: the token, and its logprob and the top-n when asked for."""

    token: int
    logprob: float | None
    top_logprobs: tuple[tuple[int, float], ...]


class RequestSampler:
    """One request's sampling state: params, its own generator, token history for penalties, and the
    grammar of a structured output (``matcher``, a :class:`ferrum.structured.TokenMatcher`)."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], matcher: Any = None):
        self.params = params
        self.matcher = matcher
        self.rng = np.random.default_rng(params.seed)
        self._seen = set(int(t) for t in prompt_ids) if params.repetition_penalty != 1.0 else set()
        self._counts: Counter[int] = Counter()

    def record(self, token: int) -> None:
        """An output token was accepted: it now counts for the penalties and moves the grammar on."""
        if self.params.repetition_penalty != 1.0:
            self._seen.add(token)
        if self.params.presence_penalty or self.params.frequency_penalty:
            self._counts[token] += 1
        if self.matcher is not None:
            self.matcher.consume(token)

    def fork(self) -> "RequestSampler":
        """A copy with its own history and generator in the same state (to score positions ahead)."""
        twin = RequestSampler.__new__(RequestSampler)
        twin.params, twin._seen, twin._counts = self.params, set(self._seen), Counter(self._counts)
        twin.matcher = None if self.matcher is None else self.matcher.fork()
        twin.rng = np.random.default_rng()
        twin.rng.bit_generator.state = self.rng.bit_generator.state
        return twin

    def rng_state(self) -> dict:
        """The generator's state, so a draw spent on a failed sampling call can be taken back."""
        return self.rng.bit_generator.state

    def rewind(self, state: dict) -> None:
        self.rng.bit_generator.state = state

    def uniform(self) -> float:
        """This step's draw (one per sampled token, greedy requests draw nothing)."""
        return 0.0 if self.params.greedy else min(float(self.rng.random()), _BELOW_ONE)

    def forbidden(self) -> np.ndarray | None:
        """The token ids the grammar does not allow next (``None`` without a grammar)."""
        return None if self.matcher is None else self.matcher.forbidden()

    def adjustments(self, forbidden: np.ndarray | None = None) -> tuple[list[int], list[float], list[float],
                                                                       list[float]]:
        """Sparse ``(tokens, scale, shift, offset)`` for penalties and logit bias (see :class:`SamplingBatch`),
        leaving out ``forbidden`` tokens (each gets one ``-inf`` entry of its own)."""
        p = self.params
        touched = set(self._seen) | set(self._counts) | {int(t) for t in p.logit_bias}
        if forbidden is not None and touched:
            touched.difference_update(forbidden.tolist())
        tokens = sorted(touched)
        scale = [p.repetition_penalty if t in self._seen else 1.0 for t in tokens]
        bias = [float(p.logit_bias.get(t, 0.0)) for t in tokens]
        offset = [b if s != 1.0 else 0.0 for b, s in zip(bias, scale)]
        penalty = [p.frequency_penalty * self._counts[t] + (p.presence_penalty if self._counts[t] else 0.0)
                   for t in tokens]
        shift = [(b if s == 1.0 else 0.0) - pen for b, s, pen in zip(bias, scale, penalty)]
        return tokens, scale, shift, offset


def build_sampling_batch(samplers: Sequence[RequestSampler]) -> SamplingBatch:
    rows, tokens, scale, shift, offset = [], [], [], [], []
    blocked: list[tuple[int, np.ndarray]] = []  # (row, forbidden token ids) of rows under a grammar
    for row, sampler in enumerate(samplers):
        forbidden = sampler.forbidden()
        t, sc, sh, off = sampler.adjustments(forbidden)
        rows += [row] * len(t)
        tokens += t
        scale += sc
        shift += sh
        offset += off
        if forbidden is not None and forbidden.size:
            blocked.append((row, forbidden))
    adjust = [np.array(rows, dtype=np.int32), np.array(tokens, dtype=np.int32),
              np.array(scale, dtype=np.float32), np.array(shift, dtype=np.float32),
              np.array(offset, dtype=np.float32)]
    if blocked:  # the grammar's -inf entries, appended as arrays (a row may forbid most of the vocabulary)
        ids = np.concatenate([b for _, b in blocked])
        owners = np.repeat([row for row, _ in blocked], [len(b) for _, b in blocked]).astype(np.int32)
        adjust = [np.concatenate([adjust[0], owners]), np.concatenate([adjust[1], ids]),
                  np.concatenate([adjust[2], np.ones(len(ids), dtype=np.float32)]),
                  np.concatenate([adjust[3], np.full(len(ids), -np.inf, dtype=np.float32)]),
                  np.concatenate([adjust[4], np.zeros(len(ids), dtype=np.float32)])]
    params = [s.params for s in samplers]
    return SamplingBatch(
        temperature=np.array([p.temperature for p in params], dtype=np.float32),
        top_k=np.array([min(p.top_k, _INT32_MAX) for p in params], dtype=np.int32),  # past the vocabulary: all
        top_p=np.array([p.top_p for p in params], dtype=np.float32),
        min_p=np.array([p.min_p for p in params], dtype=np.float32),
        uniform=np.array([s.uniform() for s in samplers], dtype=np.float32),
        num_logprobs=max(p.logprobs for p in params),
        adjust_rows=adjust[0],
        adjust_tokens=adjust[1],
        adjust_scale=adjust[2],
        adjust_shift=adjust[3],
        adjust_offset=adjust[4],
    )


def sample_batch(ops: Any, logits: Any, samplers: Sequence[RequestSampler]) -> list[SampledToken]:
    """Row ``i`` of ``logits`` (backend array ``[n, vocab]``) belongs to ``samplers[i]``."""
    result: SampleResult = ops.sample(logits, build_sampling_batch(samplers))
    return picks_of(result, samplers)


def sample_batch_on_device(ops: Any, logits: Any, samplers: Sequence[RequestSampler]) -> DeviceSample:
    """:func:`sample_batch` without waiting: this step's draws are spent now, the picks read later."""
    return ops.sample_on_device(logits, build_sampling_batch(samplers))


def picks_of(result: SampleResult, samplers: Sequence[RequestSampler], first: int = 0) -> list[SampledToken]:
    """The picks of rows ``first ..`` of ``result``, one per sampler, with the logprobs each asked for; a row
    whose logits held NaN picks :data:`UNUSABLE`."""
    picks = []
    for i, sampler in enumerate(samplers, start=first):
        n = sampler.params.logprobs
        token = UNUSABLE if result.unusable is not None and result.unusable[i] else int(result.tokens[i])
        if n:
            top = tuple(zip(result.top_tokens[i, :n].tolist(), result.top_logprobs[i, :n].tolist()))
            picks.append(SampledToken(token, float(result.logprobs[i]), top))
        else:
            picks.append(SampledToken(token, None, ()))
    return picks


# --------------------------------------------------------------------------
# The reference: numpy, also what the cpu backend runs
# --------------------------------------------------------------------------
def apply_adjustments_numpy(logits: np.ndarray, batch: SamplingBatch) -> np.ndarray:
    x = np.array(logits, dtype=np.float32)
    if batch.adjust_rows.size:
        r, t = batch.adjust_rows, batch.adjust_tokens
        v = x[r, t] + batch.adjust_offset
        x[r, t] = np.where(v > 0, v / batch.adjust_scale, v * batch.adjust_scale) + batch.adjust_shift
    return x


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Log-probabilities over the last axis, computed in ``x``'s dtype (shifted by the row maximum)."""
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def sample_numpy(logits: np.ndarray, batch: SamplingBatch) -> SampleResult:
    """The semantics of the ``sample`` op (see the module docstring), vectorised over rows."""
    unusable = np.isnan(logits).any(axis=-1)
    x = apply_adjustments_numpy(logits, batch)
    n, vocab = x.shape
    tokens = np.argmax(x, axis=-1).astype(np.int64)
    order = None
    if not batch.all_greedy or batch.num_logprobs:
        temperature = np.where(batch.temperature > 0, batch.temperature, 1.0)[:, None]
        z = x.astype(np.float64) / temperature
        probs = np.exp(z - z.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        order = np.argsort(-x, axis=-1, kind="stable")
    if not batch.all_greedy:
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        rank = np.arange(vocab)[None, :]
        keep = rank < np.where(batch.top_k > 0, batch.top_k, vocab)[:, None]
        top_k_mass = np.where(keep, sorted_probs, 0.0).sum(axis=-1, keepdims=True)
        keep &= (np.cumsum(sorted_probs, axis=-1) - sorted_probs) < batch.top_p[:, None] * top_k_mass
        keep &= sorted_probs >= batch.min_p[:, None] * sorted_probs[:, :1]
        keep |= rank == 0
        cdf = np.cumsum(np.where(keep, sorted_probs, 0.0), axis=-1)
        pick = (cdf <= batch.uniform[:, None] * cdf[:, -1:]).sum(axis=-1)
        sampled = np.take_along_axis(order, np.minimum(pick, vocab - 1)[:, None], axis=-1)[:, 0]
        tokens = np.where(batch.temperature > 0, sampled, tokens)
    if not batch.num_logprobs:
        return SampleResult(tokens, unusable=unusable)
    logp = log_softmax(x.astype(np.float64))
    top = order[:, : batch.num_logprobs]
    return SampleResult(
        tokens,
        np.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0].astype(np.float32),
        top.astype(np.int64),
        np.take_along_axis(logp, top, axis=-1).astype(np.float32),
        unusable,
    )
