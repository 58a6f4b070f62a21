"""The experts' activations beyond plain SwiGLU, as records a backend's ``moe_experts`` receives.

A record's ``gated`` says what ``host`` (and its backend op ``op``) reads: ``gated`` ones the gate and up
projections' outputs, an ungated one (:class:`SquaredReLU`) the up projection's alone, its experts having no
gate projection (``moe_experts`` then gets ``gate`` None)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClampedSwiGLU:
    """gpt-oss's expert activation (transformers' ``GptOssExperts._apply_gate``):
    ``(clip(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, limit)``.

    The ``+ 1`` and the clamps are part of what the weights were trained with: dropping either
    changes every expert's output."""

    alpha: float
    limit: float
    gated = True
    since = (1, 7)  # the plugin API that first handed moe_experts an activation
    op = None  # no backend op runs it: its host form where the backend's moe_experts does not take it

    def host(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """The activation on host arrays, in float32 (the reference every backend matches)."""
        g = np.minimum(np.asarray(gate, dtype=np.float32), np.float32(self.limit))
        u = np.clip(np.asarray(up, dtype=np.float32), -self.limit, self.limit)
        return (u + 1.0) * g / (1.0 + np.exp(-self.alpha * g))


@dataclass(frozen=True)
class GeluTanhGLU:
    """Gemma 4's experts (transformers' ``Gemma4TextExperts``): ``gelu_tanh(gate) * up``, the GeGLU of its dense
    MLP, where every other family's experts run SwiGLU. A backend runs it with its ``gelu_tanh_mul`` op; the
    host form is the reference. Handed to ``moe_experts`` from API 1.16 (``since``): an older plugin that takes
    ``activation`` knows only :class:`ClampedSwiGLU`, so its layers take the core's experts."""

    gated = True
    since = (1, 16)
    op = "gelu_tanh_mul"

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

    def host(self, up: np.ndarray) -> np.ndarray:
        """The activation on host arrays, in float32."""
        return np.square(np.maximum(np.asarray(up, dtype=np.float32), np.float32(0.0)))


#: The experts' activation records, for type hints.
ExpertActivation = ClampedSwiGLU | GeluTanhGLU | SquaredReLU
