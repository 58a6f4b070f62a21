"""DeepSeek-V3 (``deepseek_v3``): Multi-head Latent Attention (low-rank q, a compressed KV latent expanded per head,
rope on a slice of each head in DeepSeek's interleaved pairs, value heads narrower than q/k heads, YaRN's mscale on
the softmax scale) over DeepSeek-V3's grouped sigmoid MoE; against transformers' own model on every runnable
backend.
The checks every MoE family makes alike are tests/test_moe_families.py's."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import transformers

import ferrum
from ferrum.arch.tensors import weight_shapes
from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from ferrum.model import DecoderOnlyLLM
from support import (
    assert_forward_and_decode_match, randomized_reference, reference_logits, runnable_backends, saved_references,
    scaled_error, with_prediction_layer,
)

BACKENDS = runnable_backends()
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, 97, size=13)]
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 0.707, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0}


def dsv3_config(**extra) -> transformers.DeepseekV3Config:
    settings = dict(vocab_size=97, hidden_size=64, intermediate_size=80, moe_intermediate_size=24,
                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24,
                    kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8,
                    num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1,
                    max_position_embeddings=256, routed_scaling_factor=2.5, norm_topk_prob=True, rms_norm_eps=1e-6)
    return transformers.DeepseekV3Config(**{**settings, **extra})


#: DeepSeek-V3's layout; Moonlight's plain q_proj; YaRN with mscale_all_dim as DeepSeek-V3 and Kimi K2 ship it;
#: rotate-half rope with biases and value heads as wide as q/k heads.
VARIANTS = {
    "lora_q": {},
    "plain_q": dict(q_lora_rank=None),
    "yarn": dict(rope_parameters=YARN),
    "rotate_half": dict(rope_interleave=False, attention_bias=True, v_head_dim=24, n_group=1, topk_group=1,
                        first_k_dense_replace=2, norm_topk_prob=False, routed_scaling_factor=1.0),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """variant -> (folder, transformers model): random weights, random correction biases that change which experts
    the routers choose."""
    return saved_references(tmp_path_factory, VARIANTS, dsv3_config)


# ------------------------------------------------------------------ whole models


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_transformers(checkpoints, backend, variant):
    """A full forward and token-by-token decode, against transformers' logits."""
    folder, hf = checkpoints[variant]
    want = reference_logits(hf, TOKENS)
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    dense = VARIANTS[variant].get("first_k_dense_replace", 1)
    assert [spec.mlp for spec in model.config.arch.layers] == ["dense"] * dense + ["moe"] * (3 - dense)
    assert (model.config.head_dim, model.config.num_kv_heads) == (24, 4)
    assert_forward_and_decode_match(model, TOKENS, want)


