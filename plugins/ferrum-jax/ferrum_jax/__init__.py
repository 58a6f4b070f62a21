"""Ferrum's JAX backend: the entry-point object, cheap to import (jax is imported only by ``backend_load``)."""

from __future__ import annotations

import importlib.util
import os

from ferrum import hookimpl
from ferrum.backends import BackendProbe

#: The Ferrum plugin API this package was written for: a literal, never ``ferrum.API_VERSION``, so a
#: Ferrum with another major version refuses it instead of calling hooks whose meaning changed.
#: 1.9: clip, mul; 1.11: top-p within the top-k; 1.12: moe_route's routing; 1.13: its rule; 1.14: relu_squared
#: 1.15: xielu; 1.16: sigmoid_mul, causal_conv1d, gated_delta_rule, the grouped rules' expert_scale (its experts
#: stay the core's, which run every activation, so 1.18's ungated experts and 1.26's up_offset are the core's too);
#: 1.19: selective_scan (1.17's ssd_update it leaves to the core); 1.20: gated_delta_rule's per-key-channel gate and
#: beta_scale; 1.21: relu, attention's alibi_slopes; 1.22: quantize_activations; 1.23: routing chosen by the logits;
#: 1.24: softplus_mul; 1.25: rg_lru; 1.27: gated_delta_rule's lower_bound; 1.28: the grouped rules' dropped_weighed;
#: 1.29: the experts' swish clamp (the core's experts, as every activation); 1.30: wkv7
API_VERSION = "1.30"


@hookimpl
def backend_probe() -> BackendProbe:
    if importlib.util.find_spec("jax") is None or importlib.util.find_spec("jaxlib") is None:
        return BackendProbe(False, reason="jax is not installed: pip install 'jax[cpu]' (or jax[cuda12], jax[tpu])",
                            api_version=API_VERSION)
    platforms = os.environ.get("JAX_PLATFORMS", "")
    where = f"JAX_PLATFORMS={platforms}" if platforms else "jax's default device"
    # After every built-in backend (numpy 30, MLX 40, torch 90), for float and quantized checkpoints alike:
    # installing it must not change the automatic choice; ask for it with backend="jax".
    return BackendProbe(True, device="jax", reason=f"runs on {where}", priority=100, api_version=API_VERSION)


@hookimpl
def backend_load():
    from ferrum_jax import ops

    return ops
