"""Step 3.5 files (``step35``) back into StepFun's release config, as Ferrum's ``step3p5`` family (mlx-lm's) reads it.

llama.cpp's converter (its Step35Model) writes each layer's query and key/value heads and whether it slides as
per-layer arrays (the sliding layers' heads are attention_other_setting's), the two rope bases (``rope.freq_base``,
``rope.freq_base_swa``), the per-layer SwiGLU clamps of the experts and of the shared expert (which llama.cpp also
applies to the dense MLPs, as mlx-lm does), appends the MTP layers after the decoder's, adds 1 to every norm weight
(taken off: ``norm_offset``) and stores the llama3 rope as ``rope_freqs`` over the full layers' rotary dims. llama.cpp
rotates half of ``rope.dimension_count`` on the full layers and ``rope.dimension_count_swa`` on the sliding ones; it
routes by sigmoid scores chosen with the bias, scaled and renormalised as the file says; the sparse layers are those
with a router. What it runs otherwise is refused by name: another gating function, rope scaling but llama3's,
key/value heads that differ by layer.
"""

from __future__ import annotations

from typing import Any

from ferrum.errors import UnsupportedFeatureError
from ferrum.gguf_import.files import (Metadata, float32_value, llama3_rope_scaling, per_layer, prediction_blocks,
                                      routed_scale)

FULL, SLIDING = "full_attention", "sliding_attention"
_SIGMOID_GATING = 2  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID, its default for step35
#: The head-wise output gate and the router's selection bias under the release's (Llama-named) modules.
TENSORS = (("attn_gate.weight", "self_attn.g_proj.weight"), ("exp_probs_b.bias", "moe.router_bias"))
#: The shared expert, in the sparse MLP's module.
SHARED = tuple((f"ffn_{p}_shexp.weight", f"share_expert.{p}_proj.weight") for p in ("gate", "up", "down"))


def _refuse(meta: Metadata, what: str, why: str) -> UnsupportedFeatureError:
    return UnsupportedFeatureError(f"{meta.where}: {what} is not supported ({why})")


def _rope(meta: Metadata, p: str, cfg: dict[str, Any], rotary: int) -> dict[str, Any] | None:
    """The full layers' llama3 rope_scaling from rope_freqs (one divisor per rotary pair), None without it."""
    tensor = meta.tensor("rope_freqs.weight")
    if tensor is None:
        return None
    from ferrum.gguf_import.tensors import dequantized  # (tensors reads the architectures table, which reads this)

    fitted = llama3_rope_scaling(dequantized(tensor, meta.where), rotary, cfg["rope_theta"])
    if fitted is None:
        raise _refuse(meta, "a step35 rope_freqs tensor that is not Llama 3's rope scaling over the full layers' "
                            f"{rotary} rotary dims", "Step 3.5's only rope scaling is llama3")
    return fitted or None


def step35_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The release's config keys from llama.cpp's per-layer arrays, ropes, clamps and routing."""
    blocks = cfg["num_hidden_layers"]
    layers = blocks - prediction_blocks(meta, p, blocks)
    if meta.get(p + "expert_gating_func", _SIGMOID_GATING) != _SIGMOID_GATING:
        raise _refuse(meta, f"{p}expert_gating_func {meta.get(p + 'expert_gating_func')}",
                      "Step 3.5 routes by sigmoid scores")
    if cfg["rope_scaling"] is not None:
        raise _refuse(meta, f"{cfg['rope_scaling']['rope_type']} rope scaling in a step35 file",
                      "llama.cpp's step35 scales the full layers alone; Step 3.5's scaling is llama3's, in rope_freqs")
    heads = [int(n) for n in per_layer(meta, p + "attention.head_count", blocks)][:layers]
    kv_heads = {int(n) for n in per_layer(meta, p + "attention.head_count_kv", blocks)[:layers]}
    sliding = [bool(f) for f in per_layer(meta, p + "attention.sliding_window_pattern", blocks)][:layers]
    if len(kv_heads) != 1:
        raise _refuse(meta, f"key/value heads {sorted(kv_heads)} by layer", "Step 3.5 has one count")
    kinds = [SLIDING if s else FULL for s in sliding]
    by_kind = {kind: {n for n, k in zip(heads, kinds) if k == kind} for kind in (FULL, SLIDING)}
    if any(len(counts) > 1 for counts in by_kind.values()) or not by_kind[FULL]:
        raise _refuse(meta, f"query heads {heads} on layers {kinds}",
                      "Step 3.5 gives every full layer one count and every sliding layer another, with a full layer")
    head_dim, rope_dims = cfg["head_dim"], int(meta.get(p + "rope.dimension_count", cfg["head_dim"]))
    full_rotary, swa_rotary = rope_dims // 2, int(meta.get(p + "rope.dimension_count_swa", rope_dims))
    swa_base = float32_value(meta.get(p + "rope.freq_base_swa", cfg["rope_theta"]))
    sparse = [i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" in meta.tensors]
    if not sparse:
        raise _refuse(meta, "a step35 file without experts", "Ferrum reads Step 3.5 with its sparse layers")
    clamps = {name: [float32_value(v) for v in per_layer(meta, f"{p}swiglu_clamp_{key}", blocks, 0.0)][:layers]
              for name, key in (("swiglu_limits", "exp"), ("swiglu_limits_shared", "shexp"))}
    full_heads = by_kind[FULL].pop()
    return {
        "num_hidden_layers": layers, "num_nextn_predict_layers": blocks - layers, "num_attention_heads": full_heads,
        "num_attention_groups": kv_heads.pop(), "layer_types": kinds, "sliding_window": int(
            meta.need(p + "attention.sliding_window")),
        "attention_other_setting": {"attention_type": SLIDING, "num_attention_heads": by_kind[SLIDING].pop(),
                                    "head_dim": head_dim} if by_kind[SLIDING] else {},
        "rope_theta": [swa_base if s else cfg["rope_theta"] for s in sliding],
        "partial_rotary_factors": [(swa_rotary if s else full_rotary) / head_dim for s in sliding],
        "rope_scaling": _rope(meta, p, cfg, full_rotary), "yarn_only_types": [FULL],
        "use_head_wise_attn_gate": "blk.0.attn_gate.weight" in meta.tensors, "use_qk_norm": True,
        "zero_centered": True, "moe_top_k": cfg["num_experts_per_tok"], "moe_layers_enum": ",".join(map(str, sparse)),
        "moe_router_scaling_factor": routed_scale(meta, p), "norm_expert_weight": bool(
            meta.get(p + "expert_weights_norm", False)),
        "moe_router_activation": "sigmoid", "use_moe_router_bias": True, **clamps,
    }
