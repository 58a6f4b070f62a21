"""Per-row statistics the ops table has no op for, composed from the ops it has.

Gemma 3n rescales rows to another row's root mean square (AltUp's copies) and cuts its MLP gates at their row's
mean plus a multiple of its standard deviation (activation sparsity). The table has no reduction, square root,
division, so they are composed, exactly in real arithmetic, from ``linear``, ``rms_norm`` and ``mul`` (the cut
itself is the ``relu`` op):

* a row's mean is a ``linear`` with one output of weights ``1 / width``; a ``[T, 1]`` column is spread over a row
  by a ``linear`` with weights of 1 (the ops broadcast only over leading axes);
* ``unit(x) = rms_norm(x, 1, TINY)`` is ``x / rms(x)``, so ``rms(x) = mean(unit(x) * x)``.

``TINY`` keeps a row of zeros (a backend's padding rows) at zero where a plain division would make NaN; it is far
below any real row's mean square, so transformers' clamp of that at 1e-5 (mlx-lm has none) never differs from it
on a trained model's rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

TINY = 1e-30


class RowOps:
    """The compositions over rows of ``width`` columns, their constant weights placed once in ``dtype``."""

    __slots__ = ("ops", "width", "ones", "_mean", "_spread", "_one")

    def __init__(self, ops: Any, width: int, dtype: str):
        from ferrum.weights import Linear, place  # imported here: ferrum.weights reads the family table

        self.ops, self.width = ops, width
        self.ones = ops.from_numpy(np.ones(width, dtype=np.float32), dtype)
        self._mean = Linear(place(ops, "rowwise.mean", np.full((1, width), 1.0 / width, dtype=np.float32), dtype))
        self._spread = Linear(place(ops, "rowwise.spread", np.ones((width, 1), dtype=np.float32), dtype))
        self._one = Linear(place(ops, "rowwise.one", np.zeros((1, width), dtype=np.float32), dtype),
                           ops.from_numpy(np.ones(1, dtype=np.float32), dtype))

    def mean(self, x: Any) -> Any:
        """Each row's mean, ``[T, 1]``."""
        return self._mean(x)

    def spread(self, column: Any, factor: float = 1.0) -> Any:
        """``[T, 1]`` times ``factor`` (rounded to its dtype, as ``mul_scalar`` rounds) on every column."""
        return self._spread(column if factor == 1.0 else self.ops.mul_scalar(column, factor))

    def constant(self, x: Any, row: Any) -> Any:
        """``row [width]`` on each of ``x``'s rows (a bias added after a sum: JetMoE's MoE): ``x`` times zeros plus
        one is a column of ones, spread over the row and times ``row``."""
        return self.ops.mul(self._spread(self._one(x)), row)

    def unit(self, x: Any) -> Any:
        """Each row divided by its root mean square."""
        return self.ops.rms_norm(x, self.ones, TINY)

    def rms(self, x: Any) -> Any:
        """Each row's root mean square, ``[T, 1]``."""
        return self.mean(self.ops.mul(self.unit(x), x))


def gaussian_top_k(ops: Any, act: Any, width: int, sparsity: float, dtype: str) -> Any:
    """``act(gate, up)`` (the gated activation op) with its gate first cut as Gemma 3n's activation sparsity cuts
    it: ``relu(gate - mean - k * std)`` per row, ``k`` the standard normal's ``sparsity`` quantile and ``std`` the
    population deviation, which keeps about ``1 - sparsity`` of a gaussian row."""
    from statistics import NormalDist

    rows, k = RowOps(ops, width, dtype), NormalDist().inv_cdf(sparsity)

    def sparse(gate: Any, up: Any) -> Any:
        centred = ops.add(gate, rows.spread(rows.mean(gate), -1.0))
        std = rows.rms(centred)
        return act(ops.relu(ops.add(centred, rows.spread(std, -k))), up)

    return sparse
