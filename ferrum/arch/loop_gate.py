"""IQuest-Coder's loop gate (mlx-lm's iquestloopcoder): each second-pass layer attends twice with the same rotated
queries, in full over its first-pass keys and values and over its own within a window, and mixes the two outputs per
head and token as ``g * full + (1 - g) * local``, ``g = sigmoid(q_h . w_h + b_h)``.

The release stores the gate of stored layer ``i`` as ``gate_projections.{i}`` (``weight [heads, head_dim]``, ``bias
[heads]``); Ferrum reads it as its second-pass layer's ``self_attn.loop_gate``. It is composed from existing ops: the
weight is laid out block-diagonally at load (``[heads, heads * head_dim]``, head ``h``'s row reading only its own
dims), so one ``linear`` of the flattened queries gives every head's logit; a second ``linear`` by a column of ones
spreads each logit over its head's dims (a product by one, exact); ``sigmoid_mul`` of the logit and of its negative
(``1 - sigmoid(x)`` is ``sigmoid(-x)``) weighs the two outputs, which ``add`` joins.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: The gate's module in its (second-pass) layer.
MODULE = "self_attn.loop_gate"


def tensors(heads: int, head_dim: int) -> dict[str, tuple[int, ...]]:
    """A second-pass layer's gate as stored."""
    return {f"{MODULE}.weight": (heads, head_dim), f"{MODULE}.bias": (heads,)}


def holds(name: str) -> bool:
    return f".{MODULE}." in name


def block_diagonal(weight: Any) -> np.ndarray:
    """``[heads, head_dim]`` -> ``[heads, heads * head_dim]``: head ``h``'s row its weights over its own dims."""
    w = np.asarray(weight, dtype=np.float32)
    heads, dims = w.shape
    out = np.zeros((heads, heads, dims), np.float32)
    out[np.arange(heads), np.arange(heads)] = w
    return out.reshape(heads, heads * dims).astype(np.asarray(weight).dtype)


class LoopGate:
    """One layer's gate (``gate``: the block-diagonal linear with its bias) and the mix of its two outputs."""

    def __init__(self, ops: Any, gate: Any, spread: Any, heads: int, head_dim: int):
        self.ops, self.gate, self.spread, self.heads, self.head_dim = ops, gate, spread, heads, head_dim

    @classmethod
    def build(cls, ops: Any, dtype: str, projection: Any, heads: int, head_dim: int) -> LoopGate:
        from ferrum.weights import Linear, place

        ones = place(ops, f"{MODULE}.spread", np.ones((head_dim, 1), np.float32), dtype)
        return cls(ops, projection(MODULE), Linear(ones), heads, head_dim)

    def projections(self) -> list[Any]:
        return [self.gate]

    def mix(self, q: Any, full: Any, local: Any) -> Any:
        """``q, full, local [T, heads, head_dim]`` -> ``g * full + (1 - g) * local``, ``g`` per token and head."""
        ops, heads, dims = self.ops, self.heads, self.head_dim
        logits = self.gate(ops.reshape(q, (-1, heads * dims)))
        spread = ops.reshape(self.spread(ops.reshape(logits, (-1, 1))), (-1, heads, dims))
        return ops.add(ops.sigmoid_mul(spread, full), ops.sigmoid_mul(ops.mul_scalar(spread, -1.0), local))
