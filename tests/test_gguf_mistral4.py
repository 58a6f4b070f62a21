"""GGUF import of Mistral Small 4 (``mistral4``): tiny random transformers Mistral4 models written as llama.cpp's
Mistral4Model (DeepseekV2Model's subclass) writes them (kv_b_proj split per head, one key/value head, YaRN's mscale as
0.1 * mscale_all_dim, the experts' gate and up in one ``ffn_gate_up_exps`` stack as transformers stores them, or
apart; softmax routing named by no gate key, its groups, scale and renormalisation), imported, and run against
transformers (float32 files) or the same file imported in float32 (Q8_0). Llama 4's query temperature is read only
where the file sets it, as llama.cpp runs it: the Hugging Face converter writes none, so such a file runs as
transformers does without the temperature. Controls: that file misses transformers with the temperature; what llama.cpp
or transformers run otherwise is refused by name."""

from __future__ import annotations

import re
from typing import Any, Callable

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from ferrum.errors import UnsupportedFeatureError  # noqa: E402
from ferrum.gguf_import import convert_gguf  # noqa: E402
from gguf_writer import TINY_TOKENS, assert_logits_match, imported, sentencepiece_vocab  # noqa: E402
from test_gguf_import import _DEEPSEEK2_SIZES, _deepseek2_gguf, _moved_norms_and_biases  # noqa: E402

Q = gguf.GGMLQuantizationType
ORIGINAL = 4  # YaRN's original context: Llama 4's temperature steps at positions 4 and 8 of the 12 tokens
BETA = 0.3


def _tiny(beta: float = BETA) -> tuple[Any, Any]:
    """A random float32 Mistral4ForCausalLM (transformers' auto classes map mistral4 to none) over the DeepSeek-V3 test
    sizes: a low-rank q, two groups of which one is kept, renormalised and scaled by 1.5, a dense first layer, YaRN with
    mscale_all_dim 0.8 and Llama 4's temperature ``beta``; norms away from 1."""
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
            "mscale": 0.8, "mscale_all_dim": 0.8, "beta_fast": 32.0, "beta_slow": 1.0, "llama_4_scaling_beta": beta}
    config = transformers.Mistral4Config(
        **_DEEPSEEK2_SIZES, vocab_size=len(sentencepiece_vocab()[0]), hidden_size=64, max_position_embeddings=128,
        q_lora_rank=32, n_group=2, topk_group=1, n_shared_experts=1, routed_scaling_factor=1.5, norm_topk_prob=True,
        rope_parameters=rope, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    hf = transformers.Mistral4ForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if not name.endswith("norm.weight"):
                param.normal_(0, 0.1)
    return _moved_norms_and_biases(hf), config


def _temperature(length: int = ORIGINAL) -> Callable[[Any], None]:
    """The temperature keys a converter that kept it would write (Mistral's own format writes them for deepseek2)."""
    return lambda w: (w.add_attn_temperature_scale(BETA), w.add_attn_temperature_length(length))


def _mistral4_gguf(tmp_path, hf, config, qtype, fused: bool = True, more: Callable[[Any], None] | None = None) -> None:
    _deepseek2_gguf(tmp_path / "m.gguf", hf, config, "split", qtype, more_metadata=more, arch="mistral4",
                    fused_experts=fused)


@pytest.mark.parametrize(("qtype", "fused", "tempered"), [
    (Q.F32, True, True), (Q.F32, False, False), (Q.Q8_0, True, True),
], ids=["F32-fused-tempered", "F32-apart-untempered", "Q8_0"])
def test_mistral4_gguf_matches_the_model_it_was_written_from(tmp_path, qtype, fused, tempered):
    """Float32 files give transformers' logits: with Llama 4's temperature where the file sets it, as transformers
    without it (llama_4_scaling_beta 0) where it does not; Q8_0 ones (kept packed) their float import's."""
    hf, config = _tiny(BETA if tempered else 0.0)
    _mistral4_gguf(tmp_path, hf, config, qtype, fused, _temperature() if tempered else None)
    ours = imported(tmp_path, hf, qtype)
    mla, moe = ours.arch.mla, ours.arch.moe
    assert ours.model_type == "mistral4" and (ours.num_layers, ours.num_heads, ours.num_kv_heads) == (3, 4, 4)
    assert (mla.q_lora_rank, mla.kv_lora_rank, mla.nope, mla.rope, mla.v_head_dim) == (32, 32, 32, 16, 24)
    assert [layer.mlp for layer in ours.arch.layers] == ["dense", "moe", "moe"]
    assert (moe.routing, moe.n_group, moe.topk_group, moe.normalize, moe.routed_scale) == (
        "softmax_top2_grouped", 2, 1, True, pytest.approx(1.5))
    assert ours.arch.layers[0].rope.interleaved
    assert ours.arch.query_scaling == ((pytest.approx(BETA), ORIGINAL) if tempered else None)
    assert ours.arch.attn_scale == pytest.approx(hf.model.layers[0].self_attn.scaling)


def test_a_mistral4_gguf_without_the_temperature_misses_transformers_with_it(tmp_path):
    """Control: the converter's file (no temperature keys) of a model whose config sets llama_4_scaling_beta runs as
    llama.cpp runs it, not as transformers runs the model, past YaRN's original context."""
    hf, config = _tiny()
    _mistral4_gguf(tmp_path, hf, config, Q.F32)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    with pytest.raises(AssertionError):
        assert_logits_match(hf, out)
    assert_logits_match(hf, out, TINY_TOKENS[:ORIGINAL])  # before the first step the temperature is 1


@pytest.mark.parametrize(("more", "words"), [
    (lambda w: w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID), "routed by the sigmoid gate"),
    (_temperature(length=8), "temperature_scale counted every 8 positions beside YaRN's original context 4"),
    (lambda w: w.add_nextn_predict_layers(1), "nextn_predict_layers in a mistral4 file"),
], ids=["sigmoid", "temperature-length", "prediction-layers"])
def test_a_mistral4_gguf_run_otherwise_is_refused(tmp_path, more, words):
    hf, config = _tiny()
    _mistral4_gguf(tmp_path, hf, config, Q.F32, more=more)
    with pytest.raises(UnsupportedFeatureError, match=re.escape(words)):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_mistral4_gguf_with_a_correction_bias_is_refused_naming_it(tmp_path):
    """llama.cpp would add an ``exp_probs_b`` bias to the choice of experts; Mistral 4 routes without one."""
    hf, config = _tiny()

    def bias(w):
        w.add_tensor("blk.1.exp_probs_b.bias", np.zeros(config.n_routed_experts, dtype=np.float32))

    _mistral4_gguf(tmp_path, hf, config, Q.F32, more=bias)
    with pytest.raises(UnsupportedFeatureError, match=r"blk\.1\.exp_probs_b\.bias"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
