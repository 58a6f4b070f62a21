"""RWKV-7 files (``rwkv7``) back into fla-hub's release layout, as Ferrum's ``rwkv7`` family (mlx-lm's) reads it.

llama.cpp's converter (its Rwkv7Model) renames the release's tensors (``attn.r_proj`` as ``time_mix_receptance``, each
LoRA's down / up / bias as ``time_mix_<x>1`` / ``<x>2`` / ``<x>0``, ``g_norm`` as ``time_mix_ln``, the first layer's
``pre_norm`` as ``token_embd_norm``...), stacks the six token-shift mixes into ``time_mix_lerp_fused [6, 1, 1, C]``
(r, w, k, v, a, g), flattens ``r_k``, and gives the first layer, which has no value-residual mix, copies of its
``a`` LoRA as one (llama.cpp loads them and never reads them: dropped). Its sizes are the ``wkv.head_size`` and the
four LoRA ranks; ``head_count`` is 0. llama.cpp's graph is the release's: the decay ``exp(-e^-0.5 sigmoid(w))``,
the per-head norm at 64e-5, the squared-ReLU channel mix.
"""

from __future__ import annotations

from typing import Any

from ferrum.errors import UnsupportedFeatureError
from ferrum.gguf_import.files import Metadata

#: The LoRAs: llama.cpp's letter -> the release's module.
_LORAS = {"w": "w_lora", "a": "a_lora", "v": "v_lora", "g": "g_lora"}
#: Block tensors: llama.cpp's names -> the release's.
TENSORS = (
    *((f"attn_norm.{p}", f"attn_norm.{p}") for p in ("weight", "bias")),
    *((f"attn_norm_2.{p}", f"ffn_norm.{p}") for p in ("weight", "bias")),
    *((f"time_mix_{gguf}.weight", f"attn.{hf}.weight") for gguf, hf in (
        ("receptance", "r_proj"), ("key", "k_proj"), ("value", "v_proj"), ("output", "o_proj"), ("ln", "g_norm"))),
    ("time_mix_ln.bias", "attn.g_norm.bias"),
    *((f"time_mix_{x}.weight", f"attn.{x}") for x in ("k_k", "k_a", "r_k")),
    *((f"time_mix_{x}1.weight", f"attn.{lora}.lora.0.weight") for x, lora in _LORAS.items()),
    *((f"time_mix_{x}2.weight", f"attn.{lora}.lora.2.weight") for x, lora in _LORAS.items()),
    *((f"time_mix_{x}0.weight", f"attn.{lora}.lora.2.bias") for x, lora in _LORAS.items() if x != "g"),
    ("channel_mix_key.weight", "ffn.key.weight"), ("channel_mix_value.weight", "ffn.value.weight"),
    ("channel_mix_lerp_k.weight", "ffn.x_k"),
)
#: The stacked token-shift mixes, in the converter's order.
SPLIT = (("time_mix_lerp_fused.weight", tuple(f"attn.x_{x}" for x in "rwkvag")),)
#: The embeddings' norm (the first layer's pre_norm).
GLOBAL_TENSORS = tuple((f"token_embd_norm.{p}", f"model.embed_norm.{p}") for p in ("weight", "bias"))
#: The first layer's value-residual LoRA, the converter's copies of its ``a`` LoRA.
UNREAD = r"blk\.0\.time_mix_v[012]\.weight"


def rwkv7_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The release's config keys for the file's sizes; a token shift over other than the previous token (llama.cpp
    runs 2 only: the time and channel mixes' one each) refused by name."""
    shift = meta.get(p + "token_shift_count", 2)
    if shift != 2:
        raise UnsupportedFeatureError(f"{meta.where}: {p}token_shift_count {shift} is not supported (RWKV-7 shifts "
                                      "the time and channel mixes' inputs by one token each: 2)")
    return {"head_dim": int(meta.need(p + "wkv.head_size")), "num_attention_heads": 1, "num_key_value_heads": 1,
            "num_heads": None, "hidden_act": "sqrelu", "norm_first": True, "norm_bias": True,
            **{f"{name}_low_rank_dim": int(meta.need(f"{p}attention.{key}_lora_rank")) for name, key in (
                ("decay", "decay"), ("a", "iclr"), ("v", "value_residual_mix"), ("gate", "gate"))}}
