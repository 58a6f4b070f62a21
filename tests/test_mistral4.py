"""Mistral Small 4 (``mistral4``): DeepSeek-V3's Multi-head Latent Attention with Llama 4's attention scaling of the
queries (Ministral 3's), over softmax routing grouped as DeepSeek-V3 groups (a group's two best probabilities summed,
nothing corrected), an ungated shared expert, experts stored fused as transformers 5 saves them; against
transformers' own model on every runnable backend, alone and inside its Mistral3 wrapper, and mlx-lm's conversions.
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
from ferrum.backends import load_backend
from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from ferrum.model import DecoderOnlyLLM
from support import assert_forward_and_decode_match, reference_logits, runnable_backends, scaled_error, write_tokenizer

BACKENDS = runnable_backends()
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, 97, size=13)]
#: YaRN with mscale_all_dim, and Llama 4's scaling from position 4 on (the release's starts at 8192), so that the
#: 13 tokens cross three of its steps.
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 0.707, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4, "beta_fast": 32.0, "beta_slow": 1.0, "llama_4_scaling_beta": 0.3}


def m4_config(**extra) -> transformers.Mistral4Config:
    settings = dict(vocab_size=97, hidden_size=64, intermediate_size=80, moe_intermediate_size=24,
                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24,
                    kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8,
                    num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1,
                    max_position_embeddings=256, routed_scaling_factor=1.5, norm_topk_prob=True, rms_norm_eps=1e-6,
                    rope_parameters=dict(YARN))
    return transformers.Mistral4Config(**{**settings, **extra})


def randomized(config) -> transformers.Mistral4ForCausalLM:
    """A float32 Mistral4ForCausalLM in eval mode, every parameter from N(0, 0.2) (transformers' auto classes do not
    map mistral4 to a causal LM: its own class)."""
    torch.manual_seed(0)
    model = transformers.Mistral4ForCausalLM(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


#: The release's layout (low-rank q, interleaved rope, two groups of which one is kept, a dense first layer); a plain
#: q_proj with rotate-half rope, biases, value heads as wide as q/k heads, one group unscaled and unnormalized (the
#: plain softmax rule), two shared experts and no dense layer.
VARIANTS = {
    "small4": {},
    "plain_q": dict(q_lora_rank=None, rope_interleave=False, attention_bias=True, v_head_dim=24, n_group=1,
                    topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0, n_shared_experts=2,
                    first_k_dense_replace=0),
}
DENSE = {"small4": 1, "plain_q": 0}


def build_checkpoints(tmp_path_factory) -> dict:
    """variant -> (folder, transformers model), saved with save_pretrained."""
    out = {}
    for variant, extra in VARIANTS.items():
        folder = tmp_path_factory.mktemp(variant)
        model = randomized(m4_config(**extra))
        model.save_pretrained(folder)
        out[variant] = folder, model
    return out


def _reload(folder, **changes):
    return transformers.Mistral4ForCausalLM.from_pretrained(folder, **changes).float().eval()


# ------------------------------------------------------------------ whole models


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_transformers(checkpoints, backend, variant):
    """A full forward and token-by-token decode, against transformers' logits."""
    folder, hf = checkpoints[variant]
    want = reference_logits(hf, TOKENS)
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    dense = DENSE[variant]
    assert [spec.mlp for spec in model.config.arch.layers] == ["dense"] * dense + ["moe"] * (3 - dense)
    assert (model.config.head_dim, model.config.num_kv_heads) == (24, 4)
    assert_forward_and_decode_match(model, TOKENS, want)


def test_the_parity_is_sensitive_to_each_setting(checkpoints):
    """The checked settings move transformers' logits here: Llama 4's query scaling, the expert groups, the rope
    pairing, and YaRN's mscale on the softmax scale."""
    folder, hf = checkpoints["small4"]
    want = reference_logits(hf, TOKENS)
    rope = dict(hf.config.rope_parameters)  # with the partial_rotary_factor its config class adds
    for changes in ({"rope_parameters": {**rope, "llama_4_scaling_beta": 0.0}}, {"n_group": 1, "topk_group": 1},
                    {"rope_interleave": False}, {"rope_parameters": {**rope, "mscale_all_dim": 0}}):
        assert scaled_error(reference_logits(_reload(folder, **changes), TOKENS), want) > 1e-3, changes
    arch = ModelConfig.from_file(folder).arch
    assert arch.query_scaling == (0.3, 4)
    assert arch.attn_scale == pytest.approx(hf.model.layers[0].self_attn.scaling)
    assert arch.attn_scale == pytest.approx(24 ** -0.5 * (0.1 * math.log(4.0) + 1) ** 2)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if "bfloat16" in load_backend(b).info.dtypes])
