"""GGUF imports of K-EXAONE (``exaone-moe``): a tiny random transformers ExaoneMoe written as llama.cpp's
ExaoneMoEModel writes it (q/k rows as they are, the experts stacked, the correction bias as exp_probs_b, the shared
MLP's width, the window and the per-layer sliding flags, routing numbers and dense first layers in the metadata, a
next-token-prediction block after the decoder's), imported, and run against transformers (float32) or its float
import (Q8_0). Control: the sliding layers' flags inverted miss transformers' logits."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from ferrum.errors import CheckpointError, UnsupportedFeatureError  # noqa: E402
from ferrum.gguf_import import architectures, convert_gguf  # noqa: E402
from gguf_writer import (  # noqa: E402
    add_metadata, add_tensors, assert_logits_match, config_writer, finish, imported, tiny_model,
)
from test_gguf_import import _moe_mapped, _moved_norms_and_biases  # noqa: E402

Q = gguf.GGMLQuantizationType
#: K-EXAONE's layout, small: three sliding layers (rotated) to one full NoPE one, a window shorter than the prompt,
#: q/k norms, two expert groups of which one is kept, a shared MLP two experts wide, a dense first layer.
_SETTINGS = dict(intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4, head_dim=16, num_experts=8,
                 num_experts_per_tok=2, num_shared_experts=2, first_k_dense_replace=1, sliding_window=4,
                 sliding_window_pattern=4, n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                 tie_word_embeddings=False, rms_norm_eps=1e-5)
#: ExaoneMoe's own tensors: transformers' name within a layer -> llama.cpp's.
_OWN = {"mlp.gate.e_score_correction_bias": "exp_probs_b.bias", "mlp.experts.down_proj": "ffn_down_exps.weight"}


def _tiny():
    hf, config = tiny_model(transformers.ExaoneMoeConfig, **_SETTINGS)
    return _moved_norms_and_biases(hf, 0.3), config


def _exaone_moe_gguf(path: Path, hf, config, qtype, **overrides) -> None:
    """``hf`` as ExaoneMoEModel writes it with one next-token-prediction block (random: the import must leave it
    unread); matrices as ``qtype``. ``overrides``: metadata written otherwise (None: not)."""
    w = config_writer(path, "exaone-moe", config, extra_blocks=1)
    meta = {"key_length": 16, "value_length": 16, "expert_count": 8, "expert_used_count": 2,
            "expert_group_count": 2, "expert_group_used_count": 1,
            "expert_gating_func": gguf.ExpertGatingFuncType.SIGMOID, "vocab_size": config.vocab_size,
            "sliding_window": 4, "sliding_window_pattern": [t == "sliding_attention" for t in config.layer_types],
            "expert_feed_forward_length": 32, "expert_shared_count": 2, "expert_shared_feed_forward_length": 64,
            "expert_weights_scale": 2.5, "expert_weights_norm": True, "leading_dense_block_count": 1,
            "nextn_predict_layers": 1, "rope_scaling_type": gguf.RopeScalingType.NONE, **overrides}
    add_metadata(w, meta)
    tensors = _moe_mapped(hf, config, gguf.MODEL_ARCH.EXAONE_MOE, _OWN)
    last = f"blk.{config.num_hidden_layers - 1}."
    rng = np.random.default_rng(1)
    tensors.update({name.replace(last, f"blk.{config.num_hidden_layers}."): rng.standard_normal(a.shape)
                    for name, a in tensors.items() if name.startswith(last)})
    add_tensors(w, tensors, qtype)
    finish(w)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
def test_exaone_moe_gguf_matches_the_model_it_was_written_from(tmp_path, qtype):
    """Imported as transformers' ExaoneMoe as llama.cpp runs the file: float32 gives transformers' logits, Q8_0 its
    float import's."""
    hf, config = _tiny()
    _exaone_moe_gguf(tmp_path / "m.gguf", hf, config, qtype)
    ours = imported(tmp_path, hf, qtype)
    moe = ours.arch.moe
    assert ours.model_type == "exaone_moe" and ours.num_layers == 4
    assert [layer.window for layer in ours.arch.layers] == [4, 4, 4, None]
    assert [layer.mlp for layer in ours.arch.layers] == ["dense", "moe", "moe", "moe"]
    assert (moe.routing, moe.routed_scale, moe.normalize, moe.n_group, moe.topk_group) == (
        "sigmoid_grouped", pytest.approx(2.5), True, 2, 1)


def test_an_exaone_moe_gguf_read_with_its_sliding_layers_inverted_misses_transformers(tmp_path, monkeypatch):
    """Control: the same file with the full layer sliding and rotated, the sliding ones full and NoPE, misses."""
    hf, config = _tiny()
    _exaone_moe_gguf(tmp_path / "m.gguf", hf, config, Q.F32)
    family = architectures.ARCHITECTURES["exaone-moe"]

    def inverted(meta, p, cfg):
        got = family.configure(meta, p, cfg)
        flip = {"sliding_attention": "full_attention", "full_attention": "sliding_attention"}
        return {**got, "layer_types": [flip[kind] for kind in got["layer_types"]]}

    monkeypatch.setitem(architectures.ARCHITECTURES, "exaone-moe", replace(family, configure=inverted))
    with pytest.raises(AssertionError):
        assert_logits_match(hf, convert_gguf(tmp_path / "m.gguf", tmp_path / "out"))


def test_an_exaone_moe_gguf_with_a_sliding_period_runs_it(tmp_path):
    """A period (llama.cpp's scalar sliding_window_pattern) in place of the list: every second layer full here, as
    transformers' sliding_window_pattern 2 makes them."""
    hf, config = tiny_model(transformers.ExaoneMoeConfig, **{**_SETTINGS, "sliding_window_pattern": 2})
    _exaone_moe_gguf(tmp_path / "m.gguf", hf, config, Q.F32, sliding_window_pattern=2)
    ours = imported(tmp_path, hf, Q.F32)
    assert [layer.window for layer in ours.arch.layers] == [4, None, 4, None]


@pytest.mark.parametrize(("overrides", "error", "message"), [
    ({"expert_gating_func": gguf.ExpertGatingFuncType.SOFTMAX}, UnsupportedFeatureError,
     "expert_gating_func 1 is not supported; K-EXAONE routes with the sigmoid gate"),
    ({"expert_gating_func": None}, CheckpointError, "lacks 'exaone-moe.expert_gating_func'"),
    ({"sliding_window": None}, CheckpointError, "lacks 'exaone-moe.attention.sliding_window'"),
    ({"sliding_window_pattern": [True, False, True, False]}, UnsupportedFeatureError,
     "leaves a per-layer list unread and runs three sliding layers in every four"),
    ({"expert_shared_feed_forward_length": 48}, UnsupportedFeatureError,
     "a shared MLP 48 wide beside experts 32 wide is not supported"),
], ids=["softmax", "no-gate", "no-window", "other-layers-listed", "shared-width"])
def test_an_exaone_moe_gguf_llama_cpp_runs_otherwise_or_not_at_all_is_refused(tmp_path, overrides, error, message):
    hf, config = _tiny()
    _exaone_moe_gguf(tmp_path / "m.gguf", hf, config, Q.F32, **overrides)
    with pytest.raises(error, match=message):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
