"""Gemma 1-3 (text), Phi-3 / Phi-4, SmolLM3, Granite, OLMo 2, the LayerNorm families (Phi-2, StableLM, StarCoder2),
the squared-ReLU ones (Nemotron, Arcee, nanochat) and more against transformers (the reference), mlx-lm and each
other, plus the family key table's refusals.

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
from ferrum.errors import ConfigError, ContextLengthExceededError, FerrumError, UnsupportedFeatureError
from ferrum.model import DecoderOnlyLLM, ForwardItem

from support import build_transformers_model, cpu_like_plugin, reference_logits, runnable_backends, write_tokenizer

RUNNABLE = runnable_backends()
SAME_BACKEND_TOL = 2e-5
VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
WINDOW = 4  # shorter than the test sequences
ORIGINAL = 8  # longrope's original_max_position_embeddings: TOKENS cross it
MINISTRAL3_ROPE = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
                   "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                   "llama_4_scaling_beta": 0.1}

FAMILIES = ("gemma3", "gemma2", "gemma", "phi3_longrope_partial", "phi3_window", "smollm3", "granite", "olmo2",
            "olmo3", "ministral", "ministral3", "exaone4", "seed_oss", "ernie4_5", "glm4", "hunyuan",
            "helium", "glm",
            "phi", "phi_qk_norm_exact_gelu", "stablelm", "stablelm_parallel", "stablelm_qk_norm", "starcoder2",
            "cohere", "cohere_qk_norm",
            "cohere2", "gpt_neox", "gpt_neox_serial", "gpt2", "gpt2_untied_exact_gelu", "gpt_bigcode",
            "gpt_bigcode_mha", "gptj", "falcon", "falcon_new_architecture", "falcon_serial", "olmo", "olmo_clip",
            "nemotron", "nemotron_llama3_quarter", "arcee", "vaultgemma", "vaultgemma_full", "apertus",
            "apertus_biased", "nanochat", "nanochat_biased")


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
    if family == "gemma":  # Gemma 1: Llama's two norms with (1 + w), GeGLU (the checkpoint says "gelu": build_family)
        return transformers.GemmaConfig(**{**common, "hidden_size": 64}, num_attention_heads=4, num_key_value_heads=1,
                                        head_dim=32, hidden_act="gelu_pytorch_tanh")
    if family == "phi3_longrope_partial":  # Phi-4-mini style: partial rotary, tied, longrope
        return transformers.Phi3Config(
            **common, num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.5,
            tie_word_embeddings=True, original_max_position_embeddings=ORIGINAL, rope_scaling=_longrope(6),
        )
    if family == "phi3_window":  # Phi-3-mini style: MHA, untied, a sliding window
        return transformers.Phi3Config(**common, num_attention_heads=4, sliding_window=WINDOW + 1)
    if family == "granite":  # Granite 3 style: tied, every multiplier away from 1
        return transformers.GraniteConfig(**common, num_attention_heads=4, num_key_value_heads=2,
                                          tie_word_embeddings=True, embedding_multiplier=3.0,
                                          residual_multiplier=0.5, attention_multiplier=0.09, logits_scaling=4.0)
    if family == "smollm3":  # layer 1 of 3 without rope (NoPE), and that layer alone sliding
        return transformers.SmolLM3Config(**common, num_attention_heads=4, num_key_value_heads=2,
                                          no_rope_layer_interval=2, use_sliding_window=True, sliding_window=WINDOW)
    if family == "ministral":  # Mistral with per-layer windows
        return transformers.MinistralConfig(**common, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                            sliding_window=WINDOW,
                                            layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    if family == "ministral3":  # YaRN, and Llama 4's query scaling from position ORIGINAL on (TOKENS cross it)
        return transformers.Ministral3Config(**common, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                             rope_parameters=MINISTRAL3_ROPE)
    if family == "olmo3":  # OLMo 2's blocks; sliding layers but the last; YaRN on the full layer only
        return transformers.Olmo3Config(**{**common, "num_hidden_layers": 4}, num_attention_heads=4,
                                        num_key_value_heads=2, sliding_window=WINDOW,
                                        rope_scaling={"rope_type": "yarn", "factor": 4.0, "beta_fast": 16.0,
                                                      "original_max_position_embeddings": 32})
    if family == "olmo2":  # norms only after attention and MLP; q/k normed over all heads at once
        return transformers.Olmo2Config(**common, num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0)
    if family == "exaone4":  # OLMo 2's norms, q/k normed per head, sliding layers with rope, a full one without
        return transformers.Exaone4Config(**common, num_attention_heads=4, num_key_value_heads=2, sliding_window=WINDOW,
                                          sliding_window_pattern=2)
    if family == "seed_oss":  # biases on q/k/v and on o_proj, from two keys, and on the MLP
        return transformers.SeedOssConfig(**common, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                          attention_out_bias=True, mlp_bias=True)
    if family == "ernie4_5":  # GPT-J's rope (adjacent dims paired), biases on every projection, untied
        return transformers.Ernie4_5Config(**common, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                           use_bias=True, tie_word_embeddings=False)
    if family == "glm4":  # a norm before and after attention and the MLP; GPT-J's rope on half of each head
        return transformers.Glm4Config(**common, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    if family == "hunyuan":  # q/k normed once rotated; its checkpoints' "dynamic" rope with a fixed alpha
        return transformers.HunYuanDenseV1Config(
            **common, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
            rope_parameters={"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0, "rope_theta": 10000.0})
    if family == "helium":  # GPT-J's rope (adjacent dims paired) on Llama's blocks; q/k/v biased, o_proj never
        return transformers.HeliumConfig(**common, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                         attention_bias=True, mlp_bias=True, rope_theta=500.0)
    if family == "glm":  # GLM-4 9B: GLM-4-0414's attention (GPT-J's rope on half of each head) with Llama's norms
        return transformers.GlmConfig(**common, num_attention_heads=4, num_key_value_heads=2, head_dim=24)
    if family == "phi":  # Phi-2: one LayerNorm, attention and an ungated GELU MLP side by side, biased LM head
        return transformers.PhiConfig(**common, num_attention_heads=4, partial_rotary_factor=0.5)
    if family == "phi_qk_norm_exact_gelu":  # Phi's per-head q/k LayerNorms, GQA, and the exact GELU
        return transformers.PhiConfig(**common, num_attention_heads=4, num_key_value_heads=2, qk_layernorm=True,
                                      hidden_act="gelu", partial_rotary_factor=0.25)
    if family == "stablelm":  # StableLM 2 1.6B style: biased LayerNorms, q/k/v biases, rope on a quarter of each head
        return transformers.StableLmConfig(**common, num_attention_heads=4, num_key_value_heads=2, use_qkv_bias=True)
    if family == "stablelm_qk_norm":  # StableLM 2 12B: a LayerNorm per head on q and k, one tensor a head; GQA
        return transformers.StableLmConfig(**common, num_attention_heads=4, num_key_value_heads=2, qk_layernorm=True,
                                           use_parallel_residual=True)
    if family == "stablelm_parallel":  # attention and the MLP side by side after one norm (use_parallel_residual)
        return transformers.StableLmConfig(**common, num_attention_heads=4, num_key_value_heads=4,
                                           use_parallel_residual=True, partial_rotary_factor=0.5)
    if family == "starcoder2":  # biased LayerNorms and projections, an ungated GELU MLP, a window, tied
        return transformers.Starcoder2Config(**common, num_attention_heads=4, num_key_value_heads=2,
                                             sliding_window=WINDOW)
    if family == "cohere":  # Command R: LayerNorms without bias, a parallel block, GPT-J's rope, scaled logits
        return transformers.CohereConfig(**common, num_attention_heads=4, num_key_value_heads=2, logit_scale=0.25,
                                         attention_bias=True)
    if family == "cohere_qk_norm":  # Command R+: q and k LayerNormed head by head, a weight per head (32 wide, so
        # that ferrum quantize could pack it: it must not)
        return transformers.CohereConfig(**common, num_attention_heads=3, num_key_value_heads=1, logit_scale=0.25,
                                         use_qk_norm=True)
    if family == "cohere2":  # Command R7B: sliding layers with rope, the last full and without (NoPE)
        return transformers.Cohere2Config(**{**common, "num_hidden_layers": 4}, num_attention_heads=4,
                                          num_key_value_heads=2, sliding_window=WINDOW, logit_scale=0.5)
    if family == "gpt_neox":  # Pythia: q/k/v fused per head, a parallel block with two norms, the exact GELU
        return transformers.GPTNeoXConfig(**{**common, "intermediate_size": 4 * 96}, num_attention_heads=4)
    if family == "gpt_neox_serial":  # use_parallel_residual off, half of each head rotated, the tanh GELU
        return transformers.GPTNeoXConfig(**common, num_attention_heads=4, use_parallel_residual=False,
                                          rotary_pct=0.5, hidden_act="gelu_new")
    if family == "gpt2":  # learned positions, no rope, fused and transposed (Conv1D) projections, tied
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=96, n_layer=3, n_head=4, n_positions=64,
                                       bos_token_id=1, eos_token_id=2)
    if family == "gpt2_untied_exact_gelu":  # its own LM head and MLP width, the exact GELU; Stanford CRFM's scale
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=32, n_inner=80,
                                       activation_function="gelu", tie_word_embeddings=False, bos_token_id=1,
                                       eos_token_id=2, scale_attn_by_inverse_layer_idx=True,
                                       reorder_and_upcast_attn=True)
    if family == "gpt_bigcode":  # StarCoder 1: GPT-2's blocks as Linear layers, one key/value head (multi_query)
        return transformers.GPTBigCodeConfig(vocab_size=VOCAB, n_embd=96, n_layer=3, n_head=4, n_positions=64,
                                             bos_token_id=1, eos_token_id=2)
    if family == "gpt_bigcode_mha":  # without multi_query: each head's q, k, v in turn
        return transformers.GPTBigCodeConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=32,
                                             multi_query=False, bos_token_id=1, eos_token_id=2)
    if family == "gptj":  # a parallel block, GPT-J's rope on the first rotary_dim dims, a biased LM head
        return transformers.GPTJConfig(vocab_size=VOCAB, n_embd=96, n_layer=3, n_head=4, n_positions=64, rotary_dim=12,
                                       bos_token_id=1, eos_token_id=2)
    if family == "falcon":  # Falcon 7B: one key/value head, one norm feeding attention and the MLP side by side
        return transformers.FalconConfig(vocab_size=VOCAB, hidden_size=96, num_hidden_layers=3, num_attention_heads=4,
                                         max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    if family == "falcon_new_architecture":  # Falcon 40B / 180B: q/k/v grouped by key/value head, two norms, untied
        return transformers.FalconConfig(vocab_size=VOCAB, hidden_size=96, num_hidden_layers=3, num_attention_heads=4,
                                         num_kv_heads=2, new_decoder_architecture=True, tie_word_embeddings=False,
                                         max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    if family == "falcon_serial":  # every head its own key and value (each head's q, k, v in turn), serial, biased
        return transformers.FalconConfig(vocab_size=VOCAB, hidden_size=96, num_hidden_layers=3, num_attention_heads=4,
                                         multi_query=False, parallel_attn=False, bias=True, ffn_hidden_size=80,
                                         max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    if family == "olmo":  # OLMo 1: Llama's blocks, LayerNorms without weight or bias, every attention projection biased
        return transformers.OlmoConfig(**common, num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                                       tie_word_embeddings=True)
    if family == "olmo_clip":  # OLMo 1.7's q, k and v clipped, tight enough to bite
        return transformers.OlmoConfig(**common, num_attention_heads=4, num_key_value_heads=2, clip_qkv=0.05)
    nemotron = {k: v for k, v in common.items() if k != "rms_norm_eps"}
    if family == "nemotron":  # LayerNorm1P (1 + w, biased), a squared-ReLU ungated MLP, rope on half of each head
        return transformers.NemotronConfig(**nemotron, norm_eps=1e-5, num_attention_heads=4, num_key_value_heads=2,
                                           attention_bias=True, mlp_bias=True)
    if family == "nemotron_llama3_quarter":  # llama3 rope on a quarter of each head, head_dim != hidden / heads, tied
        return transformers.NemotronConfig(
            **nemotron, norm_eps=1e-3, num_attention_heads=4, num_key_value_heads=4, head_dim=32,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8,
                             "partial_rotary_factor": 0.25})
    if family == "arcee":  # Arcee AFM: Llama's blocks, a squared-ReLU ungated MLP, YaRN as AFM-4.5B ships it
        return transformers.ArceeConfig(**common, num_attention_heads=4, num_key_value_heads=2,
                                        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                         "original_max_position_embeddings": 32})
    if family == "vaultgemma":  # Gemma 2 without its post-attention / post-MLP norms; both soft-caps biting
        return transformers.VaultGemmaConfig(
            **common, num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=WINDOW,
            attn_logit_softcapping=3.0, final_logit_softcapping=5.0, query_pre_attn_scalar=40)
    if family == "vaultgemma_full":  # every layer full by layer_types, untied, MHA, no soft-caps
        return transformers.VaultGemmaConfig(
            **common, num_attention_heads=4, num_key_value_heads=4, head_dim=24, sliding_window=WINDOW,
            layer_types=["full_attention"] * 3, tie_word_embeddings=False, query_pre_attn_scalar=24,
            attn_logit_softcapping=None, final_logit_softcapping=None)
    if family == "apertus":  # xIELU, q/k norms before llama3 rope (scaling past 8 positions), untied
        return transformers.ApertusConfig(
            **common, num_attention_heads=4, num_key_value_heads=2,
            rope_parameters={"rope_type": "llama3", "rope_theta": 12_000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8})
    if family == "apertus_biased":  # attention_bias on q/k/v/o, head_dim != hidden / heads, MQA, tied, default rope
        return transformers.ApertusConfig(**common, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                          attention_bias=True, tie_word_embeddings=True)
    if family == "nanochat":  # weightless norms (the embeddings' too), rope the other way, q/k normed after it,
        # relu^2 fc1 / fc2, logits soft-capped at 15 (its default), untied; transformers' default epsilon
        return transformers.NanoChatConfig(**{k: v for k, v in common.items() if k != "rms_norm_eps"},
                                           num_attention_heads=4, num_key_value_heads=2)
    if family == "nanochat_biased":  # attention_bias on q/k/v/o, llama3 rope, head_dim != hidden / heads, MQA, tied,
        # a cap that bites, the tanh GELU
        return transformers.NanoChatConfig(
            **common, num_attention_heads=4, num_key_value_heads=1, head_dim=32, attention_bias=True,
            tie_word_embeddings=True, final_logit_softcapping=2.0, hidden_act="gelu_pytorch_tanh",
            rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8})
    raise ValueError(family)


def build_family(folder, family: str):
    """The family's checkpoint in ``folder``; returns the reference model. Gemma 1's says the official configs'
    legacy ``hidden_act: "gelu"``, meaning the tanh approximation Gemma was trained with: transformers 5.24 reads
    it so, 5.17 ran exact GELU, so the reference is built with the tanh form named outright."""
    model = build_transformers_model(folder, transformers_config(family))
    if family.startswith("apertus"):  # xIELU's beta and eps are buffers: each layer its own, so each is read
        import torch

        with torch.no_grad():
            for i, layer in enumerate(model.model.layers):
                layer.mlp.act_fn.beta.fill_(0.5 - 0.1 * i)
                layer.mlp.act_fn.eps.fill_(-1e-6 * (i + 1))
        model.save_pretrained(folder)
    if family == "gemma":
        path = folder / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "hidden_act": "gelu"}))
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {f: (folder, build_family(folder, f)) for f in FAMILIES for folder in [tmp_path_factory.mktemp(f)]}


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


@pytest.mark.parametrize("family", FAMILIES)
def test_the_conformance_kits_oracle_matches_transformers(checkpoints, family):
    """``ArchOracle`` (float64, from the tensors as stored), which plugin authors' backends are held to."""
    from ferrum.testing.arch_oracle import ArchOracle

    folder, hf = checkpoints[family]
    assert_parity(ArchOracle(folder).logits(TOKENS), reference_for(family, hf, TOKENS))


