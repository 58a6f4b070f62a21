"""Mamba-2 (Granite 4.0-H's "mamba" layers, as transformers' BambaMixer): the tensors it stores, how they are laid
out at load, and one layer's work around its two recurrent ops (``causal_conv1d``, ``ssd_update``).

``in_proj`` emits the output gate ``z``, the convolution's input ``xBC`` and the step ``dt`` one after the other; it
is split into three projections at load. The depthwise convolution (with its own bias where ``conv_bias``) is stored
``[C, 1, K]`` by transformers and ``[C, K, 1]`` by mlx-lm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ferrum.recurrent.state import StateShapes

#: The projections ``in_proj`` is split into, in its row order.
INPUTS = ("in_proj_z", "in_proj_xbc", "in_proj_dt")
#: The orders of the output gate and the gated norm (``Mamba2Spec.gate``).
GATES = ("before_norm", "after_norm", "no_norm")


def convolve_silu(ops: Any, x: Any, taps: Any, bias: Any, state: Any, cu_seqlens: np.ndarray) -> tuple[Any, Any]:
    """SiLU of the depthwise causal convolution plus its bias (None: unbiased) over a batch: ``(y, new state)``."""
    if bias is None:
        return ops.causal_conv1d(x, taps, state, cu_seqlens, True)
    mixed, new_state = convolve_biased(ops, x, taps, bias, state, cu_seqlens)
    return ops.sigmoid_mul(mixed, mixed), new_state  # x * sigmoid(x)


def convolve_biased(ops: Any, x: Any, taps: Any, bias: Any, state: Any, cu_seqlens: np.ndarray) -> tuple[Any, Any]:
    """The depthwise causal convolution plus its bias (``[1, C]``, broadcast to the batch's rows): ``(y, new
    state)``."""
    mixed, new_state = ops.causal_conv1d(x, taps, state, cu_seqlens, False)
    rows = ops.from_numpy(np.zeros(int(cu_seqlens[-1]), dtype=np.int32), None)
    return ops.add(mixed, ops.take_rows(bias, rows)), new_state


@dataclass(frozen=True)
class Mamba2Spec:
    """The sizes of a model's Mamba-2 layers and the layout their tensors are stored in."""

    num_heads: int
    head_dim: int
    num_groups: int
    state_size: int
    conv_kernel: int
    dt_limit: tuple[float, float] = (0.0, float("inf"))
    conv_bias: bool = True
    proj_bias: bool = False
    module: str = "mamba"  # the layer's module (Nemotron-H: "mixer")
    conv_last: bool = False  # mlx-lm's conv1d weight [C, K, 1] (transformers': [C, 1, K])
    #: How the output gate ``z`` and the gated norm meet (:data:`GATES`): "before_norm", RMSNorm of ``y * silu(z)``
    #: (Bamba, Granite 4.0-H, Nemotron-H, Mamba-2); "after_norm", ``RMSNorm(y) * silu(z)`` (Falcon-H1's
    #: mamba_norm_before_gate); "no_norm", ``y * silu(z)`` and no norm weight (Falcon-H1 without mamba_rms_norm).
    gate: str = "before_norm"
    out_bias: bool | None = None  # out_proj's bias where not in_proj's (Falcon-H1's projectors_bias); None: proj_bias
    #: The gated norm's epsilon where the model fixes its own (Zamba2's 1e-5, whatever rms_norm_eps); None: the model's.
    norm_eps: float | None = None

    title = "Mamba-2"  # what error messages call the mixer
    taps = "conv1d"  # the convolution's module in the layer's (the one whose stored shape tells the layout)

    @property
    def inner(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.inner + 2 * self.num_groups * self.state_size

    def tensors(self, hidden: int) -> dict[str, tuple[int, ...]]:
        """A layer's tensors as stored, relative to the layer."""
        m = self.module
        conv = (self.conv_dim, self.conv_kernel, 1) if self.conv_last else (self.conv_dim, 1, self.conv_kernel)
        out = {f"{m}.in_proj.weight": (self.inner + self.conv_dim + self.num_heads, hidden),
               f"{m}.conv1d.weight": conv, f"{m}.dt_bias": (self.num_heads,), f"{m}.A_log": (self.num_heads,),
               f"{m}.D": (self.num_heads,), f"{m}.out_proj.weight": (hidden, self.inner)}
        if self.gate != "no_norm":
            out[f"{m}.norm.weight"] = (self.inner,)
        if self.conv_bias:
            out[f"{m}.conv1d.bias"] = (self.conv_dim,)
        if self.proj_bias:
            out[f"{m}.in_proj.bias"] = (self.inner + self.conv_dim + self.num_heads,)
        if self.proj_bias if self.out_bias is None else self.out_bias:
            out[f"{m}.out_proj.bias"] = (hidden,)
        return out

    def split(self, name: str, tensor: Any, take_rows: Callable[[Any, np.ndarray], Any]) -> list[tuple[str, Any]]:
        """One stored tensor -> the model's: ``in_proj`` cut into its three parts, the convolution's weight
        ``[C, K]``, its bias one row ``[1, C]`` (broadcast to a batch's rows by take_rows), shaped on the host: a
        backend array reshaped at load is lazy on MLX, tied to the loading thread's stream, and an engine thread's
        pass could not evaluate it."""
        if name.endswith(".conv1d.weight"):
            return [(name, np.ascontiguousarray(np.asarray(tensor).reshape(self.conv_dim, self.conv_kernel)))]
        if name.endswith(".conv1d.bias"):
            return [(name, np.asarray(tensor).reshape(1, self.conv_dim))]
        if ".in_proj." in name:
            bounds = np.cumsum([0, self.inner, self.conv_dim, self.num_heads])
            return [(name.replace(".in_proj.", f".{part}."), take_rows(tensor, np.arange(lo, hi)))
                    for part, lo, hi in zip(INPUTS, bounds[:-1], bounds[1:])]
        return [(name, tensor)]

    def state_shapes(self, dtype: str) -> StateShapes:
        """The convolution's last inputs (in the compute dtype) and the state-space matrices (float32)."""
        return (((self.conv_dim, self.conv_kernel - 1), dtype),
                ((self.num_heads, self.head_dim, self.state_size), "float32"))

    def layer(self, ops: Any, tensor: Callable[[str], Any], projection: Callable[[str], Any], eps: float) -> Any:
        return Mamba2Layer(self, ops, tensor, projection, eps if self.norm_eps is None else self.norm_eps)


class Mamba2Layer:
    """One layer's placed weights and its three steps: projections (compilable), the convolution and the scan over
    the batch's states, and the gated norm and output projection (compilable)."""

    def __init__(self, spec: Mamba2Spec, ops: Any, tensor: Callable[[str], Any],
                 projection: Callable[[str], Any], eps: float):
        from ferrum.reference_ops import dtype_name  # imported here: the reference ops import the families

        m = spec.module
        self.spec, self.ops, self.eps = spec, ops, eps
        self.inputs = [projection(f"{m}.{name}") for name in INPUTS]
        self.out = projection(f"{m}.out_proj")
        self.conv, self.conv_bias = tensor(f"{m}.conv1d.weight"), tensor(f"{m}.conv1d.bias")
        self.a_log, self.d, self.dt_bias = tensor(f"{m}.A_log"), tensor(f"{m}.D"), tensor(f"{m}.dt_bias")
        self.norm = tensor(f"{m}.norm.weight")
        #: The gated norm runs per group of heads; with several groups its weight multiplies after a norm of ones.
        self.group_norm = None if spec.num_groups == 1 or self.norm is None else ops.from_numpy(
            np.ones(spec.inner // spec.num_groups, dtype=np.float32), dtype_name(self.norm))

    def projections(self) -> list[Any]:
        return [*self.inputs, self.out]

    def project(self, x: Any) -> tuple[Any, ...]:
        """``x -> (xBC, dt, z)``: the convolution's input, the step, the output gate."""
        z, xbc, dt = (p(x) for p in self.inputs)
        return xbc, dt, z

    def mix(self, inputs: tuple[Any, ...], states: tuple[Any, Any], cu_seqlens: np.ndarray) -> tuple[Any, tuple, tuple]:
        """The recurrent part over a batch: ``(y [T, H, P], (z,), new states)``; the given states are not changed."""
        ops, s = self.ops, self.spec
        xbc, dt, z = inputs
        mixed, conv_state = convolve_silu(ops, xbc, self.conv, self.conv_bias, states[0], cu_seqlens)
        x, b, c = ops.split(mixed, (s.inner, s.num_groups * s.state_size, s.num_groups * s.state_size))
        x = ops.reshape(x, (-1, s.num_heads, s.head_dim))
        b = ops.reshape(b, (-1, s.num_groups, s.state_size))
        c = ops.reshape(c, (-1, s.num_groups, s.state_size))
        y, ssm = ops.ssd_update(x, dt, self.a_log, b, c, self.d, self.dt_bias, states[1], cu_seqlens, *s.dt_limit)
        return y, (z,), (conv_state, ssm)

    def output(self, y: Any, z: Any) -> Any:
        """``y`` gated by ``silu(z)`` and normed per group of heads in the spec's order (BambaRMSNormGated: the gate
        before the norm; Falcon-H1's may norm first, or not at all), projected."""
        ops, s = self.ops, self.spec
        y = ops.reshape(y, (-1, s.inner))
        if s.gate == "no_norm":
            return self.out(ops.silu_mul(z, y))
        if s.gate == "before_norm":
            return self.out(self._norm(ops.silu_mul(z, y)))
        return self.out(ops.silu_mul(z, self._norm(y)))

    def _norm(self, x: Any) -> Any:
        """RMSNorm per group of heads."""
        ops, s = self.ops, self.spec
        if self.group_norm is None:
            return ops.rms_norm(x, self.norm, self.eps)
        normed = ops.rms_norm(ops.reshape(x, (-1, s.inner // s.num_groups)), self.group_norm, self.eps)
        return ops.mul(ops.reshape(normed, (-1, s.inner)), self.norm)
