"""Test settings: the conformance items (``--ferrum-backend jax`` in pyproject.toml) come from
Ferrum's pytest plugin; the tests here cover what the kit cannot see (jit caches, donation)."""

import os

# The suite compiles a few hundred tiny XLA functions once each; LLVM's optimisation passes cost more
# than they save at these sizes (about half the suite's time on a 2-core CPU). Set before jax loads.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
