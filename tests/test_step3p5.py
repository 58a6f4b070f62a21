"""StepFun's Step 3.5 (``step3p5``, remote code on the hub; mlx-lm's step3p5 is the reference): zero-centred norms,
full and sliding layers with their own query heads and ropes (a base and rotary share per layer, llama3 scaling on the
full ones only), sigmoid-gated heads, sigmoid routing chosen with a bias beside a shared expert, and per-layer clamps
of the swish and up projection. The release folder is built from mlx-lm's own model with random weights under the
release's names (sanitize inverted, proven by mlx-lm loading it back); mlx-lm's float and 4-bit conversions too."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from ferrum.moe.activation import ClampedSwiGLU
from mlx_lm_release import MlxLmReference, random_mlx_lm_model, write_release
from support import (
    assert_engine_keeps_greedy_tokens, assert_every_backend_runs_it_as_mlx_lm, assert_forward_and_decode_match,
    float32_model, mlx_lm_converted, runnable_backends, scaled_error, small_pool_engine,
    staggered_greedy_workload,
)

mx = pytest.importorskip("mlx.core")
step3p5 = pytest.importorskip("mlx_lm.models.step3p5")

BACKENDS = runnable_backends()
VOCAB = 300
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
#: Four layers and an MTP layer's entries (as the releases list them); 4 query heads on the full layers, 8 on the
#: sliding ones (over 5 tokens), 2 key/value heads; a dense first layer, eight experts of 32, three a token, a shared
#: expert of 24; clamps that bind on some layers.
CONFIG = {
    "architectures": ["Step3p5ForCausalLM"], "model_type": "step3p5", "vocab_size": VOCAB, "hidden_size": 64,
    "intermediate_size": 48, "num_hidden_layers": 4, "num_attention_heads": 4, "num_attention_groups": 2,
    "head_dim": 16, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "sliding_window": 5,
    "layer_types": ["full_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    "rope_theta": [1000.0, 100.0, 1000.0, 100.0, 1000.0], "partial_rotary_factors": [0.5, 1.0, 0.5, 1.0, 0.5],
    "rope_scaling": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 16},
    "yarn_only_types": ["full_attention"],
    "attention_other_setting": {"attention_type": "sliding_attention", "num_attention_heads": 8,
                                "num_attention_groups": 2, "head_dim": 16},
    "use_head_wise_attn_gate": True, "moe_num_experts": 8, "moe_top_k": 3, "moe_intermediate_size": 32,
    "share_expert_dim": 24, "moe_layers_enum": "1,2,3", "moe_router_scaling_factor": 2.5, "norm_expert_weight": True,
    "swiglu_limits": [0.0, None, 0.4, 0.4, 0.0], "swiglu_limits_shared": [0.3, 0.0, 0.3, None, 0.0],
    "num_nextn_predict_layers": 1, "use_qk_norm": True, "zero_centered": True, "moe_router_activation": "sigmoid",
    "use_moe_router_bias": True, "need_fp32_gate": True, "att_impl_type": "GQA", "tie_word_embeddings": False,
}
#: mlx-lm's ``sanitize`` renames, the other way round: its names -> the release's.
RELEASE_NAMES = ((".mlp.switch_mlp.", ".moe."), (".mlp.gate.gate.", ".moe.gate."),
                 (".mlp.gate.router_bias", ".moe.router_bias"), (".mlp.share_expert.", ".share_expert."))


def _release_name(name: str) -> str:
    return next((name.replace(ours, theirs) for ours, theirs in RELEASE_NAMES if ours in name), name)


def _draw(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray | None:
    """Router biases that change the experts chosen (the rest :func:`mlx_lm_release.fan_in`'s: activations of O(1),
    norms around 1)."""
    return 0.5 * rng.standard_normal(shape) if name.endswith("router_bias") else None


def _as_released(tensors: dict) -> dict:
    """The release's names and its norms' ``w`` where mlx-lm runs ``1 + w``."""
    return {_release_name(name): value - 1.0 if name.endswith("norm.weight") else value
            for name, value in tensors.items()}


def build_release(folder, config: dict = CONFIG, seed: int = 0):
    """A random mlx-lm model of ``config`` written to ``folder`` as the release stores it, an MTP layer after the
    decoder's (dropped by mlx-lm, not run by Ferrum), proven by mlx-lm's load (within 1e-5: the norms' ``w``
    rounded); the model and its logits over TOKENS."""
    model = random_mlx_lm_model(config, seed, _draw)
    mtp = {f"model.layers.{config['num_hidden_layers']}.eh_proj.weight": np.zeros((64, 128), np.float32)}
    return model, write_release(folder, model, config, TOKENS, _as_released, mtp, tolerance=1e-5)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(folder, mlx-lm's logits over TOKENS, its model)."""
    folder = tmp_path_factory.mktemp("step3p5") / "release"
    model, want = build_release(folder)
    return folder, want, model


