"""Muse Glimmer's text model (``muse_glimmer_text`` in its ``muse_glimmer`` wrapper; Meta's release, which
transformers 5.24 lacks) against mlx-lm's muse_glimmer in float32: a random checkpoint built from mlx-lm's own Model
and saved as Meta's release nests it (``text_config``, ``model.language_model.*``, a vision tower beside it) and as
mlx-community's flattened configs have it,
on every backend, through the engine, and mlx-lm's conversions (float and 4-bit); its scalings, gates, windows and
NoPE layers each a control."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from mlx_lm_release import MlxLmReference, backends, model_logits, random_mlx_lm_model, renamed, write_release
from support import (
    assert_engine_keeps_greedy_tokens, assert_every_backend_runs_it_as_mlx_lm, assert_forward_and_decode_match,
    float32_model, mlx_lm_converted, scaled_error, small_pool_engine, staggered_greedy_workload,
    with_edited_tensors,
)

pytest.importorskip("mlx_lm.models.muse_glimmer")

VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
SLIDING, FULL = "sliding_attention", "full_attention"
#: The text model's keys: a 4-token window (the prompt is longer), the default pattern (three sliding layers, then a
#: full one without rope), rope_theta given in rope_parameters, a soft-cap that bites, an untied head.
TEXT = {"model_type": "muse_glimmer_text", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "rms_norm_eps": 1e-5, "post_norm_eps": 1e-8, "sliding_window": 4, "qk_scale_factor": 3.87,
        "hidden_activation": "silu", "max_position_embeddings": 128,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "tie_word_embeddings": False,
        "final_logit_softcapping": 5.0, "output_multiplier": 0.5}
#: Meta's release: the text model's keys under text_config, its tensors under model.language_model, a vision tower
#: (which mlx-lm's sanitize drops where it is not under model.; Ferrum wherever it is).
RELEASE = {"model_type": "muse_glimmer", "architectures": ["MuseGlimmerForConditionalGeneration"],
           "text_config": TEXT, "vision_config": {"hidden_size": 8}, "tie_word_embeddings": False,
           "bos_token_id": 0, "eos_token_id": 1}
VISION = "vision_tower.patch_embed.weight"


def _draw(name: str, shape: tuple, rng: np.random.Generator) -> np.ndarray:
    if name == "model.norm.weight":  # a plain RMSNorm
        return 1.0 + rng.normal(0, 0.2, shape)
    if name.endswith("norm.weight"):  # (1 + w)
        return rng.normal(0, 0.2, shape)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return rng.normal(0, 1, shape)
    return rng.normal(0, shape[-1] ** -0.5, shape)


def _model(**changed):
    return random_mlx_lm_model({**RELEASE, "text_config": {**TEXT, **changed}}, draw=_draw)


def _nested(name: str) -> str:
    """mlx-lm's name -> the release's (the inverse of its sanitize)."""
    return name if name.startswith("lm_head.") else "model.language_model." + name.removeprefix("model.")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(folder, mlx-lm's model, its logits over TOKENS): Meta's layout."""
    model, folder = _model(), tmp_path_factory.mktemp("muse_glimmer")
    want = write_release(folder, model, RELEASE, TOKENS, renamed(_nested),
                         extra={VISION: np.ones((8, 3), dtype=np.float32)}, vocab=VOCAB)
    return folder, model, want


@pytest.mark.parametrize("backend", backends())
def test_logits_match_mlx_lm(release, backend):
    folder, _, want = release
    assert_forward_and_decode_match(float32_model(folder, backend, block_size=4), TOKENS, want)


def test_the_vision_tower_is_quiet_wherever_it_sits(release, tmp_path, recwarn):
    """The release's vision tower beside the text model's under model. too (mlx-lm's sanitize drops it only at the
    top level): not read, not reported."""
    def beside(tensors):
        tensors["model.vision_tower.patch_embed.weight"] = tensors.pop(VISION)

    folder = with_edited_tensors(release[0], tmp_path / "beside", beside)
    for where in (release[0], folder):
        assert scaled_error(float32_model(where).forward_verify("v", TOKENS), release[2]) <= 1e-4
    assert not [w for w in recwarn if "vision_tower" in str(w.message)]


def test_a_flattened_config_loads(release, tmp_path):
    """mlx-community's conversions: the text model's keys at the top level, its tensors under model."""
    model = release[1]
    flat = {**TEXT, "model_type": "muse_glimmer", "bos_token_id": 0, "eos_token_id": 1}
    want = write_release(tmp_path / "flat", model, flat, TOKENS)
    assert scaled_error(float32_model(tmp_path / "flat").forward_verify("f", TOKENS), want) <= 1e-4
    assert scaled_error(want, release[2]) == 0.0


def test_engine_batching_chunking_and_preemption_keep_greedy_tokens(release):
    folder, model, _ = release
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, **config),
                                      MlxLmReference(model), staggered_greedy_workload(VOCAB))


