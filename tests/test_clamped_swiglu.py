"""The clamped SwiGLU record (:class:`ferrum.moe.activation.ClampedSwiGLU`) composed from the ops, as MiniMax-M3's
dense MLPs and shared experts run it, against transformers' own formulas (``MiniMaxM3VLExperts._apply_gate``, which
its dense MLP repeats, and Hy4's ``HYV4Experts._apply_gate``): in float32 and rounded once to bfloat16, as the
backends' ``moe_experts`` evaluate the experts' copy, on gates far past the limit (where ``g - limit`` no longer
rounds back in bfloat16), an infinite gate and ups around -1 (where ``u * s + s`` cancels)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from transformers.models.hy_v4.modeling_hy_v4 import HYV4Experts
from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import MiniMaxM3VLExperts

from ferrum.backends import load_backend
from ferrum.moe.activation import ClampedSwiGLU
from support import runnable_backends

BACKENDS = runnable_backends()
BFLOAT16 = [b for b in BACKENDS if "bfloat16" in load_backend(b).ops.info.dtypes]  # torch's and MLX's
ALPHA, LIMIT = 1.702, 7.0  # the release's; 1.702 is 1.703125 in bfloat16
#: gates past the limit by more than a bfloat16 ulp of theirs can hold (512 on), an infinite one, and at the limit
LARGE = [513.0, 1024.0, 1030.0, 3000.0, 70000.0, np.inf, 6.99, 7.0, 7.05, -600.0]


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """``[2, 4096 + len(LARGE)]`` bfloat16 gates and ups: random, then ``LARGE`` beside ups of 0.5; the second row's
    ups around -1."""
    torch.manual_seed(0)
    gate = torch.cat([torch.randn(2, 4096) * 3, torch.tensor([LARGE] * 2)], 1).to(torch.bfloat16)
    up = torch.cat([torch.randn(2, 4096) * 3, torch.full((2, len(LARGE)), 0.5)], 1)
    up[1, :4096] = torch.linspace(-1.05, -0.95, 4096)
    return gate, up.to(torch.bfloat16)


def transformers_gate(record: ClampedSwiGLU):
    """transformers' ``_apply_gate`` of the family whose formula ``record`` is."""
    if record.up_offset == 1.0:
        config = transformers.MiniMaxM3VLTextConfig(swiglu_alpha=record.alpha, swiglu_limit=record.limit)
        return MiniMaxM3VLExperts(config)._apply_gate
    assert record.alpha == 1.0 and record.up_offset == 0.0
    return HYV4Experts(transformers.HYV4Config(swiglu_limit=record.limit))._apply_gate


def composed(backend: str, record: ClampedSwiGLU, gate: torch.Tensor, up: torch.Tensor, dtype: str) -> np.ndarray:
    ops = load_backend(backend).ops
    act = record.composed(ops)
    out = act(ops.from_numpy(gate.float().numpy(), dtype), ops.from_numpy(up.float().numpy(), dtype))
    return np.asarray(ops.to_numpy(out), dtype=np.float32)


def bfloat16_ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """How many bfloat16 steps apart two arrays of bfloat16 values are (0 where both are NaN)."""
    bits = [torch.tensor(x).to(torch.bfloat16).view(torch.int16).int().numpy() for x in (a, b)]
    ordered = [np.where(x < 0, -32768 - x, x) for x in bits]  # sign-magnitude to a monotone integer line
    return np.where(np.isnan(a) & np.isnan(b), 0, np.abs(ordered[0] - ordered[1]))


@pytest.mark.parametrize("record", [ClampedSwiGLU(ALPHA, LIMIT), ClampedSwiGLU(1.0, LIMIT, up_offset=0.0)],
                         ids=["minimax_m3", "hy_v4"])
@pytest.mark.parametrize("backend", BFLOAT16)
def test_bfloat16_is_transformers_formula_rounded_once(backend, record):
    """transformers' formula on the bfloat16 inputs in float32, rounded once: within one bfloat16 step everywhere
    (the float32 compositions differ by a float32 rounding at most), no NaN from the infinite gate."""
    gate, up = inputs()
    with torch.no_grad():
        want = transformers_gate(record)(torch.cat([gate, up], -1).float()).to(torch.bfloat16).float().numpy()
    got = composed(backend, record, gate, up, "bfloat16")
    assert np.isfinite(got).all() and np.isfinite(want).all()
    steps = bfloat16_ulps(got, want)
    assert steps.max() <= 1 and (steps == 0).mean() > 0.99
    large = slice(4096, None)  # the clamp is exact: min(g, limit) is the limit itself for every large gate
    np.testing.assert_array_equal(got[0, large], want[0, large])


@pytest.mark.parametrize("backend", BFLOAT16)
def test_bfloat16_is_no_further_from_the_truth_than_transformers(backend):
    """Against the formula in float64, the one rounding is no worse than transformers' own bfloat16 evaluation, which
    rounds alpha * g before its sigmoid (far off in the sigmoid's tail) and each product after."""
    record = ClampedSwiGLU(ALPHA, LIMIT)
    gate, up = inputs()
    with torch.no_grad():
        apply = transformers_gate(record)
        truth = apply(torch.cat([gate, up], -1).double()).numpy()
        in_bfloat16 = apply(torch.cat([gate, up], -1)).float().numpy()
    got = composed(backend, record, gate, up, "bfloat16")
    ours, theirs = np.abs(got - truth), np.abs(in_bfloat16 - truth)
    assert ours.max() <= theirs.max() and ours.mean() < theirs.mean()


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the -600 gate's sigmoid, 0 as it should be
@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_matches_the_host_form(backend):
    for record in (ClampedSwiGLU(ALPHA, LIMIT), ClampedSwiGLU(1.0, LIMIT, up_offset=0.0)):
        gate, up = (x.float() for x in inputs())
        want = record.host(gate.numpy(), up.numpy())
        np.testing.assert_allclose(composed(backend, record, gate, up, "float32"), want, rtol=2e-6, atol=1e-6)
