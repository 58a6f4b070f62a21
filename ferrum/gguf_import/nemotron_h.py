"""Nemotron-H files (``nemotron_h``) back into transformers' NemotronH layout.

llama.cpp's converter writes Nemotron-H as Granite 4.0-H (its GraniteHybridModel), and the import undoes the same
changes (:mod:`ferrum.gguf_import.granite_hybrid`): ``A_log`` as ``-exp(A_log)``, ``D`` as a column, ``dt_bias`` as
``ssm_dt.bias``, the convolution squeezed, the gated norm cut into its groups, the attention's q/k rows permuted as
Llama's (Nemotron-H's attention takes no rope). Each block is one norm (``attn_norm``) and one module; which module is
told by the per-layer sizes: ``attention.head_count_kv`` for attention, ``feed_forward_length`` for the MLP (the
experts in ``nemotron_h_moe`` files, Nemotron 3 Nano's), neither for Mamba-2. The experts' up and down stacks, the
router, its correction bias and the shared experts are stored under llama.cpp's MoE names (:data:`MOE_RENAMED`,
:data:`SHARED_TENSORS`); the next-token-prediction block a converter may append is not run, nor read.
"""

from __future__ import annotations

from typing import Any

from ferrum.errors import CheckpointError
from ferrum.gguf_import.files import Metadata, float32_value, prediction_blocks
from ferrum.gguf_import.granite_hybrid import mamba2_tensors

own_tensors = mamba2_tensors("mixer")
#: The router's correction bias: GGUF -> transformers (in the block's mixer).
MOE_RENAMED = (("exp_probs_b.bias", "mixer.gate.e_score_correction_bias"),)
#: The shared experts: GGUF -> their suffixes in the mixer.
SHARED_TENSORS = (("ffn_up_shexp.weight", "shared_experts.up_proj.weight"),
                  ("ffn_down_shexp.weight", "shared_experts.down_proj.weight"))


def _per_layer(meta: Metadata, key: str, layers: int) -> list[int]:
    value = meta.need(key)
    values = value if isinstance(value, list) else [value] * layers
    if len(values) != layers:
        raise CheckpointError(f"{meta.where}: {key} must list {layers} layers (0 where a block has none), got "
                              f"{len(values)}")
    return [int(v) for v in values]


def nemotron_h_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """NemotronHConfig's keys from llama.cpp's: each block's kind, the Mamba-2 sizes from the ssm keys, and the
    biases the blocks hold."""
    where, blocks = meta.where, cfg["num_hidden_layers"]
    layers = blocks - prediction_blocks(meta, p, blocks)  # the prediction block comes last
    kv = _per_layer(meta, p + "attention.head_count_kv", blocks)[:layers]
    ff = _per_layer(meta, p + "feed_forward_length", blocks)[:layers]
    experts = bool(meta.get(p + "expert_count"))
    kinds = ["full_attention" if k else ("moe" if experts else "mlp") if f else "linear_attention"
             for k, f in zip(kv, ff)]
    heads, inner = int(meta.need(p + "ssm.time_step_rank")), int(meta.need(p + "ssm.inner_size"))
    if inner % heads:
        raise CheckpointError(f"{where}: ssm.inner_size {inner} is not a whole number of heads ({heads})")

    def first(kind: str, tensor: str) -> bool:  # the tensor is in the first block of that kind
        return kind in kinds and f"blk.{kinds.index(kind)}.{tensor}" in meta.tensors

    moe = _moe_config(meta, p) if experts else {}
    return {
        **moe, "num_hidden_layers": layers, "num_nextn_predict_layers": blocks - layers, "layers_block_type": kinds,
        "mamba_num_heads": heads, "mamba_head_dim": inner // heads,
        "n_groups": int(meta.need(p + "ssm.group_count")), "ssm_state_size": int(meta.need(p + "ssm.state_size")),
        "conv_kernel": int(meta.need(p + "ssm.conv_kernel")),
        "use_conv_bias": first("linear_attention", "ssm_conv1d.bias"),
        "use_bias": first("linear_attention", "ssm_in.bias"), "mlp_bias": first("mlp", "ffn_up.bias"),
        "attention_bias": first("full_attention", "attn_q.bias"),
    }


def mamba2_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Mamba2Config's keys from llama.cpp's (its Mamba2Model writes no attention heads and no MLP): the Mamba-2
    sizes from the ssm keys (the heads as the family's num_heads), the biases the first block holds."""
    heads, inner = int(meta.need(p + "ssm.time_step_rank")), int(meta.need(p + "ssm.inner_size"))
    hidden = cfg["hidden_size"]
    if inner % heads or inner % hidden:
        raise CheckpointError(f"{meta.where}: ssm.inner_size {inner} must be whole heads ({heads}) and a multiple "
                              f"of the width {hidden}")
    return {"num_attention_heads": heads, "num_key_value_heads": heads, "head_dim": inner // heads,
            "expand": inner // hidden, "intermediate_size": inner, "n_groups": int(meta.need(p + "ssm.group_count")),
            "state_size": int(meta.need(p + "ssm.state_size")), "conv_kernel": int(meta.need(p + "ssm.conv_kernel")),
            "use_conv_bias": "blk.0.ssm_conv1d.bias" in meta.tensors, "use_bias": "blk.0.ssm_in.bias" in meta.tensors,
            "layer_norm_epsilon": float32_value(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5))}


def _moe_config(meta: Metadata, p: str) -> dict[str, Any]:
    """Nemotron 3 Nano's routing as the converter writes it: the scale, the groups (the converter writes no count of
    those kept: every group, as with the one group of every release) and the latent size where the file has one
    (Nemotron 3 Super's, which Ferrum's config reading refuses by name)."""
    groups = int(meta.get(p + "expert_group_count", 1) or 1)
    latent = meta.get(p + "moe_latent_size")
    return {"routed_scaling_factor": float32_value(meta.get(p + "expert_weights_scale", 1.0)), "n_group": groups,
            "topk_group": int(meta.get(p + "expert_group_used_count", groups) or groups),
            **({"moe_latent_size": int(latent)} if latent else {})}
