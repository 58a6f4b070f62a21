"""DeepSeek-V3 under its releases' own model_types (mlx-lm's MODEL_REMAPPING: ``kimi_k2`` and ``joyai_llm_flash`` ->
deepseek_v3): Kimi K2's and JoyAI-LLM-Flash's config.json as released (remote code's keys, transformers 4's rope
spelling), against transformers' DeepseekV3 on the same weights and mlx-lm's own model, and mlx-lm's conversions."""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings

import numpy as np
import pytest
import transformers

from ferrum.config import ModelConfig
from ferrum.errors import UnsupportedFeatureError
from support import (
    assert_engine_keeps_greedy_tokens, assert_every_backend_runs_it_as_mlx_lm, assert_forward_and_decode_match,
    float32_model, mlx_lm_converted, mlx_lm_logits, randomized_reference, reference_logits, runnable_backends,
    scaled_error, small_pool_engine, staggered_greedy_workload, with_prediction_layer, write_tokenizer,
)

BACKENDS = runnable_backends()
VOCAB = 120
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
#: Kimi K2's rope settings in transformers 4's spelling, as its config.json writes them (beta_fast 1, factor 32),
#: over a pretraining context the test's positions reach past the high-frequency end of.
YARN = {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 8, "type": "yarn"}
#: What Kimi K2's config.json carries beyond DeepseekV3Config's keys (its remote code's), all unread.
REMOTE_CODE_KEYS = {"auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
                    "aux_loss_alpha": 0.001, "seq_aux": True, "pretraining_tp": 1, "topk_method": "noaux_tc",
                    "scoring_func": "sigmoid", "ep_size": 1}


def tiny_config() -> transformers.DeepseekV3Config:
    """Sizes mlx-lm packs at group 32 (kv_b_proj's halves too), one expert group as Kimi K2 routes."""
    return transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=32,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
        n_shared_experts=1, first_k_dense_replace=1, max_position_embeddings=256, routed_scaling_factor=2.827,
        norm_topk_prob=True, rms_norm_eps=1e-6, rope_parameters={"rope_type": "yarn", "rope_theta": 50000.0,
                                                                  **{k: v for k, v in YARN.items() if k != "type"}})


def as_released(folder, model_type: str, **changes) -> dict:
    """Rewrite ``folder``'s config.json as the release writes it: its model_type, transformers 4's rope keys, the
    remote code's keys; the tokenizer's class named, so that mlx-lm's loader does not ask transformers for the
    config's (remote) class."""
    tokenizer = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**tokenizer,
                                                              "tokenizer_class": "PreTrainedTokenizerFast"}))
    config = json.loads((folder / "config.json").read_text())
    params = config.pop("rope_parameters")
    config.update(model_type=model_type, architectures=["DeepseekV3ForCausalLM"], rope_theta=params["rope_theta"],
                  rope_scaling=YARN, num_nextn_predict_layers=0, **REMOTE_CODE_KEYS, **changes)
    (folder / "config.json").write_text(json.dumps(config))
    return config


def _edit_config(folder, **changes) -> None:
    """Set config.json's keys to ``changes`` (None: remove the key)."""
    config = {**json.loads((folder / "config.json").read_text()), **changes}
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    """(release folder, transformers' DeepseekV3 on its weights, mlx-lm's logits over TOKENS)."""
    folder = tmp_path_factory.mktemp("kimi_k2")
    hf = randomized_reference(tiny_config())
    hf.save_pretrained(folder)
    write_tokenizer(folder, VOCAB)
    as_released(folder, "kimi_k2")
    return folder, hf, mlx_lm_logits(folder, TOKENS)


def test_mlx_lm_runs_the_release_as_transformers_does(kimi):
    """The references agree, and the release's YaRN moves them (its spelling is read, not skipped)."""
    folder, hf, want = kimi
    assert scaled_error(want, reference_logits(hf, TOKENS)) <= 1e-4
    plain = transformers.DeepseekV3ForCausalLM.from_pretrained(
        folder, rope_parameters={"rope_type": "default", "rope_theta": 50000.0}).float().eval()
    assert scaled_error(reference_logits(plain, TOKENS), want) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_kimi_k2_runs_as_mlx_lm(kimi, backend):
    folder, _, want = kimi
    model = float32_model(folder, backend, block_size=4)
    assert model.config.model_type == "kimi_k2" and model.config.arch.layers[0].rope.kind == "yarn"
    assert_forward_and_decode_match(model, TOKENS, want)


def test_engine_keeps_greedy_tokens(kimi):
    folder, hf, _ = kimi
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, "cpu", **config), hf,
                                      staggered_greedy_workload(VOCAB))


