"""Gemma 2, Gemma 3 (text) and Phi-3 / Phi-4 against transformers (the reference), mlx-lm and each other,
plus the family key table's refusals.

Tiny random checkpoints are built with transformers' own model classes (eager
attention, so Gemma 2's soft-capping is applied by the reference). Bounds are
those of tests/test_parity.py: max |diff| <= 1e-4 * max(1, max |logit|)
against transformers / mlx-lm / another backend, 2e-5 between two paths of
one backend. Measured: a few 1e-6 on every backend and family.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, FerrumError, UnsupportedFeatureError
from ferrum.model import DecoderOnlyLLM, ForwardItem

from support import cpu_like_plugin, reference_logits, runnable_backends

RUNNABLE = runnable_backends()
SAME_BACKEND_TOL = 2e-5
VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
WINDOW = 4  # shorter than the test sequences
ORIGINAL = 8  # longrope's original_max_position_embeddings: TOKENS cross it

FAMILIES = ("gemma3", "gemma2", "phi3_longrope_partial", "phi3_window")


def _longrope(half: int) -> dict:
    return {"rope_type": "longrope", "short_factor": [1.0 + 0.2 * i for i in range(half)],
            "long_factor": [1.5 + 0.7 * i for i in range(half)]}


def transformers_config(family: str):
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=96, intermediate_size=80, num_hidden_layers=3,
                  max_position_embeddings=128, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "gemma3":  # sliding layers with their own rope base, q/k norms, head_dim != hidden / heads
        # hidden 64: sqrt(64) is exact in bfloat16, to which mlx-lm rounds Gemma 3's embedding scale
        return transformers.Gemma3TextConfig(
            **{**common, "hidden_size": 64}, num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=WINDOW,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"], query_pre_attn_scalar=24,
            rope_theta=1000.0, rope_local_base_freq=50.0,
        )
    if family == "gemma2":  # both soft-caps low enough to bite
        return transformers.Gemma2Config(
            **common, num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=WINDOW,
            attn_logit_softcapping=3.0, final_logit_softcapping=5.0, query_pre_attn_scalar=40,
        )
    if family == "phi3_longrope_partial":  # Phi-4-mini style: partial rotary, tied, longrope
        return transformers.Phi3Config(
            **common, num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.5,
            tie_word_embeddings=True, original_max_position_embeddings=ORIGINAL, rope_scaling=_longrope(6),
        )
    if family == "phi3_window":  # Phi-3-mini style: MHA, untied, a sliding window
        return transformers.Phi3Config(**common, num_attention_heads=4, sliding_window=WINDOW + 1)
    raise ValueError(family)


def build(folder, config, seed: int = 0):
    """Save a random-weight transformers model of ``config``; returns it (float32, eval, eager attention)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {f: (folder, build(folder, transformers_config(f)))
            for f in FAMILIES for folder in [tmp_path_factory.mktemp(f)]}


def load(folder, backend, **kw) -> DecoderOnlyLLM:
    return DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, **kw)


def assert_parity(got: np.ndarray, ref: np.ndarray) -> float:
    bound = 1e-4 * max(1.0, float(np.abs(ref).max()))
    diff = float(np.abs(got - ref).max())
    assert diff <= bound, f"max |diff| {diff:.3g} > {bound:.3g}"
    return diff


def stepwise_reference(model, tokens, prefill: int) -> np.ndarray:
    """transformers' logits when it prefills ``prefill`` tokens, then decodes one token at a time with its cache."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([tokens[:prefill]]), use_cache=True)
        rows, cache = [out.logits[0]], out.past_key_values
        for pos in range(prefill, len(tokens)):
            out = model(torch.tensor([[tokens[pos]]]), past_key_values=cache, use_cache=True,
                        position_ids=torch.tensor([[pos]]))
            rows.append(out.logits[0])
            cache = out.past_key_values
    return torch.cat(rows).numpy()


def reference_for(family, model, tokens) -> np.ndarray:
    """Longrope switches per token position in Ferrum: its reference is transformers decoding token by token
    from the original length on (see ferrum.arch.rope); every other family's is one forward."""
    if family.startswith("phi3_longrope") and len(tokens) > ORIGINAL:
        return stepwise_reference(model, tokens, ORIGINAL)
    return reference_logits(model, tokens)


