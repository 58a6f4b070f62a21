"""Xiaomi MiMo-V2-Flash (``mimo_v2_flash``): sliding layers with sinks and twice the full layers' key/value heads,
values narrower than the q/k heads and scaled, partial rope with a base per attention kind, and DeepSeek-V3's grouped
sigmoid routing without a shared expert; against transformers' MiMoV2FlashForCausalLM on every runnable backend, and
mlx-lm's mimo_v2_flash (which reads the release's own config keys) and its conversions.
The checks every MoE family makes alike are tests/test_moe_families.py's."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import transformers

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from ferrum.model import DecoderOnlyLLM
from support import (
    assert_forward_and_decode_match, assert_logits_move, build_transformers_model, reference_logits, runnable_backends,
    scaled_error,
)

BACKENDS = runnable_backends()
VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
TYPES = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]


def mimo_config(**extra) -> transformers.MiMoV2FlashConfig:
    """Four heads of 24 (8 rotated), values of 16; one key/value head on the full layers, two on the sliding ones (a
    window of 5, shorter than the test's 13 tokens); eight experts, three a token in one of two groups, scaled by
    1.5; the first layer dense."""
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=24, v_head_dim=16,
                    n_routed_experts=8, num_experts_per_tok=3, n_group=2, topk_group=1, routed_scaling_factor=1.5,
                    sliding_window=5, layer_types=TYPES, max_position_embeddings=256)
    return transformers.MiMoV2FlashConfig(**{**settings, **extra})


def release_keys(config: transformers.MiMoV2FlashConfig) -> dict:
    """The keys of Xiaomi's own code (and mlx-lm's) that MiMo-V2-Flash's config.json carries beside transformers',
    valued as transformers runs ``config``."""
    kv = config.num_key_value_heads
    return dict(hybrid_layer_pattern=[int(t == "sliding_attention") for t in config.layer_types],
                moe_layer_freq=[int(t == "sparse") for t in config.mlp_layer_types],
                add_swa_attention_sink_bias=True, add_full_attention_sink_bias=False,
                sliding_window_size=config.sliding_window - 1, layernorm_epsilon=config.rms_norm_eps,
                rope_theta=config.rope_parameters["full_attention"]["rope_theta"],
                swa_rope_theta=config.rope_parameters["sliding_attention"]["rope_theta"],
                swa_num_attention_heads=config.num_attention_heads, swa_num_key_value_heads=2 * kv,
                swa_head_dim=config.head_dim, swa_v_head_dim=config.v_head_dim, partial_rotary_factor=0.334,
                n_shared_experts=None, topk_method="noaux_tc", scoring_func="sigmoid")


def _build(folder, config, release: bool = False):
    """A random checkpoint whose correction biases (zeros at init) are random too; ``release``: its config.json with
    the release's own keys too."""
    hf = build_transformers_model(folder, config)
    with torch.no_grad():
        for name, buffer in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0, 0.5)
    hf.save_pretrained(folder)
    if release:
        raw = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**raw, **release_keys(config)}))
    return folder, hf


def build_checkpoints(tmp_path_factory) -> dict:
    return {"release": _build(tmp_path_factory.mktemp("mimo"), mimo_config(), release=True),
            # for mlx-lm's conversions: heads and values its group size divides, unscaled values, a window longer
            # than the test (mlx-lm attends sliding_window_size tokens, transformers one more) and one expert group,
            # as the release routes (mlx-lm scores the experts of dropped groups 0, not -inf, which a negative
            # correction bias can pick)
            "wide": _build(tmp_path_factory.mktemp("wide"), mimo_config(
                head_dim=96, v_head_dim=64, attention_value_scale=None, sliding_window=64, n_group=1, topk_group=1),
                release=True)}


def load(folder, backend="cpu", **kwargs) -> DecoderOnlyLLM:
    return DecoderOnlyLLM.from_pretrained(folder, backend=backend, dtype="float32", **kwargs)


