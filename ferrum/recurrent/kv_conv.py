"""Baichuan-M1's short convolution over keys and values (mlx-lm's baichuan_m1): each attention layer's raw keys and
values, before rope, run through a depthwise causal convolution of ``conv_window`` taps along the sequence, one tap
pair per key/value head shared by its dims; the convolved keys are then rotated and cached with the values. The
state per sequence is the convolution's last ``conv_window - 1`` raw keys and values, so the layer is attention and a
recurrent mixer at once (mixer "conv_attention", :class:`ferrum.mixers.ConvolvedAttention`): it composes the
``causal_conv1d`` op (``y[t] = w[0] * x[t - 1] + w[1] * x[t]``, mlx-lm's ``u_prev * w0 + u * w1``).

The release stores each layer's taps ``self_attn.conv_k`` / ``conv_v`` as ``[1, 1, kv_heads, 1, K]``; the family
renames them ``kv_conv.k_conv1d.weight`` / ``kv_conv.v_conv1d.weight``, and the load spreads each head's taps over its
dims (repeating the heads of a layer with fewer key/value heads than the model's, as ``StoredHeads.kv_heads``
repeats its projections) into the ``[C, K]`` taps ``causal_conv1d`` reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ferrum.recurrent.state import StateShapes

MODULE = "kv_conv"
#: The taps of the keys' and of the values' convolutions, relative to the layer (named as the recurrent mixers' taps
#: are, so that they are placed as they are).
TAPS = (f"{MODULE}.k_conv1d.weight", f"{MODULE}.v_conv1d.weight")


@dataclass(frozen=True)
class KvConvSpec:
    """The model's key/value heads and head dims, and the convolution's taps."""

    kv_heads: int
    head_dim: int
    conv_kernel: int

    module = MODULE
    title = "key/value convolution"  # what error messages call the mixer

    def tensors(self, kv_heads: int) -> dict[str, tuple[int, ...]]:
        """A layer's taps as stored, for its ``kv_heads`` stored key/value heads."""
        return {name: (1, 1, kv_heads, 1, self.conv_kernel) for name in TAPS}

    def split(self, name: str, tensor: Any, take_rows: Callable[[Any, np.ndarray], Any]) -> list[tuple[str, Any]]:
        """Taps ``[1, 1, H, 1, K]`` -> ``[kv_heads * head_dim, K]``: each stored head's repeated over the model's
        heads it stands for, then over its dims."""
        taps = np.asarray(tensor, dtype=np.float32).reshape(-1, self.conv_kernel)
        heads = np.repeat(taps, self.kv_heads // taps.shape[0], axis=0)
        return [(name, np.ascontiguousarray(np.repeat(heads, self.head_dim, axis=0)))]

    def state_shapes(self, dtype: str) -> StateShapes:
        """The last ``K - 1`` raw keys, then values, in the compute dtype."""
        return (((self.kv_heads * self.head_dim, self.conv_kernel - 1), dtype),) * 2

    def layer(self, ops: Any, tensor: Callable[[str], Any], projection: Callable[[str], Any],
              eps: float) -> KvConvLayer:
        return KvConvLayer(self, ops, tensor)


class KvConvLayer:
    """One layer's taps and its step: the batch's keys and values convolved from the sequences' states."""

    def __init__(self, spec: KvConvSpec, ops: Any, tensor: Callable[[str], Any]):
        self.spec, self.ops = spec, ops
        self.taps = tuple(tensor(name) for name in TAPS)

    def projections(self) -> list[Any]:
        return []

    def mix(self, k: Any, v: Any, states: tuple[Any, ...],
            cu_seqlens: np.ndarray) -> tuple[Any, Any, tuple[Any, ...]]:
        """``(keys, values, new states)``: ``k, v [T, kv_heads, head_dim]`` convolved along each sequence; the
        given states are not changed."""
        ops, spec = self.ops, self.spec
        width = spec.kv_heads * spec.head_dim
        out, new = [], []
        for x, taps, state in zip((k, v), self.taps, states):
            y, kept = ops.causal_conv1d(ops.reshape(x, (-1, width)), taps, state, cu_seqlens, False)
            out.append(ops.reshape(y, (-1, spec.kv_heads, spec.head_dim)))
            new.append(kept)
        return out[0], out[1], tuple(new)
