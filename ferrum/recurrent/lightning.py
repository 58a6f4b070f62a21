"""Lightning attention (MiniMax-Text-01's and MiniMax-M1's "linear_attention" layers, transformers'
``MiniMaxLightningAttention``; Ring-linear's, mlx-lm's ``bailing_moe_linear``): the tensors it stores, their layout at
load, and one layer's work around Mamba-2's ``ssd_update``.

Per head, linear attention with a constant decay: ``S = exp(-rate) * S + v k^T``, ``o = S q``. That is Mamba-2's
recurrence exactly with ``x = v``, ``b = k``, ``c = q`` (one group per head), a step of 1 (a raw step and bias of 0,
clipped to ``[1, 1]``), ``a_log = log(rate)`` and no skip (``d = 0``); the state ``[H, Dv, Dk]`` is the transpose of
transformers' ``K^T V``, and transformers' blocks compute the same sums in another order. Around it, MiniMax's: SiLU on
``qkv_proj`` (stored per head: its q, k, v), an RMSNorm over all heads' outputs (epsilon 1e-6, its module's default),
times the sigmoid of ``output_gate`` of the block's normed input, then ``out_proj``. Ring-linear's differ as
:class:`LightningSpec`'s fields say: q, k, v stored as all heads' queries, then keys, then values, no SiLU, per-head
q/k norms, rope on q and k, the queries scaled, the output normed in groups with the model's epsilon. The rates are
no tensor of the release: they are computed from the layer's depth (:func:`slope_rates` as transformers,
:func:`release_slope_rates` as MiniMax's own code, :func:`ring_slope_rates` as mlx-lm's Ring-linear) into
``Architecture.computed``.
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


def ring_slope_rates(heads: int, layer: int, layers: int) -> np.ndarray:
    """Layer ``layer``'s decay rate per head as mlx-lm's ``bailing_moe_linear`` computes it: :func:`alibi_slopes` in
    float32 times ``1 - max(0, layer - 1) / max(1, layers - 1) + 1e-5`` (the first two layers decay alike)."""
    factor = 1 - max(0, layer - 1) / max(1, layers - 1) + 1e-5
    return np.array(alibi_slopes(heads), dtype=np.float32) * np.float32(factor)


@dataclass(frozen=True)
class LightningSpec:
    """A model's lightning attention layers: their heads and head_dim, and where they depart from MiniMax's (the
    defaults) as Ring-linear's do."""

    heads: int
    head_dim: int
    #: qkv_proj's rows: each head's q, k, v ("per_head", MiniMax's), or all heads' q, then k, then v ("grouped").
    layout: str = "per_head"
    silu: bool = True  # SiLU on q, k and v
    qk_norm: bool = False  # per-head RMSNorms of q and k (``q_norm``, ``k_norm``) with the model's epsilon
    rotated: bool = False  # q and k rotated by the layer's rope (after their norms)
    query_scale: float = 1.0  # the queries times this
    qkv_bias: bool = False
    norm_groups: int = 1  # the output normed in this many groups of equal width
    norm_eps: float | None = NORM_EPS  # None: the model's epsilon
    #: The output gate's, the output norm's and the output projection's modules (in :data:`MODULE`).
    gate: str = "output_gate"
    norm: str = "norm"
    out: str = "out_proj"

    module = MODULE
    title = "lightning attention"  # what error messages call the mixer

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    def tensors(self, hidden: int) -> dict[str, tuple[int, ...]]:
        """A layer's tensors as stored, relative to the layer."""
        m, w = MODULE, self.width
        out = {f"{m}.qkv_proj.weight": (3 * w, hidden), f"{m}.{self.gate}.weight": (w, hidden),
               f"{m}.{self.norm}.weight": (w,), f"{m}.{self.out}.weight": (hidden, w)}
        if self.qkv_bias:
            out[f"{m}.qkv_proj.bias"] = (3 * w,)
        if self.qk_norm:
            out.update({f"{m}.{norm}.weight": (self.head_dim,) for norm in ("q_norm", "k_norm")})
        return out

    def split(self, name: str, tensor: Any, take_rows: Callable[[Any, np.ndarray], Any]) -> list[tuple[str, Any]]:
        """``qkv_proj`` (rows as :attr:`layout` says) -> ``q_proj``, ``k_proj``, ``v_proj`` of all heads each (fused
        back where the backend splits natively); the rest as stored."""
        if ".qkv_proj." not in name:
            return [(name, tensor)]
        order = np.arange(3 * self.width).reshape(self.heads, 3, self.head_dim) if self.layout == "per_head" else (
            np.arange(3 * self.width).reshape(3, self.heads, self.head_dim).transpose(1, 0, 2))
        return [(name.replace(".qkv_proj.", f".{part}."), take_rows(tensor, order[:, i].ravel()))
                for i, part in enumerate(("q_proj", "k_proj", "v_proj"))]

    def state_shapes(self, dtype: str) -> StateShapes:
        """Each head's ``[Dv, Dk]`` sum, float32."""
        return (((self.heads, self.head_dim, self.head_dim), "float32"),)

    def layer(self, ops: Any, tensor: Callable[[str], Any], projection: Callable[[str], Any],
              eps: float) -> LightningLayer:
        return LightningLayer(self, ops, tensor, projection, eps)


