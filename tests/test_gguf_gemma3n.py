"""GGUF imports of Gemma 3n (``gemma3n``): a tiny random transformers model of E2B's layout as llama.cpp runs every
gemma3n file (four sliding layers to one full one, keys and values from the first 20 layers only, the first 10
layers' gates cut at 0.95), written as llama.cpp's converter writes it (norms as they are, the AltUp projections
stacked, both embedding tables padded to the vocabulary, per-layer widths), imported, and run against transformers
(float32) or the same file imported in float32 (Q8_0)."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import NormalDist
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
#: 22 layers, as llama.cpp's own gemma3n test takes: its fixed 20 layers of keys and values, then two that read them.
_LAYERS, _PER_LAYER = 22, 32


def _tiny(**extra: Any) -> tuple[Any, Any]:
    """A random float32 Gemma 3n over the test vocabulary, its per-layer table 8 rows short of it (the converter pads
    them with zeros); weights N(0, 0.2), norms spread around 1, so a misplaced tensor shows in the logits."""
    vocab = len(sentencepiece_vocab()[0])
    settings = dict(
        vocab_size=vocab, vocab_size_per_layer_input=vocab - 8, hidden_size=64, num_hidden_layers=_LAYERS,
        intermediate_size=[96] * 11 + [128] * 11, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        hidden_size_per_layer_input=_PER_LAYER, num_kv_shared_layers=_LAYERS - 20, sliding_window=6,
        layer_types=["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(_LAYERS)],
        laurel_rank=64, activation_sparsity_pattern=[0.95] * 10 + [0.0] * (_LAYERS - 10),
        max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    config = transformers.Gemma3nTextConfig(**settings)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            param.normal_(1, 0.3) if name.endswith("norm.weight") else param.normal_(0, 0.2)
    return hf, config


def _gemma3n_gguf(path: Path, hf, config, qtype, *, shared_kv: int | None = None) -> None:
    """``hf`` as llama.cpp's converter writes a Gemma 3n: norms as they are, the activation sparsity as normal
    quantiles, the AltUp projections stacked, both embedding tables zero-padded to the vocabulary, the output tied;
    matrices whose rows are whole blocks as ``qtype``, the rest float."""
    layers = config.num_hidden_layers
    w = gguf.GGUFWriter(str(path), "gemma3n")
    w.add_block_count(layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_rope_freq_base(config.rope_parameters["full_attention"]["rope_theta"])
    w.add_final_logit_softcapping(config.final_logit_softcapping)
    w.add_sliding_window(config.sliding_window)
    w.add_altup_active_idx(config.altup_active_idx)
    w.add_altup_num_inputs(config.altup_num_inputs)
    w.add_embedding_length_per_layer_input(config.hidden_size_per_layer_input)
    w.add_shared_kv_layers(config.num_kv_shared_layers if shared_kv is None else shared_kv)
    w.add_activation_sparsity_scale([NormalDist().inv_cdf(s) if s else float("-inf")
                                     for s in config.activation_sparsity_pattern])
    w.add_sliding_window_pattern([t == "sliding_attention" for t in config.layer_types])
    add_sentencepiece_vocab(w)
    w.add_add_space_prefix(False)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3N, layers)
    state = {name: np.ascontiguousarray(t.float().numpy()) for name, t in hf.state_dict().items()}
    for stack in ("altup_projections", "altup_unembed_projections"):
        state[f"model.{stack}.weight"] = np.stack([state.pop(f"model.{stack}.{i}.weight") for i in range(3)])
    rng = np.random.default_rng(0)
    for name, array in state.items():
        if name == "lm_head.weight":
            continue
        if "embed_tokens" in name:  # padded to the vocabulary with zero rows
            array = np.concatenate([array, np.zeros((config.vocab_size - len(array), array.shape[1]), np.float32)])
        gguf_name = names.get_name(name.removesuffix(".weight")) + ".weight"
        if qtype == Q.F32 or array.ndim < 2 or array.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            w.add_tensor(gguf_name, array)
        else:
            blocks = gguf_blocks(array.reshape(-1, array.shape[-1]), qtype, rng)
            w.add_tensor(gguf_name, blocks.reshape(*array.shape[:-1], -1), raw_dtype=qtype)
    finish(w)


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


def test_gemma3n_gguf_matches_the_model_it_was_written_from(tmp_path, tiny):
    """The import is the config transformers' model was built from (its last two layers reading layer 18's keys and
    values, the per-layer table padded to the vocabulary, AltUp's projections cut apart) and gives its logits."""
    from ferrum.config import ModelConfig

    hf, config = tiny
    _gemma3n_gguf(tmp_path / "m.gguf", hf, config, Q.F32)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    ours = ModelConfig.from_file(out)
    assert ours.model_type == "gemma3n_text"
    assert [s.kv_source for s in ours.arch.layers] == [None] * 20 + [18, 18]
    assert ours.arch.per_layer_inputs.vocab == config.vocab_size
    assert [s.gate_sparsity for s in ours.arch.layers] == config.activation_sparsity_pattern
    assert_logits_match(hf, out)


def test_gemma3n_gguf_without_what_llama_cpp_fixes_misses_transformers(tmp_path, tiny, monkeypatch):
    """Control: the same file read without llama.cpp's fixed activation sparsity, or with its norms taken as Gemma 3's
    ``1 + w`` (which the converter writes for Gemma 3, not 3n), misses transformers' logits."""
    from dataclasses import replace

    from ferrum.gguf_import import architectures

    hf, config = tiny
    _gemma3n_gguf(tmp_path / "m.gguf", hf, config, Q.F32)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    raw = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**raw, "activation_sparsity_pattern": [0.0] * _LAYERS}))
    monkeypatch.setitem(architectures.ARCHITECTURES, "gemma3n",
                        replace(architectures.ARCHITECTURES["gemma3n"], norm_offset=1.0))
    for folder in (out, convert_gguf(tmp_path / "m.gguf", tmp_path / "shifted")):
        with pytest.raises(AssertionError):
            assert_logits_match(hf, folder)


def test_a_quantized_gemma3n_gguf_runs_packed_as_its_float_import(tmp_path, tiny):
    hf, config = tiny
    _gemma3n_gguf(tmp_path / "m.gguf", hf, config, Q.Q8_0)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    packed = json.loads((out / "config.json").read_text())["quantization"]
    assert (packed["bits"], packed["group_size"]) == (8, 32)
    assert "model.altup_projections.1" not in packed  # the stack's matrices packed too
    assert_runs_as_its_float_import(tmp_path / "m.gguf", out, tmp_path / "float")


def test_a_gemma3n_gguf_whose_model_llama_cpp_runs_otherwise_is_refused(tmp_path, tiny):
    """llama.cpp reads keys and values from the first 20 layers whatever attention.shared_kv_layers says: a file
    whose checkpoint shared from elsewhere is refused by name."""
    hf, config = tiny
    _gemma3n_gguf(tmp_path / "m.gguf", hf, config, Q.F32, shared_kv=5)
    with pytest.raises(UnsupportedFeatureError, match="shared_kv_layers 5 is not supported"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
