"""Per forward pass: which adapter slot each token uses, and the projections that add the low-rank products.

Tokens of a unified batch are laid out item after item, and an item's
adapter is one name, so a pass is described once (:class:`LoraBatch`) and
every adapted projection of every layer reuses that description: the rows
that use some adapter, sorted by slot (stable), and the segments of equal
slots over them (punica's SGMV segments / vLLM's ``token_indices_sorted_by_lora_ids``).

Why the ``lora_apply`` op takes slot stacks plus this host description,
rather than one call per adapter: a backend then chooses its own kernel
shape from one signature (MLX gathers each token's factors with
``mx.gather_mm``, BGMV-like; torch runs one GEMM pair per segment, SGMV-like,
or gathers for decode-sized batches), the segment bounds never need a
device-to-host sync, and a pass without adapted tokens skips the op entirely.
The shrink and expand stay one op (not two) so a fused kernel can keep the
rank-``r`` intermediate on chip.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ferrum.weights import Linear


@dataclass
class LoraBatch:
    """One pass's token-to-adapter mapping, as host arrays.

    ``prepared`` is filled by a backend's ``lora_apply`` with its own device
    copies on the first call of the pass and reused by every later one.
    """

    token_slots: np.ndarray  # [T] int32: each token's slot, -1 for none
    order: np.ndarray  # [n] int32: rows of adapted tokens, sorted by slot (stable)
    slots: np.ndarray  # [n] int32: their slots, ascending
    segments: tuple[tuple[int, int, int], ...]  # (slot, start, count) runs over ``order``
    prepared: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_items(cls, item_slots: list[int], lengths: list[int]) -> "LoraBatch":
        """``item_slots[i]`` (or -1) for the ``lengths[i]`` tokens of item ``i``."""
        return cls.from_token_slots(np.repeat(np.asarray(item_slots, dtype=np.int32), lengths))

    @classmethod
    def from_token_slots(cls, token_slots: np.ndarray) -> "LoraBatch":
        """Each token's slot (or -1), in token order."""
        adapted = np.flatnonzero(token_slots >= 0)
        order = adapted[np.argsort(token_slots[adapted], kind="stable")].astype(np.int32)
        slots = token_slots[order]
        starts = np.flatnonzero(np.diff(slots, prepend=-1)) if len(slots) else np.zeros(0, dtype=np.int64)
        ends = np.append(starts[1:], len(slots))
        segments = tuple((int(slots[s]), int(s), int(e - s)) for s, e in zip(starts, ends))
        return cls(token_slots, order, slots, segments)


class LoraLinear(Linear):
    """A base projection (dense or packed, applied by its bound op) plus the adapters' factors for it.

    ``factors``, ``(a [S, r, in], b [S, r, out])``, hold every resident adapter's
    factors by slot (zero where an adapter leaves this projection alone; scale
    folded into ``b``), or None when none adapts it: one attribute, replaced whole,
    so a pass on another thread than a load never reads one stack's ``a`` with
    another's ``b``. ``state.batch`` is the current pass's :class:`LoraBatch`,
    None when no token of the pass uses an adapter.
    """

    __slots__ = ("factors", "state", "lora_apply")

    def __init__(self, base: Linear, state: Any, lora_apply: Callable[..., Any]):
        self.apply, self.weight, self.bias = base.apply, base.weight, base.bias
        self.factors: tuple[Any, Any] | None = None
        self.state, self.lora_apply = state, lora_apply

    def __call__(self, x: Any) -> Any:
        y = self.apply(x, self.weight, self.bias)
        batch, factors = self.state.batch, self.factors
        if batch is None or factors is None:
            return y
        return self.lora_apply(y, x, *factors, batch)
