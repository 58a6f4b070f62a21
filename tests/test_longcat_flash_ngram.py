"""LongCat-Flash-Lite (``longcat_flash_ngram``; remote code, run by mlx-lm): LongCat-Flash whose token embedding also
sums hashed embeddings of the n-grams each token ends. mlx-lm's own model at random, written under the release's
names, is the reference: every backend's logits, decode after a prefix-cache hit, a speculative rollback and
preemption, mixed batches, the engine, mlx-lm's conversions, and controls for the n-gram parts."""

from __future__ import annotations


import numpy as np
import pytest

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from ferrum.model import ForwardItem
from mlx_lm_release import MlxLmReference, model_logits, random_mlx_lm_model, write_release
from support import (
    assert_a_mixed_batch_gives_each_sequence_its_own_logits, assert_engine_keeps_greedy_tokens,
    assert_every_backend_runs_it_as_mlx_lm, assert_forward_and_decode_match, edited_checkpoint, float32_model,
    mlx_lm_converted, mlx_lm_logits, run_staggered, runnable_backends, scaled_error, small_pool_engine,
    staggered_greedy_workload,
)

pytest.importorskip("mlx_lm")

VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
YARN = {"rope_type": "yarn", "factor": 4.0, "mscale": 0.707, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0}
#: LongCat-Flash-Lite's config.json keys (mlx-lm reads them off it), the sizes tiny: 4-grams in 2 splits (six
#: tables of hidden_size // 6 = 10 columns, not dividing it), zero experts, YaRN.
RELEASE = {
    "architectures": ["LongcatFlashNgramForCausalLM"], "model_type": "longcat_flash_ngram", "vocab_size": VOCAB,
    "hidden_size": 64, "num_layers": 2, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
    "ffn_hidden_size": 80, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
    "head_dim": 8, "qk_head_dim": 16, "v_head_dim": 12, "n_routed_experts": 4, "zero_expert_num": 3, "moe_topk": 3,
    "expert_ffn_hidden_size": 24, "routed_scaling_factor": 2.0, "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": YARN, "mla_scale_q_lora": True,
    "mla_scale_kv_lora": True, "attention_bias": False, "zero_expert_type": "identity", "hidden_act": "silu",
    "ngram_vocab_size_ratio": 3, "emb_neighbor_num": 4, "emb_split_num": 2, "torch_dtype": "float32",
}
#: Trigrams in one split (two tables of 64 columns, which mlx-lm's 4-bit conversion packs), no zero experts, plain
#: rope (transformers' tokenizer loader, which mlx-lm's convert calls, fails on YaRN in an unknown model_type's config).
TRIGRAMS = {**RELEASE, "hidden_size": 128, "num_layers": 1, "num_hidden_layers": 2, "zero_expert_num": 0,
            "moe_topk": 2, "rope_scaling": None, "emb_neighbor_num": 3, "emb_split_num": 1}
VARIANTS = {"four_grams": RELEASE, "trigrams": TRIGRAMS}


