"""RWKV-7 (``rwkv7``: fla-hub's RWKV-7 Goose releases, flash-linear-attention's remote code, which transformers lacks):
a tiny random checkpoint built from mlx-lm's own model and written under the release's names (``k_k``, ``k_a`` and
``g_norm`` flat, as mlx-lm's sanitize takes them in), against mlx-lm's logits on every runnable backend, forward and
decode, mixed batches and failed passes, through the engine, and mlx-lm's conversions (float and 4-bit)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from support import (
    MlxLmGreedy, assert_a_failed_pass_leaves_every_state_as_it_was,
    assert_a_mixed_batch_gives_each_sequence_its_own_logits, assert_engine_keeps_greedy_tokens,
    assert_every_backend_runs_it_as_mlx_lm, assert_forward_and_decode_match, float32_model, mlx_lm_converted,
    mlx_lm_logits, runnable_backends, scaled_error, small_pool_engine, staggered_greedy_workload, write_tokenizer,
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


def _mlx_lm_model(config: dict, seed: int = 0, change=None):
    """mlx-lm's rwkv7 Model of ``config`` with random parameters scaled so every path matters: matrices of std
    0.6 / sqrt(fan-in) (the embeddings 1), the mixes uniform in [0, 1], norms' weights around 1 and biases around 0,
    ``k_a`` around 1; ``change(name, values)`` alters them (controls)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.models import rwkv7

    model = rwkv7.Model(rwkv7.ModelArgs.from_dict(config))
    rng = np.random.default_rng(seed)
    params = {}
    for name, p in tree_flatten(model.parameters()):
        tail = name.rsplit(".", 1)[-1]
        if tail.startswith("x_"):
            values = rng.uniform(0, 1, p.shape)
        elif tail == "k_a" or name.endswith("norm.weight"):
            values = 1.0 + rng.normal(0, 0.2, p.shape)
        elif tail in ("k_k", "r_k") or name.endswith(".bias"):
            values = rng.normal(0, 0.5, p.shape)
        else:
            values = rng.normal(0, 1.0 if "embeddings" in name else 0.6 / np.sqrt(p.shape[-1]), p.shape)
        params[name] = values.astype(np.float32)
    if change is not None:
        params = {name: change(name, values) for name, values in params.items()}
    model.update(tree_unflatten([(n, mx.array(v)) for n, v in params.items()]))
    return model, params


def _release_names(params: dict) -> dict:
    """mlx-lm's parameters as the release stores them (sanitize inverted): the per-head ones flat."""
    return {n: v.reshape(-1) if any(f".{p}" in n for p in PER_HEAD) else v for n, v in params.items()}


def _logits(model, tokens=TOKENS) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array([tokens])).astype(mx.float32))[0]


def _write(folder, config: dict, params: dict):
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({n: np.ascontiguousarray(v, dtype=np.float32) for n, v in params.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    write_tokenizer(folder, VOCAB)
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """variant -> (folder, mlx-lm's logits over TOKENS): untied as released, and tied."""
    out = {}
    for name, change in (("untied", {}), ("tied", {"tie_word_embeddings": True})):
        model, params = _mlx_lm_model({**CONFIG, **change})
        out[name] = _write(tmp_path_factory.mktemp(name), {**CONFIG, **change}, _release_names(params)), _logits(model)
    return out


@pytest.mark.parametrize("variant", ["untied", "tied"])
def test_the_checkpoint_is_what_mlx_lm_reads(built, variant):
    folder, want = built[variant]
    assert scaled_error(mlx_lm_logits(folder, TOKENS), want) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["untied", "tied"])
def test_logits_match_mlx_lm(built, variant, backend):
    folder, want = built[variant]
    assert_forward_and_decode_match(float32_model(folder, backend, block_size=4), TOKENS, want)


def test_each_stored_layer_runs_as_a_time_mix_then_a_channel_mix(built):
    arch = ModelConfig.from_file(built["untied"][0]).arch
    assert [s.mixer for s in arch.layers] == ["rwkv7_first", "rwkv7_channel", "rwkv7", "rwkv7_channel",
                                              "rwkv7", "rwkv7_channel"]
    assert arch.stored_layers == 3 and arch.kv_pool_layers == 0
    assert (arch.rwkv7.heads, arch.rwkv7.head_dim, arch.rwkv7_first.first) == (2, 32, True)


def test_engine_batching_chunking_and_preemption_give_each_request_its_greedy_tokens(built):
    folder, _ = built["untied"]
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, **config), MlxLmGreedy(folder),
                                      staggered_greedy_workload(VOCAB, count=6))


class _MlxLmAsTransformers:
    """mlx-lm's model of a checkpoint called as the support helpers call transformers' (``model(ids).logits``)."""

    def __init__(self, folder):
        self.folder = folder

    def __call__(self, ids):
        import torch

        return type("Out", (), {"logits": torch.tensor(mlx_lm_logits(self.folder, ids[0].tolist()))[None]})


def test_a_mixed_batch_gives_each_sequence_its_own_logits(built):
    folder, _ = built["untied"]
    assert_a_mixed_batch_gives_each_sequence_its_own_logits(float32_model(folder), _MlxLmAsTransformers(folder), VOCAB)


def test_a_failed_pass_leaves_every_state_as_it_was(built, monkeypatch):
    folder, _ = built["untied"]
    assert_a_failed_pass_leaves_every_state_as_it_was(float32_model(folder), _MlxLmAsTransformers(folder), TOKENS,
                                                      "wkv7", monkeypatch)


def test_prefix_caching_resumes_from_kept_states(built):
    """A prompt sharing a cached prompt's first blocks starts from the states kept there (the token shifts' last
    inputs and the recurrent matrices) and gets the tokens computed from scratch."""
    from ferrum.sampling import SamplingParams

    folder, _ = built["untied"]
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
        assert scaled_error(_logits(_mlx_lm_model(CONFIG, change=change)[0]), want) > 1e-2


@pytest.mark.slow  # mlx-lm converts and quantizes: a few seconds
@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_conversions_run_as_mlx_lm_runs_them(built, bits, tmp_path):
    source = tmp_path / "source"
    folder, _ = built["untied"]
    _write(source, {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if k != "auto_map"},
           {})  # the config and tokenizer; its tensors copied below
    (source / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
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
