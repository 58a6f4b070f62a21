"""Baichuan-M1 (``baichuan_m1``: remote code, no transformers model; mlx-lm's baichuan_m1): attention whose raw keys
and values are convolved along the sequence (two taps per key/value head) before rope, sliding layers with key/value
heads of their own, q/k/v fused in ``W_pack``, the LM head's rows normed (NormHead); against mlx-lm's own model of a
random checkpoint written under the release's names, on every runnable backend, and mlx-lm's conversions."""

from __future__ import annotations

import numpy as np
import pytest

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from mlx_lm_release import MlxLmReference, backends, model_logits, random_mlx_lm_model, write_release
from support import (
    assert_a_failed_pass_leaves_every_state_as_it_was, assert_a_mixed_batch_gives_each_sequence_its_own_logits,
    assert_engine_keeps_greedy_tokens, assert_every_backend_runs_it_as_mlx_lm, assert_forward_and_decode_match,
    float32_model, mlx_lm_converted, scaled_error, small_pool_engine, staggered_greedy_workload,
)

baichuan_m1 = pytest.importorskip("mlx_lm.models.baichuan_m1")

VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
#: Baichuan-M1-14B's config keys, the sizes tiny: two full layers of one key/value head, two sliding layers (a
#: window of 5 keys, shorter than TOKENS) of two.
CONFIG = {
    "architectures": ["BaichuanM1ForCausalLM"], "model_type": "baichuan_m1",
    "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                 "AutoModelForCausalLM": "modeling_baichuan.BaichuanM1ForCausalLM"},
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 1, "num_swa_attention_heads": 4, "num_swa_key_value_heads": 2,
    "sliding_window": 5, "sliding_window_layers": [1, 3], "conv_window": 2, "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6, "hidden_act": "silu", "model_max_length": 64, "tie_word_embeddings": False,
}


