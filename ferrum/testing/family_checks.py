"""Conformance checks for what the model families beyond Llama need: GeGLU, LayerNorm, GELU, squared ReLU,
xIELU, BitNet's per-token activation quantization, the recurrent mixers' ops (gated attention's sigmoid gate,
the causal convolution, Gated DeltaNet's rule, Mamba-2's state-space recurrence, Mamba-1's selective scan, Griffin's
RG-LRU),
scaling, soft-capping, clipping, sinks, and one whole tiny model per family (Gemma 2, Gemma 3, gpt-oss, Qwen3-MoE,
Phi-3 with longrope and partial rotary, Phi-2, StarCoder2, Command R+, OLMo 1.7, Nemotron, Llama 4, nanochat)
against the float64 :class:`ferrum.testing.arch_oracle.ArchOracle`.

A backend whose attention takes no ``softcap`` (or no ``sinks``) is not failed:
it is never handed such a model (Ferrum refuses it at load), so those checks
and the Gemma 2 model are left out of its report.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ferrum.arch.alibi import ALIBI_SINCE, alibi_slopes
from ferrum.backends import declared_version
from ferrum.random_checkpoint import write_random_checkpoint
from ferrum.testing import arch_oracle

#: Tiny models with the awkward sizes: head_dim != hidden / heads, windows shorter than the prompt.
FAMILY_MODELS: dict[str, dict] = {
    "gemma2": dict(
        architectures=["Gemma2ForCausalLM"], model_type="gemma2", hidden_size=64, intermediate_size=80,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=24, vocab_size=97,
        max_position_embeddings=256, sliding_window=3, query_pre_attn_scalar=40,
        attn_logit_softcapping=4.0, final_logit_softcapping=6.0, tie_word_embeddings=True,
    ),
    "gemma3_text": dict(
        architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", hidden_size=56, intermediate_size=80,
        num_hidden_layers=2, num_attention_heads=7, num_key_value_heads=1, head_dim=48, vocab_size=97,
        max_position_embeddings=256, sliding_window=3, layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=48, rope_theta=1000000.0, rope_local_base_freq=100.0, tie_word_embeddings=True,
    ),
    "gpt_oss": dict(  # sinks, biased experts with the clamped SwiGLU (clamped low so that it bites), YaRN
        architectures=["GptOssForCausalLM"], model_type="gpt_oss", hidden_size=64, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=97,
        num_local_experts=4, num_experts_per_tok=2, swiglu_limit=0.5, sliding_window=3,
        max_position_embeddings=131072, tie_word_embeddings=False,
    ),
    "qwen3_moe": dict(  # routed experts, one matrix per expert as Hugging Face stores them, q/k norms
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=64, intermediate_size=96,
        moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=97, max_position_embeddings=256,
        tie_word_embeddings=False,
    ),
    "phi3": dict(  # Phi-4-mini style: partial rotary, tied; longrope switching at 8 (the prompt crosses it)
        architectures=["Phi3ForCausalLM"], model_type="phi3", hidden_size=96, intermediate_size=80,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
        max_position_embeddings=256, original_max_position_embeddings=8, partial_rotary_factor=0.5,
        rope_theta=10000.0, tie_word_embeddings=True, pad_token_id=0,
        rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.3 * i for i in range(6)],
                      "long_factor": [2.0 + 0.5 * i for i in range(6)]},
    ),
    "phi": dict(  # Phi-2 style: LayerNorms, a parallel block, an ungated MLP, partial rotary; q/k LayerNorms too
        architectures=["PhiForCausalLM"], model_type="phi", hidden_size=96, intermediate_size=80,
        num_hidden_layers=2, num_attention_heads=4, vocab_size=97, max_position_embeddings=256,
        partial_rotary_factor=0.5, qk_layernorm=True, hidden_act="gelu_new", tie_word_embeddings=False,
    ),
    "starcoder2": dict(  # biased LayerNorms and projections, the exact GELU, a window shorter than the prompt, tied
        architectures=["Starcoder2ForCausalLM"], model_type="starcoder2", hidden_size=64, intermediate_size=80,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
        max_position_embeddings=256, sliding_window=3, hidden_act="gelu", tie_word_embeddings=True,
    ),
    "cohere": dict(  # Command R+: a parallel block, adjacent-pair rope, q and k LayerNormed with a weight per head
        architectures=["CohereForCausalLM"], model_type="cohere", hidden_size=64, intermediate_size=80,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
        max_position_embeddings=256, logit_scale=0.5, use_qk_norm=True, tie_word_embeddings=True,
    ),
    "olmo": dict(  # OLMo 1.7: LayerNorms without parameters, q, k and v clipped (low, so that it bites)
        architectures=["OlmoForCausalLM"], model_type="olmo", hidden_size=64, intermediate_size=80,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
        max_position_embeddings=256, clip_qkv=0.5, tie_word_embeddings=False,
    ),
    "nemotron": dict(  # LayerNorm1P (1 + w, biased), a squared-ReLU ungated MLP, partial rotary, every bias
        architectures=["NemotronForCausalLM"], model_type="nemotron", hidden_size=64, intermediate_size=80,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=24, vocab_size=97,
        max_position_embeddings=256, partial_rotary_factor=0.5, attention_bias=True, mlp_bias=True,
        tie_word_embeddings=False,
    ),
    "llama4_text": dict(  # Llama 4: chunks of 8 (prompt and decode cross them), a NoPE layer with the temperature
        # (floor 4), weightless q/k norms, interleaved rope, dense and sparse layers (top-1 sigmoid routing weighing
        # the expert's input, a shared expert), head_dim != hidden / heads
        architectures=["Llama4ForCausalLM"], model_type="llama4_text", hidden_size=64, intermediate_size=32,
        intermediate_size_mlp=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
        vocab_size=97, num_local_experts=4, interleave_moe_layer_step=2, attention_chunk_size=8, floor_scale=4,
        attn_scale=0.5, max_position_embeddings=256, rope_theta=500.0, tie_word_embeddings=False,
    ),
    "nanochat": dict(  # weightless RMSNorms (the embeddings' too), rope turning the other way (frequencies negated),
        # q/k normed after it, a squared-ReLU ungated MLP, every attention bias, logits soft-capped (low, so it bites)
        architectures=["NanoChatForCausalLM"], model_type="nanochat", hidden_size=64, intermediate_size=80,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
        max_position_embeddings=256, attention_bias=True, final_logit_softcapping=3.0, tie_word_embeddings=False,
    ),
    "bloom": dict(  # ALiBi (six heads: past the power of two), the embeddings LayerNormed, q/k/v grouped by head
        architectures=["BloomForCausalLM"], model_type="bloom", hidden_size=96, n_layer=2, n_head=6, vocab_size=97,
        tie_word_embeddings=True,
    ),
}


def _compare(got: np.ndarray, ref: np.ndarray, tolerance: float) -> float:
    from ferrum.testing.conformance import _compare as compare  # the kit's rule; imported late (it imports us)

    return compare(got, ref, tolerance)


def _attention_case(c: Any, q_len: int, kv_len: int) -> tuple:
    q, k, v = (c.rounded(c.random(n, h, 24)) for n, h in ((q_len, 6), (kv_len, 2), (kv_len, 2)))
    return q * 4, k, v  # scores of several units, so a cap of 2 bites


def check_gelu_tanh_mul(c: Any, tol: float) -> float:
    g, u = c.rounded(c.random(6, 80) * 3), c.rounded(c.random(6, 80))
    return _compare(c.get(c.ops.gelu_tanh_mul(c.put(g), c.put(u))), arch_oracle.gelu_tanh_mul(g, u), tol)


def check_layer_norm(c: Any, tol: float) -> float:
    """Rows far from zero mean (so that the mean matters): with a bias, without one (per head), with neither;
    and rows whose variance is near eps (so that eps matters)."""
    x, w, b = c.rounded(c.random(6, 80) * 3 + 2), c.rounded(c.random(80)), c.rounded(c.random(80))
    heads = c.rounded(c.random(5, 4, 24) + 1)
    w24 = c.rounded(c.random(24))
    flat = c.rounded(c.random(6, 80) * 0.05 + 1)
    return max(_compare(c.get(c.ops.layer_norm(c.put(x), c.put(w), c.put(b), 1e-5)),
                        arch_oracle.layer_norm(x, w, b, 1e-5), tol),
               _compare(c.get(c.ops.layer_norm(c.put(flat), c.put(w), c.put(b), 1e-3)),
                        arch_oracle.layer_norm(flat, w, b, 1e-3), tol),
               _compare(c.get(c.ops.layer_norm(c.put(heads), c.put(w24), None, 1e-5)),
                        arch_oracle.layer_norm(heads, w24, None, 1e-5), tol),
               _compare(c.get(c.ops.layer_norm(c.put(x), None, None, 1e-5)),  # OLMo's: no parameters
                        arch_oracle.layer_norm(x, None, None, 1e-5), tol))


def check_gelu(c: Any, tol: float) -> float:
    x = c.rounded(c.random(6, 80) * 3)
    return max(_compare(c.get(c.ops.gelu(c.put(x), tanh)), arch_oracle.gelu(x, tanh), tol) for tanh in (True, False))


def check_relu_squared(c: Any, tol: float) -> float:
    """Values on both sides of zero, some exactly at it, and negatives far from it (squared if not cut); the result
    in ``x``'s dtype, each value one the compute dtype holds (a float32 result of a bfloat16 input is not)."""
    x = c.random(6, 80) * 3
    x[0, :4] = [0.0, -0.0, -8.0, 8.0]
    x = c.rounded(x)
    got = c.get(c.ops.relu_squared(c.put(x)))
    assert np.array_equal(got, c.rounded(got)), f"relu_squared's result is not in the compute dtype {c.dtype}"
    return _compare(got, np.square(np.maximum(x, 0.0)), tol)


