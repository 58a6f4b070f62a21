"""TeleChat3 (``telechat3``, dense; remote code): tiny random checkpoints with the 36B release's config keys (its
"telechat3-yarn" rope) and with every bias and tied embeddings, against mlx-lm's telechat3 on every backend, through
the engine, and mlx-lm's conversions (float and 4-bit)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from mlx_lm_release import MlxLmReference, backends, model_logits, random_mlx_lm_model, write_release
from support import (
    assert_engine_keeps_greedy_tokens, assert_forward_and_decode_match, float32_model, mlx_lm_converted,
    mlx_lm_logits, runnable_backends, scaled_error, small_pool_engine, staggered_greedy_workload,
)

pytest.importorskip("mlx_lm")
VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]

YARN = {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "rope_type": "telechat3-yarn", "type": "telechat3-yarn"}
#: TeleChat3-36B's config.json keys, the sizes tiny (head_dim apart from hidden_size / heads).
RELEASE = {
    "architectures": ["TeleChat3ForCausalLM"], "model_type": "telechat3", "hidden_size": 64, "head_dim": 24,
    "initializer_range": 0.0048, "intermediate_size": 80, "max_position_embeddings": 64, "mlp_bias": False,
    "attention_bias": False, "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
    "pad_token_id": 3, "pretraining_tp": 1, "rms_norm_eps": 1e-5, "rope_scaling": YARN, "rope_theta": 1000000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.53.2", "use_cache": True,
    "vocab_size": VOCAB,
}
#: Every bias mlx-lm's port reads (o_proj's under attention_bias, as Llama's), tied embeddings, plain rope.
BIASED = {**RELEASE, "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True, "rope_scaling": None}


def _telechat3_yarn(config: dict) -> dict:
    """``config`` with its telechat3-yarn spelled for mlx-lm's YaRN so that its attention factor is TeleChat3's:
    mlx-lm's is ``0.1 * mscale * ln(factor) + 1``, so mscale 0.7."""
    return {**config, "rope_scaling": {**config["rope_scaling"], "mscale": 0.7}}


def _logits(config: dict) -> np.ndarray:
    return model_logits(random_mlx_lm_model(config), TOKENS)


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """variant -> (folder, the reference logits): mlx-lm's, with TeleChat3's attention factor for its yarn."""
    out = {}
    for name, config in (("release", RELEASE), ("biased", BIASED)):
        folder = tmp_path_factory.mktemp(name)
        want = write_release(folder, random_mlx_lm_model(config), config, TOKENS)
        out[name] = folder, _logits(_telechat3_yarn(config)) if config["rope_scaling"] else want
    return out


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("variant", ["release", "biased"])
def test_logits_match_mlx_lm(releases, variant, backend):
    folder, want = releases[variant]
    assert_forward_and_decode_match(float32_model(folder, backend, block_size=4), TOKENS, want)


def test_telechat3_yarn_is_yarn_with_its_own_attention_factor(releases):
    """The rope's frequencies are YaRN's, its attention factor 0.07 * ln(4) + 1; the controls: mlx-lm's own reading
    (0.1's factor) and plain rope each move the logits."""
    folder, want = releases["release"]
    rope = ModelConfig.from_file(folder).arch.layers[0].rope
    assert (rope.kind, rope.factor, rope.original_max) == ("yarn", 4.0, 16)
    assert rope.attention_factor == pytest.approx(0.07 * math.log(4.0) + 1)
    assert scaled_error(mlx_lm_logits(folder, TOKENS), want) > 1e-3
    assert scaled_error(_logits({**RELEASE, "rope_scaling": None}), want) > 1e-3


def test_engine_keeps_mlx_lm_greedy_tokens(releases):
    folder, _ = releases["biased"]
    reference = MlxLmReference(random_mlx_lm_model(BIASED))
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, **config), reference,
                                      staggered_greedy_workload(VOCAB))


@pytest.mark.slow  # mlx-lm converts and quantizes: ~2 s apiece
@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("variant", ["release", "biased"])
def test_mlx_lm_conversions_run_as_mlx_lm_runs_them(releases, variant, bits, tmp_path):
    """mlx-lm's conversion keeps the config; its logits with TeleChat3's attention factor are the reference (in
    float32: converted at the release's bfloat16, mlx-lm would compute in it)."""
    source = tmp_path / "release"
    shutil.copytree(releases[variant][0], source)
    (source / "config.json").write_text(json.dumps({**json.loads((source / "config.json").read_text()),
                                                    "torch_dtype": "float32"}))
    mlx_lm_converted(source, tmp_path / "mlx", TOKENS, bits=bits, group=32)
    reference = tmp_path / "reference"
    shutil.copytree(tmp_path / "mlx", reference)
    config = json.loads((reference / "config.json").read_text())
    if config["rope_scaling"]:
        (reference / "config.json").write_text(json.dumps(_telechat3_yarn(config)))
    want = mlx_lm_logits(reference, TOKENS)
    for backend in runnable_backends():
        got = float32_model(tmp_path / "mlx", backend).forward_verify("m", TOKENS)
        assert scaled_error(got, want) <= (2e-3 if bits else 1e-4), backend


@pytest.mark.parametrize("rope, error", [
    ({**YARN, "mscale": 0.7}, UnsupportedFeatureError),
    ({**YARN, "attention_factor": 1.0}, UnsupportedFeatureError),
    ({k: v for k, v in YARN.items() if k != "original_max_position_embeddings"}, ConfigError),
    ({**YARN, "factor": None}, ConfigError),
])
def test_unsupported_ropes_are_refused_by_name(rope, error):
    with pytest.raises(error, match="rope_scaling"):
        ModelConfig.from_dict({**RELEASE, "rope_scaling": rope})
