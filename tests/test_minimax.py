"""MiniMax-Text-01 / MiniMax-M1 (``minimax``): lightning attention (Mamba-2's ``ssd_update`` with a constant decay
per head and layer) between softmax attention layers, post-norm blocks scaled per layer kind, Mixtral's experts;
against transformers on every runnable backend, the engine's batching, chunking and preemption, prefix caching of the
recurrent states, and the releases' config spellings."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import transformers

from ferrum.arch import families
from ferrum.errors import ConfigError, UnsupportedFeatureError
from ferrum.model import ForwardItem, times_unrounded
from ferrum.recurrent.lightning import slope_rates
from ferrum.recurrent.snapshots import DEFAULT_BUDGET
from support import (
    assert_a_failed_pass_leaves_every_state_as_it_was, assert_a_mixed_batch_gives_each_sequence_its_own_logits,
    assert_engine_keeps_greedy_tokens, assert_forward_and_decode_match, build_transformers_model, float32_model,
    reference_logits, runnable_backends, scaled_error, small_pool_engine, staggered_greedy_workload, write_tokenizer,
)

BACKENDS = runnable_backends()
VOCAB = 300
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=21)]
TYPES = ["linear_attention", "full_attention", "linear_attention", "linear_attention"]
#: Factors unlike one another and unlike 1, so that each one's place shows.
FACTORS = dict(linear_attn_alpha_factor=2.2, linear_attn_beta_factor=0.8, full_attn_alpha_factor=1.7,
               full_attn_beta_factor=0.6, mlp_alpha_factor=1.3, mlp_beta_factor=0.7)


def config(**extra) -> transformers.MiniMaxConfig:
    """Four heads of 16 dims (two key/value heads on the attention layer), four experts, two a token."""
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, block_size=4,
                    max_position_embeddings=256, layer_types=TYPES, pad_token_id=None, bos_token_id=0,
                    eos_token_id=1, **FACTORS)
    return transformers.MiniMaxConfig(**{**settings, **extra})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("minimax")
    hf = build_transformers_model(folder, config())
    write_tokenizer(folder, VOCAB)
    return folder, hf


def edited(folder, destination, **changes):
    """A copy of the checkpoint whose config.json has ``changes`` (None: the key removed)."""
    shutil.copytree(folder, destination)
    raw = json.loads((destination / "config.json").read_text())
    raw.update(changes)
    (destination / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if v is not None}))
    return destination


def test_reads_layer_kinds_factors_rates_and_experts(checkpoint):
    model = float32_model(checkpoint[0])
    arch = model.config.arch
    assert [s.mixer for s in arch.layers] == ["lightning", "attention", "lightning", "lightning"]
    assert [s.mlp for s in arch.layers] == ["moe"] * 4 and {s.residual for s in arch.layers} == {"normed"}
    assert arch.layers[0].residual_scales == (2.2, 0.8, 1.3, 0.7)
    assert arch.layers[1].residual_scales == (1.7, 0.6, 1.3, 0.7)
    assert sorted(model.states.layers) == [0, 2, 3] and arch.moe.num_experts == 4
    hf = checkpoint[1]
    for i in (0, 2, 3):  # transformers' buffer, computed from the depth alone here
        want = hf.model.layers[i].self_attn.slope_rate.reshape(-1).numpy()
        np.testing.assert_allclose(slope_rates(4, i, 4), want, rtol=1e-6)
        np.testing.assert_allclose(np.exp(arch.computed[f"layers.{i}.self_attn.a_log"]), want, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_and_decode_steps_match_transformers(checkpoint, backend):
    folder, hf = checkpoint
    assert_forward_and_decode_match(float32_model(folder, backend), TOKENS, reference_logits(hf, TOKENS))


def test_the_factors_matter(checkpoint, tmp_path):
    """Read as 1 (each of the three pairs in turn), they miss transformers' logits: the check above can fail."""
    folder, hf = checkpoint
    want = reference_logits(hf, TOKENS)
    for kind in ("linear_attn", "full_attn", "mlp"):
        plain = edited(folder, tmp_path / kind, **{f"{kind}_alpha_factor": 1, f"{kind}_beta_factor": 1})
        assert scaled_error(float32_model(plain).forward_verify("p", TOKENS), want) > 1e-3, kind


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cpu"])  # numpy computes in float32 only
def test_a_bfloat16_residual_is_scaled_by_the_unrounded_factor(backend):
    """transformers multiplies a bfloat16 stream by the release's alpha as a Python float (the product rounded
    once); rounding alpha to bfloat16 first (3.5566 -> 3.5625) would bias every block by 0.17%."""
    import torch

    from ferrum.backends import load_backend

    alpha = 3.5565588200778455  # MiniMax-Text-01's layernorm_*_alpha
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    ops = load_backend(backend).ops
    got = ops.to_numpy(times_unrounded(ops, ops.from_numpy(x.float().numpy(), "bfloat16"), alpha, "bfloat16"))
    np.testing.assert_array_equal(np.asarray(got, np.float32), (x * alpha).float().numpy())


def test_the_residual_is_the_normed_input(checkpoint, monkeypatch):
    """Blocks adding their outputs to the un-normed stream (pre-norm blocks with the same factors) miss."""
    folder, hf = checkpoint
    family = families.FAMILIES["minimax"]

    def pre_norm(r, sizes):
        arch = family.build(r, sizes)
        return replace(arch, layers=tuple(replace(layer, residual="input") for layer in arch.layers))

    monkeypatch.setitem(families.FAMILIES, "minimax", replace(family, build=pre_norm))
    assert scaled_error(float32_model(folder).forward_verify("i", TOKENS), reference_logits(hf, TOKENS)) > 1e-3


