"""ALiBi (BLOOM, MPT) against transformers 5.24 on tiny random checkpoints, on every backend here and the JAX plugin,
through the engine (staggered batches, chunked prefills, preemption, prefix caching: positions matter there),
plus the plugin contract: an older plugin is refused by name, and the kit catches a wrong op.

Bounds: max |diff| <= 1e-4 * max(1, max |logit|) in float32, as tests/test_families.py. Each family's control runs
it without slopes, or with the heads' slopes reversed, and must miss by far more.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from ferrum.arch.alibi import alibi_slopes
from ferrum.config import ModelConfig
from ferrum.engine import Engine, EngineConfig
from ferrum.errors import UnsupportedFeatureError
from ferrum.executor import LlmExecutor
from ferrum.model import DecoderOnlyLLM

from support import (
    assert_engine_keeps_greedy_tokens, assert_forward_and_decode_match, assert_generates_greedily_as_transformers,
    assert_names_the_tensors_transformers_saves, built_checkpoints, cpu_like_plugin, reference_logits,
    runnable_backends, scaled_error, staggered_greedy_workload,
)

VOCAB = 300  # write_tokenizer's tokens all have rows


def _backends() -> list[str]:
    """The built-in backends that run here, and the JAX plugin where it is installed."""
    from ferrum import backends

    return [e.name for e in backends.available() if e.available and e.name in ("cpu", "mlx", "cuda", "jax")]


BACKENDS = _backends()
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]


def _config(name: str):
    import transformers

    if name == "bloom":  # four heads: BLOOM's and MPT's slopes agree
        return transformers.BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4, bos_token_id=1,
                                        eos_token_id=2)
    if name == "bloom_six_heads":  # past the power of two: BLOOM's extra slopes
        return transformers.BloomConfig(vocab_size=VOCAB, hidden_size=96, n_layer=2, n_head=6, bos_token_id=1,
                                        eos_token_id=2)
    if name == "mpt":
        return transformers.MptConfig(vocab_size=VOCAB, d_model=64, n_heads=4, n_layers=2, max_seq_len=64)
    if name == "mpt_six_heads_clipped":  # MPT's own slopes for six heads, q/k/v clipped, its own scale
        return transformers.MptConfig(vocab_size=VOCAB, d_model=96, n_heads=6, n_layers=2, max_seq_len=64,
                                      attn_config={"clip_qkv": 0.6, "softmax_scale": 0.3})
    raise ValueError(name)


FAMILIES = ("bloom", "bloom_six_heads", "mpt", "mpt_six_heads_clipped")
#: Without what makes each one run: no slopes, or each head given another's (the slopes' order).
DROPPED = {
    "bloom": None,
    "mpt": None,
    "bloom_six_heads": alibi_slopes(6)[::-1],
    "mpt_six_heads_clipped": alibi_slopes(6)[::-1],
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return built_checkpoints(tmp_path_factory, {name: (lambda n=name: _config(n)) for name in FAMILIES}, VOCAB)


def _load(folder, backend: str = "cpu", **options) -> DecoderOnlyLLM:
    return DecoderOnlyLLM.from_pretrained(folder, backend=backend, dtype="float32", block_size=4, **options)


def test_the_slopes_are_transformers():
    import torch
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    for heads in (1, 4, 6, 12, 16, 20):
        bloom = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), heads, torch.float32)[:, 0, 1]
        mpt = build_mpt_alibi_tensor(heads, 2, 8)[:, 0, 0] * -1
        assert np.allclose(alibi_slopes(heads), bloom.numpy(), rtol=1e-6)
        assert np.allclose(alibi_slopes(heads), mpt.numpy(), rtol=1e-6)


def _numpy_framework():
    from ferrum.recurrent.batched import Framework

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    return Framework(np, np.asarray, lambda x, dtype: x.astype(dtype), softmax=softmax)


@pytest.mark.parametrize("window", [None, 5], ids=["causal", "window"])
def test_the_shared_formulation_in_numpy_chunks_as_the_numpy_backend_attends(window):
    """``ferrum.arch.alibi.attend`` (torch's and MLX's ALiBi), here over numpy, against the numpy backend's own
    attention: queries four at a time (chunks starting past the first key), two query heads per key head."""
    import ferrum_cpu.ops as cpu_ops

    from ferrum.arch.alibi import attend

    numpy = _numpy_framework()
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in ((10, 6, 8), (13, 3, 8), (13, 3, 8)))
    slopes = np.asarray(alibi_slopes(6), np.float32)
    want = cpu_ops.attention(q, k, v, 0.3, window, alibi_slopes=slopes)
    np.testing.assert_allclose(attend(numpy, q, k, v, 0.3, window, slopes, 4), want, rtol=1e-5, atol=1e-6)


#: (query tokens, keys) of each item of the batches below: decode steps over 9, 3 and 14 keys and prefill chunks,
#: one from position 0 and one after 9 cached positions, interleaved, so that each padded call pads its queries or
#: its keys and the calls' rows are put back in token order; and the decode steps alone (on the backends, attended
#: over their KV mirrors).
MIXED = {"mixed": [(1, 9), (4, 4), (1, 3), (2, 11), (1, 14)], "decoding": [(1, 9), (1, 3), (1, 14)]}


@pytest.mark.parametrize("kind", MIXED)
@pytest.mark.parametrize("window", [None, 5], ids=["causal", "window"])
@pytest.mark.parametrize("backend", ["numpy"] + [b for b in BACKENDS if b in ("mlx", "cuda")])
def test_batches_of_mixed_lengths_attend_as_item_by_item(backend, window, kind):
    """``ferrum.arch.alibi.paged_attend`` (torch's and MLX's ``paged_attention`` with ALiBi) over items of mixed
    query and key lengths in shuffled blocks, against the float64 oracle one item at a time and, on the backends,
    against the core's item-by-item composition of their own ops. A key, mask or query position misaligned by
    the padding sees other keys and misses by far more than the bound."""
    from ferrum import reference_ops
    from ferrum.arch.alibi import paged_attend
    from ferrum.attention import AttentionBatch
    from ferrum.testing.arch_oracle import attention

    items = MIXED[kind]
    block, kv_heads, heads, d, scale = 4, 3, 6, 8, 0.3
    rng = np.random.default_rng(1)
    q_lens, kv_lens = (np.array(x) for x in zip(*items))
    blocks = -(-kv_lens // block)
    tables = np.zeros((len(items), blocks.max()), dtype=np.int32)
    for item, ids in enumerate(np.split(rng.permutation(blocks.sum()), np.cumsum(blocks)[:-1])):
        tables[item, : len(ids)] = ids
    k_pool, v_pool = (rng.standard_normal((blocks.sum() * block, kv_heads, d)).astype(np.float32) for _ in range(2))
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    positions = np.concatenate([np.arange(n - m, n) for m, n in items]).astype(np.int32)
    slots = [tables[i, p // block] * block + p % block for i, (m, n) in enumerate(items) for p in [np.arange(n)]]
    batch = AttentionBatch(positions, np.concatenate([s[n - m:] for s, (m, n) in zip(slots, items)]), cu,
                           kv_lens.astype(np.int32), tables, block)
    q = rng.standard_normal((cu[-1], heads, d)).astype(np.float32)
    slopes = np.asarray(alibi_slopes(heads), np.float32)
    want = np.concatenate([attention(q[cu[i]:cu[i + 1]], k_pool[s], v_pool[s], scale, window, None, None, slopes)
                           for i, s in enumerate(slots)])
    if backend == "numpy":
        got = paged_attend(_numpy_framework(), q, k_pool, v_pool, batch, scale, window, slopes, 2)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        return
    ops = __import__({"mlx": "ferrum_mlx", "cuda": "ferrum_cuda"}[backend] + ".ops", fromlist=["ops"])
    pool = ops.kv_alloc(1, 64, block, kv_heads, d, "float32")  # room for the mirrors
    put = lambda a: ops.from_numpy(a, "float32")  # noqa: E731
    ops.kv_write(pool, 0, put(k_pool), put(v_pool), ops.from_numpy(np.arange(len(k_pool), dtype=np.int32), None))
    batch.prepared = ops.prepare_attention_batch(batch)
    got = np.asarray(ops.to_numpy(ops.paged_attention(put(q), pool, 0, batch, scale, window, None, None, put(slopes))))
    item_by_item = reference_ops.paged_attention(ops, put(q), pool, 0, batch, scale, window, None, None, put(slopes))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, np.asarray(ops.to_numpy(item_by_item)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_transformers_in_one_pass_and_stepwise(checkpoints, family, backend):
    folder, hf = checkpoints[family]
    assert_forward_and_decode_match(_load(folder, backend), TOKENS, reference_logits(hf, TOKENS))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_conformance_kits_oracle_matches_transformers(checkpoints, family):
    from ferrum.testing.arch_oracle import ArchOracle

    folder, hf = checkpoints[family]
    assert scaled_error(ArchOracle(folder).logits(TOKENS), reference_logits(hf, TOKENS)) <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_lists_the_tensors_transformers_saves(checkpoints, family):
    assert_names_the_tensors_transformers_saves(checkpoints[family][0])


@pytest.mark.parametrize("family", FAMILIES)
def test_other_slopes_miss_transformers(checkpoints, family, monkeypatch):
    folder, hf = checkpoints[family]
    read = ModelConfig.from_file

    def without(path):
        config = read(path)
        return replace(config, arch=replace(config.arch, alibi_slopes=DROPPED[family]))

    monkeypatch.setattr(ModelConfig, "from_file", staticmethod(without))
    assert scaled_error(_load(folder).forward_verify("x", TOKENS), reference_logits(hf, TOKENS)) > 1e-2


def _engine(folder, backend: str, **config) -> Engine:
    return Engine(LlmExecutor(_load(folder, backend, num_kv_blocks=64)), None, EngineConfig(**config))


@pytest.mark.parametrize("backend", [pytest.param(b, marks=pytest.mark.slow) if b in ("cuda", "jax") else b
                                     for b in BACKENDS])  # 15-60 s each here: torch attends item by item, JAX compiles
@pytest.mark.parametrize("family", ["bloom_six_heads", "mpt_six_heads_clipped"])
def test_engine_batching_chunking_and_preemption_keep_greedy_tokens(checkpoints, family, backend):
    folder, hf = checkpoints[family]
    assert_engine_keeps_greedy_tokens(lambda **config: _engine(folder, backend, **config), hf,
                                      staggered_greedy_workload(VOCAB))


@pytest.mark.parametrize("backend", runnable_backends())
@pytest.mark.parametrize("family", ["bloom_six_heads", "mpt_six_heads_clipped"])
def test_generates_greedily_as_transformers_from_the_prefix_cache_too(checkpoints, family, backend):
    folder, hf = checkpoints[family]
    assert_generates_greedily_as_transformers(folder, hf, backend, TOKENS)


def test_a_prompt_continuing_a_cached_one_matches_transformers(checkpoints):
    """The second prompt adopts the first's cached blocks (its first 12 positions) and computes on from there."""
    import torch

    from ferrum.sampling import SamplingParams

    folder, hf = checkpoints["mpt_six_heads_clipped"]
    engine = _engine(folder, "cpu")
    longer = TOKENS + TOKENS[:7]
    for prompt in (TOKENS, longer):
        engine.add_request(prompt, SamplingParams(max_tokens=3, ignore_eos=True))
        (out,) = [o for o in engine.run_until_done() if o.finished]
    assert engine.metrics().prefix_cache_hit_tokens == 12
    with torch.no_grad():
        want = hf.generate(torch.tensor([longer]), max_new_tokens=3, do_sample=False)[0, len(longer):]
    assert list(out.token_ids) == want.tolist()