def test_the_parity_is_sensitive_to_each_mla_setting(checkpoints):
    """The checked settings move transformers' logits here: the rope pairing, YaRN (frequencies, attention factor
    and mscale), and the latent norms' fixed epsilon is not rms_norm_eps's."""
    folder, hf = checkpoints["lora_q"]
    want = reference_logits(hf, TOKENS)
    for changes in ({"rope_interleave": False}, {"rope_parameters": YARN}):
        other = transformers.AutoModelForCausalLM.from_pretrained(folder, **changes).float().eval()
        assert scaled_error(reference_logits(other, TOKENS), want) > 1e-3, changes
    yarn_folder, yarn_hf = checkpoints["yarn"]
    plain = transformers.AutoModelForCausalLM.from_pretrained(
        yarn_folder, rope_parameters={**YARN, "mscale_all_dim": 0}).float().eval()
    assert scaled_error(reference_logits(plain, TOKENS), reference_logits(yarn_hf, TOKENS)) > 1e-3
    arch = ModelConfig.from_file(yarn_folder).arch
    assert arch.attn_scale == pytest.approx(yarn_hf.model.layers[0].self_attn.scaling)
    assert arch.attn_scale == pytest.approx(24 ** -0.5 * (0.1 * math.log(4.0) + 1) ** 2)
    assert arch.layers[0].rope.attention_factor == pytest.approx(
        (0.1 * 0.707 * math.log(4) + 1) / (0.1 * math.log(4) + 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_generates_greedily_as_transformers(checkpoints, backend):
    """Through the engine: batched with another request, the second copy of the prompt from the prefix cache, and
    each equal to a run of its own."""
    folder, hf = checkpoints["lora_q"]
    with torch.no_grad():
        want = hf.generate(torch.tensor([TOKENS]), max_new_tokens=12, do_sample=False)[0, len(TOKENS):].tolist()
    llm = ferrum.load(folder, backend=backend, dtype="float32")
    first, short, again = llm.run([TOKENS, TOKENS[:5], TOKENS], max_tokens=12, temperature=0.0, ignore_eos=True)
    assert list(first.token_ids) == want and list(again.token_ids) == want
    solo = ferrum.load(folder, backend=backend, dtype="float32")
    (alone,) = solo.run([TOKENS[:5]], max_tokens=12, temperature=0.0, ignore_eos=True)
    assert list(short.token_ids) == list(alone.token_ids)


def test_the_cache_holds_value_heads_padded_with_zeros(checkpoints):
    """Keys of qk_nope + qk_rope dims per head, values of v_head_dim zero-padded to them (exact)."""
    folder, _ = checkpoints["lora_q"]
    model = DecoderOnlyLLM.from_pretrained(folder, backend="cpu", block_size=4, dtype="float32")
    model.prefill("s", TOKENS)
    k, v = model.ops.kv_gather(model.pool, 1, model.kv.block_array("s"), len(TOKENS))
    k, v = model.ops.to_numpy(k), model.ops.to_numpy(v)
    assert k.shape == v.shape == (len(TOKENS), 4, 24)
    assert not v[..., 12:].any() and v[..., :12].any()


def test_ferrum_names_the_tensors_transformers_saves(checkpoints):
    """weight_shapes (loading, ferrum quantize, the random checkpoint writer) lists every attention tensor with the
    shape transformers saves."""
    from safetensors import safe_open

    for variant in ("lora_q", "plain_q", "rotate_half"):
        folder, _ = checkpoints[variant]
        with safe_open(str(folder / "model.safetensors"), framework="numpy") as f:
            saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        shapes = weight_shapes(ModelConfig.from_file(folder))
        attention = {n: s for n, s in shapes.items() if ".self_attn." in n}
        assert attention and all(saved[n] == s for n, s in attention.items()), variant
        assert {n for n in saved if ".self_attn." in n} == set(attention)


# ------------------------------------------------------------------ config


def _raw(**changes) -> dict:
    return {**dsv3_config().to_dict(), **changes}


@pytest.mark.parametrize("changes, error, words", [
    ({"num_key_value_heads": 2}, ConfigError, "'num_key_value_heads' is 2, but latent attention expands"),
    ({"v_head_dim": 32}, UnsupportedFeatureError, "'v_head_dim' (32) exceeds the 24 dims"),
    ({"qk_rope_head_dim": 7}, ConfigError, "'qk_rope_head_dim' is 7; Ferrum needs an even number"),
    ({"qk_nope_head_dim": 15}, ConfigError, "'qk_nope_head_dim' is 15; Ferrum needs an even number"),
    ({"kv_lora_rank": None}, ConfigError, "'kv_lora_rank' must be a positive integer"),
    ({"q_lora_rank": 0}, ConfigError, "'q_lora_rank' must be a positive integer"),
    ({"rope_interleave": "yes"}, ConfigError, "'rope_interleave' must be true or false"),
    ({"rope_parameters": {**YARN, "mscale_all_dim": "x"}}, ConfigError, "'mscale_all_dim' must be a positive number"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     UnsupportedFeatureError, "sets partial_rotary_factor 0.5"),
    ({"topk_group": 3}, ConfigError, "'topk_group' (3) exceeds the 2 expert groups"),
    ({"n_group": 3}, ConfigError, "'n_group' (3) must divide the 8 routed experts"),
    ({"num_experts_per_tok": 5}, ConfigError, "'num_experts_per_tok' (5) exceeds the 4 experts of the 1 group"),
])
def test_bad_keys_are_refused_by_name(changes, error, words):
    with pytest.raises(error, match=re.escape(words)):
        ModelConfig.from_dict(_raw(**changes))


DEEPSEEK_V3 = {  # DeepSeek-V3's config.json as deepseek-ai ships it (its quantization_config left out)
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "attention_bias": False,
    "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "moe_intermediate_size": 2048, "moe_layer_freq": 1,
    "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False,
    "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "v_head_dim": 128, "vocab_size": 129280}


def test_deepseek_v3_config_reads_as_released():
    config = ModelConfig.from_dict(json.loads(json.dumps(DEEPSEEK_V3)))
    arch = config.arch
    assert (config.head_dim, config.num_heads, config.num_kv_heads) == (192, 128, 128)
    assert [layer.mlp for layer in arch.layers[:4]] == ["dense"] * 3 + ["moe"]
    rope = arch.layers[0].rope
    assert (rope.kind, rope.rotary_dim, rope.head_dim, rope.factor, rope.original_max) == ("yarn", 64, 192, 40, 4096)
    assert rope.interleaved and rope.attention_factor == 1.0
    assert arch.attn_scale == pytest.approx(192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2)
    mla = arch.mla
    assert (mla.q_lora_rank, mla.kv_lora_rank, mla.nope, mla.rope, mla.v_head_dim) == (1536, 512, 128, 64, 128)
    moe = arch.moe
    assert (moe.num_experts, moe.top_k, moe.expert_size, moe.shared_expert_size) == (256, 8, 2048, 2048)
    assert (moe.routing, moe.n_group, moe.topk_group, moe.routed_scale, moe.normalize) == (
        "sigmoid_grouped", 8, 4, 2.5, True)


def test_moonlight_and_kimi_k2_configs_read_as_released():
    """Moonlight-16B-A3B: a plain q_proj, no rope scaling; Kimi K2: 64 heads, one expert group, YaRN factor 32."""
    moonlight = ModelConfig.from_dict({**DEEPSEEK_V3, "q_lora_rank": None, "hidden_size": 2048, "intermediate_size":
                                       11264, "moe_intermediate_size": 1408, "num_attention_heads": 16,
                                       "num_key_value_heads": 16, "num_hidden_layers": 27, "n_routed_experts": 64,
                                       "n_shared_experts": 2, "n_group": 1, "topk_group": 1, "num_experts_per_tok": 6,
                                       "first_k_dense_replace": 1, "rope_scaling": None, "rope_theta": 50000.0,
                                       "max_position_embeddings": 8192, "routed_scaling_factor": 2.446,
                                       "vocab_size": 163840})
    assert moonlight.arch.mla.q_lora_rank is None and moonlight.arch.attn_scale == pytest.approx(192 ** -0.5)
    assert moonlight.arch.moe.shared_expert_size == 2816
    kimi = ModelConfig.from_dict({**DEEPSEEK_V3, "num_attention_heads": 64, "num_key_value_heads": 64,
                                  "n_routed_experts": 384, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
                                  "routed_scaling_factor": 2.827, "rope_theta": 50000.0, "vocab_size": 163840,
                                  "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0,
                                                   "mscale": 1.0, "mscale_all_dim": 1.0,
                                                   "original_max_position_embeddings": 4096, "type": "yarn"}})
    assert (kimi.num_heads, kimi.head_dim, kimi.arch.moe.num_experts) == (64, 192, 384)
    assert kimi.arch.attn_scale == pytest.approx(192 ** -0.5 * (0.1 * math.log(32) + 1) ** 2)


def test_the_prediction_layer_is_left_out_quietly(checkpoints, tmp_path):
    """DeepSeek-V3's releases store the multi-token prediction layer as layer 61: not run, not reported unread."""
    import warnings

    folder, model = checkpoints["lora_q"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llm = ferrum.load(with_prediction_layer(folder, tmp_path / "mtp", 1), backend="cpu")
    assert scaled_error(llm.model.forward_verify("mtp", TOKENS), reference_logits(model, TOKENS)) < 1e-4


# ------------------------------------------------------------------ mlx-lm's conversions


@pytest.fixture(scope="module")
def mlx_lm_conversions(tmp_path_factory):
    """A DeepSeek-V3 whose kv_b_proj halves mlx-lm packs at group size 32 (nope and kv_lora_rank 32 wide), and mlx-lm's
    float and 4-bit conversions of it (kv_b_proj split into embed_q and unembed_out): (folder, model, {bits: out})."""
    convert = pytest.importorskip("mlx_lm.convert")
    from support import write_tokenizer

    source = tmp_path_factory.mktemp("mlx_source")
    model = randomized_reference(dsv3_config(qk_nope_head_dim=32, kv_lora_rank=32, q_lora_rank=32, v_head_dim=16,
                                    moe_intermediate_size=32, intermediate_size=96))
    model.save_pretrained(source)
    write_tokenizer(source, 120)
    config = json.loads((source / "config.json").read_text())
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]  # the spelling mlx-lm reads
    (source / "config.json").write_text(json.dumps(config))
    converted = {}
    for bits in (None, 4):
        converted[bits] = tmp_path_factory.mktemp(f"mlx_{bits}") / "out"
        convert.convert(str(source), str(converted[bits]), quantize=bits is not None, q_bits=bits or 4,
                        q_group_size=32, dtype="float32")
    return source, model, converted


def _mlx_lm_run(folder, tokens: list[int], new: int) -> tuple[np.ndarray, list[int]]:
    """mlx-lm's logits over ``tokens`` and its greedy continuation of ``new`` tokens."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    model = load_model(folder)[0]
    cache = make_prompt_cache(model)
    logits = model(mx.array([tokens]), cache=cache)
    full, greedy = np.array(logits.astype(mx.float32))[0], []
    for _ in range(new):
        greedy.append(int(mx.argmax(logits[0, -1])))
        logits = model(mx.array([greedy[-1:]]), cache=cache)
    return full, greedy


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mlx_lm_conversions_run_as_mlx_lm_runs_them(mlx_lm_conversions, backend, bits):
    """mlx-lm's conversions, float or packed (embed_q and unembed_out 4-bit along their own last axes), joined back
    into kv_b_proj: mlx-lm's logits and greedy tokens, and, float, those of the original checkpoint."""
    from safetensors import safe_open

    source, hf, converted = mlx_lm_conversions
    folder = converted[bits]
    with safe_open(str(folder / "model.safetensors"), framework="numpy") as f:
        names = set(f.keys())
    assert "model.layers.1.self_attn.embed_q.weight" in names and not any("kv_b_proj" in n for n in names)
    assert ("model.layers.1.self_attn.embed_q.scales" in names) == (bits is not None)
    assert ("model.layers.1.self_attn.unembed_out.scales" in names) == (bits is not None)
    want, greedy = _mlx_lm_run(folder, TOKENS, 12)
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    assert_forward_and_decode_match(model, TOKENS, want)
    (out,) = ferrum.load(folder, backend=backend, dtype="float32").run([TOKENS], max_tokens=12, temperature=0.0,
                                                                      ignore_eos=True)
    assert list(out.token_ids) == greedy
    original = reference_logits(hf, TOKENS)
    assert (scaled_error(want, original) < 1e-4) == (bits is None)  # 4 bits move the logits


@pytest.mark.parametrize("backend", BACKENDS)
def test_ferrum_quantize_keeps_kv_b_proj_float_so_mlx_lm_runs_what_ferrum_runs(mlx_lm_conversions, backend, tmp_path):
    """mlx-lm splits a packed kv_b_proj per head and packs the halves again along other axes (rounding twice, or
    failing where qk_nope_head_dim is no multiple of the group): `ferrum quantize` leaves it in float, and mlx-lm's
    logits on the folder are Ferrum's."""
    from ferrum.quant.convert import quantize_checkpoint

    out = quantize_checkpoint(mlx_lm_conversions[0], tmp_path / "q", bits=4, group_size=32)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["model.layers.0.self_attn.kv_b_proj"] is False
    assert config["quantization"].get("model.layers.0.self_attn.q_b_proj") is None  # the others packed
    got = DecoderOnlyLLM.from_pretrained(out, backend=backend, dtype="float32").forward_verify("x", TOKENS)
    assert scaled_error(got, _mlx_lm_run(out, TOKENS, 0)[0]) < 1e-5


def test_ferrum_quantize_refuses_mlx_lms_split_by_name(mlx_lm_conversions, tmp_path):
    """`ferrum quantize` reads kv_b_proj whole: mlx-lm's split is named, not reported as missing tensors."""
    from ferrum.quant.convert import quantize_checkpoint

    with pytest.raises(UnsupportedFeatureError, match="split into embed_q and unembed_out, as mlx-lm converts"):
        quantize_checkpoint(mlx_lm_conversions[2][None], tmp_path / "q", bits=4, group_size=32)
