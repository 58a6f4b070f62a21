"""The MLP slot of a block: each kind names its checkpoint tensors and builds the callable the forward pass runs.

A layer's ``LayerSpec.mlp`` picks the kind. A kind provides
``tensors(config, layer) -> {name: shape}`` (names relative to the layer's
prefix, as stored in the checkpoint), ``split(config, name, tensor)`` (host
tensors -> the tensors its ``build`` reads, for fused checkpoint layouts) and
``build(ops, tensor, linear, config, layer) -> mlp`` (``tensor`` / ``linear``
read the layer's placed weights, fused where :class:`ferrum.arch.tensors.Fuser`
fused them) where ``mlp(x)`` maps
``[T, hidden] -> [T, hidden]`` and ``mlp.projections()`` lists its linears.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np

from ferrum.arch.linear_blocks import LinearMlp
from ferrum.arch.norms import NORM_KINDS, SUB_NORMS, norms_dtype
from ferrum.arch.rowwise import gaussian_top_k
from ferrum.moe.beside import DenseAndShortcut, DenseBesideMoe
from ferrum.moe.kind import Moe
from ferrum.reference_ops import dtype_name

if TYPE_CHECKING:
    from ferrum.weights import Linear, Projections

ACTIVATION_OPS = {"silu": "silu_mul", "gelu_tanh": "gelu_tanh_mul"}
#: The ungated MLP's activations: name -> ``act(ops, x)``.
PLAIN_ACTIVATIONS: dict[str, Callable[[Any, Any], Any]] = {
    "gelu_tanh": lambda ops, x: ops.gelu(x, True),
    "gelu": lambda ops, x: ops.gelu(x, False),
    "relu": lambda ops, x: ops.relu(x),  # OPT
    "relu2": lambda ops, x: ops.relu_squared(x),  # Nemotron, Arcee
}


#: Apertus's xIELU: its learned parameters, one value each, in every layer's ``mlp.act_fn`` (transformers stores
#: alpha_p and alpha_n as ``[1]``, beta and eps as scalars; mlx-lm squeezes them all to scalars).
XIELU_PARAMS = {"alpha_p": (1,), "alpha_n": (1,), "beta": (), "eps": ()}


def _softplus(x: np.ndarray) -> np.ndarray:
    """torch's softplus (threshold 20: the input itself above it), in float32."""
    x = np.asarray(x, dtype=np.float32)
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))


def xielu_slopes(ops: Any, tensor: Callable[[str], Any]) -> tuple[float, float, float, float]:
    """``(alpha_p, alpha_n, beta, eps)`` for :func:`ferrum.hookspec.xielu` from a layer's stored parameters, as
    transformers' XIELUActivation derives them in the model's dtype: ``softplus(alpha_p)`` and ``beta +
    softplus(alpha_n)``, each softplus and the sum rounded to that dtype."""
    placed = {name: tensor(f"mlp.act_fn.{name}") for name in XIELU_PARAMS}
    dtype = dtype_name(placed["beta"])

    def value(x: Any) -> np.float32:
        return np.asarray(ops.to_numpy(x), dtype=np.float32).reshape(-1)[0]

    def rounded(x: np.ndarray) -> np.float32:
        return value(ops.from_numpy(np.asarray(x, dtype=np.float32).reshape(1), dtype))

    beta, eps = value(placed["beta"]), value(placed["eps"])
    alpha_p = rounded(_softplus(value(placed["alpha_p"])))
    alpha_n = rounded(beta + rounded(_softplus(value(placed["alpha_n"]))))
    return float(alpha_p), float(alpha_n), float(beta), float(eps)


def gated_activation(ops: Any, name: str) -> Callable[[Any, Any], Any]:
    """``act(gate, up)`` of the gated MLP: the backend's fused op where there is one, else ``act(gate) * up``
    (BitNet's squared ReLU)."""
    if name in ACTIVATION_OPS:
        return getattr(ops, ACTIVATION_OPS[name])
    act = PLAIN_ACTIVATIONS[name]
    return lambda gate, up: ops.mul(act(ops, gate), up)


def width(config: Any, layer: int) -> int:
    """Layer ``layer``'s gated MLP width: its own (``LayerSpec.intermediate_size``) or the model's."""
    return config.arch.layers[layer].intermediate_size or config.intermediate_size


