"""One sparse MLP as the model calls it: route, run the chosen experts, add the gated shared expert."""

from __future__ import annotations

from typing import Any

from ferrum.moe.experts import PlacedExperts


class MoeMLP:
    """``x [T, hidden] -> [T, hidden]``, built only from the ops table.

    ``router`` and the shared expert's projections are ordinary linears
    (``weights.Linear``), so a quantized router runs like any projection.
    """

    __slots__ = ("ops", "router", "experts", "top_k", "normalize", "shared", "shared_gate")

    def __init__(self, ops: Any, router: Any, experts: PlacedExperts, top_k: int, normalize: bool,
                 shared: tuple[Any, Any, Any] | None = None, shared_gate: Any = None):
        self.ops, self.router, self.experts = ops, router, experts
        self.top_k, self.normalize = top_k, normalize
        self.shared, self.shared_gate = shared, shared_gate

    def projections(self) -> list[Any]:
        """The ordinary linears (router, shared expert); the experts are ``self.experts``."""
        shared = list(self.shared or ()) + ([self.shared_gate] if self.shared_gate is not None else [])
        return [self.router, *shared]

    def __call__(self, x: Any) -> Any:
        ops = self.ops
        shared_out = shared_logit = None
        if self.shared is not None:
            gate, up, down = self.shared
            shared_out = down(ops.silu_mul(gate(x), up(x)))
            shared_logit = self.shared_gate(x)
        ids, weights = ops.moe_route(self.router(x), shared_logit, self.top_k, self.normalize)
        return self.experts(x, ids, weights, shared_out)