def check_relu(c: Any, tol: float) -> float:
    """Values on both sides of zero, some exactly at it; the result in ``x``'s dtype."""
    x = c.random(6, 80) * 3
    x[0, :4] = [0.0, -0.0, -8.0, 8.0]
    x = c.rounded(x)
    got = c.get(c.ops.relu(c.put(x)))
    assert np.array_equal(got, c.rounded(got)), f"relu's result is not in the compute dtype {c.dtype}"
    return _compare(got, np.maximum(x, 0.0), tol)


#: xIELU's coefficients in the check: slopes as Apertus's layers learn them (softplus taken), its beta and eps.
XIELU_CASE = (0.75, 0.875, 0.5, -1e-6)


def xielu(x: np.ndarray, alpha_p: float, alpha_n: float, beta: float, eps: float) -> np.ndarray:
    """transformers' xIELU in float64 from its slopes (``ferrum.hookspec.xielu``)."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(x > 0, alpha_p * x * x + beta * x, (np.expm1(np.minimum(x, eps)) - x) * alpha_n + beta * x)


def check_xielu(c: Any, tol: float) -> float:
    """Both sides of zero, zero itself (on the negative side: ``expm1(eps) * alpha_n``), values between eps and 0,
    and negatives far from it (where ``expm1`` saturates at -1 and ``-x * alpha_n + beta * x`` remains); the
    coefficients as the compute dtype holds them, the result in it."""
    x = c.random(6, 80) * 3
    x[0, :6] = [0.0, -0.0, -8.0, 8.0, -1e-7, -30.0]
    x = c.rounded(x)
    coeffs = c.rounded(np.array(XIELU_CASE, dtype=np.float32))
    got = c.get(c.ops.xielu(c.put(x), *(float(v) for v in XIELU_CASE)))
    assert np.array_equal(got, c.rounded(got)), f"xielu's result is not in the compute dtype {c.dtype}"
    return _compare(got, xielu(x, *(float(v) for v in coeffs)), tol)


def quantized_codes(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """``ferrum.hookspec.quantize_activations``'s integer codes of each row of ``x`` and the row's scale, in float32
    as the hookspec fixes them (a float64 product can round the other way at a tie float32 lands on)."""
    x = np.asarray(x, dtype=np.float32)
    largest = np.maximum(np.max(np.abs(x), axis=-1, keepdims=True), np.float32(1e-5))
    scale = np.float32(levels) / largest
    return np.clip(np.rint(x * scale), -levels - 1, levels), scale


def check_quantize_activations(c: Any, tol: float) -> float:
    """BitNet's per-token int8 rows: random rows of several sizes, a row of exact halves of its grid (rounded to
    even), a row of zeros and one below the 1e-5 floor of the largest magnitude. The result is in the compute
    dtype, and each of its values, times the row's scale, is the oracle's integer code (exactly, in any dtype: a
    code one off, or codes computed in bfloat16, fail); values within the dtype's tolerance."""
    rng = np.random.default_rng(12)  # its own draws: the other checks' inputs stay as they were
    x = rng.standard_normal((7, 40)).astype(np.float32) * np.float32([[3], [0.1], [40], [1], [1], [1], [1]])
    x[3] = np.arange(40) - 19.5  # with 127 the largest: the grid's step is 1, every other value ends in .5
    x[3, 0] = 127
    x[4] = 0.0
    x[5] *= np.float32(2e-6)  # largest magnitude under the floor: the scale is 127 / 1e-5
    x = c.rounded(x)
    got = c.get(c.ops.quantize_activations(c.put(x), 127))
    assert np.array_equal(got, c.rounded(got), equal_nan=True), (
        f"quantize_activations' result is not in the compute dtype {c.dtype}")
    codes, scale = quantized_codes(x, 127)
    wrong = np.argwhere(np.rint(got * scale) != codes)
    if wrong.size:
        row, col = (int(i) for i in wrong[0])
        raise AssertionError(f"{len(wrong)} values off the oracle's integer grid, first at [{row}, {col}]: code "
                             f"{got[row, col] * scale[row, 0]:g}, expected {codes[row, col]:g}")
    return _compare(got, codes / scale.astype(np.float64), tol)


