"""RWKV-7 (``rwkv7``: fla-hub's RWKV-7 Goose releases, flash-linear-attention's remote code, which transformers lacks):
a tiny random checkpoint built from mlx-lm's own model and written under the release's names (``k_k``, ``k_a`` and
``g_norm`` flat, as mlx-lm's sanitize takes them in), against mlx-lm's logits on every runnable backend, forward and
decode, mixed batches and failed passes, through the engine, and mlx-lm's conversions (float and 4-bit)."""

from __future__ import annotations


import numpy as np
import pytest

from ferrum.config import ModelConfig
from ferrum.errors import AdapterError, ConfigError, UnsupportedFeatureError
from mlx_lm_release import MlxLmReference, model_logits, random_mlx_lm_model, write_release
from support import (
    assert_a_failed_pass_leaves_every_state_as_it_was,
    assert_a_mixed_batch_gives_each_sequence_its_own_logits, assert_engine_keeps_greedy_tokens,
    assert_every_backend_runs_it_as_mlx_lm, assert_forward_and_decode_match, float32_model, mlx_lm_converted,
    grouped_routing_backends, mlx_lm_logits, runnable_backends, scaled_error, small_pool_engine,
    staggered_greedy_workload,
)

pytest.importorskip("mlx_lm")
BACKENDS = runnable_backends()
VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(1).randint(0, VOCAB, size=14)]
#: A release's config.json (rwkv7-191M-world's keys, sizes shrunk): 3 layers of 2 heads of 32.
CONFIG = {
    "architectures": ["RWKV7ForCausalLM"], "attn": None, "attn_mode": "chunk",
    "auto_map": {"AutoConfig": "configuration_rwkv7.RWKV7Config",
                 "AutoModelForCausalLM": "modeling_rwkv7.RWKV7ForCausalLM"},
    "a_low_rank_dim": 8, "bos_token_id": 0, "decay_low_rank_dim": 8, "eos_token_id": 0, "fuse_cross_entropy": True,
    "fuse_norm": False, "gate_low_rank_dim": 16, "head_dim": 32, "hidden_act": "sqrelu", "hidden_ratio": 4.0,
    "hidden_size": 64, "initializer_range": 0.006, "intermediate_size": 256, "max_position_embeddings": 2048,
    "model_type": "rwkv7", "norm_bias": True, "norm_eps": 1e-05, "norm_first": True, "num_heads": None,
    "num_hidden_layers": 3, "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": True,
    "v_low_rank_dim": 8, "vocab_size": VOCAB,
}
#: What mlx-lm's sanitize reshapes to ``[H, D]``: the release stores them flat.
PER_HEAD = ("k_k", "k_a", "g_norm")


