"""GGUF imports of Gemma 4 (``gemma4``): tiny random transformers models of 31B's layout (full layers with wider
heads, fewer key/value heads that are their values too), E2B / E4B's (per-layer inputs, shared-KV layers twice as
wide) and 26B-A4B's (experts beside the dense MLP), written as llama.cpp's converter writes them (per-layer KV heads
and widths, the proportional rope as rope_freqs, gate and up experts fused), imported, and run against transformers
(float32 files) or the same file imported in float32 (Q8_0)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from ferrum.errors import UnsupportedFeatureError  # noqa: E402
from ferrum.gguf_import import convert_gguf  # noqa: E402
from gguf_writer import (  # noqa: E402
    add_sentencepiece_vocab, assert_logits_match, assert_runs_as_its_float_import, finish, sentencepiece_vocab,
)
from test_gguf_import import gguf_blocks  # noqa: E402

Q = gguf.GGMLQuantizationType
_SLIDING, _FULL = "sliding_attention", "full_attention"
_COMMON = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
               sliding_window=6, final_logit_softcapping=30.0, max_position_embeddings=128, intermediate_size=96,
               tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
#: 31B's layout, E2B's and 26B-A4B's, as tests/test_gemma4*.py build them.
_VARIANTS = {
    "31b": dict(num_hidden_layers=6, layer_types=[_SLIDING, _SLIDING, _FULL] * 2, num_global_key_value_heads=1,
                attention_k_eq_v=True, hidden_size_per_layer_input=0, num_kv_shared_layers=0),
    "e2b": dict(num_hidden_layers=8, layer_types=[_SLIDING, _SLIDING, _FULL] * 2 + [_SLIDING, _FULL],
                attention_k_eq_v=False, hidden_size_per_layer_input=16, num_kv_shared_layers=3,
                use_double_wide_mlp=True),
    "26b": dict(num_hidden_layers=3, layer_types=[_SLIDING, _SLIDING, _FULL], num_global_key_value_heads=1,
                attention_k_eq_v=True, hidden_size_per_layer_input=0, num_kv_shared_layers=0, enable_moe_block=True,
                num_experts=8, top_k_experts=2, moe_intermediate_size=32),
}


def _tiny(variant: str, **extra: Any) -> tuple[Any, Any]:
    """A random float32 Gemma 4 of ``variant``'s layout over the test vocabulary: weights N(0, 0.2), norms spread
    around 1, layer scalars and router scales set apart, so a misplaced tensor shows in the logits."""
    vocab = len(sentencepiece_vocab()[0])
    settings = {**_COMMON, **_VARIANTS[variant], "vocab_size": vocab, "vocab_size_per_layer_input": vocab, **extra}
    config = transformers.Gemma4TextConfig(**settings)
    config.settings = settings  # as made (transformers folds the full layers' heads into per_layer_config)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            param.normal_(1, 0.3) if name.endswith("norm.weight") else param.normal_(0, 0.2)
        for i, layer in enumerate(hf.model.layers):
            layer.layer_scalar.fill_(0.6 + 0.2 * i)
            if config.enable_moe_block:
                layer.router.scale.uniform_(0.5, 2.0)
                layer.router.per_expert_scale.uniform_(0.25, 2.0)
    return hf, config


def _gemma4_gguf(path: Path, hf, config, qtype) -> None:
    """``hf`` as llama.cpp's converter writes a Gemma 4: norms as they are; per-layer KV heads where the full layers
    have their own, per-layer MLP widths where the shared-KV layers are doubled; the proportional rope as
    rope_freqs; the router's scales under ffn_gate_inp / ffn_down_exps; experts fused gate-then-up; the output tied;
    matrices whose rows are whole blocks as ``qtype``, the rest (norms, vectors, routers) float."""
    c = {"use_double_wide_mlp": False, **config.settings}  # transformers' per-layer attributes, as made
    layers, swa = c["num_hidden_layers"], [t == _SLIDING for t in c["layer_types"]]
    w = gguf.GGUFWriter(str(path), "gemma4")
    w.add_block_count(layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    shared_from = layers - c["num_kv_shared_layers"]
    inter = c["intermediate_size"]
    w.add_feed_forward_length([inter if i < shared_from else 2 * inter for i in range(layers)]
                              if c["use_double_wide_mlp"] else inter)
    w.add_head_count(config.num_attention_heads)
    full_kv = c.get("num_global_key_value_heads")
    head_dim = c["global_head_dim"]
    w.add_head_count_kv([c["num_key_value_heads"] if s else full_kv for s in swa] if full_kv else
                        c["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_key_length_swa(c["head_dim"])
    w.add_value_length_swa(c["head_dim"])
    rope = config.rope_parameters
    w.add_rope_freq_base(rope[_FULL]["rope_theta"])
    w.add_rope_freq_base_swa(rope[_SLIDING]["rope_theta"])
    w.add_rope_dimension_count(head_dim)
    w.add_rope_dimension_count_swa(c["head_dim"])
    w.add_final_logit_softcapping(config.final_logit_softcapping)
    w.add_sliding_window(config.sliding_window)
    w.add_shared_kv_layers(c["num_kv_shared_layers"])
    w.add_embedding_length_per_layer_input(c["hidden_size_per_layer_input"] or 0)
    w.add_sliding_window_pattern(swa)
    if config.enable_moe_block:
        w.add_expert_count(config.num_experts)
        w.add_expert_used_count(config.top_k_experts)
        w.add_expert_feed_forward_length(config.moe_intermediate_size)
    add_sentencepiece_vocab(w)
    w.add_add_space_prefix(False)
    turning = int(head_dim * rope[_FULL]["partial_rotary_factor"] / 2)
    w.add_tensor("rope_freqs.weight", np.array([1.0] * turning + [1e30] * (head_dim // 2 - turning), dtype=np.float32))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, layers)
    rng = np.random.default_rng(0)
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight":
            continue
        array = np.ascontiguousarray(tensor.float().numpy())
        if name.endswith("router.scale"):
            gguf_name = name.replace("model.layers.", "blk.").replace("router.scale", "ffn_gate_inp.scale")
        elif name.endswith("router.per_expert_scale"):
            gguf_name = name.replace("model.layers.", "blk.").replace("router.per_expert_scale", "ffn_down_exps.scale")
        else:
            full = name if name.endswith(".weight") else name + ".weight"  # layer_scalar, the expert stacks
            module = full.removesuffix(".weight")
            gguf_name = names.get_name(module) + ".weight"
        if qtype == Q.F32 or array.ndim < 2 or array.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] or "router" in name:
            w.add_tensor(gguf_name, array)
        else:
            blocks = gguf_blocks(array.reshape(-1, array.shape[-1]), qtype, rng)
            w.add_tensor(gguf_name, blocks.reshape(*array.shape[:-1], -1), raw_dtype=qtype)
    finish(w)


@pytest.mark.parametrize("variant", list(_VARIANTS))
def test_gemma4_gguf_matches_the_model_it_was_written_from(tmp_path, variant):
    """Each layout imports to the config transformers' model was built from (head sizes and key/value heads per
    attention kind, values that are keys, the proportional rope's share, per-layer inputs, shared-KV layers and
    their doubled MLPs, experts), and gives its logits."""
    from ferrum.config import ModelConfig

    hf, config = _tiny(variant)
    _gemma4_gguf(tmp_path / "m.gguf", hf, config, Q.F32)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    ours = ModelConfig.from_file(out)
    layers = ours.arch.layers
    assert ours.model_type == "gemma4_text" and ours.head_dim == 32
    assert [s.window for s in layers] == [6 if t == _SLIDING else None for t in config.layer_types]
    assert layers[-1].rope.proportional and layers[-1].rope.rotary_dim == 8
    assert [s.heads.values_are_keys for s in layers] == [t == _FULL and variant != "e2b" for t in config.layer_types]
    if variant == "e2b":
        assert [s.kv_source for s in layers] == [None] * 5 + [2, 4, 2]  # the last full / sliding layer before
        assert ours.arch.per_layer_inputs is not None and layers[-1].intermediate_size == 192
    if variant == "26b":
        assert ours.arch.moe.num_experts == 8 and ours.arch.moe.top_k == 2
    assert_logits_match(hf, out)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K], ids=lambda q: q.name)
@pytest.mark.parametrize("variant", list(_VARIANTS))
def test_a_quantized_gemma4_gguf_with_mixed_head_sizes_runs_packed_as_its_float_import(tmp_path, variant, qtype):
    """The real layouts: full layers' heads twice the sliding ones' (31B, 26B-A4B, E2B / E4B: 512 and 256), kept
    packed (q/k/v rows and o_proj's input groups padded at load) and giving what the float32 import gives; Q4_K's
    256-value blocks take a model wide enough to hold them."""
    sizes = dict(hidden_size=256, head_dim=64, global_head_dim=128) if qtype == Q.Q4_K else dict(
        head_dim=32, global_head_dim=64)
    hf, config = _tiny(variant, **sizes)
    _gemma4_gguf(tmp_path / "m.gguf", hf, config, qtype)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    packed = json.loads((out / "config.json").read_text())["quantization"]
    assert (packed["bits"], packed["group_size"]) == ((8, 32) if qtype == Q.Q8_0 else (4, 32))
    assert "model.layers.0.self_attn.o_proj" not in packed  # o_proj packed too
    assert_runs_as_its_float_import(tmp_path / "m.gguf", out, tmp_path / "float")


def test_a_quantized_gemma4_gguf_whose_heads_cut_its_blocks_is_refused_before_writing(tmp_path):
    """Sliding heads of 16 inputs padded to 32 would cut Q8_0's 32-value blocks in o_proj: refused by name at import
    (the folder was written, then refused at load with advice for ``ferrum quantize``); float32 imports it."""
    hf, config = _tiny("31b")
    _gemma4_gguf(tmp_path / "m.gguf", hf, config, Q.Q8_0)
    with pytest.raises(UnsupportedFeatureError, match=r"blk\.0\.attn_output\.weight is stored as Q8_0.*"
                                                      "dequantize_to='float32'"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    import ferrum

    ferrum.load(convert_gguf(tmp_path / "m.gguf", tmp_path / "float", dequantize_to="float32"), backend="cpu")


def test_a_gemma4_rope_freqs_that_is_not_proportional_is_refused(tmp_path):
    """rope_freqs holds 1 per turning pair then 1e30; any other factors are a rope transformers' Gemma 4 lacks."""
    hf, config = _tiny("31b")
    _gemma4_gguf(tmp_path / "m.gguf", hf, config, Q.F32)
    reader = gguf.GGUFReader(tmp_path / "m.gguf", "r+")
    freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    freqs.data[-1] = 4.0
    reader.data.flush()
    with pytest.raises(UnsupportedFeatureError, match="not Gemma 4's proportional rope"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")


#: A Gemma 4-style vocabulary: its special tokens first (<pad> <eos> <bos> <unk> <mask>, the chat markers), the 256
#: byte pieces, runs of newlines, then pieces each made by one merge of two before it (spaces spelled \u2581).
_G4_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>", "<|think|>", "<|channel>",
                "<channel|>", "<|tool_call>", "<tool_call|>", '<|"|>']
#: The chat markers llama.cpp's converter writes as user-defined (always shown); the other specials are control.
_G4_VISIBLE = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", '<|"|>'}
_G4_MERGES = [("\u2581", "\u2581"), ("h", "e"), ("l", "l"), ("\u2581", "he"), ("ll", "o"), ("\u2581he", "llo"),
              ("he", "llo"), ("\u2581", "w"), ("o", "r"), ("\u2581w", "or"), ("l", "d"), ("\u2581wor", "ld"),
              ("u", "s"), ("e", "r"), ("us", "er"), ("m", "o"), ("d", "e"), ("de", "l"), ("mo", "del"), ("\u2581", "t"),
              ("\u2581t", "he"), ("\n", "\n"), ("\u2581\u2581", "\u2581")]


def _gemma4_vocab() -> tuple[list[str], list[str]]:
    """The tokens in id order and the merges, as ``"left right"``."""
    pieces = ["\n", "\n\n\n", "\u2581", "h", "e", "l", "o", "w", "r", "d", "u", "s", "m", "t", "x"]
    pieces += [left + right for left, right in _G4_MERGES if left + right not in pieces]
    tokens = _G4_SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + pieces
    return tokens, [f"{left} {right}" for left, right in _G4_MERGES]


def _gemma4_reference(tokens: list[str], merges: list[str]) -> Any:
    """transformers' GemmaTokenizer over the vocabulary, its special tokens and newline runs added as Gemma's
    tokenizer.json adds them."""
    from tokenizers import AddedToken

    hf = transformers.GemmaTokenizer(vocab={t: i for i, t in enumerate(tokens)},
                                     merges=[tuple(m.split(" ")) for m in merges], add_bos_token=True)
    hf.add_tokens([AddedToken(t, special=True, normalized=False) for t in _G4_SPECIALS], special_tokens=True)
    hf.add_tokens([AddedToken(t, special=False, normalized=False) for t in tokens if t and not t.strip("\n")])
    return hf


_G4_TEXTS = [
    "hello world", "the  hello   world ", " hello", "hello\nworld\n\n\nthe\n\n\n\n\nend",
    "<bos><|turn>user\nhello<turn|>\n<|turn>model\n<|channel>thought<channel|>hello world<turn|>\n",
    '<|tool_call>call:hello{x:<|"|>world<|"|>}<tool_call|>', "h\u00e9llo \u65e5\u672c \U0001F642 tab\there\r\n",
    "<unk> <mask><|think|>", "",
]


def test_a_gemma4_tokenizer_encodes_and_decodes_as_transformers_gemma_tokenizer(tmp_path):
    """Gemma 4's 'gemma4' vocabulary (llama.cpp's SPM-style BPE): the file's merges over raw characters, spaces as
    \u2581 and no space put first, bytes for characters no piece spells, special tokens and runs of newlines
    matched whole, BOS added; the same ids as transformers' GemmaTokenizer, and the same text back."""
    from ferrum.tokenizer import Tokenizer
    from test_gguf_import import write_tiny_gguf

    tokens, merges = _gemma4_vocab()
    types = [3 if t not in _G4_VISIBLE else 4 for t in _G4_SPECIALS] + [6] * 256 + [1] * (len(tokens) - 269)
    types[3] = 2  # <unk>
    write_tiny_gguf(tmp_path / "t.gguf", tokenizer_model="gemma4", pre=None, types={}, add_bos=True,
                    vocab=(tokens, types, [-1000.0] * len(tokens), merges),
                    special_ids={"bos": 2, "eos": 1, "unknown": 3, "padding": 0})
    ours = Tokenizer(convert_gguf(tmp_path / "t.gguf", tmp_path / "out"))
    hf = _gemma4_reference(tokens, merges)
    for text in _G4_TEXTS:
        ids = hf(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False), text
    assert ours.encode("hello world") == [2, tokens.index("hello"), tokens.index("\u2581world")]
    assert [tokens[i] for i in ours.encode("\n\n\n\n\n", add_special_tokens=False)] == ["\n\n\n", "\n\n"]
    assert [tokens[i] for i in ours.encode("\u00e9", add_special_tokens=False)] == ["<0xC3>", "<0xA9>"]
    assert ours.decode(ours.encode("the  hello\tworld")) == "the  hello\tworld"


def test_a_gemma4_tokenizer_without_merges_is_refused(tmp_path):
    from ferrum.errors import CheckpointError
    from test_gguf_import import write_tiny_gguf

    tokens, _ = _gemma4_vocab()
    write_tiny_gguf(tmp_path / "t.gguf", tokenizer_model="gemma4", pre=None, types={},
                    vocab=(tokens, [1] * len(tokens), [0.0] * len(tokens), None))
    with pytest.raises(CheckpointError, match="needs its merges"):
        convert_gguf(tmp_path / "t.gguf", tmp_path / "out")