@pytest.mark.parametrize("backend", RUNNABLE)
def test_longrope_is_exact_within_the_original_length(checkpoints, backend):
    folder, hf = checkpoints["phi3_longrope_partial"]
    short = TOKENS[:ORIGINAL]
    assert_parity(load(folder, backend).forward_verify("s", short), reference_logits(hf, short))


@pytest.mark.parametrize("backend", RUNNABLE)
@pytest.mark.parametrize("family, cached", [("phi3_longrope_partial", 10), ("ministral3", 7)],
                         ids=["longrope-switch", "llama4-query-scaling"])
def test_a_batch_on_both_sides_of_original_max_equals_each_alone(checkpoints, backend, family, cached):
    """Longrope's table switch and Llama 4's query scaling both act per token from original_max on: a batch
    holding one item past it (its last chunk crossing it, for the scaling) and one before it."""
    folder, hf = checkpoints[family]
    model = load(folder, backend)
    model.prefill("long", TOKENS[:cached])
    out = model.unified_forward([ForwardItem("long", TOKENS[cached:12], cached, True),
                                 ForwardItem("short", TOKENS[:5], 0, True)])
    assert_parity(out["long"], reference_for(family, hf, TOKENS[:12])[-1])
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


def _as_bare_gpt2(path, layers: int, positions: int) -> None:
    """A GPT2LMHeadModel's tensors as the first GPT-2 release stores them: no ``transformer.`` prefix, and each
    layer's causal mask buffer ``h.N.attn.bias`` beside its weights."""
    from safetensors.numpy import load_file, save_file

    tensors = {name.removeprefix("transformer."): array for name, array in load_file(str(path)).items()}
    mask = np.tril(np.ones((positions, positions), dtype=np.float32))[None, None]
    tensors.update({f"h.{i}.attn.bias": mask for i in range(layers)})
    save_file(tensors, str(path))


def _mlx_lm_config(config: dict) -> dict:
    """The transformers-4 spelling of the rope and window keys, which mlx-lm reads."""
    params = config.pop("rope_parameters", None) or {}
    if "full_attention" in params:  # Gemma 3: per attention kind
        config["rope_theta"] = params["full_attention"]["rope_theta"]
        config["rope_local_base_freq"] = params["sliding_attention"]["rope_theta"]
        config["sliding_window_pattern"] = config["layer_types"].index("full_attention") + 1
    else:
        config["rope_theta"] = params.get("rope_theta", 10000.0)
        if "partial_rotary_factor" in params:  # beside the rope settings in transformers 4
            config["partial_rotary_factor"] = params["partial_rotary_factor"]
        if params.get("rope_type", "default") != "default":
            config["rope_scaling"] = {**params, "type": params["rope_type"]}
    return config


@pytest.mark.skipif("mlx" not in RUNNABLE, reason="the MLX backend cannot run here")
@pytest.mark.parametrize("family, length", [("gemma3", 13), ("gemma2", WINDOW), ("phi3_window", WINDOW + 1),
                                            ("phi3_partial", 13), ("olmo2", 13), ("exaone4", 13),
                                            ("seed_oss", 13), ("ernie4_5", 13), ("glm4", 13), ("hunyuan", 13),
                                            ("helium", 13), ("glm", 13),
                                            ("phi", 13), ("stablelm", 13), ("stablelm_parallel", 13),
                                            ("stablelm_qk_norm", 13),
                                            ("starcoder2", WINDOW), ("cohere", 13), ("cohere_qk_norm", 13),
                                            ("cohere2", WINDOW), ("gpt_neox", 13), ("gpt2", 13), ("gpt_bigcode", 13),
                                            ("gptj", 13), ("nemotron", 13), ("apertus", 13)])
def test_mlx_backend_matches_mlx_lm(checkpoints, family, length, tmp_path):
    """mlx-lm's Gemma 2 and Phi-3 have no sliding window, so their prompts stay within it; its longrope
    always uses the long factors, so Phi-3's partial rotary is compared without longrope. (Its Gemma 1 uses
    exact GELU where transformers, and Gemma's training, use the tanh form: compared with transformers only.)"""
    import shutil

    mx = pytest.importorskip("mlx.core")
    mlx_utils = pytest.importorskip("mlx_lm.utils")
    folder = tmp_path / family
    source = "phi3_longrope_partial" if family == "phi3_partial" else family
    shutil.copytree(checkpoints[source][0], folder)
    config = json.loads((folder / "config.json").read_text())
    if family == "phi3_partial":
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    if family == "exaone4":  # mlx-lm reads the layers' kinds from a string of L (sliding) and G (full)
        config.update(sliding_window_pattern="LG", head_dim=24, rope_scaling=None)
    if family == "glm4":  # beside the rope settings, as GLM-4-0414 ships it
        config["partial_rotary_factor"] = 0.5
    if family == "glm":  # mlx-lm's GLM rotates whole heads whatever partial_rotary_factor says: compared so
        config["rope_parameters"]["partial_rotary_factor"] = 1.0
    if family == "gpt_neox":  # its rope as Pythia spells it (mlx-lm reads only this); mlx-lm's GELU is the tanh form
        config.update(rotary_emb_base=10000.0, rotary_pct=0.25, hidden_act="gelu_new")
    if family == "gpt2":  # as the first release: the bare decoder with its mask buffers, which mlx-lm reads
        config["n_ctx"] = config["n_positions"]
        _as_bare_gpt2(folder / "model.safetensors", config["n_layer"], config["n_positions"])
    if family == "gpt_bigcode":  # mlx-lm needs the MLP's width spelled out, and its GELU is the exact one
        config.update(n_inner=4 * config["n_embd"], activation_function="gelu")
    if family == "apertus":  # keys mlx-lm's Apertus requires (Swiss AI's configs carry them; transformers ignores them)
        config.update(mlp_bias=False, post_norm=False, qk_norm=True)
    if family == "hunyuan":  # as Hunyuan's checkpoints spell it
        config.update(head_dim=24, rope_theta=10000.0, rope_scaling={"type": "dynamic", "alpha": 1000.0, "factor": 1.0})
    (folder / "config.json").write_text(json.dumps(_mlx_lm_config(config)))
    loaded = mlx_utils.load_model(folder)
    reference_model = loaded[0] if isinstance(loaded, tuple) else loaded
    tokens = TOKENS[:length]
    ref = np.array(reference_model(mx.array([tokens])).astype(mx.float32))[0]
    assert_parity(load(folder, "mlx").forward_verify("m", tokens), ref)


