"""GGUF import of Ling 2.0 and Sarvam-MoE (``bailingmoe2``), written as llama.cpp's BailingMoeV2Model and SarvamMoEModel
convert their releases (q/k/v fused as stored, the correction bias as exp_probs_b, the experts stacked, rope over
partial_rotary_factor of each head (the converter's default half) or, Sarvam's, the whole head; Sarvam's biases less
their mean and its pre-tokenizer named; next-token-prediction blocks appended after the decoder's), imported, and run
against the model written: transformers' SarvamMoE, which routes as llama.cpp's bailingmoe2 graph does (dropped
groups masked with -inf), with correction biases of both signs, as Sarvam and as Ling; mlx-lm's bailing_moe for a Ling
release with shared experts of their own width and a prediction block (float32), or the same file imported in float32
(Q8_0). Control: the Ling import's biases left as stored (mlx-lm's rule masks dropped groups with 0) miss
transformers'; what llama.cpp or the reference run otherwise is refused by name."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("mlx_lm")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ferrum.config import ModelConfig  # noqa: E402
from ferrum.errors import UnsupportedFeatureError  # noqa: E402
from ferrum.gguf_import import bailing, convert_gguf  # noqa: E402
from gguf_writer import (  # noqa: E402
    TINY_TOKENS, add_metadata, add_sentencepiece_vocab, add_tensor, assert_runs_as_its_float_import, ferrum_logits,
    finish, sentencepiece_vocab,
)
from support import build_transformers_model, mlx_lm_logits, scaled_error  # noqa: E402
from test_bailing_moe import build_mlx_lm_checkpoint  # noqa: E402

Q = gguf.GGMLQuantizationType
VOCAB = len(sentencepiece_vocab()[0])
#: transformers' SarvamMoE: eight experts of 24 in two groups, one kept, three a token, one shared; a dense first layer.
SARVAM = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, n_routed_experts=8, num_experts_per_tok=3,
              n_group=2, topk_group=1, max_position_embeddings=256)
#: mlx-lm's Ling 2.0 (tests/test_bailing_moe.py's v2): 16 experts in four groups, two kept, shared experts 48 wide.
LING = dict(model_type="bailing_moe", architectures=["BailingMoeV2ForCausalLM"], vocab_size=VOCAB, hidden_size=64,
            intermediate_size=128, max_position_embeddings=256, moe_intermediate_size=32, num_experts=16,
            num_shared_experts=1, norm_topk_prob=True, num_attention_heads=4, num_experts_per_tok=2,
            num_hidden_layers=3, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0, first_k_dense_replace=1,
            tie_word_embeddings=False, use_qk_norm=True, partial_rotary_factor=0.5, score_function="sigmoid",
            moe_router_enable_expert_bias=True, n_group=4, topk_group=2, routed_scaling_factor=2.5,
            moe_shared_expert_intermediate_size=48, head_dim=16, num_nextn_predict_layers=0)


def _sarvam_release(folder: Path, rotary: float) -> tuple[dict, np.ndarray]:
    """A random SarvamMoE (rope over ``rotary`` of each head) saved under its release's names at ``folder``, half its
    correction biases so negative that a kept group's third choice scores below 0; its config in Ling's words and
    transformers' logits over TINY_TOKENS."""
    hf = build_transformers_model(folder, transformers.SarvamMoEConfig(**SARVAM, partial_rotary_factor=rotary))
    with torch.no_grad():
        for name, buffer in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):  # every other expert's far below 0, the rest above
                rest = torch.rand(buffer.shape, generator=torch.Generator().manual_seed(len(name))) / 2
                buffer.copy_(torch.where(torch.arange(len(buffer)) % 2 == 1, -2.0 - rest, rest))
        want = hf(torch.tensor([TINY_TOKENS])).logits[0].float().numpy()
    hf.save_pretrained(folder)
    c = hf.config
    return {**SARVAM, "num_experts": c.n_routed_experts, "num_shared_experts": c.n_shared_experts,
            "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_parameters["rope_theta"],
            "partial_rotary_factor": rotary, "norm_topk_prob": c.norm_topk_prob,
            "routed_scaling_factor": c.routed_scaling_factor, "first_k_dense_replace": c.first_k_dense_replace}, want


