"""Nemotron NAS files (``deci``: Llama-3.1-Nemotron-51B, Llama-3.3-Nemotron-Super-49B, Llama-3.1-Nemotron-Ultra-253B)
back into the release's ``block_configs``, as Ferrum's ``nemotron-nas`` family (mlx-lm's) reads it.

llama.cpp's converter (its DeciModel) writes each layer's query heads, key/value heads and MLP width as per-layer
arrays: key/value heads for attention (q/k rows permuted per head as Llama's, un-permuted on import), 0 of them with
the query heads for the linear map DeciLM puts in its place (written as ``attn_output``), 0 of both for skipped
attention, and width 0 for a skipped FFN; the llama3 rope as ``rope_freqs``. llama.cpp's deci has no linear FFN
(the converter cannot name its tensor) and drops the output of a layer whose FFN is skipped, its attention's too:
such a layer with attention is refused by name, as is an attention scale of the file's own.
"""

from __future__ import annotations

from typing import Any

from ferrum.arch.families.heterogeneous import nas_width
from ferrum.errors import CheckpointError, UnsupportedFeatureError
from ferrum.gguf_import.files import Metadata, per_layer

#: The linear map in place of a layer's attention, which the converter names as the attention's output.
OTHERWISE = (("attn_output.weight", "self_attn.linear_attn.weight"),)
_SKIPPED = {"no_op": True, "replace_with_linear": False}


def _attention(meta: Metadata, i: int, heads: int, kv_heads: int, top: int) -> dict[str, Any]:
    """A layer's attention entry from its counts: skipped (none), linear (query heads alone) or grouped."""
    if heads not in (0, top) or (kv_heads and top % kv_heads) or (kv_heads and not heads):
        raise CheckpointError(f"{meta.where}: layer {i} has {heads} query and {kv_heads} key/value heads; a deci "
                              f"file's layers have {top} query heads in whole groups per key/value head, or none")
    if not heads:
        return {"n_heads_in_group": None, **_SKIPPED}
    if not kv_heads:
        return {"n_heads_in_group": None, "no_op": False, "replace_with_linear": True}
    return {"n_heads_in_group": top // kv_heads, "no_op": False, "replace_with_linear": False}


def _ffn(meta: Metadata, i: int, width: int, hidden: int) -> dict[str, Any]:
    """A layer's FFN entry: skipped (width 0), or the multiplier DeciLM's rounding takes back to the width."""
    if not width:
        return {"ffn_mult": None, **_SKIPPED}
    mult = 1.5 * width / hidden
    if nas_width(mult, hidden) != width:
        raise UnsupportedFeatureError(f"{meta.where}: layer {i}'s MLP width {width} is not supported: DeciLM sizes "
                                      "its MLPs 2/3 of ffn_mult x hidden rounded up to a multiple of 256")
    return {"ffn_mult": mult, "no_op": False, "replace_with_linear": False}


def deci_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The release's block_configs from the per-layer counts, top-level sizes null as in the releases."""
    where, layers, hidden = meta.where, cfg["num_hidden_layers"], cfg["hidden_size"]
    if meta.get(p + "attention.scale"):
        raise UnsupportedFeatureError(f"{where}: {p}attention.scale in a deci file is not supported (DeciLM scales "
                                      "attention by 1 / sqrt(head_dim), as llama.cpp does without it)")
    heads = [int(n) for n in per_layer(meta, p + "attention.head_count", layers)]
    kv_heads = [int(n) for n in per_layer(meta, p + "attention.head_count_kv", layers)]
    widths = [int(n) for n in per_layer(meta, p + "feed_forward_length", layers)]
    top = max(heads)
    blocks = []
    for i in range(layers):
        if heads[i] and not widths[i]:
            raise UnsupportedFeatureError(f"{where}: layer {i}, with attention and no FFN (feed_forward_length 0), is "
                                          "not supported: llama.cpp's deci drops such a layer's output, its "
                                          "attention's with it, where DeciLM adds it to the residual")
        blocks.append({"attention": _attention(meta, i, heads[i], kv_heads[i], top),
                       "ffn": _ffn(meta, i, widths[i], hidden)})
    return {"block_configs": blocks, "num_attention_heads": top, "num_key_value_heads": None,
            "intermediate_size": None}