@pytest.mark.parametrize("bits", [None, 8])
@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "helium", "glm", "nemotron", "apertus", "cohere2"])
def test_mlx_lm_conversions_load(checkpoints, family, bits, tmp_path):
    """mlx-lm's conversions of GPT-2 (the projections [out, in] under ``model.``, its Conv1D turned into Linear),
    GPT-NeoX (``model.h.*``, ``model.embed_out``), Helium and GLM-4 (gate and up in one matrix) and Nemotron (its
    LayerNorm1P weights stored as ``w``, scaling by ``1 + w``), Command R7B (its sliding and NoPE layers), float or
    packed: read as such, on every backend, and as mlx-lm runs them. (mlx-lm 0.32 has no Arcee.)"""
    mx = pytest.importorskip("mlx.core")
    convert = pytest.importorskip("mlx_lm.convert")
    mlx_utils = pytest.importorskip("mlx_lm.utils")
    import shutil

    source = tmp_path / "hf"
    shutil.copytree(checkpoints[family][0], source)
    config = json.loads((source / "config.json").read_text())
    if family == "gpt2":  # the bare decoder, which mlx-lm reads
        config["n_ctx"] = config["n_positions"]
        _as_bare_gpt2(source / "model.safetensors", config["n_layer"], config["n_positions"])
    elif family == "gpt_neox":  # its rope as Pythia spells it, which mlx-lm reads
        config.update(rotary_emb_base=10000.0, rotary_pct=0.25, hidden_act="gelu_new")
    elif family == "glm":  # mlx-lm's GLM rotates whole heads (see test_mlx_backend_matches_mlx_lm)
        config["rope_parameters"]["partial_rotary_factor"] = 1.0
    elif family == "apertus":  # mlx-lm's required keys; its conversion stores xIELU's alpha_p / alpha_n as scalars
        config.update(mlp_bias=False, post_norm=False, qk_norm=True)
    (source / "config.json").write_text(json.dumps(_mlx_lm_config(config)))
    write_tokenizer(source)  # mlx-lm converts the tokenizer too, and cannot guess one for every family
    converted = tmp_path / "mlx"
    convert.convert(str(source), str(converted), quantize=bits is not None, q_bits=bits or 4, q_group_size=32)
    loaded = mlx_utils.load_model(converted)
    reference_model = loaded[0] if isinstance(loaded, tuple) else loaded
    tokens = TOKENS[:9]
    ref = np.array(reference_model(mx.array([tokens])).astype(mx.float32))[0]
    for backend in RUNNABLE:
        assert_parity(load(converted, backend, dtype="float32").forward_verify("m", tokens), ref)


def _as_mlx_lm_nanochat(source, dest):
    """transformers' nanochat checkpoint ``source`` as mlx-lm's nanochat reads it: nanochat's own names
    (``transformer.wte``, ``transformer.h.N.attn.c_q``...) and the config keys mlx-lm's ModelArgs has (no epsilon,
    which it fixes at 1e-5, nor soft-cap, which it fixes at 15), as the scripts that convert nanochat for MLX write
    them."""
    from safetensors.numpy import load_file, save_file

    from ferrum.arch.families.layer_norm import NANOCHAT_MLX_LM_NAMES, NANOCHAT_NAMES

    ours = {stored: name for name, stored in NANOCHAT_NAMES.items()}
    renamed = {}
    for name, array in load_file(str(source / "model.safetensors")).items():
        if name.startswith("model."):
            parts = name.removeprefix("model.").split(".")
            if parts[0] == "layers":
                module = ours.get(".".join(parts[2:-1]), ".".join(parts[2:-1]))
                name = f"h.{parts[1]}.{NANOCHAT_MLX_LM_NAMES.get(module, module)}.{parts[-1]}"
            else:
                name = f"{NANOCHAT_MLX_LM_NAMES.get(parts[0], parts[0])}.{parts[-1]}"
            name = "transformer." + name
        renamed[name] = array
    dest.mkdir()
    save_file(renamed, str(dest / "model.safetensors"), metadata={"format": "mlx"})
    config = json.loads((source / "config.json").read_text())
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "max_position_embeddings", "intermediate_size")
    (dest / "config.json").write_text(json.dumps({**{k: config[k] for k in keys}, "rope_theta": 10000.0}))
    write_tokenizer(dest)  # mlx-lm converts the tokenizer too
    return dest


@pytest.mark.skipif("mlx" not in RUNNABLE, reason="mlx-lm needs MLX")
@pytest.mark.parametrize("bits", [None, 4])
def test_nanochat_runs_as_mlx_lm_runs_its_model_and_conversions(checkpoints, bits, tmp_path):
    """mlx-lm's nanochat keeps nanochat's own tensor names and norms with 1e-5 where transformers defaults to 1e-6:
    such a checkpoint, and mlx-lm's float and 4-bit conversions of it, give mlx-lm's logits on every backend; the
    same weights under transformers' names, its logits."""
    mx = pytest.importorskip("mlx.core")
    convert = pytest.importorskip("mlx_lm.convert")
    mlx_utils = pytest.importorskip("mlx_lm.utils")
    from ferrum.arch.tensors import resolve_layout
    from ferrum.checkpoint import Checkpoint

    source, hf = checkpoints["nanochat"]
    mlx_lm = _as_mlx_lm_nanochat(source, tmp_path / "mlx_lm")
    assert resolve_layout(ModelConfig.from_file(mlx_lm), Checkpoint(mlx_lm).shapes()).rms_norm_eps == 1e-5
    assert resolve_layout(ModelConfig.from_file(source), Checkpoint(source).shapes()).rms_norm_eps == 1e-6
    converted = tmp_path / "converted"
    convert.convert(str(mlx_lm), str(converted), quantize=bits is not None, q_bits=bits or 4, q_group_size=32)
    if bits is not None:
        stored = Checkpoint(converted).shapes()
        assert {"transformer.wte.scales", "transformer.h.0.attn.c_q.scales", "transformer.h.0.mlp.c_fc.scales",
                "lm_head.scales"} <= set(stored)
    tokens = TOKENS[:9]
    for folder in (mlx_lm, converted) if bits is None else (converted,):
        loaded = mlx_utils.load_model(folder)
        reference_model = loaded[0] if isinstance(loaded, tuple) else loaded
        ref = np.array(reference_model(mx.array([tokens])).astype(mx.float32))[0]
        if bits is None:
            assert_parity(ref, reference_logits(hf, tokens))  # the same model as transformers' (eps aside)
        for backend in RUNNABLE:
            assert_parity(load(folder, backend, dtype="float32").forward_verify("m", tokens), ref)


@pytest.mark.parametrize("family", ["apertus", "apertus_biased", "nanochat", "nanochat_biased"])
def test_names_the_tensors_transformers_saves(checkpoints, family):
    """Apertus's xIELU parameters among them: alpha_p and alpha_n as [1], beta and eps as scalars; nanochat's norms
    not among them (they have no weight)."""
    from support import assert_names_the_tensors_transformers_saves

    assert_names_the_tensors_transformers_saves(checkpoints[family][0])



@pytest.mark.parametrize("family, adapted", [("gptj", 3 * 6), ("falcon", 3 * 4), ("falcon_new_architecture", 3 * 4),
                                             ("gpt_bigcode", 3 * 4)])
def test_lora_under_the_h_n_container_matches_peft(family, adapted, tmp_path):
    """PEFT's adapter of every linear projection, named under transformer.h.N (the layers' container these families
    store), gives PEFT's merged model's logits on every backend: GPT-J's q/k/v/out_proj and fc_in / fc_out, Falcon's
    fused query_key_value (multi-query, and grouped in the new architecture), dense and its MLP, GPTBigCode's fused
    c_attn and c_proj, c_fc and c_proj."""
    from lora_checks import assert_adapter_matches_peft, make_peft

    hf = build_family(tmp_path / "base", family)
    merged = make_peft(hf, tmp_path / "lora", "all-linear", hide=False)
    for backend in RUNNABLE:
        assert_adapter_matches_peft(tmp_path / "base", tmp_path / "lora", hf, merged, adapted, TOKENS, backend)


# ---------------------------------------------------------- checkpoint layouts


def test_gemma3_multimodal_checkpoint_runs_its_text_model(tmp_path, recwarn):
    """A Gemma3ForConditionalGeneration checkpoint: config under text_config, weights under the wrapper;
    the vision tower's tensors are left unread without a warning."""
    import transformers

    text = transformers_config("gemma3")
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                       mm_tokens_per_image=4, image_token_index=VOCAB - 1,
                                       boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2)
    hf = build_transformers_model(tmp_path / "base", config)
    names = json.loads((tmp_path / "base" / "config.json").read_text())
    assert names["model_type"] == "gemma3" and "text_config" in names
    tokens = TOKENS[:9]
    model = load(tmp_path / "base", "cpu")
    assert_parity(model.forward_verify("x", tokens), reference_logits(hf, tokens))
    assert not [w for w in recwarn if "not used" in str(w.message)]
    # A PEFT adapter of q/v trained on the whole model also adapts the vision tower's: those are left out with a
    # warning, the text model's run (the vision ones, mapped onto text layers, were refused as the wrong shape or,
    # shaped alike, silently replaced the text layers' factors).
    peft, torch = pytest.importorskip("peft"), pytest.importorskip("torch")
    torch.manual_seed(5)
    adapted = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False)).eval()
    adapted.save_pretrained(tmp_path / "lora")
    with pytest.warns(UserWarning, match="vision or audio part"):
        assert model.adapters.load("qv", tmp_path / "lora").projections == 2 * text.num_hidden_layers
    out = model.forward([ForwardItem("y", tokens, 0, adapter="qv")], all_logits=True)
    assert_parity(model.ops.to_numpy(out.logits), reference_logits(adapted, tokens))


def test_mistral3_checkpoint_runs_its_text_model(tmp_path):
    """Mistral3ForConditionalGeneration (Mistral Small 3.1+, Magistral): a Mistral decoder under text_config."""
    import transformers

    text = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=96, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                      max_position_embeddings=128, rope_theta=1e6, sliding_window=None)
    vision = transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                              num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Mistral3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                         image_token_index=VOCAB - 1)
    hf = build_transformers_model(tmp_path, config, model_class=transformers.Mistral3ForConditionalGeneration)
    names = json.loads((tmp_path / "config.json").read_text())
    assert names["model_type"] == "mistral3" and "text_config" in names
    tokens = TOKENS[:9]
    assert_parity(load(tmp_path, "cpu").forward_verify("x", tokens), reference_logits(hf, tokens))


