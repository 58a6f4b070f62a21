"""GGUF import of GLM-5 (``glm-dsa``): tiny random transformers GlmMoeDsa models written as llama.cpp's GlmMoeDsaModel
writes them (DeepseekV2Model's latent attention with kv_b_proj split per head, sigmoid-routed experts, the DSA
indexer's sizes and, where given, which layers hold one; a next-token-prediction block after the decoder's),
imported, and run within index_topk tokens against transformers (float32 files) or the same file imported in float32
(Q8_0); the indexers are checked and dropped and the context capped at index_topk (ferrum.arch.dsa). Controls: the
routed scale unread misses transformers' logits; a longer context is refused."""

from __future__ import annotations

import types
from dataclasses import replace

import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from ferrum.errors import CheckpointError, ContextLengthExceededError, UnsupportedFeatureError  # noqa: E402
from ferrum.gguf_import import architectures, convert_gguf  # noqa: E402
from ferrum.gguf_import.glm_dsa import indexer_config  # noqa: E402
from gguf_writer import TINY_TOKENS, assert_logits_match, imported, tiny_model  # noqa: E402
from test_gguf_import import _DEEPSEEK2_SIZES, _deepseek2_gguf, _moved_norms_and_biases  # noqa: E402

Q = gguf.GGMLQuantizationType
TOPK = 16  # more than TINY_TOKENS: every query's keys all selected, as Ferrum runs them


def _tiny_glm_dsa(kinds: list[str] | None):
    """A random float32 GLM-5 over the DeepSeek-V3 test sizes, one group, routed scale 1.8, indexers of 2 heads of 32
    selecting TOPK keys on the layers ``kinds`` makes full (None: every layer, GLM-5 / 5.1's); norms and correction
    biases away from 1 and 0."""
    hf, config = tiny_model(transformers.GlmMoeDsaConfig, **_DEEPSEEK2_SIZES, q_lora_rank=32, n_shared_experts=1,
                             n_group=1, topk_group=1, routed_scaling_factor=1.8, norm_topk_prob=True, index_topk=TOPK,
                             index_head_dim=32, index_n_heads=2, indexer_types=kinds)
    return _moved_norms_and_biases(hf), config


def _glm_dsa_gguf(tmp_path, hf, config, qtype, types_written: bool, more=lambda w: None) -> None:
    """``hf`` as a glm-dsa file with one next-token-prediction block; the indexer types where ``types_written``."""
    def metadata(w):
        w.add_indexer_head_count(config.index_n_heads)
        w.add_indexer_key_length(config.index_head_dim)
        w.add_indexer_top_k(config.index_topk)
        if types_written:
            w.add_array("glm-dsa.attention.indexer.types", [kind == "full" for kind in config.indexer_types])
        more(w)

    _deepseek2_gguf(tmp_path / "m.gguf", hf, config, "split", qtype, prediction_layers=1, more_metadata=metadata,
                    arch="glm-dsa")


@pytest.mark.parametrize(("qtype", "kinds"), [
    (Q.F32, ["full", "shared", "full"]), (Q.F32, None), (Q.Q8_0, ["full", "shared", "full"]),
], ids=["F32-shared-layer", "F32-glm5-no-types", "Q8_0"])
def test_glm_dsa_gguf_matches_the_model_it_was_written_from(tmp_path, qtype, kinds):
    """Within index_topk tokens float32 files give transformers' logits (its indexers selecting every key), Q8_0 ones
    their float import's; a file without indexer types holds an indexer on every layer, as llama.cpp reads a GLM-5
    file of a context under a million tokens."""
    hf, config = _tiny_glm_dsa(kinds)
    _glm_dsa_gguf(tmp_path, hf, config, qtype, types_written=kinds is not None)
    ours = imported(tmp_path, hf, qtype)
    mla, moe, indexer = ours.arch.mla, ours.arch.moe, ours.arch.indexer
    assert ours.model_type == "glm_moe_dsa" and ours.num_layers == 3 and ours.max_seq_len == TOPK
    assert (mla.q_lora_rank, mla.kv_lora_rank, mla.nope, mla.rope, mla.v_head_dim) == (32, 32, 32, 16, 24)
    assert (indexer.heads, indexer.head_dim, indexer.topk) == (2, 32, TOPK)
    assert indexer.layers == ((True, False, True) if kinds else (True, True, True))
    assert [layer.mlp for layer in ours.arch.layers] == ["dense", "moe", "moe"]
    assert (moe.routing, moe.routed_scale, moe.normalize) == ("sigmoid_grouped", pytest.approx(1.8), True)
    assert ours.arch.layers[0].rope.interleaved