class MlpKind(Protocol):
    def tensors(self, config: Any, layer: int) -> dict[str, tuple[int, ...]]: ...

    def split(self, config: Any, name: str, tensor: Any) -> list[tuple[str, Any]]: ...

    def build(self, ops: Any, tensor: Callable[[str], Any], linear: Callable[[str], Linear],
              config: Any, layer: int) -> Any: ...

    def adapt(self, mlp: Any, wrap: Callable[[str, int, int, Linear], Linear], config: Any, layer: int) -> None:
        """The built ``mlp``'s matrices LoRA adapts replaced by ``wrap(group, start, stop, matrix)`` (as
        ``Architecture.attention.adapt`` replaces attention's); a kind with none adapts nothing."""


class GatedMLP:
    """``down(act(gate(x)) * up(x))``; the activation op comes from the architecture, and BitNet's sub-norm
    (``norm``, None elsewhere) comes between it and ``down``.

    ``gate_up`` gives gate's and up's outputs, from one fused matrix or two (:class:`~ferrum.weights.Projections`).
    """

    __slots__ = ("gate_up", "down", "act", "norm")

    def __init__(self, gate_up: Projections, down: Linear, act: Callable[[Any, Any], Any],
                 norm: Callable[[Any], Any] | None = None):
        self.gate_up, self.down, self.act, self.norm = gate_up, down, act, norm

    def __call__(self, x: Any) -> Any:
        gate, up = self.gate_up(x)
        hidden = self.act(gate, up)
        return self.down(hidden if self.norm is None else self.norm(hidden))

    def projections(self) -> list[Linear]:
        return [*self.gate_up.linears, self.down]


