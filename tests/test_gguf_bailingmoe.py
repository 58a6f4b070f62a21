"""GGUF import of Ling v1 (``bailingmoe``: Ling-lite, Ling-plus): mlx-lm's bailing_moe given random weights and written
under the release's names (tests/test_bailing_moe.py's build_mlx_lm_checkpoint, its LM head unnormed as the release
stores it),
then converted as llama.cpp's BailingMoeModel converts that release (query_key_value cut into q, k and v, q and k
permuted as Llama's, the experts stacked, the head's columns divided by their L2 norm, the expert numbers, the shared
count and norm_topk_prob in the metadata), imported, and run against mlx-lm's load of the release (float32 files) or
the same file imported in float32 (Q8_0). Controls: q/k read as stored, or a head the converter did not norm, miss
mlx-lm; what llama.cpp runs otherwise is refused by name."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("mlx_lm")

from ferrum.config import ModelConfig  # noqa: E402
from ferrum.errors import UnsupportedFeatureError  # noqa: E402
from ferrum.gguf_import import architectures, convert_gguf  # noqa: E402
from gguf_writer import (  # noqa: E402
    TINY_TOKENS, add_metadata, add_sentencepiece_vocab, add_tensor, assert_runs_as_its_float_import, ferrum_logits,
    finish, permute, sentencepiece_vocab,
)
from support import mlx_lm_logits, scaled_error  # noqa: E402
from test_bailing_moe import build_mlx_lm_checkpoint  # noqa: E402

Q = gguf.GGMLQuantizationType
VOCAB = len(sentencepiece_vocab()[0])
#: Ling-lite's layout (v1): softmax routing over 8 experts, two a token renormalised, one shared expert, every layer
#: sparse, whole-head rope, no q/k/v bias, the LM head normed at load.
V1 = dict(model_type="bailing_moe", architectures=["BailingMoeForCausalLM"], vocab_size=VOCAB, hidden_size=64,
          intermediate_size=128, max_position_embeddings=256, moe_intermediate_size=32, num_experts=8,
          num_shared_experts=1, norm_topk_prob=True, num_attention_heads=4, num_experts_per_tok=2,
          num_hidden_layers=3, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0, first_k_dense_replace=0,
          tie_word_embeddings=False, use_qkv_bias=False, norm_head=True)
#: Two shared experts, the top-k weights as they are.
VARIANTS = {"lite": {}, "two-shared": dict(num_shared_experts=2, norm_topk_prob=False)}


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """variant -> (release folder, its config, mlx-lm's logits over TINY_TOKENS)."""

    out = {}
    for name, extra in VARIANTS.items():
        folder, config = tmp_path_factory.mktemp(name), {**V1, **extra}
        build_mlx_lm_checkpoint(folder, config, TINY_TOKENS)
        out[name] = folder, config, mlx_lm_logits(folder, TINY_TOKENS)
    return out


def _bailingmoe_gguf(path: Path, folder: Path, config: dict, qtype, more: Callable[[Any], None] = lambda w: None,
                     norm_head: bool = True) -> None:
    """The release at ``folder`` as llama.cpp's BailingMoeModel converts it: TextModel's keys, BailingMoeModel's
    (rope over head_dim, the expert numbers, a scale of 1, the shared count, norm_topk_prob), query_key_value cut
    into q, k (both permuted) and v, each layer's experts stacked, the head's columns normed (``norm_head``); the
    router float32; ``more`` metadata."""
    from safetensors.numpy import load_file

    heads, kv_heads, layers = config["num_attention_heads"], config["num_key_value_heads"], config["num_hidden_layers"]
    head_dim = config["hidden_size"] // heads
    w = gguf.GGUFWriter(str(path), "bailingmoe")
    add_metadata(w, dict(
        block_count=layers, context_length=config["max_position_embeddings"], embedding_length=config["hidden_size"],
        feed_forward_length=config["intermediate_size"], head_count=heads, head_count_kv=kv_heads,
        layer_norm_rms_eps=config["rms_norm_eps"], rope_freq_base=config["rope_theta"],
        expert_count=config["num_experts"], expert_used_count=config["num_experts_per_tok"],
        rope_dimension_count=head_dim, leading_dense_block_count=config["first_k_dense_replace"], vocab_size=VOCAB,
        expert_feed_forward_length=config["moe_intermediate_size"], expert_weights_scale=1.0,
        expert_shared_count=config["num_shared_experts"], expert_weights_norm=config["norm_topk_prob"]))
    more(w)
    add_sentencepiece_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BAILINGMOE, layers)
    stored = load_file(folder / "model.safetensors")
    for name, array in stored.items():
        m = re.match(r"model\.layers\.(\d+)\.(.+)\.weight$", name)
        if m and m.group(2) == "attention.query_key_value":
            q, k, v = np.split(array, [heads * head_dim, (heads + kv_heads) * head_dim])
            for part, value in (("attn_q", permute(q, heads)), ("attn_k", permute(k, kv_heads)), ("attn_v", v)):
                add_tensor(w, f"blk.{m.group(1)}.{part}.weight", value, qtype)
            continue
        if m and ".experts.0." in name:  # the whole stack, once
            stack = np.stack([stored[name.replace(".experts.0.", f".experts.{e}.")]
                              for e in range(config["num_experts"])])
            name = name.replace(".experts.0.", ".experts.")
        elif m and ".experts." in name:
            continue
        else:
            stack = array
        if name == "lm_head.weight" and norm_head:
            stack = stack / (np.linalg.norm(stack, axis=0, keepdims=True) + np.float32(1e-7))
        target = names.get_name(name, try_suffixes=(".weight",))
        add_tensor(w, target, stack, Q.F32 if target.endswith("ffn_gate_inp.weight") else qtype)
    finish(w)


