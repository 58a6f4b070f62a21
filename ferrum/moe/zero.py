"""Zero-computation experts (LongCat-Flash's ``zero_expert_num``, ``zero_expert_type`` "identity"): experts after the
routed ones that the router scores and chooses like any other, each returning its input times its weight.

They are run as what they add: the chosen routed experts as usual, a chosen zero expert's slot given expert 0 with
weight 0 (its product, times 0, adds nothing), and the zero experts' weights summed into one more column that weighs
the input itself, as ``moe_experts`` weighs a shared expert's output (``shared`` = the input). The choice is made on
the host (:func:`ferrum.moe.routing.route_grouped`, then the split): no backend op takes it yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ferrum.moe.routing import GroupedRouting, route_grouped


#: The projections whose stack transformers' LongcatFlashExperts sizes for the zero experts too (``gate_up_proj``, rows
#: never run), and so saves for each (``experts.{routed + i}.gate_proj / up_proj``); mlx-lm's loader reads none.
SAVED_BY_TRANSFORMERS = ("gate_proj", "up_proj")


def saved_rows(routed: int, zero: int) -> str:
    """A regex matching the zero experts' indices (``routed`` to ``routed + zero - 1``) followed by a dot, as the
    tensors transformers saves for them are named (``experts.{i}.gate_proj``): a few alternatives per digit, however
    many they are."""
    return rf"(?!(?:{_at_least(routed + zero)})\.)(?:{_at_least(routed)})\."


def _at_least(n: int) -> str:
    """A regex matching the decimal integers from ``n`` on (no leading zeros)."""
    digits = str(n)
    options = [rf"[1-9]\d{{{len(digits)},}}"]  # more digits
    for i, d in enumerate(digits[:-1] if n else ""):  # as many: a larger digit after the same start
        if d != "9":
            options.append(rf"{digits[:i]}[{int(d) + 1}-9]\d{{{len(digits) - i - 1}}}")
    last = int(digits[-1])
    return "|".join([*options, f"{digits[:-1]}[{last}-9]"])


@dataclass(frozen=True)
class ZeroExperts:
    """The layer's experts from ``routed`` on are identity experts."""

    routed: int

    def route(self, ops: Any, logits: Any, top_k: int, normalize: bool, routing: GroupedRouting) -> tuple[Any, Any]:
        """``(ids [T, k], weights [T, k + 1])`` on the backend: the routed experts' ids and weights (a zero expert's
        slot: expert 0, weight 0), then each token's zero experts' weights summed."""
        bias = None if routing.bias is None else ops.to_numpy(routing.bias)
        ids, weights = route_grouped(ops.to_numpy(logits), bias, top_k, routing.n_group, routing.topk_group,
                                     normalize, routing.scale, routing.rule)
        zero = ids >= self.routed
        identity = np.where(zero, weights, np.float32(0)).sum(axis=-1, keepdims=True, dtype=np.float32)
        weights = np.concatenate([np.where(zero, np.float32(0), weights), identity], axis=1)
        return ops.from_numpy(np.where(zero, 0, ids).astype(np.int32), None), ops.from_numpy(
            weights.astype(np.float32), None)
