"""Checkpoint tensors of an Architecture: their names and shapes, and the host-side changes made at load.

``weight_shapes`` lists the tensors exactly as the checkpoint stores them
(fused ones fused), so loading, ``ferrum quantize`` and the random checkpoint
writer agree on one list. ``prepare`` then turns each host tensor into what
the model reads:

* fused q/k/v (Phi-3 ``qkv_proj``) and gate/up (``gate_up_proj``) are split
  into row blocks at load. A row block of a packed quantized matrix is still
  a packed matrix, so this works for quantized checkpoints too, and every
  backend's plain ``linear`` runs them; the price is three matmuls instead of
  one (splitting the fused output instead would need a column-slice op that
  the backend contract does not have);
* Gemma's norms scale by ``1 + w``: the offset is added to the weights once;
* partial rotary: q and k rows are permuted within each head, and longrope's
  attention factor multiplies their rotated rows (see :mod:`ferrum.arch.rope`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from ferrum.arch.mlp import MLP_KINDS
from ferrum.quant.affine import QuantizedWeight

#: (decoder prefix, LM head) of the layouts a checkpoint may use: causal LMs, then Gemma 3's multimodal wrapper
#: as released (``language_model.model.*``) and as transformers 5 saves it (``model.language_model.*``).
LAYOUTS = (
    ("model.", "lm_head.weight"),
    ("language_model.model.", "language_model.lm_head.weight"),
    ("model.language_model.", "lm_head.weight"),
)


def weight_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of ``config`` holds, with its shape, in load order."""
    arch = config.arch
    h, d, vocab = config.hidden_size, config.head_dim, config.vocab_size
    q, kv = config.num_heads * d, config.num_kv_heads * d
    p = arch.prefix
    shapes = {f"{p}embed_tokens.weight": (vocab, h), f"{p}norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes[arch.lm_head] = (vocab, h)
    attention: dict[str, tuple[int, ...]] = {f"{norm}.weight": (h,) for norm in arch.norms.values()}
    if arch.fused_qkv:
        attention["self_attn.qkv_proj.weight"] = (q + 2 * kv, h)
    else:
        attention.update({"self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
                          "self_attn.v_proj.weight": (kv, h)})
    attention["self_attn.o_proj.weight"] = (h, q)
    if arch.qkv_bias:
        attention.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
    if arch.o_bias:
        attention["self_attn.o_proj.bias"] = (h,)
    if arch.qk_norm:
        attention.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
    for i, layer in enumerate(arch.layers):
        mlp = MLP_KINDS[layer.mlp].tensors(config, i)
        shapes.update({f"{p}layers.{i}.{name}": shape for name, shape in {**attention, **mlp}.items()})
    return shapes


def rows(tensor: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of a dense or packed matrix (or a vector)."""
    if isinstance(tensor, QuantizedWeight):
        return QuantizedWeight(tensor.packed[start:stop], tensor.scales[start:stop], tensor.biases[start:stop],
                               tensor.bits, tensor.group_size)
    return tensor[start:stop]


def _take_rows(tensor: Any, order: np.ndarray) -> Any:
    if isinstance(tensor, QuantizedWeight):
        return QuantizedWeight(tensor.packed[order], tensor.scales[order], tensor.biases[order],
                               tensor.bits, tensor.group_size)
    return tensor[order]


def _layer_of(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix + "layers."):
        return None
    return int(name[len(prefix) + len("layers."):].split(".", 1)[0])


def prepare(config: Any, name: str, tensor: Any) -> list[tuple[str, Any]]:
    """One checkpoint tensor -> the tensors the model reads (split, offset, permuted)."""
    arch = config.arch
    layer = _layer_of(name, arch.prefix)
    if layer is None:
        parts = [(name, tensor)]
    elif ".self_attn.qkv_proj." in name:
        q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        parts = [(name.replace("qkv_proj", "q_proj"), rows(tensor, 0, q)),
                 (name.replace("qkv_proj", "k_proj"), rows(tensor, q, q + kv)),
                 (name.replace("qkv_proj", "v_proj"), rows(tensor, q + kv, q + 2 * kv))]
    else:
        parts = MLP_KINDS[arch.layers[layer].mlp].split(config, name, tensor)
    return [(n, _transform(config, layer, n, t)) for n, t in parts]


def _transform(config: Any, layer: int | None, name: str, tensor: Any) -> Any:
    arch = config.arch
    if arch.norm_offset and name.endswith("norm.weight"):
        tensor = np.asarray(tensor, dtype=np.float32) + np.float32(arch.norm_offset)
    if layer is None:
        return tensor
    rope = arch.layers[layer].rope
    heads = _rotated_heads(config, name)
    if heads is None:
        return tensor
    d = config.head_dim
    if rope.attention_factor != 1.0 and name.endswith("norm.weight") == arch.qk_norm:
        # longrope's factor multiplies cos and sin, i.e. the rotated dims of q and k (after any q/k norm)
        factor = np.where(np.arange(d) < rope.rotary_dim, rope.attention_factor, 1.0)
        tensor = _scale_rows(tensor, np.tile(factor, heads))
    order = rope.rotary_permutation()
    if order is None:
        return tensor
    return _take_rows(tensor, (np.arange(heads)[:, None] * d + order[None, :]).reshape(-1))


def _rotated_heads(config: Any, name: str) -> int | None:
    """How many heads a q/k tensor holds (1 for a per-head norm), or None for any other tensor."""
    for module, heads in (("self_attn.q_", config.num_heads), ("self_attn.k_", config.num_kv_heads)):
        if f".{module}" in name:
            return 1 if name.endswith("norm.weight") else heads
    return None


def _scale_rows(tensor: Any, factor: np.ndarray) -> Any:
    if isinstance(tensor, QuantizedWeight):  # w = scales * q + biases: scale both, kept in float32 (exact)
        scales = tensor.scales.astype(np.float32) * factor[:, None].astype(np.float32)
        biases = tensor.biases.astype(np.float32) * factor[:, None].astype(np.float32)
        return QuantizedWeight(tensor.packed, scales, biases, tensor.bits, tensor.group_size)
    shape = (-1,) + (1,) * (np.ndim(tensor) - 1)
    return (np.asarray(tensor, dtype=np.float32) * factor.reshape(shape).astype(np.float32))


def resolve_layout(config: Any, present: set[str]) -> Any:
    """``config`` with the decoder prefix and LM head name of the layout ``present`` (tensor names) uses."""
    for prefix, head in LAYOUTS:
        if f"{prefix}embed_tokens.weight" in present or f"{prefix}embed_tokens.scales" in present:
            return replace(config, arch=replace(config.arch, prefix=prefix, lm_head=head))
    return config
