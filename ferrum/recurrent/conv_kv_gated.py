"""Gear's gated key/value convolution (its "conv_mixer" layers, mlx-lm's ConvKVGatedMixer): the tensors it stores,
their layout at load, and one layer's work around the ``causal_conv1d`` op.

Attention's q/k/v projections with per-head q and k norms, but no attention: the normed keys and the values each
run through a depthwise causal convolution of ``L_cache`` taps (biased where the projections are), and each query
head's output is ``sigmoid(q * k) * v`` of its key/value head's convolved key and value, through ``o_proj``. The
state is each convolution's last ``L_cache - 1`` inputs. The release stores the taps ``[C, 1, K]``, mlx-lm ``[C, K,
1]``; both are renamed ``key_conv1d`` / ``value_conv1d`` at load (the recurrent mixers' name for taps, which the
loader keeps as they are).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ferrum.recurrent.mamba2 import convolve_biased
from ferrum.recurrent.state import StateShapes

MODULE = "local_mixer"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
#: The stored convolutions (keys', values') -> their placed names.
CONVS = {"key_conv": "key_conv1d", "value_conv": "value_conv1d"}


@dataclass(frozen=True)
class ConvKvGatedSpec:
    """The sizes of a model's gated key/value convolutions and the layout their taps are stored in."""

    heads: int
    kv_heads: int
    head_dim: int
    conv_kernel: int  # conv_L_cache
    bias: bool = False  # attention_bias: the projections' and the convolutions'
    conv_last: bool = False  # mlx-lm's taps [C, K, 1] (the release's: [C, 1, K])

    module = MODULE
    title = "gated key/value convolution"  # what error messages call the mixer
    taps = "key_conv"  # the taps' module in the layer's (the one whose stored shape tells the layout)

    def tensors(self, hidden: int) -> dict[str, tuple[int, ...]]:
        """A layer's tensors as stored, relative to the layer."""
        m, q, kv = MODULE, self.heads * self.head_dim, self.kv_heads * self.head_dim
        out = {f"{m}.q_proj.weight": (q, hidden), f"{m}.k_proj.weight": (kv, hidden),
               f"{m}.v_proj.weight": (kv, hidden), f"{m}.o_proj.weight": (hidden, q),
               f"{m}.q_norm.weight": (self.head_dim,), f"{m}.k_norm.weight": (self.head_dim,)}
        taps = (kv, self.conv_kernel, 1) if self.conv_last else (kv, 1, self.conv_kernel)
        out.update({f"{m}.{conv}.weight": taps for conv in CONVS})
        if self.bias:
            out.update({f"{m}.{name}.bias": (rows,) for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv),
                                                                       ("o_proj", hidden))})
            out.update({f"{m}.{conv}.bias": (kv,) for conv in CONVS})
        return out

    def split(self, name: str, tensor: Any, take_rows: Callable[[Any, np.ndarray], Any]) -> list[tuple[str, Any]]:
        """The taps as ``causal_conv1d`` reads them, ``[C, K]``, and their biases one row ``[1, C]`` (added to the
        batch's rows, :func:`ferrum.recurrent.mamba2.convolve_biased`); the rest as stored."""
        kv = self.kv_heads * self.head_dim
        for conv, placed in CONVS.items():
            if name.endswith(f".{conv}.weight"):
                taps = np.ascontiguousarray(np.asarray(tensor).reshape(kv, self.conv_kernel))
                return [(name.replace(f".{conv}.", f".{placed}."), taps)]
            if name.endswith(f".{conv}.bias"):
                return [(name.replace(f".{conv}.", f".{placed}."), np.asarray(tensor).reshape(1, kv))]
        return [(name, tensor)]

    def state_shapes(self, dtype: str) -> StateShapes:
        """Each convolution's last ``K - 1`` inputs, in the compute dtype."""
        window = ((self.kv_heads * self.head_dim, self.conv_kernel - 1), dtype)
        return window, window

    def layer(self, ops: Any, tensor: Callable[[str], Any], projection: Callable[[str], Any],
              eps: float) -> ConvKvGatedLayer:
        return ConvKvGatedLayer(self, ops, tensor, projection, eps)


class ConvKvGatedLayer:
    """One layer's placed weights and its three steps: the normed projections (compilable), the convolutions over
    the batch's states (their outputs repeated to the query heads), the gate and ``o_proj`` (compilable)."""

    def __init__(self, spec: ConvKvGatedSpec, ops: Any, tensor: Callable[[str], Any],
                 projection: Callable[[str], Any], eps: float):
        self.spec, self.ops, self.eps = spec, ops, eps
        self.q, self.k, self.v, self.o = (projection(f"{MODULE}.{name}") for name in PROJECTIONS)
        self.q_norm, self.k_norm = (tensor(f"{MODULE}.{name}.weight") for name in ("q_norm", "k_norm"))
        self.convs = [(tensor(f"{MODULE}.{placed}.weight"), tensor(f"{MODULE}.{placed}.bias"))
                      for placed in CONVS.values()]

    def projections(self) -> list[Any]:
        return [self.q, self.k, self.v, self.o]

    def _normed(self, x: Any, heads: int, weight: Any) -> Any:
        ops, d = self.ops, self.spec.head_dim
        return ops.reshape(ops.rms_norm(ops.reshape(x, (-1, heads, d)), weight, self.eps), (-1, heads * d))

    def project(self, x: Any) -> tuple[Any, Any, Any]:
        """``x -> (k, v, q)``: the convolutions' inputs (k normed) and the normed queries."""
        spec = self.spec
        return (self._normed(self.k(x), spec.kv_heads, self.k_norm), self.v(x),
                self._normed(self.q(x), spec.heads, self.q_norm))

    def mix(self, inputs: tuple[Any, ...], states: tuple[Any, Any],
            cu_seqlens: np.ndarray) -> tuple[Any, tuple, tuple]:
        """``(keys, (values, q), new states)`` over a batch, the convolved keys and values repeated to the query
        heads; the given states are not changed."""
        ops, spec = self.ops, self.spec
        k, v, q = inputs
        (k, k_state), (v, v_state) = (
            ops.causal_conv1d(x, taps, state, cu_seqlens, False) if bias is None else
            convolve_biased(ops, x, taps, bias, state, cu_seqlens) for x, (taps, bias), state in zip((k, v), self.convs,
                                                                                                      states))
        group = spec.heads // spec.kv_heads
        if group > 1:  # query head h reads key/value head h // group
            rows = ops.from_numpy(np.repeat(np.arange(int(cu_seqlens[-1]) * spec.kv_heads), group).astype(np.int32),
                                  None)
            k, v = (ops.reshape(ops.take_rows(ops.reshape(x, (-1, spec.head_dim)), rows),
                                (-1, spec.heads * spec.head_dim)) for x in (k, v))
        return k, (v, q), (k_state, v_state)

    def output(self, k: Any, v: Any, q: Any) -> Any:
        """``sigmoid(q * k) * v`` through ``o_proj``."""
        return self.o(self.ops.sigmoid_mul(self.ops.mul(q, k), v))
