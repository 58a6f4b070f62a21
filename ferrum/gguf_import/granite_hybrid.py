"""Granite 4.0-H files (``granitehybrid``) back into transformers' GraniteMoeHybrid layout.

llama.cpp's converter writes the Mamba-2 layers its own way, and the import undoes each change:

* ``A_log`` is stored as ``ssm_a = -exp(A_log)`` (a column ``[H, 1]``): taken back as ``log(-ssm_a)``; ``D`` as a
  column too, ``dt_bias`` as ``ssm_dt.bias``;
* the convolution's ``[C, 1, K]`` weight squeezed to ``[C, K]``, the gated norm's weight cut into its groups
  ``[G, I / G]`` (rows in order, so read back flat);
* which layers are Mamba-2 is told by ``attention.head_count_kv``, 0 for them; ``rope.scaling.finetuned`` is
  llama.cpp's switch for rope on the attention layers (Granite 4.0-H's are NoPE);
* q and k rows are permuted as Llama's (``_Architecture.permuted_qk``); the shared MLP's gate and up, split by the
  converter, are joined back into ``input_linear``.
"""

from __future__ import annotations

from typing import Any, Callable

from ferrum.errors import CheckpointError
from ferrum.gguf_import.files import Metadata, float32_value
from ferrum.gguf_import.gated_delta import Restored, a_log

#: The Mamba-2 block tensors: GGUF name -> transformers' within the layer.
_MAMBA = {"ssm_in.weight": "in_proj.weight", "ssm_in.bias": "in_proj.bias", "ssm_conv1d.weight": "conv1d.weight",
          "ssm_conv1d.bias": "conv1d.bias", "ssm_dt.bias": "dt_bias", "ssm_d": "D", "ssm_norm.weight": "norm.weight",
          "ssm_out.weight": "out_proj.weight", "ssm_out.bias": "out_proj.bias"}


def mamba2_tensors(module: str) -> Callable[[str, dict[str, Any]], tuple[Restored, ...] | None]:
    """A Mamba-2 layer's tensor under its transformers name in ``module`` (``ssm_a`` as ``A_log``): Granite 4.0-H's
    ``mamba``, Nemotron-H's ``mixer``, which llama.cpp's converter writes alike."""
    def own(rest: str, cfg: dict[str, Any]) -> tuple[Restored, ...] | None:
        if rest == "ssm_a":
            return (Restored(f"{module}.A_log", restore=a_log),)
        return (Restored(f"{module}.{_MAMBA[rest]}"),) if rest in _MAMBA else None
    return own


own_tensors = mamba2_tensors("mamba")


def granite_hybrid_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """GraniteMoeHybridConfig's keys from llama.cpp's: the Mamba-2 sizes from the ssm keys, each layer's kind, rope
    on or off, Granite's multipliers (llama.cpp's defaults where the file has none: no scaling, attention by
    1 / sqrt(head_dim)), the shared MLP's width and the experts (none: the shared MLP alone)."""
    where, layers, hidden = meta.where, cfg["num_hidden_layers"], cfg["hidden_size"]
    kv = meta.need(p + "attention.head_count_kv")
    kinds = ["attention" if k else "mamba" for k in (kv if isinstance(kv, list) else [kv] * layers)]
    heads, inner = int(meta.need(p + "ssm.time_step_rank")), int(meta.need(p + "ssm.inner_size"))
    if len(kinds) != layers or inner % heads or inner % hidden:
        raise CheckpointError(f"{where}: {p}attention.head_count_kv must list {layers} layers (0 for Mamba-2 ones), "
                              f"and ssm.inner_size {inner} be whole heads ({heads}) and a multiple of {hidden}")
    first = kinds.index("mamba") if "mamba" in kinds else 0
    scale = meta.get(p + "attention.scale")
    return {
        "layer_types": kinds, "mamba_n_heads": heads, "mamba_d_head": inner // heads,
        "mamba_expand": inner // hidden, "mamba_d_state": int(meta.need(p + "ssm.state_size")),
        "mamba_n_groups": int(meta.need(p + "ssm.group_count")), "mamba_d_conv": int(meta.need(p + "ssm.conv_kernel")),
        "mamba_conv_bias": f"blk.{first}.ssm_conv1d.bias" in meta.tensors,
        "mamba_proj_bias": f"blk.{first}.ssm_in.bias" in meta.tensors,
        "position_embedding_type": "rope" if meta.get(p + "rope.scaling.finetuned", True) else "nope",
        "embedding_multiplier": float32_value(meta.get(p + "embedding_scale") or 1.0),
        "residual_multiplier": float32_value(meta.get(p + "residual_scale") or 1.0),
        "logits_scaling": float32_value(meta.get(p + "logit_scale") or 1.0),
        "attention_multiplier": float32_value(scale) if scale else cfg["head_dim"] ** -0.5,
        "shared_intermediate_size": int(meta.need(p + "expert_shared_feed_forward_length")),
        "num_local_experts": int(meta.get(p + "expert_count", 0)),
    }
