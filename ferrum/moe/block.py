"""One sparse MLP as the model calls it: route, run the chosen experts, add the shared expert."""

from __future__ import annotations

from typing import Any, Callable

from ferrum.moe.experts import PlacedExperts
from ferrum.moe.routing import GroupedRouting, Sparsemixer


class MoeMLP:
    """``x [T, hidden] -> [T, hidden]``, built only from the ops table.

    ``router`` and the shared expert's projections are ordinary linears
    (``weights.Linear``), so a quantized router runs like any projection.
    The shared expert is weighed by ``sigmoid(shared_gate(x))`` inside
    ``moe_experts`` (Qwen2-MoE), or, without a gate, added to the routed
    experts' sum in the compute dtype (GLM-4.5, as transformers adds it).
    ``routing`` is None for softmax routing, else the layer's
    :class:`~ferrum.moe.routing.GroupedRouting`, handed to ``route`` (the
    backend's ``moe_route`` where it runs the rule, else the core's), or
    its ``Sparsemixer``, always handed to the core's host reference.
    ``router_dtype`` "float32" casts the router's input up to its float32
    weight (DeepSeek's, GLM's, dots1's and Hunyuan's routers, as
    transformers runs them). ``weigh_input`` (Llama 4, one expert a token): the
    chosen expert reads ``x`` times its weight (in ``x``'s dtype), and its
    output is taken whole (the route run once more normalized gives those
    weights of 1, the top-1 weight over itself). ``router_norm`` (Gemma 4):
    the router reads its input through this norm. ``router_softcap`` (Laguna): the logits soft-capped in float32
    before routing. ``shared_act``: the shared expert's activation where not SwiGLU
    (``MoeSpec.shared_activation``: Nemotron 3 Nano's ungated ``down(shared_act(up(x)))``, its ``gate`` None;
    MiniMax-M3's clamped SwiGLU). ``zero`` (LongCat-Flash): the router may choose identity experts,
    :class:`ferrum.moe.zero.ZeroExperts`, which weigh ``x`` itself.
    ``output_bias`` (JetMoE): ``x -> [T, hidden]``, a bias on every row, added once the experts are summed.
    ``shared_mix`` (Klear): ``(x, routed sum, shared output) -> [T, hidden]``, the two mixed by weights of their own
    (:class:`ferrum.moe.mixed.CoefficientMix`) where they are otherwise added.
    ``latent`` (Kimi K3's latent experts): ``(down, norm or None, up)``, the routed experts reading ``down(x)`` and
    their weighted sum normed and projected back by ``up`` before the shared expert's output is added.
    """

    __slots__ = ("ops", "router", "experts", "top_k", "normalize", "shared", "shared_gate", "routing", "route",
                 "router_dtype", "weigh_input", "router_norm", "shared_act", "zero",
                 "router_softcap", "output_bias", "shared_mix", "latent")

    def __init__(self, ops: Any, router: Any, experts: PlacedExperts, top_k: int, normalize: bool,
                 shared: tuple[Any, Any, Any] | None = None, shared_gate: Any = None,
                 routing: GroupedRouting | Sparsemixer | None = None, route: Callable[..., Any] | None = None,
                 router_dtype: str | None = None, weigh_input: bool = False,
                 router_norm: Callable[[Any], Any] | None = None, shared_act: Callable[[Any], Any] | None = None,
                 zero: Any = None, router_softcap: float | None = None,
                 output_bias: Callable[[Any], Any] | None = None, shared_mix: Any = None,
                 latent: tuple[Any, Callable[[Any], Any] | None, Any] | None = None):
        self.ops, self.router, self.experts = ops, router, experts
        self.top_k, self.normalize = top_k, normalize
        self.shared, self.shared_gate = shared, shared_gate
        self.routing, self.route = routing, route  # route None: ops.moe_route, looked up per call
        self.router_dtype = router_dtype  # the dtype the router's input is cast to (its weight's), or None
        self.weigh_input = weigh_input
        self.router_norm = router_norm
        self.shared_act = shared_act
        self.zero = zero
        self.router_softcap = router_softcap
        self.output_bias = output_bias
        self.shared_mix = shared_mix
        self.latent = latent

    def projections(self) -> list[Any]:
        """The ordinary linears (router, shared expert); the experts are ``self.experts``."""
        shared = [p for p in self.shared or () if p is not None]
        return [self.router, *shared, *([self.shared_gate] if self.shared_gate is not None else []),
                *([self.shared_mix.coefficient] if self.shared_mix is not None else []),
                *(() if self.latent is None else (self.latent[0], self.latent[2]))]

    def __call__(self, x: Any, router_x: Any = None) -> Any:
        """The experts of ``x``, routed by ``router_x`` where given (Gemma 4's router reads the layer's stream, its
        experts a norm of it), else by ``x``; plus the output bias where there is one."""
        out = self._experts(x, router_x)
        return out if self.output_bias is None else self.ops.add(out, self.output_bias(x))

    def _experts(self, x: Any, router_x: Any) -> Any:
        ops = self.ops
        shared_out = shared_logit = None
        if self.shared is not None:
            gate, up, down = self.shared
            act = ops.silu_mul if self.shared_act is None else self.shared_act
            shared_out = down(act(up(x)) if gate is None else act(gate(x), up(x)))
            if self.shared_gate is not None:
                shared_logit = self.shared_gate(x)
        r = x if router_x is None else router_x
        r = r if self.router_norm is None else self.router_norm(r)
        logits = self.router(r if self.router_dtype is None else ops.cast(r, self.router_dtype))
        if self.router_softcap is not None:
            logits = ops.softcap(ops.cast(logits, "float32"), self.router_softcap)
        if self.zero is not None:  # the zero experts' summed weight on x, as a shared expert's on its output
            ids, weights = self.zero.route(ops, logits, self.top_k, self.normalize, self.routing)
            return self.experts(x, ids, weights, x)
        if self.routing is None:
            ids, weights = ops.moe_route(logits, shared_logit, self.top_k, self.normalize, None)
        else:
            route = ops.moe_route if self.route is None else self.route
            ids, weights = route(logits, shared_logit, self.top_k, self.normalize, self.routing)
            if self.weigh_input:  # Llama 4, top-1: the chosen expert's sigmoid scales its input, its output weighs 1
                x = ops.mul(x, weights)  # [T, hidden] * [T, 1], in x's dtype
                # chosen on the logits, as transformers' topk chooses (a sigmoid rounds logits above ~17 to the same
                # 1.0, whose tie a sigmoid rule would break by index), by softmax's top-1, normalized to exactly 1
                ids, weights = ops.moe_route(logits, None, self.top_k, True, None)
        if self.latent is not None:  # the routed experts in the latent space, their sum projected back
            down, norm, up = self.latent
            routed = self.experts(down(x), ids, weights, None)
            routed = up(routed if norm is None else norm(routed))
            return routed if shared_out is None else ops.add(routed, shared_out)
        if self.shared_mix is not None:  # mixed with the routed experts' sum by weights of their own
            return self.shared_mix(x, self.experts(x, ids, weights, None), shared_out)
        if shared_out is not None and shared_logit is None:  # ungated: added once the routed experts are summed
            return ops.add(self.experts(x, ids, weights, None), shared_out)
        return self.experts(x, ids, weights, shared_out)