def _with(folder, tmp_path, **changes):
    copy = shutil.copytree(folder, tmp_path / "changed")
    config = json.loads((copy / "config.json").read_text())
    for key, value in changes.items():
        section, _, inner = key.partition(".")
        if inner:
            config[section] = {**config[section], inner: value}
        else:
            config[key] = value
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("family, changes, match", [
    ("mpt", {"attn_config.alibi": False}, "attn_config.alibi"),
    ("mpt", {"attn_config.alibi_bias_max": 16}, "alibi_bias_max"),
    ("mpt", {"attn_config.qk_ln": True}, "qk_ln"),
    ("mpt", {"attn_config.attn_type": "multiquery_attention"}, "attn_type"),
    ("mpt", {"expansion_ratio": 2}, "expansion_ratio"),
    ("mpt", {"no_bias": False}, "no_bias"),
    ("bloom", {"apply_residual_connection_post_layernorm": True}, "apply_residual_connection_post_layernorm"),
])
def test_refuses_what_it_does_not_run_by_name(checkpoints, tmp_path, family, changes, match):
    with pytest.raises(UnsupportedFeatureError, match=match):
        ModelConfig.from_file(_with(checkpoints[family][0], tmp_path, **changes))


def test_bloom_configs_saying_n_embed_load(checkpoints, tmp_path):
    folder, hf = checkpoints["bloom"]
    copy = shutil.copytree(folder, tmp_path / "n_embed")
    config = json.loads((copy / "config.json").read_text())
    config["n_embed"] = config.pop("hidden_size")
    (copy / "config.json").write_text(json.dumps(config))
    assert scaled_error(_load(copy).forward_verify("x", TOKENS), reference_logits(hf, TOKENS)) <= 1e-4


