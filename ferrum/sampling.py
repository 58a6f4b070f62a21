"""Per-request sampling: parameters, validation and the host reference sampler.

Each request owns its random generator, seeded from its own seed, so its
tokens do not depend on which other requests share a batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from ferrum.errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. The defaults give greedy decoding of up to 256 tokens."""

    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
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

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise InvalidRequestError(f"invalid sampling parameters: {msg}")

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            bad(f"temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            bad(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            bad(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not isinstance(self.logprobs, int) or self.logprobs < 0:
            bad(f"logprobs must be an integer >= 0, got {self.logprobs!r}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_history(self) -> bool:
        return (
            self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
        )


def adjust_logits(
    logits: np.ndarray, params: SamplingParams, prompt: Sequence[int], output: Sequence[int]
) -> np.ndarray:
    """Apply logit bias and repetition / presence / frequency penalties (float32 copy)."""
    logits = np.array(logits, dtype=np.float32)
    vocab = logits.shape[-1]
    for token, bias in params.logit_bias.items():
        if not 0 <= int(token) < vocab:
            raise InvalidRequestError(f"logit_bias token {token} is outside the vocabulary [0, {vocab})")
        logits[int(token)] += bias
    if params.repetition_penalty != 1.0:
        seen = np.unique(np.concatenate([np.asarray(prompt, dtype=np.int64), np.asarray(output, dtype=np.int64)]))
        if seen.size:
            values = logits[seen]
            logits[seen] = np.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if output and (params.presence_penalty or params.frequency_penalty):
        counts = np.bincount(np.asarray(output, dtype=np.int64), minlength=vocab)[:vocab]
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    return logits


def filtered_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Temperature, then top-k, top-p and min-p; returns a normalised distribution."""
    scaled = logits.astype(np.float64) / params.temperature
    scaled -= scaled.max()
    probs = np.exp(scaled)
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    keep = np.ones(len(probs), dtype=bool)
    if params.top_k:
        keep[order[params.top_k :]] = False
    if params.top_p < 1.0:
        sorted_probs = probs[order]
        # keep the smallest prefix whose mass reaches top_p (always the first token)
        cutoff = int(np.searchsorted(np.cumsum(sorted_probs), params.top_p)) + 1
        keep[order[cutoff:]] = False
    if params.min_p > 0.0:
        keep &= probs >= params.min_p * probs.max()
    probs = np.where(keep, probs, 0.0)
    return probs / probs.sum()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


class RequestSampler:
    """Samples one request's tokens on the host, reproducibly from its seed."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def sample(
        self, logits: np.ndarray, prompt: Sequence[int] = (), output: Sequence[int] = ()
    ) -> tuple[int, list[tuple[int, float]]]:
        """Pick the next token; also the top-n ``(token, logprob)`` pairs if asked for."""
        p = self.params
        if p.logit_bias or p.needs_history:
            logits = adjust_logits(logits, p, prompt, output)
        if p.greedy:
            token = int(np.argmax(logits))
        else:
            probs = filtered_probs(logits, p)
            token = int(self.rng.choice(len(probs), p=probs))
        top: list[tuple[int, float]] = []
        if p.logprobs:
            lp = log_softmax(np.asarray(logits))
            best = np.argsort(-lp, kind="stable")[: p.logprobs]
            top = [(int(t), float(lp[t])) for t in best]
        return token, top
