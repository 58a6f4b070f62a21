"""Nemotron-H files (``nemotron_h``) back into transformers' NemotronH layout.

llama.cpp's converter writes Nemotron-H as Granite 4.0-H (its GraniteHybridModel), and the import undoes the same
changes (:mod:`ferrum.gguf_import.granite_hybrid`): ``A_log`` as ``-exp(A_log)``, ``D`` as a column, ``dt_bias`` as
``ssm_dt.bias``, the convolution squeezed, the gated norm cut into its groups, the attention's q/k rows permuted as
Llama's (Nemotron-H's attention takes no rope). Each block is one norm (``attn_norm``) and one module; which module is
told by the per-layer sizes: ``attention.head_count_kv`` for attention, ``feed_forward_length`` for the MLP, neither
for Mamba-2.
"""

from __future__ import annotations

from typing import Any

from ferrum.errors import CheckpointError
from ferrum.gguf_import.files import Metadata
from ferrum.gguf_import.granite_hybrid import mamba2_tensors

own_tensors = mamba2_tensors("mixer")


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
    where, layers = meta.where, cfg["num_hidden_layers"]
    kv = _per_layer(meta, p + "attention.head_count_kv", layers)
    ff = _per_layer(meta, p + "feed_forward_length", layers)
    experts = bool(meta.get(p + "expert_count"))
    kinds = ["full_attention" if k else ("moe" if experts else "mlp") if f else "linear_attention"
             for k, f in zip(kv, ff)]
    heads, inner = int(meta.need(p + "ssm.time_step_rank")), int(meta.need(p + "ssm.inner_size"))
    if inner % heads:
        raise CheckpointError(f"{where}: ssm.inner_size {inner} is not a whole number of heads ({heads})")

    def first(kind: str, tensor: str) -> bool:  # the tensor is in the first block of that kind
        return kind in kinds and f"blk.{kinds.index(kind)}.{tensor}" in meta.tensors

    return {
        "layers_block_type": kinds, "mamba_num_heads": heads, "mamba_head_dim": inner // heads,
        "n_groups": int(meta.need(p + "ssm.group_count")), "ssm_state_size": int(meta.need(p + "ssm.state_size")),
        "conv_kernel": int(meta.need(p + "ssm.conv_kernel")),
        "use_conv_bias": first("linear_attention", "ssm_conv1d.bias"),
        "use_bias": first("linear_attention", "ssm_in.bias"), "mlp_bias": first("mlp", "ffn_up.bias"),
        "attention_bias": first("full_attention", "attn_q.bias"),
    }
