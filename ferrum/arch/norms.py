"""The norm kinds of a block: each gives the forward pass its ``norm`` and ``add_norm`` functions.

``Architecture.norm`` picks one. A norm's weights reach them as a ``(weight, bias)``
pair (bias None where the checkpoint has none).
"""

from __future__ import annotations

from typing import Any, Callable

NormFns = tuple[Callable[[Any, tuple], Any], Callable[[Any, Any, tuple], tuple]]


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

#: Kinds by name: ``kind(ops, eps) -> (norm(x, weights), add_norm(x, h, weights) -> (norm(x + h), x + h))``.
NORM_KINDS: dict[str, Callable[[Any, float], NormFns]] = {"rms": rms, "layer": layer}


def norms_dtype(config: Any, tensor: Callable[[str], Any], layer: int) -> str:
    """The dtype layer ``layer``'s norms are placed in (the compute dtype), for constants composed beside them."""
    from ferrum.reference_ops import dtype_name  # imported here: a light module stays light to import

    return dtype_name(tensor(f"{config.arch.layers[layer].block_norms(config.arch)['pre_mlp']}.weight"))
