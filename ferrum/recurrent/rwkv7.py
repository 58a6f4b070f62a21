"""RWKV-7 "Goose" (flash-linear-attention's ``RWKV7ForCausalLM``, as mlx-lm's ``rwkv7`` runs it): its time mix and
channel mix, the tensors each stores, their layout at load, and one layer's work around the ``wkv7`` op.

Ferrum runs each stored layer as two of its own (:class:`ferrum.arch.sublayers.SubLayers`): the time mix
(``attn``, after ``attn_norm``) and the channel mix (``ffn``, after ``ffn_norm``), each a recurrent mixer whose
block ends with it. Both read the previous token's input (token shift, :func:`token_shift`: the sequence's last
input carried as its state), mixed into the token's per channel (``x + (prev - x) * mu``). The time mix projects
the receptance, key and value, low-rank "LoRA" maps give the decay, the in-context learning rate, the output gate
and (past the first layer) how much of the first layer's values each value takes (the value residual: the first
layer hands its values on through the pass, :class:`ferrum.mixers.ValueResidual`); the recurrence is API 1.30's
``wkv7``; each head's output is LayerNormed (``g_norm``, mlx-lm's fixed epsilon 64e-5), gains the bonus ``(r . k *
r_k) v`` and the gate, then ``o_proj``. The channel mix is a squared-ReLU MLP (``key``, ``value``) on its mixed input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ferrum.recurrent.state import StateShapes

MODULE = "attn"
CHANNEL_MODULE = "ffn"
#: The token-shift mixes of the time mix's inputs, in the order :meth:`Rwkv7Layer.mix` reads them.
MIXES = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")
#: Each low-rank map -> (its activation between the two matrices, whether its second has a bias).
LORAS = {"w_lora": ("tanh", True), "a_lora": (None, True), "v_lora": (None, True), "g_lora": ("sigmoid", False)}
#: The decay's scale (mlx-lm's constant, ``exp(-0.5)`` rounded): ``w = -0.606531 * sigmoid(w_lora(x))``.
DECAY = 0.606531
#: The per-head output norm's epsilon (mlx-lm fixes it; the release's GroupNorm takes ``head_dim * norm_eps``).
GROUP_NORM_EPS = 64e-5
#: The plugin API from which a plugin's own ``wkv7`` is called.
SINCE = (1, 30)
#: The tensors kept in float32 whatever the compute dtype (mixes and per-head scales, read as they are).
FLOAT32 = (*(f".{name}" for name in MIXES), ".k_k", ".k_a", ".r_k")


def token_shift(ops: Any, x: Any, state: Any, cu_seqlens: np.ndarray) -> tuple[Any, Any]:
    """``(prev, new_state)``: each row's previous row in its segment (the segment's state, its sequence's last input
    before the pass, for its first), and each segment's last row. ``x [T, C]``, ``state [B, C]``."""
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    batch, tokens = len(cu) - 1, int(cu[-1])
    previous = np.arange(batch - 1, batch + tokens - 1, dtype=np.int32)  # row t reads x's row t - 1
    previous[cu[:-1][np.diff(cu) > 0]] = np.flatnonzero(np.diff(cu) > 0)  # a segment's first reads its state
    prev = ops.take_rows(ops.concat([state, x]), ops.from_numpy(previous, None))
    last = np.where(np.diff(cu) > 0, cu[1:] - 1 + batch, np.arange(batch))  # an empty segment keeps its state
    return prev, ops.take_rows(ops.concat([state, x]), ops.from_numpy(last.astype(np.int32), None))


def _minus(ops: Any, a: Any, b: Any) -> Any:
    """``a - b``."""
    return ops.add(a, ops.mul_scalar(b, -1.0))


class _Broadcast:
    """One pass's rows of a vector (``[W]`` tiled over its ``T`` tokens), for ops that take equal shapes."""

    def __init__(self, ops: Any, tokens: int):
        self.ops, self.index = ops, ops.from_numpy(np.zeros(tokens, dtype=np.int32), None)

    def rows(self, row: Any) -> Any:
        """``row [1, W]`` as ``[T, W]``."""
        return self.ops.take_rows(row, self.index)

    def sigmoid(self, x: Any, ones: Any) -> Any:
        """``sigmoid(x)`` of ``x [T, W]``, ``ones [1, W]``."""
        return self.ops.sigmoid_mul(x, self.rows(ones))


