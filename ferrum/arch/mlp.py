"""The MLP slot of a block: each kind names its checkpoint tensors and builds the callable the forward pass runs.

A layer's ``LayerSpec.mlp`` picks the kind. A kind provides
``tensors(config, layer) -> {name: shape}`` (names relative to the layer's
prefix, as stored in the checkpoint), ``split(config, name, tensor)`` (host
tensors -> the tensors its ``build`` reads, for fused checkpoint layouts) and
``build(ops, tensor, linear, config, layer) -> mlp`` where ``mlp(x)`` maps
``[T, hidden] -> [T, hidden]`` and ``mlp.projections()`` lists its linears.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol

from ferrum.moe.kind import Moe

if TYPE_CHECKING:
    from ferrum.weights import Linear

ACTIVATION_OPS = {"silu": "silu_mul", "gelu_tanh": "gelu_tanh_mul"}


class MlpKind(Protocol):
    def tensors(self, config: Any, layer: int) -> dict[str, tuple[int, ...]]: ...

    def split(self, config: Any, name: str, tensor: Any) -> list[tuple[str, Any]]: ...

    def build(self, ops: Any, tensor: Callable[[str], Any], linear: Callable[[str], Linear],
              config: Any, layer: int) -> Any: ...


class GatedMLP:
    """``down(act(gate(x)) * up(x))``; the activation op comes from the architecture."""

    __slots__ = ("gate", "up", "down", "act")

    def __init__(self, gate: Linear, up: Linear, down: Linear, act: Callable[[Any, Any], Any]):
        self.gate, self.up, self.down, self.act = gate, up, down, act

    def __call__(self, x: Any) -> Any:
        return self.down(self.act(self.gate(x), self.up(x)))

    def projections(self) -> list[Linear]:
        return [self.gate, self.up, self.down]


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
        act = getattr(ops, ACTIVATION_OPS[config.arch.activation])
        return GatedMLP(linear("mlp.gate_proj"), linear("mlp.up_proj"), linear("mlp.down_proj"), act)


#: Kinds by name; ``LayerSpec.mlp`` picks one.
MLP_KINDS: dict[str, MlpKind] = {"dense": Dense(), "moe": Moe()}