def test_reads_heads_ropes_clamps_and_routing(release):
    arch = ModelConfig.from_file(release[0] / "config.json")
    config = arch.arch
    assert arch.num_heads == 8 and arch.num_kv_heads == 2 and config.norm_offset == 1.0
    assert [layer.heads.query_heads for layer in config.layers] == [4, None, 4, None]
    assert [layer.window for layer in config.layers] == [None, 5, None, 5]
    assert [(layer.rope.theta, layer.rope.rotary_dim, layer.rope.kind) for layer in config.layers] == [
        (1000.0, 8, "llama3"), (100.0, 16, "default")] * 2
    assert [layer.mlp for layer in config.layers] == ["dense", "moe", "moe", "moe"]
    swish = ClampedSwiGLU(1.0, 0.4, up_offset=0.0, clamp="swish")
    assert config.layers[2].activations == (swish, ClampedSwiGLU(1.0, 0.3, up_offset=0.0, clamp="swish"))
    assert config.layers[3].activations == (swish, None) and config.layers[1].activations is None
    assert config.expert_features == (("activation",), (1, 29))
    moe = config.moe
    assert (moe.num_experts, moe.top_k, moe.routed_scale, moe.routing) == (8, 3, 2.5, "sigmoid_grouped")


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_and_decode_steps_match_mlx_lm(release, backend):
    folder, want, _ = release
    assert_forward_and_decode_match(float32_model(folder, backend, block_size=4), TOKENS, want)


def test_engine_keeps_mlx_lm_greedy_tokens(release):
    folder, _, model = release
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, **config), MlxLmReference(model),
                                      staggered_greedy_workload(VOCAB))


@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_conversions_load(release, tmp_path, bits):
    """mlx-lm's conversion (experts under switch_mlp, the router a Linear beside its bias, norms plus 1), float
    within 1e-4 of mlx-lm on the release, packed (the router at 8 bits, as mlx-lm's predicate packs it) within 2e-3
    of mlx-lm's own packed logits."""
    folder, want, _ = release
    stored, converted = mlx_lm_converted(folder, tmp_path / "mlx", TOKENS, bits=bits, group=32)
    assert "model.layers.1.mlp.switch_mlp.gate_proj.weight" in stored
    assert "model.layers.1.mlp.gate.router_bias" in stored
    if bits is None:
        assert scaled_error(converted, want) <= 1e-5
    else:
        assert "model.layers.1.mlp.gate.gate.scales" in stored
    assert_every_backend_runs_it_as_mlx_lm(tmp_path / "mlx", TOKENS, converted, packed=bits is not None)


#: Each feature switched off in mlx-lm's model of the same weights: its logits move, so the parity checks see it.
CONTROLS = {
    "clamps": dict(swiglu_limits=None, swiglu_limits_shared=None),
    "per-layer bases": dict(rope_theta=1000.0),
    "per-layer rotary shares": dict(partial_rotary_factors=None),
    "scaling on full layers only": dict(yarn_only_types=None),
    "window": dict(sliding_window=64),
    "gated heads": dict(use_head_wise_attn_gate=False),
    "shared expert unclamped, experts clamped": dict(swiglu_limits_shared=None),
}