@pytest.mark.parametrize(("variant", "qtype"), [("lite", Q.F32), ("two-shared", Q.F32), ("lite", Q.Q8_0)],
                         ids=["F32-lite", "F32-two-shared", "Q8_0-lite"])
def test_bailingmoe_gguf_matches_mlx_lm(releases, tmp_path, variant, qtype):
    """Float32 files give mlx-lm's logits for the release; a Q8_0 one (kept packed) what its float import gives."""
    folder, config, want = releases[variant]
    _bailingmoe_gguf(tmp_path / "m.gguf", folder, config, qtype)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    ours = ModelConfig.from_file(out)
    arch, moe = ours.arch, ours.arch.moe
    assert ours.model_type == "bailing_moe" and (ours.num_heads, ours.num_kv_heads, ours.head_dim) == (4, 2, 16)
    assert [layer.mlp for layer in arch.layers] == ["moe"] * 3
    assert (arch.fused_qkv, arch.head_normed, arch.qkv_bias, arch.qk_norm) == (True, False, False, None)
    assert (moe.routing, moe.normalize, moe.routed_scale, moe.shared_expert_size) == (
        "softmax", config["norm_topk_prob"], 1.0, 32 * config["num_shared_experts"])
    if qtype == Q.F32:
        assert scaled_error(ferrum_logits(out, TINY_TOKENS), want) <= 1e-4
        return
    got = assert_runs_as_its_float_import(tmp_path / "m.gguf", out, tmp_path / "float")
    assert scaled_error(got, want) <= 1.5e-1  # Q8_0's rounding, which here moves some tokens' choice of experts


def test_bailingmoe_gguf_read_with_q_k_as_stored_misses_mlx_lm(releases, tmp_path, monkeypatch):
    """Control: the file read without un-permuting q and k misses mlx-lm's logits."""
    folder, config, want = releases["lite"]
    _bailingmoe_gguf(tmp_path / "m.gguf", folder, config, Q.F32)
    monkeypatch.setitem(architectures.ARCHITECTURES, "bailingmoe",
                        replace(architectures.ARCHITECTURES["bailingmoe"], permuted_qk=False))
    assert scaled_error(ferrum_logits(convert_gguf(tmp_path / "m.gguf", tmp_path / "out"), TINY_TOKENS), want) > 1e-2


def test_the_converters_head_norm_is_what_matches_mlx_lm(releases, tmp_path):
    """Control: the import leaves the head as stored (normed by the converter, as mlx-lm's load norms it); a file
    whose head the converter left unnormed misses mlx-lm, so the head's handling counts in the parity check."""
    folder, config, want = releases["lite"]
    _bailingmoe_gguf(tmp_path / "m.gguf", folder, config, Q.F32, norm_head=False)
    assert scaled_error(ferrum_logits(convert_gguf(tmp_path / "m.gguf", tmp_path / "out"), TINY_TOKENS), want) > 1e-2


@pytest.mark.parametrize(("more", "extra", "words"), [
    (lambda w: w.add_uint32("bailingmoe.leading_dense_block_count", 1), {}, "leading_dense_block_count 1"),
    (lambda w: w.add_uint32("bailingmoe.expert_gating_func", gguf.ExpertGatingFuncType.SIGMOID), {},
     "expert_gating_func 2"),
    (lambda w: w.add_tensor("blk.0.attn_qkv.bias", np.zeros(128, np.float32)), {}, "attn_qkv.bias"),
    (lambda w: None, {"num_experts_per_tok": 1}, "expert_weights_norm with one expert per token"),
], ids=["dense-layers", "sigmoid", "qkv-bias", "top-1-renormalised"])
def test_a_bailingmoe_gguf_run_otherwise_is_refused(releases, tmp_path, more, extra, words):
    folder, config, _ = releases["lite"]
    _bailingmoe_gguf(tmp_path / "m.gguf", folder, {**config, **extra}, Q.F32, more=more)
    with pytest.raises(UnsupportedFeatureError, match=re.escape(words)):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
