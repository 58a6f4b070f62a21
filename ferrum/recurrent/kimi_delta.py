"""Kimi Delta Attention (Kimi Linear's "linear_attention" layers, transformers' ``KimiLinearDeltaAttention``): the
tensors it stores, their layout at load, and one layer's work around its recurrent ops.

Gated DeltaNet with a decay per key channel rather than per head: ``H`` heads of ``D`` dims for queries, keys and
values alike; ``q_proj``, ``k_proj``, ``v_proj`` each through a SiLU-activated short convolution of its own
(``q_conv1d`` ...); the decay's input ``f_b_proj(f_a_proj(x))`` ``[H, D]`` with ``dt_bias [H * D]`` and ``A_log``
(one per head, stored ``[1, 1, H, 1]``), ``beta = sigmoid(b_proj(x))``, run by API 1.20's ``gated_delta_rule``
(:func:`ferrum.recurrent.gated_delta.gated_delta_rule`); each head's output RMS-normed (``o_norm``) times the sigmoid
of ``g_b_proj(g_a_proj(x))``, then ``o_proj``. Its module is the layer's ``self_attn``, as the full-attention layers'
is.

Ling 3 (``bailing_hybrid``, transformers' ``BailingHybridDeltaAttention``) runs the same layer with one projection
where Kimi has two (``f_proj`` for the decay's input, the output gate's), ``A_log`` stored ``[H]``, and, where
``kda_safe_gate``, its log-decay bounded below instead of softplus'd (API 1.27's ``lower_bound``):
:class:`KimiDeltaSpec`'s ``forget``, ``gate``, ``out`` and ``lower_bound`` say so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ferrum.recurrent.gated_delta import SEPARATE_TAPS, convolve_each, gated_delta_rule, runs_natively
from ferrum.recurrent.state import StateShapes

MODULE = "self_attn"
#: The fused taps' module in mlx-lm's kimi_k3 conversions (stored ``qkv_conv.conv``, renamed by the family).
FUSED_TAPS = "qkv_conv1d"
#: The input projections the model reads, in the order :meth:`KimiDeltaLayer.project` returns them.
INPUTS = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class KimiDeltaSpec:
    """The sizes of a model's Kimi Delta Attention layers (linear_attn_config's num_heads, head_dim,
    short_conv_kernel_size)."""

    heads: int
    head_dim: int
    conv_kernel: int
    conv_last: bool = False  # mlx-lm's taps [C, K, 1] (transformers': [C, 1, K])
    #: The projections the decay's input and the output gate go through, in order: Kimi's low-rank pairs, or Ling 3's
    #: one each (its output gate under the name its full-attention layers' per-head gate is read by).
    forget: tuple[str, ...] = ("f_a_proj", "f_b_proj")
    gate: tuple[str, ...] = ("g_a_proj", "g_b_proj")
    out: str = "o_proj"  # the output projection's name
    #: Ling 3's kda_safe_gate: the log-decay ``lower_bound * sigmoid(exp(A_log) * (f + dt_bias))``; None: Kimi's
    #: ``-exp(A_log) * softplus(f + dt_bias)``.
    lower_bound: float | None = None
    #: mlx-lm's kimi_k3 conversions: q/k/v stored as one ``qkv_proj`` ``[3C, hidden]`` and their taps as one
    #: ``qkv_conv1d`` ``[3C, K, 1]`` (split at load).
    fused: bool = False
    #: ``A_log``'s stored shape where the checkpoint's is not the family's: mlx-lm's kimi_k3 conversions' ``[H]``, or
    #: a release's longer ``[1, 1, H', 1]``, whose first ``H`` are read (as mlx-lm's kimi_k3 sanitize truncates it).
    a_log_shape: tuple[int, ...] | None = None

    module = MODULE
    title = "Kimi Delta Attention"  # what error messages call the mixer

    @property
    def taps(self) -> str:
        """The module whose stored shape tells the taps' layout."""
        return FUSED_TAPS if self.fused else SEPARATE_TAPS[0]

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    def tensors(self, hidden: int) -> dict[str, tuple[int, ...]]:
        """A layer's tensors as stored, relative to the layer."""
        m, w, d, h = MODULE, self.width, self.head_dim, self.heads
        c = 3 * w if self.fused else w  # the channels of each stored projection and its taps
        taps = (c, self.conv_kernel, 1) if self.conv_last else (c, 1, self.conv_kernel)
        low_rank = {2: ((d, hidden), (w, d)), 1: ((w, hidden),)}
        a_log = self.a_log_shape or ((1, 1, h, 1) if len(self.forget) == 2 else (h,))
        return {**{f"{m}.{name}.weight": (c, hidden) for name in (("qkv_proj",) if self.fused else INPUTS)},
                **{f"{m}.{name}.weight": taps for name in ((FUSED_TAPS,) if self.fused else SEPARATE_TAPS)},
                **{f"{m}.{name}.weight": shape for names in (self.forget, self.gate)
                   for name, shape in zip(names, low_rank[len(names)])},
                f"{m}.b_proj.weight": (h, hidden), f"{m}.A_log": a_log,
                f"{m}.dt_bias": (w,), f"{m}.o_norm.weight": (d,), f"{m}.{self.out}.weight": (hidden, w)}

    def split(self, name: str, tensor: Any, take_rows: Callable[[Any, np.ndarray], Any]) -> list[tuple[str, Any]]:
        """The taps ``[C, K]``, ``A_log [H]`` and ``dt_bias [H, D]`` as the ops read them; the projections as stored
        (an output projection named as the full-attention layers' is, ``o_proj``, where this layer's is ``out``:
        transformers' save of Ling 3 writes both ``attention.dense``)."""
        if self.out != "o_proj" and f".{MODULE}.o_proj." in name:
            return [(name.replace(f".{MODULE}.o_proj.", f".{MODULE}.{self.out}."), tensor)]
        if name.endswith(f".{FUSED_TAPS}.weight"):  # q's, k's and v's taps one after another
            taps = np.asarray(tensor).reshape(3, self.width, self.conv_kernel)
            return [(name.replace(FUSED_TAPS, own), np.ascontiguousarray(t)) for own, t in zip(SEPARATE_TAPS, taps)]
        if name.endswith(".A_log"):  # the first H (a longer stored one truncated, as mlx-lm's kimi_k3 does)
            return [(name, np.ascontiguousarray(np.asarray(tensor).reshape(-1)[: self.heads]))]
        shapes = {".dt_bias": (self.heads, self.head_dim)}
        shapes.update({f".{taps}.weight": (self.width, self.conv_kernel) for taps in SEPARATE_TAPS})
        shape = next((shape for end, shape in shapes.items() if name.endswith(end)), None)
        if shape is None:
            return [(name, tensor)]
        return [(name, np.ascontiguousarray(np.asarray(tensor).reshape(shape)))]

    def state_shapes(self, dtype: str) -> StateShapes:
        """q's, k's and v's convolutions' last inputs (in the compute dtype), and the recurrent matrix (float32)."""
        return (*(((self.width, self.conv_kernel - 1), dtype),) * 3,
                ((self.heads, self.head_dim, self.head_dim), "float32"))

    def layer(self, ops: Any, tensor: Callable[[str], Any], projection: Callable[[str], Any],
              eps: float) -> KimiDeltaLayer:
        return KimiDeltaLayer(self, ops, tensor, projection, eps)


