"""Stacked expert weights: their host forms, and placing one stacked projection on a backend."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ferrum.errors import CheckpointError
from ferrum.moe.activation import ExpertActivation
from ferrum.quant.affine import FloatCodes, QuantizedWeight
from ferrum.hookspec import DTYPE_BYTES
from ferrum.weights import Placed, place, runs_natively


class StackedQuantized:
    """Packed affine experts with a leading expert axis, as mlx-lm's quantized ``SwitchLinear`` stores them.

    ``packed`` uint32 ``[E, N, K * bits / 32]``, ``scales``/``biases`` ``[E, N, K / group_size]``;
    expert ``e`` is the ordinary :class:`~ferrum.quant.QuantizedWeight` of ``[N, K]``. ``float_codes``, where
    set, stacks the experts' float-mode codes the same way (see ``QuantizedWeight.float_codes``).
    """

    __slots__ = ("bits", "group_size", "float_codes", "_parts", "_build", "_shape")

    def __init__(self, packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group_size: int,
                 float_codes: FloatCodes | None = None):
        self.bits, self.group_size, self.float_codes = bits, group_size, float_codes
        self._parts, self._build = (packed, scales, biases), None
        shapes = (packed.shape, scales.shape, biases.shape)
        if any(len(s) != 3 for s in shapes) or len({s[0] for s in shapes}) != 1:
            raise CheckpointError(f"stacked quantized experts need 3-D packed/scales/biases over one expert axis, "
                                  f"got {shapes}")
        self._shape = (packed.shape[0], *self.expert(0).shape)  # validates the per-expert form

    @classmethod
    def deferred(cls, build: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]], shape: tuple[int, int, int],
                 bits: int, group_size: int, float_codes: FloatCodes) -> "StackedQuantized":
        """Experts loaded in a float mode whose affine form ``build()`` makes on first use: a backend with
        kernels for the mode runs ``float_codes`` and never needs it (gpt-oss-20b's: ~1 min of a load)."""
        stack = cls.__new__(cls)
        stack.bits, stack.group_size, stack.float_codes = bits, group_size, float_codes
        stack._parts, stack._build, stack._shape = None, build, shape
        return stack

    def _affine(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._parts is None:
            self._parts, self._build = self._build(), None
        return self._parts

    @property
    def packed(self) -> np.ndarray:
        return self._affine()[0]

    @property
    def scales(self) -> np.ndarray:
        return self._affine()[1]

    @property
    def biases(self) -> np.ndarray:
        return self._affine()[2]

    @property
    def num_experts(self) -> int:
        return self._shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """The dense stack's ``(E, N, K)``."""
        return self._shape

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self._affine())

    @classmethod
    def of(cls, experts: list[QuantizedWeight], float_codes: FloatCodes | None = None) -> "StackedQuantized":
        """Matrices of one format, one per expert, stacked."""
        return cls(*(np.stack([getattr(e, part) for e in experts]) for part in ("packed", "scales", "biases")),
                   experts[0].bits, experts[0].group_size, float_codes)

    def expert(self, e: int) -> QuantizedWeight:
        codes = None if self.float_codes is None else self.float_codes.take_rows(e)  # expert e's [N, ...] codes
        packed, scales, biases = self._affine()
        return QuantizedWeight(packed[e], scales[e], biases[e], self.bits, self.group_size, codes)


HostExperts = np.ndarray | StackedQuantized


def is_stack(tensor: Any) -> bool:
    """Whether a host tensor is a stack of experts rather than one matrix."""
    return isinstance(tensor, StackedQuantized) or getattr(tensor, "ndim", 0) == 3


class ReferenceStack:
    """The core's form of one stacked projection: each expert's matrix placed as an ordinary weight.

    Quantized experts then take the backend's ``quantized_linear`` where it runs
    their format, else the host reference; float ones the dense ``linear``.
    """

    __slots__ = ("experts", "dtype")

    def __init__(self, ops: Any, name: str, stack: HostExperts, dtype: str):
        one = stack.expert if isinstance(stack, StackedQuantized) else stack.__getitem__
        self.experts: list[Placed] = [place(ops, f"{name}.{e}", one(e), dtype) for e in range(stack.shape[0])]
        self.dtype = dtype

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.experts)

    def __call__(self, e: int, x: Any) -> Any:
        placed = self.experts[e]
        return placed.linear(x, placed.weight, None)


def place_experts(ops: Any, name: str, stack: HostExperts, dtype: str, needs: tuple[str, ...] = (),
                  since: tuple[int, int] = (1, 0)) -> Placed:
    """One stacked projection in the backend's own form when it runs MoE natively, takes this stack and
    the feature arguments its experts ``needs`` (``MoeSpec.needs``), and declares the plugin API ``since``
    (``MoeSpec.since``: what those arguments may hold), else the reference form; ``Placed.linear`` then holds
    the ``moe_experts`` implementation for it."""
    from ferrum.backends import declared_version  # imported here: ferrum.backends loads the plugins

    native = "moe_experts" in ops.native and "upload_experts" in ops.native
    native = native and all(ops.accepts("moe_experts", arg) for arg in needs)
    native = native and declared_version(ops.info) >= since
    if native and isinstance(stack, StackedQuantized):
        native = runs_natively(ops, stack.bits, stack.group_size)
    if native:
        weight = ops.upload_experts(name, stack, dtype)
        if weight is not None:
            if hasattr(weight, "nbytes"):  # before the host stack's: asking a deferred one builds its affine form
                return Placed(weight, ops.moe_experts, _no_embedding, weight.nbytes)
            size = stack.nbytes if isinstance(stack, StackedQuantized) else stack.size * DTYPE_BYTES.get(dtype, 4)
            return Placed(weight, ops.moe_experts, _no_embedding, size)
    weight = ops.fallback["upload_experts"](name, stack, dtype)
    return Placed(weight, ops.fallback["moe_experts"], _no_embedding, weight.nbytes)


def _no_embedding(weight: Any, ids: Any) -> Any:
    raise CheckpointError("a stack of experts cannot serve as an embedding table")


class PlacedExperts:
    """One layer's three stacked projections (``gate`` None for ungated experts), their biases and activation where
    not plain SwiGLU, with the ``moe_experts`` implementation that takes them (bound once, like ``weights.Linear``;
    profilers wrap ``apply``)."""

    __slots__ = ("apply", "gate", "up", "down", "biases", "activation")

    def __init__(self, apply: Callable[..., Any], gate: Any, up: Any, down: Any, biases: Any = None,
                 activation: ExpertActivation | None = None):
        self.apply, self.gate, self.up, self.down = apply, gate, up, down
        self.biases, self.activation = biases, activation

    def __call__(self, x: Any, ids: Any, weights: Any, shared: Any = None) -> Any:
        return self.apply(x, ids, weights, self.gate, self.up, self.down, shared, self.biases, self.activation)
