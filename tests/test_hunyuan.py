"""Tencent's Hunyuan-Large (``hunyuan``; no transformers class, its release ships remote code): Hunyuan v1's blocks
(q and k RMS-normed once rotated, rope's base raised by an NTK alpha) with cross-layer attention (every other layer
attends the keys and values the one before projected, normed with its own key norm), softmax routing whose top-k
probabilities weigh the experts as they are, and a shared MLP of num_shared_expert times intermediate_size; against
mlx-lm's hunyuan in float32 on every runnable backend (and the JAX plugin), the release's names and mlx-lm's
conversions, plain and packed."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from mlx_lm_release import (
    assert_conversion_runs_as_mlx_lm, assert_engine_keeps_mlx_lm_greedy_tokens, model_logits, normal,
    random_mlx_lm_model, unstacked, with_zeroed, write_release,
)
from support import assert_forward_and_decode_match, float32_model, runnable_backends, scaled_error

pytest.importorskip("mlx_lm")
BACKENDS = runnable_backends()
VOCAB = 300
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]


def hunyuan_config(**extra) -> dict:
    """A tiny config as Hunyuan-Large's config.json spells it (its remote code's keys mlx-lm ignores included)."""
    settings = dict(model_type="hunyuan", architectures=["HunYuanForCausalLM"], vocab_size=VOCAB, hidden_size=64,
                    intermediate_size=48, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
                    attention_head_dim=16, attention_bias=False, moe_topk=1, num_experts=4, num_shared_expert=1,
                    use_mixed_mlp_moe=True, use_qk_norm=True, use_cla=True, cla_share_factor=2,
                    rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256,
                    rope_scaling={"alpha": 1000.0, "factor": 1.0, "type": "dynamic"}, hidden_act="silu",
                    tie_word_embeddings=True, pretraining_tp=1, bos_token_id=0, eos_token_id=1)
    return {**settings, **extra}


#: Hunyuan-Large's layout (cross-layer attention, one expert a token); A13B's first release's (no CLA, per-layer
#: lists, three experts a token of their own width, two shared widths, biased attention, no tie_word_embeddings key);
#: and Hunyuan-7B's (dense: one expert; q/k/v and gate/up fused).
VARIANTS = {"large": {}, "listed": dict(num_hidden_layers=3, use_cla=False, attention_bias=True, num_experts=8,
                                        moe_topk=[3] * 3, moe_intermediate_size=[32] * 3, num_shared_expert=[2] * 3),
            "dense": dict(num_hidden_layers=3, use_cla=False, num_experts=1, use_mixed_mlp_moe=False)}


def as_released(tensors: dict) -> dict:
    """mlx-lm's hunyuan names -> the release's: its sanitize stacks ``mlp.experts.{e}.*`` into ``mlp.switch_mlp.*``."""
    return unstacked(tensors, "switch_mlp", "experts")


def as_fused_release(tensors: dict) -> dict:
    """mlx-lm's dense hunyuan names -> Hunyuan-7B's: its sanitize splits ``qkv_proj`` (per key/value head: its
    queries, key and value) and ``gate_and_up_proj`` (up rows first)."""
    out = dict(tensors)
    for layer in range(VARIANTS["dense"]["num_hidden_layers"]):
        attn, mlp = f"model.layers.{layer}.self_attn.", f"model.layers.{layer}.mlp."
        q, k, v = (out.pop(f"{attn}{p}_proj.weight").reshape(2, -1, 16, 64) for p in "qkv")
        out[f"{attn}qkv_proj.weight"] = np.concatenate([q, k, v], axis=1).reshape(-1, 64)
        out[f"{mlp}gate_and_up_proj.weight"] = np.concatenate([out.pop(f"{mlp}up_proj.weight"),
                                                               out.pop(f"{mlp}gate_proj.weight")])
    return out


def build_checkpoints(tmp_path_factory) -> dict:
    """variant -> (the release's folder, mlx-lm's model of it)."""
    out = {}
    for variant, extra in VARIANTS.items():
        config = hunyuan_config(**extra)
        if variant == "listed":
            del config["tie_word_embeddings"]
        model, folder = random_mlx_lm_model(config, draw=normal()), tmp_path_factory.mktemp(variant)
        write_release(folder, model, config, TOKENS, as_fused_release if variant == "dense" else as_released,
                      vocab=VOCAB)
        out[variant] = folder, model
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", [*BACKENDS, "jax"])
def test_model_matches_mlx_lm(checkpoints, backend, variant):
    folder, reference = checkpoints[variant]
    model = float32_model(folder, backend, block_size=4)
    arch, moe = model.config.arch, model.config.arch.moe
    large = variant == "large"
    assert [(spec.kv_source, spec.own_key_norm) for spec in arch.layers] == (
        [(None, False), (0, True), (None, False), (2, True), (None, False)] if large else [(None, False)] * 3)
    assert arch.kv_pool_layers == 3 and model.config.tie_word_embeddings
    assert (moe.top_k, moe.normalize, moe.expert_size, moe.shared_expert_size, arch.qkv_bias, arch.o_bias) == {
        "large": (1, False, 48, 48, False, False), "listed": (3, False, 32, 96, True, True),
        "dense": (1, False, 48, None, False, False)}[variant]
    dense = variant == "dense"
    assert (arch.fused_qkv, arch.qkv_grouped, arch.up_rows_first) == (dense, dense, dense)
    assert {spec.mlp for spec in arch.layers} == {"dense" if dense else "moe"}
    assert_forward_and_decode_match(model, TOKENS, model_logits(reference, TOKENS))


def test_engine_keeps_greedy_tokens(checkpoints):
    assert_engine_keeps_mlx_lm_greedy_tokens(*checkpoints["large"], VOCAB)


@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_conversions_load(checkpoints, tmp_path, bits):
    """mlx-lm's conversion (experts stacked under switch_mlp, no k/v projections on the sharing layers), plain or
    packed in groups of 32, runs on every backend as mlx-lm runs it; the plain one as mlx-lm runs the release."""
    stored = assert_conversion_runs_as_mlx_lm(*checkpoints["large"], tmp_path / "mlx", TOKENS, bits)
    assert "model.layers.1.mlp.switch_mlp.gate_proj.weight" in stored
    assert "model.layers.1.self_attn.k_proj.weight" not in stored
    assert "model.layers.1.self_attn.key_layernorm.weight" in stored
    assert ("model.layers.1.mlp.switch_mlp.gate_proj.scales" in stored) == (bits is not None)


def test_ferrum_quantize_keeps_the_sharing_layers_key_norms(checkpoints, tmp_path):
    """`ferrum quantize` of the release writes the sharing layers' own key norms too: mlx-lm loads its output, and
    every backend runs it as mlx-lm does."""
    from ferrum.quant.convert import quantize_checkpoint
    from support import assert_every_backend_runs_it_as_mlx_lm, mlx_lm_logits

    with pytest.warns(UserWarning, match="stay in float"):  # the experts' down_proj, 48 wide
        packed = quantize_checkpoint(checkpoints["large"][0], tmp_path / "q4", bits=4, group_size=32)
    assert_every_backend_runs_it_as_mlx_lm(packed, TOKENS, mlx_lm_logits(packed, TOKENS), packed=True)


# ------------------------------------------------------------------ controls


def test_each_feature_moves_mlx_lm_s_logits(checkpoints, monkeypatch):
    """Controls: the sharing layers' own key norms replaced by their sources', the shared MLP zeroed, the NTK alpha
    dropped, or the top-k probabilities renormalized (as Tencent's code does for more than one), mlx-lm's logits
    move."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.models import hunyuan

    for variant in VARIANTS:
        _, reference = checkpoints[variant]
        want = model_logits(reference, TOKENS)
        if variant != "dense":
            assert scaled_error(model_logits(with_zeroed(reference, "shared_mlp"), TOKENS), want) > 1e-2
        unscaled = hunyuan.Model(hunyuan.ModelArgs.from_dict({**reference.args.__dict__, "rope_scaling": {
            "alpha": 1.0, "factor": 1.0, "type": "dynamic"}}))
        unscaled.update(reference.parameters())
        assert scaled_error(model_logits(unscaled, TOKENS), want) > 1e-2

    _, large = checkpoints["large"]
    params = dict(tree_flatten(large.parameters()))
    sources = {name: params[name.replace("layers.1.", "layers.0.").replace("layers.3.", "layers.2.")]
               for name in params if re.search(r"layers\.[13]\.self_attn\.key_layernorm", name)}
    copied = hunyuan.Model(large.args)
    copied.update(tree_unflatten(list({**params, **sources}.items())))
    assert scaled_error(model_logits(copied, TOKENS), model_logits(large, TOKENS)) > 1e-2

    _, listed = checkpoints["listed"]
    want = model_logits(listed, TOKENS)

    def renormalized(self, x):
        gates = mx.softmax(self.gate(x), axis=-1, precise=True)
        inds = mx.argpartition(-gates, kth=self.top_k - 1, axis=-1)[..., :self.top_k]
        scores = mx.take_along_axis(gates, inds, axis=-1)
        scores = scores / scores.sum(axis=-1, keepdims=True)
        return (self.switch_mlp(x, inds) * scores[..., None]).sum(axis=-2) + self.shared_mlp(x)

    monkeypatch.setattr(hunyuan.MoeBlock, "__call__", renormalized)
    assert scaled_error(model_logits(listed, TOKENS), want) > 1e-2


def test_a_source_key_norm_of_zero_is_refused(checkpoints, tmp_path):
    """The ratio fold cannot stand for a sharing layer's key norm where its source's weight is 0 and its own is not."""
    from safetensors.numpy import load_file, save_file

    folder = shutil.copytree(checkpoints["large"][0], tmp_path / "zero")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.2.self_attn.key_layernorm.weight"][3] = 0.0
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedFeatureError, match=re.escape("layers.2.self_attn.key_layernorm.weight is 0 in "
                                                                "dims [3]")):
        float32_model(folder)


