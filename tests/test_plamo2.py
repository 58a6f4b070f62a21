"""PLaMo 2 (``plamo2``: Preferred Networks' PLaMo 2 1B / 8B; remote code, no transformers model): its Mamba layers
(Mamba-2's recurrence behind a convolution of the inputs alone, B / C / step projected after it and normed) between
rope attention layers with per-head q/k weights, sandwich norms with offsets of their own; against mlx-lm's own model
of a random checkpoint written under the release's names, on every runnable backend, and mlx-lm's conversions (float
and 4-bit) against mlx-lm's logits of them."""

from __future__ import annotations

from dataclasses import fields, replace
import numpy as np
import pytest

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError
from ferrum.recurrent.plamo2 import Plamo2MambaSpec
from mlx_lm_release import (
    MlxLmReference, assert_dropping_moves_mlx_lm_logits, model_logits, random_mlx_lm_model, write_release,
)
from support import (
    assert_a_failed_pass_leaves_every_state_as_it_was, assert_a_mixed_batch_gives_each_sequence_its_own_logits,
    assert_engine_keeps_greedy_tokens, assert_every_backend_runs_it_as_mlx_lm, assert_forward_and_decode_match,
    float32_model, mlx_lm_converted, runnable_backends, scaled_error, small_pool_engine, staggered_greedy_workload,
)

plamo2 = pytest.importorskip("mlx_lm.models.plamo2")

BACKENDS = runnable_backends()
VOCAB = 256
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
#: Three Mamba layers and two attention layers (mamba_step 2), GQA, sizes that mlx-lm packs in groups of 64.
CONFIG = dict(model_type="plamo2", hidden_size=64, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
              hidden_size_per_head=16, intermediate_size=128, vocab_size=VOCAB, mamba_num_heads=4, mamba_d_state=16,
              mamba_d_conv=4, mamba_step=2, max_position_embeddings=256, rms_norm_eps=1e-5,
              tie_word_embeddings=True, attention_window_size=8, full_attention_idx=None, mamba_chunk_size=None)


