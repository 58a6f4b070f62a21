"""AFM's int8 keys and values (mlx-lm's afm7 ``fake_8bit_quant``): each attention layer rounds its keys (rotated and
normed) and values to the integer grid of a learned step of its own, ``clip(round(x / s), -128, 127) * s``, before
they are cached and attended (:func:`ferrum.hookspec.fake_quantize`). The steps are stored as one-number tensors beside
the projections and read once at load into host numbers.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

#: The steps of the keys and of the values, relative to the layer.
STEPS = ("self_attn.quant_key_scale", "self_attn.quant_value_scale")
#: The grid's ends (int8).
LOW, HIGH = -128, 127


def tensors() -> dict[str, tuple[int, ...]]:
    """A layer's steps as stored (mlx-lm's scalar arrays)."""
    return {name: () for name in STEPS}


def is_step(name: str) -> bool:
    """Whether placed tensor ``name`` is a step (placed as it is, never laid out for products)."""
    return name.endswith(tuple(f".{step}" for step in STEPS))


def steps(ops: Any, tensor: Callable[[str], Any]) -> tuple[float, float] | None:
    """A layer's placed steps as host numbers (float32 values); None where it stores none (it reads another's keys
    and values)."""
    placed = [tensor(name) for name in STEPS]
    if placed[0] is None:
        return None
    key, value = (float(np.asarray(ops.to_numpy(t), dtype=np.float32).reshape(-1)[0]) for t in placed)
    return key, value
