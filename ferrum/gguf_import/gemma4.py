"""Gemma 4 files (``gemma4``: 31B, E2B / E4B, 26B-A4B) back into transformers' Gemma4TextConfig and tensor names.

llama.cpp's converter writes Gemma 4's norms as they are (no ``1 + w``), and per layer what the family sets per
attention kind: ``attention.sliding_window_pattern`` (one flag a layer), ``key_length`` for the full layers'
heads and ``key_length_swa`` for the sliding ones', ``head_count_kv`` one per layer where the full layers have
their own count (31B's ``num_global_key_value_heads``), ``feed_forward_length`` one per layer where the shared-KV
layers are twice as wide (``use_double_wide_mlp``), and the full layers' "proportional" rope as a ``rope_freqs``
tensor: 1 for each pair that turns, 1e30 (no turn) for the rest. 26B-A4B's experts are stored with gate and up
fused, ``ffn_gate_up_exps [E, 2I, H]``, cut into the two stacks Ferrum reads (``gated_delta.fused_gate_up``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ferrum.errors import CheckpointError, UnsupportedFeatureError
from ferrum.gguf_import.files import Metadata, float32_value

#: Gemma 4's block tensors under their transformers names (Gemma 3's four norms, the layer scalar, E2B / E4B's
#: per-layer input, 26B-A4B's router and second norms).
TENSORS = (
    ("post_attention_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_norm.weight", "pre_feedforward_layernorm.weight"),
    ("post_ffw_norm.weight", "post_feedforward_layernorm.weight"),
    ("layer_output_scale.weight", "layer_scalar"),
    ("inp_gate.weight", "per_layer_input_gate.weight"),
    ("proj.weight", "per_layer_projection.weight"),
    ("post_norm.weight", "post_per_layer_input_norm.weight"),
    ("pre_ffw_norm_2.weight", "pre_feedforward_layernorm_2.weight"),
    ("post_ffw_norm_1.weight", "post_feedforward_layernorm_1.weight"),
    ("post_ffw_norm_2.weight", "post_feedforward_layernorm_2.weight"),
    ("ffn_gate_inp.weight", "router.proj.weight"),
    ("ffn_gate_inp.scale", "router.scale"),
    ("ffn_down_exps.scale", "router.per_expert_scale"),
    ("ffn_down_exps.weight", "switch_mlp.down_proj.weight"),
)
#: E2B / E4B's per-layer embeddings and their projection: GGUF -> transformers.
GLOBAL_TENSORS = {
    "per_layer_token_embd.weight": "model.embed_tokens_per_layer.weight",
    "per_layer_model_proj.weight": "model.per_layer_model_projection.weight",
    "per_layer_proj_norm.weight": "model.per_layer_projection_norm.weight",
}
#: What llama.cpp's rope_freqs holds for a pair the proportional rope leaves unturned.
_UNTURNED = 1e30


def _per_layer(meta: Metadata, key: str, layers: int) -> list[int]:
    value = meta.need(key)
    values = [int(v) for v in value] if isinstance(value, list) else [int(value)] * layers
    if len(values) != layers:
        raise CheckpointError(f"{meta.where}: {key} lists {len(values)} values for {layers} layers")
    return values


def _partial_rotary(freqs: np.ndarray | None, head_dim: int, where: str) -> float:
    """The full layers' partial_rotary_factor from llama.cpp's rope_freqs (1 per turning pair, then 1e30)."""
    if freqs is None:
        return 1.0
    freqs = np.asarray(freqs, dtype=np.float64).reshape(-1)
    turning = int(np.sum(freqs == 1.0))
    if len(freqs) != head_dim // 2 or not (freqs[turning:] >= _UNTURNED * 0.99).all():
        raise UnsupportedFeatureError(f"{where}: rope_freqs holds {len(freqs)} factors that are not Gemma 4's "
                                      f"proportional rope over {head_dim}-dim heads (1 per turning pair, then 1e30)")
    return 2 * turning / head_dim


def gemma4_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Gemma4TextConfig's keys from llama.cpp's per-layer reading of them (see the module docstring); values are
    the full layers' keys (``k_eq_v``) where those layers hold no ``attn_v``."""
    from ferrum.gguf_import.tensors import dequantized  # (tensors reads the architectures table, which reads this)

    where, layers = meta.where, cfg["num_hidden_layers"]
    freqs = meta.tensor("rope_freqs.weight")
    rope_freqs = None if freqs is None else dequantized(freqs, where)
    sliding = [bool(s) for s in meta.need(p + "attention.sliding_window_pattern")]
    if len(sliding) != layers or sliding[-1]:
        raise CheckpointError(f"{where}: {p}attention.sliding_window_pattern must flag each of the {layers} layers, "
                              "the last one full")
    kv = _per_layer(meta, p + "attention.head_count_kv", layers)
    ffn = _per_layer(meta, p + "feed_forward_length", layers)
    shared = int(meta.get(p + "attention.shared_kv_layers", 0))
    first_shared = layers - shared
    if any(w != ffn[0] for w in ffn[:first_shared]) or any(w not in (ffn[0], 2 * ffn[0]) for w in ffn[first_shared:]):
        raise UnsupportedFeatureError(f"{where}: {p}feed_forward_length {ffn} is not supported; Gemma 4 widens "
                                      "only its shared-KV layers' MLPs, to twice the others'")
    full = [i for i, s in enumerate(sliding) if not s]
    sliding_kv = {kv[i] for i, s in enumerate(sliding) if s} or {kv[-1]}
    if len(sliding_kv) > 1 or len({kv[i] for i in full}) > 1:
        raise UnsupportedFeatureError(f"{where}: {p}attention.head_count_kv {kv} differs within an attention kind")
    k_eq_v = f"blk.{full[0]}.attn_v.weight" not in meta.tensors
    head_dim = int(meta.get(p + "attention.key_length_swa", cfg["head_dim"]))
    rope_swa = int(meta.get(p + "rope.dimension_count_swa", head_dim))
    if rope_swa != head_dim:
        raise UnsupportedFeatureError(f"{where}: sliding layers rotating {rope_swa} of {head_dim} dims are not "
                                      "supported (Gemma 4's rotate them whole)")
    softcap = meta.get(p + "final_logit_softcapping")
    config = {
        "head_dim": head_dim, "global_head_dim": cfg["head_dim"], "intermediate_size": ffn[0],
        "num_key_value_heads": sliding_kv.pop(), "attention_k_eq_v": k_eq_v,
        "num_global_key_value_heads": kv[full[0]] if k_eq_v else None,
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "sliding_window": int(meta.need(p + "attention.sliding_window")),
        "final_logit_softcapping": None if softcap is None else float32_value(softcap),
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default",
                                  "rope_theta": float32_value(meta.get(p + "rope.freq_base_swa", 10_000.0))},
            "full_attention": {"rope_type": "proportional", "rope_theta": cfg["rope_theta"],
                               "partial_rotary_factor": _partial_rotary(rope_freqs, cfg["head_dim"], where)}},
        "hidden_size_per_layer_input": int(meta.get(p + "embedding_length_per_layer_input", 0)),
        "num_kv_shared_layers": shared, "use_double_wide_mlp": any(w != ffn[0] for w in ffn),
        "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False,
    }
    per_layer_embedding = meta.tensor("per_layer_token_embd.weight")
    if config["hidden_size_per_layer_input"] and per_layer_embedding is not None:
        config["vocab_size_per_layer_input"] = int(per_layer_embedding.shape[-1])  # GGUF lists rows last
    experts = meta.get(p + "expert_count")
    if experts:
        config.update(enable_moe_block=True, num_experts=int(experts),
                      top_k_experts=int(meta.need(p + "expert_used_count")),
                      moe_intermediate_size=int(meta.need(p + "expert_feed_forward_length")))
    return config