@pytest.mark.parametrize("rates", ["first_layer", "none"])
def test_the_decay_matters(checkpoint, monkeypatch, rates):
    """Every layer with the first layer's rates (the shrinking with depth dropped), or no decay at all, misses."""
    from ferrum.arch.families import hybrid

    folder, hf = checkpoint
    real = hybrid.slope_rates
    dropped = {"first_layer": lambda heads, layer, layers: real(heads, 0, layers),
               "none": lambda heads, layer, layers: np.full(heads, 1e-30, dtype=np.float32)}[rates]
    monkeypatch.setattr(hybrid, "slope_rates", dropped)
    assert scaled_error(float32_model(folder).forward_verify("d", TOKENS), reference_logits(hf, TOKENS)) > 1e-3


def test_a_failed_pass_leaves_every_state_as_it_was(checkpoint, monkeypatch):
    folder, hf = checkpoint
    assert_a_failed_pass_leaves_every_state_as_it_was(float32_model(folder), hf, TOKENS, "ssd_update", monkeypatch)


def test_a_mixed_batch_gives_each_sequence_its_own_logits(checkpoint):
    folder, hf = checkpoint
    assert_a_mixed_batch_gives_each_sequence_its_own_logits(float32_model(folder), hf, VOCAB)


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_batching_chunking_and_preemption_give_each_requests_greedy_tokens(checkpoint, backend):
    folder, hf = checkpoint
    assert_engine_keeps_greedy_tokens(lambda **settings: small_pool_engine(folder, backend, **settings), hf,
                                      staggered_greedy_workload(VOCAB))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sequence_started_from_a_kept_state_computes_transformers_logits(checkpoint, backend):
    assert_a_kept_state_starts_a_sequence(*checkpoint, backend)


def assert_a_kept_state_starts_a_sequence(folder, hf, backend: str) -> None:
    """Prefix caching: the lightning states kept at a block boundary start a sequence that shares the prefix, whose
    logits are ``hf``'s."""
    model = float32_model(folder, backend, num_kv_blocks=128, block_size=4)
    model.snapshots.budget = DEFAULT_BUDGET
    model.prefill("a", TOKENS[:16])
    prompt = TOKENS[:16] + [5, 9, 200, 17, 3]
    match = model.kv.match_prefix(prompt)
    assert match.num_tokens == 16 and model.snapshots.count == 1
    model.kv.adopt("b", prompt, match)
    out = model.forward([ForwardItem("b", prompt[16:], 16)], all_logits=True)
    assert scaled_error(model.ops.to_numpy(out.logits), reference_logits(hf, prompt)[16:]) <= 1e-4


def _as_released(folder, destination):
    """The config as MiniMax's own releases spell it: attn_type_list, layernorm_*_alpha / _beta, postnorm,
    rotary_dim, shared_intermediate_size 0, no layer_types."""
    names = {"linear_attn_alpha_factor": "layernorm_linear_attention_alpha",
             "linear_attn_beta_factor": "layernorm_linear_attention_beta",
             "full_attn_alpha_factor": "layernorm_full_attention_alpha",
             "full_attn_beta_factor": "layernorm_full_attention_beta",
             "mlp_alpha_factor": "layernorm_mlp_alpha", "mlp_beta_factor": "layernorm_mlp_beta"}
    return edited(folder, destination, layer_types=None, attn_type_list=[0, 1, 0, 0], postnorm=True, rotary_dim=16,
                  shared_intermediate_size=0, **{new: FACTORS[old] for old, new in names.items()},
                  **{old: None for old in names})


def test_the_releases_spellings_load(checkpoint, tmp_path):
    folder, hf = checkpoint
    released = _as_released(folder, tmp_path / "released")
    got = float32_model(released).forward_verify("r", TOKENS)
    assert scaled_error(got, reference_logits(hf, TOKENS)) <= 1e-4


@pytest.mark.parametrize("change, error, named", [
    (dict(postnorm=False), UnsupportedFeatureError, "postnorm"),
    (dict(rotary_dim=8), UnsupportedFeatureError, "rotary_dim"),
    (dict(shared_intermediate_size=32), UnsupportedFeatureError, "shared_intermediate_size"),
    (dict(attn_type_list=[0, 0, 1, 0]), ConfigError, "attn_type_list"),
    (dict(attn_type_list=[0, 1, 0]), ConfigError, "attn_type_list"),
    (dict(layernorm_mlp_alpha=2.0, mlp_alpha_factor=1.3), ConfigError, "layernorm_mlp_alpha"),
    (dict(mlp_beta_factor="big"), ConfigError, "mlp_beta_factor"),
])
def test_what_it_does_not_run_is_refused_by_name(checkpoint, tmp_path, change, error, named):
    folder, _ = checkpoint
    with pytest.raises(error, match=named):
        float32_model(edited(folder, tmp_path / "c", layer_types=TYPES, **change))


def test_default_layer_kinds_are_transformers(tmp_path):
    """Without layer_types or attn_type_list, the even layers attend, as transformers' config says."""
    hf = build_transformers_model(tmp_path, config(layer_types=None, num_hidden_layers=3))
    write_tokenizer(tmp_path, VOCAB)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if k != "layer_types"}))
    model = float32_model(tmp_path)
    assert [s.mixer for s in model.config.arch.layers] == ["attention", "lightning", "attention"]
    assert scaled_error(model.forward_verify("t", TOKENS), reference_logits(hf, TOKENS)) <= 1e-4