def _draw(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray | None:
    """Taps of either sign around 0.5 (both count), and an LM head whose rows are normed already (mlx-lm's model as
    its sanitize leaves it)."""
    if name.endswith(("conv_k", "conv_v")):
        return rng.uniform(-0.5, 1.5, shape)
    if name == "lm_head.weight":
        head = rng.normal(0.0, 1.0, shape)
        return head / (np.linalg.norm(head, axis=-1, keepdims=True) + 1e-7)
    return None


def _as_released(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """mlx-lm's sanitize the other way round: the release's head rows are not normed (each its own length)."""
    head = tensors["lm_head.weight"]
    lengths = np.random.RandomState(1).uniform(0.5, 3.0, (head.shape[0], 1)).astype(np.float32)
    return {**tensors, "lm_head.weight": head * lengths}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The release's folder and mlx-lm's model of it; mlx-lm's load of the folder is that model."""
    model = random_mlx_lm_model(CONFIG, 0, _draw)
    folder = tmp_path_factory.mktemp("baichuan_m1")
    write_release(folder, model, CONFIG, TOKENS, _as_released, tolerance=1e-6)
    return folder, MlxLmReference(model)


def test_layers_attend_convolved_keys_with_their_own_heads(release):
    model = float32_model(release[0])
    arch = model.config.arch
    assert [(s.mixer, s.window, s.heads.kv_heads) for s in arch.layers] == [
        ("conv_attention", None, 1), ("conv_attention", 5, None)] * 2
    assert (model.config.num_kv_heads, model.config.max_seq_len, arch.recurrent) == (2, 64, True)
    assert sorted(model.states.layers) == [0, 1, 2, 3] and arch.kv_pool_layers == 4


@pytest.mark.parametrize("backend", backends())
def test_logits_and_decode_steps_match_mlx_lm(release, backend):
    folder, reference = release
    assert_forward_and_decode_match(float32_model(folder, backend, block_size=4), TOKENS,
                                    model_logits(reference.model, TOKENS))


def _with(reference, change) -> np.ndarray:
    """mlx-lm's logits over TOKENS of a copy of the reference model with ``change(name, value)`` on its parameters."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    model = baichuan_m1.Model(baichuan_m1.ModelArgs.from_dict(CONFIG))
    model.update(tree_unflatten([(n, mx.array(change(n, np.array(v)))) for n, v in
                                 tree_flatten(reference.model.parameters())]))
    return model_logits(model, TOKENS)


@pytest.mark.parametrize("control", ["no convolution", "values unconvolved", "full window"])
def test_each_feature_moves_mlx_lms_logits(release, control):
    """The controls, on mlx-lm's model: the taps made the identity (all keys and values, or the values'), or every
    layer attending all keys, each moves the logits Ferrum's match above."""
    _, reference = release
    want = model_logits(reference.model, TOKENS)
    identity = np.array([0.0, 1.0], dtype=np.float32)
    if control == "full window":
        import mlx.core as mx

        full = baichuan_m1.Model(baichuan_m1.ModelArgs.from_dict({**CONFIG, "sliding_window": 64}))
        full.update(reference.model.parameters())
        got = np.array(full(mx.array([TOKENS])).astype(mx.float32))[0]
    else:
        taps = ("conv_k", "conv_v") if control == "no convolution" else ("conv_v",)
        got = _with(reference, lambda n, v: np.broadcast_to(identity, v.shape).copy() if n.endswith(taps) else v)
    assert scaled_error(got, want) > 1e-2


def test_the_head_is_normed_at_load(release, monkeypatch):
    """The release's head rows are stored at random lengths: read unnormed, the logits move off mlx-lm's."""
    from dataclasses import replace

    folder, reference = release
    read = ModelConfig.from_file
    assert (read(folder).arch.head_normed, read(folder).arch.head_norm_axis) == (True, 1)

    def unnormed(path):
        config = read(path)
        return replace(config, arch=replace(config.arch, head_normed=False))

    monkeypatch.setattr(ModelConfig, "from_file", staticmethod(unnormed))
    assert scaled_error(float32_model(folder).forward_verify("c", TOKENS), model_logits(reference.model, TOKENS)) > 1e-2


def test_a_mixed_batch_gives_each_sequence_its_own_logits(release):
    folder, reference = release
    assert_a_mixed_batch_gives_each_sequence_its_own_logits(float32_model(folder), reference, VOCAB)


def test_a_failed_pass_leaves_every_state_as_it_was(release, monkeypatch):
    folder, reference = release
    assert_a_failed_pass_leaves_every_state_as_it_was(float32_model(folder), reference, TOKENS, "causal_conv1d",
                                                      monkeypatch)


def test_engine_batching_chunking_and_preemption_give_each_requests_greedy_tokens(release):
    folder, reference = release
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, **config), reference,
                                      staggered_greedy_workload(VOCAB))


@pytest.mark.slow  # mlx-lm converts and quantizes: ~2 s apiece
@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_conversions_run_as_mlx_lm_runs_them(release, bits, tmp_path):
    """mlx-lm's conversion keeps the taps as stored, packs W_pack and the head (normed before packing)."""
    tensors, want = mlx_lm_converted(release[0], tmp_path / "mlx", TOKENS, bits, group=32)
    assert tensors["model.layers.0.self_attn.conv_k"].shape == (1, 1, 1, 1, 2)
    assert ("lm_head.scales" in tensors) == (bits is not None)
    if bits is None:
        assert scaled_error(want, model_logits(release[1].model, TOKENS)) <= 1e-5
    assert_every_backend_runs_it_as_mlx_lm(tmp_path / "mlx", TOKENS, want, packed=bits is not None)


@pytest.mark.parametrize("change, error, key", [
    ({"num_swa_attention_heads": 8}, UnsupportedFeatureError, "num_swa_attention_heads"),
    ({"conv_window": 3}, UnsupportedFeatureError, "conv_window"),
    ({"tie_word_embeddings": True}, ConfigError, "tie_word_embeddings"),
    ({"sliding_window_layers": [4]}, ConfigError, "sliding_window_layers"),
    ({"num_swa_key_value_heads": 3}, ConfigError, "num_swa_key_value_heads"),
    ({"rope_theta": None}, ConfigError, "rope_theta"),
])
def test_unsupported_variants_are_refused_by_name(change, error, key):
    with pytest.raises(error, match=key):
        ModelConfig.from_dict({**CONFIG, **change})