@pytest.mark.parametrize("text_type", ["exaone4", "exaone4_5_text"])  # the first release's name, then today's
def test_exaone4_5_checkpoint_runs_its_text_model(tmp_path, text_type):
    """EXAONE 4.5 (Exaone4_5_ForConditionalGeneration): an EXAONE 4 decoder under text_config."""
    import transformers

    text = transformers_config("exaone4")
    vision = transformers.Exaone4_5_VisionConfig(depth=1, hidden_size=32, intermediate_size=37, num_heads=2,
                                                 out_hidden_size=text.hidden_size, fullatt_block_indexes=[0])
    config = transformers.Exaone4_5_Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                           image_token_id=VOCAB - 1, video_token_id=VOCAB - 2)
    hf = build_transformers_model(tmp_path, config, model_class=transformers.Exaone4_5_ForConditionalGeneration)
    names = json.loads((tmp_path / "config.json").read_text())
    assert names["model_type"] == "exaone4_5" and "text_config" in names
    names["text_config"]["model_type"] = text_type
    (tmp_path / "config.json").write_text(json.dumps(names))
    tokens = TOKENS[:9]
    assert_parity(load(tmp_path, "cpu").forward_verify("x", tokens), reference_logits(hf, tokens))


@pytest.mark.parametrize("release", ["qwen2_5_vl", "qwen2_5_vl-flat", "qwen3_vl"])
def test_qwen_vl_checkpoint_runs_its_text_model_on_text(tmp_path, release):
    """Qwen2.5-VL and Qwen3-VL: a Qwen 2 / Qwen 3 decoder whose rope (mrope) runs over time, height and width
    positions, which are one position for text: on text, the family's plain rope gives transformers' logits
    (whatever mrope_section says, interleaved or not). Qwen2.5-VL as released has its decoder's keys flat
    beside vision_config, its rope type "mrope"."""
    import transformers

    name = "Qwen3VL" if release == "qwen3_vl" else "Qwen2_5_VL"
    text = getattr(transformers, f"{name}TextConfig")(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, head_dim=16,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                         **({"mrope_interleaved": True} if release == "qwen3_vl" else {})})
    vision = getattr(transformers, f"{name}VisionConfig")(depth=1, hidden_size=32, intermediate_size=37, num_heads=2,
                                                          out_hidden_size=64)
    config = getattr(transformers, f"{name}Config")(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                                    image_token_id=VOCAB - 1, video_token_id=VOCAB - 2,
                                                    vision_start_token_id=VOCAB - 3)
    model_class = getattr(transformers, f"{name}ForConditionalGeneration")
    hf = build_transformers_model(tmp_path, config, model_class=model_class)
    if release.endswith("flat"):
        raw = json.loads((tmp_path / "config.json").read_text())
        decoder = raw.pop("text_config")
        rope = decoder.pop("rope_parameters")
        raw.update({k: v for k, v in decoder.items() if k != "model_type"}, rope_theta=rope["rope_theta"],
                   rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
        (tmp_path / "config.json").write_text(json.dumps(raw))
    tokens = TOKENS[:9]
    for backend in RUNNABLE:
        assert_parity(load(tmp_path, backend).forward_verify("x", tokens), reference_logits(hf, tokens))


@pytest.mark.parametrize("layout", ["transformers", "release", "mlx"])
def test_qwen3_vl_moe_checkpoint_runs_its_text_model_on_text(tmp_path, layout):
    """Qwen3-VL-MoE's decoder is Qwen3-MoE's with gate and up in one expert stack, and top-k weights always
    renormalized (norm_topk_prob false here, which transformers ignores). Its experts as transformers 5 saves
    them (outputs first), as Qwen's release stores them (inputs first) and under the model's own names (mlx-lm,
    mlx-vlm) all give transformers' logits."""
    import transformers
    from safetensors.numpy import load_file, save_file

    text = transformers.Qwen3VLMoeTextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=80, moe_intermediate_size=24, num_experts=4,
        num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=128, norm_topk_prob=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                         "mrope_interleaved": True})
    vision = transformers.Qwen3VLMoeVisionConfig(depth=1, hidden_size=32, intermediate_size=37, num_heads=2,
                                                 out_hidden_size=64)
    config = transformers.Qwen3VLMoeConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                           image_token_id=VOCAB - 1, video_token_id=VOCAB - 2,
                                           vision_start_token_id=VOCAB - 3)
    hf = build_transformers_model(tmp_path, config, model_class=transformers.Qwen3VLMoeForConditionalGeneration)
    tensors = load_file(tmp_path / "model.safetensors")
    for i in range(2):
        experts = f"model.language_model.layers.{i}.mlp.experts"
        gate_up, down = tensors.pop(f"{experts}.gate_up_proj"), tensors.pop(f"{experts}.down_proj")
        assert gate_up.shape == (4, 48, 64) and down.shape == (4, 64, 24)  # transformers 5: outputs first
        if layout == "transformers":
            tensors.update({f"{experts}.gate_up_proj": gate_up, f"{experts}.down_proj": down})
        elif layout == "release":
            tensors.update({f"{experts}.gate_up_proj": np.ascontiguousarray(gate_up.transpose(0, 2, 1)),
                            f"{experts}.down_proj": np.ascontiguousarray(down.transpose(0, 2, 1))})
        else:
            stacks = dict(zip(("gate_proj", "up_proj"), np.split(gate_up, 2, axis=1)), down_proj=down)
            tensors.update({f"{experts.replace('experts', 'switch_mlp')}.{proj}.weight": np.ascontiguousarray(w)
                            for proj, w in stacks.items()})
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    tokens = TOKENS[:9]
    for backend in RUNNABLE:
        assert_parity(load(tmp_path, backend).forward_verify("x", tokens), reference_logits(hf, tokens))


def test_fused_expert_stacks_of_undecidable_orientation_are_refused():
    """A hidden size equal to the stack's other side leaves inputs-first and outputs-first alike: refused."""
    from ferrum.errors import CheckpointError
    from ferrum.moe import fused_gate_up

    name = "model.layers.0.mlp.switch_mlp.gate_proj.weight"
    stack = {"model.layers.0.mlp.experts.gate_up_proj": np.zeros((4, 32, 32), np.float32)}  # 2 * 16 == 32
    with pytest.raises(CheckpointError, match="cannot tell"):
        fused_gate_up.convert(name, stack, (4, 16, 32), "ckpt")
    with pytest.raises(CheckpointError, match=r"\(4, 64, 32\) \(inputs first\) or \(4, 32, 64\)"):
        fused_gate_up.convert(name, {"model.layers.0.mlp.experts.gate_up_proj": np.zeros((4, 64, 64), np.float32)},
                              (4, 16, 64), "ckpt")


def test_olmo3_scales_the_rope_of_its_full_layers_only(checkpoints):
    """OLMo 3 as released spells its rope the transformers 4 way: rope_scaling applies to the full layers only
    (transformers 5 files key it by attention kind, as the parity tests load). A flat transformers 5 dict is one
    transformers ignores: refused by name."""
    raw = json.loads((checkpoints["olmo3"][0] / "config.json").read_text())
    full = raw.pop("rope_parameters")["full_attention"]
    v4 = {**raw, "rope_theta": full.pop("rope_theta"), "rope_scaling": full}
    layers = ModelConfig.from_dict(v4).arch.layers
    assert [(layer.window, layer.rope.kind) for layer in layers] == [(WINDOW, "default")] * 3 + [(None, "yarn")]
    with pytest.raises(UnsupportedFeatureError, match="'rope_parameters'.*one entry per attention kind"):
        ModelConfig.from_dict({**raw, "rope_parameters": {"rope_type": "yarn", **full}})


