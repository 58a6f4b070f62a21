"""Griffin's RG-LRU (``rg_lru``, plugin API 1.25) against its float64 oracle: the conformance kit's case on every
backend here (natively; an installed JAX plugin from before 1.25 through the core's fallback), the kit failing an
RG-LRU that drops the segment-start reset or the sqrt(1 - a^2) input normalization, and the batched formulation
(torch's and MLX's) padded to buckets or not."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from ferrum.backends import load_backend
from ferrum.recurrent import batched, kernels
from ferrum.testing import family_checks
from ferrum.testing.conformance import _Context, _Mismatch
from support import grouped_routing_backends, runnable_backends


def _unnormalized(x, gx, ga, a_param, state, cu, starts):
    """The RG-LRU with its input never scaled by sqrt(1 - a^2) (a port that reads it as selective_scan's step)."""
    log_a = -8.0 / (1.0 + np.exp(-ga)) * np.logaddexp(0, a_param)
    y, new = np.empty_like(x), np.array(state, np.float32)
    for s in range(len(cu) - 1):
        for t in range(cu[s], cu[s + 1]):
            keep = 0.0 if t == cu[s] and starts[s] else 1.0
            new[s] = keep * np.exp(log_a[t]) * new[s] + x[t] / (1.0 + np.exp(-gx[t]))
            y[t] = new[s]
    return y, new


def _never_reset(x, gx, ga, a_param, state, cu, starts):
    """The RG-LRU that never sees a sequence start (every first input scaled by sqrt(1 - a^2))."""
    return kernels.rg_lru(x, gx, ga, a_param, state, cu, np.zeros_like(starts))


WRONG = {"reset dropped": _never_reset, "sqrt(1 - a^2) dropped": _unnormalized}


@pytest.mark.parametrize("backend", sorted(set(runnable_backends() + grouped_routing_backends())))
def test_the_kits_rg_lru_case_passes(backend):
    """Natively on cpu / torch / MLX and the JAX plugin; one installed from before API 1.25 (reinstall
    plugins/ferrum-jax) through the core's fallback."""
    from ferrum.backends import declared_version
    from ferrum.recurrent.rg_lru import runs_natively

    ops = load_backend(backend).ops
    assert runs_natively(ops) == (backend != "jax" or declared_version(ops.info) >= (1, 25))
    assert family_checks.check_rg_lru(_Context(load_backend(backend), "float32"), 1e-5) <= 1e-5


def _kit_with(lru) -> _Context:
    c = _Context(load_backend("cpu"), "float32")
    base = c.ops
    c.ops = SimpleNamespace(from_numpy=base.from_numpy, to_numpy=base.to_numpy, native=frozenset({"rg_lru"}),
                            info=base.info, rg_lru=lru)
    return c


@pytest.mark.parametrize("wrong", WRONG)
def test_the_kit_catches_an_rg_lru_without_its_reset_or_normalization(wrong):
    with pytest.raises(_Mismatch):
        family_checks.check_rg_lru(_kit_with(WRONG[wrong]), 1e-5)


def test_a_plugin_declaring_an_older_api_gets_the_fallback():
    """A plugin's own rg_lru is called only where it declares API 1.25."""
    from ferrum.backends import BackendInfo
    from ferrum.recurrent.rg_lru import runs_natively

    info = load_backend("cpu").ops.info
    older = SimpleNamespace(native=frozenset({"rg_lru"}), info=BackendInfo(**{**vars(info), "api_version": "1.24"}))
    assert runs_natively(SimpleNamespace(native=frozenset({"rg_lru"}), info=info)) and not runs_natively(older)


_VARLEN = np.array([0, 1, 9, 9, 14], np.int32)
_DECODE = np.arange(5, dtype=np.int32)


@pytest.mark.parametrize("cu", [_VARLEN, _DECODE, np.array([0, 0, 0])], ids=["varlen", "decode", "no tokens"])
def test_the_batched_formulation_gives_the_kernels_results(cu):
    """Padded to buckets (as JAX would run it) or not, with an empty segment and segments starting or not, and a
    batch of empty segments (the states back unchanged)."""
    rng = np.random.default_rng(int(cu[-1]))
    n, width = int(cu[-1]), 6
    x, gx, ga = (rng.standard_normal((3, n, width)) * 3).astype(np.float32)
    a_param = rng.standard_normal(width).astype(np.float32)
    state = rng.standard_normal((len(cu) - 1, width)).astype(np.float32)
    starts = np.arange(len(cu) - 1) % 2 == 0
    want = kernels.rg_lru(x, gx, ga, a_param, state, cu, starts)
    plain = batched.Framework(np, np.asarray, lambda a, dtype: a.astype(dtype))
    for fw in (plain, batched.Framework(np, np.asarray, plain.astype,
                                        bucket=lambda k: 1 << (max(k, 1) - 1).bit_length())):
        for got, expected in zip(batched.rg_lru(fw, x, gx, ga, a_param, state, cu, starts), want):
            assert got.shape == expected.shape
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
