"""The ``"dense+moe"`` MLP slot kind (see :mod:`ferrum.arch.mlp`): Gemma 4 26B-A4B's dense MLP and sparse MLP side
by side, both reading the layer's stream (``MoeSpec.beside_dense``)."""

from __future__ import annotations

from typing import Any, Callable

from ferrum.arch.norms import NORM_KINDS


class MlpBesideMoe:
    """``h [T, hidden] -> post(dense(pre(h))) + post_moe(moe(pre_moe(h), router_x=h))``: each branch between its own
    norms, the router reading ``h`` itself (through its own norm: :class:`ferrum.moe.block.MoeMLP`)."""

    __slots__ = ("ops", "norm", "dense", "moe", "norms")

    def __init__(self, ops: Any, norm: Callable[[Any, tuple], Any], dense: Any, moe: Any, norms: list[tuple]):
        self.ops, self.norm, self.dense, self.moe, self.norms = ops, norm, dense, moe, norms

    @property
    def experts(self) -> Any:
        """The sparse branch's experts (profilers wrap their ``apply``)."""
        return self.moe.experts

    def projections(self) -> list[Any]:
        return [*self.dense.projections(), *self.moe.projections()]

    def __call__(self, h: Any) -> Any:
        norm, (pre, post, pre_moe, post_moe) = self.norm, self.norms
        dense = norm(self.dense(norm(h, pre)), post)
        return self.ops.add(dense, norm(self.moe(norm(h, pre_moe), router_x=h), post_moe))


class DenseBesideMoe:
    """The layer's dense MLP (``dense``, the "dense" kind) and its sparse MLP (``moe``, the "moe" kind) with the four
    norms around them that ``MoeSpec.beside_dense`` names; the block's own ``pre_mlp`` norm is left out (each branch
    norms the stream itself) and its ``post_mlp`` norm follows the sum."""

    def __init__(self, dense: Any, moe: Any):
        self.dense, self.moe = dense, moe

    def tensors(self, config: Any, layer: int) -> dict[str, tuple[int, ...]]:
        norms = {f"{name}.weight": (config.hidden_size,) for name in config.arch.moe.beside_dense}
        return {**self.dense.tensors(config, layer), **norms, **self.moe.tensors(config, layer)}

    def split(self, config: Any, name: str, tensor: Any) -> list[tuple[str, Any]]:
        return [part for n, t in self.moe.split(config, name, tensor) for part in self.dense.split(config, n, t)]

    def build(self, ops: Any, tensor: Callable[[str], Any], linear: Callable[[str], Any], config: Any,
              layer: int) -> MlpBesideMoe:
        norm = NORM_KINDS[config.arch.norm](ops, config.rms_norm_eps)[0]
        norms = [(tensor(f"{name}.weight"), tensor(f"{name}.bias")) for name in config.arch.moe.beside_dense]
        return MlpBesideMoe(ops, norm, self.dense.build(ops, tensor, linear, config, layer),
                            self.moe.build(ops, tensor, linear, config, layer), norms)


class MlpAndShortcut:
    """``x -> (dense(x), moe(x))``, kept apart: the sparse output joins the stream a layer later."""

    __slots__ = ("dense", "moe")

    def __init__(self, dense: Any, moe: Any):
        self.dense, self.moe = dense, moe

    @property
    def experts(self) -> Any:
        """The sparse MLP's experts (profilers wrap their ``apply``)."""
        return self.moe.experts

    def projections(self) -> list[Any]:
        return [*self.dense.projections(), *self.moe.projections()]

    def __call__(self, x: Any) -> tuple[Any, Any]:
        return self.dense(x), self.moe(x)


class DenseAndShortcut:
    """The ``"dense+shortcut"`` MLP slot kind: LongCat-Flash's first sub-block, whose dense MLP (``dense``, the "dense"
    kind) and sparse MLP (``moe``, the "moe" kind) read the same normed input; the sparse output is the layer's
    shortcut (``LayerSpec.shortcut`` "give"), summed with the next sub-block's MLP output."""

    def __init__(self, dense: Any, moe: Any):
        self.dense, self.moe = dense, moe

    def tensors(self, config: Any, layer: int) -> dict[str, tuple[int, ...]]:
        return {**self.dense.tensors(config, layer), **self.moe.tensors(config, layer)}

    def split(self, config: Any, name: str, tensor: Any) -> list[tuple[str, Any]]:
        return [part for n, t in self.moe.split(config, name, tensor) for part in self.dense.split(config, n, t)]

    def build(self, ops: Any, tensor: Callable[[str], Any], linear: Callable[[str], Any], config: Any,
              layer: int) -> MlpAndShortcut:
        return MlpAndShortcut(self.dense.build(ops, tensor, linear, config, layer),
                              self.moe.build(ops, tensor, linear, config, layer))