# ------------------------------------------------------------------ the plugin contract


def _attention_without_alibi(q, k, v, scale, sliding_window, softcap=None, sinks=None):
    import ferrum_cpu.ops as cpu_ops

    return cpu_ops.attention(q, k, v, scale, sliding_window, softcap, sinks)


def _paged_without_alibi(q, pool, layer, batch, scale, sliding_window, softcap=None, sinks=None):
    import ferrum_cpu.ops as cpu_ops

    return cpu_ops.paged_attention(q, pool, layer, batch, scale, sliding_window, softcap, sinks)


def _older(info):
    return lambda: replace(info(), api_version="1.20")


def test_a_plugin_without_alibi_or_older_than_it_is_refused_by_name(checkpoints, registered):
    from ferrum.hookspec import hookimpl
    import ferrum_cpu.ops as cpu_ops

    folder = checkpoints["bloom"][0]
    registered("noalibi", cpu_like_plugin("noalibi", extra={
        "attention": hookimpl(_attention_without_alibi), "paged_attention": hookimpl(_paged_without_alibi)}))
    with pytest.raises(UnsupportedFeatureError, match="ALiBi position biases but backend 'noalibi'.*alibi_slopes"):
        _load(folder, "noalibi")
    registered("older", cpu_like_plugin("older", extra={"backend_info": hookimpl(_older(cpu_ops.backend_info))}))
    with pytest.raises(UnsupportedFeatureError, match=r"ALiBi.*\(plugin API 1\.21\).*'older' declares API 1\.20"):
        _load(folder, "older")
    _load(checkpoints["bloom"][0], "cpu")  # the numpy backend's own


