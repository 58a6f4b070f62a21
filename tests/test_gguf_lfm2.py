"""GGUF imports of LFM2 (``lfm2``) and LFM2-MoE (``lfm2moe``): tiny random transformers Lfm2 / Lfm2Moe models written
as llama.cpp's converter writes them (the convolution's taps squeezed, its projections under ``shortconv.*``, the final
norm as ``token_embd_norm``, the MLP's width already sized, the convolution layers told by 0 key/value heads; the
experts stacked, their correction bias as ``exp_probs_b``), imported, and run against transformers (float32 files) or
the same file imported in float32 (Q8_0); and LFM2's pre-tokenizer (Llama 3's split, words the vocabulary holds whole
kept whole, a BOS token added)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from ferrum.gguf_import import convert_gguf  # noqa: E402
from gguf_writer import (  # noqa: E402
    add_sentencepiece_vocab, assert_logits_match, assert_runs_as_its_float_import, finish, sentencepiece_vocab,
)
from test_gguf_import import write_tiny_gguf  # noqa: E402

Q = gguf.GGMLQuantizationType
LAYER_TYPES = ["conv", "full_attention", "conv", "conv"]


def _tiny(tied: bool) -> tuple[Any, Any]:
    """A random float32 LFM2 over the test vocabulary whose MLP width (100) LFM2 sizes to 80 (two thirds, rounded up
    to a multiple of 16), as the converter then writes it; norms around 1."""
    config = transformers.Lfm2Config(vocab_size=len(sentencepiece_vocab()[0]), hidden_size=64, intermediate_size=100,
                                     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=256, conv_L_cache=3, block_multiple_of=16,
                                     layer_types=LAYER_TYPES, tie_word_embeddings=tied, pad_token_id=0,
                                     bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            param.normal_(1, 0.3) if "norm" in name else param.normal_(0, 0.2)
    return hf, config


def _tiny_moe() -> tuple[Any, Any]:
    """A random float32 LFM2-MoE: one dense layer, then four experts (two used) with a correction bias; tied, as
    LFM2-8B-A1B is (llama.cpp's lfm2moe has no output tensor)."""
    config = transformers.Lfm2MoeConfig(vocab_size=len(sentencepiece_vocab()[0]), hidden_size=64,
                                        intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        conv_L_cache=3, num_experts=4, num_experts_per_tok=2, num_dense_layers=1,
                                        layer_types=LAYER_TYPES, tie_word_embeddings=True, pad_token_id=0,
                                        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            param.normal_(1, 0.3) if "norm" in name else param.normal_(0, 0.2)
    return hf, config


def _lfm2_gguf(path: Path, hf, config, qtype) -> None:
    """``hf`` as llama.cpp's LFM2Model (LFM2MoeModel) writes it; matrices whose rows are whole blocks as ``qtype``,
    the norms, routers and the convolution's taps float."""
    layers, moe = config.num_hidden_layers, config.model_type == "lfm2_moe"
    w = gguf.GGUFWriter(str(path), "lfm2moe" if moe else "lfm2")
    w.add_block_count(layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(hf.model.layers[0].feed_forward.w1.out_features)  # _add_feed_forward_length's sizing
    if moe:
        w.add_expert_count(config.num_experts)
        w.add_expert_used_count(config.num_experts_per_tok)
        w.add_expert_feed_forward_length(config.moe_intermediate_size)
        w.add_leading_dense_block_count(config.num_dense_layers)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv([config.num_key_value_heads if t == "full_attention" else 0 for t in config.layer_types])
    w.add_rope_freq_base(config.rope_parameters["rope_theta"])
    w.add_vocab_size(config.vocab_size)
    w.add_shortconv_l_cache(config.conv_L_cache)
    w.add_layer_norm_rms_eps(config.norm_eps)
    add_sentencepiece_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LFM2MOE if moe else gguf.MODEL_ARCH.LFM2, layers)
    for name, array in _converted(hf, config):
        array = np.ascontiguousarray(array, dtype=np.float32)
        module, suffix = name.rsplit(".", 1)
        gguf_name = f"{names.get_name(module)}.{suffix}"
        kept_float = "shortconv.conv" in gguf_name or "gate_inp" in gguf_name
        if qtype == Q.F32 or array.ndim < 2 or array.shape[-1] % 32 or kept_float:
            w.add_tensor(gguf_name, array)
        else:
            w.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    finish(w)


def _converted(hf, config):
    """Each transformers tensor as the converter writes it: the taps squeezed, the expert stacks split into gate
    (``w1``) and up (``w3``) and named as the converter names its stacks, ``expert_bias`` as a bias."""
    for name, tensor in hf.state_dict().items():
        array = tensor.float().numpy()
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if "conv.conv" in name:
            yield name, array.squeeze(1)
        elif name.endswith("experts.gate_up_proj"):  # merged_name: layers.{bid}.feed_forward.experts.{w}.weight
            gate, up = np.split(array, 2, axis=-2)
            yield name.removeprefix("model.").replace("gate_up_proj", "w1.weight"), gate
            yield name.removeprefix("model.").replace("gate_up_proj", "w3.weight"), up
        elif name.endswith("experts.down_proj"):
            yield name.removeprefix("model.").replace("down_proj", "w2.weight"), array
        elif name.endswith("expert_bias"):
            yield name.replace("expert_bias", "expert_bias.bias"), array
        else:
            yield name, array


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
def test_lfm2_moe_gguf_matches_the_model_it_was_written_from(tmp_path, qtype):
    """An lfm2moe file imports as transformers' Lfm2Moe (the dense first layer, the experts, their correction bias,
    llama.cpp's renormalised unscaled routing); float32 files give transformers' logits, Q8_0 ones what the same
    file imported in float32 gives."""
    from ferrum.config import ModelConfig

    hf, config = _tiny_moe()
    _lfm2_gguf(tmp_path / "m.gguf", hf, config, qtype)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    ours = ModelConfig.from_file(out)
    assert ours.model_type == "lfm2_moe"
    assert [(s.mixer, s.mlp) for s in ours.arch.layers] == [("short_conv", "dense"), ("attention", "moe"),
                                                            ("short_conv", "moe"), ("short_conv", "moe")]
    assert (ours.arch.moe.num_experts, ours.arch.moe.top_k, ours.intermediate_size) == (4, 2, 96)
    if qtype == Q.F32:
        assert_logits_match(hf, out)
    else:
        assert ours.quantization is not None
        assert_runs_as_its_float_import(tmp_path / "m.gguf", out, tmp_path / "float")


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_lfm2_gguf_matches_the_model_it_was_written_from(tmp_path, tied, qtype):
    """An lfm2 file imports as transformers' Lfm2 (convolution layers where the file has no key/value heads, the
    kernel, the MLP width as stored, the final norm, tied or not); float32 files give transformers' logits, Q8_0 ones
    (packed) what the same file imported in float32 gives."""
    from ferrum.config import ModelConfig

    hf, config = _tiny(tied)
    _lfm2_gguf(tmp_path / "m.gguf", hf, config, qtype)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    ours = ModelConfig.from_file(out)
    assert ours.model_type == "lfm2"
    assert [s.mixer for s in ours.arch.layers] == ["short_conv", "attention", "short_conv", "short_conv"]
    assert ours.intermediate_size == 80 and ours.arch.short_conv.conv_kernel == 3
    assert ours.tie_word_embeddings == tied
    if qtype == Q.F32:
        assert_logits_match(hf, out)
    else:
        assert ours.quantization is not None
        assert_runs_as_its_float_import(tmp_path / "m.gguf", out, tmp_path / "float")


def test_lfm2s_pre_tokenizer_is_llama_3s_and_adds_bos(tmp_path):
    """``tokenizer.ggml.pre = lfm2`` splits as Llama 3 (digits in threes), keeps a word the vocabulary holds whole
    as one token, and adds the BOS token where the file does not say (llama.cpp's reading)."""
    from tokenizers import Tokenizer

    write_tiny_gguf(tmp_path / "t.gguf", pre="lfm2", types={}, add_bos=None)
    out = convert_gguf(tmp_path / "t.gguf", tmp_path / "out")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    split = [word for word, _ in tok.pre_tokenizer.pre_tokenize_str("HelloWorld I'm DONE 12345 a/b")]
    words = ["HelloWorld", " I", "'m", " DONE", " ", "123", "45", " a", "/b"]
    assert split == [w.replace(" ", "\u0120") for w in words]
    assert json.loads((out / "tokenizer.json").read_text())["model"]["ignore_merges"] is True
    assert tok.encode("hello").ids[0] == 1