def _bailingmoe2_gguf(path: Path, folder: Path, config: dict, qtype, sarvam: bool = False, nextn: int = 0,
                      more: Callable[[Any], None] = lambda w: None) -> None:
    """The release at ``folder`` (``config`` in Ling's words) as llama.cpp's BailingMoeV2Model converts it, or
    SarvamMoEModel (``sarvam``: rope over the whole head, biases less their mean, the ``sarvam-moe`` pre-tokenizer);
    ``nextn`` prediction blocks appended (the last layer's tensors again, and an eh_proj); the router and the bias
    float32; ``more`` metadata."""
    from safetensors.numpy import load_file

    layers, head_dim = config["num_hidden_layers"], config["head_dim"]
    experts, width = config["moe_intermediate_size"], config.get("moe_shared_expert_intermediate_size")
    w = gguf.GGUFWriter(str(path), "bailingmoe2")
    add_metadata(w, dict(
        block_count=layers + nextn, context_length=config["max_position_embeddings"],
        embedding_length=config["hidden_size"], feed_forward_length=config["intermediate_size"],
        head_count=config["num_attention_heads"], head_count_kv=config["num_key_value_heads"],
        layer_norm_rms_eps=config["rms_norm_eps"], rope_freq_base=config["rope_theta"],
        expert_count=config["num_experts"], expert_used_count=config["num_experts_per_tok"],
        expert_group_count=config["n_group"], expert_group_used_count=config["topk_group"],
        expert_gating_func=gguf.ExpertGatingFuncType.SIGMOID, key_length=head_dim, value_length=head_dim,
        rope_dimension_count=head_dim if sarvam else int(head_dim * config["partial_rotary_factor"]),
        leading_dense_block_count=config["first_k_dense_replace"], vocab_size=VOCAB,
        expert_feed_forward_length=experts,
        expert_shared_feed_forward_length=width or experts * config["num_shared_experts"],
        expert_weights_scale=config["routed_scaling_factor"], expert_shared_count=config["num_shared_experts"],
        expert_weights_norm=config["norm_topk_prob"], nextn_predict_layers=nextn))
    if sarvam:
        w.add_tokenizer_pre(bailing.SARVAM_PRE)
    more(w)
    add_sentencepiece_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BAILINGMOE2, layers + nextn)
    stored = load_file(folder / "model.safetensors")
    tensors = {}
    for name, array in stored.items():
        if ".experts." in name and ".experts.0." not in name:
            continue
        if ".experts.0." in name:  # the whole stack, once
            array = np.stack([stored[name.replace(".experts.0.", f".experts.{e}.")]
                              for e in range(config["num_experts"])])
            name = name.replace(".experts.0.", ".experts.")
        if name.endswith(".expert_bias"):
            array, name = (array - array.mean() if sarvam else array), name + ".bias"
        tensors[names.get_name(name, try_suffixes=(".weight", ".bias"))] = array
    for i in range(layers, layers + nextn):  # a prediction block: never read
        tensors.update({n.replace(f"blk.{layers - 1}.", f"blk.{i}."): a for n, a in list(tensors.items())
                        if n.startswith(f"blk.{layers - 1}.")})
        tensors[f"blk.{i}.nextn.eh_proj.weight"] = np.ones((config["hidden_size"], 2 * config["hidden_size"]))
    for name, array in tensors.items():
        add_tensor(w, name, array, Q.F32 if re.search(r"ffn_gate_inp|exp_probs_b", name) else qtype)
    finish(w)


@pytest.fixture(scope="module")
def sarvam_releases(tmp_path_factory):
    """rotary share -> (release folder, its config in Ling's words, transformers' logits)."""
    out = {}
    for rotary in (1.0, 0.5):
        folder = tmp_path_factory.mktemp(f"sarvam{rotary}")
        out[rotary] = (folder, *_sarvam_release(folder, rotary))
    return out


@pytest.mark.parametrize(("sarvam", "qtype"), [(True, Q.F32), (False, Q.F32), (True, Q.Q8_0), (False, Q.Q8_0)],
                         ids=["F32-sarvam", "F32-ling", "Q8_0-sarvam", "Q8_0-ling"])
