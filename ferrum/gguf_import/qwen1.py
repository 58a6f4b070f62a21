"""Qwen (1) files (``qwen``) back into the release's layout, as Ferrum's ``qwen`` family (mlx-lm's qwen) reads it.

llama.cpp's converter writes the release's tensors under their own names (``c_attn`` as ``attn_qkv``, q, k and v rows
one after another as the release keeps them; ``w2`` as the gate, ``w1`` as up) and q/k rows as stored (llama.cpp
rotates rotate-half pairs for this architecture). Its MLP width is the release's intermediate_size, which the
release halves. Older converters wrote the norms' epsilon under the RMS key llama.cpp reads, newer ones under the
LayerNorm key (the release's ``layer_norm_epsilon``): either is the same RMS norms' epsilon. llama.cpp runs plain
rope to the whole context, never the release's dynamic NTK and logn attention past seq_length: both are off.
"""

from __future__ import annotations

from typing import Any

from ferrum.errors import UnsupportedFeatureError
from ferrum.gguf_import.files import Metadata, float32_value


def qwen_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The release's config keys for what the file says: the epsilon, the rope base, the heads' width; rope
    scaling (which the release's config has no place for) refused by name."""
    if cfg["rope_scaling"] is not None:
        raise UnsupportedFeatureError(f"{meta.where}: {cfg['rope_scaling']['rope_type']} rope scaling in a qwen file "
                                      "is not supported (Qwen (1) runs plain rope; its config has no scaling)")
    key = p + "attention.layer_norm_rms_epsilon"
    eps = meta.get(key) if key in meta else meta.need(p + "attention.layer_norm_epsilon")
    return {"layer_norm_epsilon": float32_value(eps), "rotary_emb_base": cfg["rope_theta"],
            "kv_channels": cfg["head_dim"], "use_dynamic_ntk": False, "use_logn_attn": False, "no_bias": True}
