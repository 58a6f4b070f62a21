"""GGUF imports of MiniMax-M2 (``minimax-m2``): a tiny random transformers MiniMaxM2 written as llama.cpp's
MiniMaxM2Model writes it (q/k as they are, each expert's w1 / w3 / w2 stacked, the correction bias as exp_probs_b, the
rotary dims as rope.dimension_count, the sigmoid gate from scoring_func), imported, and run against transformers
(float32) or its float import (Q8_0)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from ferrum.errors import UnsupportedFeatureError  # noqa: E402
from ferrum.gguf_import import architectures, convert_gguf  # noqa: E402
from gguf_writer import (  # noqa: E402
    add_metadata, add_tensors, assert_logits_match, config_writer, finish, imported, tiny_model,
)
from test_gguf_import import _moe_mapped  # noqa: E402

Q = gguf.GGMLQuantizationType
#: MiniMax-M2's layout, small: half of each head rotated (M2's 64 of 128), four experts, two chosen.
_SETTINGS = dict(intermediate_size=32, num_hidden_layers=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                 partial_rotary_factor=0.5, tie_word_embeddings=False)
#: MiniMax-M2's own tensors: transformers' name within a layer -> llama.cpp's.
_OWN = {"mlp.gate.weight": "ffn_gate_inp.weight", "mlp.e_score_correction_bias": "exp_probs_b.bias",
        "mlp.experts.down_proj": "ffn_down_exps.weight"}


def _tiny():
    hf, config = tiny_model(transformers.MiniMaxM2Config, **_SETTINGS)
    with torch.no_grad():  # norms around 1; the correction bias (a buffer) spread so that it chooses other experts
        for name, tensor in [*hf.named_parameters(), *hf.named_buffers()]:
            if name.endswith("norm.weight"):
                tensor.normal_(1, 0.3)
            elif tensor.is_floating_point() and "rotary" not in name:
                tensor.normal_(0, 0.3)
    return hf, config


def _minimax_m2_gguf(path: Path, hf, config, qtype, **overrides) -> None:
    """``hf`` as MiniMaxM2Model writes it; matrices as ``qtype``. ``overrides``: metadata written otherwise (None:
    not)."""
    w = config_writer(path, "minimax-m2", config)
    meta = {"key_length": 16, "value_length": 16, "rope_dimension_count": 8, "expert_count": 4,
            "expert_used_count": 2, "expert_feed_forward_length": 32,
            "expert_gating_func": gguf.ExpertGatingFuncType.SIGMOID, **overrides}
    add_metadata(w, meta)
    tensors = _moe_mapped(hf, config, gguf.MODEL_ARCH.MINIMAXM2, _OWN)
    add_tensors(w, tensors, qtype)
    finish(w)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
def test_minimax_m2_gguf_matches_the_model_it_was_written_from(tmp_path, qtype):
    """Imported as transformers' MiniMax-M2: float32 gives transformers' logits, Q8_0 its float import's."""
    hf, config = _tiny()
    _minimax_m2_gguf(tmp_path / "m.gguf", hf, config, qtype)
    ours = imported(tmp_path, hf, qtype)
    assert ours.model_type == "minimax_m2" and ours.arch.layers[0].rope.rotary_dim == 8
    assert ours.arch.moe.routing == "sigmoid_grouped" and ours.arch.moe.normalize


def test_minimax_m2_gguf_read_with_llamas_rows_misses_transformers(tmp_path, monkeypatch):
    """Control: the same file with its q/k rows un-permuted as Llama's (which llama.cpp's converter permutes,
    MiniMax-M2's it leaves) misses transformers' logits."""
    hf, config = _tiny()
    _minimax_m2_gguf(tmp_path / "m.gguf", hf, config, Q.F32)
    monkeypatch.setitem(architectures.ARCHITECTURES, "minimax-m2",
                        replace(architectures.ARCHITECTURES["minimax-m2"], permuted_qk=True))
    with pytest.raises(AssertionError):
        assert_logits_match(hf, convert_gguf(tmp_path / "m.gguf", tmp_path / "out"))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"expert_gating_func": gguf.ExpertGatingFuncType.SOFTMAX}, "expert_gating_func 1"),
    ({"expert_weights_scale": 2.0}, "expert_weights_scale"),
])
def test_a_minimax_m2_gguf_llama_cpp_runs_otherwise_is_refused(tmp_path, overrides, message):
    hf, config = _tiny()
    _minimax_m2_gguf(tmp_path / "m.gguf", hf, config, Q.F32, **overrides)
    with pytest.raises(UnsupportedFeatureError, match=message):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