def _draw(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """O(1) activations with every path counting: norms near 1, correction biases large enough to change choices,
    embeddings N(0, 1), matrices N(0, 1 / fan_in)."""
    if "norm" in name:
        return 1.0 + 0.1 * rng.standard_normal(shape)
    if "correction_bias" in name:
        return rng.uniform(0.0, 0.3, shape)
    if "embed" in name and "embed_q" not in name:
        return rng.standard_normal(shape)
    return rng.standard_normal(shape) / np.sqrt(shape[-1]) if len(shape) >= 2 else 0.2 * rng.standard_normal(shape)


def release_tensors(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """mlx-lm's parameters under the release's names, its ``sanitize`` inverted: the word embedding as
    ``model.embed_tokens``, the experts one by one, each sub-block's embed_q and unembed_out joined into
    ``kv_b_proj`` (per head, the key rows ``embed_q`` transposed, then the value rows)."""
    out = {}
    for name, value in params.items():
        if ".switch_mlp." in name:
            module, rest = name.split(".switch_mlp.")
            out.update({f"{module}.experts.{e}.{rest}": value[e] for e in range(value.shape[0])})
        elif name.endswith("embed_q.weight"):
            stem = name.removesuffix("embed_q.weight")
            joined = np.concatenate([value.swapaxes(-1, -2), params[stem + "unembed_out.weight"]], axis=1)
            out[stem + "kv_b_proj.weight"] = joined.reshape(-1, joined.shape[-1])
        elif not name.endswith("unembed_out.weight"):
            out[name.replace("ngram_embeddings.word_embeddings", "embed_tokens")] = value
    return out


def build_release(folder, config: dict, seed: int = 0):
    """mlx-lm's model of ``config`` at random, saved in ``folder`` under the release's names; mlx-lm's
    ``load_model`` of the folder reproduces it (so the inverse naming is proven). Returns the model."""
    model = random_mlx_lm_model(config, seed, _draw)
    write_release(folder, model, config, TOKENS, release_tensors, tolerance=1e-6)
    return model


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """variant -> (folder, mlx-lm's model, its logits over TOKENS)."""
    out = {}
    for name, config in VARIANTS.items():
        folder = tmp_path_factory.mktemp(name)
        model = build_release(folder, config)
        out[name] = folder, model, model_logits(model, TOKENS)
    return out


@pytest.mark.parametrize("backend", runnable_backends())
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_mlx_lm(releases, variant, backend):
    """One pass and token-by-token decode (each decode step's n-grams read the tokens before it from the KV
    manager) give mlx-lm's logits."""
    folder, _, want = releases[variant]
    model = float32_model(folder, backend, block_size=4)
    assert model.config.arch.ngram.tables == {"four_grams": 6, "trigrams": 2}[variant]
    assert_forward_and_decode_match(model, TOKENS, want)


def test_hashes_are_mlx_lms_at_the_release_sizes():
    """The rows each table looks up, at LongCat-Flash-Lite's own sizes (131072 tokens, 78 times as many buckets,
    4-grams in 4 splits, where V * moduli overflows nothing in int64), are those mlx-lm's NgramEmbedding computes
    (its moduli and hashing, run on a stand-in that builds no tables)."""
    import mlx.core as mx
    from mlx_lm.models.longcat_flash_ngram import NgramEmbedding

    from ferrum.arch.ngram import NgramSpec

    spec = NgramSpec(131072, 78, 4, 4, 3072)
    stand_in = type("Stub", (), {})()
    stand_in.vocab_size, stand_in.m, stand_in.k, stand_in.n = 131072, 78 * 131072, 4, 4
    NgramEmbedding._compute_vocab_mods(stand_in)
    tokens = np.random.RandomState(1).randint(0, 131072, size=9)
    context = mx.array(tokens[None].astype(np.int64))
    shifted = {i: NgramEmbedding._shift_right(stand_in, context, i - 1) for i in range(2, 5)}
    windows = np.stack([np.concatenate([np.zeros(3, np.int64), tokens])[3 + p - np.arange(4)] for p in range(9)])
    ours = spec.rows_of(windows)
    for i in range(2, 5):
        for j in range(4):
            e = (i - 2) * 4 + j
            ids = NgramEmbedding._get_ngram_ids(stand_in, context, shifted, stand_in._vocab_mods[(i, j)], ngram=i)
            assert np.array_equal(np.array(ids % spec.rows(e))[0], ours[e]), (i, j)


def test_the_ngram_parts_count(releases, monkeypatch, tmp_path):
    """Controls, each moving the logits: the n-gram tables' projections zeroed (mlx-lm's reference moves too), the
    sum not divided by 1 + k (n - 1), and every n-gram hashed without its predecessors (as if none were before)."""
    import ferrum.arch.ngram as ngram

    folder, _, want = releases["four_grams"]
    zeroed = edited_checkpoint(folder, tmp_path / "zeroed", tensors=lambda t: t.update(
        {name: np.zeros_like(v) for name, v in t.items() if ".post_projs." in name}))
    assert scaled_error(mlx_lm_logits(zeroed, TOKENS), want) > 1e-2
    assert scaled_error(float32_model(zeroed).forward_verify("z", TOKENS), mlx_lm_logits(zeroed, TOKENS)) <= 1e-4
    real_call, real_rows = ngram.NgramEmbedding.__call__, ngram.NgramSpec.rows_of
    monkeypatch.setattr(ngram.NgramEmbedding, "__call__",
                        lambda self, h, w: self.ops.mul_scalar(real_call(self, h, w), 1.0 + self.spec.tables))
    assert scaled_error(float32_model(folder).forward_verify("d", TOKENS), want) > 1e-2
    monkeypatch.setattr(ngram.NgramEmbedding, "__call__", real_call)
    monkeypatch.setattr(ngram.NgramSpec, "rows_of", lambda self, w: real_rows(self, w * (np.arange(4) == 0)))
    assert scaled_error(float32_model(folder).forward_verify("u", TOKENS), want) > 1e-2


def test_profilers_see_the_ngram_projections(releases):
    """DecoderOnlyLLM.projections lists every linear projection: the n-gram tables' (one per post_projs tensor
    stored) among them."""
    from safetensors import safe_open

    folder, _, _ = releases["four_grams"]
    with safe_open(folder / "model.safetensors", "np") as f:
        stored = [name for name in f.keys() if ".post_projs." in name]
    model = float32_model(folder)
    listed = {id(p) for p in model.projections()}
    assert len(model.ngram.projections) == len(stored) == 6
    assert {id(p) for p in model.ngram.projections} <= listed


def test_decode_after_a_prefix_cache_hit_reads_the_cached_tokens(releases, monkeypatch):
    """A sequence adopting another's cached blocks (12 tokens) decodes its next token as mlx-lm's full pass: its
    n-grams read the three cached tokens before it. Control: handed no history, the same step misses."""
    folder, _, want = releases["four_grams"]
    model = float32_model(folder, block_size=4)

    def adopted(seq_id):
        model.prefill("first", TOKENS[:12])
        model.release("first")
        match = model.kv.match_prefix(TOKENS)
        assert match.num_tokens == 12
        model.kv.adopt(seq_id, TOKENS, match)
        return model.decode(seq_id, TOKENS[12], 12)

    assert scaled_error(adopted("hit"), want[12]) <= 1e-4
    monkeypatch.setattr(model.kv, "history", lambda seq_id, count: [])
    assert scaled_error(adopted("blind"), want[12]) > 1e-3


def test_a_speculative_rollback_keeps_the_history_exact(releases):
    """Verified drafts cut back (within a block, and to a block shared with another sequence, which is recomputed),
    then continued: mlx-lm's logits."""
    folder, _, want = releases["four_grams"]
    model = float32_model(folder, block_size=4)
    model.forward_verify("s", TOKENS[:11])
    model.truncate_kv("s", 6)
    assert scaled_error(model.forward_verify("s", TOKENS[6:]), want[6:]) <= 1e-4
    model.prefill("shared", TOKENS[:9])
    match = model.kv.match_prefix(TOKENS[:9])
    model.kv.adopt("t", TOKENS, match)
    model.forward_verify("t", TOKENS[8:12])
    model.truncate_kv("t", 7)  # inside the shared second block: its first three tokens recomputed
    assert scaled_error(model.forward_verify("t", TOKENS[7:]), want[7:]) <= 1e-4


def test_a_mixed_batch_gives_each_sequence_its_own_logits(releases):
    folder, model, _ = releases["four_grams"]
    assert_a_mixed_batch_gives_each_sequence_its_own_logits(float32_model(folder, block_size=4),
                                                             MlxLmReference(model), VOCAB)


def test_engine_keeps_mlx_lm_greedy_tokens(releases):
    """Alone, staggered with chunked prefills, and under preemption (recomputed from the tokens): mlx-lm's."""
    folder, model, _ = releases["four_grams"]
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, **config), MlxLmReference(model),
                                      staggered_greedy_workload(VOCAB, count=6))


