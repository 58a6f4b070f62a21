"""The classic open families: OPT, GPT-Neo, CodeGen, Persimmon, XGLM, BioGPT against transformers 5.24 (the
reference) on tiny random checkpoints, on every backend here, and the conformance kit's oracle against it.

Bounds are those of tests/test_families.py: max |diff| <= 1e-4 * max(1, max |logit|) in float32. Each family's
control drops the piece that sets it apart (OPT's and BioGPT's position offset, GPT-Neo's missing score scale,
CodeGen's shard order...) and must then miss transformers by far more than that bound: so each parity test can
fail.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from ferrum.model import DecoderOnlyLLM

from support import (
    assert_forward_and_decode_match, assert_generates_greedily_as_transformers,
    assert_names_the_tensors_transformers_saves, built_checkpoints, reference_logits, runnable_backends, scaled_error,
)

VOCAB = 300  # write_tokenizer's tokens all have rows
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
WINDOW = 4  # GPT-Neo's local layers: shorter than the test sequences
IDS = dict(bos_token_id=1, eos_token_id=2)  # within the tiny vocabulary


def _config(name: str):
    import transformers

    if name == "opt":  # learned positions two rows in, ReLU, tied
        return transformers.OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, ffn_dim=80,
                                      num_attention_heads=4, max_position_embeddings=64)
    if name == "opt_unbiased_gelu":  # Galactica-like: GELU, no biases, norms without parameters, untied
        return transformers.OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, ffn_dim=80,
                                      num_attention_heads=4, max_position_embeddings=64, activation_function="gelu",
                                      enable_bias=False, layer_norm_elementwise_affine=False,
                                      tie_word_embeddings=False)
    if name == "gpt_neo":  # a global, a local and a local layer; scores never scaled
        return transformers.GPTNeoConfig(vocab_size=VOCAB, hidden_size=64, num_layers=3, num_heads=4,
                                         intermediate_size=80, max_position_embeddings=64, window_size=WINDOW,
                                         attention_types=[[["global", "local"], 1], [["local"], 1]], **IDS)
    if name == "codegen":  # q/k/v in four shards of two heads each, GPT-J's rope on 6 of 12 dims, untied
        return transformers.CodeGenConfig(vocab_size=VOCAB, n_embd=96, n_layer=2, n_head=8, n_positions=64,
                                          n_ctx=64, rotary_dim=6, n_inner=80, **IDS)
    if name == "persimmon":  # fused per-head q/k/v, q/k LayerNorms, rope on half of each head, squared ReLU
        return transformers.PersimmonConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=80,
                                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                                            rope_parameters={"rope_type": "default", "rope_theta": 25000.0,
                                                             "partial_rotary_factor": 0.5})
    if name == "xglm":  # sinusoidal positions two rows in, scaled embeddings
        return transformers.XGLMConfig(vocab_size=VOCAB, d_model=64, ffn_dim=80, num_layers=2, attention_heads=4,
                                       max_position_embeddings=64)
    if name == "biogpt":  # learned positions two rows in, scaled embeddings
        return transformers.BioGptConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=80, max_position_embeddings=64)
    raise ValueError(name)


FAMILIES = ("opt", "opt_unbiased_gelu", "gpt_neo", "codegen", "persimmon", "xglm", "biogpt")


def _arch(**fields):
    return lambda config: replace(config, arch=replace(config.arch, **fields))


#: What sets each family apart, dropped: the config without it.
DROPPED = {
    # the stored table's first rows read for the first positions (the table as long as stored)
    "opt": lambda config: replace(config, max_seq_len=config.max_seq_len + 2,
                                  arch=replace(config.arch, position_offset=0)),
    "gpt_neo": _arch(attn_scale=0.25),  # 1/sqrt(16), the scale GPT-2 would use
    "codegen": _arch(qkv_shards=0),  # q/k/v read as all queries, then keys, then values
    "persimmon": _arch(qkv_grouped=False),
    "xglm": _arch(position_offset=0),
    "biogpt": _arch(embed_scale=None),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return built_checkpoints(tmp_path_factory, {name: (lambda n=name: _config(n)) for name in FAMILIES}, VOCAB)


def _load(folder, backend: str = "cpu") -> DecoderOnlyLLM:
    return DecoderOnlyLLM.from_pretrained(folder, backend=backend, dtype="float32", block_size=4)


@pytest.mark.parametrize("backend", runnable_backends())
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_transformers_in_one_pass_and_stepwise(checkpoints, family, backend):
    folder, hf = checkpoints[family]
    assert_forward_and_decode_match(_load(folder, backend), TOKENS, reference_logits(hf, TOKENS))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_conformance_kits_oracle_matches_transformers(checkpoints, family):
    from ferrum.testing.arch_oracle import ArchOracle

    folder, hf = checkpoints[family]
    assert scaled_error(ArchOracle(folder).logits(TOKENS), reference_logits(hf, TOKENS)) <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_lists_the_tensors_transformers_saves(checkpoints, family):
    assert_names_the_tensors_transformers_saves(checkpoints[family][0])


@pytest.mark.parametrize("family", sorted(DROPPED))
def test_dropping_what_sets_the_family_apart_misses_transformers(checkpoints, family, monkeypatch):
    folder, hf = checkpoints[family]
    read = ModelConfig.from_file

    def without(path):
        return DROPPED[family](read(path))

    monkeypatch.setattr(ModelConfig, "from_file", staticmethod(without))
    assert scaled_error(_load(folder).forward_verify("x", TOKENS), reference_logits(hf, TOKENS)) > 1e-2


@pytest.mark.parametrize("backend", runnable_backends())
@pytest.mark.parametrize("family", ["opt", "gpt_neo", "codegen"])
def test_generates_greedily_as_transformers(checkpoints, family, backend):
    folder, hf = checkpoints[family]
    assert_generates_greedily_as_transformers(folder, hf, backend, TOKENS)


def test_an_opt_release_saved_as_its_decoder_loads(checkpoints, tmp_path):
    """facebook/opt-* store OPTModel's tensors: ``decoder.*``, no LM head (tied)."""
    from safetensors.numpy import load_file, save_file

    folder, hf = checkpoints["opt"]
    copy = shutil.copytree(folder, tmp_path / "opt")
    tensors = {name.removeprefix("model."): t for name, t in load_file(copy / "model.safetensors").items()
               if name != "lm_head.weight"}
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    assert scaled_error(_load(copy).forward_verify("x", TOKENS), reference_logits(hf, TOKENS)) <= 1e-4


