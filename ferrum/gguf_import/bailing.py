"""Ling / Ring (``bailingmoe``: v1, Ling-lite and Ling-plus) as llama.cpp runs such a file, in the terms of Ferrum's
``bailing_moe`` (mlx-lm's bailing_moe, the releases' own layout and names).

llama.cpp's converter cuts v1's fused ``query_key_value`` into q, k and v, q and k permuted as Llama's (llama.cpp
rotates adjacent pairs), joined back and un-permuted on import; rope over the whole head (the converter writes
``head_dim``), softmax routing whatever the file names, the top-k weights renormalised and scaled as the file says,
``expert_shared_count`` shared experts of the experts' width on every layer (llama.cpp's graph has no dense layer).
Where the release norms its LM head (``norm_head``), the converter divides the head's columns by their L2 norm
before writing it, as mlx-lm's load does: the import leaves the head as stored (``norm_head`` false).

What llama.cpp runs otherwise than the release is refused by name: dense first layers (llama.cpp loads none), another
gate (it runs softmax), a fused q/k/v bias (which it never reads) and a single renormalised expert (weighed 1 by
llama.cpp, by its probability by mlx-lm)."""

from __future__ import annotations

from typing import Any

from ferrum.errors import UnsupportedFeatureError
from ferrum.gguf_import.files import Metadata, routed_groups, routed_scale

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
