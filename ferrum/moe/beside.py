"""MLP slot kinds (see :mod:`ferrum.arch.mlp`) holding a layer's dense MLP and its sparse MLP together:
``"dense+moe"``, Gemma 4 26B-A4B's side by side, both reading the layer's stream (``MoeSpec.beside_dense``), and
``"dense+shortcut"``, LongCat-Flash's, whose sparse output joins the stream a layer later."""

from __future__ import annotations

from typing import Any, Callable

from ferrum.arch.norms import NORM_KINDS


class _DenseAndMoeMlp:
    """A built dense MLP and sparse MLP, which profilers and adapters reach as one MLP's."""

    __slots__ = ("dense", "moe")

    def __init__(self, dense: Any, moe: Any):
        self.dense, self.moe = dense, moe

    @property
    def experts(self) -> Any:
        """The sparse MLP's experts (profilers wrap their ``apply``)."""
        return self.moe.experts

    def projections(self) -> list[Any]:
        return [*self.dense.projections(), *self.moe.projections()]


class _DenseAndMoe:
    """A slot kind of the layer's dense MLP (``dense``, the "dense" kind) and its sparse MLP (``moe``, the "moe"
    kind): their tensors, each split by both."""

    def __init__(self, dense: Any, moe: Any):
        self.dense, self.moe = dense, moe

    def tensors(self, config: Any, layer: int) -> dict[str, tuple[int, ...]]:
        return {**self.dense.tensors(config, layer), **self.moe.tensors(config, layer)}

    def split(self, config: Any, name: str, tensor: Any) -> list[tuple[str, Any]]:
        return [part for n, t in self.moe.split(config, name, tensor) for part in self.dense.split(config, n, t)]

    def adapt(self, mlp: Any, wrap: Callable[[str, int, int, Any], Any], config: Any, layer: int) -> None:
        """Nothing: LoRA on these layers' MLPs is not supported."""


class MlpBesideMoe(_DenseAndMoeMlp):
    """``h [T, hidden] -> post(dense(pre(h))) + post_moe(moe(pre_moe(h), router_x=h))``: each branch between its own
    norms, the router reading ``h`` itself (through its own norm: :class:`ferrum.moe.block.MoeMLP`)."""

    __slots__ = ("ops", "norm", "norms")

    def __init__(self, ops: Any, norm: Callable[[Any, tuple], Any], dense: Any, moe: Any, norms: list[tuple]):
        super().__init__(dense, moe)
        self.ops, self.norm, self.norms = ops, norm, norms

    def __call__(self, h: Any) -> Any:
        norm, (pre, post, pre_moe, post_moe) = self.norm, self.norms
        dense = norm(self.dense(norm(h, pre)), post)
        return self.ops.add(dense, norm(self.moe(norm(h, pre_moe), router_x=h), post_moe))


class DenseBesideMoe(_DenseAndMoe):
    """The ``"dense+moe"`` kind: the dense and sparse MLPs with the four norms around them that
    ``MoeSpec.beside_dense`` names; the block's own ``pre_mlp`` norm is left out (each branch norms the stream
    itself) and its ``post_mlp`` norm follows the sum."""

    def tensors(self, config: Any, layer: int) -> dict[str, tuple[int, ...]]:
        norms = {f"{name}.weight": (config.hidden_size,) for name in config.arch.moe.beside_dense}
        return {**self.dense.tensors(config, layer), **norms, **self.moe.tensors(config, layer)}

    def build(self, ops: Any, tensor: Callable[[str], Any], linear: Callable[[str], Any], config: Any,
              layer: int) -> MlpBesideMoe:
        norm = NORM_KINDS[config.arch.norm](ops, config.rms_norm_eps)[0]
        norms = [(tensor(f"{name}.weight"), tensor(f"{name}.bias")) for name in config.arch.moe.beside_dense]
        return MlpBesideMoe(ops, norm, self.dense.build(ops, tensor, linear, config, layer),
                            self.moe.build(ops, tensor, linear, config, layer), norms)


class MlpAndShortcut(_DenseAndMoeMlp):
    """``x -> (dense(x), moe(x))``, kept apart: the sparse output joins the stream a layer later."""

    __slots__ = ()

    def __call__(self, x: Any) -> tuple[Any, Any]:
        return self.dense(x), self.moe(x)


class DenseAndShortcut(_DenseAndMoe):
    """The ``"dense+shortcut"`` kind: LongCat-Flash's first sub-block, whose dense and sparse MLPs read the same
    normed input; the sparse output is the layer's shortcut (``LayerSpec.shortcut`` "give"), summed with the next
    sub-block's MLP output."""

    def build(self, ops: Any, tensor: Callable[[str], Any], linear: Callable[[str], Any], config: Any,
              layer: int) -> MlpAndShortcut:
        return MlpAndShortcut(self.dense.build(ops, tensor, linear, config, layer),
                              self.moe.build(ops, tensor, linear, config, layer))