def _draw(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray | None:
    """Block norms around 0 (their offsets are added), q/k weights around 1, decays of 1-8 per step, and half the
    heads' step biases so low that mlx-lm's clip at 0.001 holds their steps, skip weights around 1, taps of O(1)
    outputs."""
    if name.endswith("norm.weight"):
        return rng.uniform(-0.3, 0.3, shape)
    if name.endswith(("q_weight", "k_weight")):
        return 1 + rng.uniform(-0.3, 0.3, shape)
    if name.endswith("A_log"):
        return np.log(rng.uniform(1, 8, shape))
    if name.endswith("dt_bias"):
        return np.where(np.arange(shape[0]) % 2, -9.0, rng.uniform(-2, 1, shape))
    if name.endswith("embed_tokens.weight"):
        return rng.normal(0.0, 0.3, shape)
    if name.endswith("conv1d.weight"):  # [C, K, 1]: K taps in
        return rng.normal(0.0, 1 / np.sqrt(shape[1]), shape)
    if name.endswith(".D"):
        return 1 + rng.uniform(-0.3, 0.3, shape)
    return None


def _as_released(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """mlx-lm's sanitize the other way round: the release stores the taps ``[C, 1, K]``."""
    return {name: np.swapaxes(values, 1, 2) if name.endswith("conv1d.weight") else values
            for name, values in tensors.items()}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The release's folder and mlx-lm's model of it; mlx-lm's load of the folder is that model (the names are
    the release's as mlx-lm reads them)."""
    model = random_mlx_lm_model(CONFIG, draw=_draw)
    folder = tmp_path_factory.mktemp("plamo2")
    write_release(folder, model, CONFIG, TOKENS, _as_released)
    return folder, MlxLmReference(model)


def test_layers_alternate_as_mlx_lm_picks_them(release):
    model = float32_model(release[0])
    arch = model.config.arch
    assert [s.mixer for s in arch.layers] == ["mamba2" if m.is_mamba else "attention"
                                              for m in release[1].model.layers]
    assert [s.mixer for s in arch.layers] == ["mamba2", "attention", "mamba2", "attention", "mamba2"]
    assert sorted(model.states.layers) == [0, 2, 4] and arch.kv_pool_layers == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_and_decode_steps_match_mlx_lm(release, backend):
    folder, reference = release
    assert_forward_and_decode_match(float32_model(folder, backend, block_size=4), TOKENS, model_logits(reference.model,
                                                                                                     TOKENS))


#: What PLaMo 2 adds, each dropped: the steps unclipped, the norms after the mixer and MLP with Gemma's offset of 1,
#: in_proj read as Mamba-2's (all the gates, then all the inputs) where its heads interleave them.
DROPPED = {
    "step clip": lambda arch: dict(mamba2=replace(arch.mamba2, dt_limit=(0.0, float("inf")))),
    "norm offsets": lambda arch: dict(norm_offsets={"self_attn.q_norm": 0.0, "self_attn.k_norm": 0.0}),
    "interleaved heads": lambda arch: dict(mamba2=_Contiguous(**{f.name: getattr(arch.mamba2, f.name)
                                                                 for f in fields(arch.mamba2)})),
}


class _Contiguous(Plamo2MambaSpec):
    """in_proj read as all the gates' rows, then all the inputs'."""

    def split(self, name, tensor, take_rows):
        if ".in_proj." not in name:
            return super().split(name, tensor, take_rows)
        rows = np.arange(2 * self.inner).reshape(2, -1)
        return [(name.replace(".in_proj.", f".{part}."), take_rows(tensor, rows[i]))
                for i, part in enumerate(("in_proj_z", "in_proj_x"))]


@pytest.mark.parametrize("dropped", DROPPED)
def test_each_feature_counts(release, dropped, monkeypatch):
    folder, reference = release
    assert_dropping_moves_mlx_lm_logits(folder, reference.model, TOKENS, DROPPED[dropped], monkeypatch, 1e-2)


def test_a_mixed_batch_gives_each_sequence_its_own_logits(release):
    folder, reference = release
    assert_a_mixed_batch_gives_each_sequence_its_own_logits(float32_model(folder), reference, VOCAB)


def test_a_failed_pass_leaves_every_state_as_it_was(release, monkeypatch):
    folder, reference = release
    assert_a_failed_pass_leaves_every_state_as_it_was(float32_model(folder), reference, TOKENS, "ssd_update",
                                                      monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_batching_chunking_and_preemption_give_each_requests_greedy_tokens(release, backend):
    folder, reference = release
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, backend, **config), reference,
                                      staggered_greedy_workload(VOCAB))


@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_conversions_run_as_mlx_lm_runs_them(release, bits, tmp_path):
    """mlx-lm's conversion stores the taps [C, K, 1] and packs every projection (in_proj's interleaved heads too)."""
    tensors, want = mlx_lm_converted(release[0], tmp_path / "mlx", TOKENS, bits)
    assert tensors["model.layers.layers.0.mixer.conv1d.weight"].shape == (64, 4, 1)
    assert ("model.layers.layers.0.mixer.in_proj.scales" in tensors) == (bits is not None)
    if bits is None:
        assert scaled_error(want, model_logits(release[1].model, TOKENS)) <= 1e-5
    assert_every_backend_runs_it_as_mlx_lm(tmp_path / "mlx", TOKENS, want, packed=bits is not None)


@pytest.mark.parametrize("change, key", [({"mamba_step": 1}, "mamba_step"), ({"num_key_value_heads": 3},
                                                                             "num_key_value_heads")])
def test_bad_configs_are_refused_by_name(change, key):
    with pytest.raises(ConfigError, match=key):
        ModelConfig.from_dict({**CONFIG, **change})


def test_null_keys_take_mlx_lms_defaults():
    """Releases leave keys null (mamba_chunk_size here); mlx-lm's ModelArgs defaults them, and so does Ferrum."""
    arch = ModelConfig.from_dict({**CONFIG, "mamba_d_conv": None, "mamba_enabled": None}).arch
    assert arch.mamba2.conv_kernel == 4 and arch.layers[0].mixer == "mamba2"
    assert [s.mixer for s in ModelConfig.from_dict({**CONFIG, "mamba_enabled": False}).arch.layers] == [
        "attention"] * 5
