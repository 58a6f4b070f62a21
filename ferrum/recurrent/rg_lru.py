"""Griffin's recurrent block (RecurrentGemma's "recurrent" layers, as transformers' RecurrentGemmaRecurrentBlock):
the tensors it stores, their layout at load, and one layer's work around the ``causal_conv1d`` and ``rg_lru`` ops.

``linear_y`` gives the output gate (GeLU-tanh), ``linear_x`` the convolution's input; the depthwise causal
convolution (biased, no activation) feeds the RG-LRU, whose input and recurrence gates are block-diagonal, one
``[W / H, W / H]`` block per head. Those blocks are laid out as one dense ``[W, W]`` matrix each at load, so the
gates are plain projections (``H`` times their stored size, for no new op). The RG-LRU resets where a sequence
starts (position 0): the mixer kind hands it the segments that do (:class:`ferrum.mixers.Resetting`). The state
is the convolution's last ``K - 1`` inputs and the recurrence's ``h``, both per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ferrum.recurrent.mamba2 import convolve_biased
from ferrum.recurrent.state import StateShapes

MODULE = "temporal_block"
#: The stored gates (``[H, W / H, W / H]`` weights, ``[H, W / H]`` biases) -> the dense projections they become.
GATES = {"input_gate": "rg_lru.input_gate", "recurrent_gate": "rg_lru.recurrent_gate"}
#: The plugin API from which a plugin's own ``rg_lru`` is called.
SINCE = (1, 25)


@dataclass(frozen=True)
class RgLruSpec:
    """The sizes of a model's recurrent blocks."""

    width: int  # lru_width
    heads: int  # the gates' blocks (num_attention_heads)
    conv_kernel: int  # conv1d_width
    conv_last: bool = False  # mlx-lm's conv_1d weight [W, K, 1] (transformers': [W, 1, K])

    module = MODULE
    title = "RG-LRU"  # what error messages call the mixer
    taps = "conv_1d"  # the convolution's module in the layer's

    def tensors(self, hidden: int) -> dict[str, tuple[int, ...]]:
        """A layer's tensors as stored, relative to the layer."""
        m, w, block = MODULE, self.width, self.width // self.heads
        taps = (w, self.conv_kernel, 1) if self.conv_last else (w, 1, self.conv_kernel)
        out = {f"{m}.linear_x.weight": (w, hidden), f"{m}.linear_y.weight": (w, hidden),
               f"{m}.linear_out.weight": (hidden, w), f"{m}.conv_1d.weight": taps,
               f"{m}.rg_lru.recurrent_param": (w,)}
        out.update({f"{m}.{name}.bias": (w,) for name in ("linear_x", "linear_y", "conv_1d")})
        out[f"{m}.linear_out.bias"] = (hidden,)
        for gate in GATES:
            out.update({f"{m}.rg_lru.{gate}_weight": (self.heads, block, block),
                        f"{m}.rg_lru.{gate}_bias": (self.heads, block)})
        return out

    def split(self, name: str, tensor: Any, take_rows: Callable[[Any, np.ndarray], Any]) -> list[tuple[str, Any]]:
        """The taps ``[W, K]`` and their bias one row ``[1, W]`` (see :meth:`ferrum.recurrent.mamba2.Mamba2Spec.split`
        for why on the host), renamed ``conv1d`` (the recurrent mixers' name for taps, which the loader keeps as they
        are); each gate's blocks as one dense block-diagonal projection (transformers multiplies
        ``x_h @ block_h``: its rows are ``block_h``'s columns), its bias flat."""
        if name.endswith(".conv_1d.weight"):
            taps = np.ascontiguousarray(np.asarray(tensor).reshape(self.width, self.conv_kernel))
            return [(name.replace(".conv_1d.", ".conv1d."), taps)]
        if name.endswith(".conv_1d.bias"):
            return [(name.replace(".conv_1d.", ".conv1d."), np.asarray(tensor).reshape(1, self.width))]
        for gate, placed in GATES.items():
            stored = f".rg_lru.{gate}_"
            if stored + "weight" in name:
                blocks = np.asarray(tensor)
                dense = np.zeros((self.width, self.width), dtype=blocks.dtype)
                size = self.width // self.heads
                for h in range(self.heads):
                    dense[h * size:(h + 1) * size, h * size:(h + 1) * size] = blocks[h].T
                return [(name.replace(stored + "weight", f".{placed}.weight"), dense)]
            if stored + "bias" in name:
                return [(name.replace(stored + "bias", f".{placed}.bias"), np.asarray(tensor).reshape(self.width))]
        return [(name, tensor)]

    def state_shapes(self, dtype: str) -> StateShapes:
        """The convolution's last inputs (in the compute dtype) and the recurrence's ``h`` (float32)."""
        return (((self.width, self.conv_kernel - 1), dtype), ((self.width,), "float32"))

    def layer(self, ops: Any, tensor: Callable[[str], Any], projection: Callable[[str], Any],
              eps: float) -> RgLruLayer:
        return RgLruLayer(self, ops, tensor, projection)


def runs_natively(ops: Any) -> bool:
    """Whether a layer calls the plugin's own ``rg_lru``: only where it declares API 1.25 (asked once, at build)."""
    from ferrum.backends import declared_version  # imported here: ferrum.backends loads the plugins

    return "rg_lru" in ops.native and declared_version(ops.info) >= SINCE


class RgLruLayer:
    """One layer's placed weights and its three steps: ``linear_x`` and the GeLU-tanh of ``linear_y``
    (compilable), the convolution, gates and recurrence over the batch's states, then the gate and ``linear_out``
    (compilable)."""

    def __init__(self, spec: RgLruSpec, ops: Any, tensor: Callable[[str], Any], projection: Callable[[str], Any]):
        m = MODULE
        self.spec, self.ops = spec, ops
        self.x, self.y, self.out = (projection(f"{m}.{name}") for name in ("linear_x", "linear_y", "linear_out"))
        self.input_gate, self.recurrent_gate = (projection(f"{m}.{placed}") for placed in GATES.values())
        self.taps, self.taps_bias = tensor(f"{m}.conv1d.weight"), tensor(f"{m}.conv1d.bias")
        self.a_param = tensor(f"{m}.rg_lru.recurrent_param")
        self.native = runs_natively(ops)

    def projections(self) -> list[Any]:
        return [self.x, self.y, self.input_gate, self.recurrent_gate, self.out]

    def project(self, x: Any) -> tuple[Any, Any]:
        """``x -> (linear_x(x), gelu_tanh(linear_y(x)))``: the convolution's input and the output gate."""
        return self.x(x), self.ops.gelu(self.y(x), True)

    def mix(self, inputs: tuple[Any, ...], states: tuple[Any, Any], cu_seqlens: np.ndarray,
            starts: np.ndarray) -> tuple[Any, tuple, tuple]:
        """The recurrent part over a batch: ``(h [T, W], (gate,), new states)``; ``starts`` the segments that begin
        their sequences. The given states are not changed."""
        ops = self.ops
        x, gate = inputs
        x, conv_state = convolve_biased(ops, x, self.taps, self.taps_bias, states[0], cu_seqlens)
        lru = ops.rg_lru if self.native else ops.fallback["rg_lru"]
        h, state = lru(x, self.input_gate(x), self.recurrent_gate(x), self.a_param, states[1], cu_seqlens, starts)
        return h, (gate,), (conv_state, state)

    def output(self, h: Any, gate: Any) -> Any:
        """``h * gate`` through ``linear_out``."""
        return self.out(self.ops.mul(h, gate))
