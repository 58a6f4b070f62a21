"""The ``"moe"`` MLP slot kind (see :mod:`ferrum.arch.mlp`): a sparse MLP's tensors and how it is built."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import numpy as np

from ferrum.arch.norms import NORM_KINDS
from ferrum.arch.rowwise import RowOps
from ferrum.errors import UnsupportedFeatureError
from ferrum.moe.block import MoeMLP
from ferrum.moe.experts import PlacedExperts
from ferrum.moe.loading import SWITCH
from ferrum.moe.mixed import CoefficientMix
from ferrum.moe.routing import GROUPED_RULES, GroupedRouting, GroupRule, Sparsemixer
from ferrum.moe.spec import ROUTER_NORM
from ferrum.moe.zero import ZeroExperts
from ferrum.reference_ops import dtype_name


class Moe:
    """Router ``M.gate`` (or ``MoeSpec.router``), with ``M.gate.e_score_correction_bias`` (or
    ``MoeSpec.correction_bias``) under a grouped rule that has one (GLM-4.5, DeepSeek-V3, ERNIE 4.5), the experts
    stacked as ``M.switch_mlp.*`` (read from any checkpoint layout, see :mod:`ferrum.moe.loading`; no gate stack
    where they are ungated, Nemotron 3 Nano's) with their biases where ``MoeSpec.biased``, and the shared expert
    (ungated too where the experts are): Qwen2-MoE's
    ``M.shared_expert.*`` with ``M.shared_expert_gate``, GLM-4.5's ungated ``M.shared_experts.*``; Gemma 4's
    router input scale and per-expert scales (``MoeSpec.router_norm``, ``MoeSpec.expert_scale``)."""

    def tensors(self, config: Any, layer: int) -> dict[str, tuple[int, ...]]:
        spec, hidden = config.arch.moe, config.hidden_size
        at, e, inter = spec.at, spec.num_experts, spec.expert_size
        shapes = {at(f"{spec.router}.weight"): (spec.scored, hidden)}
        h = spec.expert_width or hidden  # what the routed experts read and write
        if spec.latent is not None:
            down, norm, up = spec.latent
            shapes.update({at(f"{down}.weight"): (h, hidden), at(f"{up}.weight"): (hidden, h)})
            if norm is not None:
                shapes[at(f"{norm}.weight")] = (h,)
        stored = (*_inputs(spec.gated), "down_proj")  # no gate where the experts are ungated
        shapes.update({at(f"switch_mlp.{p}.weight"): (e, inter, h) for p in _inputs(spec.gated)})
        shapes[at("switch_mlp.down_proj.weight")] = (e, h, inter)
        if spec.biased:
            if not spec.unbiased_router:
                shapes[at(f"{spec.router}.bias")] = (e,)
            shapes.update({at(f"switch_mlp.{p}.bias"): (e, size) for p, size in zip(SWITCH, (inter, inter, h))
                           if p in stored})
        rule = GROUPED_RULES.get(spec.routing)
        if rule is not None and rule.corrected:
            shapes[at(spec.bias_name)] = (1, spec.scored) if spec.correction_bias_rows else (spec.scored,)
        if spec.router_norm is not None:
            shapes[at(spec.router_norm)] = (hidden,)
        if spec.output_bias is not None:
            shapes[at(spec.output_bias)] = (hidden,)
        if spec.shared_mix is not None:
            shapes.update({at(f"{spec.shared_mix}.weight"): (2, hidden), at(f"{spec.shared_mix}.bias"): (2,)})
        if rule is not None and rule.expert_scaled:
            shapes[at(spec.expert_scale)] = (e,)
        if spec.shared_expert_size:
            s, shared = spec.shared_expert_size, at(spec.shared_module)
            if spec.shared_fused:
                shapes[f"{shared}.gate_up_proj.weight"] = (2 * s, hidden)
            else:
                inputs = _inputs(spec.shared_gated)
                shapes.update({f"{shared}.{p}.weight": (s, hidden) for p in inputs})
                if config.arch.mlp_bias:  # ERNIE 4.5's use_bias biases its shared experts as its dense MLPs
                    shapes.update({f"{shared}.{p}.bias": (s,) for p in inputs})
                    shapes[f"{shared}.down_proj.bias"] = (hidden,)
            shapes[f"{shared}.down_proj.weight"] = (hidden, s)
            if spec.shared_gate is not None:
                shapes[at(f"{spec.shared_gate}.weight")] = (1, hidden)
        return shapes

    def split(self, config: Any, name: str, tensor: Any) -> list[tuple[str, Any]]:
        """A shared expert's fused ``gate_up_proj`` (GraniteMoeShared's ``input_linear``): gate rows, then up; a
        correction bias stored ``[1, E]`` (ERNIE 4.5's) as ``[E]``; the router's input scale (Gemma 4's) times
        hidden_size ** -0.5, as the weight of its norm (``ROUTER_NORM``); the shared expert's down_proj times
        ``MoeSpec.shared_scale``."""
        from ferrum.arch.tensors import rows, scaled  # imported here: ferrum.arch.tensors reads the MLP kinds

        spec = config.arch.moe
        if spec.shared_scale != 1.0 and f".{spec.at(spec.shared_module)}.down_proj." in name:
            return [(name, scaled(tensor, spec.shared_scale))]
        if spec.router_norm is not None and name.endswith(f".{spec.at(spec.router_norm)}"):
            weight = np.asarray(tensor, dtype=np.float32) * np.float32(config.hidden_size ** -0.5)
            return [(name.removesuffix(spec.at(spec.router_norm)) + spec.at(ROUTER_NORM), weight)]
        if spec.correction_bias_rows and name.endswith(f".{spec.at(spec.bias_name)}"):
            return [(name, np.asarray(tensor).reshape(-1))]
        if not spec.shared_fused or not name.endswith(f".{spec.shared_module}.gate_up_proj.weight"):
            return [(name, tensor)]
        s = spec.shared_expert_size
        return [(name.replace("gate_up_proj", "gate_proj"), rows(tensor, 0, s)),
                (name.replace("gate_up_proj", "up_proj"), rows(tensor, s, 2 * s))]

    def adapt(self, mlp: MoeMLP, wrap: Callable[[str, int, int, Any], Any], config: Any, layer: int) -> None:
        """The shared expert's (gate, up, down), each its own group (no gate where it is ungated); the routed
        experts are not adapted."""
        from ferrum.adapters.files import SHARED, projection_span  # imported here: the adapters read the MoE specs

        if mlp.shared is not None:
            spans = [projection_span(config, layer, proj) for proj in SHARED]
            mlp.shared = tuple(linear if span is None else wrap(*span, linear)
                               for span, linear in zip(spans, mlp.shared))

    def build(self, ops: Any, tensor: Callable[[str], Any], linear: Callable[[str], Any], config: Any,
              layer: int) -> MoeMLP:
        spec = config.arch.moe
        at = spec.at
        stored = (*_inputs(spec.gated), "down_proj")  # no gate where the experts are ungated
        stacks = [linear(at(f"switch_mlp.{p}")) if p in stored else None
                  for p in SWITCH]  # Linear(weight, bias=None); apply = moe_experts
        if len({s.apply for s in stacks if s is not None}) != 1:
            raise UnsupportedFeatureError(
                f"layer {layer}: the backend took some of the expert projections natively and declined others "
                "(their quantized formats differ); quantize all three alike or choose another backend"
            )
        biases = tuple(tensor(at(f"switch_mlp.{p}.bias")) if p in stored else None
                       for p in SWITCH) if spec.biased else None
        own = config.arch.layers[layer].activations  # the layer's own (Step 3.5's), else the spec's
        activation, shared_activation = (spec.activation, spec.shared_activation) if own is None else own
        experts = PlacedExperts(stacks[2].apply, *(None if s is None else s.weight for s in stacks), biases,
                                activation)
        shared = shared_gate = None
        shared_act = None  # SwiGLU, unless MoeSpec.shared_activation names another
        if spec.shared_expert_size:
            inputs = (*_inputs(spec.shared_gated), "down_proj")
            shared = tuple(linear(at(f"{spec.shared_module}.{p}")) if p in inputs else None for p in SWITCH)
            shared_gate = None if spec.shared_gate is None else linear(at(spec.shared_gate))
            if shared_activation is not None:
                shared_act = shared_activation.composed(ops)
        routing = route = None
        rule = GROUPED_RULES.get(spec.routing)
        if rule is not None:
            bias = tensor(at(spec.bias_name)) if rule.corrected else None
            scales = tensor(at(spec.expert_scale)) if rule.expert_scaled else None
            routing = GroupedRouting(spec.n_group, spec.topk_group, spec.routed_scale, bias, rule, scales)
            route = None if routes_natively(ops, rule) else ops.fallback["moe_route"]
        elif spec.routing == "sparsemixer":  # no backend op takes it: the core's host reference routes it
            routing, route = Sparsemixer(spec.jitter_eps), ops.fallback["moe_route"]
        elif spec.routing != "softmax":
            raise UnsupportedFeatureError(f"layer {layer}: routing {spec.routing!r} is not one Ferrum runs")
        zero = None
        if spec.zero_experts:  # routed on the host whatever the rule (ferrum.moe.zero)
            if routing is None or shared is not None:
                raise UnsupportedFeatureError(f"layer {layer}: zero-computation experts run with a grouped routing "
                                              "rule and no shared expert only")
            zero = ZeroExperts(spec.num_experts)
        router = linear(at(spec.router))
        router_norm = None
        if spec.router_norm is not None:  # a weightless RMSNorm times the folded scale (Gemma 4)
            norm = NORM_KINDS["rms"](ops, config.rms_norm_eps)[0]
            router_norm = partial(norm, weights=(tensor(at(ROUTER_NORM)), None))
        # a float32 router (placed so at load where it is not packed: a packed one runs in the compute dtype)
        # takes its input in float32
        router_dtype = "float32" if spec.router_float32 and router.dense_dtype == "float32" else None
        output_bias = None
        if spec.output_bias is not None:  # spread over the rows by RowOps (the ops add arrays of one shape only)
            bias = tensor(at(spec.output_bias))
            output_bias = partial(RowOps(ops, config.hidden_size, dtype_name(bias)).constant, row=bias)
        mix = None
        if spec.shared_mix is not None:  # its constants in the compute dtype, its bias's
            mix = CoefficientMix(ops, linear(at(spec.shared_mix)), config.hidden_size,
                                 dtype_name(tensor(at(f"{spec.shared_mix}.bias"))))
        latent = None
        if spec.latent is not None:  # the routed experts between a down and an up projection, maybe a norm between
            if zero is not None or shared_gate is not None or mix is not None:
                raise UnsupportedFeatureError(f"layer {layer}: latent experts run beside an ungated shared expert "
                                              "only")
            down, norm, up = spec.latent
            latent_norm = None if norm is None else partial(NORM_KINDS["rms"](ops, config.rms_norm_eps)[0],
                                                            weights=(tensor(at(f"{norm}.weight")), None))
            latent = (linear(at(down)), latent_norm, linear(at(up)))
        return MoeMLP(ops, router, experts, spec.top_k, spec.normalize, shared, shared_gate, routing, route,
                      router_dtype, spec.weigh_input, router_norm, shared_act, zero, spec.router_softcap,
                      output_bias, mix, latent)


def _inputs(gated: bool) -> tuple[str, ...]:
    """The projections reading an expert's input: gate and up, or up alone where it is ungated."""
    return SWITCH[:2] if gated else SWITCH[1:2]


def routes_natively(ops: Any, rule: GroupRule) -> bool:
    """Whether the backend's own ``moe_route`` runs ``rule``: it takes ``routing`` (else it would route by softmax),
    and its plugin declares an API version that hands this rule (``GroupRule.since``: 1.12 handed only
    DeepSeek-V3's, 1.13 added ``GroupedRouting.rule``)."""
    from ferrum.backends import declared_version  # imported here: ferrum.backends loads the plugins

    return ops.accepts("moe_route", "routing") and declared_version(ops.info) >= rule.since
