"""The ops plugin object ``backend_load`` returns: every hook implementation of this package.

Left to the core's reference compositions: ``embedding`` (a row gather either way) and the
expert ops (``upload_experts``, ``moe_experts``); ``moe_route`` is the plugin's own.
"""

from ferrum_jax.arrays import (  # noqa: F401  (pluggy finds the hook implementations by name)
    add, backend_info, cast, concat, from_numpy, reshape, split, take_rows, to_numpy, upload_weight,
)
from ferrum_jax.attention import attention, paged_attention, prepare_attention_batch  # noqa: F401
from ferrum_jax.dense import (  # noqa: F401
    add_rms_norm, clip, gelu, gelu_tanh_mul, layer_norm, linear, mul, mul_scalar, quantize_activations, relu,
    relu_squared, rms_norm, rope, silu_mul, softcap, xielu,
)
from ferrum_jax.kv import kv_alloc, kv_gather, kv_write  # noqa: F401
from ferrum_jax.moe import moe_route  # noqa: F401
from ferrum_jax.quant import quantized_embedding, quantized_linear, quantized_upload  # noqa: F401
from ferrum_jax.recurrent import (  # noqa: F401
    causal_conv1d, gated_delta_rule, rg_lru, selective_scan, sigmoid_mul, softplus_mul, wkv7,
)
from ferrum_jax.sampling import sample  # noqa: F401
