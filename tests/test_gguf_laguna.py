"""GGUF imports of poolside's Laguna (``laguna``): a tiny random transformers Laguna written as llama.cpp's LagunaModel
writes it (q/k/v as they are, a query head count per block, the gate as attn_gate, each expert's gate / up / down
stacked, the correction bias as exp_probs_b, the shared expert as ffn_*_shexp, the sliding layers' rope base and
rotated dims as their _swa keys, no sliding-window pattern: llama.cpp's period of 4), imported, and run against
transformers (float32) or its float import (Q8_0)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from ferrum.errors import CheckpointError, UnsupportedFeatureError  # noqa: E402
from ferrum.gguf_import import convert_gguf  # noqa: E402
from gguf_writer import (  # noqa: E402
    add_metadata, add_tensors, assert_logits_match, config_writer, finish, imported, tiny_model,
)
from test_gguf_import import _moe_mapped  # noqa: E402

Q = gguf.GGMLQuantizationType
FULL, SLIDING = "full_attention", "sliding_attention"
#: Laguna-XS.2's layout, small: a full dense first layer then three sliding sparse ones (llama.cpp's period of 4, a
#: window of 4 the 12 test tokens pass) with half the query heads; half of each full head rotated, all of a sliding
#: one's, at another base; per-head gates.
_XS = dict(intermediate_size=32, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_hidden_layers=4,
           head_dim=32, num_experts=4, num_experts_per_tok=2, moe_routed_scaling_factor=2.5, sliding_window=4,
           layer_types=[FULL, SLIDING, SLIDING, SLIDING], num_attention_heads_per_layer=[4, 2, 2, 2],
           mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
           rope_parameters={FULL: {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                            SLIDING: {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 1.0}})
#: Laguna-M.1's: every layer full (no window), all four heads, per-element gates, two dense layers, YaRN over whole
#: heads.
_M = {**_XS, "sliding_window": 0, "layer_types": [FULL] * 4, "num_attention_heads_per_layer": [4] * 4,
      "gating": "per-element", "mlp_layer_types": ["dense", "dense", "sparse", "sparse"],
      "rope_parameters": {FULL: {"rope_type": "yarn", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
                                 "factor": 4.0, "original_max_position_embeddings": 32},
                          SLIDING: {"rope_type": "default", "rope_theta": 500.0}}}
#: transformers' names within a layer -> llama.cpp's (the rest by gguf's step35 map, whose tensors laguna's copies).
_OWN = {"self_attn.g_proj.weight": "attn_gate.weight", "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
        "mlp.experts.down_proj": "ffn_down_exps.weight",
        **{f"mlp.shared_experts.{p}_proj.weight": f"ffn_{p}_shexp.weight" for p in ("gate", "up", "down")}}


def _tiny(**settings):
    hf, config = tiny_model(transformers.LagunaConfig, **settings)
    with torch.no_grad():  # norms around 1; the correction bias spread so that it chooses other experts
        for name, tensor in [*hf.named_parameters(), *hf.named_buffers()]:
            if name.endswith("norm.weight"):
                tensor.normal_(1, 0.3)
            elif tensor.is_floating_point() and "rotary" not in name:
                tensor.normal_(0, 0.3)
    return hf, config


def _laguna_gguf(path: Path, hf, config, qtype, **overrides) -> None:
    """``hf`` as LagunaModel writes it; matrices as ``qtype``. ``overrides``: metadata written otherwise (None: not)."""
    w = config_writer(path, "laguna", config)
    ropes, head_dim = config.rope_parameters, config.head_dim
    full = ropes[FULL]
    if full["rope_type"] == "yarn":  # the converter's base set_gguf_parameters, from the full layers' parameters
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(full["factor"])
        w.add_rope_scaling_orig_ctx_len(full["original_max_position_embeddings"])
    meta = {"head_count": config.num_attention_heads_per_layer, "key_length": head_dim, "value_length": head_dim,
            "expert_count": config.num_experts, "expert_used_count": config.num_experts_per_tok,
            "expert_feed_forward_length": config.moe_intermediate_size,
            "expert_shared_feed_forward_length": config.shared_expert_intermediate_size, "expert_weights_norm": True,
            "expert_weights_scale": config.moe_routed_scaling_factor,
            "expert_gating_func": gguf.ExpertGatingFuncType.SIGMOID,
            "leading_dense_block_count": config.mlp_layer_types.index("sparse"),
            "rope_dimension_count": int(head_dim * full["partial_rotary_factor"]),
            "sliding_window": config.sliding_window or None, **overrides}
    if config.sliding_window:
        meta = {"rope_freq_base_swa": ropes[SLIDING]["rope_theta"],
                "rope_dimension_count_swa": int(head_dim * ropes[SLIDING]["partial_rotary_factor"]), **meta}
    add_metadata(w, meta)
    add_tensors(w, _moe_mapped(hf, config, gguf.MODEL_ARCH.STEP35, _OWN), qtype)
    finish(w)


@pytest.mark.parametrize(("settings", "qtype"), [(_XS, Q.F32), (_M, Q.F32), (_XS, Q.Q8_0), (_M, Q.Q8_0)],
                         ids=["XS-F32", "M-F32", "XS-Q8_0", "M-Q8_0"])
def test_laguna_gguf_matches_the_model_it_was_written_from(tmp_path, settings, qtype):
    """Imported as transformers' Laguna: float32 gives transformers' logits, Q8_0 its float import's."""
    hf, config = _tiny(**settings)
    _laguna_gguf(tmp_path / "m.gguf", hf, config, qtype)
    ours = imported(tmp_path, hf, qtype)
    arch = ours.arch
    assert ours.model_type == "laguna" and arch.moe.routed_scale == pytest.approx(2.5)
    assert arch.attn_gate_per_head is (settings is _XS) and arch.moe.router_softcap is None
    if settings is _XS:
        assert [(s.window, s.rope.rotary_dim, s.rope.theta, s.mlp, s.heads.query_heads) for s in arch.layers] == [
            (None, 16, 10000.0, "dense", None), (4, 32, 500.0, "moe", 2), (4, 32, 500.0, "moe", 2),
            (4, 32, 500.0, "moe", 2)]
    else:
        assert [(s.window, s.mlp) for s in arch.layers] == [(None, "dense"), (None, "dense"), (None, "moe"),
                                                            (None, "moe")]


