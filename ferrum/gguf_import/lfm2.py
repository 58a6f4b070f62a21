"""LFM2 files (``lfm2``, ``lfm2moe``) back into transformers' Lfm2 / Lfm2Moe layouts.

llama.cpp's converter changes little, and the import undoes it:

* the short convolution's ``[C, 1, K]`` taps are squeezed to ``[C, K]`` (``shortconv.conv``), its projections
  renamed ``shortconv.in_proj`` / ``shortconv.out_proj``;
* which layers are convolutions is told by ``attention.head_count_kv``, 0 for them; the kernel by
  ``shortconv.l_cache``;
* ``feed_forward_length`` is the MLP's width already sized (LFM2's two-thirds rounding done), so the config turns
  ``block_auto_adjust_ff_dim`` off;
* the norms are named as llama.cpp names Llama's (:data:`RENAMED`); the final norm, transformers'
  ``embedding_norm``, is stored as ``token_embd_norm`` (:data:`GLOBAL_TENSORS`).

The q/k rows are stored as the checkpoint has them (llama.cpp rotates LFM2's rotate-half pairs). LFM2-MoE's experts
are stacked under llama.cpp's MoE names, the router's correction bias (``expert_bias``) as ``exp_probs_b``
(:data:`MOE_RENAMED`); its first ``leading_dense_block_count`` layers keep a dense MLP.
"""

from __future__ import annotations

from typing import Any

from ferrum.errors import CheckpointError, UnsupportedFeatureError
from ferrum.gguf_import.files import Metadata, float32_value
from ferrum.gguf_import.gated_delta import Restored

#: The short convolution's tensors: GGUF name within the block -> Ferrum's within the layer.
_SHORT_CONV = {f"shortconv.{part}.{kind}": f"conv.{ours}.{kind}"
               for part, ours in (("conv", "conv1d"), ("in_proj", "in_proj"), ("out_proj", "out_proj"))
               for kind in ("weight", "bias")}
#: The norms under LFM2's names: GGUF -> transformers.
RENAMED = (("attn_norm.weight", "operator_norm.weight"), ("ffn_norm.weight", "ffn_norm.weight"),
           ("attn_q_norm.weight", "self_attn.q_layernorm.weight"),
           ("attn_k_norm.weight", "self_attn.k_layernorm.weight"))
#: LFM2-MoE's router correction bias: GGUF -> transformers.
MOE_RENAMED = (("exp_probs_b.bias", "feed_forward.expert_bias"),)
#: llama.cpp's ``expert_gating_func`` for the sigmoid gate, the one LFM2-MoE's converter writes.
_SIGMOID_GATING = 2
#: The final norm, stored under llama.cpp's name for a norm of the embeddings.
GLOBAL_TENSORS = (("token_embd_norm.weight", "model.norm.weight"),)


def own_tensors(rest: str, cfg: dict[str, Any]) -> tuple[Restored, ...] | None:
    """A short-convolution layer's tensor under its Ferrum name (the taps read back as ``[C, 1, K]``)."""
    return (Restored(_SHORT_CONV[rest]),) if rest in _SHORT_CONV else None


def lfm2_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Lfm2Config's keys from llama.cpp's: each layer's kind, the kernel, the MLP width as stored, the RMSNorm
    epsilon, and the convolutions' biases where the blocks hold them (no release has them; Ferrum refuses them)."""
    layers = cfg["num_hidden_layers"]
    kv = meta.need(p + "attention.head_count_kv")
    kinds = ["full_attention" if k else "conv" for k in (kv if isinstance(kv, list) else [kv] * layers)]
    if len(kinds) != layers:
        raise CheckpointError(f"{meta.where}: {p}attention.head_count_kv must list {layers} layers (0 for the "
                              f"short-convolution ones), got {len(kinds)}")
    first = kinds.index("conv") if "conv" in kinds else 0
    return {
        "layer_types": kinds, "conv_L_cache": int(meta.need(p + "shortconv.l_cache")),
        "block_auto_adjust_ff_dim": False,
        "norm_eps": float32_value(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
        "conv_bias": f"blk.{first}.shortconv.in_proj.bias" in meta.tensors,
        "tie_embedding": cfg["tie_word_embeddings"],
    }


def lfm2_moe_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Lfm2MoeConfig's keys: LFM2's, the dense first layers, and the routing as llama.cpp runs it whatever the file's
    other keys say: sigmoid scores chosen with the correction bias where the blocks hold one, the top-k weights always
    renormalised and never scaled."""
    gating = meta.get(p + "expert_gating_func", _SIGMOID_GATING)
    if gating != _SIGMOID_GATING:
        raise UnsupportedFeatureError(f"{meta.where}: {p}expert_gating_func {gating} is not supported; LFM2-MoE routes "
                                      f"with the sigmoid gate ({_SIGMOID_GATING})")
    dense = int(meta.get(p + "leading_dense_block_count", 0))
    return {**lfm2_config(meta, p, cfg), "num_dense_layers": dense, "norm_topk_prob": True,
            "routed_scaling_factor": 1.0,
            "use_expert_bias": f"blk.{dense}.exp_probs_b.bias" in meta.tensors}