@dataclass(frozen=True)
class Rwkv7Spec:
    """The sizes of a model's time mix (head_dim, the four low ranks); ``first``: the first layer's, which hands its
    values on and has no ``v_lora``; ``per_head``: ``k_k``, ``k_a`` and ``g_norm`` stored ``[H, D]`` (mlx-lm's
    conversions) rather than ``[H * D]`` (the release's)."""

    heads: int
    head_dim: int
    decay_rank: int
    a_rank: int
    v_rank: int
    gate_rank: int
    first: bool = False
    per_head: bool = False

    module = MODULE
    title = "RWKV-7 time mix"  # what error messages call the mixer

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    @property
    def loras(self) -> dict[str, int]:
        """The layer's low-rank maps and their ranks."""
        ranks = {"w_lora": self.decay_rank, "a_lora": self.a_rank, "v_lora": self.v_rank, "g_lora": self.gate_rank}
        return {name: rank for name, rank in ranks.items() if name != "v_lora" or not self.first}

    def tensors(self, hidden: int) -> dict[str, tuple[int, ...]]:
        """A layer's tensors as stored, relative to the layer."""
        m, w = MODULE, self.width
        per_head = (self.heads, self.head_dim) if self.per_head else (w,)
        out = {**{f"{m}.{name}": (1, 1, hidden) for name in MIXES},
               **{f"{m}.{name}": per_head for name in ("k_k", "k_a")}, f"{m}.r_k": (self.heads, self.head_dim),
               **{f"{m}.{name}.weight": (w, hidden) for name in ("r_proj", "k_proj", "v_proj")},
               f"{m}.o_proj.weight": (hidden, w), f"{m}.g_norm.weight": per_head, f"{m}.g_norm.bias": per_head}
        for name, rank in self.loras.items():
            out.update({f"{m}.{name}.lora.0.weight": (rank, hidden), f"{m}.{name}.lora.2.weight": (w, rank)})
            if LORAS[name][1]:
                out[f"{m}.{name}.lora.2.bias"] = (w,)
        return out

    def split(self, name: str, tensor: Any, take_rows: Callable[[Any, np.ndarray], Any]) -> list[tuple[str, Any]]:
        """The mixes as vectors ``[hidden]``; ``k_k``, ``k_a`` and ``g_norm`` per head ``[H, D]`` (as mlx-lm's
        sanitize lays them out)."""
        tail = name.rsplit(".", 1)[-1]
        if tail in MIXES:
            return [(name, np.asarray(tensor).reshape(-1))]
        if tail in ("k_k", "k_a") or f".{MODULE}.g_norm." in name:
            return [(name, np.ascontiguousarray(np.asarray(tensor).reshape(self.heads, self.head_dim)))]
        return [(name, tensor)]

    def state_shapes(self, dtype: str) -> StateShapes:
        """The last input (token shift, in the compute dtype) and the recurrent matrix (float32)."""
        return (((self.width,), dtype), ((self.heads, self.head_dim, self.head_dim), "float32"))

    def layer(self, ops: Any, tensor: Callable[[str], Any], projection: Callable[[str], Any],
              eps: float) -> Rwkv7Layer:
        return Rwkv7Layer(self, ops, tensor, projection)


def runs_natively(ops: Any) -> bool:
    """Whether a layer calls the plugin's own ``wkv7``: only where it declares API 1.30 (asked once, at build)."""
    from ferrum.backends import declared_version  # imported here: ferrum.backends loads the plugins

    return "wkv7" in ops.native and declared_version(ops.info) >= SINCE


