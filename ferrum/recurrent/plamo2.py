"""PLaMo 2's Mamba layers (Preferred Networks' remote code, as mlx-lm's ``plamo2`` runs it): Mamba-2's recurrence
(:func:`ferrum.hookspec.ssd_update`, one group) around a Mamba-1-like body.

``in_proj`` emits, head by head, that head's output gate ``z`` then its input ``x`` (split into two projections at
load); the depthwise convolution (no bias) runs over ``x`` alone; ``bcdt_proj`` of its output emits ``B``, ``C`` and
a low-rank step, each RMS-normed with its own weight (``B_norm_weight``...), the step lifted to one per head by
``dt_proj``; the output is ``out_proj(y * silu(z))`` with no norm. Steps are clipped to [0.001, 100], as mlx-lm's
``ssm_update`` does by default. The taps are stored ``[C, 1, K]`` by the release, ``[C, K, 1]`` by mlx-lm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ferrum.recurrent.mamba2 import convolve_silu
from ferrum.recurrent.state import StateShapes

#: The inner norms' weights, in the order ``bcdt_proj`` emits what they norm: B, C, the step.
INNER_NORMS = ("B_norm_weight", "C_norm_weight", "dt_norm_weight")


@dataclass(frozen=True)
class Plamo2MambaSpec:
    """The sizes of a PLaMo 2 model's Mamba layers (``Architecture.mamba2``, mixer "mamba2") and their layout."""

    num_heads: int
    head_dim: int
    state_size: int
    conv_kernel: int
    dt_rank: int  # the low-rank step's width: max(64, hidden_size // 16)
    dt_limit: tuple[float, float] = (0.001, 100.0)
    module: str = "mixer"
    conv_last: bool = False  # mlx-lm's conv1d weight [C, K, 1] (the release's: [C, 1, K])

    title = "PLaMo 2 Mamba"  # what error messages call the mixer
    taps = "conv1d"  # the convolution's module in the layer's (the one whose stored shape tells the layout)

    @property
    def inner(self) -> int:
        return self.num_heads * self.head_dim

    def tensors(self, hidden: int) -> dict[str, tuple[int, ...]]:
        """A layer's tensors as stored, relative to the layer."""
        m, inner, n, h = self.module, self.inner, self.state_size, self.num_heads
        conv = (inner, self.conv_kernel, 1) if self.conv_last else (inner, 1, self.conv_kernel)
        return {f"{m}.in_proj.weight": (2 * inner, hidden), f"{m}.conv1d.weight": conv,
                f"{m}.bcdt_proj.weight": (2 * n + self.dt_rank, inner), f"{m}.dt_proj.weight": (h, self.dt_rank),
                f"{m}.dt_bias": (h,), f"{m}.A_log": (h,), f"{m}.D": (h,), f"{m}.out_proj.weight": (hidden, inner),
                **{f"{m}.{norm}": (size,) for norm, size in zip(INNER_NORMS, (n, n, self.dt_rank))}}

    def split(self, name: str, tensor: Any, take_rows: Callable[[Any, np.ndarray], Any]) -> list[tuple[str, Any]]:
        """``in_proj``'s interleaved heads cut into the gates' rows and the inputs'; the taps ``[C, K]``, shaped on
        the host (as :meth:`ferrum.recurrent.mamba2.Mamba2Spec.split` says why)."""
        if name.endswith(".conv1d.weight"):
            return [(name, np.ascontiguousarray(np.asarray(tensor).reshape(self.inner, self.conv_kernel)))]
        if ".in_proj." in name:
            rows = np.arange(2 * self.inner).reshape(self.num_heads, 2, self.head_dim)
            return [(name.replace(".in_proj.", f".{part}."), take_rows(tensor, rows[:, i].reshape(-1)))
                    for i, part in enumerate(("in_proj_z", "in_proj_x"))]
        return [(name, tensor)]

    def state_shapes(self, dtype: str) -> StateShapes:
        """The convolution's last inputs (in the compute dtype) and the state-space matrices (float32)."""
        return (((self.inner, self.conv_kernel - 1), dtype),
                ((self.num_heads, self.head_dim, self.state_size), "float32"))

    def layer(self, ops: Any, tensor: Callable[[str], Any], projection: Callable[[str], Any], eps: float) -> Any:
        return Plamo2MambaLayer(self, ops, tensor, projection, eps)


class Plamo2MambaLayer:
    """One layer's placed weights and its three steps: ``in_proj`` (compilable), the convolution, the B / C / step
    projections and the scan over the batch's states, then the gate and ``out_proj`` (compilable)."""

    def __init__(self, spec: Plamo2MambaSpec, ops: Any, tensor: Callable[[str], Any],
                 projection: Callable[[str], Any], eps: float):
        m = spec.module
        self.spec, self.ops, self.eps = spec, ops, eps
        self.z, self.x = projection(f"{m}.in_proj_z"), projection(f"{m}.in_proj_x")
        self.bcdt, self.dt_proj, self.out = (projection(f"{m}.{p}") for p in ("bcdt_proj", "dt_proj", "out_proj"))
        self.conv = tensor(f"{m}.conv1d.weight")
        self.a_log, self.d, self.dt_bias = tensor(f"{m}.A_log"), tensor(f"{m}.D"), tensor(f"{m}.dt_bias")
        self.norms = [tensor(f"{m}.{norm}") for norm in INNER_NORMS]

    def projections(self) -> list[Any]:
        return [self.z, self.x, self.bcdt, self.dt_proj, self.out]

    def project(self, x: Any) -> tuple[Any, Any]:
        """``x -> (x, z)``: the convolution's input and the output gate."""
        return self.x(x), self.z(x)

    def mix(self, inputs: tuple[Any, ...], states: tuple[Any, Any], cu_seqlens: np.ndarray) -> tuple[Any, tuple, tuple]:
        """The recurrent part over a batch: ``(y [T, H, P], (z,), new states)``; the given states are not changed."""
        ops, s = self.ops, self.spec
        x, z = inputs
        x, conv_state = convolve_silu(ops, x, self.conv, None, states[0], cu_seqlens)
        parts = ops.split(self.bcdt(x), (s.state_size, s.state_size, s.dt_rank))
        b, c, step = (ops.rms_norm(t, w, self.eps) for t, w in zip(parts, self.norms))
        b, c = (ops.reshape(t, (-1, 1, s.state_size)) for t in (b, c))
        y, ssm = ops.ssd_update(ops.reshape(x, (-1, s.num_heads, s.head_dim)), self.dt_proj(step), self.a_log, b, c,
                                self.d, self.dt_bias, states[1], cu_seqlens, *s.dt_limit)
        return y, (z,), (conv_state, ssm)

    def output(self, y: Any, z: Any) -> Any:
        """``y * silu(z)`` through ``out_proj``."""
        return self.out(self.ops.silu_mul(z, self.ops.reshape(y, (-1, self.spec.inner))))
