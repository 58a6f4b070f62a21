"""Apertus files (``apertus``) back into transformers' Apertus layout.

llama.cpp's converter (its ApertusModel, a LlamaModel that leaves q/k rows as stored: llama.cpp rotates Apertus's
rotate-half pairs) moves each layer's four xIELU parameters out of the tensors into the metadata, one array per
parameter (``xielu.alpha_p``... with no architecture prefix), as stored: the raw alpha_p and alpha_n, which
llama.cpp passes through softplus when it runs them, as transformers does. The import writes them back as each
layer's ``mlp.act_fn`` tensors. llama.cpp's loader also takes one number for every layer; so does the import.
llama.cpp adds no q, k or v biases (a file holding them is refused, its tensors having no place).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ferrum.arch.mlp import XIELU_PARAMS
from ferrum.errors import CheckpointError
from ferrum.gguf_import.files import Metadata

def apertus_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The file's rope (its base, and llama3 scaling where rope_freqs holds it) as rope_parameters, where transformers'
    Apertus reads it: without them it takes the release's llama3 scaling and base, whatever rope_theta says."""
    scaling = cfg.get("rope_scaling") or {"rope_type": "default"}
    return {"rope_parameters": {**scaling, "rope_theta": cfg["rope_theta"]}, "rope_scaling": None}


#: Apertus's norms before attention and the MLP: llama.cpp's names -> transformers'.
NORMS = (("attn_norm.weight", "attention_layernorm.weight"), ("ffn_norm.weight", "feedforward_layernorm.weight"))


def xielu_tensors(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, np.ndarray]:
    """Each layer's xIELU parameters from the metadata, under transformers' names, float32 as the file holds them."""
    layers = cfg["num_hidden_layers"]
    out = {}
    for param, shape in XIELU_PARAMS.items():
        key = f"xielu.{param}"
        values = meta.need(key)
        values = values if isinstance(values, list) else [values] * layers
        if len(values) != layers or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in values):
            raise CheckpointError(f"{meta.where}: GGUF metadata {key!r} must be one finite number, or one for each "
                                  f"of the {layers} layers; got {values!r:.80}")
        for i, value in enumerate(values):
            out[f"model.layers.{i}.mlp.act_fn.{param}"] = np.full(shape, value, dtype=np.float32)
    return out