class Rwkv7Layer:
    """One time mix's placed weights and its steps: the normed input handed on (the first half), the token shift,
    projections and recurrence over the batch's states (the step), the per-head norm, bonus, gate and ``o_proj``
    (the second half)."""

    def __init__(self, spec: Rwkv7Spec, ops: Any, tensor: Callable[[str], Any], projection: Callable[[str], Any]):
        from ferrum.reference_ops import dtype_name
        from ferrum.weights import Linear, place

        m, d = MODULE, spec.head_dim
        self.spec, self.ops = spec, ops
        self.mixes = [tensor(f"{m}.{name}") for name in MIXES]
        self.k_k, self.k_a, self.r_k = (tensor(f"{m}.{name}") for name in ("k_k", "k_a", "r_k"))
        self.r, self.k, self.v, self.out = (projection(f"{m}.{name}") for name in ("r_proj", "k_proj", "v_proj",
                                                                                    "o_proj"))
        self.loras = {name: (projection(f"{m}.{name}.lora.0"), projection(f"{m}.{name}.lora.2")) for name in spec.loras}
        self.norm_weight, self.norm_bias = tensor(f"{m}.g_norm.weight"), tensor(f"{m}.g_norm.bias")
        dtype = dtype_name(self.norm_weight)
        ones = np.ones((1, max(spec.width, spec.gate_rank)), dtype=np.float32)
        self.ones = {w: ops.from_numpy(ones[:, :w], dtype) for w in {spec.width, spec.gate_rank}}
        # placed from the host, not reshaped on the device: a lazy MLX reshape made at load stays tied to the loading
        # thread's stream, and the engine's thread (ferrum serve, astream) could not evaluate it
        self.bias_row = ops.from_numpy(np.asarray(ops.to_numpy(self.norm_bias)).reshape(1, spec.width), dtype)
        # the L2 norm over a head as an RMSNorm: x / sqrt(|x|^2 + 1e-14), mlx-lm's x / max(|x|, 1e-7) but below 1e-7
        self.unit = ops.from_numpy(np.full(d, 1.0 / math.sqrt(d), dtype=np.float32), dtype)
        # a head's sum (the bonus's r . k) and its spread over the head's dims, as products with ones
        self.head_sum = Linear(place(ops, f"{m}.head_sum", np.ones((1, d), np.float32), dtype))
        self.head_spread = Linear(place(ops, f"{m}.head_spread", np.ones((d, 1), np.float32), dtype))
        self.native = runs_natively(ops)

    def projections(self) -> list[Any]:
        return [self.r, self.k, self.v, self.out, *(p for pair in self.loras.values() for p in pair)]

    def project(self, x: Any) -> tuple[Any]:
        """The normed input: everything reads it shifted, which needs the batch's states."""
        return (x,)

    def _lora(self, name: str, x: Any, wide: _Broadcast) -> Any:
        down, up = self.loras[name]
        hidden = down(x)
        activation = LORAS[name][0]
        if activation == "tanh":
            hidden = self.ops.softcap(hidden, 1.0)
        elif activation == "sigmoid":
            hidden = wide.sigmoid(hidden, self.ones[self.spec.gate_rank])
        return up(hidden)

    def mix(self, inputs: tuple[Any], states: tuple[Any, Any], cu_seqlens: np.ndarray,
            first: Any) -> tuple[Any, tuple, tuple, Any]:
        """``(y [T, H, D], (r, k, v, gate, g_norm's bias rows), new states, the first layer's values)`` over a batch;
        ``first`` the values the first layer handed on (None in it). The given states are not changed."""
        ops, spec = self.ops, self.spec
        (x,) = inputs
        heads, d, tokens = spec.heads, spec.head_dim, int(cu_seqlens[-1])
        wide, ones = _Broadcast(ops, tokens), self.ones[spec.width]
        prev, shifted = token_shift(ops, x, states[0], cu_seqlens)
        xx = _minus(ops, prev, x)
        xr, xw, xk, xv, xa, xg = (ops.add(x, ops.mul(xx, mu)) for mu in self.mixes)

        def per_head(t: Any) -> Any:
            return ops.reshape(t, (tokens, heads, d))

        r, k, v = per_head(self.r(xr)), per_head(self.k(xk)), per_head(self.v(xv))
        iclr = per_head(wide.sigmoid(self._lora("a_lora", xa, wide), ones))
        gate = self._lora("g_lora", xg, wide)
        if first is None:
            first = v
        else:
            weight = per_head(wide.sigmoid(self._lora("v_lora", xv, wide), ones))
            v = ops.add(v, ops.mul(_minus(ops, first, v), weight))
        decay = per_head(ops.mul_scalar(wide.sigmoid(self._lora("w_lora", xw, wide), ones), -DECAY))
        kk = ops.reshape(ops.rms_norm(ops.reshape(ops.mul(k, self.k_k), (tokens * heads, d)), self.unit,
                                      1e-14 / d), (tokens, heads, d))
        k = ops.add(k, ops.mul(_minus(ops, ops.mul(k, iclr), k), self.k_a))
        wkv7 = ops.wkv7 if self.native else ops.fallback["wkv7"]
        y, state = wkv7(r, decay, k, v, ops.mul_scalar(kk, -1.0), ops.mul(kk, iclr), states[1], cu_seqlens)
        return y, (r, k, v, gate, wide.rows(self.bias_row)), (shifted, state), first

    def output(self, y: Any, r: Any, k: Any, v: Any, gate: Any, bias: Any) -> Any:
        """Each head LayerNormed (its own weight and bias), plus ``(r . k * r_k) v``, times the gate, ``o_proj``."""
        ops, spec = self.ops, self.spec
        flat = (-1, spec.head_dim)
        normed = ops.reshape(ops.layer_norm(ops.reshape(y, flat), None, None, GROUP_NORM_EPS),
                             (-1, spec.heads, spec.head_dim))
        normed = ops.add(ops.reshape(ops.mul(normed, self.norm_weight), (-1, spec.width)), bias)
        bonus = self.head_spread(self.head_sum(ops.reshape(ops.mul(ops.mul(r, k), self.r_k), flat)))
        bonus = ops.reshape(ops.mul(ops.reshape(v, flat), bonus), (-1, spec.width))
        return self.out(ops.mul(ops.add(normed, bonus), gate))