class KimiDeltaLayer:
    """One layer's placed weights and its three steps: projections (compilable), the convolutions and the delta rule
    over the batch's states, the gated norm and output projection (compilable)."""

    def __init__(self, spec: KimiDeltaSpec, ops: Any, tensor: Callable[[str], Any], projection: Callable[[str], Any],
                 eps: float):
        from ferrum.arch.tensors import projection_group  # imported here: ferrum.arch reads the mixers' specs

        self.spec, self.ops, self.eps = spec, ops, eps
        # q, k and v read the same input: one matrix where the loader fused them (``self_attn.qkv_proj``)
        self.qkv = projection_group(ops, tensor, projection, f"{MODULE}.qkv_proj", (spec.width,) * 3)
        self.forget = [projection(f"{MODULE}.{name}") for name in spec.forget]
        self.gate = [projection(f"{MODULE}.{name}") for name in spec.gate]
        self.b, self.out = projection(f"{MODULE}.b_proj"), projection(f"{MODULE}.{spec.out}")
        self.taps = tuple(tensor(f"{MODULE}.{name}.weight") for name in SEPARATE_TAPS)
        self.a_log, self.dt_bias = tensor(f"{MODULE}.A_log"), tensor(f"{MODULE}.dt_bias")
        self.norm = tensor(f"{MODULE}.o_norm.weight")
        # its gate is per key channel; the bound (API 1.27) is asked for only where the model has one
        self.native = runs_natively(ops, True, spec.lower_bound is not None)
        self.bound = () if spec.lower_bound is None else (1.0, spec.lower_bound)  # beta_scale, lower_bound

    def projections(self) -> list[Any]:
        return [*self.qkv.linears, *self.forget, *self.gate, self.b, self.out]

    def project(self, x: Any) -> tuple[Any, ...]:
        """``x -> (q, k, v, f, b, g)``: the convolutions' inputs, the decay's and beta's inputs, the output gate."""
        return (*self.qkv(x), _through(self.forget, x), self.b(x), _through(self.gate, x))

    def mix(self, inputs: tuple[Any, ...], states: tuple[Any, ...],
            cu_seqlens: np.ndarray) -> tuple[Any, tuple[Any, ...], tuple[Any, ...]]:
        """``(core [T, H, D], (g,), new states)`` over a batch; the given states are not changed."""
        ops, heads, dim = self.ops, self.spec.heads, self.spec.head_dim
        q, k, v, f, b, g = inputs
        mixed, conv_states = convolve_each(ops, (q, k, v), self.taps, states[:3], cu_seqlens)
        q, k, v, f = (ops.reshape(t, (-1, heads, dim)) for t in (*mixed, f))
        core, recurrent = gated_delta_rule(ops, self.native)(q, k, v, f, b, self.a_log, self.dt_bias, states[3],
                                                            cu_seqlens, *self.bound)
        return core, (g,), (*conv_states, recurrent)

    def output(self, core: Any, g: Any) -> Any:
        """Each head's output RMS-normed (a weight of its own), times the sigmoid of its gate, projected."""
        ops, dim = self.ops, self.spec.head_dim
        normed = ops.rms_norm(ops.reshape(core, (-1, dim)), self.norm, self.eps)
        gated = ops.sigmoid_mul(ops.reshape(g, (-1, dim)), normed)
        return self.out(ops.reshape(gated, (-1, self.spec.width)))


def _through(projections: list[Any], x: Any) -> Any:
    """``x`` through each of ``projections`` in turn."""
    for projection in projections:
        x = projection(x)
    return x