def _attention_with_slopes_turned(q, k, v, scale, sliding_window, softcap=None, sinks=None, alibi_slopes=None):
    """Biases ``slope * (query - key)``: rewards distance where ALiBi penalises it."""
    import ferrum_cpu.ops as cpu_ops

    turned = None if alibi_slopes is None else -alibi_slopes
    return cpu_ops.attention(q, k, v, scale, sliding_window, softcap, sinks, turned)


def test_the_kit_catches_slopes_turned_the_wrong_way(registered):
    from ferrum.hookspec import hookimpl
    from ferrum.testing.conformance import check_backend

    registered("turned", cpu_like_plugin("turned", omit=("paged_attention",), extra={
        "attention": hookimpl(_attention_with_slopes_turned)}))
    assert set(check_backend("turned").failed()) == {
        "attention, ALiBi", "paged_attention, ALiBi (core fallback)", "model bloom: logits and decode steps"}


@pytest.mark.parametrize("backend", runnable_backends())
@pytest.mark.parametrize("family", ["bloom", "mpt"])
def test_lora_on_every_linear_projection_gives_peft_s_merged_model(checkpoints, family, backend, tmp_path):
    """PEFT names BLOOM's and MPT's modules under transformer.h.N / transformer.blocks.N: every linear projection of
    both layers adapted (BLOOM's query_key_value, whose rows the load regroups per head, dense, dense_h_to_4h,
    dense_4h_to_h; MPT's Wqkv, out_proj, up_proj, down_proj) gives PEFT's merged model's logits."""
    from lora_checks import assert_adapter_matches_peft, make_peft

    folder, hf = checkpoints[family]
    merged = make_peft(hf, tmp_path / "lora", "all-linear", hide=False)
    assert_adapter_matches_peft(folder, tmp_path / "lora", hf, merged, 2 * 4, TOKENS, backend)