@pytest.mark.parametrize("family", ["opt", "gpt_neo", "xglm"])
def test_a_shorter_context_than_the_position_table_loads(checkpoints, family):
    """The table keeps the rows it was stored with (GPT-2's did not load so either)."""
    folder, hf = checkpoints[family]
    model = DecoderOnlyLLM.from_pretrained(folder, backend="cpu", dtype="float32", max_seq_len=16)
    assert model.config.max_seq_len == 16
    assert scaled_error(model.forward_verify("x", TOKENS), reference_logits(hf, TOKENS)) <= 1e-4


def _with(folder, tmp_path, **changes):
    copy = shutil.copytree(folder, tmp_path / "changed")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **changes}))
    return copy


@pytest.mark.parametrize("family, changes, error, match", [
    ("opt", {"do_layer_norm_before": False}, UnsupportedFeatureError, "do_layer_norm_before.*OPT-350m"),
    ("opt", {"word_embed_proj_dim": 32}, UnsupportedFeatureError, "word_embed_proj_dim.*project_in"),
    ("opt", {"_remove_final_layer_norm": True}, UnsupportedFeatureError, "_remove_final_layer_norm"),
    ("opt", {"activation_function": "silu"}, UnsupportedFeatureError, "activation_function"),
    ("gpt_neo", {"attention_types": [[["global", "sparse"], 1], [["local"], 1]]}, UnsupportedFeatureError, "sparse"),
    ("gpt_neo", {"attention_types": [[["global", "local"], 1]]}, ConfigError, "gives 2 layers.*num_layers is 3"),
    ("gpt_neo", {"attention_types": "global"}, ConfigError, "attention_types"),
    ("codegen", {"n_embd": 90, "n_head": 3}, ConfigError, "n_embd.*4 shards"),
], ids=["opt-350m", "opt-projections", "opt-no-final-norm", "opt-silu", "neo-kind", "neo-count", "neo-shape",
        "codegen-shards"])
def test_refuses_what_it_does_not_run_by_name(checkpoints, tmp_path, family, changes, error, match):
    with pytest.raises(error, match=match):
        ModelConfig.from_file(_with(checkpoints[family][0], tmp_path, **changes))


@pytest.mark.parametrize("backend", runnable_backends())
@pytest.mark.parametrize("family", ["opt", "biogpt"])
def test_quantized_learned_positions_two_rows_in_load(checkpoints, family, backend, tmp_path):
    """``ferrum quantize`` packs OPT's and BioGPT's position tables as it packs the embedding (mlx-lm packs GPT-2's
    and GPT-BigCode's so); loading cut the two rows before position 0 off with a slice a packed table does not take
    (a TypeError on every backend). Against the oracle computing with the dequantized values."""
    from safetensors import safe_open

    from ferrum.quant.convert import quantize_checkpoint
    from ferrum.testing.arch_oracle import ArchOracle

    packed = quantize_checkpoint(checkpoints[family][0], tmp_path / "packed", bits=8, group_size=32)
    with safe_open(str(packed / "model.safetensors"), "np") as handle:
        assert any(name.endswith("embed_positions.scales") for name in handle.keys())
    got = _load(packed, backend).forward_verify("x", TOKENS)
    assert scaled_error(got, ArchOracle(packed).logits(TOKENS)) <= 1e-4


@pytest.mark.parametrize("backend", runnable_backends())
@pytest.mark.parametrize("family, adapted", [("gpt_neo", 3 * 6), ("codegen", 2 * 4)])
def test_lora_on_the_h_n_layout_gives_peft_s_merged_model(checkpoints, family, adapted, backend, tmp_path):
    """PEFT names their modules transformer.h.N.attn... (the layers' container the family stores): every linear
    projection adapted (GPT-Neo's q/k/v/out_proj and c_fc / c_proj; CodeGen's qkv_proj, whose rows the load
    regroups, out_proj, fc_in, fc_out) gives PEFT's merged model's logits."""
    from lora_checks import assert_adapter_matches_peft, make_peft

    folder, hf = checkpoints[family]
    merged = make_peft(hf, tmp_path / "lora", "all-linear", hide=False)
    assert_adapter_matches_peft(folder, tmp_path / "lora", hf, merged, adapted, TOKENS, backend)
