"""The experts' activations beyond plain SwiGLU, as records a backend's ``moe_experts`` receives.

A record's ``gated`` says what ``host`` (and its backend op ``op``) reads: ``gated`` ones the gate and up
projections' outputs, an ungated one (:class:`SquaredReLU`) the up projection's alone, its experts having no
gate projection (``moe_experts`` then gets ``gate`` None)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


@dataclass(frozen=True)
class ClampedSwiGLU:
    """gpt-oss's expert activation (transformers' ``GptOssExperts._apply_gate``):
    ``(clip(up, -limit, limit) + up_offset) * g * sigmoid(alpha * g)`` with ``g = min(gate, limit)``, ``up_offset``
    1; Hy4's (``HYV4Experts._apply_gate``) is SwiGLU under the same clamps, alpha 1 and ``up_offset`` 0. Step 3.5's
    (mlx-lm's ``clamped_swiglu``) clamps the swish instead of the gate (``clamp`` "swish"):
    ``clip(up, -limit, limit) * min(silu(gate), limit)``.

    The offset and the clamps are part of what the weights were trained with: dropping either
    changes every expert's output."""

    alpha: float
    limit: float
    up_offset: float = 1.0
    #: What ``min(., limit)`` bounds: "gate", the gate before the swish (gpt-oss's, Hy4's), or "swish", the swish
    #: ``g * sigmoid(alpha * g)`` itself (Step 3.5's).
    clamp: str = "gate"
    gated = True
    op = None  # no backend op runs it: its host form where the backend's moe_experts does not take it

    @property
    def since(self) -> tuple[int, int]:
        """The plugin API that first handed moe_experts this activation: gpt-oss's from 1.7, another offset 1.26,
        the swish clamped 1.29."""
        return (1, 29) if self.clamp == "swish" else (1, 7) if self.up_offset == 1.0 else (1, 26)

    def host(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """The activation on host arrays, in float32 (the reference every backend matches)."""
        g = np.asarray(gate, dtype=np.float32)
        if self.clamp == "gate":
            g = np.minimum(g, np.float32(self.limit))
        swish = g / (1.0 + np.exp(-self.alpha * g))
        if self.clamp == "swish":
            swish = np.minimum(swish, np.float32(self.limit))
        u = np.clip(np.asarray(up, dtype=np.float32), -self.limit, self.limit)
        return (u + np.float32(self.up_offset)) * swish

    def composed(self, ops: Any) -> Callable[[Any, Any], Any]:
        """``act(gate, up)`` on the backend's arrays, composed from the ops (MiniMax-M3's dense MLPs and shared
        experts, which ``moe_experts`` does not run): in float32, rounded once to the gate's dtype, as the backends'
        ``moe_experts`` and :meth:`host` evaluate it. No op adds a scalar, so ``min(g, limit)`` is ``c - relu(c -
        g)`` with ``c = clip(g, limit)``, and ``(u + up_offset) * s`` is ``u * s + up_offset * s``: exact in float32
        for bfloat16 / float16 inputs (infinite gates too), a float32 rounding off at most for float32 ones."""
        from ferrum.reference_ops import dtype_name  # imported here: ferrum.reference_ops imports this module

        def at_most_limit(v: Any) -> Any:
            clipped = ops.clip(v, self.limit)
            return ops.add(clipped, ops.mul_scalar(ops.relu(ops.add(clipped, ops.mul_scalar(v, -1.0))), -1.0))

        def act(gate: Any, up: Any) -> Any:
            dtype = dtype_name(gate)
            g, u = ops.cast(gate, "float32"), ops.cast(up, "float32")
            if self.clamp == "gate":
                g = at_most_limit(g)
            swish = ops.sigmoid_mul(ops.mul_scalar(g, self.alpha), g)
            if self.clamp == "swish":
                swish = at_most_limit(swish)
            out = ops.mul(ops.clip(u, self.limit), swish)
            if self.up_offset:
                out = ops.add(out, ops.mul_scalar(swish, self.up_offset))
            return ops.cast(out, dtype)

        return act


@dataclass(frozen=True)
class GeluTanhGLU:
    """Gemma 4's experts (transformers' ``Gemma4TextExperts``): ``gelu_tanh(gate) * up``, the GeGLU of its dense
    MLP, where every other family's experts run SwiGLU. A backend runs it with its ``gelu_tanh_mul`` op; the
    host form is the reference. Handed to ``moe_experts`` from API 1.16 (``since``): an older plugin that takes
    ``activation`` knows only :class:`ClampedSwiGLU`, so its layers take the core's experts."""

    gated = True
    since = (1, 16)
    op = "gelu_tanh_mul"

    def composed(self, ops: Any) -> Callable[[Any, Any], Any]:
        """``act(gate, up)`` on the backend: its op."""
        return ops.gelu_tanh_mul

    def host(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """The activation on host arrays, in float32 (torch's tanh approximation of GELU)."""
        g = np.asarray(gate, dtype=np.float32)
        inner = np.float32(np.sqrt(2.0 / np.pi)) * (g + np.float32(0.044715) * g * g * g)
        return np.float32(0.5) * g * (np.float32(1.0) + np.tanh(inner)) * np.asarray(up, dtype=np.float32)


@dataclass(frozen=True)
class SquaredReLU:
    """Nemotron 3 Nano's experts (transformers' ``NemotronHExperts``): ungated, ``down(relu(up(x)) ** 2)``, the
    squared ReLU of its dense MLP, with no gate projection at all. A backend runs it with its ``relu_squared`` op;
    the host form is the reference. Handed to ``moe_experts`` from API 1.18 (``since``), with ``gate`` None: an
    older plugin would read a gate it is not given, so its layers take the core's experts."""

    gated = False
    since = (1, 18)
    op = "relu_squared"

    def composed(self, ops: Any) -> Callable[[Any], Any]:
        """``act(up)`` on the backend: its op."""
        return ops.relu_squared

    def host(self, up: np.ndarray) -> np.ndarray:
        """The activation on host arrays, in float32."""
        return np.square(np.maximum(np.asarray(up, dtype=np.float32), np.float32(0.0)))


@dataclass(frozen=True)
class Gelu:
    """Phixtral's experts (mlx-lm's ``SwitchMLP``): ungated, ``fc2(gelu(fc1(x)))`` with GELU's tanh form where
    ``tanh`` (MLX's "precise" approximation, Phi-2's gelu_new: Phixtral's), else the exact (erf) GELU; no gate
    projection. A backend runs it with its ``gelu`` op; the host form is the reference. Handed to ``moe_experts`` from
    API 1.32 (``since``), with ``gate`` None: an older plugin would read another activation's op, so its layers take
    the core's experts."""

    tanh: bool = False
    gated = False
    since = (1, 32)
    op = "gelu"

    def composed(self, ops: Any) -> Callable[[Any], Any]:
        """``act(up)`` on the backend: its ``gelu`` op."""
        return lambda up: ops.gelu(up, self.tanh)

    def host(self, up: np.ndarray) -> np.ndarray:
        """The activation on host arrays, in float32 (the core's ``gelu``)."""
        from ferrum.reference_ops import _gelu_exact, _gelu_tanh  # imported here: it imports this module

        return (_gelu_tanh if self.tanh else _gelu_exact)(np.asarray(up, dtype=np.float32)).astype(np.float32)


@dataclass(frozen=True)
class Situ:
    """Kimi K3's SiTU (mlx-lm's kimi_k3 ``_situ``), its dense MLPs', shared and routed experts' alike:
    ``softcap(up, linear_beta) * softcap(gate, beta) * sigmoid(gate)`` with ``softcap(x, c) = c * tanh(x / c)`` (the
    up projection uncapped where ``linear_beta`` is None), in float32, rounded once. Composed from ``softcap``,
    ``sigmoid_mul`` and ``mul``; handed to ``moe_experts`` from API 1.33 (``since``), so older plugins' layers take
    the core's experts, which run its host form (``op`` None)."""

    beta: float = 1.0
    linear_beta: float | None = None
    gated = True
    since = (1, 33)
    op = None

    def composed(self, ops: Any) -> Callable[[Any, Any], Any]:
        """``act(gate, up)`` on the backend's arrays."""
        from ferrum.reference_ops import dtype_name  # imported here: ferrum.reference_ops imports this module

        def act(gate: Any, up: Any) -> Any:
            dtype = dtype_name(gate)
            g, u = ops.cast(gate, "float32"), ops.cast(up, "float32")
            a = ops.sigmoid_mul(g, ops.cast(ops.softcap(g, self.beta), "float32"))
            x = u if self.linear_beta is None else ops.cast(ops.softcap(u, self.linear_beta), "float32")
            return ops.cast(ops.mul(x, a), dtype)

        return act

    def host(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """The activation on host arrays, in float32 (the reference every backend matches)."""
        g, u = (np.asarray(a, dtype=np.float32) for a in (gate, up))
        a = np.float32(self.beta) * np.tanh(g / np.float32(self.beta)) / (np.float32(1.0) + np.exp(-g))
        if self.linear_beta is not None:
            u = np.float32(self.linear_beta) * np.tanh(u / np.float32(self.linear_beta))
        return (a * u).astype(np.float32)


#: The experts' activation records, for type hints.
ExpertActivation = ClampedSwiGLU | GeluTanhGLU | SquaredReLU | Gelu | Situ
