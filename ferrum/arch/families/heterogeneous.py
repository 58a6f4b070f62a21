"""Llama-shaped decoders whose layers differ in shape, each sized by its own entry of the config (remote-code families
mlx-lm runs): Nemotron NAS's searched blocks, OpenELM's layer-wise scaling.

Every layer runs in the model's one KV pool, with the most key/value heads any layer has: a layer with fewer repeats
its own at load (``StoredHeads.kv_heads``, Nemotron NAS) or is padded with zero heads and their queries
(``StoredHeads.fewer_kv`` "zero", OpenELM), either exact; a layer without attention holds no pool layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable

from ferrum.arch import linear_blocks
from ferrum.arch.families._shared import (
    LLAMA_NORMS, Family, Sizes, _ROPE, _SILU, _core, _keys, _rope_spec, read_rope,
)
from ferrum.arch.keys import Key, KeyReader, boolean, falsy, one_of, optional_positive_number, positive_number, size
from ferrum.arch.rope import Rope
from ferrum.arch.heads import StoredHeads
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


#: The widest MLP a multiplier may give a layer: intermediate_size's limit (:func:`ferrum.arch.keys.size`).
_WIDTH_LIMIT = 1 << 20


def _width(r: KeyReader, key: str, what: str, product: float, rounded: Callable[[float], int]) -> int:
    """An MLP's width from its multiplier's ``product`` as the family rounds it; refused by ``key`` where it is none
    (a multiplier so small it rounds to 0) or past :data:`_WIDTH_LIMIT`, as intermediate_size would be."""
    width = rounded(product) if product <= _WIDTH_LIMIT else None  # an absurd product is not rounded (nor an inf)
    if width is None or not 0 < width <= _WIDTH_LIMIT:
        r.fail(key, f"{what} gives an MLP {product:g} wide before rounding ({width} after); a layer's MLP must be "
                    f"1 to {_WIDTH_LIMIT} wide, so the config is corrupt")
    return width


def _nas_product(ffn_mult: float, hidden: int) -> float:
    return 2 * round(ffn_mult, 6) * hidden / 3


def _nas_rounded(product: float) -> int:
    return -(-int(product) // 256) * 256


def nas_width(ffn_mult: float, hidden: int) -> int:
    """The gated MLP's width from its multiplier, as DeciLM and mlx-lm size it: ``2/3 * mult * hidden`` rounded up
    to a multiple of 256 (the multiplier first rounded to 6 decimals, as mlx-lm reads it)."""
    return _nas_rounded(_nas_product(ffn_mult, hidden))


def _nas_width(r: KeyReader, i: int, ffn_mult: float, hidden: int) -> int:
    """Layer ``i``'s :func:`nas_width`, refused by block_configs where it is none or absurd."""
    return _width(r, "block_configs", f"entry {i}'s ffn.ffn_mult {ffn_mult!r}", _nas_product(ffn_mult, hidden),
                  _nas_rounded)


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
        width = _nas_width(r, i, mult, r("hidden_size"))
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
    its own (``norms``: the FFN alone reads post_attention_layernorm, in the block's one norm slot); with both
    skipped (Ultra 253B's) the layer is the identity (``LayerSpec.identity``), as mlx-lm runs it."""
    norms = ({} if block.attention == block.ffn == "none"
             else {"pre_attn": LLAMA_NORMS["pre_mlp"]} if block.attention == "none"
             else {"pre_attn": LLAMA_NORMS["pre_attn"]} if block.ffn == "none" else None)
    return LayerSpec(
        None, rope, mixer=block.attention, mlp=block.ffn,
        heads=StoredHeads(kv_heads=None if block.kv_heads in (None, sizes.num_kv_heads) else block.kv_heads),
        intermediate_size=None if block.width in (None, sizes.intermediate_size) else block.width,
        norms=None if norms is None else tuple(norms.items()))


#: mlx-lm's own names of the linear sub-blocks (its conversions store them so; its sanitize does not rename the
#: release's): Ferrum's name -> mlx-lm's.
_NAS_MLX_LM_NAMES = {linear_blocks.ATTENTION: "self_attn.linear", linear_blocks.MLP: "mlp.linear"}


def _nemotron_nas(r: KeyReader, sizes: Sizes) -> Architecture:
    """Nemotron NAS (Llama-3.1-Nemotron-51B, Llama-3.3-Nemotron-Super-49B, Llama-3.1-Nemotron-Ultra-253B; DeciLM's
    remote code, mlx-lm's nemotron-nas): Llama's blocks, each layer's attention and FFN as its block_configs entry
    says: skipped (no_op, with its norm), one square linear map (replace_with_linear), or attention with its own
    key/value heads (num_attention_heads / n_heads_in_group) and a gated MLP of its own width (ffn_mult); a layer
    skipping both is the identity."""
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


# ---------------------------------------------------------------------- OpenELM

def _counts(value: Any, layers: Any = None) -> bool:
    """Whether ``value`` lists positive integers (one per layer, where ``layers`` is given)."""
    return isinstance(value, list) and len(value) == (layers or len(value)) > 0 and all(
        type(v) is int and v > 0 for v in value)


def _head_counts(value: Any) -> str | None:
    return None if _counts(value) else f"must list each layer's heads, positive integers, got {value!r}"


def _openelm_derive(raw: dict[str, Any]) -> dict[str, Any]:
    """Llama's keys from OpenELM's: the model's heads and key/value heads, the most any layer has (each layer's own are
    checked and padded to them by the builder; lists that are not refused by their own keys), and whether the LM
    head is the embedding (share_input_output_layers)."""
    derived = {**raw, "tie_word_embeddings": raw.get("share_input_output_layers", True)}
    for ours, theirs in (("num_attention_heads", "num_query_heads"), ("num_key_value_heads", "num_kv_heads")):
        derived[ours] = max(raw[theirs]) if _counts(raw.get(theirs)) else 1
    return derived


def _make_divisible(value: float, divisor: int) -> int:
    """OpenELM's (MobileNet's) rounding of an FFN width to a multiple of ``divisor``, never more than 10% down."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _openelm_widths(r: KeyReader) -> list[int]:
    multipliers, layers = r("ffn_multipliers"), r("num_transformer_layers")
    if not isinstance(multipliers, list) or len(multipliers) != layers or any(
            positive_number(m) for m in multipliers):
        r.fail("ffn_multipliers", f"must list {layers} positive numbers (num_transformer_layers), got {multipliers!r}")
    divisor = r("ffn_dim_divisor")
    return [_width(r, "ffn_multipliers", f"layer {i}'s multiplier {m!r}", m * r("model_dim"),
                   lambda width: _make_divisible(width, divisor)) for i, m in enumerate(multipliers)]


def _openelm_sizes(r: KeyReader, sizes: Sizes) -> Sizes:
    """The model's MLP width: the widest layer's (each layer's own is ``LayerSpec.intermediate_size``)."""
    return replace(sizes, intermediate_size=max(_openelm_widths(r)))


def _openelm(r: KeyReader, sizes: Sizes) -> Architecture:
    """Apple's OpenELM (remote code, mlx-lm's openelm): Llama's blocks under its names with q/k/v fused, per-head q/k
    RMSNorms (normalize_qk_projections), and each layer's own query and key/value heads (num_query_heads,
    num_kv_heads: the same queries per key/value head in every layer, the fewer padded with zero heads at load) and
    fused gated MLP width (ffn_multipliers, rounded to ffn_dim_divisor)."""
    layers, group = sizes.num_layers, sizes.num_heads // sizes.num_kv_heads
    queries, kv_heads = r("num_query_heads"), r("num_kv_heads")
    for key, value in (("num_query_heads", queries), ("num_kv_heads", kv_heads)):
        if not _counts(value, layers):
            r.fail(key, f"must list {layers} positive integers (num_transformer_layers), got {value!r}")
    uneven = next((i for i, (q, kv) in enumerate(zip(queries, kv_heads)) if q != group * kv), None)
    if uneven is not None:
        r.fail("num_query_heads", f"gives layer {uneven} {queries[uneven]} query heads for {kv_heads[uneven]} "
                                  f"key/value heads; Ferrum runs OpenELM with {group} per key/value head in every "
                                  "layer (the widest layer's), as its releases have them", unsupported=True)
    rope = Rope(theta=float(r("rope_freq_constant")), head_dim=sizes.head_dim, rotary_dim=sizes.head_dim)
    return Architecture(
        layers=tuple(LayerSpec(None, rope, heads=StoredHeads() if kv == sizes.num_kv_heads else StoredHeads(
                                   query_heads=group * kv, kv_heads=kv, fewer_kv="zero"),
                               intermediate_size=None if width == sizes.intermediate_size else width)
                     for kv, width in zip(kv_heads, _openelm_widths(r))),
        norms={"pre_attn": "attn_norm", "pre_mlp": "ffn_norm"},
        attn_scale=1.0 / math.sqrt(sizes.head_dim),
        qk_norm="head" if r("normalize_qk_projections") else None,
        fused_qkv=True, fused_gate_up=True,
        prefix="transformer.",
        stored_names={"embed_tokens": "token_embeddings", "self_attn.qkv_proj": "attn.qkv_proj",
                      "self_attn.o_proj": "attn.out_proj", "self_attn.q_norm": "attn.q_norm",
                      "self_attn.k_norm": "attn.k_norm", "mlp.gate_up_proj": "ffn.proj_1",
                      "mlp.down_proj": "ffn.proj_2"},
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
    "openelm": Family(  # Apple's OpenELM 270M / 450M / 1.1B / 3B (remote code)
        _keys((
            Key("model_dim", check=size(1 << 17)), Key("num_transformer_layers", check=size(1024)),
            Key("head_dim", check=size(4096)), Key("vocab_size", check=size(1 << 23)),
            Key("max_context_length", default=2048, check=size(1 << 28)),
            Key("num_attention_heads"), Key("num_key_value_heads"), Key("intermediate_size"),  # derived
            Key("tie_word_embeddings"),  # derived
            Key("num_query_heads", check=_head_counts), Key("num_kv_heads", check=_head_counts),
            Key("ffn_multipliers"),
            Key("ffn_dim_divisor", check=size(1 << 16)),
            Key("ffn_with_glu", default=True, check=one_of(True), unsupported=True),
            Key("normalize_qk_projections", default=True, check=boolean),
            Key("share_input_output_layers", default=True, check=boolean),
            Key("rope_freq_constant", default=10000.0, check=positive_number),
            Key("rms_norm_eps", check=optional_positive_number),
            Key("activation_fn_name", default="swish", check=one_of("swish", "silu"), unsupported=True),
            Key("normalization_layer_name", default="rms_norm", check=one_of("rms_norm"), unsupported=True),
        )),
        _openelm,
        names={"hidden_size": "model_dim", "num_hidden_layers": "num_transformer_layers",
               "max_position_embeddings": "max_context_length"},
        derive=_openelm_derive,
        sizes=_openelm_sizes,
    ),
}
