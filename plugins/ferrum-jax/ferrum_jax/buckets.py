"""Shape buckets: sizes that vary from step to step are padded up to a few fixed values.

``jax.jit`` compiles once per distinct input shape. A decode step's KV length grows by one token per
step and its batch changes as requests come and go, so the ops whose shapes follow those numbers pad
them to the next power of two: a sequence growing to 4096 tokens compiles its attention about
log2(4096 / block_size) times, not once per block.
"""

from __future__ import annotations


def bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two that is ``>= n`` and ``>= minimum``."""
    size = max(int(n), minimum, 1)
    return 1 << (size - 1).bit_length()
