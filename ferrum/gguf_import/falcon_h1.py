"""Falcon-H1 files (``falcon-h1``) back into transformers' FalconH1 layout.

llama.cpp's converter (its FalconH1Model, a Mamba2Model with attention) folds every muP multiplier into the weights
(biases included, where transformers leaves ssm_in and attention_in off them) and writes none of them, so the import
keeps them folded and sets each to 1: the model runs as llama.cpp runs it. A tied head therefore reads the
embeddings already scaled by embedding_multiplier and no lm_head_multiplier (the file does not hold it), as
llama.cpp's does. The Mamba-2 tensors are restored as Granite 4.0-H's (:mod:`ferrum.gguf_import.granite_hybrid`);
q and k are stored as the checkpoint has them (llama.cpp runs Falcon-H1's rope rotate-half); ``ssm_norm`` is there
only where the mixer norms (mamba_rms_norm), after the gate, as llama.cpp runs it.
"""

from __future__ import annotations

from typing import Any

from ferrum.errors import CheckpointError
from ferrum.gguf_import.files import Metadata
from ferrum.gguf_import.granite_hybrid import mamba2_tensors

own_tensors = mamba2_tensors("mamba")
#: The norm before the MLP: llama.cpp's ``ffn_norm``, Falcon-H1's ``pre_ff_layernorm``.
RENAMED = (("ffn_norm.weight", "pre_ff_layernorm.weight"),)


def falcon_h1_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """FalconH1Config's keys from llama.cpp's: the Mamba-2 sizes from the ssm keys (mamba_d_ssm wide), the norm and
    biases the first block holds, every multiplier 1 (folded by the converter)."""
    heads, inner = int(meta.need(p + "ssm.time_step_rank")), int(meta.need(p + "ssm.inner_size"))
    if inner % heads:
        raise CheckpointError(f"{meta.where}: ssm.inner_size {inner} is not a whole number of heads ({heads})")
    return {"mamba_d_ssm": inner, "mamba_n_heads": heads, "mamba_d_head": inner // heads,
            "mamba_d_state": int(meta.need(p + "ssm.state_size")),
            "mamba_n_groups": int(meta.need(p + "ssm.group_count")),
            "mamba_d_conv": int(meta.need(p + "ssm.conv_kernel")),
            "mamba_conv_bias": "blk.0.ssm_conv1d.bias" in meta.tensors,
            "mamba_proj_bias": "blk.0.ssm_in.bias" in meta.tensors,
            "projectors_bias": "blk.0.ssm_out.bias" in meta.tensors,
            "attention_bias": "blk.0.attn_q.bias" in meta.tensors, "mlp_bias": "blk.0.ffn_up.bias" in meta.tensors,
            "mamba_rms_norm": "blk.0.ssm_norm.weight" in meta.tensors, "mamba_norm_before_gate": False}