def _draw(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Every path mattering: matrices of std 0.6 / sqrt(fan-in) (the embeddings 1), the mixes uniform in [0, 1],
    norms' weights around 1 and biases around 0, ``k_a`` around 1."""
    tail = name.rsplit(".", 1)[-1]
    if tail.startswith("x_"):
        return rng.uniform(0, 1, shape)
    if tail == "k_a" or name.endswith("norm.weight"):
        return 1.0 + rng.normal(0, 0.2, shape)
    if tail in ("k_k", "r_k") or name.endswith(".bias"):
        return rng.normal(0, 0.5, shape)
    return rng.normal(0, 1.0 if "embeddings" in name else 0.6 / np.sqrt(shape[-1]), shape)


def _mlx_lm_model(config: dict, change=None):
    """mlx-lm's rwkv7 Model of ``config`` with :func:`_draw`'s parameters, ``change(name, values)`` altering them
    (controls)."""
    return random_mlx_lm_model(config, draw=_draw if change is None else lambda n, s, r: change(n, _draw(n, s, r)))


def _release_names(params: dict) -> dict:
    """mlx-lm's parameters as the release stores them (sanitize inverted): the per-head ones flat."""
    return {n: v.reshape(-1) if any(f".{p}" in n for p in PER_HEAD) else v for n, v in params.items()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """variant -> (folder, mlx-lm's logits over TOKENS, its model): untied as released, and tied; mlx-lm's load of
    each folder is the model (write_release)."""
    out = {}
    for name, change in (("untied", {}), ("tied", {"tie_word_embeddings": True})):
        model, folder = _mlx_lm_model({**CONFIG, **change}), tmp_path_factory.mktemp(name)
        out[name] = folder, write_release(folder, model, {**CONFIG, **change}, TOKENS, _release_names), model
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["untied", "tied"])
def test_logits_match_mlx_lm(built, variant, backend):
    folder, want, _ = built[variant]
    assert_forward_and_decode_match(float32_model(folder, backend, block_size=4), TOKENS, want)


@pytest.mark.skipif("mlx" not in BACKENDS, reason="needs MLX")
def test_a_model_loaded_on_one_thread_runs_on_another(built):
    """The engine steps on its own thread (ferrum serve, astream): nothing the load placed on MLX may be a lazy array
    tied to the loading thread's stream (the group norm's bias row was)."""
    from concurrent.futures import ThreadPoolExecutor

    folder, want, _ = built["untied"]
    model = float32_model(folder, "mlx")
    with ThreadPoolExecutor(1) as other:
        got = other.submit(model.forward_verify, "t", TOKENS).result()
    assert scaled_error(got, want) <= 1e-4


#: A prompt over two chunks of the batched rule and part of a third (``ferrum.recurrent.batched.CHUNK`` 16).
LONG = [int(t) for t in np.random.RandomState(2).randint(0, VOCAB, size=40)]


@pytest.fixture(scope="module")
def long_logits(built):
    return mlx_lm_logits(built["untied"][0], LONG)


@pytest.mark.parametrize("backend", sorted(set(BACKENDS + grouped_routing_backends())))
def test_long_prompts_take_the_chunked_rule_as_mlx_lm_runs_them(built, long_logits, backend):
    """In one pass, and in two whose second starts from the first's states, each over a chunk or more."""
    model = float32_model(built["untied"][0], backend, block_size=4)
    assert scaled_error(model.forward_verify("whole", LONG), long_logits) <= 1e-4
    parts = [model.forward_verify("parts", LONG[:19]), model.forward_verify("parts", LONG[19:])]
    assert scaled_error(np.concatenate(parts), long_logits) <= 1e-4


@pytest.mark.parametrize("backend", ["cuda", "mlx", "jax"])
def test_backends_declaring_api_1_30_run_their_own_rule(built, long_logits, backend, monkeypatch):
    """torch, MLX and the JAX plugin never take the host fallback (``ferrum.recurrent.kernels.wkv7``) once they
    declare API 1.30; the control: the same backend held to an older API (``SINCE`` past its version) takes it."""
    from ferrum.backends import declared_version, load_backend
    from ferrum.recurrent import kernels, rwkv7

    if backend not in grouped_routing_backends():
        pytest.skip(f"{backend} is not installed here")
    if declared_version(load_backend(backend).ops.info) < rwkv7.SINCE:
        pytest.skip(f"the installed {backend} plugin predates API 1.30: reinstall it")
    calls, host = [], kernels.wkv7
    monkeypatch.setattr(kernels, "wkv7", lambda *args: calls.append(1) or host(*args))
    folder = built["untied"][0]
    assert scaled_error(float32_model(folder, backend).forward_verify("own", LONG), long_logits) <= 1e-4
    assert calls == []
    monkeypatch.setattr(rwkv7, "SINCE", (1, 99))
    assert scaled_error(float32_model(folder, backend).forward_verify("host", LONG), long_logits) <= 1e-4
    assert len(calls) == 3  # one a time mix


def test_each_stored_layer_runs_as_a_time_mix_then_a_channel_mix(built):
    arch = ModelConfig.from_file(built["untied"][0]).arch
    assert [s.mixer for s in arch.layers] == ["rwkv7_first", "rwkv7_channel", "rwkv7", "rwkv7_channel",
                                              "rwkv7", "rwkv7_channel"]
    assert arch.stored_layers == 3 and arch.kv_pool_layers == 0
    assert (arch.rwkv7.heads, arch.rwkv7.head_dim, arch.rwkv7_first.first) == (2, 32, True)


def test_engine_batching_chunking_and_preemption_give_each_request_its_greedy_tokens(built):
    folder, _, model = built["untied"]
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, **config), MlxLmReference(model),
                                      staggered_greedy_workload(VOCAB, count=6))


def test_a_mixed_batch_gives_each_sequence_its_own_logits(built):
    folder, _, model = built["untied"]
    assert_a_mixed_batch_gives_each_sequence_its_own_logits(float32_model(folder), MlxLmReference(model), VOCAB)