def test_a_rope_scaling_beside_per_kind_rope_parameters_must_agree_with_the_full_layers(checkpoints):
    """transformers 5 merges a ``rope_scaling`` added by hand into the full layers' entry of ``rope_parameters``
    (Gemma 3, OLMo 3): one that agrees loads, one that does not is refused naming both (it was ignored: plain rope
    on every layer). A sliding entry without ``rope_theta`` takes Gemma 3's ``rope_local_base_freq``."""
    for family in ("gemma3", "olmo3"):
        raw = json.loads((checkpoints[family][0] / "config.json").read_text())
        full = raw["rope_parameters"]["full_attention"]
        scaling = {key: value for key, value in full.items() if key != "rope_theta"}
        ModelConfig.from_dict({**raw, "rope_scaling": scaling})
        with pytest.raises(ConfigError, match="rope_scaling.*full_attention.*disagree"):
            ModelConfig.from_dict({**raw, "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    raw = json.loads((checkpoints["gemma3"][0] / "config.json").read_text())
    bare = {kind: {"rope_type": "default"} for kind in ("full_attention", "sliding_attention")}
    for local, expected in (({"rope_local_base_freq": 50.0}, 50.0), ({}, 10_000.0)):
        config = {**{k: v for k, v in raw.items() if k != "rope_local_base_freq"}, **local,
                  "rope_parameters": bare, "rope_theta": 1e6}
        thetas = {(layer.window is None, layer.rope.theta) for layer in ModelConfig.from_dict(config).arch.layers}
        assert thetas == {(True, 1e6), (False, expected)}


def test_ministral3_without_rope_settings_takes_transformers_defaults(tmp_path):
    """No rope_parameters (nor rope_scaling): transformers runs YaRN x16 over 16384 positions at theta 1e6 with
    Llama 4's beta 0.1, whatever rope_theta says (Ferrum ran plain rope at rope_theta)."""
    import transformers

    config = transformers.Ministral3Config(vocab_size=VOCAB, hidden_size=96, intermediate_size=80,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           head_dim=32, max_position_embeddings=512, rope_theta=500.0)
    hf = build_transformers_model(tmp_path, config)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.pop("rope_parameters")
    (tmp_path / "config.json").write_text(json.dumps({**raw, "rope_theta": 500.0}))
    tokens = TOKENS[:9]
    assert_parity(load(tmp_path, "cpu").forward_verify("x", tokens), reference_logits(hf, tokens))
    legacy = {"rope_type": "linear", "factor": 2.0}  # a config's own settings still win
    (tmp_path / "config.json").write_text(json.dumps({**raw, "rope_scaling": legacy}))
    assert ModelConfig.from_file(tmp_path).arch.layers[0].rope.kind == "linear"


def test_ministral3_scales_queries_past_original_max_and_keeps_its_whole_context(checkpoints):
    """Llama 4's query scaling multiplies queries by exactly 1 before original_max_position_embeddings and by more
    from there on: transformers' logits change there (so the parity tests above, whose tokens cross it, check it),
    and the context is the config's."""
    raw = json.loads((checkpoints["ministral3"][0] / "config.json").read_text())
    assert ModelConfig.from_dict(raw).max_seq_len == 128
    hf = checkpoints["ministral3"][1]
    scaled = reference_logits(hf, TOKENS)
    rope = hf.config.rope_parameters
    hf.config.rope_parameters = {**rope, "llama_4_scaling_beta": 0.0}
    try:
        unscaled = reference_logits(hf, TOKENS)
    finally:
        hf.config.rope_parameters = rope  # the module's model, shared with the other tests
    assert np.allclose(scaled[:ORIGINAL], unscaled[:ORIGINAL], atol=1e-5)
    assert not np.allclose(scaled[ORIGINAL:], unscaled[ORIGINAL:], atol=1e-3)


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
        ("helium", {"head_dim": 32}, ConfigError, "head_dim"),  # its o_proj takes hidden_size inputs
        ("helium", {"hidden_act": "gelu"}, UnsupportedFeatureError, "hidden_act"),
        ("glm", {"partial_rotary_factor": 1.5, "rope_parameters": None}, ConfigError, "partial_rotary_factor"),
        ("nemotron", {"hidden_act": "silu"}, UnsupportedFeatureError, "hidden_act"),  # an ungated SiLU
        ("nemotron", {"partial_rotary_factor": 1.5, "rope_parameters": None}, ConfigError, "partial_rotary_factor"),
        ("nemotron", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.125}},
         ConfigError, "partial_rotary_factor"),  # 3 rotary dims of 24
        ("nemotron", {"rope_parameters": {"rope_type": "longrope", "factor": 2.0, "rope_theta": 1e4}},
         UnsupportedFeatureError, "rope_parameters"),
        ("arcee", {"hidden_act": "silu"}, UnsupportedFeatureError, "hidden_act"),
        ("apertus", {"hidden_act": "silu"}, UnsupportedFeatureError, "hidden_act"),  # an ungated SiLU
        ("apertus", {"rope_parameters": {"rope_type": "longrope", "factor": 2.0, "rope_theta": 1e4}},
         UnsupportedFeatureError, "rope_parameters"),
        ("arcee", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
         UnsupportedFeatureError, "rope_parameters"),  # transformers' Llama rotates whole heads whatever it says
        ("nanochat", {"hidden_act": "silu"}, UnsupportedFeatureError, "hidden_act"),  # an ungated SiLU
        ("nanochat", {"final_logit_softcapping": 0}, ConfigError, "final_logit_softcapping"),
        ("nanochat", {"final_logit_softcapping": "15"}, ConfigError, "final_logit_softcapping"),
        ("nanochat", {"attention_bias": "yes"}, ConfigError, "attention_bias"),
        ("nanochat", {"rms_norm_eps": -1e-6}, ConfigError, "rms_norm_eps"),
        ("nanochat", {"rope_parameters": {"rope_type": "longrope", "factor": 2.0, "rope_theta": 1e4}},
         UnsupportedFeatureError, "rope_parameters"),
        ("nanochat", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
         UnsupportedFeatureError, "rope_parameters"),
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
        (dict(model_type="mistral", rope_scaling={"rope_type": "longrope", "factor": 4.0}), UnsupportedFeatureError,
         "rope_scaling"),
        (dict(model_type="qwen2", rope_scaling={"rope_type": "yarn", "factor": 4.0, "beta_fast": -1}), ConfigError,
         "rope_scaling"),
        (dict(model_type="qwen2", rope_scaling={"rope_type": "yarn", "factor": 4.0, "truncate": "no"}), ConfigError,
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

    registered("nocap", cpu_like_plugin("nocap", omit=("paged_attention",), extra={"attention": attention}))
    with pytest.raises(UnsupportedFeatureError, match="soft-capping.*softcap"):
        load(checkpoints["gemma2"][0], "nocap")
    load(checkpoints["gemma3"][0], "nocap")  # no soft-capping: runs


def test_new_ops_fall_back_to_the_reference_on_a_plugin_without_them(checkpoints, registered):
    """A third-party plugin that predates gelu_tanh_mul / mul_scalar / softcap still runs Gemma (core fallbacks)."""
    registered("lean", cpu_like_plugin("lean", omit=("gelu_tanh_mul", "mul_scalar", "softcap", "paged_attention")))
    folder, hf = checkpoints["gemma2"]
    assert_parity(load(folder, "lean").forward_verify("x", TOKENS), reference_logits(hf, TOKENS))


# ------------------------------------------------------ property: random configs
#
# Each example is a config.json as a checkpoint could ship it (either rope spelling, any rope type transformers
# implements, every math-changing key of the family), read by transformers' AutoConfig from that very file and
# by Ferrum. Ferrum must refuse naming a key of that file, or match transformers' logits.

PROPERTY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "gemma",
                     "gemma2", "gemma3_text", "phi3", "smollm3", "granite", "olmo2", "ministral", "exaone4", "seed_oss",
                     "ernie4_5", "glm4", "hunyuan_v1_dense", "hunyuan_v1_moe", "dots1", "phi", "stablelm", "starcoder2",
                     "cohere", "cohere2", "gpt_neox", "gpt2", "gpt_bigcode", "gptj", "falcon", "olmo", "nemotron",
                     "arcee", "vaultgemma", "nanochat")
#: The LayerNorm families, and the key each reads its norms' epsilon from.
LAYER_NORM_EPS = {"phi": "layer_norm_eps", "stablelm": "layer_norm_eps", "starcoder2": "norm_epsilon",
                  "cohere": "layer_norm_eps", "cohere2": "layer_norm_eps", "gpt_neox": "layer_norm_eps",
                  "gpt2": "layer_norm_epsilon", "gpt_bigcode": "layer_norm_epsilon", "gptj": "layer_norm_epsilon",
                  "falcon": "layer_norm_epsilon", "nemotron": "norm_eps"}
#: The families that read the sizes under GPT-2's keys.
GPT2_LIKE = ("gpt2", "gpt_bigcode", "gptj")
#: GPT-2's keys for the sizes, by the usual key.
GPT2_KEYS = {"hidden_size": "n_embd", "intermediate_size": "n_inner", "num_hidden_layers": "n_layer",
             "num_attention_heads": "n_head", "max_position_embeddings": "n_positions"}
#: The families that read the usual size and rope keys.
USUAL_KEYS = tuple(f for f in PROPERTY_FAMILIES if f not in GPT2_LIKE)
#: ...of which those with an intermediate_size and num_key_value_heads (not Falcon's own keys).
SIZE_KEYS = tuple(f for f in USUAL_KEYS if f != "falcon")
#: Examples per family: about 0.1 s each on 2 cores (tiny models), all ten families in well under a minute.
PROPERTY_EXAMPLES = 15
_ACTS = ("silu", "silu", "silu", "gelu", "relu")  # weighted towards what runs, so most examples compare logits
_UNGATED_ACTS = ("relu2", "relu2", "relu2", "gelu_pytorch_tanh", "silu")  # Nemotron's and Arcee's MLP


def _rope_keys(draw, st, kinds: tuple[str, ...], half: int) -> dict:
    """Rope settings in one of the spellings transformers reads: v5 ``rope_parameters``, or v4 ``rope_theta``
    plus ``rope_scaling`` keyed ``type`` or ``rope_type``."""
    theta = draw(st.sampled_from([100.0, 10000.0, 500000.0]))
    kind = draw(st.sampled_from(kinds))
    params: dict = {}
    if kind in ("linear", "dynamic", "yarn", "llama3"):
        params["factor"] = draw(st.sampled_from([1.0, 2.0, 8.0]))
    if kind in ("llama3", "yarn", "longrope"):
        params["original_max_position_embeddings"] = draw(st.sampled_from([8, 16, 32]))
    if kind == "llama3":
        params.update(low_freq_factor=draw(st.sampled_from([1.0, 2.0])),
                      high_freq_factor=draw(st.sampled_from([4.0, 8.0])))
    if kind == "longrope":
        params.update(short_factor=[1.0 + 0.2 * i for i in range(half)],
                      long_factor=[1.5 + 0.7 * i for i in range(half)])
    spelling = draw(st.sampled_from(["v5", "v4 type", "v4 rope_type", "v4 bare"]))
    if spelling == "v4 bare" and kind == "default":
        return {"rope_theta": theta}
    if spelling == "v5":
        return {"rope_parameters": {"rope_type": kind, "rope_theta": theta, **params}}
    key = "type" if spelling == "v4 type" else "rope_type"
    return {"rope_theta": theta, "rope_scaling": {key: kind, **params}}


