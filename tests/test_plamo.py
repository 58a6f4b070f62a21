"""PLaMo (``plamo``: Preferred Networks' PLaMo-13B; remote code, no transformers model): parallel blocks and key/value
heads tiled over the queries (query head ``h`` reads ``h % kv_heads``); against mlx-lm's own model of a random
checkpoint (whose names are the release's: mlx-lm sanitizes nothing), on every runnable backend, and mlx-lm's
conversions (float and 4-bit) against mlx-lm's logits of them."""

from __future__ import annotations

import numpy as np
import pytest

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from mlx_lm_release import (
    MlxLmReference, assert_dropping_moves_mlx_lm_logits, model_logits, random_mlx_lm_model, write_release,
)
from support import (
    assert_engine_keeps_greedy_tokens, assert_every_backend_runs_it_as_mlx_lm, assert_forward_and_decode_match,
    float32_model, mlx_lm_converted, runnable_backends, scaled_error, small_pool_engine, staggered_greedy_workload,
)

plamo = pytest.importorskip("mlx_lm.models.plamo")

BACKENDS = runnable_backends()
VOCAB = 256
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
#: Four query heads over two key/value heads (n_shared_head 2) of 32 dims, which groups of 32 fill.
CONFIG = dict(model_type="plamo", hidden_size=128, num_hidden_layers=3, num_attention_heads=4, n_shared_head=2,
              intermediate_size=128, vocab_size=VOCAB, rms_norm_eps=1e-6, rope_theta=10000.0)


def _draw(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray | None:
    return rng.normal(0.0, 0.3, shape) if name.endswith("embed_tokens.weight") else None


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    model = random_mlx_lm_model(CONFIG, draw=_draw)
    folder = tmp_path_factory.mktemp("plamo")
    write_release(folder, model, CONFIG, TOKENS)
    return folder, MlxLmReference(model)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_and_decode_steps_match_mlx_lm(release, backend):
    folder, reference = release
    assert_forward_and_decode_match(float32_model(folder, backend, block_size=4), TOKENS,
                                    model_logits(reference.model, TOKENS))


@pytest.mark.parametrize("dropped", ["tiled_kv_heads", "parallel"])
def test_each_feature_counts(release, dropped, monkeypatch):
    """Without the regrouping, query head h reads key/value head h // 2 (Ferrum's grouped attention); without
    parallel blocks the MLP reads the stream after attention."""
    folder, reference = release
    change = {"tiled_kv_heads": dict(tiled_kv_heads=False),
              "parallel": dict(parallel=False, norms={"pre_attn": "norm", "pre_mlp": "norm"})}[dropped]
    assert_dropping_moves_mlx_lm_logits(folder, reference.model, TOKENS, lambda arch: change, monkeypatch, 1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_batching_chunking_and_preemption_give_each_requests_greedy_tokens(release, backend):
    folder, reference = release
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, backend, **config), reference,
                                      staggered_greedy_workload(VOCAB))


@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_conversions_run_as_mlx_lm_runs_them(release, bits, tmp_path):
    tensors, want = mlx_lm_converted(release[0], tmp_path / "mlx", TOKENS, bits, group=32)
    assert ("model.layers.layers.0.self_attn.o_proj.scales" in tensors) == (bits is not None)
    if bits is None:
        assert scaled_error(want, model_logits(release[1].model, TOKENS)) <= 1e-5
    assert_every_backend_runs_it_as_mlx_lm(tmp_path / "mlx", TOKENS, want, packed=bits is not None)


def test_a_packed_o_proj_whose_groups_span_heads_is_refused_by_name(release, tmp_path):
    mlx_lm_converted(release[0], tmp_path / "mlx", TOKENS, 4, group=64)
    with pytest.raises(UnsupportedFeatureError, match="o_proj.*group size 64 does not divide head_dim"):
        float32_model(tmp_path / "mlx")


@pytest.mark.parametrize("change, key", [({"n_shared_head": 3}, "n_shared_head"),
                                         ({"tie_word_embeddings": True}, "tie_word_embeddings")])
def test_bad_configs_are_refused_by_name(change, key):
    with pytest.raises((ConfigError, UnsupportedFeatureError), match=key):
        ModelConfig.from_dict({**CONFIG, **change})
