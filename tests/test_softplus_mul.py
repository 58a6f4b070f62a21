"""softplus_mul (plugin API 1.23, Laguna's gated attention): every runnable backend runs it natively and matches the
float64 oracle (its result in the compute dtype), the core's host fallback too, and the kit's check fails on a wrong
op."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ferrum import reference_ops
from ferrum.backends import load_backend
from ferrum.testing import family_checks
from ferrum.testing.conformance import _Context, _Mismatch
from support import runnable_backends

CASES = [(b, d) for b in runnable_backends() for d in ("float32", "bfloat16") if d in load_backend(b).info.dtypes]


@pytest.mark.parametrize("backend, dtype", CASES)
def test_softplus_mul_matches_the_float64_oracle(backend, dtype):
    ops = load_backend(backend).ops
    assert "softplus_mul" in ops.native
    tol = 1e-5 if dtype == "float32" else 1e-2
    assert family_checks.check_softplus_mul(_Context(load_backend(backend), dtype), tol) <= tol


def test_the_host_fallback_matches_the_float64_oracle():
    c = _Context(load_backend("cpu"), "float32")
    ops = c.ops
    c.ops = SimpleNamespace(from_numpy=ops.from_numpy, to_numpy=ops.to_numpy,
                            softplus_mul=lambda gate, x: reference_ops.softplus_mul(ops, gate, x))
    assert family_checks.check_softplus_mul(c, 1e-5) <= 1e-5


def test_the_kit_catches_a_sigmoid_gate():
    c = _Context(load_backend("cpu"), "float32")
    sigmoid = c.ops.sigmoid_mul
    c.ops = SimpleNamespace(from_numpy=c.ops.from_numpy, to_numpy=c.ops.to_numpy, softplus_mul=sigmoid)
    with pytest.raises(_Mismatch):
        family_checks.check_softplus_mul(c, 1e-5)
