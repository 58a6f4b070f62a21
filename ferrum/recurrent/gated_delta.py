"""Gated DeltaNet (Qwen3-Next's and Qwen3.5's "linear_attention" layers): the tensors it stores, how they are
laid out at load, and one layer's work around its two recurrent ops (``causal_conv1d``, ``gated_delta_rule``).

Two checkpoint layouts of the input projections: Qwen3.5's separate ``in_proj_qkv / in_proj_z / in_proj_b /
in_proj_a``, and Qwen3-Next's ``in_proj_qkvz / in_proj_ba`` grouped per key head, split at load into the former.
The depthwise convolution's weight is stored ``[C, 1, K]`` by transformers and ``[C, K, 1]`` by mlx-lm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ferrum.recurrent.state import StateShapes

MODULE = "linear_attn"
#: The input projections the model reads, in the order their outputs are used.
INPUTS = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")


@dataclass(frozen=True)
class GatedDeltaSpec:
    """The sizes of a model's Gated DeltaNet layers and the layout their tensors are stored in."""

    num_k_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int
    conv_kernel: int
    grouped: bool = False  # Qwen3-Next's in_proj_qkvz / in_proj_ba, grouped per key head
    conv_last: bool = False  # mlx-lm's conv1d weight [C, K, 1] (transformers': [C, 1, K])

    module = MODULE
    title = "Gated DeltaNet"  # what error messages call the mixer

    @property
    def key_dim(self) -> int:
        return self.num_k_heads * self.head_k_dim

    @property
    def value_dim(self) -> int:
        return self.num_v_heads * self.head_v_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim

    def tensors(self, hidden: int) -> dict[str, tuple[int, ...]]:
        """A layer's tensors as stored, relative to the layer."""
        m, hv = MODULE, self.num_v_heads
        if self.grouped:
            inputs = {f"{m}.in_proj_qkvz.weight": (self.conv_dim + self.value_dim, hidden),
                      f"{m}.in_proj_ba.weight": (2 * hv, hidden)}
        else:
            inputs = {f"{m}.in_proj_qkv.weight": (self.conv_dim, hidden),
                      f"{m}.in_proj_z.weight": (self.value_dim, hidden),
                      f"{m}.in_proj_b.weight": (hv, hidden), f"{m}.in_proj_a.weight": (hv, hidden)}
        conv = (self.conv_dim, self.conv_kernel, 1) if self.conv_last else (self.conv_dim, 1, self.conv_kernel)
        return {**inputs, f"{m}.conv1d.weight": conv, f"{m}.dt_bias": (hv,), f"{m}.A_log": (hv,),
                f"{m}.norm.weight": (self.head_v_dim,), f"{m}.out_proj.weight": (hidden, self.value_dim)}

    def split(self, name: str, tensor: Any, take_rows: Callable[[Any, np.ndarray], Any]) -> list[tuple[str, Any]]:
        """One stored tensor -> the model's: grouped projections ungrouped, the convolution's weight ``[C, K]``."""
        if name.endswith(".conv1d.weight"):
            return [(name, np.ascontiguousarray(np.asarray(tensor).reshape(self.conv_dim, self.conv_kernel)))]
        r, dk, dv = self.num_v_heads // self.num_k_heads, self.head_k_dim, self.head_v_dim
        if ".in_proj_qkvz." in name:  # per key head: q (dk), k (dk), v (r * dv), z (r * dv)
            rows = np.arange(self.conv_dim + self.value_dim).reshape(self.num_k_heads, 2 * dk + 2 * r * dv)
            parts = {"in_proj_qkv": np.concatenate([rows[:, :dk].ravel(), rows[:, dk:2 * dk].ravel(),
                                                    rows[:, 2 * dk:2 * dk + r * dv].ravel()]),
                     "in_proj_z": rows[:, 2 * dk + r * dv:].ravel()}
            return [(name.replace("in_proj_qkvz", part), take_rows(tensor, order)) for part, order in parts.items()]
        if ".in_proj_ba." in name:  # per key head: b (r), a (r)
            rows = np.arange(2 * self.num_v_heads).reshape(self.num_k_heads, 2 * r)
            return [(name.replace("in_proj_ba", "in_proj_b"), take_rows(tensor, rows[:, :r].ravel())),
                    (name.replace("in_proj_ba", "in_proj_a"), take_rows(tensor, rows[:, r:].ravel()))]
        return [(name, tensor)]

    def state_shapes(self, dtype: str) -> StateShapes:
        """The convolution's last inputs (in the compute dtype) and the recurrent matrix (float32)."""
        return (((self.conv_dim, self.conv_kernel - 1), dtype),
                ((self.num_v_heads, self.head_k_dim, self.head_v_dim), "float32"))

    def layer(self, ops: Any, tensor: Callable[[str], Any], projection: Callable[[str], Any], eps: float) -> Any:
        return GatedDeltaLayer(self, ops, tensor, projection, eps)


class GatedDeltaLayer:
    """One layer's placed weights and its three steps: projections (compilable), the recurrent ops over the
    batch's states, and the gated norm and output projection (compilable)."""

    def __init__(self, spec: GatedDeltaSpec, ops: Any, tensor: Callable[[str], Any], projection: Callable[[str], Any],
                 eps: float):
        self.spec, self.ops, self.eps = spec, ops, eps
        self.inputs = [projection(f"{MODULE}.{name}") for name in INPUTS]
        self.out = projection(f"{MODULE}.out_proj")
        self.conv = tensor(f"{MODULE}.conv1d.weight")
        self.a_log, self.dt_bias = tensor(f"{MODULE}.A_log"), tensor(f"{MODULE}.dt_bias")
        self.norm = tensor(f"{MODULE}.norm.weight")

    def projections(self) -> list[Any]:
        return [*self.inputs, self.out]

    def project(self, x: Any) -> tuple[Any, ...]:
        """``x -> (qkv, b, a, z)``: the convolution's input, the gates' inputs, the output gate."""
        qkv, z, b, a = (p(x) for p in self.inputs)
        return qkv, b, a, z

    def mix(self, inputs: tuple[Any, ...], states: tuple[Any, Any], cu_seqlens: np.ndarray) -> tuple[Any, tuple, tuple]:
        """The recurrent part over a batch: ``(core [T, Hv, Dv], (z,), new states)``; the given states are not
        changed."""
        ops, s = self.ops, self.spec
        qkv, b, a, z = inputs
        mixed, conv_state = ops.causal_conv1d(qkv, self.conv, states[0], cu_seqlens, True)
        q, k, v = ops.split(mixed, (s.key_dim, s.key_dim, s.value_dim))
        q = ops.reshape(q, (-1, s.num_k_heads, s.head_k_dim))
        k = ops.reshape(k, (-1, s.num_k_heads, s.head_k_dim))
        v = ops.reshape(v, (-1, s.num_v_heads, s.head_v_dim))
        core, recurrent = ops.gated_delta_rule(q, k, v, a, b, self.a_log, self.dt_bias, states[1], cu_seqlens)
        return core, (z,), (conv_state, recurrent)

    def output(self, core: Any, z: Any) -> Any:
        """RMSNorm of each head's output (a weight of its own, no offset), times SiLU of its gate, projected."""
        ops, dv = self.ops, self.spec.head_v_dim
        normed = ops.rms_norm(ops.reshape(core, (-1, dv)), self.norm, self.eps)
        gated = ops.silu_mul(ops.reshape(z, (-1, dv)), normed)
        return self.out(ops.reshape(gated, (-1, self.spec.value_dim)))
