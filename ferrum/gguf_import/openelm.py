"""OpenELM files (``openelm``) back into Apple's release layout, as Ferrum's ``openelm`` family (mlx-lm's) reads it.

llama.cpp's converter (its OpenELMModel) writes each layer's query and key/value heads and MLP width as per-layer
arrays (``head_count``, ``head_count_kv``, ``feed_forward_length``: the widths the release's ffn_multipliers round
to), splits each fused ``proj_1`` into its gate and up rows (joined back), keeps q/k/v fused as ``attn_qkv`` in the
release's order (q/k rows as stored: llama.cpp rotates rotate-half pairs) with the per-head q/k norms, and writes no LM
head: llama.cpp reads the embeddings as one, always (a file holding ``output.weight``, which it would ignore, is
refused by name), norms q and k always, and runs no rope scaling (refused).
"""

from __future__ import annotations

import math
from typing import Any

from ferrum.errors import CheckpointError, UnsupportedFeatureError
from ferrum.gguf_import.files import Metadata

#: The norms before attention and the MLP, under the release's names.
NORMS = (("attn_norm.weight", "attn_norm.weight"), ("ffn_norm.weight", "ffn_norm.weight"))
#: The fused MLP the converter cut in two, gate rows first.
JOINED = ((("ffn_gate.weight", "ffn_up.weight"), "mlp.gate_up_proj.weight"),)


def _per_layer(meta: Metadata, key: str, layers: int) -> list[int]:
    value = meta.need(key)
    value = value if isinstance(value, list) else [value] * layers
    if len(value) != layers or any(int(v) <= 0 for v in value):
        raise CheckpointError(f"{meta.where}: {key} must give each of the {layers} layers a positive count, got "
                              f"{value!r:.80}")
    return [int(v) for v in value]


def openelm_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The release's config keys: each layer's heads, and its MLP width as a multiplier of the width rounded to the
    widths' greatest common divisor (which OpenELM's rounding then keeps exactly)."""
    where = meta.where
    if "output.weight" in meta.tensors:
        raise UnsupportedFeatureError(f"{where}: an openelm file with output.weight is not supported: llama.cpp's "
                                      "openelm ignores it and reads the embeddings as the LM head")
    if cfg["rope_scaling"] is not None:
        raise UnsupportedFeatureError(f"{where}: {cfg['rope_scaling']['rope_type']} rope scaling in an openelm file "
                                      "is not supported (OpenELM's config has no rope scaling)")
    layers, hidden = cfg["num_hidden_layers"], cfg["hidden_size"]
    widths = _per_layer(meta, p + "feed_forward_length", layers)
    return {"num_query_heads": _per_layer(meta, p + "attention.head_count", layers),
            "num_kv_heads": _per_layer(meta, p + "attention.head_count_kv", layers),
            "ffn_multipliers": [w / hidden for w in widths], "ffn_dim_divisor": math.gcd(*widths),
            "rope_freq_constant": cfg["rope_theta"], "normalize_qk_projections": True,
            "share_input_output_layers": True}
