"""Llama-shaped decoders whose layers differ in shape, each sized by its own entry of the config (remote-code families
mlx-lm runs): Nemotron NAS's searched blocks.

Every layer runs in the model's one KV pool: a layer with fewer key/value heads than the most any has repeats its
own at load (``LayerSpec.stored_kv_heads``), which is exact; a layer without attention holds no pool layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from ferrum.arch import linear_blocks
from ferrum.arch.families._shared import (
    LLAMA_NORMS, Family, Sizes, _ROPE, _SILU, _core, _keys, _rope_spec, read_rope,
)
from ferrum.arch.keys import Key, KeyReader, falsy
from ferrum.arch.spec import Architecture, LayerSpec

# ------------------------------------------------------------------ Nemotron NAS

#: A block_configs entry's fields as mlx-lm's nemotron-nas reads them -> the value Ferrum runs (None: any). The
#: attention's sliding windows, sinks and sparsity are placeholders there (mlx-lm runs full attention whatever they
#: say; DeciLM's code would window it): no release sets them, so a config that does is refused, not run one way.
_NAS_FIELDS = {
    "attention": {"no_op": None, "replace_with_linear": None, "n_heads_in_group": None, "sparsify": (None,),
                  "window_length": (None,), "num_sink_tokens": (None,),
                  "use_prefill_window_in_sink_attention": (False,), "unshifted_sink": (False,)},
    "ffn": {"no_op": None, "replace_with_linear": None, "ffn_mult": None, "sparsify": (None,)},
}


@dataclass(frozen=True)
class _NasBlock:
    """One layer's entry: its attention ("attention", "linear" or "none") with its key/value heads, its FFN ("dense",
    "linear" or "none") with its width."""

    attention: str
    kv_heads: int | None
    ffn: str
    width: int | None


def _nas_width(ffn_mult: float, hidden: int) -> int:
    """The gated MLP's width from its multiplier, as DeciLM and mlx-lm size it: ``2/3 * mult * hidden`` rounded up
    to a multiple of 256 (the multiplier first rounded to 6 decimals, as mlx-lm reads it)."""
    width = int(2 * round(ffn_mult, 6) * hidden / 3)
    return -(-width // 256) * 256


def _nas_blocks(r: KeyReader) -> list[_NasBlock]:
    """block_configs, one validated entry per layer."""
    entries, layers, heads = r("block_configs"), r("num_hidden_layers"), r("num_attention_heads")
    if not isinstance(entries, list) or len(entries) != layers or not all(isinstance(e, dict) for e in entries):
        r.fail("block_configs", f"must list {layers} objects (num_hidden_layers), one per layer")
    return [_nas_block(r, i, entry, heads) for i, entry in enumerate(entries)]


def _nas_block(r: KeyReader, i: int, entry: dict[str, Any], heads: int) -> _NasBlock:
    parts = {}
    for part, fields in _NAS_FIELDS.items():
        values = entry.get(part, {})
        if not isinstance(values, dict) or set(values) - set(fields) or set(entry) - set(_NAS_FIELDS):
            r.fail("block_configs", f"entry {i} must be an object of 'attention' and 'ffn' objects with the fields "
                                    f"mlx-lm reads ({part}: {', '.join(fields)}), got {entry!r}")
        for name, allowed in fields.items():
            if allowed is not None and values.get(name, allowed[0]) not in allowed:
                r.fail("block_configs", f"entry {i} sets {part}.{name} to {values[name]!r}, which neither mlx-lm "
                                        "nor Ferrum runs; load a release without it", unsupported=True)
        parts[part] = values
    attention, ffn = parts["attention"], parts["ffn"]
    if attention.get("no_op") and ffn.get("no_op"):
        r.fail("block_configs", f"entry {i} skips both attention and the FFN (no_op), a layer Ferrum does not run; "
                                "drop it from the checkpoint and block_configs", unsupported=True)
    kind, kv_heads = ("none" if attention.get("no_op") else "linear" if attention.get("replace_with_linear")
                      else "attention"), None
    if kind == "attention":
        group = attention.get("n_heads_in_group")
        if not isinstance(group, int) or isinstance(group, bool) or group <= 0 or heads % group:
            r.fail("block_configs", f"entry {i}'s attention.n_heads_in_group must be a positive integer dividing "
                                    f"num_attention_heads ({heads}), got {group!r}")
        kv_heads = heads // group
    ffn_kind, width = "none" if ffn.get("no_op") else "linear" if ffn.get("replace_with_linear") else "dense", None
    if ffn_kind == "dense":
        mult = ffn.get("ffn_mult")
        if not isinstance(mult, (int, float)) or isinstance(mult, bool) or not 0 < mult < math.inf:
            r.fail("block_configs", f"entry {i}'s ffn.ffn_mult must be a positive number, got {mult!r}")
        width = _nas_width(mult, r("hidden_size"))
    return _NasBlock(kind, kv_heads, ffn_kind, width)


def _nas_kv_heads(r: KeyReader, heads: int) -> int:
    """The pool's key/value heads: a multiple of every attention layer's (their least common one, which divides the
    heads), so each layer's repeat at load is whole; 1 where no layer attends."""
    return math.lcm(*(block.kv_heads for block in _nas_blocks(r) if block.kv_heads is not None))


