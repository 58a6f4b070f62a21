"""A block's attention or MLP replaced by one square linear map of its normed input (DeciLM's
``replace_with_linear``: the Nemotron NAS models' searched-out sub-blocks, :mod:`ferrum.arch.families.heterogeneous`).

``LayerSpec.mixer`` "linear" (the map in place of attention: :class:`ferrum.mixers.LinearMixer`, which writes no K/V)
and ``LayerSpec.mlp`` "linear" (:class:`LinearMlp`) read these tensors, under the release's names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from ferrum.weights import Linear

#: The map in place of attention, and the one in place of the MLP, as the release's remote code names them.
ATTENTION, MLP = "self_attn.linear_attn", "mlp.linear_mlp"


def tensors(module: str, hidden: int) -> dict[str, tuple[int, ...]]:
    """The one weight of a linear sub-block (no bias: the release's maps have none)."""
    return {f"{module}.weight": (hidden, hidden)}


class LinearMap:
    """``linear(x)``: the MLP slot's callable."""

    __slots__ = ("linear",)

    def __init__(self, linear: Linear):
        self.linear = linear

    def __call__(self, x: Any) -> Any:
        return self.linear(x)

    def projections(self) -> list[Linear]:
        return [self.linear]


class LinearMlp:
    """The MLP kind "linear" (:data:`ferrum.arch.mlp.MLP_KINDS`)."""

    def tensors(self, config: Any, layer: int) -> dict[str, tuple[int, ...]]:
        return tensors(MLP, config.hidden_size)

    def split(self, config: Any, name: str, tensor: Any) -> list[tuple[str, Any]]:
        return [(name, tensor)]

    def build(self, ops: Any, tensor: Callable[[str], Any], linear: Callable[[str], Linear],
              config: Any, layer: int) -> LinearMap:
        return LinearMap(linear(MLP))

    def adapt(self, mlp: LinearMap, wrap: Callable[[str, int, int, Linear], Linear], config: Any,
              layer: int) -> None:
        """Nothing: an adapter has no name for the map (its projections are refused by what the sub-block is)."""
