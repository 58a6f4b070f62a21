"""The plugin conformance kit: it passes on every built-in backend and catches broken plugins."""

from __future__ import annotations

import numpy as np
import pytest

import ferrum_cpu.ops as cpu_ops
from ferrum.hookspec import hookimpl
from ferrum.testing import assert_conformance, check_backend
from ferrum.testing.__main__ import main

from support import cpu_like_plugin, runnable_backends


@pytest.mark.parametrize("backend", runnable_backends())
def test_builtin_backends_conform_in_float32(backend):
    report = assert_conformance(backend, "float32")
    assert len(report.results) >= 14 and report.ok


@pytest.mark.parametrize("backend", [b for b in runnable_backends() if b != "cpu"])
def test_builtin_backends_conform_in_bfloat16(backend):
    assert_conformance(backend, "bfloat16")


@hookimpl
def rope_turning_the_wrong_way(x, positions, inv_freq):
    """A sign slip: rotates by -angle (a permutation of dimensions would cancel out in q.k)."""
    return cpu_ops.rope(x, -np.asarray(positions), inv_freq)


@hookimpl
def paged_attention_without_window(q, pool, layer, batch, scale, sliding_window):
    from ferrum import reference_ops

    class Ops:  # the fallback composition over the numpy ops, called with the window dropped
        kv_gather, attention, take_rows, concat, from_numpy = (
            cpu_ops.kv_gather, cpu_ops.attention, cpu_ops.take_rows, cpu_ops.concat, cpu_ops.from_numpy,
        )

    return reference_ops.paged_attention(Ops, q, pool, layer, batch, scale, None)


def test_a_wrong_rope_is_caught(registered):
    registered("badrope", cpu_like_plugin("badrope", extra={"rope": rope_turning_the_wrong_way}))
    report = check_backend("badrope")
    assert set(report.failed()) == {
        "rope", "rope at positions bfloat16 cannot hold", "model: logits and 16 greedy tokens",
        "model packed at 4 bits: logits and greedy tokens",
        *(f"model {family}: logits and decode steps"
          for family in ("gemma2", "gemma3_text", "gpt_oss", "qwen3_moe", "phi3", "phi", "starcoder2", "cohere",
                         "olmo", "nemotron", "llama4_text", "nanochat")),
    }
    with pytest.raises(AssertionError, match="FAIL  rope"):
        assert_conformance("badrope")


@hookimpl
def rope_dropping_the_frequencies_sign(x, positions, inv_freq):
    """Rotates by |frequency|: the same as the usual rope wherever frequencies are positive."""
    return cpu_ops.rope(x, positions, np.abs(inv_freq))


def test_a_rope_dropping_the_frequencies_sign_is_caught_by_nanochat(registered):
    """nanochat turns its pairs the other way, which Ferrum hands every backend as negated frequencies."""
    registered("absrope", cpu_like_plugin("absrope", extra={"rope": rope_dropping_the_frequencies_sign}))
    assert set(check_backend("absrope").failed()) == {"model nanochat: logits and decode steps"}


@hookimpl
def layer_norm_dropping_the_bias(x, weight, bias, eps):
    return cpu_ops.layer_norm(x, weight, None, eps)


def test_a_layer_norm_dropping_its_bias_is_caught(registered):
    registered("nobias", cpu_like_plugin("nobias", extra={"layer_norm": layer_norm_dropping_the_bias}))
    report = check_backend("nobias")
    assert set(report.failed()) == {"layer_norm (native)", "model phi: logits and decode steps",
                                    "model starcoder2: logits and decode steps",
                                    "model nemotron: logits and decode steps", "model bloom: logits and decode steps"}


def test_the_core_fallbacks_of_layer_norm_and_gelu_conform(registered):
    registered("nolayernorm", cpu_like_plugin("nolayernorm", omit=("layer_norm", "clip", "mul", "relu_squared",
                                                                    "xielu", "quantize_activations")))
    passed = [r.name for r in assert_conformance("nolayernorm").results if r.passed]
    assert {"layer_norm (core fallback)", "gelu (core fallback)", "clip (core fallback)", "mul (core fallback)",
            "relu_squared (core fallback)", "xielu (core fallback)", "quantize_activations (core fallback)",
            "model phi: logits and decode steps",
            "model nemotron: logits and decode steps", "model olmo: logits and decode steps",
            "model cohere: logits and decode steps", "model nanochat: logits and decode steps"} <= set(passed)


@hookimpl
def relu_squared_without_the_relu(x):
    return np.square(x)