class Dense:
    """The gated MLP, stored as gate_proj / up_proj / down_proj or (Phi-3) fused gate_up_proj."""

    def tensors(self, config: Any, layer: int) -> dict[str, tuple[int, ...]]:
        arch, h, inter = config.arch, config.hidden_size, width(config, layer)
        if arch.fused_gate_up:
            shapes = {"mlp.gate_up_proj.weight": (2 * inter, h)}
        else:
            shapes = {"mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h)}
        shapes["mlp.down_proj.weight"] = (h, inter)
        if arch.sub_norms:
            shapes[f"{SUB_NORMS['mlp']}.weight"] = (inter,)
        if arch.mlp_bias:
            if arch.fused_gate_up:
                shapes["mlp.gate_up_proj.bias"] = (2 * inter,)
            else:
                shapes.update({"mlp.gate_proj.bias": (inter,), "mlp.up_proj.bias": (inter,)})
            shapes["mlp.down_proj.bias"] = (h,)
        return shapes

    def split(self, config: Any, name: str, tensor: Any) -> list[tuple[str, Any]]:
        """Phi-3's ``gate_up_proj`` holds the gate rows, then the up rows (each the layer's width); the other way
        round where ``Architecture.up_rows_first``."""
        from ferrum.arch.tensors import _layer_of, rows

        if ".gate_up_proj." not in name:
            return [(name, tensor)]
        inter = width(config, _layer_of(name, config.arch.prefix))
        first, second = ("up_proj", "gate_proj") if config.arch.up_rows_first else ("gate_proj", "up_proj")
        return [(name.replace("gate_up_proj", first), rows(tensor, 0, inter)),
                (name.replace("gate_up_proj", second), rows(tensor, inter, 2 * inter))]

    def adapt(self, mlp: GatedMLP, wrap: Callable[[str, int, int, Linear], Linear], config: Any, layer: int) -> None:
        mlp.gate_up.adapt(wrap)
        mlp.down = wrap("down_proj", 0, config.hidden_size, mlp.down)

    def build(self, ops: Any, tensor: Callable[[str], Any], linear: Callable[[str], Linear],
              config: Any, layer: int) -> GatedMLP:
        from ferrum.arch.tensors import projection_group

        arch, inter = config.arch, width(config, layer)
        own = arch.layers[layer].activations
        activation = arch.activation if own is None else own[1] or "silu"  # Step 3.5's, per layer
        act = (gated_activation(ops, activation) if isinstance(activation, str)
               else activation.composed(ops))  # a record: MiniMax-M3's clamped SwiGLU
        sparsity = arch.layers[layer].gate_sparsity
        if sparsity:  # Gemma 3n: the gate cut to its largest values first, in the dtype its norms are placed in
            act = gaussian_top_k(ops, act, inter, sparsity, norms_dtype(config, tensor, layer))
        gate_up = projection_group(ops, tensor, linear, "mlp.gate_up_proj", (inter, inter))
        norm = None
        if config.arch.sub_norms:
            norm = partial(NORM_KINDS[config.arch.norm](ops, config.rms_norm_eps)[0],
                           weights=(tensor(f"{SUB_NORMS['mlp']}.weight"), None))
        return GatedMLP(gate_up, linear("mlp.down_proj"), act, norm)


class UngatedMLP:
    """``down(act(up(x)))``."""

    __slots__ = ("up", "down", "act")

    def __init__(self, up: Linear, down: Linear, act: Callable[[Any], Any]):
        self.up, self.down, self.act = up, down, act

    def __call__(self, x: Any) -> Any:
        return self.down(self.act(self.up(x)))

    def projections(self) -> list[Linear]:
        return [self.up, self.down]


class Plain:
    """The ungated MLP (Phi-2's fc1 / fc2, StarCoder2's c_fc / c_proj, Nemotron's up_proj / down_proj), under
    Llama's names up_proj / down_proj (``Architecture.stored_names`` maps them to the checkpoint's); with xIELU
    (Apertus), its parameters beside them (:data:`XIELU_PARAMS`)."""

    def tensors(self, config: Any, layer: int) -> dict[str, tuple[int, ...]]:
        h, inter = config.hidden_size, config.intermediate_size
        shapes = {"mlp.up_proj.weight": (inter, h), "mlp.down_proj.weight": (h, inter)}
        if config.arch.mlp_bias:
            shapes.update({"mlp.up_proj.bias": (inter,), "mlp.down_proj.bias": (h,)})
        if config.arch.activation == "xielu":
            shapes.update({f"mlp.act_fn.{name}": shape for name, shape in XIELU_PARAMS.items()})
        return shapes

    def split(self, config: Any, name: str, tensor: Any) -> list[tuple[str, Any]]:
        return [(name, tensor)]

    def adapt(self, mlp: UngatedMLP, wrap: Callable[[str, int, int, Linear], Linear], config: Any,
              layer: int) -> None:
        mlp.up = wrap("up_proj", 0, config.intermediate_size, mlp.up)
        mlp.down = wrap("down_proj", 0, config.hidden_size, mlp.down)

    def build(self, ops: Any, tensor: Callable[[str], Any], linear: Callable[[str], Linear],
              config: Any, layer: int) -> UngatedMLP:
        if config.arch.activation == "xielu":  # Apertus: slopes learned per layer
            slopes = xielu_slopes(ops, tensor)
            return UngatedMLP(linear("mlp.up_proj"), linear("mlp.down_proj"), lambda x: ops.xielu(x, *slopes))
        act = PLAIN_ACTIVATIONS[config.arch.activation]
        return UngatedMLP(linear("mlp.up_proj"), linear("mlp.down_proj"), lambda x: act(ops, x))


class NoMlp:
    """No MLP: the block ends with its mixer (Nemotron-H's). It stores nothing and builds None."""

    def tensors(self, config: Any, layer: int) -> dict[str, tuple[int, ...]]:
        return {}

    def split(self, config: Any, name: str, tensor: Any) -> list[tuple[str, Any]]:
        return [(name, tensor)]

    def build(self, ops: Any, tensor: Callable[[str], Any], linear: Callable[[str], Linear],
              config: Any, layer: int) -> None:
        return None

    def adapt(self, mlp: None, wrap: Callable[[str, int, int, Linear], Linear], config: Any, layer: int) -> None:
        """Nothing to adapt."""


#: Kinds by name; ``LayerSpec.mlp`` picks one.
MLP_KINDS: dict[str, MlpKind] = {"dense": Dense(), "plain": Plain(), "moe": Moe(),
                                 "dense+moe": DenseBesideMoe(Dense(), Moe()),
                                 "dense+shortcut": DenseAndShortcut(Dense(), Moe()), "none": NoMlp(),
                                 "linear": LinearMlp()}