def test_reads_the_layers(checkpoints):
    config = load(checkpoints["release"][0]).config
    arch = config.arch
    assert config.num_kv_heads == 2 and arch.value_head_dim == 16 and arch.value_scale == 0.707 and arch.sinks
    assert [(spec.window, spec.heads.kv_heads, spec.sinks, spec.rope.theta, spec.rope.rotary_dim, spec.mlp)
            for spec in arch.layers] == [(None, 1, False, 5e6, 8, "dense"), (5, None, True, 1e4, 8, "moe"),
                                         (5, None, True, 1e4, 8, "moe"), (None, 1, False, 5e6, 8, "moe")]
    moe = arch.moe
    assert (moe.routing, moe.n_group, moe.routed_scale, moe.shared_expert_size, moe.router_float32) == (
        "sigmoid_grouped", 2, 1.5, None, True)


@pytest.mark.parametrize("variant", ["release", "wide"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_and_decode_steps_match_transformers(checkpoints, backend, variant):
    folder, hf = checkpoints[variant]
    assert_forward_and_decode_match(load(folder, backend, block_size=4), TOKENS, reference_logits(hf, TOKENS))


@pytest.mark.parametrize("part", ["sinks", "attention_value_scale"])
def test_the_parity_checks_the_sinks_and_the_value_scale(checkpoints, part):
    """transformers' logits move where the sinks are zeroed or the values left unscaled: each matters in the
    comparison above (the correction biases' control is tests/test_moe_families.py's)."""
    folder, hf = checkpoints["release"]
    changed = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()
    with torch.no_grad():
        for layer in changed.model.layers:
            if part == "sinks" and layer.self_attn.sinks is not None:
                layer.self_attn.sinks.zero_()
            if part == "attention_value_scale":
                layer.self_attn.v_scale = 1.0
    assert_logits_move(changed, hf, TOKENS)


# ------------------------------------------------------------------ config


def _raw(**changes) -> dict:
    config = mimo_config()
    return {**config.to_dict(), **release_keys(config), **changes}


def test_config_defaults_are_transformers():
    """Without layer_types the first layer and every sixth are full; the release's sliding_window_size is a window of
    one more; routed_scaling_factor null is 1; the other defaults are MiMoV2FlashConfig's."""
    raw = {k: v for k, v in mimo_config().to_dict().items() if k not in (
        "layer_types", "mlp_layer_types", "rope_parameters", "head_dim", "v_head_dim", "attention_value_scale",
        "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "sliding_window", "num_key_value_heads")}
    raw.update(num_hidden_layers=7, num_attention_heads=16, routed_scaling_factor=None, sliding_window_size=3)
    config, want = ModelConfig.from_dict(raw), transformers.MiMoV2FlashConfig(**raw)
    assert [spec.window for spec in config.arch.layers] == [
        want.sliding_window if kind == "sliding_attention" else None for kind in want.layer_types]
    assert [spec.mlp for spec in config.arch.layers] == ["dense" if k == "dense" else "moe"
                                                         for k in want.mlp_layer_types]
    assert (config.head_dim, config.arch.value_head_dim, config.arch.value_scale, config.num_kv_heads) == (
        want.head_dim, want.v_head_dim, want.attention_value_scale, 2 * want.num_key_value_heads)
    moe = config.arch.moe
    assert (moe.num_experts, moe.top_k, moe.routed_scale) == (
        want.n_routed_experts, want.num_experts_per_tok, want.routed_scaling_factor)
    full = config.arch.layers[0].rope
    assert (full.theta, full.rotary_dim) == (5e6, int(want.head_dim * 0.334))


@pytest.mark.parametrize("changes, error, words", [
    ({"hybrid_layer_pattern": [1, 1, 1, 0]}, ConfigError, "'hybrid_layer_pattern' is [1, 1, 1, 0], but transformers "
                                                          "makes layers [1, 2] sliding"),
    ({"moe_layer_freq": [1, 1, 1, 1]}, ConfigError, "'moe_layer_freq' is [1, 1, 1, 1], but transformers makes "
                                                    "layers [1, 2, 3] sparse"),
    ({"swa_num_key_value_heads": 1}, UnsupportedFeatureError,
     "'swa_num_key_value_heads' is 1, but transformers runs 2"),
    ({"add_full_attention_sink_bias": True}, UnsupportedFeatureError, "'add_full_attention_sink_bias' is True"),
    ({"swa_rope_theta": 20000.0}, UnsupportedFeatureError,
     "'swa_rope_theta' is 20000.0, but transformers runs 10000.0"),
    ({"partial_rotary_factor": 0.5}, UnsupportedFeatureError, "rotates 8 / 8 dims of each head"),
    ({"n_shared_experts": 1}, UnsupportedFeatureError, "has no shared expert"),
    ({"v_head_dim": 32}, UnsupportedFeatureError, "'v_head_dim' (32) exceeds head_dim (24)"),
    ({"num_key_value_heads": 4}, ConfigError, "'num_key_value_heads' is 4; the sliding layers' twice that (8) must "
                                              "divide the 4 attention heads"),
])
def test_bad_keys_are_refused_by_name(changes, error, words):
    with pytest.raises(error, match=re.escape(words)):
        ModelConfig.from_dict(_raw(**changes))


@pytest.mark.parametrize("variant, group_size, advice", [
    ("release", 32, "no group size of 32, 64, 128 does at 4 bits: load the float checkpoint"),
    ("wide", 64, "quantize with group size 32, or load the float checkpoint")])
def test_ferrum_quantize_names_the_group_sizes_that_cut_the_padded_values(checkpoints, tmp_path, variant, group_size,
                                                                          advice):
    """Values narrower than the heads are padded at load in whole groups only: a refused group size is answered with
    the ones `ferrum quantize` accepts that would do, or with none."""
    from ferrum.quant.convert import quantize_checkpoint

    with pytest.raises(UnsupportedFeatureError, match=re.escape(advice)):
        quantize_checkpoint(checkpoints[variant][0], tmp_path / "q", bits=4, group_size=group_size)
    assert not (tmp_path / "q").exists()


def test_narrower_values_with_latent_attention_are_refused_when_built():
    """The values' padding is plain attention's (v_proj / o_proj shapes latent attention has not)."""
    import dataclasses

    from ferrum.arch.mla import MlaSpec
    from ferrum.config import ModelConfig

    arch = ModelConfig.from_dict(mimo_config().to_dict()).arch
    mla = MlaSpec(heads=4, q_lora_rank=None, kv_lora_rank=16, nope=16, rope=8, v_head_dim=16, bias=False)
    with pytest.raises(UnsupportedFeatureError, match=r"value_head_dim\) with latent attention"):
        dataclasses.replace(arch, mla=mla)


def _peft_adapter(hf, folder, targets: list[str]):
    """A PEFT adapter of ``targets`` with B factors away from 0; returns PEFT's model."""
    import copy

    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    adapted = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                      init_lora_weights=False)).eval()
    with torch.no_grad():
        for name, weight in adapted.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.2)
    adapted.save_pretrained(folder)
    return adapted


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_on_padded_and_repeated_key_value_heads_matches_peft(checkpoints, backend, tmp_path):
    """k/v adapters trained on the stored heads (values 16 wide, one key/value head on the full layers): checked
    against the loaded shapes (padded to 24, repeated), they were refused as trained for another model; their B rows
    are now fitted as the load fits the weights (and the values scaled)."""
    from ferrum.model import ForwardItem

    folder, hf = checkpoints["release"]
    adapted = _peft_adapter(hf, tmp_path / "lora", ["q_proj", "k_proj", "v_proj"])
    want = reference_logits(adapted, TOKENS)
    model = load(folder, backend)
    model.adapters.load("a", tmp_path / "lora")
    got = model.ops.to_numpy(model.forward([ForwardItem("y", TOKENS, 0, adapter="a")], all_logits=True).logits)
    assert scaled_error(got, want) <= 1e-4
    assert scaled_error(reference_logits(hf, TOKENS), want) > 1e-2  # the adapter moves the logits


def test_lora_on_o_proj_of_padded_values_is_refused_by_name(checkpoints, tmp_path):
    from ferrum.errors import AdapterError

    folder, hf = checkpoints["release"]
    _peft_adapter(hf, tmp_path / "lora", ["o_proj"])
    with pytest.raises(AdapterError, match="o_proj whose value heads Ferrum pads at load"):
        load(folder).adapters.load("a", tmp_path / "lora")
