"""Lightning attention (MiniMax-Text-01's and MiniMax-M1's "linear_attention" layers, transformers'
``MiniMaxLightningAttention``): the tensors it stores, their layout at load, and one layer's work around Mamba-2's
``ssd_update``.

Per head, linear attention with a constant decay: ``S = exp(-rate) * S + v k^T``, ``o = S q``. That is Mamba-2's
recurrence exactly with ``x = v``, ``b = k``, ``c = q`` (one group per head), a step of 1 (a raw step and bias of 0,
clipped to ``[1, 1]``), ``a_log = log(rate)`` and no skip (``d = 0``); the state ``[H, Dv, Dk]`` is the transpose of
transformers' ``K^T V``, and transformers' blocks compute the same sums in another order. Around it: SiLU on
``qkv_proj`` (stored per head: its q, k, v), an RMSNorm over all heads' outputs (epsilon 1e-6, its module's default),
times the sigmoid of ``output_gate`` of the block's normed input, then ``out_proj``. The rates are no tensor of the
release: they are computed from the layer's depth (:func:`slope_rates` as transformers, :func:`release_slope_rates` as
the releases' own code) into ``Architecture.computed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ferrum.recurrent.state import StateShapes

MODULE = "self_attn"
#: The computed tensor holding a layer's ``log(rate)`` per head (``Architecture.computed``), relative to the layer.
A_LOG = f"{MODULE}.a_log"
#: The epsilon of the norm over the heads' outputs (transformers' MiniMaxRMSNorm default; the release's code too).
NORM_EPS = 1e-6
#: What transformers' save writes beside the weights: buffers computed from the config, read by no one here.
BUFFERS = r"\.self_attn\.(slope_rate|query_decay|key_decay|diagonal_decay)$"


def slope_rates(heads: int, layer: int, layers: int) -> np.ndarray:
    """Layer ``layer``'s decay rate per head, as transformers' ``get_slope_rate``: ALiBi's slopes
    ``2 ** (-8 (h + 1) / heads)``, shrinking with depth by ``1 - layer / (layers - 1 + 1e-5) + 1e-5``."""
    base = 1 / (2 ** (8 / heads))
    factor = 1 - layer / (layers - 1 + 1e-5) + 1e-5
    return (base ** (np.arange(heads, dtype=np.float64) + 1) * factor).astype(np.float32)


def alibi_slopes(heads: int) -> list[float]:
    """ALiBi's slopes as MiniMax's own code builds them (its ``_build_slope_tensor``): ``2 ** (-8 (h + 1) / heads)``
    for a power of two; else those of the power of two below, then every other one of twice that."""
    if math.log2(heads).is_integer():
        start = 2 ** (-(2 ** -(math.log2(heads) - 3)))
        return [start * start ** h for h in range(heads)]
    below = 2 ** math.floor(math.log2(heads))
    return alibi_slopes(below) + alibi_slopes(2 * below)[0::2][:heads - below]


def release_slope_rates(heads: int, layer: int, layers: int) -> np.ndarray:
    """Layer ``layer``'s decay rate per head as the releases' own code (``modeling_minimax_text_01.py``, MiniMax-M1's
    the same) computes it: :func:`alibi_slopes` in float32 times ``1 - layer / (layers - 1) + 1e-5``. transformers'
    :func:`slope_rates` differs by the 1e-5 it adds to the divisor and, for head counts not a power of two, by its
    evenly spaced slopes. One layer (which the release code divides by zero for) takes vLLM's ``1 + 1e-5``."""
    factor = 1 - layer / (layers - 1) + 1e-5 if layers > 1 else 1 + 1e-5
    return np.array(alibi_slopes(heads), dtype=np.float32) * np.float32(factor)


