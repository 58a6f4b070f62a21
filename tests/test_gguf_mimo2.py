"""GGUF imports of MiMo-V2-Flash (``mimo2``): a tiny random transformers MiMoV2Flash written as llama.cpp's MimoV2Model
writes it (q/k/v as they are, each expert's gate / up / down stacked, the correction bias as exp_probs_b, the sinks
as attn_sinks, key/value heads and the sliding flags per block, values narrower than the keys as value_length, the
sliding layers' rope base as rope.freq_base_swa, the value scale as attention.value_scale), imported, and run against
transformers (float32) or its float import (Q8_0)."""

from __future__ import annotations

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
#: MiMo-V2-Flash's layout, small: a full dense first layer, then sliding sparse ones (twice the key/value heads, with
#: sinks, a window of 4 the 12 test tokens pass) and a full sparse one; values half the keys' width, half of each head
#: rotated, at another base on the sliding layers.
_KINDS = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
_ROPE = {"full_attention": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
         "sliding_attention": {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5}}
_SETTINGS = dict(intermediate_size=32, moe_intermediate_size=32, num_hidden_layers=4, head_dim=64, v_head_dim=32,
                 n_routed_experts=4, num_experts_per_tok=2, num_key_value_heads=1, sliding_window=4, layer_types=_KINDS,
                 mlp_layer_types=["dense", "sparse", "sparse", "sparse"], rope_parameters=_ROPE,
                 attention_value_scale=0.6)
#: transformers' names within a layer -> llama.cpp's.
_OWN = {"mlp.gate.weight": "ffn_gate_inp.weight", "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
        "mlp.experts.down_proj": "ffn_down_exps.weight", "self_attn.sinks": "attn_sinks.weight"}


def _tiny(**settings):
    hf, config = tiny_model(transformers.MiMoV2FlashConfig, **{**_SETTINGS, **settings})
    with torch.no_grad():  # norms around 1; the correction bias (a buffer) spread so that it chooses other experts
        for name, tensor in [*hf.named_parameters(), *hf.named_buffers()]:
            if name.endswith("norm.weight"):
                tensor.normal_(1, 0.3)
            elif tensor.is_floating_point() and "rotary" not in name:
                tensor.normal_(0, 0.3)
    return hf, config


def _mimo2_gguf(path: Path, hf, config, qtype, mtp: int = 0, **overrides) -> None:
    """``hf`` as MimoV2Model writes it; matrices as ``qtype``; ``mtp`` next-token-prediction blocks appended (sliding,
    the last layer's tensors). ``overrides``: metadata written otherwise (None: not)."""
    sliding = [kind == "sliding_attention" for kind in config.layer_types] + [True] * mtp
    kv = config.num_key_value_heads
    w = config_writer(path, "mimo2", config, extra_blocks=mtp, kv_heads=[2 * kv if s else kv for s in sliding])
    if mtp:
        w.add_nextn_predict_layers(mtp)
    meta = {"key_length": 64, "value_length": 32, "rope_dimension_count": 32, "expert_count": 4,
            "expert_used_count": 2, "expert_feed_forward_length": 32, "sliding_window": config.sliding_window,
            "sliding_window_pattern": sliding, "rope_freq_base_swa": 500.0,
            "value_scale": config.attention_value_scale, **overrides}
    value_scale = meta.pop("value_scale")
    if value_scale is not None:  # llama-arch.cpp's key, which gguf 0.19 has no writer for
        w.add_float32("mimo2.attention.value_scale", value_scale)
    add_metadata(w, meta)
    tensors = _moe_mapped(hf, config, gguf.MODEL_ARCH.MIMO2, _OWN)
    last = f"blk.{config.num_hidden_layers - 1}."
    tensors.update({name.replace(last, f"blk.{config.num_hidden_layers + i}."): a for name, a in list(tensors.items())
                    if name.startswith(last) for i in range(mtp)})
    add_tensors(w, tensors, qtype)
    finish(w)


@pytest.mark.parametrize(("qtype", "mtp"), [(Q.F32, 0), (Q.F32, 1), (Q.Q8_0, 0)], ids=["F32", "F32-mtp", "Q8_0"])
def test_mimo2_gguf_matches_the_model_it_was_written_from(tmp_path, qtype, mtp):
    """Imported as transformers' MiMo-V2-Flash (the converter's next-token-prediction blocks not read): float32 gives
    transformers' logits, Q8_0 its float import's."""
    hf, config = _tiny()
    _mimo2_gguf(tmp_path / "m.gguf", hf, config, qtype, mtp)
    ours = imported(tmp_path, hf, qtype)
    assert ours.model_type == "mimo_v2_flash" and ours.arch.value_scale == pytest.approx(0.6)
    assert [layer.window for layer in ours.arch.layers] == [None, 4, 4, None]
    assert [layer.rope.theta for layer in ours.arch.layers] == [10000.0, 500.0, 500.0, 10000.0]


def test_a_mimo2_gguf_without_a_value_scale_runs_unscaled(tmp_path):
    """llama.cpp scales the values only where the file says: a file without attention.value_scale is the model with
    attention_value_scale 1 (transformers' default, 0.707, would miss it)."""
    hf, config = _tiny(attention_value_scale=1.0)
    _mimo2_gguf(tmp_path / "m.gguf", hf, config, Q.F32, value_scale=None)
    assert_logits_match(hf, convert_gguf(tmp_path / "m.gguf", tmp_path / "out"))


def test_mimo2_gguf_read_with_one_rope_base_misses_transformers(tmp_path):
    """Control: the file without rope.freq_base_swa (llama.cpp then rotates the sliding layers at rope.freq_base too)
    misses transformers' logits, whose sliding layers rotate at their own base."""
    hf, config = _tiny()
    _mimo2_gguf(tmp_path / "m.gguf", hf, config, Q.F32, rope_freq_base_swa=None)
    with pytest.raises(AssertionError):
        assert_logits_match(hf, convert_gguf(tmp_path / "m.gguf", tmp_path / "out"))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"expert_weights_scale": 2.0}, "expert_weights_scale"),
    ({"sliding_window_pattern": None}, "sliding_window_pattern"),
])
def test_a_mimo2_gguf_llama_cpp_runs_otherwise_is_refused(tmp_path, overrides, message):
    hf, config = _tiny()
    _mimo2_gguf(tmp_path / "m.gguf", hf, config, Q.F32, **overrides)
    with pytest.raises((UnsupportedFeatureError, CheckpointError), match=message):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")


def test_a_q8_0_o_proj_whose_blocks_cut_the_value_heads_is_refused_by_their_width(tmp_path):
    """Values 48 wide, padded to the keys' 64 at load: Q8_0's 32-value blocks of o_proj's inputs do not end where
    a value head does, so the file is refused, naming the heads' width (48, not the keys')."""
    hf, config = _tiny(v_head_dim=48)
    _mimo2_gguf(tmp_path / "m.gguf", hf, config, Q.Q8_0, value_length=48)
    with pytest.raises(UnsupportedFeatureError, match="heads of 48 inputs do; Ferrum pads them to 64"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