def test_glm_dsa_gguf_with_its_routed_scale_unread_misses_transformers(tmp_path, monkeypatch):
    """Control: the same file with expert_weights_scale read as 1 misses transformers' logits."""
    hf, config = _tiny_glm_dsa(["full", "shared", "full"])
    _glm_dsa_gguf(tmp_path, hf, config, Q.F32, types_written=True)
    glm_dsa = architectures.ARCHITECTURES["glm-dsa"]
    monkeypatch.setitem(architectures.ARCHITECTURES, "glm-dsa", replace(
        glm_dsa, configure=lambda m, p, c: {**glm_dsa.configure(m, p, c), "routed_scaling_factor": 1}))
    with pytest.raises(AssertionError):
        assert_logits_match(hf, convert_gguf(tmp_path / "m.gguf", tmp_path / "out"))


def test_a_glm_dsa_gguf_runs_no_longer_than_index_topk(tmp_path):
    import ferrum

    hf, config = _tiny_glm_dsa(None)
    _glm_dsa_gguf(tmp_path, hf, config, Q.F32, types_written=False)
    model = ferrum.load(convert_gguf(tmp_path / "m.gguf", tmp_path / "out"), backend="cpu").model
    with pytest.raises(ContextLengthExceededError, match=f"context length of {TOPK}"):
        model.forward_verify("long", (TINY_TOKENS * 2)[:TOPK + 1])


@pytest.mark.parametrize(("more", "error", "words"), [
    (lambda w: w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX), UnsupportedFeatureError,
     "expert_gating_func 1 is not supported; GLM-5 routes with the sigmoid gate"),
    (lambda w: w.add_array("glm-dsa.attention.indexer.types", [True, False]), CheckpointError,
     "indexer.types must flag each of the 3 decoder layers"),
], ids=["softmax", "types-of-two-layers"])
def test_a_glm_dsa_gguf_llama_cpp_runs_otherwise_is_refused(tmp_path, more, error, words):
    hf, config = _tiny_glm_dsa(None)
    _glm_dsa_gguf(tmp_path, hf, config, Q.F32, types_written=False, more=more)
    with pytest.raises(error, match=words):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("context", "kinds"), [
    (202752, "FFFFFF"),  # GLM-5 / 5.1: an indexer on every layer
    (1 << 20, "FFFSSS"),  # GLM-5.2's pattern: the first two layers, then one in four from the third
])
def test_a_glm_dsa_gguf_without_indexer_types_is_read_as_llama_cpp_guesses(context, kinds):
    sizes = {"glm-dsa.attention.indexer.head_count": 32, "glm-dsa.attention.indexer.key_length": 128,
             "glm-dsa.attention.indexer.top_k": 2048}
    meta = types.SimpleNamespace(get=lambda key, default=None: sizes.get(key, default), need=sizes.__getitem__,
                                 where="m.gguf")
    config = indexer_config(meta, "glm-dsa.", 6, context)
    assert "".join("F" if kind == "full" else "S" for kind in config["indexer_types"]) == kinds
    assert (config["index_n_heads"], config["index_head_dim"], config["index_topk"]) == (32, 128, 2048)
