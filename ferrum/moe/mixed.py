"""A shared expert mixed with the routed experts by learned weights (Klear's ``coefficient``), from existing ops."""

from __future__ import annotations

from typing import Any

import numpy as np


class CoefficientMix:
    """``softmax(coefficient(x))``'s two columns weigh the routed experts' sum and the shared expert's output (Klear's
    sparse MLP). A softmax over two logits is the sigmoid of their difference, so each output is ``sigmoid_mul`` of
    a difference of the two columns; constant linears take that difference and spread it over the row at once (the
    ops broadcast only over leading axes), so nothing new is asked of a backend."""

    __slots__ = ("ops", "coefficient", "routed", "shared")

    def __init__(self, ops: Any, coefficient: Any, hidden: int, dtype: str):
        from ferrum.weights import Linear, place  # imported here: ferrum.weights reads the family table

        self.ops, self.coefficient = ops, coefficient
        sign = np.tile(np.array([[1.0, -1.0]], dtype=np.float32), (hidden, 1))  # column 0 minus column 1, every row
        self.routed = Linear(place(ops, "mix.routed", sign, dtype))
        self.shared = Linear(place(ops, "mix.shared", -sign, dtype))

    def __call__(self, x: Any, routed: Any, shared: Any) -> Any:
        logits = self.coefficient(x)  # [T, 2]
        return self.ops.add(self.ops.sigmoid_mul(self.routed(logits), routed),
                            self.ops.sigmoid_mul(self.shared(logits), shared))
