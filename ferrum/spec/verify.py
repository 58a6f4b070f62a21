"""Accept or reject drafted tokens against the target model's logits, exactly.

Drafts are deterministic (prompt lookup, or the draft model's argmax), so
the draft distribution ``q`` is a point mass. The standard rule (Leviathan
et al.: accept ``x`` with probability ``min(1, p(x)/q(x))``, else sample the
residual ``norm(max(0, p - q))``) then reads: accept ``x`` with probability
``p(x)``, else sample ``p`` with ``x`` removed. That is the same as sampling
``y ~ p`` and accepting while ``y == x`` (vLLM's n-gram rule), which is what
happens here: position ``i`` of the verified item is sampled by the request's
own sampling semantics (penalties, bias, temperature, top-k/p, min-p), with
the drafts before it counted as history and the generator as it will be after
``i`` draws. Emitting ``m`` tokens spends exactly ``m`` draws, so a seeded
request gives the very tokens it gives without speculation, greedy or not.
"""

from __future__ import annotations

from typing import Sequence

from ferrum.sampling import RequestSampler, SampledToken


def row_samplers(sampler: RequestSampler, drafts: Sequence[int]) -> list[RequestSampler]:
    """One sampler per verified position ``0 .. len(drafts)``; ``sampler`` itself is untouched."""
    rows = [sampler.fork()]
    for token in drafts:
        ahead = rows[-1].fork()
        ahead.uniform()  # the draw its predecessor spends
        ahead.record(token)
        rows.append(ahead)
    return rows


def accepted(drafts: Sequence[int], picks: Sequence[SampledToken]) -> list[SampledToken]:
    """The tokens to emit: picks while they equal the drafts, then the first that differs (or the bonus)."""
    n = 0
    while n < len(drafts) and picks[n].token == drafts[n]:
        n += 1
    return list(picks[: n + 1])


def spend_draws(sampler: RequestSampler, emitted: int) -> None:
    """Advance the request's generator past the draws of the ``emitted`` tokens."""
    for _ in range(emitted):
        sampler.uniform()
