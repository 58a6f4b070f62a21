"""GGUF import of DeepSeek-MoE 16B (``deepseek``): mlx-lm's deepseek given random weights (the family has no
transformers class; tests/mlx_lm_release.py) and written as llama.cpp's DeepseekModel writes it (q/k rows and biases
permuted as Llama's, each layer's experts stacked, rope scaling "none", the expert width and counts, the shared count
and the dense first layers in the metadata), imported, and run against mlx-lm (float32 files) or the same file
imported in float32 (Q8_0). Controls: the file read without un-permuting q/k, or their biases, misses mlx-lm; what
llama.cpp or the release run otherwise is refused by name."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("mlx_lm")

from ferrum.errors import UnsupportedFeatureError  # noqa: E402
from ferrum.gguf_import import architectures, convert_gguf, tensors as gguf_tensors  # noqa: E402
from gguf_writer import (  # noqa: E402
    TINY_TOKENS, add_metadata, add_sentencepiece_vocab, add_tensor, assert_runs_as_its_float_import, ferrum_logits,
    finish, permute, sentencepiece_vocab,
)
from mlx_lm_release import model_logits, normal, random_mlx_lm_model  # noqa: E402
from support import scaled_error  # noqa: E402
from test_deepseek import deepseek_config  # noqa: E402

Q = gguf.GGMLQuantizationType
VOCAB = len(sentencepiece_vocab()[0])
#: The release's layout (a dense first layer, two shared experts); and biased attention, one shared expert, no dense
#: layer.
VARIANTS = {"release": {}, "biased": dict(attention_bias=True, n_shared_experts=1, first_k_dense_replace=0)}


def _tiny(variant: str) -> tuple[Any, dict]:
    config = deepseek_config(vocab_size=VOCAB, **VARIANTS[variant])
    return random_mlx_lm_model(config, draw=normal()), config


def _deepseek_gguf(path: Path, model: Any, config: dict, qtype, more: Callable[[Any], None] = lambda w: None,
                   left_out: tuple[str, ...] = ()) -> None:
    """mlx-lm's ``model`` as llama.cpp's DeepseekModel converts the release: TextModel's keys (its scoring_func as
    the softmax gate), DeepseekModel's (rope over the whole head, scaling "none", the expert numbers, a scale of 1),
    q/k rows and biases permuted, the experts stacked (mlx-lm's switch_mlp is the stack); the router float32;
    ``more`` metadata, the GGUF tensors ``left_out`` not written."""
    from mlx.utils import tree_flatten

    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), "deepseek")
    add_metadata(w, dict(
        block_count=config["num_hidden_layers"], context_length=config["max_position_embeddings"],
        embedding_length=config["hidden_size"], feed_forward_length=config["intermediate_size"], head_count=heads,
        head_count_kv=kv_heads, layer_norm_rms_eps=config["rms_norm_eps"], rope_freq_base=config["rope_theta"],
        expert_count=config["n_routed_experts"], expert_used_count=config["num_experts_per_tok"],
        expert_gating_func=gguf.ExpertGatingFuncType.SOFTMAX, rope_dimension_count=config["hidden_size"] // heads,
        rope_scaling_type=gguf.RopeScalingType.NONE, leading_dense_block_count=config["first_k_dense_replace"],
        vocab_size=VOCAB, expert_feed_forward_length=config["moe_intermediate_size"], expert_weights_scale=1.0,
        expert_shared_count=config["n_shared_experts"]))
    more(w)
    add_sentencepiece_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK, config["num_hidden_layers"])
    for name, value in tree_flatten(model.parameters()):
        array = np.array(value)
        if re.search(r"[qk]_proj\.(weight|bias)$", name):
            array = permute(array, heads if ".q_proj." in name else kv_heads)
        module, suffix = name.replace(".switch_mlp.", ".experts.").rsplit(".", 1)
        target = f"{names.get_name(module)}.{suffix}"
        if target in left_out:
            continue
        add_tensor(w, target, array, Q.F32 if target.endswith("ffn_gate_inp.weight") else qtype)
    finish(w)


@pytest.mark.parametrize(("variant", "qtype"), [("release", Q.F32), ("biased", Q.F32), ("release", Q.Q8_0)],
                         ids=["F32-release", "F32-biased", "Q8_0-release"])
def test_deepseek_gguf_matches_mlx_lm(tmp_path, variant, qtype):
    """Float32 files give mlx-lm's logits; a Q8_0 one (kept packed) what its float import gives, and mlx-lm's within
    Q8_0's rounding."""
    from ferrum.config import ModelConfig

    model, config = _tiny(variant)
    _deepseek_gguf(tmp_path / "m.gguf", model, config, qtype)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    ours = ModelConfig.from_file(out)
    arch, moe = ours.arch, ours.arch.moe
    release = variant == "release"
    assert ours.model_type == "deepseek" and (ours.num_heads, ours.num_kv_heads, ours.head_dim) == (4, 2, 16)
    assert [layer.mlp for layer in arch.layers] == (["dense", "moe", "moe"] if release else ["moe"] * 3)
    assert (moe.routing, moe.normalize, moe.routed_scale, moe.shared_expert_size) == (
        "softmax", False, 1.0, 64 if release else 32)
    assert (arch.qkv_bias, arch.o_bias) == (not release, not release)
    want = model_logits(model, TINY_TOKENS)
    if qtype == Q.F32:
        assert scaled_error(ferrum_logits(out, TINY_TOKENS), want) <= 1e-4
        return
    got = assert_runs_as_its_float_import(tmp_path / "m.gguf", out, tmp_path / "float")
    assert scaled_error(got, want) <= 1.5e-1  # Q8_0's rounding, which here moves some tokens' choice of experts


@pytest.mark.parametrize("unpermuted", [(), ("attn_q.weight", "attn_k.weight")], ids=["nothing", "weights-only"])
def test_deepseek_gguf_read_without_its_q_k_un_permuted_misses_mlx_lm(tmp_path, monkeypatch, unpermuted):
    """Controls: the biased file read with q/k left as stored, or with only their weights un-permuted (their biases
    as stored), misses mlx-lm's logits."""
    model, config = _tiny("biased")
    _deepseek_gguf(tmp_path / "m.gguf", model, config, Q.F32)
    if unpermuted:
        monkeypatch.setattr(gguf_tensors, "_PERMUTED_QK", unpermuted)
    else:
        monkeypatch.setitem(architectures.ARCHITECTURES, "deepseek",
                            replace(architectures.ARCHITECTURES["deepseek"], permuted_qk=False))
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert scaled_error(ferrum_logits(out, TINY_TOKENS), model_logits(model, TINY_TOKENS)) > 1e-2


@pytest.mark.parametrize(("more", "words"), [
    (lambda w: w.add_float32("deepseek.expert_weights_scale", 2.0), "expert_weights_scale 2.0 is not supported"),
    (lambda w: w.add_uint32("deepseek.expert_gating_func", gguf.ExpertGatingFuncType.SIGMOID),
     "naming expert_gating_func 2"),
    (lambda w: w.add_expert_weights_norm(True), "expert_weights_norm True"),
    (lambda w: (w.add_expert_group_count(2), w.add_expert_group_used_count(1)), "expert_group_count 2"),
], ids=["scale", "sigmoid", "renormalised", "groups"])
def test_a_deepseek_gguf_run_otherwise_is_refused(tmp_path, more, words):
    model, config = _tiny("release")
    _deepseek_gguf(tmp_path / "m.gguf", model, config, Q.F32, more=more)
    with pytest.raises(UnsupportedFeatureError, match=re.escape(words)):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_deepseek_gguf_with_a_tied_lm_head_is_refused(tmp_path):
    model, config = _tiny("release")
    _deepseek_gguf(tmp_path / "m.gguf", model, config, Q.F32, left_out=("output.weight",))  # as a tied model's
    with pytest.raises(UnsupportedFeatureError, match="without output.weight"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
