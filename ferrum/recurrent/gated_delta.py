"""Gated DeltaNet (Qwen3-Next's, Qwen3.5's and OLMo Hybrid's "linear_attention" layers): the tensors it stores, how
they are laid out at load, and one layer's work around its two recurrent ops (``causal_conv1d``,
``gated_delta_rule``).

Four checkpoint layouts of the input projections: Qwen3.5's ``in_proj_qkv / in_proj_z / in_proj_b / in_proj_a``,
Qwen3-Next's ``in_proj_qkvz / in_proj_ba`` grouped per key head and Lara Mini's one ``in_proj`` (their rows one after
another), split at load into the former, and OLMo Hybrid's
one projection each (``q_proj``, ``k_proj``, ``v_proj``, ``g_proj`` for the output gate, ``b_proj``, ``a_proj``),
whose convolution taps are split at load into q's, k's and v's (a depthwise convolution is one per channel), each
then carrying a state of its own. The depthwise convolution's weight is stored ``[C, 1, K]`` by transformers and
``[C, K, 1]`` by mlx-lm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ferrum.recurrent.state import StateShapes

MODULE = "linear_attn"
#: The input projections the model reads, in the order their outputs are used.
INPUTS = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")
#: ...in OLMo Hybrid's layout (``GatedDeltaSpec.separate``), and the taps each of q, k and v is convolved with.
SEPARATE_INPUTS = ("q_proj", "k_proj", "v_proj", "g_proj", "b_proj", "a_proj")
SEPARATE_TAPS = ("q_conv1d", "k_conv1d", "v_conv1d")


def convolve_each(ops: Any, parts: tuple[Any, ...], taps: tuple[Any, ...], states: tuple[Any, ...],
                  cu_seqlens: np.ndarray) -> tuple[list[Any], list[Any]]:
    """Each of ``parts`` through its own SiLU-activated depthwise convolution from its own state: the outputs, the
    new states."""
    done = [ops.causal_conv1d(x, w, state, cu_seqlens, True) for x, w, state in zip(parts, taps, states)]
    return [y for y, _ in done], [state for _, state in done]


def joined_taps(name: str, present: Any) -> tuple[str, ...] | None:
    """Where checkpoint names ``present`` hold Gated DeltaNet taps ``name`` (``linear_attn.conv1d.weight``) cut in
    three, ``q_conv1d``, ``k_conv1d`` and ``v_conv1d`` (OLMo Hybrid's release, and transformers' save of it, which
    cuts them in three equal parts whatever q's, k's and v's widths), their names, to be joined in that order."""
    if not name.endswith(f".{MODULE}.conv1d.weight") or name in present:
        return None
    parts = tuple(name.replace(".conv1d.", f".{taps}.") for taps in SEPARATE_TAPS)
    return parts if all(part in present for part in parts) else None


def runs_natively(ops: Any, extended: bool, bounded: bool = False) -> bool:
    """Whether a layer runs the plugin's own ``gated_delta_rule``: always where it needs nothing of API 1.20, and
    where it is ``extended`` (a per-key-channel gate or ``beta_scale``) only if the plugin declares 1.20 and its
    implementation takes ``beta_scale``, where ``bounded`` (API 1.27's ``lower_bound``) only if it declares 1.27
    and takes that; else the core's fallback. Asked once, when the layer is built."""
    from ferrum.backends import declared_version  # imported here: ferrum.backends loads the plugins

    needs = [((1, 20), "beta_scale")] * (extended or bounded) + [((1, 27), "lower_bound")] * bounded
    return all(declared_version(ops.info) >= since and ops.accepts("gated_delta_rule", arg) for since, arg in needs)


def gated_delta_rule(ops: Any, native: bool) -> Any:
    """The ``gated_delta_rule`` to call: the plugin's own where ``native`` (:func:`runs_natively`), else the core's
    fallback (looked up at each call, so that the op ``ops`` holds then is the one run)."""
    return ops.gated_delta_rule if native else ops.fallback["gated_delta_rule"]


@dataclass(frozen=True)
class GatedDeltaSpec:
    """The sizes of a model's Gated DeltaNet layers and the layout their tensors are stored in."""

    num_k_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int
    conv_kernel: int
    grouped: bool = False  # Qwen3-Next's in_proj_qkvz / in_proj_ba, grouped per key head
    fused: bool = False  # Lara Mini's one in_proj, rows [qkv | z | b | a]
    conv_last: bool = False  # mlx-lm's conv1d weight [C, K, 1] (transformers': [C, 1, K])
    separate: bool = False  # OLMo Hybrid's projections (SEPARATE_INPUTS), its output norm o_norm, out o_proj
    beta_scale: float = 1.0  # OLMo Hybrid's allow_neg_eigval: beta = 2 * sigmoid(b)
    norm_eps: float | None = None  # the gated norm's epsilon where not rms_norm_eps (OLMo Hybrid's: FLA's 1e-5)

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
        if self.separate:
            kd, vd = self.key_dim, self.value_dim
            sizes = dict(zip(SEPARATE_INPUTS, (kd, kd, vd, vd, hv, hv)))
            inputs = {f"{m}.{name}.weight": (rows, hidden) for name, rows in sizes.items()}
            conv = (self.conv_dim, self.conv_kernel, 1) if self.conv_last else (self.conv_dim, 1, self.conv_kernel)
            return {**inputs, f"{m}.conv1d.weight": conv, f"{m}.dt_bias": (hv,), f"{m}.A_log": (hv,),
                    f"{m}.o_norm.weight": (self.head_v_dim,), f"{m}.o_proj.weight": (hidden, self.value_dim)}
        if self.grouped:
            inputs = {f"{m}.in_proj_qkvz.weight": (self.conv_dim + self.value_dim, hidden),
                      f"{m}.in_proj_ba.weight": (2 * hv, hidden)}
        elif self.fused:
            inputs = {f"{m}.in_proj.weight": (self.conv_dim + self.value_dim + 2 * hv, hidden)}
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
            taps = np.ascontiguousarray(np.asarray(tensor).reshape(self.conv_dim, self.conv_kernel))
            if not self.separate:
                return [(name, taps)]
            bounds = np.cumsum([0, self.key_dim, self.key_dim, self.value_dim])
            return [(name.replace(".conv1d.", f".{part}."), np.ascontiguousarray(taps[lo:hi]))
                    for part, lo, hi in zip(SEPARATE_TAPS, bounds[:-1], bounds[1:])]
        r, dk, dv = self.num_v_heads // self.num_k_heads, self.head_k_dim, self.head_v_dim
        if ".in_proj_qkvz." in name:  # per key head: q (dk), k (dk), v (r * dv), z (r * dv)
            rows = np.arange(self.conv_dim + self.value_dim).reshape(self.num_k_heads, 2 * dk + 2 * r * dv)
            parts = {"in_proj_qkv": np.concatenate([rows[:, :dk].ravel(), rows[:, dk:2 * dk].ravel(),
                                                    rows[:, 2 * dk:2 * dk + r * dv].ravel()]),
                     "in_proj_z": rows[:, 2 * dk + r * dv:].ravel()}
            return [(name.replace("in_proj_qkvz", part), take_rows(tensor, order)) for part, order in parts.items()]
        if f".{MODULE}.in_proj." in name:  # qkv, z, b, a one after another
            bounds = np.cumsum([0, self.conv_dim, self.value_dim, self.num_v_heads, self.num_v_heads])
            return [(name.replace(".in_proj.", f".{part}."), take_rows(tensor, np.arange(lo, hi)))
                    for part, lo, hi in zip(INPUTS, bounds[:-1], bounds[1:])]
        if ".in_proj_ba." in name:  # per key head: b (r), a (r)
            rows = np.arange(2 * self.num_v_heads).reshape(self.num_k_heads, 2 * r)
            return [(name.replace("in_proj_ba", "in_proj_b"), take_rows(tensor, rows[:, :r].ravel())),
                    (name.replace("in_proj_ba", "in_proj_a"), take_rows(tensor, rows[:, r:].ravel()))]
        return [(name, tensor)]

    def state_shapes(self, dtype: str) -> StateShapes:
        """The convolution's last inputs (in the compute dtype; q's, k's and v's apart in the separate layout) and the
        recurrent matrix (float32)."""
        widths = (self.key_dim, self.key_dim, self.value_dim) if self.separate else (self.conv_dim,)
        return (*(((width, self.conv_kernel - 1), dtype) for width in widths),
                ((self.num_v_heads, self.head_k_dim, self.head_v_dim), "float32"))

    def layer(self, ops: Any, tensor: Callable[[str], Any], projection: Callable[[str], Any], eps: float) -> Any:
        return GatedDeltaLayer(self, ops, tensor, projection, eps)


class GatedDeltaLayer:
    """One layer's placed weights and its three steps: projections (compilable), the recurrent ops over the
    batch's states, and the gated norm and output projection (compilable)."""

    def __init__(self, spec: GatedDeltaSpec, ops: Any, tensor: Callable[[str], Any], projection: Callable[[str], Any],
                 eps: float):
        self.spec, self.ops, self.eps = spec, ops, eps if spec.norm_eps is None else spec.norm_eps
        separate = spec.separate
        self.inputs = [projection(f"{MODULE}.{name}") for name in (SEPARATE_INPUTS if separate else INPUTS)]
        self.out = projection(f"{MODULE}.{'o_proj' if separate else 'out_proj'}")
        self.taps = tuple(tensor(f"{MODULE}.{name}.weight") for name in (SEPARATE_TAPS if separate else ("conv1d",)))
        self.a_log, self.dt_bias = tensor(f"{MODULE}.A_log"), tensor(f"{MODULE}.dt_bias")
        self.norm = tensor(f"{MODULE}.{'o_norm' if separate else 'norm'}.weight")
        self.extended = spec.beta_scale != 1.0
        self.native = runs_natively(ops, self.extended)

    def projections(self) -> list[Any]:
        return [*self.inputs, self.out]

    def project(self, x: Any) -> tuple[Any, ...]:
        """``x -> (qkv, b, a, z)``: the convolution's input (q, k and v apart in the separate layout), the gates'
        inputs, the output gate."""
        *qkv, z, b, a = (p(x) for p in self.inputs)
        return *qkv, b, a, z

    def mix(self, inputs: tuple[Any, ...], states: tuple[Any, Any], cu_seqlens: np.ndarray) -> tuple[Any, tuple, tuple]:
        """The recurrent part over a batch: ``(core [T, Hv, Dv], (z,), new states)``; the given states are not
        changed."""
        ops, s = self.ops, self.spec
        *qkv, b, a, z = inputs
        mixed, conv_states = convolve_each(ops, tuple(qkv), self.taps, states[:-1], cu_seqlens)
        q, k, v = mixed if s.separate else ops.split(mixed[0], (s.key_dim, s.key_dim, s.value_dim))
        q = ops.reshape(q, (-1, s.num_k_heads, s.head_k_dim))
        k = ops.reshape(k, (-1, s.num_k_heads, s.head_k_dim))
        v = ops.reshape(v, (-1, s.num_v_heads, s.head_v_dim))
        rule = gated_delta_rule(ops, self.native)
        args = (q, k, v, a, b, self.a_log, self.dt_bias, states[-1], cu_seqlens)
        core, recurrent = rule(*args, s.beta_scale) if self.extended else rule(*args)
        return core, (z,), (*conv_states, recurrent)

    def output(self, core: Any, z: Any) -> Any:
        """RMSNorm of each head's output (a weight of its own, no offset), times SiLU of its gate, projected."""
        ops, dv = self.ops, self.spec.head_v_dim
        normed = ops.rms_norm(ops.reshape(core, (-1, dv)), self.norm, self.eps)
        gated = ops.silu_mul(ops.reshape(z, (-1, dv)), normed)
        return self.out(ops.reshape(gated, (-1, self.spec.value_dim)))