def draw_config(draw, st, family: str) -> dict:
    """A random valid config.json of ``family``, tiny."""
    heads = draw(st.sampled_from([2, 4]))
    kv = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0]))
    head_dim = draw(st.sampled_from([8, 16]))
    layers = draw(st.integers(1, 3))
    raw = dict(model_type=family, vocab_size=VOCAB, hidden_size=heads * head_dim,
               intermediate_size=draw(st.integers(8, 40)), num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kv, max_position_embeddings=64,
               rms_norm_eps=draw(st.sampled_from([1e-6, 1e-5, 0.1])), tie_word_embeddings=draw(st.booleans()),
               pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if draw(st.booleans()):  # head_dim other than hidden / heads
        raw["head_dim"] = head_dim = draw(st.sampled_from([8, 12, 16]))
    window = draw(st.integers(1, 12))
    if family in ("gemma2", "gemma3_text", "vaultgemma"):
        raw.update(head_dim=head_dim, sliding_window=window,
                   query_pre_attn_scalar=draw(st.sampled_from([head_dim, 100])),
                   hidden_activation=draw(st.sampled_from(["gelu_pytorch_tanh", "gelu_pytorch_tanh", "gelu"])),
                   final_logit_softcapping=draw(st.sampled_from([None, 3.0])))
        if draw(st.booleans()):
            raw["layer_types"] = draw(st.lists(st.sampled_from(["sliding_attention", "full_attention"]),
                                               min_size=layers, max_size=layers))
        if family in ("gemma2", "vaultgemma"):
            raw.update(attn_logit_softcapping=draw(st.sampled_from([None, 2.0, 20.0])),
                       **_rope_keys(draw, st, ("default", "linear", "dynamic", "yarn"), head_dim // 2))
        else:
            raw["attn_logit_softcapping"] = draw(st.sampled_from([None, None, 20.0]))
            raw["sliding_window_pattern"] = draw(st.sampled_from([2, 6]))
            local = draw(st.sampled_from([10.0, 10000.0]))
            full = _rope_keys(draw, st, ("default", "linear"), head_dim // 2)
            if "rope_parameters" in full:  # v5: one rope per attention kind
                raw["rope_parameters"] = {"full_attention": full["rope_parameters"],
                                          "sliding_attention": {"rope_type": "default", "rope_theta": local}}
            else:
                raw.update(full, rope_local_base_freq=local)
        return raw
    if family in LAYER_NORM_EPS:
        return _draw_layer_norm_family(draw, st, family, raw, head_dim, window)
    raw["hidden_act"] = draw(st.sampled_from(_ACTS))
    if family == "phi3":
        factor = draw(st.sampled_from([1.0, 0.5, 0.75]))
        raw.update(partial_rotary_factor=factor, sliding_window=draw(st.sampled_from([None, window])))
        rotary = int(head_dim * factor)
        kinds = ("default", "longrope", "su", "linear") if rotary % 2 == 0 else ("default",)
        rope = _rope_keys(draw, st, kinds, rotary // 2)
        scaling = rope.get("rope_scaling") or rope.get("rope_parameters") or {}
        if "original_max_position_embeddings" in scaling:  # Phi-3 writes it at the top level
            raw["original_max_position_embeddings"] = scaling.pop("original_max_position_embeddings")
        return {**raw, **rope}
    raw.update(_rope_keys(draw, st, ("default", "linear", "dynamic", "llama3", "llama3", "yarn", "longrope"),
                          head_dim // 2))
    if family == "llama":  # transformers' Llama ignores sliding_window; so must Ferrum
        raw.update(attention_bias=draw(st.booleans()), mlp_bias=draw(st.booleans()),
                   sliding_window=draw(st.sampled_from([None, window])))
    if family == "granite":
        raw.update(attention_bias=draw(st.booleans()), mlp_bias=draw(st.booleans()),
                   **{k: draw(st.sampled_from([1.0, 0.25, 4.0])) for k in (
                       "embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")})
    if family == "smollm3":  # NoPE layers from a list or an interval; windows from layer_types or the NoPE layers
        raw.update(attention_bias=draw(st.booleans()), mlp_bias=draw(st.booleans()),
                   use_sliding_window=draw(st.booleans()), sliding_window=draw(st.sampled_from([None, window])))
        if draw(st.booleans()):
            raw["no_rope_layers"] = draw(st.lists(st.sampled_from([0, 1]), min_size=layers, max_size=layers))
        else:
            raw["no_rope_layer_interval"] = draw(st.integers(1, 3))
        if draw(st.booleans()):
            raw["layer_types"] = draw(st.lists(st.sampled_from(["sliding_attention", "full_attention"]),
                                               min_size=layers, max_size=layers))
    if family in ("qwen2", "qwen3", "qwen3_moe", "gemma", "olmo", "olmo2"):
        raw["attention_bias"] = draw(st.booleans())
    if family == "olmo":  # OLMo 1.7's clipping, loose or tight enough to bite
        raw["clip_qkv"] = draw(st.sampled_from([None, 0.05, 8.0]))
    if family == "ernie4_5":
        raw["use_bias"] = draw(st.booleans())
    if family == "arcee":
        raw.update(hidden_act=draw(st.sampled_from(_UNGATED_ACTS)), attention_bias=draw(st.booleans()),
                   mlp_bias=draw(st.booleans()))
    if family == "nanochat":
        raw.update(hidden_act=draw(st.sampled_from(_UNGATED_ACTS)), attention_bias=draw(st.booleans()),
                   final_logit_softcapping=draw(st.sampled_from([None, 3.0, 15.0])))
    if family in ("hunyuan_v1_dense", "hunyuan_v1_moe"):  # Hunyuan's rope: "dynamic" with a fixed alpha too
        raw.update(attention_bias=draw(st.booleans()), head_dim=head_dim)  # transformers reads head_dim as is
        if draw(st.booleans()):
            raw.pop("rope_scaling", None)
            raw["rope_parameters"] = {"rope_type": "dynamic", "factor": 1.0, "rope_theta": 10000.0,
                                      "alpha": draw(st.sampled_from([1.0, 50.0, 1000.0]))}
    if family == "glm4":  # partial rotary beside the rope settings, as GLM-4-0414's config.json has it
        raw.update(attention_bias=draw(st.booleans()), partial_rotary_factor=draw(st.sampled_from([0.25, 0.5, 1.0])))
    if family == "seed_oss":
        raw.update(attention_bias=draw(st.booleans()), attention_out_bias=draw(st.booleans()),
                   mlp_bias=draw(st.booleans()))
    if family == "exaone4":  # windows (and with them NoPE full layers) from layer_types or a pattern
        raw.update(sliding_window=draw(st.sampled_from([None, window])),
                   sliding_window_pattern=draw(st.integers(1, 3)))
        if draw(st.booleans()):
            raw["layer_types"] = draw(st.lists(st.sampled_from(["sliding_attention", "full_attention"]),
                                               min_size=layers, max_size=layers))
    if family == "ministral":  # windows from layer_types, else on every layer when set
        raw.update(head_dim=head_dim, sliding_window=draw(st.sampled_from([None, window])))  # transformers needs head_dim
        if draw(st.booleans()):
            raw["layer_types"] = draw(st.lists(st.sampled_from(["sliding_attention", "full_attention"]),
                                               min_size=layers, max_size=layers))
    if family in ("mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        raw["sliding_window"] = draw(st.sampled_from([None, window, window, 0]) if family == "qwen2_moe"
                                     else st.sampled_from([None, window]))
    if family in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        raw["use_sliding_window"] = draw(st.booleans())
        raw["max_window_layers"] = draw(st.integers(0, layers))
        if family != "qwen3_moe" and draw(st.booleans()):
            raw["layer_types"] = draw(st.lists(st.sampled_from(["sliding_attention", "full_attention"]),
                                               min_size=layers, max_size=layers))
    if family in ("mixtral", "qwen2_moe", "qwen3_moe"):
        experts = draw(st.integers(2, 6))
        raw[draw(st.sampled_from(["num_experts", "num_local_experts"])) if family != "mixtral"
            else "num_local_experts"] = experts
        raw["num_experts_per_tok"] = draw(st.integers(1, experts))
    if family in ("qwen2_moe", "qwen3_moe"):
        raw.update(moe_intermediate_size=draw(st.integers(8, 24)), norm_topk_prob=draw(st.booleans()),
                   decoder_sparse_step=draw(st.integers(1, 2)),
                   mlp_only_layers=draw(st.lists(st.integers(0, layers - 1), max_size=2, unique=True)))
    if family == "qwen2_moe":
        raw.update(shared_expert_intermediate_size=draw(st.integers(8, 24)), qkv_bias=draw(st.booleans()))
    if family == "dots1":  # DeepSeek-V3's routing (groups, dense first layers), its window rule, layer_types
        experts = draw(st.sampled_from([4, 6, 8]))
        groups = draw(st.sampled_from([g for g in (1, 2, 3) if experts % g == 0 and experts // g >= 2]))
        raw.update(n_routed_experts=experts, num_experts_per_tok=draw(st.integers(1, 4)),
                   n_shared_experts=draw(st.integers(1, 2)), n_group=groups, topk_group=draw(st.integers(1, groups)),
                   moe_intermediate_size=draw(st.integers(8, 24)), norm_topk_prob=draw(st.booleans()),
                   routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])),
                   first_k_dense_replace=draw(st.integers(0, layers)), attention_bias=draw(st.booleans()),
                   sliding_window=draw(st.sampled_from([None, window])), max_window_layers=draw(st.integers(0, layers)))
        if draw(st.booleans()):
            raw["layer_types"] = draw(st.lists(st.sampled_from(["sliding_attention", "full_attention"]),
                                               min_size=layers, max_size=layers))
    if family == "hunyuan_v1_moe":  # top-k as a number or per layer, under either name; the experts' count too
        experts = draw(st.integers(1, 6))
        top_k = draw(st.integers(1, experts))
        raw[draw(st.sampled_from(["num_experts", "num_local_experts"]))] = experts
        raw.update({"moe_topk": draw(st.sampled_from([top_k, [top_k] * layers]))} if draw(st.booleans()) else
                   {"num_experts_per_tok": top_k})
    return raw


def _draw_layer_norm_family(draw, st, family: str, raw: dict, head_dim: int, window: int) -> dict:
    """Phi, StableLM, StarCoder2, Command R (1, 2): their epsilon key, activations (an unsupported one now and
    then), partial rotary, biases, StableLM's parallel block, the windows, Command R's logit scale."""
    raw[LAYER_NORM_EPS[family]] = raw.pop("rms_norm_eps")
    if family in GPT2_LIKE:  # GPT-2's keys, one head size; learned positions, or GPT-J's rope
        for usual, own in GPT2_KEYS.items():
            raw[own] = raw.pop(usual)
        del raw["num_key_value_heads"]
        head_dim = raw["n_embd"] // raw["n_head"]
        raw.pop("head_dim", None)
        raw.update(activation_function=draw(st.sampled_from(["gelu_new", "gelu", "gelu_pytorch_tanh", "relu"])),
                   scale_attn_weights=draw(st.booleans()), n_inner=draw(st.sampled_from([None, raw["n_inner"]])))
        if family == "gpt2":
            raw["scale_attn_by_inverse_layer_idx"] = draw(st.booleans())
        if family == "gpt_bigcode":
            raw["multi_query"] = draw(st.booleans())
        if family == "gptj":
            raw["rotary_dim"] = draw(st.sampled_from([None, 4, head_dim]))
        return raw
    if family == "falcon":  # its own keys for the MLP width and key/value heads; three q/k/v layouts, norms
        raw["ffn_hidden_size"] = draw(st.sampled_from([None, raw.pop("intermediate_size")]))
        raw.pop("head_dim", None)
        raw["num_kv_heads"] = raw.pop("num_key_value_heads")
        raw.update(_rope_keys(draw, st, ("default", "linear", "dynamic"), head_dim // 2),
                   activation=draw(st.sampled_from(["gelu", "gelu", "gelu_new", "relu"])),
                   **{k: draw(st.booleans()) for k in ("multi_query", "new_decoder_architecture", "parallel_attn",
                                                         "bias", "alibi")},
                   num_ln_in_parallel_attn=draw(st.sampled_from([None, 1, 2])))
        return raw
    if family == "nemotron":  # Llama's rope scalings on partial_rotary_factor (0.5) of each head, biases
        raw.update(_rope_keys(draw, st, ("default", "linear", "dynamic", "llama3", "yarn", "longrope"), head_dim // 2),
                   hidden_act=draw(st.sampled_from(_UNGATED_ACTS)), attention_bias=draw(st.booleans()),
                   mlp_bias=draw(st.booleans()))
        factor = draw(st.sampled_from([None, 0.25, 0.5, 1.0]))
        return raw if factor is None else {**raw, "partial_rotary_factor": factor}
    gated = family in ("stablelm", "cohere", "cohere2")
    acts = ("silu", "silu", "gelu") if gated else ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu")
    raw["hidden_act"] = draw(st.sampled_from(acts))
    raw.update(_rope_keys(draw, st, ("default", "linear", "dynamic"), head_dim // 2))
    if family == "gpt_neox":  # its own rope keys (Pythia's), or transformers 5's; parallel blocks or not
        raw.update(use_parallel_residual=draw(st.booleans()), attention_bias=draw(st.booleans()))
        if "rope_parameters" in raw:
            raw["rope_parameters"]["partial_rotary_factor"] = draw(st.sampled_from([0.25, 0.5, 1.0]))
        else:
            raw.update(rotary_emb_base=raw.pop("rope_theta"), rotary_pct=draw(st.sampled_from([0.25, 0.5, 1.0])))
    if family == "phi":
        raw.update(partial_rotary_factor=draw(st.sampled_from([0.25, 0.5, 1.0])), qk_layernorm=draw(st.booleans()))
    if family == "stablelm":
        raw.update(partial_rotary_factor=draw(st.sampled_from([0.25, 0.5, 1.0])), use_qkv_bias=draw(st.booleans()),
                   use_parallel_residual=draw(st.booleans()), qk_layernorm=draw(st.booleans()))
    if family == "starcoder2":
        raw.update(use_bias=draw(st.booleans()), sliding_window=draw(st.sampled_from([None, window])))
    if family in ("cohere", "cohere2"):
        raw.update(attention_bias=draw(st.booleans()), logit_scale=draw(st.sampled_from([0.0625, 1.0, 3.0])))
    if family == "cohere":  # Command R+'s q/k norms
        raw["use_qk_norm"] = draw(st.booleans())
    if family == "cohere2":
        raw.update(sliding_window=window, sliding_window_pattern=draw(st.integers(1, 4)))
        if draw(st.booleans()):
            raw["layer_types"] = draw(st.lists(st.sampled_from(["sliding_attention", "full_attention"]),
                                               min_size=raw["num_hidden_layers"], max_size=raw["num_hidden_layers"]))
    return raw


def _named_keys(raw: dict) -> set[str]:
    """Every key of a config, nested rope settings included."""
    names = set(raw)
    for value in raw.values():
        if isinstance(value, dict):
            names |= _named_keys(value)
    return names


def build_from_json(folder, raw: dict, seed: int, tokens: list[int]) -> np.ndarray | None:
    """Save transformers' model of the config.json ``raw`` (random weights) with ``raw`` as its config.json, as
    a checkpoint ships it; its logits for ``tokens``, or None when transformers cannot build or run it."""
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(raw))
    try:
        config = transformers.AutoConfig.from_pretrained(folder)
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.2)
        ref = reference_logits(model, tokens)
    except Exception:  # e.g. sliding layers without a window: transformers fails too, so the config is not valid
        return None
    model.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(raw))  # Ferrum reads the file as shipped, not re-spelled
    return ref


@pytest.mark.parametrize("family", PROPERTY_FAMILIES)
def test_random_valid_configs_match_transformers_or_are_refused_by_name(family, tmp_path_factory):
    """Draw config.json files of ``family``; Ferrum refuses naming one of their keys, or matches transformers."""
    import re

    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    outcomes = {"matched": 0, "refused": 0}

    @hypothesis.settings(max_examples=PROPERTY_EXAMPLES, deadline=None, database=None, derandomize=True,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(st.data(), st.integers(0, 2**16))
    def check(data, seed):
        raw = data.draw(st.composite(lambda draw: draw_config(draw, st, family))())
        folder = tmp_path_factory.mktemp(family)
        # longrope switches tables per token in Ferrum, per forward call in transformers (ferrum.arch.rope):
        # one forward agrees up to the original length
        length = min(20, raw.get("original_max_position_embeddings") or 20)
        tokens = [int(t) for t in np.random.RandomState(seed).randint(0, VOCAB, size=length)]
        ref = build_from_json(folder, raw, seed % 1000, tokens)
        hypothesis.assume(ref is not None)
        try:
            model = load(folder, "cpu")
        except FerrumError as exc:
            named = set(re.findall(r"'([A-Za-z_]+)'", str(exc))) & _named_keys(raw)
            assert named, f"a refusal must name a key of the config: {exc}\n{raw}"
            outcomes["refused"] += 1
            return
        got = model.forward_verify("x", tokens)
        bound = 1e-4 * max(1.0, float(np.abs(ref).max()))
        assert float(np.abs(got - ref).max()) <= bound, f"logits differ from transformers for {raw}"
        outcomes["matched"] += 1

    check()
    assert outcomes["matched"] > 0, outcomes  # the family is exercised, not only refused


@pytest.mark.parametrize("spelling", ["v5", "v4 type", "v4 rope_type"])
@pytest.mark.parametrize("kind", ["linear", "dynamic", "llama3", "yarn"])
def test_each_rope_scaling_in_each_spelling_matches_transformers(kind, spelling, tmp_path):
    """The scalings Ferrum runs for Llama-like families, written each way transformers reads."""
    params = {"factor": 4.0}
    if kind == "llama3":
        params.update(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)
    if kind == "yarn":
        params.update(original_max_position_embeddings=16)
    if spelling == "v5":
        rope = {"rope_parameters": {"rope_type": kind, "rope_theta": 500.0, **params}}
    else:
        rope = {"rope_theta": 500.0, "rope_scaling": {spelling.split()[1]: kind, **params}}
    raw = dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=40, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **rope)
    tokens = TOKENS + TOKENS[:7]
    ref = build_from_json(tmp_path, raw, 0, tokens)
    assert_parity(load(tmp_path, "cpu").forward_verify("x", tokens), ref)
    unscaled = {k: v for k, v in raw.items() if k not in ("rope_parameters", "rope_scaling")}
    plain = build_from_json(tmp_path / "plain", {**unscaled, "rope_theta": 500.0}, 0, tokens)
    assert kind == "dynamic" or np.abs(plain - ref).max() > 1e-3  # the scaling changes the logits


_BAD_NUMBERS = (0, -4, 2.5, "64", True, float("nan"))
#: key -> the invalid values drawn for it, and the families that read it.
_INVALID = {
    **{key: (_BAD_NUMBERS, USUAL_KEYS) for key in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings")},
    **{key: (_BAD_NUMBERS, SIZE_KEYS) for key in ("intermediate_size", "head_dim")},
    "ffn_hidden_size": (_BAD_NUMBERS, ("falcon",)),
    "num_kv_heads": ((0, -1, 1.5, "2"), ("falcon",)),
    **{key: (_BAD_NUMBERS, GPT2_LIKE) for key in GPT2_KEYS.values()},
    "vocab_size": (_BAD_NUMBERS, PROPERTY_FAMILIES),
    "num_key_value_heads": ((0, -1, 3, 1.5, "2"), SIZE_KEYS),  # 3 divides no drawn head count
    "rms_norm_eps": ((0, -1e-6, "1e-6", float("nan")),  # OLMo 1 fixes its epsilon
                     tuple(f for f in PROPERTY_FAMILIES if f not in LAYER_NORM_EPS and f != "olmo")),
    "layer_norm_eps": ((0, -1e-6, "1e-6", float("nan")), ("phi", "stablelm", "cohere", "cohere2", "gpt_neox")),
    "layer_norm_epsilon": ((0, -1e-6, "1e-6", float("nan")), (*GPT2_LIKE, "falcon")),
    "rotary_dim": ((0, -4, 2.5, "8"), ("gptj",)),
    "rotary_pct": ((0, -0.5, 1.5, "0.5"), ("gpt_neox",)),
    "logit_scale": ((0, -0.5, "0.0625"), ("cohere", "cohere2")),
    "norm_epsilon": ((0, -1e-6, "1e-6", float("nan")), ("starcoder2",)),
    "norm_eps": ((0, -1e-6, "1e-6", float("nan")), ("nemotron",)),
    "rope_theta": ((0, -10000.0, "1e4", True, float("-inf")), USUAL_KEYS),
    "factor": ((0, -2.0, "2", None), tuple(f for f in USUAL_KEYS if f not in ("gemma2", "gemma3_text", "phi3",
                                                                              "vaultgemma"))),
    "sliding_window": ((-1, 2.5, "8", True), ("mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe",
                                             "gemma2", "gemma3_text", "phi3", "starcoder2", "vaultgemma")),
    "tie_word_embeddings": (("yes", 1, 0.0), PROPERTY_FAMILIES),
    "num_experts_per_tok": ((0, -1, 99, "2"), ("mixtral", "qwen2_moe", "qwen3_moe")),
    "moe_intermediate_size": ((0, -8, "16"), ("qwen2_moe", "qwen3_moe")),
    "decoder_sparse_step": ((0, -1, 1.5), ("qwen2_moe", "qwen3_moe")),
    "query_pre_attn_scalar": ((0, -1.0, "8"), ("gemma2", "gemma3_text", "vaultgemma")),
    "rope_local_base_freq": ((0, -1.0, "1e4"), ("gemma3_text",)),
    "partial_rotary_factor": ((0, -0.5, 1.5, "0.5"), ("phi3", "phi", "stablelm", "nemotron")),
    "layer_types": ((["sliding_attention"] * 9, ["local"], "full_attention"), ("qwen2", "qwen3", "gemma2",
                                                                               "gemma3_text", "vaultgemma")),
}


def _with_invalid(raw: dict, key: str, value) -> dict:
    raw = json.loads(json.dumps(raw))
    if key == "factor":  # inside the rope settings, in the spelling the config uses
        raw.pop("rope_parameters", None)
        raw["rope_scaling"] = {"rope_type": "linear", "factor": value}
    elif key == "rope_theta" and isinstance(raw.get("rope_parameters"), dict):
        for params in (raw["rope_parameters"], *raw["rope_parameters"].values()):
            if isinstance(params, dict) and "rope_theta" in params:
                params["rope_theta"] = value
    else:
        raw[key] = value
    return raw


def test_random_invalid_values_are_refused_naming_the_key():
    """One key of a valid config made invalid (non-positive, wrong type, out of range): ConfigError naming it."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    cases = [(key, family) for key, (_, families) in _INVALID.items() for family in families]

    @hypothesis.settings(max_examples=300, deadline=None, database=None, derandomize=True,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(st.data())
    def check(data):
        key, family = data.draw(st.sampled_from(cases))
        raw = data.draw(st.composite(lambda draw: draw_config(draw, st, family))())
        try:
            ModelConfig.from_dict(raw)
        except FerrumError:
            hypothesis.assume(False)  # a config Ferrum refuses already (an unsupported setting)
        value = data.draw(st.sampled_from(_INVALID[key][0]))
        with pytest.raises(ConfigError) as caught:
            ModelConfig.from_dict(_with_invalid(raw, key, value))
        assert f"'{key}'" in str(caught.value), f"{family} {key}={value!r}: {caught.value}"

    check()


# ------------------------------------------- random checkpoints and packed weights


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "phi3", "nemotron", "nanochat"])
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


@pytest.mark.parametrize("family, settings, top", [
    ("qwen2", {"beta_fast": 16, "beta_slow": 2, "mscale": 0.7, "mscale_all_dim": 1.0}, {}),
    ("qwen3", {"truncate": False}, {"original_max_position_embeddings": 12}),  # top level wins, as in transformers
    ("mistral", {"attention_factor": 1.3}, {}),
    ("llama", {"mscale": 1.0, "mscale_all_dim": 0.0}, {}),  # 0: unset, as DeepSeek's configs write it
    ("llama", {"beta_fast": None, "beta_slow": None, "truncate": None}, {}),  # null: the defaults; no rounding
])
def test_yarn_options_match_transformers(family, settings, top, tmp_path):
    """YaRN's ramp bounds, its attention factor (given, or from mscale) and where the pretraining context is read."""
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, **settings}
    raw = dict(model_type=family, vocab_size=VOCAB, hidden_size=64, intermediate_size=40, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0,
               rope_scaling=rope, **top)
    tokens = TOKENS + TOKENS[:7]
    ref = build_from_json(tmp_path, raw, 0, tokens)
    for backend in RUNNABLE:
        assert_parity(load(tmp_path, backend).forward_verify("x", tokens), ref)


@pytest.mark.parametrize("scaled_to, max_position_embeddings", [(64, 16), (64, 64), (32, 64)])
def test_yarn_added_to_a_config_opens_the_context_it_scales_to(scaled_to, max_position_embeddings, tmp_path):
    """Qwen2.5's and Qwen3's model cards have users add YaRN (factor 4 over the pretraining context) to a config
    whose max_position_embeddings stays the pretraining one: the model runs original x factor tokens, as
    transformers runs them (vLLM's context reads so too); Ferrum refused them past max_position_embeddings. A
    context already longer than YaRN's stays."""
    rope = {"type": "yarn", "factor": scaled_to / 16, "original_max_position_embeddings": 16}
    raw = dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=40, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
               rope_theta=500.0, rope_scaling=rope)
    tokens = (TOKENS * 8)[:max(scaled_to, max_position_embeddings)]
    ref = build_from_json(tmp_path, raw, 0, tokens)
    model = load(tmp_path, "cpu")
    assert model.config.max_seq_len == max(scaled_to, max_position_embeddings)
    assert_parity(model.forward_verify("x", tokens), ref)
    with pytest.raises(ContextLengthExceededError):
        model.forward_verify("y", tokens + [1])


def test_gemma3_null_local_rope_base_takes_the_sliding_layers_rope_parameters(tmp_path):
    """transformers 5 reads the sliding layers' theta from rope_parameters and ignores a null rope_local_base_freq
    beside it (configs saved across versions carry both); Ferrum refused the null."""
    rope = {"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 300.0}}
    raw = dict(model_type="gemma3_text", vocab_size=VOCAB, hidden_size=64, intermediate_size=40, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
               sliding_window=8, sliding_window_pattern=2, query_pre_attn_scalar=16, rope_parameters=rope,
               rope_local_base_freq=None)
    ref = build_from_json(tmp_path, raw, 0, TOKENS)
    model = load(tmp_path, "cpu")
    assert [layer.rope.theta for layer in model.config.arch.layers] == [300.0, 1_000_000.0]
    assert_parity(model.forward_verify("x", TOKENS), ref)


@pytest.mark.parametrize("backend", RUNNABLE)
@pytest.mark.parametrize("family, stored", [("phi", "mlp.fc1"), ("starcoder2", "mlp.c_fc")])
def test_packed_layer_norm_families_match_the_oracle(backend, family, stored, tmp_path):
    """Packed at 8 bits under the checkpoint's own names (Phi-2's fc1 / fc2 / dense, StarCoder2's c_fc / c_proj),
    Phi-2's LM head keeping its bias, against the float64 oracle computing with the dequantized values."""
    from safetensors import safe_open

    from ferrum.quant.convert import quantize_checkpoint
    from ferrum.random_checkpoint import write_random_checkpoint
    from ferrum.testing.arch_oracle import ArchOracle
    from ferrum.testing.family_checks import FAMILY_MODELS

    folder = write_random_checkpoint(tmp_path / family, FAMILY_MODELS[family], dtype="float32", std=0.2)
    packed = quantize_checkpoint(folder, tmp_path / "packed", bits=8, group_size=32)
    with safe_open(str(packed / "model.safetensors"), "np") as handle:
        assert f"model.layers.0.{stored}.scales" in handle.keys()
    got = load(packed, backend, dtype="float32").forward_verify("x", TOKENS)
    assert_parity(got, ArchOracle(packed).logits(TOKENS))


@pytest.mark.skipif("mlx" not in RUNNABLE, reason="the MLX backend cannot run here")
def test_quantized_phi_runs_as_in_mlx_lm(checkpoints, tmp_path):
    """``ferrum quantize`` of a Phi-2 checkpoint: mlx-lm loads the result and computes Ferrum's logits."""
    mx = pytest.importorskip("mlx.core")
    mlx_utils = pytest.importorskip("mlx_lm.utils")
    import shutil

    from ferrum.quant.convert import quantize_checkpoint

    source = tmp_path / "phi"
    shutil.copytree(checkpoints["phi"][0], source)
    path = source / "config.json"
    path.write_text(json.dumps(_mlx_lm_config(json.loads(path.read_text()))))
    packed = quantize_checkpoint(source, tmp_path / "packed", bits=4, group_size=32)
    loaded = mlx_utils.load_model(packed)
    reference_model = loaded[0] if isinstance(loaded, tuple) else loaded
    ref = np.array(reference_model(mx.array([TOKENS])).astype(mx.float32))[0]
    assert_parity(load(packed, "mlx", dtype="float32").forward_verify("q", TOKENS), ref)


@pytest.mark.parametrize("backend", RUNNABLE)
@pytest.mark.parametrize("family, stored", [("gpt_neox", "attention.query_key_value"), ("gptj", "mlp.fc_in"),
                                            ("gpt_bigcode", "attn.c_attn"), ("cohere_qk_norm", "self_attn.q_proj")])
def test_packed_gpt_families_match_the_oracle(checkpoints, backend, family, stored, tmp_path):
    """Packed at 8 bits under their own names: GPT-NeoX's per-head q/k/v rows reordered as packed rows, GPT-J's
    biased LM head, GPT-BigCode's single key/value head; Command R+'s q/k norm weights per head stay float."""
    from safetensors import safe_open

    from ferrum.quant.convert import quantize_checkpoint
    from ferrum.testing.arch_oracle import ArchOracle

    packed = quantize_checkpoint(checkpoints[family][0], tmp_path / "packed", bits=8, group_size=32)
    with safe_open(str(packed / "model.safetensors"), "np") as handle:
        assert any(name.endswith(f".0.{stored}.scales") for name in handle.keys())
        assert not any("norm" in name and name.endswith(".scales") for name in handle.keys())
    got = load(packed, backend, dtype="float32").forward_verify("x", TOKENS)
    assert_parity(got, ArchOracle(packed).logits(TOKENS))


def test_gpt2_is_refused_by_ferrum_quantize_by_name(checkpoints, tmp_path):
    from ferrum.quant.convert import quantize_checkpoint

    with pytest.raises(UnsupportedFeatureError, match="Conv1D"):
        quantize_checkpoint(checkpoints["gpt2"][0], tmp_path / "packed", bits=4, group_size=32)
    assert not (tmp_path / "packed").exists()


@pytest.mark.parametrize("model_type, left_out", [
    ("mixtral", "rope"), ("ernie4_5", "rope"), ("smollm3", "rope"), ("cohere", "rope"), ("olmo2", "rms_norm_eps"),
    ("falcon", "max_position_embeddings"), ("gpt2", "n_positions"), ("gpt_bigcode", "n_positions"),
    ("gptj", "n_positions"), ("llama", "max_position_embeddings"), ("llama", "vocab_size"),
    ("mistral", "vocab_size"), ("mistral", "max_position_embeddings"), ("gemma3_text", "sizes"),
    ("nemotron", "rope"), ("nemotron", "vocab_size"), ("arcee", "max_position_embeddings"),
    ("nanochat", "sizes"), ("nanochat", "rms_norm_eps"), ("nanochat", "rope"), ("gemma2", "sliding_window"),
    ("vaultgemma", "sliding_window"), ("starcoder2", "num_key_value_heads"),
])
def test_a_left_out_key_takes_the_transformers_default(model_type, left_out):
    """A hand-written config.json (or an old release's: Falcon's first had no context length) that leaves a key
    out means what transformers reads it as: its config class's default."""
    import transformers

    reference = transformers.CONFIG_MAPPING[model_type]()
    raw = reference.to_dict()
    sizes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "head_dim", "vocab_size", "max_position_embeddings", "sliding_window")
    dropped = {"rope": ("rope_parameters", "rope_scaling", "rope_theta"), "sizes": sizes}.get(left_out, (left_out,))
    ours = ModelConfig.from_dict({k: v for k, v in raw.items() if k not in dropped})
    if left_out == "rope":
        assert ours.arch.layers[0].rope.theta == reference.rope_parameters["rope_theta"]
    elif left_out == "rms_norm_eps":
        assert ours.rms_norm_eps == reference.rms_norm_eps
    elif left_out in ("n_positions", "max_position_embeddings"):
        assert ours.max_seq_len == reference.max_position_embeddings
    else:
        read = {"num_attention_heads": ours.num_heads, "num_key_value_heads": ours.num_kv_heads,
                "head_dim": ours.head_dim, "vocab_size": ours.vocab_size, "hidden_size": ours.hidden_size,
                "intermediate_size": ours.intermediate_size, "num_hidden_layers": ours.num_layers,
                "max_position_embeddings": ours.max_seq_len,
                "sliding_window": max(layer.window or 0 for layer in ours.arch.layers)}
        want = {k: getattr(reference, k, None) for k in dropped}
        if "head_dim" in want and want["head_dim"] is None:  # a class without one (nanochat's) splits hidden_size
            want["head_dim"] = reference.hidden_size // reference.num_attention_heads
        if "sliding_window" in want and want["sliding_window"] is None:  # ...or without windows
            want["sliding_window"] = 0
        assert {k: read[k] for k in dropped} == want


def test_gemma_3s_released_multimodal_config_reads_as_transformers_reads_it():
    """google/gemma-3-4b-it's config.json gives its text model five sizes and leaves the rest to Gemma3TextConfig's
    defaults (8 heads of 256 dims, 4 key/value heads, a 262,208-token vocabulary); it was refused."""
    import transformers

    text = {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024}
    raw = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "text_config": text,
           "vision_config": {"model_type": "siglip_vision_model"}, "eos_token_id": [1, 106]}
    ours = ModelConfig.from_dict(raw)
    reference = transformers.Gemma3Config(text_config=text, vision_config=raw["vision_config"]).text_config
    assert (ours.num_heads, ours.num_kv_heads, ours.head_dim, ours.vocab_size, ours.max_seq_len) == (
        reference.num_attention_heads, reference.num_key_value_heads, reference.head_dim, reference.vocab_size,
        reference.max_position_embeddings)
    full, sliding = reference.rope_parameters["full_attention"], reference.rope_parameters["sliding_attention"]
    layers = ours.arch.layers
    assert [layer.window for layer in layers[:6]] == [1024] * 5 + [None]
    assert (layers[5].rope.theta, layers[5].rope.kind, layers[5].rope.factor) == (
        full["rope_theta"], full["rope_type"], full["factor"])
    assert (layers[0].rope.theta, layers[0].rope.kind) == (sliding["rope_theta"], sliding["rope_type"])


_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
_LONGROPE = {"type": "longrope", "short_factor": [1.0] * 12, "long_factor": [3.0] * 12}


@pytest.mark.parametrize("model_type, top, scaling", [
    ("llama", 16, {**_LLAMA3, "original_max_position_embeddings": 64}),
    ("llama", None, _LLAMA3),
    ("llama", 16, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    ("phi3", 16, {**_LONGROPE, "original_max_position_embeddings": 64}),
    ("phi3", 16, _LONGROPE),
    ("phi3", None, {**_LONGROPE, "original_max_position_embeddings": 64}),  # Phi3Config's own default wins
], ids=["llama3-both", "llama3-neither", "yarn-both", "longrope-both", "longrope-top", "longrope-settings"])
def test_the_pretraining_context_is_read_where_transformers_reads_it(model_type, top, scaling, tmp_path):
    """llama3, YaRN and longrope's original_max_position_embeddings: the top level first, then the rope settings,
    then max_position_embeddings (llama3 without one was refused; the settings' value used to win)."""
    import transformers

    raw = dict(model_type=model_type, vocab_size=97, hidden_size=96, intermediate_size=80, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0,
               rope_scaling=scaling, pad_token_id=0, **({} if top is None else {"original_max_position_embeddings": top}))
    (tmp_path / "config.json").write_text(json.dumps(raw))
    # the settings the model runs with: building it settles them again (its config alone may still say otherwise)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(tmp_path))
    expected = model.config.rope_parameters
    assert ModelConfig.from_dict(raw).arch.layers[0].rope.original_max == expected["original_max_position_embeddings"]
