"""Mamba-1 (Mamba, Falcon Mamba, Jamba's "mamba" layers, as transformers' MambaMixer): the tensors it stores, how
they are laid out at load, and one layer's work around its two recurrent ops (``causal_conv1d``, ``selective_scan``).

``in_proj`` emits the convolution's input ``x`` then the output gate ``z``; after the convolution (SiLU), ``x_proj``
emits the low-rank step, ``B`` and ``C``; ``dt_proj`` lifts the step to every channel, its bias added inside the scan
in float32 (as transformers adds it). Falcon Mamba RMS-norms the step, ``B`` and ``C`` without weights (eps
``mixer_rms_eps``), Jamba with weights (``dt_layernorm`` / ``b_layernorm`` / ``c_layernorm``). The depthwise
convolution is stored ``[C, 1, K]`` by transformers and ``[C, K, 1]`` by mlx-lm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ferrum.recurrent.mamba2 import convolve_silu
from ferrum.recurrent.state import StateShapes

#: The inner norms' modules, in the order of what they norm: the step, B, C.
INNER_NORMS = ("dt_layernorm", "b_layernorm", "c_layernorm")


@dataclass(frozen=True)
class MambaSpec:
    """The sizes of a model's Mamba-1 layers and the layout their tensors are stored in."""

    inner: int  # d_inner: the channels the scan runs over
    state_size: int  # N
    conv_kernel: int
    dt_rank: int
    conv_bias: bool = True
    proj_bias: bool = False  # in_proj and out_proj biased
    #: The RMS norms on the step, B and C: None (Mamba), "weightless" (Falcon Mamba), "weighted" (Jamba).
    inner_norms: str | None = None
    norm_eps: float = 1e-6
    module: str = "mixer"  # the layer's module (Jamba: "mamba")
    conv_last: bool = False  # mlx-lm's conv1d weight [C, K, 1] (transformers': [C, 1, K])

    title = "Mamba"  # what error messages call the mixer
    taps = "conv1d"  # the convolution's module in the layer's (the one whose stored shape tells the layout)

    def tensors(self, hidden: int) -> dict[str, tuple[int, ...]]:
        """A layer's tensors as stored, relative to the layer."""
        m, inner, n, rank = self.module, self.inner, self.state_size, self.dt_rank
        conv = (inner, self.conv_kernel, 1) if self.conv_last else (inner, 1, self.conv_kernel)
        out = {f"{m}.in_proj.weight": (2 * inner, hidden), f"{m}.conv1d.weight": conv,
               f"{m}.x_proj.weight": (rank + 2 * n, inner), f"{m}.dt_proj.weight": (inner, rank),
               f"{m}.dt_proj.bias": (inner,), f"{m}.A_log": (inner, n), f"{m}.D": (inner,),
               f"{m}.out_proj.weight": (hidden, inner)}
        if self.conv_bias:
            out[f"{m}.conv1d.bias"] = (inner,)
        if self.proj_bias:
            out.update({f"{m}.in_proj.bias": (2 * inner,), f"{m}.out_proj.bias": (hidden,)})
        if self.inner_norms == "weighted":
            out.update({f"{m}.{norm}.weight": (size,) for norm, size in zip(INNER_NORMS, (rank, n, n))})
        return out

    def split(self, name: str, tensor: Any, take_rows: Callable[[Any, np.ndarray], Any]) -> list[tuple[str, Any]]:
        """The convolution's weight as ``causal_conv1d`` reads it, ``[C, K]``, its bias one row ``[1, C]`` (shaped on
        the host, as :meth:`ferrum.recurrent.mamba2.Mamba2Spec.split` says why); ``dt_proj``'s bias apart from its
        weight, as ``dt_bias``, for the scan to add in float32."""
        if name.endswith(".conv1d.weight"):
            return [(name, np.ascontiguousarray(np.asarray(tensor).reshape(self.inner, self.conv_kernel)))]
        if name.endswith(".conv1d.bias"):
            return [(name, np.asarray(tensor).reshape(1, self.inner))]
        if name.endswith(".dt_proj.bias"):
            return [(name.replace(".dt_proj.bias", ".dt_bias"), tensor)]
        return [(name, tensor)]

    def state_shapes(self, dtype: str) -> StateShapes:
        """The convolution's last inputs (in the compute dtype) and the per-channel state-space matrices (float32)."""
        return (((self.inner, self.conv_kernel - 1), dtype), ((self.inner, self.state_size), "float32"))

    def layer(self, ops: Any, tensor: Callable[[str], Any], projection: Callable[[str], Any], eps: float) -> Any:
        return MambaLayer(self, ops, tensor, projection)


class MambaLayer:
    """One layer's placed weights and its three steps: ``in_proj`` (compilable), the convolution, the step / B / C
    projections and the scan over the batch's states, then the gate and ``out_proj`` (compilable)."""

    def __init__(self, spec: MambaSpec, ops: Any, tensor: Callable[[str], Any], projection: Callable[[str], Any]):
        from ferrum.reference_ops import dtype_name  # imported here: the reference ops import the families

        m = spec.module
        self.spec, self.ops = spec, ops
        self.into, self.x_proj = projection(f"{m}.in_proj"), projection(f"{m}.x_proj")
        self.dt_proj, self.out = projection(f"{m}.dt_proj"), projection(f"{m}.out_proj")
        self.conv, self.conv_bias = tensor(f"{m}.conv1d.weight"), tensor(f"{m}.conv1d.bias")
        self.a_log, self.d, self.dt_bias = tensor(f"{m}.A_log"), tensor(f"{m}.D"), tensor(f"{m}.dt_bias")
        sizes = (spec.dt_rank, spec.state_size, spec.state_size)
        if spec.inner_norms == "weighted":
            self.norms = [tensor(f"{m}.{norm}.weight") for norm in INNER_NORMS]
        elif spec.inner_norms == "weightless":  # RMS norms of weight one
            self.norms = [ops.from_numpy(np.ones(size, dtype=np.float32), dtype_name(self.conv)) for size in sizes]
        else:
            self.norms = None

    def projections(self) -> list[Any]:
        return [self.into, self.x_proj, self.dt_proj, self.out]

    def project(self, x: Any) -> tuple[Any, Any]:
        """``x -> (x, z)``: the convolution's input and the output gate."""
        return tuple(self.ops.split(self.into(x), (self.spec.inner, self.spec.inner)))

    def mix(self, inputs: tuple[Any, ...], states: tuple[Any, Any], cu_seqlens: np.ndarray) -> tuple[Any, tuple, tuple]:
        """The recurrent part over a batch: ``(y [T, D], (z,), new states)``; the given states are not changed."""
        ops, s = self.ops, self.spec
        x, z = inputs
        x, conv_state = convolve_silu(ops, x, self.conv, self.conv_bias, states[0], cu_seqlens)
        step, b, c = ops.split(self.x_proj(x), (s.dt_rank, s.state_size, s.state_size))
        if self.norms is not None:
            step, b, c = (ops.rms_norm(t, w, s.norm_eps) for t, w in zip((step, b, c), self.norms))
        y, ssm = ops.selective_scan(x, self.dt_proj(step), self.a_log, b, c, self.d, self.dt_bias, states[1],
                                    cu_seqlens)
        return y, (z,), (conv_state, ssm)

    def output(self, y: Any, z: Any) -> Any:
        """``y * silu(z)`` through ``out_proj``."""
        return self.out(self.ops.silu_mul(z, y))
