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

from typing import TYPE_CHECKING, Any, Callable, Protocol

from ferrum.moe.kind import Moe

if TYPE_CHECKING:
    from ferrum.weights import Linear, Projections

ACTIVATION_OPS = {"silu": "silu_mul", "gelu_tanh": "gelu_tanh_mul"}
#: The ungated MLP's activations: name -> ``act(ops, x)``.
PLAIN_ACTIVATIONS: dict[str, Callable[[Any, Any], Any]] = {
    "gelu_tanh": lambda ops, x: ops.gelu(x, True),
    "gelu": lambda ops, x: ops.gelu(x, False),
    "relu2": lambda ops, x: ops.relu_squared(x),  # Nemotron, Arcee
}


class MlpKind(Protocol):
    def tensors(self, config: Any, layer: int) -> dict[str, tuple[int, ...]]: ...

    def split(self, config: Any, name: str, tensor: Any) -> list[tuple[str, Any]]: ...

    def build(self, ops: Any, tensor: Callable[[str], Any], linear: Callable[[str], Linear],
              config: Any, layer: int) -> Any: ...


class GatedMLP:
    """``down(act(gate(x)) * up(x))``; the activation op comes from the architecture.

    ``gate_up`` gives gate's and up's outputs, from one fused matrix or two (:class:`~ferrum.weights.Projections`).
    """

    __slots__ = ("gate_up", "down", "act")

    def __init__(self, gate_up: Projections, down: Linear, act: Callable[[Any, Any], Any]):
        self.gate_up, self.down, self.act = gate_up, down, act

    def __call__(self, x: Any) -> Any:
        gate, up = self.gate_up(x)
        return self.down(self.act(gate, up))

    def projections(self) -> list[Linear]:
        return [*self.gate_up.linears, self.down]


class Dense:
    """The gated MLP, stored as gate_proj / up_proj / down_proj or (Phi-3) fused gate_up_proj."""

    def tensors(self, config: Any, layer: int) -> dict[str, tuple[int, ...]]:
        arch, h, inter = config.arch, config.hidden_size, config.intermediate_size
        if arch.fused_gate_up:
            shapes = {"mlp.gate_up_proj.weight": (2 * inter, h)}
        else:
            shapes = {"mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h)}
        shapes["mlp.down_proj.weight"] = (h, inter)
        if arch.mlp_bias:
            if arch.fused_gate_up:
                shapes["mlp.gate_up_proj.bias"] = (2 * inter,)
            else:
                shapes.update({"mlp.gate_proj.bias": (inter,), "mlp.up_proj.bias": (inter,)})
            shapes["mlp.down_proj.bias"] = (h,)
        return shapes

    def split(self, config: Any, name: str, tensor: Any) -> list[tuple[str, Any]]:
        """Phi-3's ``gate_up_proj`` holds the gate rows, then the up rows."""
        from ferrum.arch.tensors import rows

        if ".gate_up_proj." not in name:
            return [(name, tensor)]
        inter = config.intermediate_size
        return [(name.replace("gate_up_proj", "gate_proj"), rows(tensor, 0, inter)),
                (name.replace("gate_up_proj", "up_proj"), rows(tensor, inter, 2 * inter))]

    def build(self, ops: Any, tensor: Callable[[str], Any], linear: Callable[[str], Linear],
              config: Any, layer: int) -> GatedMLP:
        from ferrum.arch.tensors import projection_group

        act = getattr(ops, ACTIVATION_OPS[config.arch.activation])
        inter = config.intermediate_size
        gate_up = projection_group(ops, tensor, linear, "mlp.gate_up_proj", (inter, inter))
        return GatedMLP(gate_up, linear("mlp.down_proj"), act)


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
    Llama's names up_proj / down_proj (``Architecture.stored_names`` maps them to the checkpoint's)."""

    def tensors(self, config: Any, layer: int) -> dict[str, tuple[int, ...]]:
        h, inter = config.hidden_size, config.intermediate_size
        shapes = {"mlp.up_proj.weight": (inter, h), "mlp.down_proj.weight": (h, inter)}
        if config.arch.mlp_bias:
            shapes.update({"mlp.up_proj.bias": (inter,), "mlp.down_proj.bias": (h,)})
        return shapes

    def split(self, config: Any, name: str, tensor: Any) -> list[tuple[str, Any]]:
        return [(name, tensor)]

    def build(self, ops: Any, tensor: Callable[[str], Any], linear: Callable[[str], Linear],
              config: Any, layer: int) -> UngatedMLP:
        act = PLAIN_ACTIVATIONS[config.arch.activation]
        return UngatedMLP(linear("mlp.up_proj"), linear("mlp.down_proj"), lambda x: act(ops, x))


#: Kinds by name; ``LayerSpec.mlp`` picks one.
MLP_KINDS: dict[str, MlpKind] = {"dense": Dense(), "plain": Plain(), "moe": Moe()}