def test_bailingmoe2_gguf_routes_as_transformers_sarvam_moe(sarvam_releases, tmp_path, sarvam, qtype):
    """Sarvam's file (whole-head rope, biases less their mean) imports as sarvam_moe, Ling's (half-head rope, biases
    as stored) as bailing_moe, its biases raised; both give transformers' logits, biases of both signs and one of two
    groups dropped notwithstanding; Q8_0 files what their float import gives."""
    folder, config, want = sarvam_releases[1.0 if sarvam else 0.5]
    _bailingmoe2_gguf(tmp_path / "m.gguf", folder, config, qtype, sarvam=sarvam)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    ours = ModelConfig.from_file(out)
    moe = ours.arch.moe
    assert ours.model_type == ("sarvam_moe" if sarvam else "bailing_moe")
    assert ours.arch.layers[0].rope.rotary_dim == (16 if sarvam else 8)
    assert (moe.routing, moe.n_group, moe.topk_group, moe.routed_scale, moe.shared_expert_size) == (
        "sigmoid_grouped" if sarvam else "sigmoid_grouped_zero_masked", 2, 1, 2.5, 24)
    assert [layer.mlp for layer in ours.arch.layers] == ["dense", "moe", "moe"]
    if qtype == Q.F32:
        assert scaled_error(ferrum_logits(out, TINY_TOKENS), want) <= 1e-4
        return
    got = assert_runs_as_its_float_import(tmp_path / "m.gguf", out, tmp_path / "float")
    assert scaled_error(got, want) <= 1.5e-1  # Q8_0's rounding, which here moves some tokens' choice of experts


def test_ling_biases_left_as_stored_miss_transformers(sarvam_releases, tmp_path, monkeypatch):
    """Control: without the raise, mlx-lm's rule (dropped groups' experts scoring 0) chooses those experts over kept
    ones whose corrected scores are negative, which llama.cpp never does."""
    folder, config, want = sarvam_releases[0.5]
    _bailingmoe2_gguf(tmp_path / "m.gguf", folder, config, Q.F32)
    monkeypatch.setattr(bailing, "_raised", lambda bias, where: bias)
    assert scaled_error(ferrum_logits(convert_gguf(tmp_path / "m.gguf", tmp_path / "out"), TINY_TOKENS), want) > 1e-2


def test_ling_2_gguf_matches_mlx_lm(tmp_path):
    """Ling 2.0's release (shared experts 48 wide beside experts 32 wide, positive biases) with a prediction block
    appended imports as mlx-lm's bailing_moe reads the release, the block left out."""

    folder = tmp_path / "release"
    folder.mkdir()
    build_mlx_lm_checkpoint(folder, LING, TINY_TOKENS)
    _bailingmoe2_gguf(tmp_path / "m.gguf", folder, LING, Q.F32, nextn=1)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    ours = ModelConfig.from_file(out)
    assert (ours.num_layers, ours.arch.moe.shared_expert_size, ours.arch.moe.n_group) == (3, 48, 4)
    assert scaled_error(ferrum_logits(out, TINY_TOKENS), mlx_lm_logits(folder, TINY_TOKENS)) <= 1e-4


@pytest.mark.parametrize(("sarvam", "more", "extra", "words"), [
    (False, lambda w: w.add_uint32("bailingmoe2.expert_gating_func", 3), {}, "expert_gating_func 3"),
    (True, lambda w: w.add_uint32("bailingmoe2.expert_gating_func", gguf.ExpertGatingFuncType.SOFTMAX), {},
     "Sarvam-MoE file gated by 1"),
    (True, lambda w: w.add_uint32("bailingmoe2.expert_shared_feed_forward_length", 36), {}, "36 wide"),
    (False, lambda w: None, {"num_experts_per_tok": 1}, "expert_weights_norm with one expert per token"),
], ids=["softmax-weight", "sarvam-softmax", "sarvam-shared-width", "ling-top-1-renormalised"])
def test_a_bailingmoe2_gguf_run_otherwise_is_refused(sarvam_releases, tmp_path, sarvam, more, extra, words):
    folder, config, _ = sarvam_releases[1.0 if sarvam else 0.5]
    _bailingmoe2_gguf(tmp_path / "m.gguf", folder, {**config, **extra}, Q.F32, sarvam=sarvam, more=more)
    with pytest.raises(UnsupportedFeatureError, match=re.escape(words)):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
