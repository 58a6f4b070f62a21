"""Talkie (``talkie``; remote code, which transformers lacks) against mlx-lm's talkie in float32: a random checkpoint
built from mlx-lm's own Model and saved under the release's names, on every backend, through the engine, and
mlx-lm's conversions (float and 4-bit) of it; each of its learned gains and its rope's sign a control."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ferrum.arch.families import FAMILIES
from ferrum.errors import UnsupportedFeatureError
from ferrum.model import DecoderOnlyLLM
from mlx_lm_release import MlxLmReference, backends, model_logits, random_mlx_lm_model, write_release
from support import (
    assert_engine_keeps_greedy_tokens, assert_every_backend_runs_it_as_mlx_lm, assert_forward_and_decode_match,
    float32_model, mlx_lm_converted, scaled_error, small_pool_engine, staggered_greedy_workload,
)

pytest.importorskip("mlx_lm.models.talkie")

VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
CONFIG = {"model_type": "talkie", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 3, "num_attention_heads": 4, "head_dim": 16, "rope_theta": 10000.0,
          "max_position_embeddings": 128, "bos_token_id": 0, "eos_token_id": 1}
#: The scalars' ranges: every gain far from 1 (the embedding skip from its initial 0), so each one counts.
GAINS = {"attn_gain.a_g": (0.5, 1.5), "mlp_gain.a_g": (0.5, 1.5), "embed_skip.a_g": (0.3, 0.9),
         "head_gain.head_g": (0.5, 2.5), "lm_head_gain.w_g": (1.5, 2.5)}
#: A buffer some Talkie checkpoints carry, which mlx-lm's sanitize drops (anything named rotary, or ending cos / sin).
ROTARY = "model.blocks.0.attn.rotary.inv_freq"


def _draw(name: str, shape: tuple, rng: np.random.Generator) -> np.ndarray:
    for ending, (low, high) in GAINS.items():
        if name.endswith(ending):
            return rng.uniform(low, high, shape)
    if name == "model.embed.weight":
        return rng.normal(0, 1, shape)
    return rng.normal(0, shape[-1] ** -0.5, shape)  # a projection (lm_head too): outputs of O(1)


def _model(**changed):
    return random_mlx_lm_model({**CONFIG, **changed}, draw=_draw)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(folder, mlx-lm's model, its logits over TOKENS): the release's names and config keys."""
    model, folder = _model(), tmp_path_factory.mktemp("talkie")
    want = write_release(folder, model, CONFIG, TOKENS, extra={ROTARY: np.ones(8, dtype=np.float32)})
    return folder, model, want


@pytest.mark.parametrize("backend", backends())
def test_logits_match_mlx_lm(release, backend):
    folder, _, want = release
    assert_forward_and_decode_match(float32_model(folder, backend, block_size=4), TOKENS, want)


def test_rotary_buffers_are_quiet(release, recwarn):
    """The rotary buffer mlx-lm's sanitize drops is not reported unread."""
    float32_model(release[0])
    assert not [w for w in recwarn if "unread" in str(w.message) or ROTARY in str(w.message)]


def test_engine_batching_chunking_and_preemption_keep_greedy_tokens(release):
    folder, model, _ = release
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, **config), MlxLmReference(model),
                                      staggered_greedy_workload(VOCAB))


@pytest.mark.slow  # mlx-lm converts (and packs) the checkpoint
@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_conversions_run_as_mlx_lm_runs_them(release, bits, tmp_path):
    tensors, want = mlx_lm_converted(release[0], tmp_path / "mlx", TOKENS[:9], bits=bits)
    assert ("model.blocks.0.attn.attn_query.scales" in tensors) == (bits is not None)
    assert_every_backend_runs_it_as_mlx_lm(tmp_path / "mlx", TOKENS[:9], want, packed=bits is not None)


@pytest.mark.parametrize("part, value", [("attn_gain.a_g", 1.0), ("mlp_gain.a_g", 1.0), ("embed_skip.a_g", 0.0),
                                         ("head_gain.head_g", 1.0), ("lm_head_gain.w_g", 1.0)])
def test_each_gain_moves_the_logits(release, part, value):
    """Controls: mlx-lm's model with one kind of gain reset (to 1, the embedding skip to 0) gives other logits, so
    the parity above checks each of them."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    _, model, want = release
    reset = _model()
    reset.load_weights([(name, mx.full(value_.shape, value)) for name, value_ in tree_flatten(reset.parameters())
                        if name.endswith(part)], strict=False)
    assert scaled_error(model_logits(reset, TOKENS), want) > 1e-2


def test_rope_turning_the_usual_way_moves_the_logits(release, monkeypatch):
    """Control: Ferrum with Talkie's rope turning the usual way is off mlx-lm's logits."""
    from dataclasses import replace

    family = FAMILIES["talkie"]

    def unnegated(r, sizes):
        arch = family.build(r, sizes)
        return replace(arch, layers=tuple(replace(layer, rope=replace(layer.rope, negated=False))
                                          for layer in arch.layers))

    monkeypatch.setitem(FAMILIES, "talkie", replace(family, build=unnegated))
    model = DecoderOnlyLLM.from_pretrained(release[0], dtype="float32")
    assert scaled_error(model.forward_verify("u", TOKENS), release[2]) > 1e-2


@pytest.mark.parametrize("change, key", [({"num_key_value_heads": 2}, "num_key_value_heads"),
                                         ({"tie_word_embeddings": True}, "tie_word_embeddings"),
                                         ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling")])
def test_variants_mlx_lm_does_not_run_are_refused_by_name(release, tmp_path, change, key):
    import shutil

    folder = tmp_path / "changed"
    shutil.copytree(release[0], folder)
    (folder / "config.json").write_text(json.dumps({**CONFIG, **change}))
    with pytest.raises(UnsupportedFeatureError, match=key):
        DecoderOnlyLLM.from_pretrained(folder, dtype="float32")


def test_a_release_config_without_sizes_reads_mlx_lm_defaults():
    from ferrum.config import ModelConfig

    config = ModelConfig.from_dict({"model_type": "talkie"})
    assert (config.hidden_size, config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim,
            config.vocab_size, config.max_seq_len) == (5120, 40, 40, 40, 128, 65540, 2048)
    assert config.rms_norm_eps == np.finfo(np.float32).eps and config.rope_theta == 1e6


def test_a_logit_gain_beside_a_layer_norm_is_refused():
    """The gain is folded into the final norm's weight, which a weightless LayerNorm has none of: refused, not
    dropped."""
    import dataclasses

    from ferrum.config import ModelConfig

    arch = ModelConfig.from_dict(CONFIG).arch
    with pytest.raises(UnsupportedFeatureError, match="logit gain .*with a 'layer' norm it is not supported"):
        dataclasses.replace(arch, norm="layer", norm_params=False)