def test_laguna_gguf_read_with_one_rope_misses_transformers(tmp_path):
    """Control: the file without the _swa rope keys (llama.cpp then rotates the sliding layers as the full ones: half
    of each head at rope.freq_base) misses transformers' logits, whose sliding layers rotate on their own."""
    hf, config = _tiny(**_XS)
    _laguna_gguf(tmp_path / "m.gguf", hf, config, Q.F32)
    assert_logits_match(hf, convert_gguf(tmp_path / "m.gguf", tmp_path / "ok"))
    _laguna_gguf(tmp_path / "one.gguf", hf, config, Q.F32, rope_freq_base_swa=None, rope_dimension_count_swa=None)
    with pytest.raises(AssertionError):
        assert_logits_match(hf, convert_gguf(tmp_path / "one.gguf", tmp_path / "out"))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"expert_weights_norm": None}, "expert_weights_norm"),
    ({"expert_gating_func": gguf.ExpertGatingFuncType.SOFTMAX}, "expert_gating_func"),
    ({"expert_shared_count": 2}, "expert_shared_count"),
    ({"sliding_window_pattern": [True, False, True, False]}, "sliding_window_pattern"),
])
def test_a_laguna_gguf_llama_cpp_runs_otherwise_is_refused(tmp_path, overrides, message):
    hf, config = _tiny(**_XS)
    _laguna_gguf(tmp_path / "m.gguf", hf, config, Q.F32, **overrides)
    with pytest.raises(UnsupportedFeatureError, match=message):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")


@pytest.mark.parametrize(("overrides", "message"), [
    ({"head_count": [4, 2, 2, 2, 2, 2]}, "head_count lists 6 layers' query heads, but the file has 4 blocks"),
    ({"expert_weights_scale": -2.5}, "expert_weights_scale is -2.5; it must be positive"),
])
def test_a_malformed_laguna_gguf_is_refused_by_name(tmp_path, overrides, message):
    """A head count per layer for more layers than blocks (it was cut short) and a negative scale (0 is llama.cpp's
    unset, read as 1) are the file's faults."""
    hf, config = _tiny(**_XS)
    _laguna_gguf(tmp_path / "m.gguf", hf, config, Q.F32, **overrides)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
