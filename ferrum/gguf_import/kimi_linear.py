"""Kimi Linear (``kimi-linear``) as llama.cpp runs such a file, in transformers' KimiLinear terms.

llama.cpp's converter writes a per-layer ``attention.head_count_kv``, 0 on the Kimi Delta Attention layers and 1 on the
latent attention ones, which is how llama.cpp tells them apart. It stores the KDA layers' ``A_log`` as
``ssm_a = -exp(A_log)`` (taken back as ``log(-ssm_a)``), ``dt_bias`` as ``ssm_dt.bias`` and each convolution's
``[C, 1, K]`` taps as ``[1, C, 1, K]``; the KDA heads are the file's query heads, ``kda.head_dim`` wide. The latent
attention runs without rope, its queries from ``attn_q`` alone. llama.cpp always renormalises the chosen experts'
sigmoid weights and sizes the shared MLP as ``expert_shared_count`` experts.

What llama.cpp runs otherwise than transformers is refused by name: a compressed query (its graph reads ``attn_q``
alone) and a whole ``attn_kv_b`` (older files: llama.cpp then joins each key's parts rope first, against its queries'
rope last). Two epsilons differ below float32's noise at any scale and are left: llama.cpp L2-normalises the KDA
queries and keys, and RMS-normalises the latent, at the file's RMS epsilon, transformers at 1e-6."""

from __future__ import annotations

from typing import Any

from ferrum.errors import CheckpointError, UnsupportedFeatureError
from ferrum.gguf_import.files import Metadata, routed_groups, routed_scale
from ferrum.gguf_import.gated_delta import Restored, a_log

#: The KDA layers' projections, gate and norm, the router's correction bias: GGUF name within a block -> transformers'.
TENSORS = (*((f"ssm_{gguf}.weight", f"self_attn.{hf}.weight") for gguf, hf in (
    ("f_a", "f_a_proj"), ("f_b", "f_b_proj"), ("beta", "b_proj"), ("g_a", "g_a_proj"), ("g_b", "g_b_proj"),
    ("norm", "o_norm"))), ("exp_probs_b.bias", "block_sparse_moe.gate.e_score_correction_bias"))
#: What the converter changed: ``A_log``, ``dt_bias`` and the convolutions' taps.
_OWN = {"ssm_a": Restored("self_attn.A_log", restore=a_log), "ssm_dt.bias": Restored("self_attn.dt_bias"),
        **{f"ssm_conv1d_{x}.weight": Restored(f"self_attn.{x}_conv1d.weight") for x in "qkv"}}


def own_tensors(rest: str, cfg: dict[str, Any]) -> tuple[Restored, ...] | None:
    """The KDA tensors the converter changed, as transformers reads them."""
    found = _OWN.get(rest)
    return None if found is None else (found,)


def kimi_linear_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """config.json's Kimi Linear entries beside the latent attention's (its shared MLP's count among them): which
    layers are KDA, their sizes, the renormalised, scaled and grouped routing."""
    layers = cfg["num_hidden_layers"]
    kv = meta.need(p + "attention.head_count_kv")
    kv = kv if isinstance(kv, list) else [kv] * layers
    if len(kv) != layers:
        raise CheckpointError(f"{meta.where}: {p}attention.head_count_kv lists {len(kv)} layers of {layers}")
    for i in range(layers):
        if f"blk.{i}.attn_q_a.weight" in meta.tensors:
            raise UnsupportedFeatureError(f"{meta.where}: a compressed query (blk.{i}.attn_q_a) is not supported: "
                                          "llama.cpp's kimi-linear reads attn_q alone")
        if f"blk.{i}.attn_kv_b.weight" in meta.tensors:
            raise UnsupportedFeatureError(f"{meta.where}: a whole blk.{i}.attn_kv_b is not supported: llama.cpp then "
                                          "joins each key's rope part before its other part, against its queries' "
                                          "order; convert the model again (newer converters split it per head)")
    shared = int(meta.need(p + "expert_shared_count"))
    if shared < 1:
        raise UnsupportedFeatureError(f"{meta.where}: {p}expert_shared_count {shared} is not supported: llama.cpp's "
                                      "kimi-linear then sizes its shared MLP as one expert, transformers' has none")
    return {"layer_types": ["full_attention" if k else "linear_attention" for k in kv],
            "linear_num_heads": cfg["num_attention_heads"], "linear_head_dim": int(meta.need(p + "kda.head_dim")),
            "linear_conv_kernel_dim": int(meta.need(p + "ssm.conv_kernel")), "norm_topk_prob": True,
            "routed_scaling_factor": routed_scale(meta, p), **routed_groups(meta, p)}
