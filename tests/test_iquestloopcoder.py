"""IQuest-Coder-V1-Loop (``iquestloopcoder``, remote code; mlx-lm's iquestloopcoder): a tiny random checkpoint of
mlx-lm's own model under the release's names (mlx-lm has no sanitize: they are its own, the gates at
``model.gate_projections.{i}``), two passes over the stored layers with no norm between them, each second-pass layer
mixing full attention over its first pass's keys and values with windowed attention over its own by a per-head gate
of its rotated queries; a window shorter than the prompt, so both attentions count. Against mlx-lm on every backend,
through the engine, and mlx-lm's conversions."""

from __future__ import annotations

import numpy as np
import pytest

from ferrum.config import ModelConfig
from ferrum.errors import UnsupportedFeatureError
from mlx_lm_release import (
    assert_conversion_runs_as_mlx_lm, assert_engine_keeps_mlx_lm_greedy_tokens, backends, model_logits, normal,
    random_mlx_lm_model, with_zeroed, write_release,
)
from support import assert_forward_and_decode_match, float32_model, scaled_error

pytest.importorskip("mlx_lm")

VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(1).randint(0, VOCAB, size=14)]
#: IQuest-Coder-V1-40B-Loop-Instruct's config.json keys, the sizes tiny and the window shorter than TOKENS.
CONFIG = {
    "architectures": ["IQuestLoopCoderForCausalLM"], "model_type": "iquestloopcoder",
    "auto_map": {"AutoConfig": "configuration_iquestloopcoder.IQuestLoopCoderConfig",
                 "AutoModelForCausalLM": "modeling_iquestloopcoder.IQuestLoopCoderForCausalLM"},
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24, "hidden_act": "silu",
    "max_position_embeddings": 256, "rope_theta": 500000.0, "rope_scaling": None, "attention_bias": False,
    "mlp_bias": False, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "loop_num": 2, "loop_window_size": 5,
}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    model = random_mlx_lm_model(CONFIG, draw=normal())
    folder = tmp_path_factory.mktemp("iquestloop")
    return folder, model, write_release(folder, model, CONFIG, TOKENS, vocab=VOCAB)


@pytest.mark.parametrize("backend", backends())
def test_logits_match_mlx_lm(release, backend):
    folder, _, want = release
    assert_forward_and_decode_match(float32_model(folder, backend, block_size=4), TOKENS, want)


def test_the_second_pass_reads_the_first_passes_weights_and_keeps_kv_of_its_own(release):
    """Four layers run over two stored, each with a KV pool layer; the stream is not normed between the passes;
    each second-pass layer attends its own keys in the window and its first pass's in full."""
    config = ModelConfig.from_file(release[0])
    arch = config.arch
    assert (config.num_layers, arch.stored_layers, arch.kv_pool_layers, arch.loop_starts) == (4, 2, 4, frozenset())
    assert [(layer.mixer, layer.window, layer.full_source) for layer in arch.layers] == [
        ("attention", None, None), ("attention", None, None), ("loop_attention", 5, 0), ("loop_attention", 5, 1)]


def test_the_loop_gate_is_no_recurrent_state_and_profilers_see_it(release):
    """A second-pass layer carries no state: its loop gate rides in its own field (``loop_gate``), not in the
    recurrent mixer's, which stays None on every layer; its projection is among the model's."""
    model = float32_model(release[0])
    assert [layer.recurrent for layer in model.layers] == [None] * 4
    assert [layer.loop_gate is not None for layer in model.layers] == [False, False, True, True]
    listed = {id(p) for p in model.projections()}
    assert all(id(layer.loop_gate.gate) in listed for layer in model.layers[2:])


def test_the_window_and_the_gates_each_matter(release):
    """The controls, on mlx-lm's model: a window past the prompt, or the gates zeroed (an even mix), moves the
    logits that Ferrum's match above."""
    _, model, want = release
    wide = type(model)(type(model.args).from_dict({**CONFIG, "loop_window_size": 64}))
    wide.update(model.parameters())
    assert scaled_error(model_logits(wide, TOKENS), want) > 1e-2
    assert scaled_error(model_logits(with_zeroed(model, "gate_projections"), TOKENS), want) > 1e-2


def test_engine_keeps_mlx_lm_greedy_tokens(release):
    folder, model, _ = release
    assert_engine_keeps_mlx_lm_greedy_tokens(folder, model, VOCAB)


@pytest.mark.slow  # mlx-lm converts and quantizes: ~2 s apiece
@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_conversions_run_as_mlx_lm_runs_them(release, bits, tmp_path):
    folder, model, _ = release
    stored = assert_conversion_runs_as_mlx_lm(folder, model, tmp_path / "mlx", TOKENS, bits)
    assert "model.gate_projections.1.bias" in stored and "model.gate_projections.1.scales" not in stored


def test_other_loop_counts_are_refused_by_name():
    with pytest.raises(UnsupportedFeatureError, match="loop_num"):
        ModelConfig.from_dict({**CONFIG, "loop_num": 3})