def _nas_sizes(r: KeyReader, sizes: Sizes) -> Sizes:
    """The model's MLP width: the widest layer's (each layer's own is ``LayerSpec.intermediate_size``). Its heads
    are ``hidden_size / num_attention_heads`` wide, as mlx-lm sizes them whatever head_dim says."""
    if sizes.head_dim * sizes.num_heads != sizes.hidden_size:
        r.fail("head_dim", f"is {sizes.head_dim}, but mlx-lm's nemotron-nas sizes heads hidden_size / "
                           f"num_attention_heads ({sizes.hidden_size // sizes.num_heads}); remove it", unsupported=True)
    widths = [block.width for block in _nas_blocks(r) if block.width is not None]
    return replace(sizes, intermediate_size=max(widths, default=sizes.intermediate_size))


def _nas_layer(block: _NasBlock, sizes: Sizes, rope: Any) -> LayerSpec:
    """A layer of Llama's blocks with its parts as its entry says: a skipped half has no norm, the other's keeps
    its own (``norms``: the FFN alone reads post_attention_layernorm, in the block's one norm slot)."""
    norms = ({"pre_attn": LLAMA_NORMS["pre_mlp"]} if block.attention == "none"
             else {"pre_attn": LLAMA_NORMS["pre_attn"]} if block.ffn == "none" else None)
    return LayerSpec(
        None, rope, mixer=block.attention, mlp=block.ffn,
        stored_kv_heads=None if block.kv_heads in (None, sizes.num_kv_heads) else block.kv_heads,
        intermediate_size=None if block.width in (None, sizes.intermediate_size) else block.width,
        norms=None if norms is None else tuple(norms.items()))


#: mlx-lm's own names of the linear sub-blocks (its conversions store them so; its sanitize does not rename the
#: release's): Ferrum's name -> mlx-lm's.
_NAS_MLX_LM_NAMES = {linear_blocks.ATTENTION: "self_attn.linear", linear_blocks.MLP: "mlp.linear"}


def _nemotron_nas(r: KeyReader, sizes: Sizes) -> Architecture:
    """Nemotron NAS (Llama-3.1-Nemotron-51B, Llama-3.3-Nemotron-Super-49B, Llama-3.1-Nemotron-Ultra-253B; DeciLM's
    remote code, mlx-lm's nemotron-nas): Llama's blocks, each layer's attention and FFN as its block_configs entry
    says: skipped (no_op, with its norm), one square linear map (replace_with_linear), or attention with its own
    key/value heads (num_attention_heads / n_heads_in_group) and a gated MLP of its own width (ffn_mult)."""
    key, spec = _rope_spec(r)
    if spec.get("rope_type", spec.get("type")) == "llama3":  # mlx-lm's Llama3RoPE where the settings leave it out
        spec.setdefault("original_max_position_embeddings", 8192)
    rope = read_rope(r, sizes, spec, key, ("default", "linear", "llama3"), theta_default=500000.0)
    r("hidden_act")
    blocks = _nas_blocks(r)
    linear = {kind for block in blocks for kind, on in ((linear_blocks.ATTENTION, block.attention == "linear"),
                                                       (linear_blocks.MLP, block.ffn == "linear")) if on}
    names = {ours: _NAS_MLX_LM_NAMES[ours] for ours in sorted(linear)}
    return Architecture(
        layers=tuple(_nas_layer(block, sizes, rope) for block in blocks),
        norms=LLAMA_NORMS,
        attn_scale=1.0 / math.sqrt(sizes.head_dim),
        layouts=(("model.", "lm_head.weight", names),) if names else (),
    )


_NAS_BIAS = "no Nemotron NAS release sets it (mlx-lm would bias the linear sub-blocks, DeciLM's code would not)"

TABLE: dict[str, Family] = {
    "nemotron-nas": Family(  # NVIDIA's Llama-Nemotron 51B / Super 49B / Ultra 253B (DeciLM remote code)
        _keys(_core(False), _ROPE, _SILU, (
            Key("block_configs"),
            Key("attention_bias", default=False, check=falsy(_NAS_BIAS), unsupported=True),
            Key("mlp_bias", default=False, check=falsy(_NAS_BIAS), unsupported=True),
            Key("intermediate_size"),  # null in the releases: each layer's ffn_mult sizes its MLP
            Key("num_key_value_heads"),  # null in the releases: each layer's n_heads_in_group gives its own
        )),
        _nemotron_nas,
        eps_default=1e-5,
        kv_heads=_nas_kv_heads,
        sizes=_nas_sizes,
    ),
}