@pytest.mark.slow  # mlx-lm converts (and packs) the checkpoint
@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_conversions_run_as_mlx_lm_runs_them(release, bits, tmp_path):
    tensors, want = mlx_lm_converted(release[0], tmp_path / "mlx", TOKENS[:9], bits=bits)
    assert "model.layers.0.self_attn.gate_proj.weight" in tensors and VISION not in tensors
    assert ("model.layers.0.self_attn.gate_proj.scales" in tensors) == (bits is not None)
    assert "text_config" in json.loads((tmp_path / "mlx" / "config.json").read_text())
    assert_every_backend_runs_it_as_mlx_lm(tmp_path / "mlx", TOKENS[:9], want, packed=bits is not None)


@pytest.mark.parametrize("change", [{"qk_scale_factor": 1.0}, {"output_multiplier": 0.25},
                                   {"final_logit_softcapping": 50.0}, {"sliding_window": 64},
                                   {"layer_rope_theta": [10000.0] * 4}, {"rope_parameters": {"rope_theta": 100.0}},
                                   {"layer_types": [SLIDING, FULL, SLIDING, FULL]}])
def test_each_setting_moves_the_logits(release, change):
    """Controls: mlx-lm's model with the same weights and one setting changed gives other logits (rope on the full
    layer too, another base, other layer kinds...)."""
    assert scaled_error(model_logits(_model(**change), TOKENS), release[2]) > 1e-2


def test_the_gates_and_norm_centres_move_the_logits(release):
    """Controls: the attention gates at sigmoid(0), and the post norms' (1 + w) read as w, give other logits."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    for ending, value in (("gate_proj.weight", 0.0), ("post_attention_layernorm.weight", -1.0)):
        model = _model()
        model.load_weights([(name, mx.full(v.shape, value) + (0 if value == 0.0 else v)) for name, v in
                            tree_flatten(model.parameters()) if name.endswith(ending) and "mlp" not in name],
                           strict=False)
        assert scaled_error(model_logits(model, TOKENS), release[2]) > 1e-2, ending


@pytest.mark.parametrize("field, value", [("norm_eps", {}), ("norm_offsets", {})])
def test_the_post_norms_epsilon_and_the_plain_final_norm(tmp_path, monkeypatch, field, value):
    """Attention's and the MLP's outputs a thousand times smaller, so that the post norms' epsilon (1e-8, not
    rms_norm_eps' 1e-5) counts: Ferrum is mlx-lm's; then controls, Ferrum with the post norms at rms_norm_eps, or the
    final norm read as (1 + w) as the others, is not."""
    from dataclasses import replace

    import mlx.core as mx
    from mlx.utils import tree_flatten

    from ferrum.arch.families import FAMILIES

    model = _model()
    model.load_weights([(name, v * 1e-3) for name, v in tree_flatten(model.parameters())
                        if name.endswith(("o_proj.weight", "down_proj.weight"))], strict=False)
    mx.eval(model.parameters())
    want = write_release(tmp_path / "quiet", model, RELEASE, TOKENS, renamed(_nested), vocab=VOCAB)
    assert scaled_error(float32_model(tmp_path / "quiet").forward_verify("q", TOKENS), want) <= 1e-4
    family = FAMILIES["muse_glimmer_text"]
    monkeypatch.setitem(FAMILIES, "muse_glimmer_text", replace(
        family, build=lambda r, sizes: replace(family.build(r, sizes), **{field: value})))
    assert scaled_error(float32_model(tmp_path / "quiet").forward_verify("q", TOKENS), want) > 1e-2


def test_the_conformance_kits_oracle_refuses_what_it_does_not_compute(release):
    """The float64 oracle neither gates attention's output nor norms the embeddings without a weight: it refuses the
    model by those fields, where it computed other logits."""
    from ferrum.testing.arch_oracle import ArchOracle

    with pytest.raises(UnsupportedFeatureError, match="embed_norm_params, attn_output_gate"):
        ArchOracle(release[0])


def test_release_defaults():
    config = ModelConfig.from_dict({"model_type": "muse_glimmer", "text_config": {"num_hidden_layers": 8}})
    assert config.model_type == "muse_glimmer_text"
    arch = config.arch
    assert arch.windows == (2048, 2048, 2048, None) * 2
    assert [layer.rope.theta for layer in arch.layers[:3]] == [500000.0] * 3
    assert arch.layers[3].rope.inv_freq().max() == 0.0  # no rope on the full layers
    assert (config.hidden_size, config.num_kv_heads, config.vocab_size, config.rms_norm_eps) == (6656, 2, 202048, 1e-5)
    assert arch.norm_eps == {"post_attn": 1e-8, "post_mlp": 1e-8} and arch.final_softcap == 20.0
    assert abs(arch.attn_scale - 3.87 / np.sqrt(128)) < 1e-12


@pytest.mark.parametrize("change, error, key", [
    ({"hidden_activation": "gelu"}, UnsupportedFeatureError, "hidden_activation"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, UnsupportedFeatureError, "rope_parameters"),
    ({"layer_rope_theta": [1.0, 0]}, ConfigError, "layer_rope_theta"),
    ({"final_logit_softcapping": None}, ConfigError, "final_logit_softcapping"),
])
def test_variants_are_refused_by_name(change, error, key):
    with pytest.raises(error, match=key):
        ModelConfig.from_dict({**TEXT, **change})
