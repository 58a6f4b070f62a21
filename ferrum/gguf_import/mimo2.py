"""MiMo-V2-Flash (``mimo2``) as llama.cpp runs such a file, in transformers' MiMoV2Flash terms.

llama.cpp reads the sliding layers from ``attention.sliding_window_pattern`` (one flag a block), their key/value heads
from the per-block ``attention.head_count_kv``, their rope base from ``rope.freq_base_swa`` (``rope.freq_base`` where
the file has none), and scales the attention output by ``attention.value_scale`` only where the file has it; it always
routes by sigmoid scores chosen with the correction bias, renormalised. The sparse layers are those with a router. Its
converter appends the release's next-token-prediction blocks, which are not run."""

from __future__ import annotations

from typing import Any

from ferrum.errors import CheckpointError, UnsupportedFeatureError
from ferrum.gguf_import.files import Metadata, float32_value, prediction_blocks

FULL, SLIDING = "full_attention", "sliding_attention"
#: Block tensors under transformers' MiMoV2Flash names (the sparse MLP's correction bias, each sliding layer's sinks).
TENSORS = (("attn_sinks.weight", "self_attn.sinks"), ("exp_probs_b.bias", "mlp.gate.e_score_correction_bias"))


def mimo2_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """config.json's MiMoV2Flash entries from a mimo2 file; a file llama.cpp runs otherwise than transformers can (no
    window, sliding layers without twice the full layers' key/value heads, scaled experts, rope scaling) is refused
    by name."""
    where, mtp = meta.where, prediction_blocks(meta, p, cfg["num_hidden_layers"])
    layers = cfg["num_hidden_layers"] - mtp
    window, flags = meta.get(p + "attention.sliding_window"), meta.get(p + "attention.sliding_window_pattern")
    if not window or not isinstance(flags, list) or len(flags) < layers or any(f not in (0, 1) for f in flags):
        raise CheckpointError(f"{where}: a mimo2 file needs {p}attention.sliding_window and "
                              f"{p}attention.sliding_window_pattern flagging each of its {layers} layers sliding "
                              "or not")
    kinds = [SLIDING if f else FULL for f in flags[:layers]]
    kv = meta.need(p + "attention.head_count_kv")
    kv = kv[:layers] if isinstance(kv, list) else [kv] * layers
    full = {k for k, kind in zip(kv, kinds) if kind == FULL} or {k // 2 for k in kv}
    sliding = {k for k, kind in zip(kv, kinds) if kind == SLIDING} or {2 * k for k in full}
    if len(full) != 1 or sliding != {2 * k for k in full}:
        raise UnsupportedFeatureError(f"{where}: key/value heads {sorted(full)} (full layers) and {sorted(sliding)} "
                                      "(sliding) are not supported: transformers' MiMo-V2-Flash gives the sliding "
                                      "layers twice the full layers'")
    if cfg.get("rope_scaling"):
        raise UnsupportedFeatureError(f"{where}: rope scaling in a mimo2 file is not supported (transformers' "
                                      "MiMo-V2-Flash reads plain rope per attention kind)")
    scale = meta.get(p + "expert_weights_scale")
    if scale not in (None, 0, 1):
        raise UnsupportedFeatureError(f"{where}: {p}expert_weights_scale {scale} is not supported (no MiMo-V2 release "
                                      "scales its routed experts)")
    factor = cfg.get("partial_rotary_factor", 1.0)
    base_swa = meta.get(p + "rope.freq_base_swa")
    theta = {FULL: cfg["rope_theta"], SLIDING: cfg["rope_theta"] if base_swa is None else float32_value(base_swa)}
    value_scale = meta.get(p + "attention.value_scale")
    return {
        "num_hidden_layers": layers, "num_nextn_predict_layers": mtp, "num_key_value_heads": full.pop(),
        "v_head_dim": int(meta.need(p + "attention.value_length")), "sliding_window": int(window),
        "layer_types": kinds,
        "mlp_layer_types": ["sparse" if f"blk.{i}.ffn_gate_inp.weight" in meta.tensors else "dense"
                            for i in range(layers)],
        "rope_parameters": {kind: {"rope_type": "default", "rope_theta": theta[kind], "partial_rotary_factor": factor}
                            for kind in (FULL, SLIDING)},
        "rope_scaling": None,
        # llama.cpp scales nothing where the file says nothing (transformers' default is 0.707)
        "attention_value_scale": 1.0 if value_scale is None else float32_value(value_scale),
        "attention_bias": "blk.0.attn_q.bias" in meta.tensors,
    }