class LightningLayer:
    """One layer's placed weights and its three steps: projections (compilable), the recurrence over the batch's
    states, the norm, gate and output projection (compilable)."""

    def __init__(self, spec: LightningSpec, ops: Any, tensor: Callable[[str], Any], projection: Callable[[str], Any],
                 eps: float):
        from ferrum.arch.tensors import projection_group  # imported here: ferrum.arch reads the mixers' specs
        from ferrum.reference_ops import dtype_name  # imported here: the reference ops import the families

        self.spec, self.ops, self.eps = spec, ops, eps
        self.qkv = projection_group(ops, tensor, projection, f"{MODULE}.qkv_proj", (spec.width,) * 3)
        self.gate, self.out = projection(f"{MODULE}.{spec.gate}"), projection(f"{MODULE}.{spec.out}")
        self.norm, self.a_log = tensor(f"{MODULE}.{spec.norm}.weight"), tensor(A_LOG)
        self.qk_norms = [tensor(f"{MODULE}.{n}.weight") for n in ("q_norm", "k_norm")] if spec.qk_norm else None
        self.zeros = ops.from_numpy(np.zeros(spec.heads, dtype=np.float32), "float32")  # no skip, no step bias
        self.dtype = dtype_name(self.norm)
        group = spec.width // spec.norm_groups
        # a grouped norm: each group normed without weights (times ones), then all times the norm's weight
        self.ones = ops.from_numpy(np.ones(group, dtype=np.float32), self.dtype) if spec.norm_groups > 1 else None

    def projections(self) -> list[Any]:
        return [*self.qkv.linears, self.gate, self.out]

    def project(self, x: Any, positions: Any, table: Any) -> tuple[Any, ...]:
        """``x -> (q, k, v, gate)``: q, k and v per head (through their SiLU, q and k normed, rotated by ``table``
        at ``positions`` and the queries scaled where the spec says), the output gate's input."""
        ops, s = self.ops, self.spec
        q, k, v = (ops.reshape(t, (-1, s.heads, s.head_dim)) for t in self.qkv(x))
        if s.silu:
            q, k, v = (ops.sigmoid_mul(t, t) for t in (q, k, v))
        if self.qk_norms is not None:
            q, k = (ops.rms_norm(t, w, self.eps) for t, w in zip((q, k), self.qk_norms))
        if s.rotated:
            q, k = ops.rope(q, positions, table), ops.rope(k, positions, table)
        if s.query_scale != 1.0:
            q = ops.mul_scalar(q, s.query_scale)
        return q, k, v, self.gate(x)

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
        """All heads' outputs RMS-normed as one (or in groups), times the sigmoid of the gate, projected."""
        ops, s = self.ops, self.spec
        eps = self.eps if s.norm_eps is None else s.norm_eps
        if self.ones is None:
            normed = ops.rms_norm(ops.reshape(out, (-1, s.width)), self.norm, eps)
        else:
            grouped = ops.rms_norm(ops.reshape(out, (-1, s.width // s.norm_groups)), self.ones, eps)
            normed = ops.mul(ops.reshape(grouped, (-1, s.width)), self.norm)
        return self.out(ops.sigmoid_mul(gate, normed))
