"""The norm kinds of a block: each gives the forward pass its ``norm`` and ``add_norm`` functions.

``Architecture.norm`` picks one. A norm's weights reach them as a ``(weight, bias)``
pair (bias None where the checkpoint has none), and a gated norm's as ``(weight, bias, gate)`` (:class:`NormGate`).
"""

from __future__ import annotations

import re
from typing import Any, Callable

from ferrum.recurrent.gated_delta import MODULE as GATED_DELTA

NormFns = tuple[Callable[[Any, tuple], Any], Callable[[Any, Any, tuple], tuple]]

#: A gated norm's low-rank gate, beside the norm's own ``<module>.norm`` (A.X-K2's, ``LayerSpec.gated_norms``).
NORM_GATE = ("W_down", "W_up")


def gate_modules(norm: str) -> tuple[str, str]:
    """The projections of the gate beside gated norm ``norm`` (``<module>.norm``): ``<module>.W_down`` [rank,
    hidden] and ``<module>.W_up`` [hidden, rank]."""
    module = norm.removesuffix(".norm")
    down, up = (f"{module}.{name}" for name in NORM_GATE)
    return down, up


class NormGate:
    """A.X-K2's gated RMSNorm after its norm (transformers' ``AXK2GatedRMSNorm``, Megatron's ``GatedNormWrapper``):
    ``y * sigmoid(W_up(silu(W_down(y))))`` of the normed ``y``, the sigmoid in float32 as transformers takes it;
    ``silu(a)`` is ``sigmoid_mul(a, a)``. It rides in a norm's weights as their third item (:func:`_gated`)."""

    __slots__ = ("ops", "down", "up", "linears")

    def __init__(self, ops: Any, down: Any, up: Any):
        self.ops, self.down, self.up, self.linears = ops, down, up, [down, up]

    def __call__(self, y: Any) -> Any:
        ops, a = self.ops, self.down(y)
        return ops.sigmoid_mul(self.up(ops.sigmoid_mul(a, a)), y)


def rms(ops: Any, eps: float) -> NormFns:
    """RMSNorm; the residual add fused where the backend fuses it (``add_rms_norm``)."""
    return (lambda x, weights: ops.rms_norm(x, weights[0], eps),
            lambda x, h, weights: ops.add_rms_norm(x, h, weights[0], eps))


def layer(ops: Any, eps: float) -> NormFns:
    """LayerNorm (Phi-2, StableLM, StarCoder2, GPT-2...), its bias where it has one."""
    def norm(x: Any, weights: tuple) -> Any:
        return ops.layer_norm(x, weights[0], weights[1], eps)

    def add_norm(x: Any, h: Any, weights: tuple) -> tuple:
        summed = ops.add(x, h)
        return norm(summed, weights), summed

    return norm, add_norm


#: BitNet's sub-norms (``Architecture.sub_norms``) in a layer: on attention's output, on the MLP's hidden layer.
SUB_NORMS = {"attn": "self_attn.attn_sub_norm", "mlp": "mlp.ffn_sub_norm"}

def _gated(kind: Callable[[Any, float], NormFns]) -> Callable[[Any, float], NormFns]:
    """``kind`` whose norms run the :class:`NormGate` their weights carry third, where they carry one."""
    def fns(ops: Any, eps: float) -> NormFns:
        norm, add_norm = kind(ops, eps)

        def gated_norm(x: Any, weights: tuple) -> Any:
            y = norm(x, weights)
            return y if len(weights) < 3 else weights[2](y)

        def gated_add_norm(x: Any, h: Any, weights: tuple) -> tuple:
            y, summed = add_norm(x, h, weights)
            return (y if len(weights) < 3 else weights[2](y)), summed

        return gated_norm, gated_add_norm

    return fns


#: Kinds by name: ``kind(ops, eps) -> (norm(x, weights), add_norm(x, h, weights) -> (norm(x + h), x + h))``.
NORM_KINDS: dict[str, Callable[[Any, float], NormFns]] = {"rms": _gated(rms), "layer": _gated(layer)}


def norms_dtype(config: Any, tensor: Callable[[str], Any], layer: int) -> str:
    """The dtype layer ``layer``'s norms are placed in (the compute dtype), for constants composed beside them."""
    from ferrum.reference_ops import dtype_name  # imported here: a light module stays light to import

    return dtype_name(tensor(f"{config.arch.layers[layer].block_norms(config.arch)['pre_mlp']}.weight"))


#: A layer's part of a tensor's name, left out where :func:`norm_offset` looks a norm's module up.
_IN_LAYER = re.compile(r"^layers\.\d+\.")
#: The architecture fields of a layout whose norms are stored with their offsets added (mlx-lm's Step 3.5 and Gated
#: DeltaNet conversions): nothing is added at load.
OFFSETS_ADDED = {"norm_offset": 0.0, "norm_offsets": {}}


def norm_offset(arch: Any, name: str) -> float:
    """What norm weight ``name`` (Llama's naming, prefix and all) is stored short of: its module's own offset
    (``Architecture.norm_offsets``, keyed by the module relative to its layer or to the prefix: ``"norm"`` is the
    final norm), else ``norm_offset``; 0 for any other tensor and for a Gated DeltaNet's own norm. The load, the
    random checkpoints and the float64 oracle all read it here."""
    if not name.endswith("norm.weight") or f".{GATED_DELTA}." in name:
        return 0.0
    module = _IN_LAYER.sub("", name.removeprefix(arch.prefix), count=1).removesuffix(".weight")
    return arch.norm_offsets.get(module, arch.norm_offset)


def norm_eps(config: Any, slot: str) -> float:
    """The epsilon of the norms in ``slot`` (``"qk"``, ``"final"``, a block slot: ``"post_attn"``...): the
    architecture's own for it (``Architecture.norm_eps``), else the config's ``rms_norm_eps``."""
    return config.arch.norm_eps.get(slot, config.rms_norm_eps)