# ------------------------------------------------------------------ parity


@pytest.mark.parametrize("backend", RUNNABLE)
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_transformers_all_positions_and_last(checkpoints, family, backend):
    folder, hf = checkpoints[family]
    ref = reference_for(family, hf, TOKENS)
    model = load(folder, backend)
    assert_parity(model.forward_verify("all", TOKENS), ref)
    assert_parity(model.prefill("last", TOKENS), ref[-1])


@pytest.mark.parametrize("backend", RUNNABLE)
@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_and_stepwise_decode_past_the_window(checkpoints, family, backend):
    folder, hf = checkpoints[family]
    ref = reference_for(family, hf, TOKENS)
    model = load(folder, backend)
    assert model.unified_forward([ForwardItem("c", TOKENS[:3], 0, False)]) == {}
    model.unified_forward([ForwardItem("c", TOKENS[3:9], 3, False)])
    assert_parity(model.unified_forward([ForwardItem("c", TOKENS[9:], 9, True)])["c"], ref[-1])
    steps = [model.prefill("s", TOKENS[:2])]
    for pos in range(2, len(TOKENS)):  # 11 single-token steps: past the window and the longrope switch
        steps.append(model.decode("s", TOKENS[pos], pos))
    assert_parity(np.stack(steps), ref[1:])


@pytest.mark.parametrize("backend", RUNNABLE)
def test_longrope_is_exact_within_the_original_length(checkpoints, backend):
    folder, hf = checkpoints["phi3_longrope_partial"]
    short = TOKENS[:ORIGINAL]
    assert_parity(load(folder, backend).forward_verify("s", short), reference_logits(hf, short))


@pytest.mark.parametrize("backend", RUNNABLE)
def test_longrope_batch_mixing_both_sides_of_the_switch_equals_each_alone(checkpoints, backend):
    folder, hf = checkpoints["phi3_longrope_partial"]
    model = load(folder, backend)
    model.prefill("long", TOKENS[:10])
    out = model.unified_forward([ForwardItem("long", TOKENS[10:12], 10, True), ForwardItem("short", TOKENS[:5], 0, True)])
    assert_parity(out["long"], reference_for("phi3_longrope", hf, TOKENS[:12])[-1])
    assert_parity(out["short"], reference_logits(hf, TOKENS[:5])[-1])


@pytest.mark.parametrize("backend", [b for b in RUNNABLE if b != "cpu"])
@pytest.mark.parametrize("family", FAMILIES)
def test_backends_agree_with_cpu_and_greedy_tokens_match(checkpoints, family, backend):
    folder, _ = checkpoints[family]
    runs = {}
    for name in ("cpu", backend):
        model = load(folder, name)
        logits = first = model.prefill("g", TOKENS[:5])
        tokens = []
        for step in range(16):
            tokens.append(int(np.argmax(logits)))
            logits = model.decode("g", tokens[-1], 5 + step)
        runs[name] = (first, tokens)
    assert_parity(runs[backend][0], runs["cpu"][0])
    assert runs[backend][1] == runs["cpu"][1]


def _mlx_lm_config(config: dict) -> dict:
    """The transformers-4 spelling of the rope and window keys, which mlx-lm reads."""
    params = config.pop("rope_parameters", None) or {}
    if "full_attention" in params:  # Gemma 3: per attention kind
        config["rope_theta"] = params["full_attention"]["rope_theta"]
        config["rope_local_base_freq"] = params["sliding_attention"]["rope_theta"]
        config["sliding_window_pattern"] = config["layer_types"].index("full_attention") + 1
    else:
        config["rope_theta"] = params.get("rope_theta", 10000.0)
        if params.get("rope_type", "default") != "default":
            config["rope_scaling"] = {**params, "type": params["rope_type"]}
    return config


@pytest.mark.skipif("mlx" not in RUNNABLE, reason="the MLX backend cannot run here")
@pytest.mark.parametrize("family, length", [("gemma3", 13), ("gemma2", WINDOW), ("phi3_window", WINDOW + 1),
                                            ("phi3_partial", 13)])
