"""Per-sequence state of the mixers that are not attention (Gated DeltaNet, Kimi Delta Attention, Mamba-1, Mamba-2,
LFM2's short convolutions, Zamba 2's Mamba-2 after a shared block, MiniMax's lightning attention, RecurrentGemma's
RG-LRU, Gear's gated key/value convolutions, RWKV-7's time and channel mixes, Baichuan-M1's convolution of attention's
keys and values), and those mixers."""

from __future__ import annotations

from typing import Any

#: ``LayerSpec.mixer`` of each recurrent mixer -> the :class:`ferrum.arch.spec.Architecture` field holding its spec
#: (sizes, stored tensors, load-time split, state shapes, and the layer it builds).
MIXERS = {"gated_delta": "gated_delta", "mamba": "mamba", "mamba2": "mamba2", "short_conv": "short_conv",
          "kimi_delta": "kimi_delta", "rg_lru": "rg_lru",
          "shared_mamba2": "shared_block", "lightning": "lightning", "conv_kv_gated": "conv_kv_gated",
          "rwkv7_first": "rwkv7_first", "rwkv7": "rwkv7", "rwkv7_channel": "rwkv7_channel", "conv_attention": "kv_conv"}


def mixer_spec(arch: Any, mixer: str) -> Any:
    """The spec of the recurrent mixer ``mixer`` in ``arch``; None for attention and for a block without a mixer."""
    return getattr(arch, MIXERS[mixer]) if mixer in MIXERS else None
