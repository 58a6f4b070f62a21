"""The figures every runner reports, computed the same way from timestamps."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class Figures:
    """Speeds of one run. TTFT counts from each request's submission; prefill covers the time some request
    waited for its first token; decode, the tokens made after the last first token over the time after it."""

    requests: int
    prompt_tokens: int
    generated_tokens: int
    wall_s: float
    ttft_s: float  # mean over requests
    prefill_tok_s: float  # prompt tokens / time during which some request was between its start and first token
    decode_tok_s: float  # tokens made after the last first token / time from it to the end (0: none made)
    throughput_tok_s: float  # generated tokens / wall time

    @classmethod
    def from_timestamps(
        cls, start: float, end: float, prompt_lens: Sequence[int], token_times: Sequence[Sequence[float]],
        submit_times: Sequence[float] | None = None, begin_times: Sequence[float] | None = None,
    ) -> "Figures":
        """``token_times``: when each request's tokens came out, one list per request; ``submit_times`` (default:
        ``start`` for every request): when each was handed over, which TTFT counts from; ``begin_times``
        (default: the submissions): when a side began to work on each (a side that runs requests one after
        another begins each when the one before it ends), which prefill counts from."""
        firsts = [times[0] for times in token_times]
        last_first = max(firsts)
        submitted = [start] * len(firsts) if submit_times is None else submit_times
        began = submitted if begin_times is None else begin_times
        later_tokens = sum(t > last_first for times in token_times for t in times)
        generated = sum(len(times) for times in token_times)
        return cls(
            requests=len(prompt_lens),
            prompt_tokens=sum(prompt_lens),
            generated_tokens=generated,
            wall_s=end - start,
            ttft_s=sum(t - s for t, s in zip(firsts, submitted)) / len(firsts),
            prefill_tok_s=sum(prompt_lens) / waited if (waited := _covered(list(zip(began, firsts)))) else 0.0,
            decode_tok_s=later_tokens / (end - last_first) if end > last_first and later_tokens else 0.0,
            throughput_tok_s=generated / (end - start),
        )

    def as_dict(self) -> dict:
        return asdict(self)


def stamp_tokens(token_times: dict[str, list[float]], out: Any) -> None:
    """Note when an engine output's new tokens came out, under its request's id."""
    token_times.setdefault(out.request_id, []).extend([time.perf_counter()] * len(out.new_token_ids))


def _covered(spans: list[tuple[float, float]]) -> float:
    """The length of the union of the ``(begin, end)`` spans."""
    total, reach = 0.0, float("-inf")
    for begin, end in sorted(spans):
        if end > reach:
            total += end - max(begin, reach)
            reach = end
    return total


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
    """The run with the median throughput (a real run, not a mix of several: of an even number, the faster of
    the middle two, where the ratios take the mean of the middle two pairs)."""
    ordered = sorted(runs, key=lambda f: f.throughput_tok_s)
    return ordered[len(ordered) // 2]
