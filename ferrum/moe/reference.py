"""The core's reference compositions of the MoE ops, out of the required ones (bound in :mod:`ferrum.reference_ops`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ferrum.moe.activation import ExpertActivation
from ferrum.moe.experts import HostExperts, ReferenceStack
from ferrum.moe.routing import GroupedRouting, Sparsemixer, route, route_grouped, route_sparsemixer


def moe_route(ops: Any, logits: Any, shared_logit: Any, top_k: int, normalize: bool,
              routing: GroupedRouting | Sparsemixer | None = None) -> tuple[Any, Any]:
    host = ops.to_numpy(logits)
    if routing is None:
        ids, weights = route(host, top_k, normalize)
    elif isinstance(routing, Sparsemixer):
        ids, weights = route_sparsemixer(host, routing.jitter_eps)
    else:
        bias, expert_scale = (None if a is None else ops.to_numpy(a) for a in (routing.bias, routing.expert_scale))
        ids, weights = route_grouped(host, bias, top_k, routing.n_group, routing.topk_group, normalize, routing.scale,
                                     routing.rule, expert_scale)
    if shared_logit is not None:
        gate = ops.to_numpy(shared_logit).astype(np.float32).reshape(-1, 1)
        weights = np.concatenate([weights, 1.0 / (1.0 + np.exp(-gate))], axis=1)
    return ops.from_numpy(ids, None), ops.from_numpy(weights.astype(np.float32), None)


def upload_experts(ops: Any, name: str, weight: HostExperts, dtype: str) -> ReferenceStack:
    return ReferenceStack(ops, name, weight, dtype)


def moe_experts(ops: Any, x: Any, expert_ids: Any, expert_weights: Any, gate: ReferenceStack | None,
                up: ReferenceStack, down: ReferenceStack, shared: Any, biases: Any = None,
                activation: ExpertActivation | None = None) -> Any:
    """Per used expert: gather its tokens, run its SwiGLU (or the backend op of its ``activation``; ungated experts,
    ``gate`` None, on the up projection's output alone) on the backend (with biases or the clamped activation, the
    activation on the host); weigh and sum on the host."""
    host_biases = None if biases is None else [None if b is None else np.asarray(ops.to_numpy(b), dtype=np.float32)
                                               for b in biases]
    ids = np.asarray(ops.to_numpy(expert_ids), dtype=np.int64)
    weights = np.asarray(ops.to_numpy(expert_weights), dtype=np.float32)
    tokens, top_k = ids.shape
    flat = ids.reshape(-1)
    slot_weights = weights[:, :top_k].reshape(-1)
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(len(up.experts) + 1))
    out = None
    for e in np.flatnonzero(np.diff(bounds)):
        slots = order[bounds[e] : bounds[e + 1]]
        rows = slots // top_k
        xe = ops.take_rows(x, ops.from_numpy(rows.astype(np.int32), None))
        gated = activation is None or activation.gated
        if host_biases is None and (activation is None or activation.op is not None):
            act = ops.silu_mul if activation is None else activation.composed(ops)
            ye = ops.to_numpy(down(e, act(gate(e, xe), up(e, xe)) if gated else act(up(e, xe))))
        else:
            hidden = _host_activation(ops, gate(e, xe) if gated else None, up(e, xe), host_biases, e, activation)
            ye = ops.to_numpy(down(e, ops.from_numpy(hidden, up.dtype)))
            if host_biases is not None:
                ye = ye + host_biases[2][e]
        if out is None:
            out = np.zeros((tokens, ye.shape[1]), dtype=np.float32)
        np.add.at(out, rows, ye * slot_weights[slots, None])
    if shared is not None:
        out += weights[:, top_k:] * ops.to_numpy(shared)
    return ops.from_numpy(out, up.dtype)


def _host_activation(ops: Any, gate: Any, up: Any, biases: list[np.ndarray] | None, e: int,
                     activation: ExpertActivation | None) -> np.ndarray:
    """One expert's gate (None: ungated) and up outputs, biased where the experts have biases, through its
    activation."""
    u = np.asarray(ops.to_numpy(up), dtype=np.float32)
    if biases is not None:
        u = u + biases[1][e]
    if gate is None:
        return activation.host(u)
    g = np.asarray(ops.to_numpy(gate), dtype=np.float32)
    if biases is not None:
        g = g + biases[0][e]
    return g / (1.0 + np.exp(-g)) * u if activation is None else activation.host(g, u)
