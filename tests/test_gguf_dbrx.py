"""GGUF imports of DBRX (``dbrx``): a tiny random transformers Dbrx written as llama.cpp's DbrxModel writes it (Wqkv
as it is, the experts' w1 / v1 stacks as they are and w2 turned to [expert, d_model, ffn], the clamp and LayerNorm
epsilon in the metadata), imported, and run against transformers (float32) or its float import (Q8_0)."""

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
    add_sentencepiece_vocab, add_tensors, assert_logits_match, finish, imported, sentencepiece_vocab,
)

Q = gguf.GGMLQuantizationType
_EXPERTS, _FFN, _TOP_K, _CLIP = 4, 32, 2, 0.5  # a clamp that cuts many q/k/v values


def _tiny(clip: float | None = _CLIP):
    config = transformers.DbrxConfig(
        vocab_size=len(sentencepiece_vocab()[0]), d_model=64, n_heads=4, n_layers=2, max_seq_len=128,
        attn_config=dict(kv_n_heads=2, clip_qkv=clip, rope_theta=10000.0),
        ffn_config=dict(ffn_hidden_size=_FFN, moe_num_experts=_EXPERTS, moe_top_k=_TOP_K),
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():  # norms around 1, the rest spread so that the rope's angles and the clamp count
        for name, param in hf.named_parameters():
            param.normal_(1, 0.3) if "norm" in name else param.normal_(0, 0.2)
    return hf, config


def _dbrx_gguf(path: Path, hf, config, qtype, eps: float = 1e-5, clamp: float = _CLIP) -> None:
    """``hf`` as DbrxModel writes it; matrices as ``qtype``."""
    w = gguf.GGUFWriter(str(path), "dbrx")
    w.add_block_count(config.n_layers)
    w.add_context_length(config.max_seq_len)
    w.add_embedding_length(config.d_model)
    w.add_feed_forward_length(_FFN)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_clamp_kqv(clamp)
    w.add_expert_count(_EXPERTS)
    w.add_expert_used_count(_TOP_K)
    w.add_layer_norm_eps(eps)
    add_sentencepiece_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DBRX, config.n_layers)
    tensors = {}
    for name, tensor in hf.state_dict().items():
        a = tensor.float().numpy()
        if ".experts.mlp." in name:  # each expert's rows, one after another; w2 turned to [expert, d_model, ffn]
            a = a.reshape(_EXPERTS, _FFN, config.d_model)
            a = a.transpose(0, 2, 1) if name.endswith("w2") else a
            name += ".weight"
        tensors[names.get_name(name, try_suffixes=(".weight",))] = a
    add_tensors(w, tensors, qtype)
    finish(w)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
def test_dbrx_gguf_matches_the_model_it_was_written_from(tmp_path, qtype):
    """Imported as transformers' Dbrx: float32 gives transformers' logits, Q8_0 its float import's."""
    hf, config = _tiny()
    _dbrx_gguf(tmp_path / "m.gguf", hf, config, qtype)
    ours = imported(tmp_path, hf, qtype)
    assert ours.model_type == "dbrx" and ours.arch.clip_qkv == _CLIP and ours.num_kv_heads == 2
    assert ours.arch.moe.routing == "softmax" and ours.arch.moe.normalize and ours.arch.moe.top_k == _TOP_K


def test_dbrx_gguf_read_with_llamas_rows_misses_transformers(tmp_path, monkeypatch):
    """Control: the same file with its q/k/v rows regrouped by key/value head (as GPT-NeoX's fused ones are)
    misses transformers' logits."""
    hf, config = _tiny()
    _dbrx_gguf(tmp_path / "m.gguf", hf, config, Q.F32)
    monkeypatch.setitem(architectures.ARCHITECTURES, "dbrx",
                        replace(architectures.ARCHITECTURES["dbrx"], grouped_qkv=True))
    with pytest.raises(AssertionError):
        assert_logits_match(hf, convert_gguf(tmp_path / "m.gguf", tmp_path / "out"))


def test_dbrx_gguf_read_without_its_clamp_misses_transformers(tmp_path, monkeypatch):
    """Control: the same file with attention.clamp_kqv not read misses transformers' logits."""
    hf, config = _tiny()
    _dbrx_gguf(tmp_path / "m.gguf", hf, config, Q.F32)
    read = architectures.ARCHITECTURES["dbrx"].configure
    monkeypatch.setitem(architectures.ARCHITECTURES, "dbrx", replace(
        architectures.ARCHITECTURES["dbrx"], configure=lambda m, p, c: {**read(m, p, c), "attn_config.clip_qkv": None}))
    with pytest.raises(AssertionError):
        assert_logits_match(hf, convert_gguf(tmp_path / "m.gguf", tmp_path / "out"))


def test_a_dbrx_gguf_whose_clamp_is_not_positive_runs_unclamped(tmp_path):
    """llama.cpp clips q/k/v only by a positive attention.clamp_kqv: a file saying -3 imports as transformers' Dbrx
    clipping nothing (the import wrote -3, which the load then refused). transformers' Dbrx clamps always (None
    fails in torch.clamp): a clamp no value reaches stands for none."""
    hf, config = _tiny(clip=1e6)
    _dbrx_gguf(tmp_path / "m.gguf", hf, config, Q.F32, clamp=-3.0)
    assert_logits_match(hf, convert_gguf(tmp_path / "m.gguf", tmp_path / "out"))


def test_a_dbrx_gguf_with_another_epsilon_is_refused(tmp_path):
    hf, config = _tiny()
    _dbrx_gguf(tmp_path / "m.gguf", hf, config, Q.F32, eps=1e-6)
    with pytest.raises(UnsupportedFeatureError, match="layer_norm_epsilon"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