def test_engine_prefix_cache_and_speculation_keep_the_tokens(releases, monkeypatch):
    """Requests sharing a 12-token prefix after a first one finished (prefix-cache hits), and the same under
    speculation whose drafts are each the right tokens then a wrong one (so every verification cuts the K/V and
    the history back), give the tokens of an engine that caches and drafts nothing."""
    import ferrum.spec.speculator as speculator
    from ferrum.sampling import SamplingParams
    from ferrum.spec import SpeculativeConfig

    folder, _, _ = releases["four_grams"]
    rng = np.random.RandomState(5)
    prefix = [int(t) for t in rng.randint(0, VOCAB, size=12)]
    workload = [(prefix + [int(t) for t in rng.randint(0, VOCAB, size=n)], step,
                 SamplingParams(max_tokens=8, ignore_eos=True)) for n, step in ((3, 0), (2, 4), (5, 5))]
    plain = run_staggered(small_pool_engine(folder, enable_prefix_caching=False), workload)
    cached = small_pool_engine(folder)
    assert run_staggered(cached, workload) == plain
    assert cached.metrics().prefix_cache_hit_tokens > 0
    wanted = [prompt + list(plain[i]) for i, (prompt, _, _) in enumerate(workload)]

    def right_then_wrong(tokens, count, *_):
        full = next(w for w in wanted if w[:len(tokens)] == list(tokens))[len(tokens):]
        return full[:count - 1] + [(full[count - 1] + 1) % VOCAB] if len(full) >= count else full

    monkeypatch.setattr(speculator, "propose_lookup", right_then_wrong)
    speculating = small_pool_engine(folder, speculative=SpeculativeConfig(num_speculative_tokens=3))
    assert run_staggered(speculating, workload) == plain
    metrics = speculating.metrics()
    assert metrics.spec_drafted_tokens > metrics.spec_accepted_tokens > 0