@pytest.mark.skipif("mlx" not in BACKENDS, reason="mlx-lm's conversions need MLX")
@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_conversions_load(kimi, tmp_path, bits):
    """mlx-lm's conversion of the release (kv_b_proj split into embed_q / unembed_out, experts stacked), float and
    packed: every backend runs it as mlx-lm does."""
    folder, _, want = kimi
    # mlx-lm's tokenizer loader asks transformers for the config's class, which needs the release's remote code
    # (trust_remote_code) under kimi_k2: the source is converted as deepseek_v3, the model_type written back after
    source = shutil.copytree(folder, tmp_path / "source")
    _edit_config(source, model_type="deepseek_v3", auto_map=None)
    stored, got = mlx_lm_converted(source, tmp_path / "mlx", TOKENS, bits, group=32)
    _edit_config(tmp_path / "mlx", model_type="kimi_k2")
    assert {"model.layers.1.self_attn.embed_q.weight", "model.layers.1.mlp.switch_mlp.up_proj.weight"} <= set(stored)
    assert ("model.layers.1.mlp.switch_mlp.up_proj.scales" in stored) == (bits is not None)
    if bits is None:
        assert scaled_error(got, want) <= 1e-4
    assert_every_backend_runs_it_as_mlx_lm(tmp_path / "mlx", TOKENS, got, packed=bits is not None)


KIMI_K2 = {  # Kimi-K2-Instruct's config.json (its FP8 quantization_config left out)
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2", **REMOTE_CODE_KEYS,
    "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 163584, "eos_token_id": 163585,
    "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02,
    "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 131072, "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 384, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 64, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 64,
    "num_nextn_predict_layers": 0, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06, "rope_theta": 50000.0, "routed_scaling_factor": 2.827, "tie_word_embeddings": False,
    "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "topk_group": 1, "torch_dtype": "bfloat16", "use_cache": True, "v_head_dim": 128, "vocab_size": 163840}


def test_kimi_k2_configs_read_as_released():
    """K2-Instruct (YaRN 32 over 4096), K2-Instruct-0905 / K2-Thinking's factor 64 over a 262144 context; a
    K2-Thinking release's int4 compressed-tensors weights are refused by name."""
    config = ModelConfig.from_dict(KIMI_K2)
    rope, moe = config.arch.layers[0].rope, config.arch.moe
    assert (config.num_heads, config.head_dim, config.max_seq_len, rope.factor, rope.original_max) == (
        64, 192, 131072, 32.0, 4096)
    assert (moe.num_experts, moe.top_k, moe.n_group, moe.routed_scale, moe.shared_expert_size) == (
        384, 8, 1, 2.827, 2048)
    assert config.arch.attn_scale == pytest.approx(192 ** -0.5 * (0.1 * math.log(32) + 1) ** 2)
    assert config.eos_token_ids == (163585,)
    long = ModelConfig.from_dict({**KIMI_K2, "max_position_embeddings": 262144,
                                  "rope_scaling": {**KIMI_K2["rope_scaling"], "factor": 64.0}})
    assert long.arch.layers[0].rope.factor == 64.0 and long.max_seq_len == 262144
    thinking = {**KIMI_K2, "quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
            "weights": {"num_bits": 4, "group_size": 32, "symmetric": True, "strategy": "group", "type": "int"}}}}}
    with pytest.raises(UnsupportedFeatureError, match=re.escape("compressed-tensors format 'pack-quantized'")):
        ModelConfig.from_dict(thinking)


