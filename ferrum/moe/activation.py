"""The experts' gated activations beyond plain SwiGLU, as records a backend's ``moe_experts`` receives."""

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

    def host(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """The activation on host arrays, in float32 (the reference every backend matches)."""
        g = np.minimum(np.asarray(gate, dtype=np.float32), np.float32(self.limit))
        u = np.clip(np.asarray(up, dtype=np.float32), -self.limit, self.limit)
        return (u + 1.0) * g / (1.0 + np.exp(-self.alpha * g))