def check_fake_quantize(c: Any, tol: float) -> float:
    """AFM's int8 keys and values: random values past the grid's ends on both sides, exact halves of the step
    (rounded to even) and zeros, at two steps. The result is in the compute dtype, and each value over the step is the
    float32 oracle's integer code (exactly: a code one off, an end clipped at +-128, fail); values within the dtype's
    tolerance."""
    rng = np.random.default_rng(31)
    x = rng.standard_normal((6, 40)).astype(np.float32) * np.float32([[0.3], [3], [1], [1], [0.01], [1]])
    x[2] = (np.arange(40) - 19.5) * np.float32(0.25)  # every other value half a step of 0.25 off the grid
    x[3, :20], x[3, 20:] = np.linspace(-40, -31, 20), np.linspace(31, 40, 20)  # past both ends at 0.25
    x[5] = 0.0
    x = c.rounded(x)
    worst = 0.0
    for scale in (0.25, 0.0123):
        got = c.get(c.ops.fake_quantize(c.put(x), scale, -128, 127))
        assert np.array_equal(got, c.rounded(got)), f"fake_quantize's result is not in the compute dtype {c.dtype}"
        codes = np.clip(np.rint(x / np.float32(scale)), -128, 127)
        wrong = np.argwhere(np.rint(got / np.float32(scale)) != codes)
        if wrong.size:
            row, col = (int(i) for i in wrong[0])
            raise AssertionError(f"{len(wrong)} values off the oracle's grid at step {scale}, first at [{row}, {col}]: "
                                 f"code {got[row, col] / scale:g}, expected {codes[row, col]:g}")
        worst = max(worst, _compare(got, codes * np.float64(np.float32(scale)), tol))
    return worst


def check_sigmoid_mul(c: Any, tol: float) -> float:
    gate, x = c.rounded(c.random(5, 48) * 4), c.rounded(c.random(5, 48))
    return _compare(c.get(c.ops.sigmoid_mul(c.put(gate), c.put(x))), x / (1.0 + np.exp(-gate)), tol)


def check_softplus_mul(c: Any, tol: float) -> float:
    """Gates far below and above zero too, where softplus is 0 and the gate itself."""
    gate, x = c.rounded(c.random(5, 48) * 4), c.rounded(c.random(5, 48))
    gate[0, :4] = [-30.0, 30.0, 0.0, -0.0]
    got = c.get(c.ops.softplus_mul(c.put(gate), c.put(x)))
    assert np.array_equal(got, c.rounded(got)), f"softplus_mul's result is not in the compute dtype {c.dtype}"
    return _compare(got, x * np.logaddexp(0.0, gate), tol)


#: A varlen batch of the recurrent checks: a prompt chunk, a decode token, and a longer chunk.
_SEGMENTS = np.array([0, 4, 5, 11], dtype=np.int32)