def test_mlx_backend_matches_mlx_lm(checkpoints, family, length, tmp_path):
    """mlx-lm's Gemma 2 and Phi-3 have no sliding window, so their prompts stay within it; its longrope
    always uses the long factors, so Phi-3's partial rotary is compared without longrope."""
    import shutil

    mx = pytest.importorskip("mlx.core")
    mlx_utils = pytest.importorskip("mlx_lm.utils")
    folder = tmp_path / family
    source = "phi3_longrope_partial" if family == "phi3_partial" else family
    shutil.copytree(checkpoints[source][0], folder)
    config = json.loads((folder / "config.json").read_text())
    if family == "phi3_partial":
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    (folder / "config.json").write_text(json.dumps(_mlx_lm_config(config)))
    loaded = mlx_utils.load_model(folder)
    reference_model = loaded[0] if isinstance(loaded, tuple) else loaded
    tokens = TOKENS[:length]
    ref = np.array(reference_model(mx.array([tokens])).astype(mx.float32))[0]
    assert_parity(load(folder, "mlx").forward_verify("m", tokens), ref)


# ---------------------------------------------------------- checkpoint layouts


def test_gemma3_multimodal_checkpoint_runs_its_text_model(tmp_path):
    """A Gemma3ForConditionalGeneration checkpoint: config under text_config, weights under the wrapper."""
    import transformers

    text = transformers_config("gemma3")
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                       mm_tokens_per_image=4, image_token_index=VOCAB - 1,
                                       boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2)
    hf = build(tmp_path, config)
    names = json.loads((tmp_path / "config.json").read_text())
    assert names["model_type"] == "gemma3" and "text_config" in names
    tokens = TOKENS[:9]
    assert_parity(load(tmp_path, "cpu").forward_verify("x", tokens), reference_logits(hf, tokens))


# ---------------------------------------------------------------- engine


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_gives_the_same_tokens_alone_and_staggered(checkpoints, family):
    from ferrum.engine import Engine, EngineConfig
    from ferrum.executor import LlmExecutor
    from ferrum.sampling import SamplingParams

    from support import run_staggered
    from test_engine import run_alone

    rng = np.random.RandomState(3)
    workload = [([int(t) for t in rng.randint(3, VOCAB, size=int(rng.randint(2, 20)))], int(rng.randint(0, 6)),
                 SamplingParams(max_tokens=int(rng.randint(3, 7)), ignore_eos=True)) for _ in range(8)]
    backend = RUNNABLE[-1]

    def engine(**config):
        model = load(checkpoints[family][0], backend, num_kv_blocks=96)
        return Engine(LlmExecutor(model), None, EngineConfig(**config))

    solo_engine = engine()
    solo = [run_alone(solo_engine, prompt, params) for prompt, _, params in workload]
    batched = run_staggered(engine(max_num_batched_tokens=16, max_num_seqs=8), workload)
    assert [batched[i] for i in range(len(workload))] == solo


# ---------------------------------------------------------------- refusals


def _config(family: str, **overrides) -> dict:
    raw = transformers_config(family).to_dict()
    raw.update(overrides)
    return raw