def test_the_router_runs_in_the_compute_dtype(checkpoints, backend):
    """transformers keeps nothing of Mistral 4's router in float32 (its _keep_in_fp32_modules_strict is empty): nor
    does Ferrum, where DeepSeek-V3's router stays float32."""
    folder, _ = checkpoints["small4"]
    arch = ModelConfig.from_file(folder).arch
    assert not arch.moe.router_float32 and not arch.keep_float32
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, dtype="bfloat16")
    assert model.layers[1].mlp.router_dtype is None


def test_transformers_saves_the_experts_fused(checkpoints):
    """Which tests/test_moe_families.py's check that Ferrum names every saved tensor then covers: the experts as the
    stacks Ferrum assembles from transformers' fused ones."""
    from safetensors import safe_open

    for variant in VARIANTS:
        folder, _ = checkpoints[variant]
        with safe_open(str(folder / "model.safetensors"), framework="numpy") as f:
            names = set(f.keys())
        assert "model.layers.1.mlp.experts.gate_up_proj" in names  # fused, outputs first: [E, 2 * inter, hidden]


# ------------------------------------------------------------------ the Mistral3 wrapper


@pytest.fixture(scope="module")
def wrapped(tmp_path_factory):
    """Mistral Small 4 as released: the text model of a Mistral3ForConditionalGeneration (a tiny Pixtral vision
    tower), saved by transformers 5 (``model.language_model.*``)."""
    config = transformers.Mistral3Config(
        text_config=m4_config().to_dict(),
        vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=16, image_size=32, patch_size=16),
        spatial_merge_size=1)
    torch.manual_seed(0)
    model = transformers.Mistral3ForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    folder = tmp_path_factory.mktemp("wrapped")
    model.save_pretrained(folder)
    return folder, model


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_wrapped_text_model_matches_transformers(wrapped, backend):
    folder, hf = wrapped
    assert json.loads((folder / "config.json").read_text())["text_config"]["model_type"] == "mistral4"
    with torch.no_grad():
        want = hf(input_ids=torch.tensor([TOKENS])).logits[0].float().numpy()
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    assert model.config.model_type == "mistral4" and model.config.arch.query_scaling == (0.3, 4)
    assert_forward_and_decode_match(model, TOKENS, want)


# ------------------------------------------------------------------ config


def _raw(**changes) -> dict:
    return {**m4_config().to_dict(), **changes}


@pytest.mark.parametrize("changes, error, words", [
    ({"num_key_value_heads": 2}, ConfigError, "'num_key_value_heads' is 2, but latent attention expands"),
    ({"v_head_dim": 32}, UnsupportedFeatureError, "'v_head_dim' (32) exceeds the 24 dims"),
    ({"qk_rope_head_dim": 7}, ConfigError, "'qk_rope_head_dim' is 7; Ferrum needs an even number"),
    ({"rope_parameters": {**YARN, "partial_rotary_factor": 0.5}}, ConfigError,
     "sets partial_rotary_factor 0.5; transformers then rotates int(24 * factor) dims"),
    ({"rope_parameters": {**YARN, "partial_rotary_factor": "half"}}, ConfigError, "sets partial_rotary_factor 'half'"),
    ({"rope_parameters": {**YARN, "llama_4_scaling_beta": -1}}, ConfigError,
     "field 'llama_4_scaling_beta' must be a positive number"),
    ({"rope_parameters": {**YARN, "original_max_position_embeddings": None}}, ConfigError,
     "field 'original_max_position_embeddings' must be a positive integer"),
    ({"rope_interleave": "yes"}, ConfigError, "'rope_interleave' must be true or false"),
    ({"topk_group": 3}, ConfigError, "'topk_group' (3) exceeds the 2 expert groups"),
    ({"n_group": 3}, ConfigError, "'n_group' (3) must divide the 8 routed experts"),
    ({"n_group": 8, "topk_group": 4}, ConfigError, "'n_group' (8) leaves 1 expert per group"),
    ({"num_experts_per_tok": 5}, ConfigError, "'num_experts_per_tok' (5) exceeds the 4 experts of the 1 group"),
    ({"first_k_dense_replace": -1}, ConfigError, "'first_k_dense_replace' must be a non-negative integer"),
    ({"hidden_act": "gelu"}, UnsupportedFeatureError, "'hidden_act'"),
])
def test_bad_keys_are_refused_by_name(changes, error, words):
    with pytest.raises(error, match=re.escape(words)):
        ModelConfig.from_dict(_raw(**changes))