def test_a_failed_pass_leaves_every_state_as_it_was(built, monkeypatch):
    folder, _, model = built["untied"]
    assert_a_failed_pass_leaves_every_state_as_it_was(float32_model(folder), MlxLmReference(model), TOKENS,
                                                      "wkv7", monkeypatch)


def test_prefix_caching_resumes_from_kept_states(built):
    """A prompt sharing a cached prompt's first blocks starts from the states kept there (the token shifts' last
    inputs and the recurrent matrices) and gets the tokens computed from scratch."""
    from ferrum.sampling import SamplingParams

    folder, _, _ = built["untied"]
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    first = [int(t) for t in np.random.RandomState(7).randint(0, VOCAB, size=18)]
    second = first[:13] + [3, 5, 8]

    def run(engine, prompt):
        engine.add_request(prompt, params)
        return next(o for o in engine.run_until_done() if o.finished)

    cached, fresh = small_pool_engine(folder), small_pool_engine(folder, enable_prefix_caching=False)
    assert run(cached, first).token_ids == run(fresh, first).token_ids
    got = run(cached, second)
    assert got.metrics.num_cached_tokens == 12 and got.token_ids == run(fresh, second).token_ids


def test_each_new_part_changes_mlx_lm_s_logits(built):
    """Controls that the parity above can fail: mlx-lm's logits move without the value residual, the token shifts,
    the in-context learning rate's key, the bonus, or the first layer's norm of the embeddings."""
    want = built["untied"][1]

    def zeroed(*names):
        return lambda name, values: np.zeros_like(values) if any(name.endswith(n) for n in names) else values

    for change in (zeroed("v_lora.lora.2.weight", "v_lora.lora.2.bias"),  # each value half its own, half the first's
                   zeroed(*(f".x_{c}" for c in "rwkvag")),  # no token shift in the time mix
                   zeroed("ffn.x_k"),  # ...nor in the channel mix
                   zeroed("r_k"),  # no bonus
                   lambda name, values: np.ones_like(values) if name.endswith("k_a") else values):
        assert scaled_error(model_logits(_mlx_lm_model(CONFIG, change=change), TOKENS), want) > 1e-2


@pytest.mark.slow  # mlx-lm converts and quantizes: a few seconds
@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_conversions_run_as_mlx_lm_runs_them(built, bits, tmp_path):
    source = tmp_path / "source"  # the release without its auto_map, which mlx-lm's convert would follow
    write_release(source, built["untied"][2], {k: v for k, v in CONFIG.items() if k != "auto_map"}, TOKENS,
                  _release_names)
    tensors, want = mlx_lm_converted(source, tmp_path / "mlx", TOKENS, bits, group=32)
    assert any(name.endswith(".attn.r_proj.scales") for name in tensors) == (bits is not None)
    assert tensors  # mlx-lm's names are the release's; k_k, k_a and g_norm per head
    assert_every_backend_runs_it_as_mlx_lm(tmp_path / "mlx", TOKENS, want, packed=bits is not None)


@pytest.mark.parametrize("change, error, key", [
    ({"attn": {"layers": [1], "num_heads": 2}}, UnsupportedFeatureError, "attn"),
    ({"norm_first": False}, UnsupportedFeatureError, "norm_first"),
    ({"hidden_act": "swish"}, UnsupportedFeatureError, "hidden_act"),
    ({"norm_bias": False}, UnsupportedFeatureError, "norm_bias"),
    ({"head_dim": 48}, ConfigError, "head_dim"),
    ({"num_heads": 4}, ConfigError, "num_heads"),
    ({"a_low_rank_dim": None}, ConfigError, "a_low_rank_dim"),
])
def test_unsupported_variants_are_refused_by_name(change, error, key):
    with pytest.raises(error, match=key):
        ModelConfig.from_dict({**CONFIG, **change})


def test_lora_adapters_are_refused_saying_what_its_layers_hold(built, tmp_path):
    """A checkpoint layer holds a time mix and a channel mix, whose projections LoRA does not adapt: refused by what
    they are before the folder is read (it said "several attention blocks")."""
    model = float32_model(built["untied"][0])
    with pytest.raises(AdapterError, match="RWKV-7 time mix and channel mix, not attention"):
        model.adapters.load("a", tmp_path)