# ------------------------------------------------------------------ config


def test_no_qk_norm_and_no_rope_scaling():
    """Without use_qk_norm no layer norms q or k (the sharing layers attend their sources' keys as they are); a
    config without rope_scaling runs plain rope, as Tencent's code does (mlx-lm requires one)."""
    config = ModelConfig.from_dict(hunyuan_config(use_qk_norm=False, rope_scaling=None, num_experts=1))
    arch = config.arch
    assert arch.qk_norm is None and [spec.own_key_norm for spec in arch.layers] == [False] * 5
    assert [spec.kv_source for spec in arch.layers] == [None, 0, None, 2, None]
    assert arch.layers[0].rope.theta == 10000.0 and {spec.mlp for spec in arch.layers} == {"dense"}


@pytest.mark.parametrize("changes, error, words", [
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), UnsupportedFeatureError, "by its 'alpha' alone"),
    (dict(rope_scaling={"type": "linear", "factor": 1.0, "alpha": 2.0}), ConfigError, "rope type 'dynamic'"),
    (dict(use_cla=None), ConfigError, "'use_cla' must be set"),
    (dict(cla_share_factor=None), ConfigError, "'cla_share_factor' must be set where use_cla is"),
    (dict(num_experts=None), ConfigError, "num_experts"),
    (dict(moe_topk=5), ConfigError, "moe_topk"),
    (dict(moe_topk=[1, 2, 1, 1, 1]), UnsupportedFeatureError, "a different value per layer"),
])
def test_bad_keys_are_refused_by_name(changes, error, words):
    with pytest.raises(error, match=re.escape(words)):
        ModelConfig.from_dict(hunyuan_config(**changes))

