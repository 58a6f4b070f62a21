"""GGUF imports of Arcee Trinity (``afmoe``): a tiny random transformers AFMoE written as llama.cpp's AfmoeModel writes
it (q/k as they are, the experts stacked, the correction bias as exp_probs_b, the window, routing numbers and dense
first layers in the metadata), imported, and run against transformers (float32) or its float import (Q8_0)."""

from __future__ import annotations

from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from ferrum.errors import UnsupportedFeatureError  # noqa: E402
from ferrum.gguf_import import convert_gguf  # noqa: E402
from gguf_writer import add_metadata, add_tensors, config_writer, finish, imported, tiny_model  # noqa: E402
from test_gguf_import import _moe_mapped  # noqa: E402

Q = gguf.GGMLQuantizationType
#: Trinity's layout, small: every fourth layer full (and NoPE, as llama.cpp fixes it), a window shorter than the
#: prompt, muP embeddings, route_scale, a shared expert and a dense first layer.
_SETTINGS = dict(intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4, head_dim=16, num_experts=4,
                 num_experts_per_tok=2, num_shared_experts=1, num_dense_layers=1, sliding_window=4,
                 global_attn_every_n_layers=4, mup_enabled=True, route_scale=2.5, tie_word_embeddings=False,
                 rms_norm_eps=1e-5)
#: AFMoE's own tensors: transformers' name within a layer -> llama.cpp's.
_OWN = {"self_attn.gate_proj.weight": "attn_gate.weight",
        "post_attention_layernorm.weight": "post_attention_norm.weight",
        "pre_mlp_layernorm.weight": "ffn_norm.weight", "post_mlp_layernorm.weight": "post_ffw_norm.weight",
        "mlp.expert_bias": "exp_probs_b.bias", "mlp.router.gate.weight": "ffn_gate_inp.weight",
        "mlp.experts.down_proj": "ffn_down_exps.weight"}


def _tiny():
    hf, config = tiny_model(transformers.AfmoeConfig, **_SETTINGS)
    with torch.no_grad():  # norms around 1; biases spread so that they choose other experts
        for name, param in hf.named_parameters():
            param.normal_(1, 0.3) if name.endswith("norm.weight") else param.normal_(0, 0.3)
    return hf, config


def _afmoe_gguf(path: Path, hf, config, qtype, **overrides) -> None:
    """``hf`` as AfmoeModel writes it; matrices as ``qtype``. ``overrides``: metadata written otherwise (None: not)."""
    w = config_writer(path, "afmoe", config)
    meta = {"key_length": 16, "value_length": 16, "rope_dimension_count": 16, "expert_count": 4,
            "expert_used_count": 2, "expert_shared_count": 1, "expert_feed_forward_length": 32,
            "leading_dense_block_count": 1, "expert_weights_norm": True, "expert_weights_scale": 2.5,
            "sliding_window": 4, **overrides}
    add_metadata(w, meta)
    tensors = _moe_mapped(hf, config, gguf.MODEL_ARCH.AFMOE, _OWN)
    add_tensors(w, tensors, qtype)
    finish(w)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
def test_afmoe_gguf_matches_the_model_it_was_written_from(tmp_path, qtype):
    """Imported as transformers' AFMoE as llama.cpp runs the file (its fixed pattern of four, muP on): float32 gives
    transformers' logits, Q8_0 its float import's."""
    hf, config = _tiny()
    _afmoe_gguf(tmp_path / "m.gguf", hf, config, qtype)
    ours = imported(tmp_path, hf, qtype)
    assert ours.model_type == "afmoe" and ours.arch.embed_scale == pytest.approx(8.0)
    assert [layer.window for layer in ours.arch.layers] == [4, 4, 4, None]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"expert_weights_norm": False}, "expert_weights_norm"),
    ({"sliding_window": None}, "sliding_window"),
    ({"expert_gating_func": gguf.ExpertGatingFuncType.SOFTMAX}, "expert_gating_func 1"),
])
def test_an_afmoe_gguf_llama_cpp_runs_otherwise_is_refused(tmp_path, overrides, message):
    hf, config = _tiny()
    _afmoe_gguf(tmp_path / "m.gguf", hf, config, Q.F32, **overrides)
    with pytest.raises(UnsupportedFeatureError, match=message):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
