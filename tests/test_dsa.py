"""DeepSeek-V3.2 (``deepseek_v32``) and GLM-5 (``glm_moe_dsa``): DeepSeek-V3's latent attention and routing with DSA's
lightning indexer, run as the dense attention it equals up to ``index_topk`` keys, with the context capped there
(ferrum.arch.dsa); against transformers' own models, whose indexers really select (index_topk 8 here) past it."""

from __future__ import annotations

import json
import logging
import re
import warnings

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from ferrum.config import ModelConfig
from ferrum.errors import CheckpointError, ConfigError, ContextLengthExceededError, UnsupportedFeatureError
from support import (
    assert_every_backend_runs_it_as_mlx_lm, assert_forward_and_decode_match, float32_model, mlx_lm_converted,
    reference_logits, runnable_backends, saved_references, scaled_error, small_pool_engine, with_edited_tensors,
    write_tokenizer,
)

BACKENDS = runnable_backends()
TOPK = 8
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, 97, size=TOPK)]  # every query sees <= TOPK keys
LONG = [int(t) for t in np.random.RandomState(1).randint(0, 97, size=2 * TOPK)]


def dsa_config(kind: str, **extra):
    settings = dict(vocab_size=97, hidden_size=64, intermediate_size=80, moe_intermediate_size=24,
                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24,
                    kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8,
                    num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1,
                    max_position_embeddings=256, index_topk=TOPK, index_head_dim=16, index_n_heads=2)
    make = {"deepseek_v32": transformers.DeepseekV32Config, "glm_moe_dsa": transformers.GlmMoeDsaConfig}[kind]
    return make(**{**settings, **extra})


#: DeepSeek-V3.2 grouped as its release is (n_group 2 here); GLM-5 with a layer sharing the first's selection (no
#: indexer of its own), one group, routed scaling 1.8.
VARIANTS = {"deepseek_v32": dict(kind="deepseek_v32"),
            "glm_moe_dsa": dict(kind="glm_moe_dsa", index_topk_pattern="FSF", n_group=1, topk_group=1,
                                routed_scaling_factor=1.8)}


def build_checkpoints(tmp_path_factory) -> dict:
    return saved_references(tmp_path_factory, VARIANTS, dsa_config)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_transformers_within_index_topk(checkpoints, backend, variant):
    """A full forward and token-by-token decode of index_topk tokens, against transformers' logits."""
    folder, hf = checkpoints[variant]
    model = float32_model(folder, backend, block_size=4)
    assert model.config.max_seq_len == TOPK
    assert_forward_and_decode_match(model, TOKENS, reference_logits(hf, TOKENS))


def test_the_indexer_selects_past_index_topk(checkpoints):
    """The control: past index_topk keys transformers' attention is no longer dense (its logits move once the
    indexer must choose), which is why Ferrum caps the context there."""
    folder, hf = checkpoints["deepseek_v32"]
    dense = transformers.AutoModelForCausalLM.from_pretrained(folder, index_topk=len(LONG)).float().eval()
    sparse, full = reference_logits(hf, LONG), reference_logits(dense, LONG)
    assert scaled_error(sparse[:TOPK], full[:TOPK]) < 1e-5
    assert scaled_error(sparse[TOPK:], full[TOPK:]) > 1e-3


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_longer_context_is_refused(checkpoints, variant, caplog):
    """The context is index_topk tokens, said at load: a longer prompt, or a decode past it, is refused."""
    folder, _ = checkpoints[variant]
    asked_for_more = pytest.warns(UserWarning, match="context of 8 tokens \\(.*index_topk")  # the cap's reason
    with caplog.at_level(logging.WARNING, logger="ferrum.config"), asked_for_more:
        model = float32_model(folder, block_size=4, max_seq_len=64)
    assert model.config.max_seq_len == TOPK
    assert f"runs a context of {TOPK} tokens, not 256" in caplog.text and "index_topk" in caplog.text
    with pytest.raises(ContextLengthExceededError, match=f"context length of {TOPK}"):
        model.forward_verify("long", LONG[:TOPK + 1])
    model.prefill("steps", TOKENS)
    with pytest.raises(ContextLengthExceededError):
        model.decode("steps", TOKENS[0], TOPK)
    engine = small_pool_engine(folder)
    with pytest.raises(ContextLengthExceededError):
        engine.add_request(LONG[:TOPK + 1], _greedy(4))


def _greedy(max_tokens: int):
    from ferrum.sampling import SamplingParams

    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)