def conv1d_oracle(x: np.ndarray, weight: np.ndarray, state: np.ndarray, cu: np.ndarray,
                  silu: bool) -> tuple[np.ndarray, np.ndarray]:
    """``ferrum.hookspec.causal_conv1d`` in float64, channel by channel as ``numpy.convolve`` computes it."""
    x, weight, state = (np.asarray(a, dtype=np.float64) for a in (x, weight, state))
    taps = weight.shape[1]
    y, new_state = np.zeros_like(x), np.zeros_like(state)
    for b in range(len(cu) - 1):
        seq = np.concatenate([state[b], x[cu[b]:cu[b + 1]].T], axis=1)  # [C, K - 1 + n]
        for ch in range(x.shape[1]):
            y[cu[b]:cu[b + 1], ch] = np.convolve(seq[ch], weight[ch, ::-1], mode="valid")
        new_state[b] = seq[:, seq.shape[1] - (taps - 1):]
    return (y / (1.0 + np.exp(-y)) if silu else y), new_state


def gated_delta_oracle(q, k, v, a, b, a_log, dt_bias, state, cu, beta_scale: float = 1.0,
                       lower_bound: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``ferrum.hookspec.gated_delta_rule`` in float64, head by head with matrix products (API 1.20's gate per key
    channel where ``a`` is ``[T, H, Dk]``, one decay per row of the head's state; API 1.27's bounded log-decay)."""
    q, k, v, a, b, a_log, dt_bias, state = (np.asarray(t, dtype=np.float64)
                                            for t in (q, k, v, a, b, a_log, dt_bias, state))
    group = v.shape[1] // q.shape[1]
    out, new_state = np.zeros_like(v), state.copy()
    for s in range(len(cu) - 1):
        for t in range(cu[s], cu[s + 1]):
            for h in range(v.shape[1]):
                qh, kh = q[t, h // group], k[t, h // group]
                qh = qh / np.sqrt(qh @ qh + 1e-6) / np.sqrt(len(qh))
                kh = kh / np.sqrt(kh @ kh + 1e-6)
                x = a[t, h] + dt_bias[h]  # a number, or one per key channel
                g = (-np.exp(a_log[h]) * np.log1p(np.exp(x)) if lower_bound is None else
                     lower_bound / (1.0 + np.exp(-np.exp(a_log[h]) * x)))
                beta = beta_scale / (1.0 + np.exp(-b[t, h]))
                S = new_state[s, h] * np.exp(g)[..., None]
                S = S + np.outer(kh, (v[t, h] - kh @ S) * beta)
                new_state[s, h] = S
                out[t, h] = qh @ S
    return out, new_state


def check_causal_conv1d(c: Any, tol: float) -> float:
    """Three segments (one a single token) each after a state of its own; with SiLU and without; the state given
    is left as it was."""
    taps, channels = 4, 40
    x, weight = c.rounded(c.random(int(_SEGMENTS[-1]), channels)), c.rounded(c.random(channels, taps))
    state = c.rounded(c.random(len(_SEGMENTS) - 1, channels, taps - 1))
    errors = []
    for silu in (True, False):
        given = c.put(state.copy())
        y, new_state = c.ops.causal_conv1d(c.put(x), c.put(weight), given, _SEGMENTS, silu)
        assert np.array_equal(c.get(given), state), "causal_conv1d changed the state it was given"
        want_y, want_state = conv1d_oracle(x, weight, state, _SEGMENTS, silu)
        errors += [_compare(c.get(y), want_y, tol), _compare(c.get(new_state), want_state, tol)]
    return max(errors)


def check_gated_delta_rule(c: Any, tol: float) -> float:
    """Three segments from states of their own, two value heads per q/k head, decays from slow to fast; the float32
    state given is left as it was."""
    k_heads, v_heads, dk, dv, n = 2, 4, 8, 12, int(_SEGMENTS[-1])
    q, k = (c.rounded(c.random(n, k_heads, dk)) for _ in range(2))
    v, a, b = c.rounded(c.random(n, v_heads, dv)), c.rounded(c.random(n, v_heads) * 2), c.rounded(c.random(n, v_heads))
    a_log = np.log(np.array([0.05, 0.5, 2.0, 8.0], dtype=np.float32))
    dt_bias = np.array([0.5, -1.0, 0.0, 1.0], dtype=np.float32)
    state = c.random(len(_SEGMENTS) - 1, v_heads, dk, dv) * 0.5
    f32 = [c.ops.from_numpy(t.copy(), "float32") for t in (a_log, dt_bias, state)]
    out, new_state = c.ops.gated_delta_rule(c.put(q), c.put(k), c.put(v), c.put(a), c.put(b), *f32, _SEGMENTS)
    assert np.array_equal(c.get(f32[2]), state), "gated_delta_rule changed the state it was given"
    want_out, want_state = gated_delta_oracle(q, k, v, a, b, a_log, dt_bias, state, _SEGMENTS)
    return max(_compare(c.get(out), want_out, tol), _compare(c.get(new_state), want_state, tol))


#: Segments of which one spans more than a chunk of the batched rule (ferrum.recurrent.batched.CHUNK).
_LONG_SEGMENTS = np.array([0, 3, 4, 27], dtype=np.int32)


def check_gated_delta_rule_per_channel(c: Any, tol: float) -> float:
    """API 1.20: a decay per key channel (Kimi Delta Attention's; from slow to fast, one head's channels apart) and
    ``beta_scale`` 2 (OLMo Hybrid's), one segment chunked, through the rule the model calls (the plugin's where it
    declares 1.20, else the core's fallback); the float32 state given is left as it was."""
    return _check_per_channel_rule(c, tol, (0.05, 0.5, 2.0), (2.0,))


def check_gated_delta_rule_bounded(c: Any, tol: float) -> float:
    """API 1.27: the log-decay ``lower_bound * sigmoid(exp(a_log) * (a + dt_bias))`` (Ling 3's), per key channel, one
    segment chunked, through the rule the model calls (the plugin's where it declares 1.27, else the core's
    fallback); the float32 state given is left as it was."""
    return _check_per_channel_rule(c, tol, (1.0, 4.0, 16.0), (1.0, -5.0))


def _check_per_channel_rule(c: Any, tol: float, rates: tuple[float, ...], features: tuple[float, ...]) -> float:
    """The rule the model calls, with a decay per key channel and its feature arguments ``features`` (beta_scale,
    then lower_bound where given: the bounded rule), against :func:`gated_delta_oracle` over one chunked segment."""
    from ferrum.recurrent.gated_delta import gated_delta_rule, runs_natively

    heads, dk, dv, n = len(rates), 8, 6, int(_LONG_SEGMENTS[-1])
    q, k, v = (c.rounded(c.random(n, heads, d)) for d in (dk, dk, dv))
    a, b = c.rounded(c.random(n, heads, dk) * 2), c.rounded(c.random(n, heads))
    a_log = np.log(np.array(rates, dtype=np.float32))
    dt_bias = np.linspace(-1.5, 1.5, heads * dk, dtype=np.float32).reshape(heads, dk)
    state = c.random(len(_LONG_SEGMENTS) - 1, heads, dk, dv) * 0.5
    f32 = [c.ops.from_numpy(t.copy(), "float32") for t in (a_log, dt_bias, state)]
    rule = gated_delta_rule(c.ops, runs_natively(c.ops, True, len(features) > 1))
    out, new_state = rule(c.put(q), c.put(k), c.put(v), c.put(a), c.put(b), *f32, _LONG_SEGMENTS, *features)
    assert np.array_equal(c.get(f32[2]), state), "gated_delta_rule changed the state it was given"
    want_out, want_state = gated_delta_oracle(q, k, v, a, b, a_log, dt_bias, state, _LONG_SEGMENTS, *features)
    return max(_compare(c.get(out), want_out, tol), _compare(c.get(new_state), want_state, tol))


def ssd_oracle(x, dt, a_log, b, cm, d, dt_bias, state, cu, dt_min, dt_max) -> tuple[np.ndarray, np.ndarray]:
    """``ferrum.hookspec.ssd_update`` in float64, head by head with outer and matrix products."""
    x, dt, a_log, b, cm, d, dt_bias, state = (np.asarray(t, dtype=np.float64)
                                              for t in (x, dt, a_log, b, cm, d, dt_bias, state))
    group = x.shape[1] // b.shape[1]
    y, new_state = np.zeros_like(x), state.copy()
    for s in range(len(cu) - 1):
        for t in range(cu[s], cu[s + 1]):
            for h in range(x.shape[1]):
                step = min(max(np.log1p(np.exp(dt[t, h] + dt_bias[h])), dt_min), dt_max)
                S = new_state[s, h] * np.exp(-np.exp(a_log[h]) * step) + np.outer(step * x[t, h], b[t, h // group])
                new_state[s, h] = S
                y[t, h] = S @ cm[t, h // group] + d[h] * x[t, h]
    return y, new_state


def check_ssd_update(c: Any, tol: float) -> float:
    """Three segments from states of their own, two heads per B/C group, decays from slow to fast, a step limit that
    clips some steps at each end; the float32 state given is left as it was."""
    heads, groups, p, n, tokens = 4, 2, 6, 8, int(_SEGMENTS[-1])
    x, dt = c.rounded(c.random(tokens, heads, p)), c.rounded(c.random(tokens, heads) * 3)
    b, cm = (c.rounded(c.random(tokens, groups, n)) for _ in range(2))
    a_log = np.log(np.array([0.05, 0.5, 2.0, 8.0], dtype=np.float32))
    d, dt_bias = np.array([1.0, 0.5, -0.25, 2.0], dtype=np.float32), np.array([0.5, -1.0, 0.0, 1.0], dtype=np.float32)
    state = c.random(len(_SEGMENTS) - 1, heads, p, n) * 0.5
    f32 = [c.ops.from_numpy(t.copy(), "float32") for t in (a_log, d, dt_bias, state)]
    limits = (0.05, 2.5)
    y, new_state = c.ops.ssd_update(c.put(x), c.put(dt), f32[0], c.put(b), c.put(cm), f32[1], f32[2], f32[3],
                                    _SEGMENTS, *limits)
    assert np.array_equal(c.get(f32[3]), state), "ssd_update changed the state it was given"
    want_y, want_state = ssd_oracle(x, dt, a_log, b, cm, d, dt_bias, state, _SEGMENTS, *limits)
    return max(_compare(c.get(y), want_y, tol), _compare(c.get(new_state), want_state, tol))


def selective_oracle(x, dt, a_log, b, cm, d, dt_bias, state, cu) -> tuple[np.ndarray, np.ndarray]:
    """``ferrum.hookspec.selective_scan`` in float64, channel by channel."""
    x, dt, a_log, b, cm, d, dt_bias, state = (np.asarray(t, dtype=np.float64)
                                              for t in (x, dt, a_log, b, cm, d, dt_bias, state))
    y, new_state = np.zeros_like(x), state.copy()
    for s in range(len(cu) - 1):
        for t in range(cu[s], cu[s + 1]):
            for ch in range(x.shape[1]):
                step = np.log1p(np.exp(dt[t, ch] + dt_bias[ch]))
                S = new_state[s, ch] * np.exp(-np.exp(a_log[ch]) * step) + step * x[t, ch] * b[t]
                new_state[s, ch] = S
                y[t, ch] = S @ cm[t] + d[ch] * x[t, ch]
    return y, new_state


def check_selective_scan(c: Any, tol: float) -> float:
    """Three segments from states of their own, a decay per channel and state dimension from slow to fast, steps
    from small to large; the float32 state given is left as it was."""
    channels, n, tokens = 6, 5, int(_SEGMENTS[-1])
    x, dt = c.rounded(c.random(tokens, channels)), c.rounded(c.random(tokens, channels) * 3)
    b, cm = (c.rounded(c.random(tokens, n)) for _ in range(2))
    a_log = np.log(np.geomspace(0.05, 8.0, channels * n).reshape(channels, n)[:, ::-1].copy()).astype(np.float32)
    d = np.linspace(-1.0, 2.0, channels).astype(np.float32)
    dt_bias = np.linspace(-2.0, 1.0, channels).astype(np.float32)
    state = c.random(len(_SEGMENTS) - 1, channels, n) * 0.5
    f32 = [c.ops.from_numpy(t.copy(), "float32") for t in (a_log, d, dt_bias, state)]
    y, new_state = c.ops.selective_scan(c.put(x), c.put(dt), f32[0], c.put(b), c.put(cm), f32[1], f32[2], f32[3],
                                        _SEGMENTS)
    assert np.array_equal(c.get(f32[3]), state), "selective_scan changed the state it was given"
    want_y, want_state = selective_oracle(x, dt, a_log, b, cm, d, dt_bias, state, _SEGMENTS)
    return max(_compare(c.get(y), want_y, tol), _compare(c.get(new_state), want_state, tol))


def rg_lru_oracle(x, gx, ga, a_param, state, cu, starts) -> tuple[np.ndarray, np.ndarray]:
    """``ferrum.hookspec.rg_lru`` in float64, token by token."""
    x, gx, ga, a_param, state = (np.asarray(t, dtype=np.float64) for t in (x, gx, ga, a_param, state))
    y, new_state = np.zeros_like(x), state.copy()
    for s in range(len(cu) - 1):
        for t in range(cu[s], cu[s + 1]):
            log_a = -8.0 / (1.0 + np.exp(-ga[t])) * np.log1p(np.exp(a_param))
            gated = x[t] / (1.0 + np.exp(-gx[t]))
            first = t == cu[s] and starts[s]
            new_state[s] = gated if first else np.exp(log_a) * new_state[s] + np.sqrt(1 - np.exp(2 * log_a)) * gated
            y[t] = new_state[s]
    return y, new_state


def check_rg_lru(c: Any, tol: float) -> float:
    """Three segments, the first and last starting their sequences (reset: the past dropped, the input not
    normalized), the middle one carrying its state; recurrence gates from nearly shut (a near 1, the input scaled
    near 0) to open; the float32 state given is left as it was."""
    from ferrum.recurrent.rg_lru import runs_natively

    width, tokens = 8, int(_SEGMENTS[-1])
    x, gx = c.rounded(c.random(tokens, width)), c.rounded(c.random(tokens, width) * 2)
    ga = c.rounded(np.linspace(-9.0, 4.0, tokens * width).reshape(tokens, width).astype(np.float32))
    a_param = np.linspace(-3.0, 2.0, width).astype(np.float32)
    state = c.random(len(_SEGMENTS) - 1, width)
    starts = np.array([True, False, True])
    f32 = [c.ops.from_numpy(t.copy(), "float32") for t in (a_param, state)]
    lru = c.ops.rg_lru if runs_natively(c.ops) else c.ops.fallback["rg_lru"]
    y, new_state = lru(c.put(x), c.put(gx), c.put(ga), f32[0], f32[1], _SEGMENTS, starts)
    assert np.array_equal(c.get(f32[1]), state), "rg_lru changed the state it was given"
    want_y, want_state = rg_lru_oracle(x, gx, ga, a_param, state, _SEGMENTS, starts)
    return max(_compare(c.get(y), want_y, tol), _compare(c.get(new_state), want_state, tol))


def wkv7_oracle(r, w, k, v, a, b, state, cu) -> tuple[np.ndarray, np.ndarray]:
    """``ferrum.hookspec.wkv7`` in float64, token by token and head by head."""
    r, w, k, v, a, b, state = (np.asarray(t, dtype=np.float64) for t in (r, w, k, v, a, b, state))
    y, new_state = np.zeros_like(v), state.copy()
    for s in range(len(cu) - 1):
        for t in range(cu[s], cu[s + 1]):
            for h in range(v.shape[1]):
                S = new_state[s, h]  # [Dk, Dv]
                read = a[t, h] @ S
                S = np.exp(w[t, h])[:, None] * S + np.outer(k[t, h], v[t, h]) + np.outer(b[t, h], read)
                new_state[s, h], y[t, h] = S, r[t, h] @ S
    return y, new_state


def check_wkv7(c: Any, tol: float) -> float:
    """Three segments carrying states of their own, two heads; decays from nearly none to strong, the read and write
    vectors a unit key's negative and a fraction of it (as RWKV-7 makes them); the float32 state given is left as it
    was."""
    from ferrum.recurrent.rwkv7 import runs_natively

    heads, dim, tokens = 2, 8, int(_SEGMENTS[-1])
    r, k, v = (c.rounded(c.random(tokens, heads, dim)) for _ in range(3))
    w = c.rounded(-np.linspace(0.01, 2.0, tokens * heads * dim).reshape(tokens, heads, dim).astype(np.float32))
    unit = c.random(tokens, heads, dim)
    unit /= np.linalg.norm(unit, axis=-1, keepdims=True)
    a = c.rounded(-unit)
    b = c.rounded(unit * np.linspace(0.1, 0.9, dim).astype(np.float32))
    state = c.random(len(_SEGMENTS) - 1, heads, dim, dim)
    held = c.ops.from_numpy(state.copy(), "float32")
    rule = c.ops.wkv7 if runs_natively(c.ops) else c.ops.fallback["wkv7"]
    y, new_state = rule(*(c.put(t) for t in (r, w, k, v, a, b)), held, _SEGMENTS)
    assert np.array_equal(c.get(held), state), "wkv7 changed the state it was given"
    want_y, want_state = wkv7_oracle(r, w, k, v, a, b, state, _SEGMENTS)
    return max(_compare(c.get(y), want_y, tol), _compare(c.get(new_state), want_state, tol))


def check_mul_scalar(c: Any, tol: float) -> float:
    x = c.rounded(c.random(5, 64))
    factor = float(c.rounded(np.array([np.sqrt(3072.0)], dtype=np.float32))[0])  # as the dtype holds it
    return _compare(c.get(c.ops.mul_scalar(c.put(x), np.sqrt(3072.0))), x * factor, tol)


def check_clip(c: Any, tol: float) -> float:
    """Values on both sides of the limit, some exactly at it."""
    x = c.random(5, 64) * 3
    x[0, :4] = [1.5, -1.5, 0.0, 2.0]
    x = c.rounded(x)
    return _compare(c.get(c.ops.clip(c.put(x), 1.5)), np.clip(x, -1.5, 1.5), tol)


def check_mul(c: Any, tol: float) -> float:
    """A weight per head ``[heads, dim]`` over ``[tokens, heads, dim]``, and two arrays of one shape."""
    x, w = c.rounded(c.random(5, 4, 24)), c.rounded(c.random(4, 24))
    return max(_compare(c.get(c.ops.mul(c.put(x), c.put(w))), x * w, tol),
               _compare(c.get(c.ops.mul(c.put(x), c.put(x))), x * x, tol))


def check_softcap(c: Any, tol: float) -> float:
    x = c.rounded(c.random(5, 97) * 20)
    return _compare(c.get(c.ops.softcap(c.put(x), 15.0)), 15.0 * np.tanh(x / 15.0), tol)


#: gpt-oss's learned sinks for the 6 query heads of the attention cases: around the scores' size, so each one
#: takes a visible share of its head's softmax.
_SINKS = np.array([-1.5, 0.0, 2.5, 1.0, -0.5, 4.0], dtype=np.float32)


#: ALiBi's slopes for those 6 heads: the farthest keys lose up to 4 of their score.
_ALIBI = np.array(alibi_slopes(6), dtype=np.float32)


def _on_device(c: Any, array: np.ndarray | None) -> Any:
    return None if array is None else c.ops.from_numpy(array, "float32")


def check_attention_features(c: Any, tol: float, softcap: float | None, sinks: np.ndarray | None,
                             alibi: np.ndarray | None = None) -> float:
    """Dense attention with scores capped at ``softcap``, per-head ``sinks`` or ALiBi's ``alibi`` slopes, a window or
    none."""
    errors = []
    features = (softcap, _on_device(c, sinks)) + ((_on_device(c, alibi),) if alibi is not None else ())
    for q_len, kv_len, window in ((5, 9, None), (1, 7, None), (4, 4, 3)):
        q, k, v = _attention_case(c, q_len, kv_len)
        got = c.get(c.ops.attention(c.put(q), c.put(k), c.put(v), 24**-0.5, window, *features))
        errors.append(_compare(got, arch_oracle.attention(q, k, v, 24**-0.5, window, softcap, sinks, alibi), tol))
    return max(errors)


def check_paged_attention_features(c: Any, tol: float, softcap: float | None, sinks: np.ndarray | None,
                                   alibi: np.ndarray | None = None) -> float:
    """A prefill chunk and a decode token of two sequences in shuffled blocks, one layer, scores capped at
    ``softcap``, with per-head ``sinks`` or with ALiBi's ``alibi`` slopes."""
    from ferrum.attention import AttentionBatch

    block, kv_heads, d = 4, 2, 24
    seq_lens, tables = [7, 6], [[5, 2], [0, 4]]  # item 0: a 3-token chunk at 4..6; item 1: decodes at 5
    k_all, v_all = (c.rounded(c.random(6 * block, kv_heads, d)) for _ in range(2))
    pool = c.ops.kv_alloc(1, 6, block, kv_heads, d, c.dtype)
    slots = np.arange(6 * block, dtype=np.int32)
    c.ops.kv_write(pool, 0, c.put(k_all), c.put(v_all), c.put_int(slots))
    cu = np.array([0, 3, 4], dtype=np.int32)
    positions = np.array([4, 5, 6, 5], dtype=np.int32)
    item_slots = [[t[p // block] * block + p % block for p in range(n)] for t, n in zip(tables, seq_lens)]
    batch = AttentionBatch(positions, np.array([item_slots[0][p] for p in (4, 5, 6)] + [item_slots[1][5]],
                                               dtype=np.int32),
                           cu, np.array(seq_lens, dtype=np.int32), np.array(tables, dtype=np.int32), block)
    batch.prepared = c.ops.prepare_attention_batch(batch)
    q = c.rounded(c.random(4, 6, d) * 4)
    features = (softcap, _on_device(c, sinks)) + ((_on_device(c, alibi),) if alibi is not None else ())
    got = c.get(c.ops.paged_attention(c.put(q), pool, 0, batch, d**-0.5, None, *features))
    ref = np.concatenate([
        arch_oracle.attention(q[cu[i]:cu[i + 1]], k_all[item_slots[i]], v_all[item_slots[i]], d**-0.5, None,
                              softcap, sinks, alibi)
        for i in range(2)
    ])
    return _compare(got, ref, tol)


def check_family_model(c: Any, family: str, tol: float) -> float:
    """A tiny model of ``family`` on the backend against the float64 oracle, all 13 positions, then 8 decode steps."""
    from ferrum.model import DecoderOnlyLLM

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_random_checkpoint(Path(tmp) / family, FAMILY_MODELS[family], dtype="float32", std=0.1)
        model = DecoderOnlyLLM.from_pretrained(folder, backend=c.backend, dtype=c.dtype, block_size=4)
        oracle = arch_oracle.ArchOracle(folder)
    prompt = [int(t) for t in np.random.default_rng(6).integers(0, 97, size=13)]
    tokens = prompt + [int(t) for t in np.random.default_rng(7).integers(0, 97, size=8)]
    reference = oracle.logits(tokens)
    error = _compare(model.forward_verify("all", prompt), reference[:13], tol)
    steps = [model.prefill("steps", prompt)]
    for pos in range(13, len(tokens) - 1):
        steps.append(model.decode("steps", tokens[pos], pos))
    return max(error, _compare(np.stack(steps), reference[12:-1], tol))


def family_checks(c: Any, tol: float, model_tol: float) -> list[tuple[str, Callable[[], float], float]]:
    """(name, run, tolerance) of every check above that the backend's features call for."""
    ops = c.ops

    def source(op: str) -> str:
        return "native" if op in ops.native else "core fallback"

    from ferrum.recurrent.gated_delta import runs_natively  # the rule the model calls for API 1.20's features
    from ferrum.recurrent.rg_lru import runs_natively as rg_lru_native  # the RG-LRU it calls (API 1.25)
    from ferrum.recurrent.rwkv7 import runs_natively as wkv7_native  # RWKV-7's rule (API 1.30)

    native_rule = "gated_delta_rule" in ops.native and runs_natively(ops, True)
    extended_rule = "native" if native_rule else "core fallback"
    bounded_rule = "native" if "gated_delta_rule" in ops.native and runs_natively(ops, True, True) else "core fallback"
    paged = "paged_attention" if "paged_attention" in ops.native else "attention"
    softcap = ops.accepts(paged, "softcap") and ops.accepts("attention", "softcap")
    sinks = ops.accepts(paged, "sinks") and ops.accepts("attention", "sinks")
    sliding = ops.accepts(paged, "sliding_window")
    checks = [
        (f"gelu_tanh_mul ({source('gelu_tanh_mul')})", lambda: check_gelu_tanh_mul(c, tol), tol),
        (f"layer_norm ({source('layer_norm')})", lambda: check_layer_norm(c, tol), tol),
        (f"gelu ({source('gelu')})", lambda: check_gelu(c, tol), tol),
        (f"relu_squared ({source('relu_squared')})", lambda: check_relu_squared(c, tol), tol),
        (f"relu ({source('relu')})", lambda: check_relu(c, tol), tol),
        (f"xielu ({source('xielu')})", lambda: check_xielu(c, tol), tol),
        (f"quantize_activations ({source('quantize_activations')})", lambda: check_quantize_activations(c, tol),
         tol),
        (f"fake_quantize ({source('fake_quantize')})", lambda: check_fake_quantize(c, tol), tol),
        (f"mul_scalar ({source('mul_scalar')})", lambda: check_mul_scalar(c, tol), tol),
        (f"sigmoid_mul ({source('sigmoid_mul')})", lambda: check_sigmoid_mul(c, tol), tol),
        (f"softplus_mul ({source('softplus_mul')})", lambda: check_softplus_mul(c, tol), tol),
        (f"causal_conv1d ({source('causal_conv1d')})", lambda: check_causal_conv1d(c, tol), tol),
        (f"gated_delta_rule ({source('gated_delta_rule')})", lambda: check_gated_delta_rule(c, tol), tol),
        (f"gated_delta_rule, per key channel and beta_scale ({extended_rule})",
         lambda: check_gated_delta_rule_per_channel(c, tol), tol),
        (f"gated_delta_rule, bounded log-decay ({bounded_rule})", lambda: check_gated_delta_rule_bounded(c, tol), tol),
        (f"ssd_update ({source('ssd_update')})", lambda: check_ssd_update(c, tol), tol),
        (f"selective_scan ({source('selective_scan')})", lambda: check_selective_scan(c, tol), tol),
        (f"rg_lru ({'native' if rg_lru_native(ops) else 'core fallback'})", lambda: check_rg_lru(c, tol), tol),
        (f"wkv7 ({'native' if wkv7_native(ops) else 'core fallback'})", lambda: check_wkv7(c, tol), tol),
        (f"softcap ({source('softcap')})", lambda: check_softcap(c, tol), tol),
        (f"clip ({source('clip')})", lambda: check_clip(c, tol), tol),
        (f"mul ({source('mul')})", lambda: check_mul(c, tol), tol),
    ]
    alibi = ops.accepts(paged, "alibi_slopes") and ops.accepts("attention", "alibi_slopes") and (
        declared_version(ops.info) >= ALIBI_SINCE)
    for offered, what, features in ((softcap, "soft-capped scores", (2.0, None)), (sinks, "sinks", (None, _SINKS)),
                                    (alibi, "ALiBi", (None, None, _ALIBI))):
        if offered:
            checks.append((f"attention, {what}", lambda f=features: check_attention_features(c, tol, *f), tol))
            checks.append((f"paged_attention, {what} ({source('paged_attention')})",
                           lambda f=features: check_paged_attention_features(c, tol, *f), tol))
    for family, config in FAMILY_MODELS.items():
        needs_softcap = config.get("attn_logit_softcapping") is not None
        if (needs_softcap and not softcap) or (config.get("sliding_window") and not sliding) or (
                family == "gpt_oss" and not sinks) or (family == "bloom" and not alibi):
            continue
        checks.append((f"model {family}: logits and decode steps",
                       lambda family=family: check_family_model(c, family, model_tol), model_tol))
    return checks