def test_steps_never_feed_device_tokens(releases):
    """The n-gram hashes need every token on the host: an engine asked to overlap steps does not (its backend
    could), and a pass fed a device token is refused by name."""
    from ferrum.capabilities import ExecutorCapabilities
    from ferrum.device_tokens import DeviceToken

    folder, _, _ = releases["four_grams"]
    for backend in {"mlx", "cuda"} & set(runnable_backends()):
        engine = small_pool_engine(folder, backend, async_stepping=True)
        assert ExecutorCapabilities.from_backend(engine.model.backend).async_stepping
        assert not engine.overlaps_steps
    model = float32_model(folder)
    model.prefill("d", TOKENS[:4])
    token = DeviceToken(model.ops.from_numpy(np.array([TOKENS[4]], dtype=np.int32), None), 0, 1)
    with pytest.raises(UnsupportedFeatureError, match="async_stepping=False"):
        model.forward([ForwardItem("d", [token], 4)])
    assert scaled_error(model.decode("d", TOKENS[4], 4), mlx_lm_logits(folder, TOKENS[:5])[4]) <= 1e-4


# ------------------------------------------------------------------ config keys

@pytest.mark.parametrize("key", ["ngram_vocab_size_ratio", "emb_neighbor_num", "emb_split_num"])
def test_absent_or_null_ngram_keys_take_mlx_lms_defaults(key):
    defaults = {"ngram_vocab_size_ratio": 78, "emb_neighbor_num": 4, "emb_split_num": 4}
    field = {"ngram_vocab_size_ratio": "ratio", "emb_neighbor_num": "neighbors", "emb_split_num": "splits"}[key]
    absent = ModelConfig.from_dict({k: v for k, v in RELEASE.items() if k != key})
    null = ModelConfig.from_dict({**RELEASE, key: None})
    assert getattr(absent.arch.ngram, field) == getattr(null.arch.ngram, field) == defaults[key]


@pytest.mark.parametrize("changes, error, words", [
    ({"emb_neighbor_num": 1}, ConfigError, "'emb_neighbor_num' is 1, but an n-gram embedding spans at least 2"),
    ({"emb_split_num": 40}, ConfigError, "'emb_split_num' (40) times emb_neighbor_num - 1 (3) exceeds hidden_size"),
    ({"ngram_vocab_size_ratio": 4000, "vocab_size": 1 << 20}, ConfigError, "2^31 rows"),
    ({"emb_split_num": 0}, ConfigError, "'emb_split_num' must be a positive integer"),
    ({"oe_ignored_token_ids": [5]}, UnsupportedFeatureError, "oe_ignored_token_ids"),
])
def test_unsupported_ngram_settings_are_refused_by_name(changes, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)").replace("^", r"\^")):
        ModelConfig.from_dict({**RELEASE, **changes})


# ------------------------------------------------------------------ mlx-lm's conversions

@pytest.fixture(scope="module")
def conversions(releases, tmp_path_factory):
    """bits -> (mlx-lm's conversion of the trigram release, its stored tensors, mlx-lm's logits on it)."""
    out = {}
    for bits in (None, 4):
        folder = tmp_path_factory.mktemp(f"converted_{bits}") / "out"
        stored, want = mlx_lm_converted(releases["trigrams"][0], folder, TOKENS, bits)
        out[bits] = folder, stored, want
    return out


@pytest.mark.slow  # mlx-lm converts and packs: ~3 s
@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_conversions_run_as_mlx_lm_runs_them(conversions, releases, bits):
    """mlx-lm keeps the word embedding inside the n-gram embedding (``ngram_embeddings.word_embeddings``) and packs
    the n-gram tables and projections at 4 bits: every backend runs both as mlx-lm does."""
    folder, stored, want = conversions[bits]
    assert "model.ngram_embeddings.word_embeddings.weight" in stored and "model.embed_tokens.weight" not in stored
    assert ("model.ngram_embeddings.embedders.1.scales" in stored) == ("model.ngram_embeddings.post_projs.1.scales"
                                                                       in stored) == (bits is not None)
    assert (scaled_error(want, releases["trigrams"][2]) <= 1e-4) == (bits is None)
    assert_every_backend_runs_it_as_mlx_lm(folder, TOKENS, want, packed=bits is not None)
