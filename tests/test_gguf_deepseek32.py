"""GGUF import of DeepSeek-V3.2 (``deepseek32``): tiny random transformers DeepseekV32 models written as llama.cpp's
DeepseekV32Model writes them (DeepseekV2Model's latent attention with kv_b_proj split per head, grouped sigmoid-routed
experts with their correction bias, YaRN, the DSA indexers' sizes, a next-token-prediction block after the decoder's),
imported, and run within index_topk tokens against transformers (float32 files) or the same file imported in float32
(Q8_0); the indexers, one on every layer, are checked and dropped and the context capped at index_topk
(ferrum.arch.dsa). Control: the routed scale unread misses transformers' logits."""

from __future__ import annotations

from dataclasses import replace

import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from ferrum.errors import CheckpointError, UnsupportedFeatureError  # noqa: E402
from ferrum.gguf_import import architectures, convert_gguf  # noqa: E402
from gguf_writer import assert_logits_match, imported, tiny_model  # noqa: E402
from test_gguf_import import _DEEPSEEK2_SIZES, _DEEPSEEK2_YARN, _deepseek2_gguf, _moved_norms_and_biases  # noqa: E402

Q = gguf.GGMLQuantizationType
TOPK = 16  # more than the tokens compared: every query's keys all selected, as Ferrum runs them
GATING = "deepseek32.expert_gating_func"


def _tiny_deepseek32():
    """A random float32 DeepSeek-V3.2 over the DeepSeek-V3 test sizes: two expert groups of which one is kept,
    routed scale 2.5, renormalised, YaRN, indexers of 2 heads of 32 selecting TOPK keys; norms and correction biases
    away from 1 and 0."""
    hf, config = tiny_model(transformers.DeepseekV32Config, **_DEEPSEEK2_SIZES, q_lora_rank=32, n_group=2,
                             topk_group=1, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                             rope_parameters=_DEEPSEEK2_YARN, index_topk=TOPK, index_head_dim=32, index_n_heads=2)
    return _moved_norms_and_biases(hf), config


def _deepseek32_gguf(tmp_path, hf, config, qtype, more=lambda w: None) -> None:
    """``hf`` as a deepseek32 file with one next-token-prediction block (gguf 0.19 has no deepseek32 tensor map:
    glm-dsa's names the same tensors)."""
    def metadata(w):
        w.add_indexer_head_count(config.index_n_heads)
        w.add_indexer_key_length(config.index_head_dim)
        w.add_indexer_top_k(config.index_topk)
        more(w)

    _deepseek2_gguf(tmp_path / "m.gguf", hf, config, "split", qtype, prediction_layers=1, more_metadata=metadata,
                    arch="deepseek32", names_of="glm-dsa")


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
def test_deepseek32_gguf_matches_the_model_it_was_written_from(tmp_path, qtype):
    """Within index_topk tokens float32 files give transformers' logits (its indexers selecting every key), Q8_0 ones
    their float import's."""
    hf, config = _tiny_deepseek32()
    _deepseek32_gguf(tmp_path, hf, config, qtype)
    ours = imported(tmp_path, hf, qtype)
    mla, moe, indexer = ours.arch.mla, ours.arch.moe, ours.arch.indexer
    assert ours.model_type == "deepseek_v32" and ours.num_layers == 3 and ours.max_seq_len == TOPK
    assert (mla.q_lora_rank, mla.kv_lora_rank, mla.nope, mla.rope, mla.v_head_dim) == (32, 32, 32, 16, 24)
    assert (indexer.heads, indexer.head_dim, indexer.topk, indexer.layers) == (2, 32, TOPK, (True, True, True))
    assert [layer.mlp for layer in ours.arch.layers] == ["dense", "moe", "moe"]
    assert (moe.routing, moe.routed_scale, moe.normalize) == ("sigmoid_grouped", pytest.approx(2.5), True)
    assert (moe.n_group, moe.topk_group) == (2, 1)
    assert ours.arch.layers[0].rope.interleaved


def test_deepseek32_gguf_with_its_routed_scale_unread_misses_transformers(tmp_path, monkeypatch):
    """Control: the same file with expert_weights_scale read as 1 misses transformers' logits."""
    hf, config = _tiny_deepseek32()
    _deepseek32_gguf(tmp_path, hf, config, Q.F32)
    deepseek32 = architectures.ARCHITECTURES["deepseek32"]
    monkeypatch.setitem(architectures.ARCHITECTURES, "deepseek32", replace(
        deepseek32, configure=lambda m, p, c: {**deepseek32.configure(m, p, c), "routed_scaling_factor": 1}))
    with pytest.raises(AssertionError):
        assert_logits_match(hf, convert_gguf(tmp_path / "m.gguf", tmp_path / "out"))


@pytest.mark.parametrize(("more", "error", "words"), [
    (lambda w: w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX), UnsupportedFeatureError,
     "expert_gating_func 1 is not supported; DeepSeek-V3.2 routes with the sigmoid gate"),
    (lambda w: w.kv_data[0].pop(GATING), CheckpointError, f"GGUF metadata lacks '{GATING}'"),
], ids=["softmax", "no-gate"])
def test_a_deepseek32_gguf_llama_cpp_runs_otherwise_or_not_at_all_is_refused(tmp_path, more, error, words):
    """A softmax gate (llama.cpp would run it, transformers' DeepSeek-V3.2 has none) and a file naming no gate (which
    llama.cpp refuses to load)."""
    hf, config = _tiny_deepseek32()
    _deepseek32_gguf(tmp_path, hf, config, Q.F32, more=more)
    with pytest.raises(error, match=words):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
