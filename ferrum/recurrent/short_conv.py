"""LFM2's gated short convolution (its "conv" layers): the tensors it stores, their layout at load, and one layer's
work around the ``causal_conv1d`` op.

``in_proj`` gives three rows of ``hidden`` each, ``B``, ``C`` and ``x``; ``B * x`` runs through a depthwise causal
convolution of ``L_cache`` taps (no activation), ``C`` gates its output, ``out_proj`` projects it. The state is the
convolution's last ``L_cache - 1`` inputs. transformers stores the taps ``[C, 1, K]``, mlx-lm ``[C, K, 1]``, both as
``conv.conv``, which the family renames ``conv.conv1d`` (the recurrent mixers' name for their taps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ferrum.recurrent.state import StateShapes

MODULE = "conv"
#: The layer's convolution taps, relative to the layer (under the model's name, see the module's docstring).
TAPS = f"{MODULE}.conv1d.weight"


@dataclass(frozen=True)
class ShortConvSpec:
    """The size of a model's short convolutions and the layout their taps are stored in."""

    hidden: int
    conv_kernel: int  # L_cache
    conv_last: bool = False  # mlx-lm's taps [C, K, 1] (transformers': [C, 1, K])

    module = MODULE
    title = "short convolution"  # what error messages call the mixer
    taps = "conv1d"  # the taps' module in the layer's (the one whose stored shape tells the layout)

    def tensors(self, hidden: int) -> dict[str, tuple[int, ...]]:
        """A layer's tensors as stored, relative to the layer."""
        taps = (hidden, self.conv_kernel, 1) if self.conv_last else (hidden, 1, self.conv_kernel)
        return {f"{MODULE}.in_proj.weight": (3 * hidden, hidden), TAPS: taps,
                f"{MODULE}.out_proj.weight": (hidden, hidden)}

    def split(self, name: str, tensor: Any, take_rows: Callable[[Any, np.ndarray], Any]) -> list[tuple[str, Any]]:
        """The taps as ``causal_conv1d`` reads them, ``[C, K]``; the projections as stored."""
        if name.endswith(f".{TAPS}"):
            return [(name, np.ascontiguousarray(np.asarray(tensor).reshape(self.hidden, self.conv_kernel)))]
        return [(name, tensor)]

    def state_shapes(self, dtype: str) -> StateShapes:
        """The convolution's last ``K - 1`` inputs, in the compute dtype (as transformers' cache holds them)."""
        return (((self.hidden, self.conv_kernel - 1), dtype),)

    def layer(self, ops: Any, tensor: Callable[[str], Any], projection: Callable[[str], Any],
              eps: float) -> ShortConvLayer:
        return ShortConvLayer(self, ops, tensor, projection)


class ShortConvLayer:
    """One layer's placed weights and its three steps: ``in_proj`` and ``B * x`` (compilable), the convolution
    over the batch's states, ``C``'s gate and ``out_proj`` (compilable)."""

    def __init__(self, spec: ShortConvSpec, ops: Any, tensor: Callable[[str], Any],
                 projection: Callable[[str], Any]):
        self.spec, self.ops = spec, ops
        self.into, self.out = projection(f"{MODULE}.in_proj"), projection(f"{MODULE}.out_proj")
        self.taps = tensor(TAPS)

    def projections(self) -> list[Any]:
        return [self.into, self.out]

    def project(self, x: Any) -> tuple[Any, Any]:
        """``x -> (B * x, C)``: the convolution's input and its output gate."""
        b, c, v = self.ops.split(self.into(x), (self.spec.hidden,) * 3)
        return self.ops.mul(b, v), c

    def mix(self, inputs: tuple[Any, ...], states: tuple[Any, ...],
            cu_seqlens: np.ndarray) -> tuple[Any, tuple[Any, ...], tuple[Any, ...]]:
        """``(convolved, (C,), new states)`` over a batch; the given states are not changed."""
        bx, c = inputs
        convolved, state = self.ops.causal_conv1d(bx, self.taps, states[0], cu_seqlens, False)
        return convolved, (c,), (state,)

    def output(self, convolved: Any, c: Any) -> Any:
        return self.out(self.ops.mul(c, convolved))
