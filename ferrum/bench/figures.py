"""The figures every runner reports, computed the same way from timestamps."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Sequence


@dataclass(frozen=True)
class Figures:
    """Speeds of one run. TTFT counts from each request's submission; decode covers the time after the
    last first token."""

    requests: int
    prompt_tokens: int
    generated_tokens: int
    wall_s: float
    ttft_s: float  # mean over requests
    prefill_tok_s: float  # prompt tokens / time until the last request's first token
    decode_tok_s: float  # tokens after each request's first / time from the last first token to the end
    throughput_tok_s: float  # generated tokens / wall time

    @classmethod
    def from_timestamps(
        cls, start: float, end: float, prompt_lens: Sequence[int], first_token_times: Sequence[float],
        generated: Sequence[int], submit_times: Sequence[float] | None = None,
    ) -> "Figures":
        """``submit_times`` (default: ``start`` for every request) are when each request was handed over."""
        last_first = max(first_token_times)
        submitted = [start] * len(first_token_times) if submit_times is None else submit_times
        later_tokens = sum(generated) - len(generated)
        return cls(
            requests=len(prompt_lens),
            prompt_tokens=sum(prompt_lens),
            generated_tokens=sum(generated),
            wall_s=end - start,
            ttft_s=sum(t - s for t, s in zip(first_token_times, submitted)) / len(first_token_times),
            prefill_tok_s=sum(prompt_lens) / (last_first - start),
            decode_tok_s=later_tokens / (end - last_first) if end > last_first and later_tokens else 0.0,
            throughput_tok_s=sum(generated) / (end - start),
        )

    def as_dict(self) -> dict:
        return asdict(self)


def ratios(ferrum: Figures, peer: Figures) -> dict[str, float | None]:
    """Ferrum / peer for speeds and peer / Ferrum for TTFT: above 1 means Ferrum is faster."""

    def div(a: float, b: float) -> float | None:
        return a / b if b else None

    return {
        "prefill_tok_s": div(ferrum.prefill_tok_s, peer.prefill_tok_s),
        "decode_tok_s": div(ferrum.decode_tok_s, peer.decode_tok_s),
        "throughput_tok_s": div(ferrum.throughput_tok_s, peer.throughput_tok_s),
        "ttft_speedup": div(peer.ttft_s, ferrum.ttft_s),
    }


def ratio_summary(pairs: Sequence[dict[str, float | None]]) -> tuple[dict, dict]:
    """The median and the ``[min, max]`` of each ratio over runs taken in pairs (Ferrum, peer)."""
    medians, ranges = {}, {}
    for key in pairs[0]:
        values = sorted(v for v in (p[key] for p in pairs) if v is not None)
        medians[key] = statistics.median(values) if values else None
        ranges[key] = [values[0], values[-1]] if values else None
    return medians, ranges


def median_figures(runs: Sequence[Figures]) -> Figures:
    """The run with the median throughput (a real run, not a mix of several)."""
    ordered = sorted(runs, key=lambda f: f.throughput_tok_s)
    return ordered[len(ordered) // 2]
