"""Ling / Ring v1 (``bailingmoe``: Ling-lite, Ling-plus) and 2.0 (``bailingmoe2``, Sarvam-MoE's too) as llama.cpp runs
such a file, in the terms of Ferrum's ``bailing_moe`` (mlx-lm's bailing_moe, the releases' own layout and names) and
``sarvam_moe`` (transformers' SarvamMoE).

llama.cpp's converter cuts v1's fused ``query_key_value`` into q, k and v, q and k permuted as Llama's (llama.cpp
rotates adjacent pairs), joined back and un-permuted on import; rope over the whole head (the converter writes
``head_dim``), softmax routing whatever the file names, the top-k weights renormalised and scaled as the file says,
``expert_shared_count`` shared experts of the experts' width on every layer (llama.cpp's graph has no dense layer).
Where the release norms its LM head (``norm_head``), the converter divides the head's columns by their L2 norm
before writing it, as mlx-lm's load does: the import leaves the head as stored (``norm_head`` false).

What llama.cpp runs otherwise than the release is refused by name: dense first layers (llama.cpp loads none), another
gate (it runs softmax), a fused q/k/v bias (which it never reads) and a single renormalised expert (weighed 1 by
llama.cpp, by its probability by mlx-lm).

llama.cpp's converter writes Ling 2.0 and Sarvam-MoE alike (bailingmoe2: :func:`bailingmoe2_config`), Sarvam's rope
over the whole head and its correction biases less their mean; the pre-tokenizer it names (``sarvam-moe``) tells
them apart."""

from __future__ import annotations

from typing import Any

import numpy as np

from ferrum.errors import UnsupportedFeatureError
from ferrum.gguf_import.files import Metadata, prediction_blocks, routed_groups, routed_scale
from ferrum.gguf_import.gated_delta import Restored

#: llama.cpp's ``expert_gating_func`` value for the softmax gate.
_SOFTMAX = 1


def refuse_one_renormalised(meta: Metadata, p: str, cfg: dict[str, Any]) -> None:
    """mlx-lm's bailing_moe leaves a single chosen expert's weight as its score where llama.cpp's renormalisation
    makes it 1: refused."""
    if cfg["num_experts_per_tok"] == 1 and cfg["norm_topk_prob"]:
        raise UnsupportedFeatureError(f"{meta.where}: {p}expert_weights_norm with one expert per token is not "
                                      "supported: llama.cpp then weighs the expert 1, mlx-lm's bailing_moe by its "
                                      "score")


def bailingmoe_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Ling v1's config.json entries as llama.cpp runs a bailingmoe file (see the module's docstring)."""
    where = meta.where
    dense = int(meta.get(p + "leading_dense_block_count", 0))
    if dense:
        raise UnsupportedFeatureError(f"{where}: {p}leading_dense_block_count {dense} is not supported: llama.cpp's "
                                      "bailingmoe runs every layer sparse and loads no dense MLP")
    gating = meta.get(p + "expert_gating_func")
    if gating not in (None, 0, _SOFTMAX):
        raise UnsupportedFeatureError(f"{where}: {p}expert_gating_func {gating} is not supported: llama.cpp's "
                                      f"bailingmoe routes with the softmax gate ({_SOFTMAX}) whatever the file says")
    if "blk.0.attn_qkv.bias" in meta.tensors:
        raise UnsupportedFeatureError(f"{where}: a fused q/k/v bias (blk.0.attn_qkv.bias) is not supported: "
                                      "llama.cpp's bailingmoe reads q, k and v apart and never that bias")
    refuse_one_renormalised(meta, p, cfg)
    return {"num_shared_experts": int(meta.need(p + "expert_shared_count")), "first_k_dense_replace": 0,
            "score_function": "softmax", "routed_scaling_factor": routed_scale(meta, p), **routed_groups(meta, p),
            "norm_head": False, "use_qkv_bias": False, "use_qk_norm": False}


#: llama.cpp's ``expert_gating_func`` value for the sigmoid gate.
_SIGMOID = 2
#: The pre-tokenizer llama.cpp's converter names for Sarvam-MoE, which it writes as bailingmoe2 too.
SARVAM_PRE = "sarvam-moe"


def _raised(bias: np.ndarray, where: str) -> np.ndarray:
    """A layer's correction biases raised so that none is negative (see :func:`own_tensors`)."""
    return bias - min(np.float32(0), bias.min())