@dataclass(frozen=True)
class LightningSpec:
    """The sizes of a model's lightning attention layers (its attention heads and head_dim)."""

    heads: int
    head_dim: int

    module = MODULE
    title = "lightning attention"  # what error messages call the mixer

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    def tensors(self, hidden: int) -> dict[str, tuple[int, ...]]:
        """A layer's tensors as stored, relative to the layer."""
        m, w = MODULE, self.width
        return {f"{m}.qkv_proj.weight": (3 * w, hidden), f"{m}.output_gate.weight": (w, hidden),
                f"{m}.norm.weight": (w,), f"{m}.out_proj.weight": (hidden, w)}

    def split(self, name: str, tensor: Any, take_rows: Callable[[Any, np.ndarray], Any]) -> list[tuple[str, Any]]:
        """``qkv_proj`` (rows per head: its q, k, v) -> ``q_proj``, ``k_proj``, ``v_proj`` of all heads each (fused
        back where the backend splits natively); the rest as stored."""
        if ".qkv_proj." not in name:
            return [(name, tensor)]
        order = np.arange(3 * self.width).reshape(self.heads, 3, self.head_dim)
        return [(name.replace(".qkv_proj.", f".{part}."), take_rows(tensor, order[:, i].ravel()))
                for i, part in enumerate(("q_proj", "k_proj", "v_proj"))]

    def state_shapes(self, dtype: str) -> StateShapes:
        """Each head's ``[Dv, Dk]`` sum, float32."""
        return (((self.heads, self.head_dim, self.head_dim), "float32"),)

    def layer(self, ops: Any, tensor: Callable[[str], Any], projection: Callable[[str], Any],
              eps: float) -> LightningLayer:
        return LightningLayer(self, ops, tensor, projection)


class LightningLayer:
    """One layer's placed weights and its three steps: projections (compilable), the recurrence over the batch's
    states, the norm, gate and output projection (compilable)."""

    def __init__(self, spec: LightningSpec, ops: Any, tensor: Callable[[str], Any], projection: Callable[[str], Any]):
        from ferrum.arch.tensors import projection_group  # imported here: ferrum.arch reads the mixers' specs
        from ferrum.reference_ops import dtype_name  # imported here: the reference ops import the families

        self.spec, self.ops = spec, ops
        self.qkv = projection_group(ops, tensor, projection, f"{MODULE}.qkv_proj", (spec.width,) * 3)
        self.gate, self.out = projection(f"{MODULE}.output_gate"), projection(f"{MODULE}.out_proj")
        self.norm, self.a_log = tensor(f"{MODULE}.norm.weight"), tensor(A_LOG)
        self.zeros = ops.from_numpy(np.zeros(spec.heads, dtype=np.float32), "float32")  # no skip, no step bias
        self.dtype = dtype_name(self.norm)

    def projections(self) -> list[Any]:
        return [*self.qkv.linears, self.gate, self.out]

    def project(self, x: Any) -> tuple[Any, ...]:
        """``x -> (q, k, v, gate)``: q, k and v through their SiLU, the output gate's input."""
        ops = self.ops
        return (*(ops.sigmoid_mul(t, t) for t in self.qkv(x)), self.gate(x))

    def mix(self, inputs: tuple[Any, ...], states: tuple[Any, ...],
            cu_seqlens: np.ndarray) -> tuple[Any, tuple[Any, ...], tuple[Any, ...]]:
        """``(out [T, H, D], (gate,), new states)`` over a batch; the given states are not changed."""
        ops, s = self.ops, self.spec
        q, k, v, gate = inputs
        q, k, v = (ops.reshape(t, (-1, s.heads, s.head_dim)) for t in (q, k, v))
        steps = ops.from_numpy(np.zeros((int(cu_seqlens[-1]), s.heads), dtype=np.float32), self.dtype)
        out, state = ops.ssd_update(v, steps, self.a_log, k, q, self.zeros, self.zeros, states[0], cu_seqlens,
                                    1.0, 1.0)
        return out, (gate,), (state,)

    def output(self, out: Any, gate: Any) -> Any:
        """All heads' outputs RMS-normed as one, times the sigmoid of the gate, projected."""
        ops = self.ops
        normed = ops.rms_norm(ops.reshape(out, (-1, self.spec.width)), self.norm, NORM_EPS)
        return self.out(ops.sigmoid_mul(gate, normed))