@dataclass(frozen=True)
class Rwkv7ChannelSpec:
    """The sizes of a model's channel mix (the stream's, its squared-ReLU MLP's)."""

    hidden: int
    width: int
    module = CHANNEL_MODULE
    title = "RWKV-7 channel mix"

    def tensors(self, hidden: int) -> dict[str, tuple[int, ...]]:
        m = CHANNEL_MODULE
        return {f"{m}.x_k": (hidden,), f"{m}.key.weight": (self.width, hidden),
                f"{m}.value.weight": (hidden, self.width)}

    def split(self, name: str, tensor: Any, take_rows: Callable[[Any, np.ndarray], Any]) -> list[tuple[str, Any]]:
        return [(name, tensor)]

    def state_shapes(self, dtype: str) -> StateShapes:
        """The last input (token shift)."""
        return (((self.hidden,), dtype),)

    def layer(self, ops: Any, tensor: Callable[[str], Any], projection: Callable[[str], Any],
              eps: float) -> Rwkv7ChannelLayer:
        return Rwkv7ChannelLayer(ops, tensor, projection)


class Rwkv7ChannelLayer:
    """One channel mix: the token shift over the batch's states (the step), then ``value(relu(key(x)) ** 2)``."""

    def __init__(self, ops: Any, tensor: Callable[[str], Any], projection: Callable[[str], Any]):
        m = CHANNEL_MODULE
        self.ops, self.mu = ops, tensor(f"{m}.x_k")
        self.key, self.value = projection(f"{m}.key"), projection(f"{m}.value")

    def projections(self) -> list[Any]:
        return [self.key, self.value]

    def project(self, x: Any) -> tuple[Any]:
        return (x,)

    def mix(self, inputs: tuple[Any], states: tuple[Any], cu_seqlens: np.ndarray) -> tuple[Any, tuple, tuple]:
        ops, (x,) = self.ops, inputs
        prev, shifted = token_shift(ops, x, states[0], cu_seqlens)
        return ops.add(x, ops.mul(_minus(ops, prev, x), self.mu)), (), (shifted,)

    def output(self, mixed: Any) -> Any:
        return self.value(self.ops.relu_squared(self.key(mixed)))
