"""ALiBi's per-head slopes (BLOOM, MPT): scores gain ``slope[h] * (key position - query position)``.

BLOOM's ``build_alibi_tensor`` and MPT's ``build_mpt_alibi_tensor`` (at alibi_bias_max 8, which transformers always
runs) compute the same numbers two ways; the family hands them to the model as data
(:attr:`ferrum.arch.spec.Architecture.alibi_slopes`).
"""

from __future__ import annotations

import math

#: The plugin API from which ``attention`` and ``paged_attention`` take ``alibi_slopes``.
ALIBI_SINCE = (1, 21)


def alibi_slopes(heads: int) -> tuple[float, ...]:
    """``2 ** (-8 i / n)`` for ``i = 1..n``, ``n`` the largest power of two not above ``heads``, then, for the heads
    past it, the odd powers of the next power of two's base (BLOOM's formula)."""
    closest = 2 ** math.floor(math.log2(heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** power for power in range(1, closest + 1)]
    if closest != heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** power for power in range(1, 2 * min(closest, heads - closest), 2)]
    return tuple(slopes)