@pytest.mark.parametrize("control", CONTROLS)
def test_each_feature_moves_mlx_lm_logits(release, control):
    from mlx_lm.utils import load_model

    folder, want, _ = release
    model = load_model(folder, strict=False, model_config=CONTROLS[control])[0]
    assert scaled_error(np.array(model(mx.array([TOKENS])).astype(mx.float32))[0], want) > 1e-2


def test_the_swish_clamp_is_mlx_lms_and_not_gpt_oss():
    """The experts' and shared expert's activation is mlx-lm's clamped_swiglu (the swish clamped), which clamping
    the gate first (gpt-oss's, Hy4's) does not give."""
    rng = np.random.RandomState(1)
    gate, up = (rng.randn(64, 16).astype(np.float32) * 3 for _ in range(2))
    want = np.array(step3p5.clamped_swiglu(mx.array(up), mx.array(gate), 0.7))
    swish = ClampedSwiGLU(1.0, 0.7, up_offset=0.0, clamp="swish")
    assert np.abs(swish.host(gate, up) - want).max() <= 1e-6
    assert np.abs(ClampedSwiGLU(1.0, 0.7, up_offset=0.0).host(gate, up) - want).max() > 1e-2


def test_the_router_bias_counts(release, tmp_path):
    """With the release's router biases zeroed Ferrum's logits move: the bias chooses the experts."""
    from safetensors.numpy import load_file, save_file

    folder, want, _ = release
    dest = tmp_path / "unbiased"
    dest.mkdir()
    tensors = {name: np.zeros_like(v) if name.endswith("router_bias") else v
               for name, v in load_file(folder / "model.safetensors").items()}
    save_file(tensors, str(dest / "model.safetensors"))
    (dest / "config.json").write_text((folder / "config.json").read_text())
    assert scaled_error(float32_model(dest).forward_verify("a", TOKENS), want) > 1e-2


@pytest.mark.parametrize("changes, error, words", [
    (dict(attention_other_setting={"num_attention_heads": 8, "num_attention_groups": 1}), UnsupportedFeatureError,
     "one count"),
    (dict(attention_other_setting={"num_attention_heads": 8, "head_dim": 32}), UnsupportedFeatureError, "head_dim"),
    (dict(layer_types=["full_attention"] * 3), ConfigError, "layer_types"),
    (dict(rope_theta=[1000.0] * 3), ConfigError, "rope_theta"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), UnsupportedFeatureError, "yarn"),
    (dict(moe_router_activation="softmax"), UnsupportedFeatureError, "moe_router_activation"),
    (dict(zero_centered=False), UnsupportedFeatureError, "zero_centered"),
    (dict(moe_layers_enum="1,a"), ConfigError, "moe_layers_enum"),
    (dict(swiglu_limits=[-1.0]), ConfigError, "swiglu_limits"),
    (dict(partial_rotary_factors=[0.1] * 4), ConfigError, "partial_rotary_factors"),
])
def test_bad_keys_are_refused_by_name(tmp_path, changes, error, words):
    (tmp_path / "config.json").write_text(json.dumps({**CONFIG, **changes}))
    with pytest.raises(error, match=words):
        ModelConfig.from_file(tmp_path / "config.json")


def test_a_packed_o_proj_whose_zero_heads_cut_a_group_is_refused_by_name():
    """Six sliding heads over two key/value heads: a full layer's 2 heads a key/value head (32 inputs) fill a group
    of 32, the padded 3 (48) do not, so its packed o_proj cannot be padded without new scales."""
    from ferrum.arch.tensors import check_padded_groups

    other = {**CONFIG["attention_other_setting"], "num_attention_heads": 6}
    config = ModelConfig.from_dict({**CONFIG, "attention_other_setting": other})
    with pytest.raises(UnsupportedFeatureError, match=r"padded width \(48\)"):
        check_padded_groups(config, "model.layers.0.self_attn.o_proj.weight", 4, 32)
    check_padded_groups(config, "model.layers.0.self_attn.o_proj.weight", 4, 16)