def own_tensors(rest: str, cfg: dict[str, Any]) -> tuple[Restored, ...] | None:
    """The router's correction bias. llama.cpp masks the experts of dropped groups with -inf, mlx-lm's bailing_moe
    (which Ferrum runs for Ling) with 0, so the two choose apart where a kept expert's corrected score is negative:
    a Ling file's biases are raised by their most negative one, which changes no choice llama.cpp makes (each
    group's and expert's corrected score moves alike) and no weight (the uncorrected scores), and keeps every
    corrected score positive, where the two rules agree. Sarvam's (transformers' SarvamMoE masks with -inf) as
    stored."""
    if rest != "exp_probs_b.bias":
        return None
    return (Restored("mlp.gate.expert_bias", restore=_raised if cfg["model_type"] == "bailing_moe" else None),)


def bailingmoe2_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Ling 2.0 (mlx-lm's bailing_moe), or Sarvam-MoE (transformers' SarvamMoE) where the file's pre-tokenizer is
    Sarvam's, as llama.cpp runs a bailingmoe2 file: q/k/v fused as stored (rotate-half rope over
    rope.dimension_count of each head, Sarvam's the whole head), per-head q/k norms, the gate the file names (softmax or
    sigmoid) with the correction bias where a layer has one, groups, scale and renormalisation as the file says,
    ``expert_shared_count`` shared experts each as wide as expert_shared_feed_forward_length (the experts' width where
    absent) beside them, dense first layers, the trailing next-token-prediction blocks left out."""
    where, blocks = meta.where, cfg["num_hidden_layers"]
    layers = blocks - prediction_blocks(meta, p, blocks)
    gating = meta.need(p + "expert_gating_func")
    if gating not in (_SOFTMAX, _SIGMOID):
        raise UnsupportedFeatureError(f"{where}: {p}expert_gating_func {gating} is not supported: Ling and Sarvam "
                                      f"route with the softmax ({_SOFTMAX}) or sigmoid ({_SIGMOID}) gate")
    count = int(meta.need(p + "expert_shared_count"))
    if count < 1:
        raise UnsupportedFeatureError(f"{where}: {p}expert_shared_count {count} is not supported: llama.cpp's "
                                      "bailingmoe2 requires shared experts")
    dense = int(meta.get(p + "leading_dense_block_count", 0))
    biased = any(f"blk.{i}.exp_probs_b.bias" in meta.tensors for i in range(dense, layers))
    width = meta.get(p + "expert_shared_feed_forward_length") or None
    common = {"num_hidden_layers": layers, "num_nextn_predict_layers": 0, "first_k_dense_replace": dense,
              "use_qk_norm": True, "use_qkv_bias": "blk.0.attn_qkv.bias" in meta.tensors,
              "routed_scaling_factor": routed_scale(meta, p), **routed_groups(meta, p)}
    if meta.get("tokenizer.ggml.pre") == SARVAM_PRE:
        return {**common, **_sarvam(meta, p, gating, biased, count, width)}
    refuse_one_renormalised(meta, p, cfg)
    return {**common, "score_function": "sigmoid" if gating == _SIGMOID else "softmax",
            "moe_router_enable_expert_bias": biased, "num_shared_experts": count,
            "moe_shared_expert_intermediate_size": width, "norm_head": False}


def _sarvam(meta: Metadata, p: str, gating: int, biased: bool, count: int, width: int | None) -> dict[str, Any]:
    """Sarvam-MoE's entries, in its release's names: transformers' SarvamMoE chooses by the sigmoid scores plus the
    correction bias (a file with another gate or without the bias is refused) and sizes its shared MLP as whole
    experts' widths."""
    where = meta.where
    if gating != _SIGMOID or not biased:
        raise UnsupportedFeatureError(f"{where}: a Sarvam-MoE file gated by {gating} or without exp_probs_b is not "
                                      f"supported: transformers' SarvamMoE chooses by sigmoid scores ({_SIGMOID}) "
                                      "plus the correction bias")
    experts = int(meta.need(p + "expert_feed_forward_length"))
    shared = (width or experts) * count
    if shared % experts:
        raise UnsupportedFeatureError(f"{where}: shared experts {shared} wide beside experts {experts} wide are not "
                                      "supported: transformers' SarvamMoE makes them a whole number of experts' widths")
    return {"model_type": "sarvam_moe", "architectures": ["SarvamMoEForCausalLM"], "num_shared_experts":
            shared // experts}