def test_joyai_llm_flash_leaves_its_prediction_layer_out(kimi, tmp_path):
    """JoyAI-LLM-Flash's release: num_nextn_predict_layers 1 and that layer stored after the decoder's, left out
    quietly (mlx-lm's sanitize drops DeepSeek-V3's layer 61 only, so it cannot load this release)."""
    folder, hf, want = kimi
    release = with_prediction_layer(folder, tmp_path / "joyai", 1)
    config = json.loads((release / "config.json").read_text())
    (release / "config.json").write_text(json.dumps({**config, "model_type": "joyai_llm_flash"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = float32_model(release)
    assert model.config.model_type == "joyai_llm_flash"
    assert scaled_error(model.forward_verify("j", TOKENS), want) <= 1e-4
    with pytest.raises(ValueError, match="parameters not in model"):
        mlx_lm_logits(release, TOKENS)


# ------------------------------------------------------------------ the multimodal wrappers' text models

#: wrapper model_type -> (its text_config's model_type, a vision tensor and a projector tensor its releases store).
WRAPPERS = {"kimi_k25": ("kimi_k2", "vision_tower.encoder.blocks.0.wqkv.weight", "mm_projector.proj.0.weight"),
            "kimi_vl": ("deepseek_v3", "vision_tower.encoder.blocks.0.wqkv.weight",
                        "multi_modal_projector.linear_1.weight")}


def wrapped(folder, dest, wrapper: str):
    """Checkpoint ``folder``'s text model as the ``wrapper`` release stores it: every tensor under
    ``language_model.``, a vision tower and projector beside it, the text config under text_config."""
    from safetensors.numpy import load_file, save_file

    text_type, *vision = WRAPPERS[wrapper]
    shutil.copytree(folder, dest)
    tensors = {f"language_model.{name}": value for name, value in load_file(dest / "model.safetensors").items()}
    save_file({**tensors, **{name: np.ones((4, 4), np.float32) for name in vision}}, dest / "model.safetensors",
              metadata={"format": "pt"})
    text = json.loads((dest / "config.json").read_text())
    outer = {"model_type": wrapper, "architectures": ["KimiK25ForConditionalGeneration"], "auto_map": text["auto_map"],
             "text_config": {**text, "model_type": text_type}, "vision_config": {"patch_size": 14},
             "torch_dtype": text.get("torch_dtype", text.get("dtype"))}  # float32: mlx-lm computes in it
    (dest / "config.json").write_text(json.dumps(outer))
    return dest


@pytest.mark.parametrize("backend", BACKENDS)
def test_kimi_k25_runs_its_text_model_as_mlx_lm(kimi, tmp_path, backend):
    """Kimi K2.5's release: the text model (kimi_k2) under language_model., vision tensors beside it unread; the
    logits are mlx-lm's kimi_k25's (its sanitize splits kv_b_proj as deepseek_v3's does) and the text model's."""
    folder, _, want = kimi
    release = wrapped(folder, tmp_path / "k25", "kimi_k25")
    assert scaled_error(mlx_lm_logits(release, TOKENS), want) <= 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = float32_model(release, backend, block_size=4)
    assert model.config.model_type == "kimi_k2" and model.config.arch.prefix == "language_model.model."
    assert_forward_and_decode_match(model, TOKENS, want)


def test_kimi_vl_runs_its_text_model(kimi, tmp_path):
    """Kimi-VL's release (a deepseek_v3 text_config, its kv_b_proj whole): the text model's logits. mlx-lm's kimi_vl
    does not split kv_b_proj, so it loads only a text model already split, as mlx-lm's deepseek_v3 conversions store
    it: Ferrum runs that layout under the wrapper too, as mlx-lm's kimi_vl does."""
    folder, hf, want = kimi
    release = wrapped(folder, tmp_path / "vl", "kimi_vl")
    assert scaled_error(float32_model(release).forward_verify("v", TOKENS), reference_logits(hf, TOKENS)) <= 1e-4
    with pytest.raises(ValueError, match="parameters not in model"):
        mlx_lm_logits(release, TOKENS)
    converted = tmp_path / "mlx"
    source = shutil.copytree(folder, tmp_path / "source")
    _edit_config(source, model_type="deepseek_v3", auto_map=None)
    mlx_lm_converted(source, converted, TOKENS)
    _edit_config(converted, auto_map=REMOTE_CODE_KEYS["auto_map"])
    split = wrapped(converted, tmp_path / "vl_split", "kimi_vl")
    got = mlx_lm_logits(split, TOKENS)
    assert scaled_error(got, want) <= 1e-4
    for backend in BACKENDS:
        assert scaled_error(float32_model(split, backend).forward_verify("s", TOKENS), got) <= 1e-4, backend


@pytest.mark.skipif("mlx" not in BACKENDS, reason="mlx-lm's conversions need MLX")
def test_mlx_lm_converts_kimi_k25_packed(kimi, tmp_path):
    """mlx-lm's 4-bit conversion of the Kimi K2.5 release (vision tensors dropped, kv_b_proj split, experts
    stacked under language_model.): every backend runs it as mlx-lm does."""
    folder, _, want = kimi
    stored, got = mlx_lm_converted(wrapped(folder, tmp_path / "k25", "kimi_k25"), tmp_path / "mlx", TOKENS, 4,
                                   group=32)
    assert "language_model.model.layers.1.self_attn.embed_q.scales" in stored
    assert not any(name.startswith(("vision_tower", "mm_projector")) for name in stored)
    assert scaled_error(got, want) > 1e-4  # 4 bits move the logits
    assert_every_backend_runs_it_as_mlx_lm(tmp_path / "mlx", TOKENS, got, packed=True)


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_a_text_config_without_model_type_is_the_wrappers_decoder(wrapper):
    """mlx-lm's kimi_vl / kimi_k25 read their text_config without a model_type: Ferrum takes the wrapper's."""
    text = {k: v for k, v in KIMI_K2.items() if k != "model_type"}
    config = ModelConfig.from_dict({"model_type": wrapper, "text_config": text, "vision_config": {}})
    assert config.model_type == "deepseek_v3" and config.arch.mla is not None and config.num_heads == 64