@pytest.mark.parametrize(
    "family, overrides, error, key",
    [
        ("gemma3", {"use_bidirectional_attention": True}, UnsupportedFeatureError, "use_bidirectional_attention"),
        ("gemma3", {"attn_logit_softcapping": 50.0}, UnsupportedFeatureError, "attn_logit_softcapping"),
        ("gemma3", {"hidden_activation": "gelu"}, UnsupportedFeatureError, "hidden_activation"),
        ("gemma3", {"layer_types": ["sliding_attention"]}, ConfigError, "layer_types"),
        ("gemma3", {"sliding_window": 0}, ConfigError, "sliding_window"),
        ("gemma3", {"query_pre_attn_scalar": 0}, ConfigError, "query_pre_attn_scalar"),
        ("gemma3", {"rope_local_base_freq": -1.0, "rope_parameters": None}, ConfigError, "rope_local_base_freq"),
        ("gemma2", {"attn_logit_softcapping": -50.0}, ConfigError, "attn_logit_softcapping"),
        ("gemma2", {"final_logit_softcapping": 0}, ConfigError, "final_logit_softcapping"),
        ("gemma2", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}},
         UnsupportedFeatureError, "rope_parameters"),
        ("gemma2", {"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}}, ConfigError, "rope_theta"),
        ("phi3_window", {"hidden_act": "gelu_new"}, UnsupportedFeatureError, "hidden_act"),
        ("phi3_window", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, UnsupportedFeatureError,
         "rope_parameters"),
        ("phi3_window", {"partial_rotary_factor": 1.5, "rope_parameters": None}, ConfigError,
         "partial_rotary_factor"),
        ("phi3_longrope_partial", {"rope_parameters": {**_longrope(3), "rope_theta": 1e4}}, ConfigError,
         "short_factor"),
        ("phi3_longrope_partial", {"rope_parameters": {**_longrope(6), "long_factor": [0.0] * 6}}, ConfigError,
         "long_factor"),
        ("phi3_longrope_partial", {"rope_parameters": {**_longrope(6), "original_max_position_embeddings": None},
                                   "original_max_position_embeddings": 0}, ConfigError,
         "original_max_position_embeddings"),
    ],
)
def test_math_changing_keys_are_refused_by_name(family, overrides, error, key):
    with pytest.raises(error, match=f"'{key}'|{key}"):
        ModelConfig.from_dict(_config(family, **overrides))


@pytest.mark.parametrize(
    "raw, error, key",
    [
        (dict(model_type="llama", hidden_act="gelu"), UnsupportedFeatureError, "hidden_act"),
        (dict(model_type="llama", partial_rotary_factor=0.5), UnsupportedFeatureError, "partial_rotary_factor"),
        (dict(model_type="qwen2", use_sliding_window=True, sliding_window=-3), ConfigError, "sliding_window"),
        (dict(model_type="mistral", rope_scaling={"rope_type": "yarn", "factor": 4.0}), UnsupportedFeatureError,
         "rope_scaling"),
        (dict(model_type="qwen3", rope_theta=0), ConfigError, "rope_theta"),
        (dict(model_type="llama", rope_scaling={"rope_type": "linear", "factor": -2.0}), ConfigError, "rope_scaling"),
    ],
)
def test_existing_families_refuse_by_name_too(raw, error, key):
    sizes = dict(hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, vocab_size=97,
                 max_position_embeddings=128)
    with pytest.raises(error, match=key):
        ModelConfig.from_dict({**sizes, **raw})


def test_a_backend_without_softcapped_attention_refuses_gemma2_at_load(checkpoints, registered):
    import ferrum_cpu.ops as cpu_ops
    from ferrum.hookspec import hookimpl

    @hookimpl
    def attention(q, k, v, scale, sliding_window):
        return cpu_ops.attention(q, k, v, scale, sliding_window)

    registered("nocap", cpu_like_plugin("nocap", extra={"attention": attention}))
    with pytest.raises(UnsupportedFeatureError, match="soft-capping.*softcap"):
        load(checkpoints["gemma2"][0], "nocap")
    load(checkpoints["gemma3"][0], "nocap")  # no soft-capping: runs


def test_new_ops_fall_back_to_the_reference_on_a_plugin_without_them(checkpoints, registered):
    """A third-party plugin that predates gelu_tanh_mul / mul_scalar / softcap still runs Gemma (core fallbacks)."""
    registered("lean", cpu_like_plugin("lean", omit=("gelu_tanh_mul", "mul_scalar", "softcap", "paged_attention")))
    folder, hf = checkpoints["gemma2"]
    assert_parity(load(folder, "lean").forward_verify("x", TOKENS), reference_logits(hf, TOKENS))


# ------------------------------------------------------ property: random configs