def test_a_squared_relu_that_keeps_negatives_is_caught(registered):
    """Through its dense MLPs and the core's ungated experts (Nemotron 3 Nano's), which run it too."""
    registered("norelu", cpu_like_plugin("norelu", extra={"relu_squared": relu_squared_without_the_relu}))
    assert set(check_backend("norelu").failed()) == {"relu_squared (native)", "model nemotron: logits and decode steps",
                                                      "model nanochat: logits and decode steps",
                                                      "moe_experts, ungated squared ReLU (core fallback)"}


@hookimpl
def upload_float_experts(name, weight, dtype):
    return np.asarray(weight, dtype=np.float32) if isinstance(weight, np.ndarray) else None


@hookimpl
def moe_experts_with_unsquared_ungated_experts(x, expert_ids, expert_weights, gate, up, down, shared,
                                               activation=None):
    """Right for every gated activation (each record's host form), but ungated experts (``gate`` None, API 1.18) get
    ``relu(u)``, the square left out."""
    top_k = expert_ids.shape[1]
    out = np.zeros(x.shape, dtype=np.float32)
    for t, j in np.ndindex(expert_ids.shape):
        e = int(expert_ids[t, j])
        u = x[t] @ up[e].T
        if gate is None:
            h = np.maximum(u, 0.0)
        else:
            g = x[t] @ gate[e].T
            h = g / (1.0 + np.exp(-g)) * u if activation is None else activation.host(g, u)
        out[t] += expert_weights[t, j] * (h @ down[e].T)
    if shared is not None:
        out += expert_weights[:, top_k:] * shared
    return out.astype(x.dtype)


def test_native_ungated_experts_missing_the_square_are_caught(registered):
    """A plugin declaring API 1.18 gets the ungated experts with ``gate`` None in its own moe_experts (its gated
    experts, right, pass)."""
    registered("unsquared", cpu_like_plugin("unsquared", extra={
        "upload_experts": upload_float_experts, "moe_experts": moe_experts_with_unsquared_ungated_experts}))
    report = check_backend("unsquared")
    assert set(report.failed()) == {"moe_experts, ungated squared ReLU (native)"}
    assert {"moe_experts, spread evenly (native)", "moe_experts, GeGLU (native)"} <= {
        r.name for r in report.results if r.passed}


@hookimpl
def xielu_without_beta_on_the_negative_side(x, alpha_p, alpha_n, beta, eps):
    return np.where(x > 0, alpha_p * x * x + beta * x, (np.expm1(np.minimum(x, eps)) - x) * alpha_n).astype(x.dtype)


def test_an_xielu_dropping_beta_on_the_negative_side_is_caught(registered):
    registered("noxbeta", cpu_like_plugin("noxbeta", extra={"xielu": xielu_without_beta_on_the_negative_side}))
    assert set(check_backend("noxbeta").failed()) == {"xielu (native)"}


def _rows_quantized(x, levels, round_half, floor):
    scale = np.float32(levels) / np.maximum(np.abs(x).max(axis=-1, keepdims=True), np.float32(floor))
    return (np.clip(round_half(x * scale), -levels - 1, levels) / scale).astype(x.dtype)


@hookimpl
def quantize_activations_rounding_half_away(x, levels):
    """np.round's ties to even replaced by ties away from zero, as C's round() and a naive kernel do."""
    return _rows_quantized(x, levels, lambda v: np.sign(v) * np.floor(np.abs(v) + 0.5), 1e-5)