def test_mistral_small_4_config_reads_as_transformers_reads_it():
    """Mistral4Config's defaults are Mistral-Small-4-119B-2603's: 36 sparse layers of 128 experts (4 chosen, one
    group), one shared expert, q_lora 1024, kv_lora 256, 64 + 64 q/k dims, YaRN x128 from 8192 with Llama 4's
    scaling from there, written as its config class writes them (partial_rotary_factor 0.5 in the rope settings)."""
    raw = json.loads(json.dumps({**transformers.Mistral4Config().to_dict(), "architectures": ["Mistral4ForCausalLM"]}))
    assert raw["rope_parameters"]["partial_rotary_factor"] == 0.5
    config = ModelConfig.from_dict(raw)
    arch = config.arch
    assert (config.head_dim, config.num_heads, config.num_kv_heads, config.num_layers) == (128, 32, 32, 36)
    assert all(layer.mlp == "moe" for layer in arch.layers) and arch.query_scaling == (0.1, 8192)
    rope = arch.layers[0].rope
    assert (rope.kind, rope.rotary_dim, rope.factor, rope.original_max, rope.interleaved) == ("yarn", 64, 128, 8192,
                                                                                            True)
    assert rope.attention_factor == 1.0
    assert arch.attn_scale == pytest.approx(128 ** -0.5 * (0.1 * math.log(128) + 1) ** 2)
    mla = arch.mla
    assert (mla.q_lora_rank, mla.kv_lora_rank, mla.nope, mla.rope, mla.v_head_dim) == (1024, 256, 64, 64, 128)
    moe = arch.moe
    assert (moe.num_experts, moe.top_k, moe.expert_size, moe.shared_expert_size, moe.normalize) == (
        128, 4, 2048, 2048, True)
    assert (moe.routing, moe.layout, moe.router_float32) == ("softmax", "fused_outputs_first", False)  # one group
    defaults = ModelConfig.from_dict({key: raw[key] for key in (
        "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
        "max_position_embeddings")})
    assert (defaults.arch.mla, defaults.arch.moe, defaults.arch.query_scaling) == (mla, moe, (0.1, 8192))
    assert defaults.arch.layers[0].rope == rope
    grouped = ModelConfig.from_dict({**raw, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.0}).arch.moe
    assert (grouped.routing, grouped.n_group, grouped.topk_group, grouped.routed_scale) == (
        "softmax_top2_grouped", 4, 2, 2.0)


# ------------------------------------------------------------------ mlx-lm's conversions


@pytest.fixture(scope="module")
def mlx_lm_conversions(tmp_path_factory):
    """A Mistral 4 whose kv_b_proj halves mlx-lm packs at group size 32, its hidden size twice its experts' width
    as the release's (so only the family's layout tells which way the fused stacks lie), and mlx-lm's float and 4-bit
    conversions of it (kv_b_proj split into embed_q and unembed_out, the fused experts into switch_mlp stacks):
    (folder, model, {bits: out})."""
    convert = pytest.importorskip("mlx_lm.convert")
    source = tmp_path_factory.mktemp("mlx_source")
    model = randomized(m4_config(qk_nope_head_dim=32, kv_lora_rank=32, q_lora_rank=32, v_head_dim=16,
                                 moe_intermediate_size=32, intermediate_size=96))
    model.save_pretrained(source)
    write_tokenizer(source, 120)
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
    """mlx-lm's conversions, float or packed (the router too; embed_q and unembed_out packed along their own last
    axes), kv_b_proj joined back: mlx-lm's logits and greedy tokens, and, float, those of the original checkpoint."""
    from safetensors import safe_open

    source, hf, converted = mlx_lm_conversions
    folder = converted[bits]
    with safe_open(str(folder / "model.safetensors"), framework="numpy") as f:
        names = set(f.keys())
    assert "model.layers.1.self_attn.embed_q.weight" in names and not any("kv_b_proj" in n for n in names)
    assert "model.layers.1.mlp.switch_mlp.gate_proj.weight" in names
    assert ("model.layers.1.mlp.gate.scales" in names) == (bits is not None)
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
    """`ferrum quantize` of the transformers checkpoint leaves kv_b_proj in float and packs the router as mlx-lm
    does (a plain linear layer in its Mistral 4): mlx-lm's logits on the folder are Ferrum's."""
    from ferrum.quant.convert import quantize_checkpoint

    out = quantize_checkpoint(mlx_lm_conversions[0], tmp_path / "q", bits=4, group_size=32)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["model.layers.0.self_attn.kv_b_proj"] is False
    assert config["quantization"].get("model.layers.1.mlp.gate") is None  # packed as the others
    got = DecoderOnlyLLM.from_pretrained(out, backend=backend, dtype="float32").forward_verify("x", TOKENS)
    assert scaled_error(got, _mlx_lm_run(out, TOKENS, 0)[0]) < 1e-5