def test_the_engine_generates_transformers_tokens_up_to_the_cap(checkpoints):
    """Greedy tokens as transformers generates them, ending with the capped context (the engine's tokens, prompt and
    reply, fill it) however many are asked for."""
    folder, hf = checkpoints["glm_moe_dsa"]
    engine = small_pool_engine(folder)
    engine.add_request(TOKENS[:5], _greedy(10))
    (out,) = [o for o in engine.run_until_done() if o.finished]
    with torch.no_grad():
        want = hf.generate(torch.tensor([TOKENS[:5]]), max_new_tokens=TOPK - 5, do_sample=False)[0, 5:]
    assert list(out.token_ids) == want.tolist()


def test_the_indexers_are_checked_and_dropped_quietly(checkpoints, tmp_path):
    """Each indexed layer's tensors must be there with their shapes (GLM-5's shared layer has none); they load
    without an unread-tensor warning, and nothing keeps them."""
    folder, hf = checkpoints["glm_moe_dsa"]
    shapes = {name: s for name, s in _shapes(folder).items() if ".indexer." in name}
    assert {name.split(".")[2] for name in shapes} == {"0", "2"} and len(shapes) == 10
    unused = with_edited_tensors(folder, tmp_path / "unused", lambda t: t.update({  # weights no indexer could run with
        name: np.full(shape, 1e4, np.float32) for name, shape in shapes.items()}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = float32_model(unused)
    assert scaled_error(model.forward_verify("unused", TOKENS), reference_logits(hf, TOKENS)) < 1e-4
    bad = with_edited_tensors(folder, tmp_path / "bad", lambda t: t.update({
        "model.layers.2.self_attn.indexer.wk.weight": np.zeros((8, 64), np.float32)}))
    with pytest.raises(CheckpointError, match=re.escape("model.layers.2.self_attn.indexer.wk.weight")):
        float32_model(bad)
    missing = with_edited_tensors(folder, tmp_path / "missing",
                                  lambda t: t.pop("model.layers.0.self_attn.indexer.wq_b.weight"))
    with pytest.raises(CheckpointError, match="indexer.wq_b"):
        float32_model(missing)


def _shapes(folder) -> dict:
    return {name: tensor.shape for name, tensor in load_file(folder / "model.safetensors").items()}


# ------------------------------------------------------------------ config


@pytest.mark.parametrize("kinds", [dict(index_topk_freq=3, index_skip_topk_offset=2),
                                   dict(index_topk_freq=2, index_skip_topk_offset=0), dict(index_topk_pattern="FFSS"),
                                   dict(index_topk_pattern="FSFSS", indexer_types=["full"] * 4 + ["shared"])])
def test_glm_indexer_kinds_read_as_transformers_derives_them(kinds):
    hf = dsa_config("glm_moe_dsa", num_hidden_layers=len(kinds.get("index_topk_pattern", "x" * 5)), **kinds)
    raw = {**{k: v for k, v in hf.to_dict().items() if k != "indexer_types"}, **kinds}
    arch = ModelConfig.from_dict(raw).arch
    assert arch.indexer.layers == tuple(kind == "full" for kind in hf.indexer_types)


@pytest.mark.parametrize("key", ["index_topk_freq", "index_skip_topk_offset"])
def test_a_null_key_the_glm_indexer_kinds_derive_from_is_refused_by_name(key):
    """transformers derives GLM-5's indexer kinds from both keys where no list is given, and fails on a null one;
    Ferrum refuses it by name (it read a null offset as 0)."""
    with pytest.raises(TypeError):
        dsa_config("glm_moe_dsa", **{key: None})
    raw = {k: v for k, v in dsa_config("glm_moe_dsa").to_dict().items() if k != "indexer_types"}
    with pytest.raises(ConfigError, match=f"'{key}' is null"):
        ModelConfig.from_dict({**raw, key: None})


def _raw(kind: str = "deepseek_v32", **changes) -> dict:
    return {**dsa_config(kind).to_dict(), **changes}


@pytest.mark.parametrize("kind, changes, error, words", [
    ("deepseek_v32", {"rope_interleave": False}, UnsupportedFeatureError, "always rotate adjacent pairs"),
    ("deepseek_v32", {"q_lora_rank": None}, ConfigError, "'q_lora_rank' must be a positive integer"),
    ("deepseek_v32", {"index_topk": 0}, ConfigError, "'index_topk' must be a positive integer"),
    ("deepseek_v32", {"first_k_dense_replace": 2}, ConfigError, "'first_k_dense_replace' is 2, but mlp_layer_types"),
    ("deepseek_v32", {"moe_layer_freq": 2}, UnsupportedFeatureError, "'moe_layer_freq' is 2"),
    ("glm_moe_dsa", {"indexer_types": ["full", "sparse", "full"]}, ConfigError, "must list 'full' or 'shared'"),
    ("glm_moe_dsa", {"indexer_types": ["full", "shared"]}, ConfigError, "lists 2 layers, but the model has 3"),
    ("glm_moe_dsa", {"indexer_types": ["shared", "full", "full"]}, ConfigError, "makes the first layer 'shared'"),
])
def test_bad_keys_are_refused_by_name(kind, changes, error, words):
    with pytest.raises(error, match=re.escape(words)):
        ModelConfig.from_dict(_raw(kind, **changes))


#: DeepSeek-V3.2-Exp's release config.json (DeepSeek-V3's keys, its FP8 quantization left out), as transformers reads
#: it: no mlp_layer_types (first_k_dense_replace's 3 dense layers), YaRN to 163840 tokens, the MTP layer 61.
DEEPSEEK_V3_2 = {
    "architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32", "attention_bias": False,
    "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168, "index_head_dim": 128,
    "index_n_heads": 64, "index_topk": 2048, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8,
    "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False,
    "topk_group": 4, "topk_method": "noaux_tc", "v_head_dim": 128, "vocab_size": 129280}


def test_deepseek_v3_2_release_config_reads_as_transformers_reads_it():
    config = ModelConfig.from_dict(json.loads(json.dumps(DEEPSEEK_V3_2)))
    hf = transformers.DeepseekV32Config(**DEEPSEEK_V3_2)
    arch = config.arch
    assert config.max_seq_len == 2048  # YaRN's 163840 capped at index_topk
    assert [layer.mlp == "moe" for layer in arch.layers] == [kind == "sparse" for kind in hf.mlp_layer_types]
    assert arch.mtp_layers == 1 and arch.indexer.layers == (True,) * 61
    assert (arch.indexer.heads, arch.indexer.head_dim) == (64, 128)
    rope = arch.layers[0].rope
    assert (rope.kind, rope.rotary_dim, rope.interleaved) == ("yarn", 64, True)
    moe = arch.moe
    assert (moe.num_experts, moe.top_k, moe.n_group, moe.topk_group, moe.routed_scale, moe.shared_expert_size) == (
        256, 8, 8, 4, 2.5, 2048)


def test_glm_5_defaults_are_transformers_defaults():
    """A config giving only the sizes transformers has no GLM-5 default for runs GlmMoeDsaConfig's defaults."""
    raw = {"model_type": "glm_moe_dsa", "num_hidden_layers": 6, "vocab_size": 97, "hidden_size": 64,
           "intermediate_size": 80, "num_attention_heads": 4, "max_position_embeddings": 4096}
    hf = transformers.GlmMoeDsaConfig(**raw)
    config = ModelConfig.from_dict(raw)
    arch, moe = config.arch, config.arch.moe
    assert config.rms_norm_eps == hf.rms_norm_eps and config.max_seq_len == hf.index_topk
    mla = arch.mla
    assert (mla.q_lora_rank, mla.nope, mla.v_head_dim) == (hf.q_lora_rank, hf.qk_nope_head_dim, hf.v_head_dim)
    assert (arch.indexer.heads, arch.indexer.layers) == (hf.index_n_heads, (True,) * 6)
    assert (moe.num_experts, moe.n_group, moe.routed_scale) == (hf.n_routed_experts, hf.n_group,
                                                                  hf.routed_scaling_factor)
    assert [layer.mlp == "moe" for layer in arch.layers] == [kind == "sparse" for kind in hf.mlp_layer_types]


@pytest.mark.slow  # mlx-lm converts (and packs) the checkpoint: ~3 s
@pytest.mark.skipif("mlx" not in BACKENDS, reason="mlx-lm needs MLX")
@pytest.mark.parametrize("bits, group", [(None, 64), (4, 32), (4, 64)])
def test_mlx_lm_conversions_of_deepseek_v3_2_run_as_mlx_lm_runs_them(checkpoints, bits, group, tmp_path):
    """mlx-lm's deepseek_v32 conversions (kv_b_proj split into embed_q / unembed_out, the indexers kept), float or
    packed, run on every backend as mlx-lm runs them within index_topk, the float one as transformers. (mlx-lm's
    glm_moe_dsa needs an indexer on every layer: GLM-5's shared selection, index_topk_pattern, it cannot load.)"""
    import shutil

    folder, hf = checkpoints["deepseek_v32"]
    source = tmp_path / "hf"
    shutil.copytree(folder, source)
    write_tokenizer(source)
    stored, want = mlx_lm_converted(source, tmp_path / "mlx", TOKENS, bits, group)
    assert "model.layers.1.self_attn.embed_q.weight" in stored
    assert "model.layers.1.self_attn.kv_b_proj.weight" not in stored
    if bits is None:
        assert scaled_error(want, reference_logits(hf, TOKENS)) <= 1e-4
    assert_every_backend_runs_it_as_mlx_lm(tmp_path / "mlx", TOKENS, want, packed=bits is not None)
