"""PLaMo 3 (``plamo3``: Preferred Networks' PLaMo 3; remote code, no transformers model): PLaMo 2's attention blocks
alone, Gemma's q/k norms, sliding layers with a rope base of their own between full ones; against mlx-lm's own model
of a random checkpoint written under the release's names, on every runnable backend, and mlx-lm's conversions (float
and 4-bit) against mlx-lm's logits of them."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from ferrum.config import ModelConfig
from mlx_lm_release import (
    MlxLmReference, assert_dropping_moves_mlx_lm_logits, model_logits, random_mlx_lm_model, write_release,
)
from support import (
    assert_engine_keeps_greedy_tokens, assert_every_backend_runs_it_as_mlx_lm, assert_forward_and_decode_match,
    float32_model, mlx_lm_converted, runnable_backends, scaled_error, small_pool_engine, staggered_greedy_workload,
)

plamo3 = pytest.importorskip("mlx_lm.models.plamo3")

BACKENDS = runnable_backends()
VOCAB = 256
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
#: Sliding layers (a window of 4, so 5 keys, far shorter than the prompt) between full ones, GQA, sizes mlx-lm packs
#: in groups of 64; the release's null keys (sliding_window: window_size stands).
CONFIG = dict(model_type="plamo3", hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-6,
              window_size=4, sliding_window=None, sliding_window_pattern=2, rope_theta=1_000_000.0,
              rope_local_theta=100.0, tie_word_embeddings=True, image_token_id=None, linear_type="normal")


def _draw(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray | None:
    """Every norm's weight around 0 (its offset is added), embeddings small enough for O(10) logits."""
    if name.endswith("norm.weight"):
        return rng.uniform(-0.3, 0.3, shape)
    if name.endswith("embed_tokens.weight"):
        return rng.normal(0.0, 0.3, shape)
    return None


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The release's folder (mlx-lm's sanitize renames nothing of it) and mlx-lm's model of it, which mlx-lm's load
    of the folder reproduces."""
    model = random_mlx_lm_model(CONFIG, draw=_draw)
    folder = tmp_path_factory.mktemp("plamo3")
    write_release(folder, model, CONFIG, TOKENS)
    return folder, MlxLmReference(model)


def test_layer_kinds_are_mlx_lms(release):
    arch = float32_model(release[0]).config.arch
    assert [s.window is None for s in arch.layers] == [m.full_attn for m in release[1].model.layers]
    assert [s.window for s in arch.layers] == [5, None, 5, None]
    assert [s.rope.theta for s in arch.layers] == [100.0, 1_000_000.0, 100.0, 1_000_000.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_and_decode_steps_match_mlx_lm(release, backend):
    folder, reference = release
    assert_forward_and_decode_match(float32_model(folder, backend, block_size=4), TOKENS,
                                    model_logits(reference.model, TOKENS))


def _full_rope(arch):
    full = next(s.rope for s in arch.layers if s.window is None)
    return dict(layers=tuple(replace(s, rope=full) for s in arch.layers))


#: What PLaMo 3 adds, each dropped: the window of window_size keys (mlx-lm's prompt pass masks one more), the
#: sliding layers' own rope base, the norms after attention and the MLP with Gemma's offset of 1.
DROPPED = {
    "window + 1": lambda arch: dict(layers=tuple(replace(s, window=s.window and s.window - 1) for s in arch.layers)),
    "local rope base": _full_rope,
    "norm offsets": lambda arch: dict(norm_offsets={}),
}


@pytest.mark.parametrize("dropped", DROPPED)
def test_each_feature_counts(release, dropped, monkeypatch):
    folder, reference = release
    assert_dropping_moves_mlx_lm_logits(folder, reference.model, TOKENS, DROPPED[dropped], monkeypatch, 1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_batching_chunking_and_preemption_give_each_requests_greedy_tokens(release, backend):
    folder, reference = release
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, backend, **config), reference,
                                      staggered_greedy_workload(VOCAB))


@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_conversions_run_as_mlx_lm_runs_them(release, bits, tmp_path):
    tensors, want = mlx_lm_converted(release[0], tmp_path / "mlx", TOKENS, bits)
    assert ("model.layers.layers.0.mixer.qkv_proj.scales" in tensors) == (bits is not None)
    if bits is None:
        assert scaled_error(want, model_logits(release[1].model, TOKENS)) <= 1e-5
    assert_every_backend_runs_it_as_mlx_lm(tmp_path / "mlx", TOKENS, want, packed=bits is not None)


def test_sliding_window_stands_for_window_size_where_set():
    arch = ModelConfig.from_dict({**CONFIG, "sliding_window": 6}).arch
    assert [s.window for s in arch.layers] == [7, None, 7, None]


def test_the_conformance_kits_oracle_reads_each_norms_own_offset(release):
    """The float64 oracle adds each norm's own offset (1 / 5 and 1 / 5 ** 1.5 after attention and the MLP, 1 before),
    as the load does (ferrum.arch.norms.norm_offset): mlx-lm's logits (it added 1 to every norm)."""
    from ferrum.testing.arch_oracle import ArchOracle

    folder, reference = release
    assert scaled_error(ArchOracle(folder).logits(TOKENS), model_logits(reference.model, TOKENS)) <= 1e-4