@hookimpl
def quantize_activations_without_the_floor(x, levels):
    """The largest magnitude not floored at 1e-5: a row of zeros is 0 / 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return _rows_quantized(x, levels, np.round, 0.0)


@pytest.mark.parametrize("op", [quantize_activations_rounding_half_away, quantize_activations_without_the_floor])
def test_a_quantize_activations_off_the_grid_is_caught(registered, op):
    registered("badquant", cpu_like_plugin("badquant", extra={"quantize_activations": op}))
    report = check_backend("badquant")
    assert set(report.failed()) == {"quantize_activations (native)"}
    assert "off the oracle's integer grid" in next(r.message for r in report.results if not r.passed)


def _fake_quantized(x, scale, low, high, round_half):
    step = np.float32(scale)
    return (np.clip(round_half(x.astype(np.float32) / step), low, high) * step).astype(x.dtype)


@hookimpl
def fake_quantize_rounding_half_away(x, scale, low, high):
    """Ties to even replaced by ties away from zero."""
    return _fake_quantized(x, scale, low, high, lambda v: np.sign(v) * np.floor(np.abs(v) + 0.5))


@hookimpl
def fake_quantize_clipped_symmetrically(x, scale, low, high):
    """The grid clipped to [-high, high] (``clip``'s symmetric limit): -128 is lost."""
    return _fake_quantized(x, scale, -high, high, np.rint)


@pytest.mark.parametrize("op", [fake_quantize_rounding_half_away, fake_quantize_clipped_symmetrically])
def test_a_fake_quantize_off_the_grid_is_caught(registered, op):
    registered("badfake", cpu_like_plugin("badfake", extra={"fake_quantize": op}))
    report = check_backend("badfake")
    assert set(report.failed()) == {"fake_quantize (native)"}
    assert "off the oracle's grid" in next(r.message for r in report.results if not r.passed)


def test_the_core_fallback_of_fake_quantize_conforms(registered):
    registered("nofake", cpu_like_plugin("nofake", omit=("fake_quantize",)))
    assert "fake_quantize (core fallback)" in {r.name for r in check_backend("nofake").results if r.passed}


def test_quantize_activations_computed_in_bfloat16_is_caught():
    """The hookspec computes in float32 whatever ``x``'s dtype: a bfloat16 product ``x * s`` lands its codes off by
    one or more (within the bfloat16 tolerance of the values, so only the codes' check sees it)."""
    if "cuda" not in runnable_backends():
        pytest.skip("the torch backend cannot run here")
    from types import SimpleNamespace

    from ferrum.backends import load_backend
    from ferrum.testing.conformance import _Context
    from ferrum.testing.family_checks import check_quantize_activations

    def in_bfloat16(x, levels):
        scale = levels / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
        return ((x * scale).round().clamp(-levels - 1, levels) / scale).to(x.dtype)

    ops = load_backend("cuda").ops
    c = _Context(load_backend("cuda"), "bfloat16")
    c.ops = SimpleNamespace(from_numpy=ops.from_numpy, to_numpy=ops.to_numpy, quantize_activations=in_bfloat16)
    with pytest.raises(AssertionError, match="off the oracle's integer grid"):
        check_quantize_activations(c, 4e-2)
    c.ops.quantize_activations = ops.quantize_activations
    assert check_quantize_activations(c, 4e-2) < 4e-2


@hookimpl
def clip_ignoring_the_limit(x, limit):
    return x


def test_a_clip_ignoring_its_limit_is_caught(registered):
    registered("noclip", cpu_like_plugin("noclip", extra={"clip": clip_ignoring_the_limit}))
    assert set(check_backend("noclip").failed()) == {"clip (native)", "model olmo: logits and decode steps"}


def test_a_paged_attention_ignoring_the_window_is_caught(registered):
    registered("nowindow", cpu_like_plugin("nowindow", extra={"paged_attention": paged_attention_without_window}))
    report = check_backend("nowindow")
    # Gemma 3's and StarCoder2's sliding layers catch it too; Gemma 2 is left out (this paged_attention has no softcap)
    assert report.failed() == ["paged_attention, sliding window", "model gemma3_text: logits and decode steps",
                               "model starcoder2: logits and decode steps"]
    assert "paged_attention (native)" in [r.name for r in report.results if r.passed]
    assert not any("gemma2" in r.name for r in report.results)


def _gate_of(gate):
    raise ValueError(f"no gate for shape {np.shape(gate)}")


@hookimpl
def silu_mul_raising_in_a_helper(gate, up):
    return _gate_of(gate) * up


def test_a_raising_op_is_named_with_the_line_that_raised(registered):
    registered("raising", cpu_like_plugin("raising", extra={"silu_mul": silu_mul_raising_in_a_helper}))
    report = check_backend("raising")
    where = f"(raised in the plugin's op 'silu_mul', at {__file__}:{_gate_of.__code__.co_firstlineno + 1})"
    failed = [r for r in report.results if not r.passed]
    assert "model: logits and 16 greedy tokens" in [r.name for r in failed]
    assert all(r.message.startswith("ValueError: no gate for shape") and r.message.endswith(where) for r in failed)


def _with_shared(ids, weights, shared_logit):
    if shared_logit is not None:
        weights = np.concatenate([weights, 1 / (1 + np.exp(-np.asarray(shared_logit, np.float32)))], axis=1)
    return ids, weights


@hookimpl
def moe_route_always_normalizing(logits, shared_logit, top_k, normalize):
    from ferrum.moe.routing import route

    return _with_shared(*route(np.asarray(logits), top_k, True), shared_logit)


@hookimpl
def moe_route_taking_routing_without_a_default(logits, shared_logit, top_k, normalize, routing):
    from ferrum.moe.routing import route, route_grouped

    logits = np.asarray(logits)
    if routing is None:
        return _with_shared(*route(logits, top_k, normalize), shared_logit)
    bias, scales = (None if a is None else np.asarray(a) for a in (routing.bias, routing.expert_scale))
    return route_grouped(logits, bias, top_k, routing.n_group, routing.topk_group, normalize, routing.scale,
                         routing.rule, scales)


def test_moe_route_written_to_the_hookspec_runs_and_one_always_normalizing_is_caught(registered):
    """A ``moe_route`` declaring ``routing`` as the hookspec writes it (no default) is called with it by the
    model (softmax MoE models failed with "missing 1 required positional argument"); one that normalizes
    whatever ``normalize`` says passed every check (Qwen2-MoE and OLMoE do not normalize)."""
    registered("routes", cpu_like_plugin("routes", extra={"moe_route": moe_route_taking_routing_without_a_default}))
    report = check_backend("routes")
    assert report.failed() == [] and "moe_route, grouped sigmoid (native)" in [r.name for r in report.results]
    registered("normalizes", cpu_like_plugin("normalizes", extra={"moe_route": moe_route_always_normalizing}))
    assert check_backend("normalizes").failed() == ["moe_route, unnormalized (native)"]


def test_an_older_plugins_own_sampling_is_checked(registered):
    """A plugin declaring API 1.10 has every batch holding a row 1.11 reads otherwise sampled by the core, and the
    kit's one batch held such rows: a ``sample`` ignoring top-k passed every check."""
    from dataclasses import replace

    from ferrum.sampling import sample_numpy

    @hookimpl
    def sample(logits, batch):
        return sample_numpy(cpu_ops.to_numpy(logits), replace(batch, top_k=np.zeros_like(batch.top_k)))

    @hookimpl
    def backend_info():
        return replace(cpu_ops.backend_info(), name="oldtopk", api_version="1.10")

    registered("oldtopk", cpu_like_plugin("oldtopk", omit=("sample_on_device",),
                                          extra={"sample": sample, "backend_info": backend_info}))
    assert "sample (native)" in check_backend("oldtopk").failed()


@hookimpl
def rope_on_bfloat16_positions(x, positions, inv_freq):
    import ml_dtypes

    return cpu_ops.rope(x, np.asarray(positions).astype(ml_dtypes.bfloat16).astype(np.int32), inv_freq)


@hookimpl
def sample_skipping_adjustments_when_all_greedy(logits, batch):
    """A shortcut for a batch of greedy rows: the argmax of the raw logits, bias and penalties forgotten."""
    from ferrum.sampling import SampleResult, sample_numpy

    if not batch.all_greedy:
        return sample_numpy(logits, batch)
    exact = sample_numpy(logits, batch)
    return SampleResult(np.argmax(logits, axis=-1), exact.logprobs, exact.top_tokens, exact.top_logprobs,
                        exact.unusable)


def test_positions_rounded_to_bfloat16_and_a_greedy_shortcut_are_caught(registered):
    """Two bugs that passed every check before (positions up to 256 and 1000 are exact in bfloat16; every sampling
    batch had a sampled row)."""
    registered("bfpos", cpu_like_plugin("bfpos", extra={"rope": rope_on_bfloat16_positions}))
    assert "rope at positions bfloat16 cannot hold" in check_backend("bfpos").failed()
    registered("greedy", cpu_like_plugin("greedy", extra={"sample": sample_skipping_adjustments_when_all_greedy}))
    assert check_backend("greedy").failed() == ["sample, greedy rows only (native)"]


class _Packed:
    """A plugin's packed weight: here simply the host form."""

    def __init__(self, weight):
        self.weight = weight


@hookimpl
def quantized_upload(name, weight, dtype, role):
    return _Packed(weight)


@hookimpl
def quantized_linear_with_nibbles_swapped(x, weight, bias):
    """Reads each byte's two 4-bit values in the wrong order (elements 2j and 2j+1 exchanged)."""
    from ferrum.quant import QuantizedWeight, dequantize

    w = weight.weight
    swapped = ((w.packed >> 4) & 0x0F0F0F0F) | ((w.packed & 0x0F0F0F0F) << 4) if w.bits == 4 else w.packed
    dense = dequantize(QuantizedWeight(swapped.astype(np.uint32), w.scales, w.biases, w.bits, w.group_size))
    return cpu_ops.linear(x, dense, bias)


@hookimpl
def quantized_embedding(weight, ids):
    from ferrum.quant import dequantize

    return dequantize(weight.weight)[ids]


def test_a_quantized_linear_reading_nibbles_in_the_wrong_order_is_caught(registered):
    from ferrum.backends import BackendInfo

    @hookimpl
    def backend_info():
        return BackendInfo("nibbles", "cpu", ("float32",), "float32", quant_formats=((4, 32), (4, 64), (8, 32)),
                           api_version="1.11")

    registered("nibbles", cpu_like_plugin("nibbles", extra={
        "backend_info": backend_info, "quantized_upload": quantized_upload,
        "quantized_linear": quantized_linear_with_nibbles_swapped, "quantized_embedding": quantized_embedding,
    }))
    report = check_backend("nibbles")
    assert set(report.failed()) == {
        "quantized_linear 4-bit g32 (native)", "quantized_linear 4-bit g64 (native)",
        "model packed at 4 bits: logits and greedy tokens",
        "moe_experts packed at 4 bits (core fallback)",  # the fallback runs each expert's quantized_linear
    }
    passed = [r.name for r in report.results if r.passed]
    assert "quantized_linear 8-bit g32 (native)" in passed and "quantized_linear 4-bit g16 (core fallback)" in passed


def test_command_line(capsys, registered):
    assert main(["cpu"]) == 0
    assert "all checks passed" in capsys.readouterr().out
    registered("badrope", cpu_like_plugin("badrope", extra={"rope": rope_turning_the_wrong_way}))
    assert main(["badrope"]) == 1
    assert main(["cpu", "--dtype", "bfloat16"]) == 1  # the numpy backend computes in float32 only
    assert "not in" in capsys.readouterr().out


def test_mlx_attention_written_out_conforms(monkeypatch):
    """MLX's CPU path writes large attention calls out (base-2 softmax; causal ones in chunks of queries, each
    over the keys it sees) and leaves small ones to the fused call; forced on every call, with small chunks,
    the written-out path passes the kit too: GQA, end-aligned causal and window masks, paged groups, decode
    over the mirrors, whole models."""
    if "mlx" not in runnable_backends():
        pytest.skip("the mlx backend cannot run here")
    import ferrum_mlx.ops as mlx_ops

    if mlx_ops._METAL:
        pytest.skip("on Metal every call without a soft cap takes the fused kernel")
    monkeypatch.setattr(mlx_ops, "_WRITTEN_OUT_SCORES", 0)
    monkeypatch.setattr(mlx_ops, "_CAUSAL_CHUNK", 4)  # causal prompts of 5 to 24 queries: in chunks
    for dtype in ("float32", "bfloat16"):
        assert_conformance("mlx", dtype)


@pytest.mark.parametrize("probed, complaint", [
    (None, "BackendProbe.api_version is not declared"),
    ("1.0", "BackendProbe.api_version '1.0' and BackendInfo.api_version"),
])
def test_a_probe_not_declaring_the_plugins_api_version_is_caught(registered, probed, complaint):
    from ferrum.backends import BackendProbe

    @hookimpl
    def backend_probe():
        return BackendProbe(available=True, device="cpu", priority=99, api_version=probed)

    registered("probed", cpu_like_plugin("probed", extra={"backend_probe": backend_probe}))
    report = check_backend("probed")
    assert report.failed() == ["backend_info"]
    assert complaint in report.results[0].message


def test_a_relu_squared_leaving_the_compute_dtype_is_caught():
    """The hookspec promises the result in ``x``'s dtype: a bfloat16 input squared into float32 fails the check
    (its values had all passed, being more precise)."""
    if "cuda" not in runnable_backends():
        pytest.skip("the torch backend cannot run here")
    from types import SimpleNamespace

    import torch

    from ferrum.backends import load_backend
    from ferrum.testing.conformance import _Context
    from ferrum.testing.family_checks import check_relu_squared

    ops = load_backend("cuda").ops
    c = _Context(load_backend("cuda"), "bfloat16")
    c.ops = SimpleNamespace(from_numpy=ops.from_numpy, to_numpy=ops.to_numpy,
                            relu_squared=lambda x: torch.relu(x.float()).square())
    with pytest.raises(AssertionError, match="not in the compute dtype bfloat16"):
        check_relu_squared(c, 4e-2)
    c.ops.relu_squared = ops.relu_squared
    assert check_relu_squared(c, 4e-2) < 4e-2