def test_random_valid_configs_match_transformers_or_are_refused_by_name(tmp_path_factory):
    """Draw configs per family; Ferrum either refuses naming a config key or matches transformers."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    import transformers

    @st.composite
    def configs(draw):
        family = draw(st.sampled_from(["gemma2", "gemma3_text", "phi3"]))
        heads = draw(st.sampled_from([2, 4]))
        kv = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0]))
        head_dim = draw(st.sampled_from([8, 16, 24]))
        layers = draw(st.integers(1, 3))
        common = dict(vocab_size=VOCAB, hidden_size=heads * head_dim, intermediate_size=draw(st.integers(8, 40)),
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                      max_position_embeddings=64, rms_norm_eps=draw(st.sampled_from([1e-6, 1e-5])),
                      pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=draw(st.booleans()))
        window = draw(st.integers(1, 12))
        if family == "phi3":
            factor = draw(st.sampled_from([1.0, 0.5, 0.75, 0.25]))
            extra = dict(partial_rotary_factor=factor, sliding_window=draw(st.sampled_from([None, window])),
                         rope_theta=draw(st.sampled_from([100.0, 10000.0])))
            rotary = int(head_dim * factor)
            if draw(st.booleans()) and rotary % 2 == 0:
                extra.update(original_max_position_embeddings=32, rope_scaling=_longrope(rotary // 2))
            return family, transformers.Phi3Config(**common, **extra)
        types = draw(st.lists(st.sampled_from(["sliding_attention", "full_attention"]), min_size=layers,
                              max_size=layers))
        extra = dict(head_dim=head_dim, sliding_window=window, layer_types=types,
                     query_pre_attn_scalar=draw(st.sampled_from([head_dim, 16, 100])),
                     attn_logit_softcapping=draw(st.sampled_from([None, 2.0, 20.0])),
                     final_logit_softcapping=draw(st.sampled_from([None, 3.0])))
        if family == "gemma2":
            return family, transformers.Gemma2Config(**common, **extra)
        return family, transformers.Gemma3TextConfig(**common, **extra, rope_local_base_freq=draw(
            st.sampled_from([10.0, 10000.0])))

    @hypothesis.settings(max_examples=8, deadline=None, database=None, derandomize=True,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(configs(), st.integers(0, 2**16))
    def check(drawn, seed):
        family, config = drawn
        folder = tmp_path_factory.mktemp(family)
        hf = build(folder, config, seed=seed % 1000)
        tokens = [int(t) for t in np.random.RandomState(seed).randint(0, VOCAB, size=20)]
        try:
            model = load(folder, "cpu")
        except FerrumError as exc:
            assert "'" in str(exc), f"a refusal must name what it refuses: {exc}"
            return
        assert_parity(model.forward_verify("x", tokens), reference_logits(hf, tokens))

    check()


# ------------------------------------------- random checkpoints and packed weights


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "phi3"])
def test_random_checkpoints_of_each_family_are_what_transformers_reads(family, tmp_path):
    """ferrum.random_checkpoint (benchmarks, the conformance kit) writes the tensors transformers expects."""
    import torch
    import transformers

    from ferrum.random_checkpoint import write_random_checkpoint
    from ferrum.testing.family_checks import FAMILY_MODELS

    folder = write_random_checkpoint(tmp_path / family, FAMILY_MODELS[family], dtype="float32", std=0.2)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        ref = hf.float().eval()(torch.tensor([TOKENS[:ORIGINAL]])).logits[0].numpy()
    assert_parity(load(folder, "cpu").forward_verify("x", TOKENS[:ORIGINAL]), ref)


@pytest.mark.parametrize("backend", RUNNABLE)
def test_packed_phi3_splits_and_scales_quantized_rows_exactly(backend, tmp_path):
    """Fused qkv / gate_up packed at 8 bits: split by rows, longrope's factor on the scales, partial rotary's
    permutation, against the float64 oracle computing with the dequantized values."""
    from safetensors import safe_open

    from ferrum.quant.convert import quantize_checkpoint
    from ferrum.random_checkpoint import write_random_checkpoint
    from ferrum.testing.arch_oracle import ArchOracle
    from ferrum.testing.family_checks import FAMILY_MODELS

    folder = write_random_checkpoint(tmp_path / "phi3", FAMILY_MODELS["phi3"], dtype="float32", std=0.2)
    packed = quantize_checkpoint(folder, tmp_path / "packed", bits=8, group_size=32)
    with safe_open(str(packed / "model.safetensors"), "np") as stored:
        assert {"model.layers.0.self_attn.qkv_proj.scales", "model.layers.0.mlp.gate_up_proj.scales"} <= set(
            stored.keys())
    got = load(packed, backend, dtype="float32").forward_verify("x", TOKENS)
    assert_parity(got, ArchOracle(packed).logits(TOKENS))
