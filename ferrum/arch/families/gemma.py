"""Gemma 1-4, Gemma 3n, VaultGemma and Gear: (1 + w) norms, scaled embeddings, sliding and full layers."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable

from ferrum.arch.altup import AltUpSpec
from ferrum.arch.families._shared import (
    FULL, Family, LLAMA_NORMS, PLAMO_NORM_OFFSETS, PLAMO_STORED, SANDWICH_NORMS, SLIDING, Sizes, _LAYER_TYPES,
    _LLAMA_ROPES, _ROPE, _WINDOW, _core, _core_defaults, _keys, _layer_kinds, _per_kind_rope_specs, _plamo_core,
    _rope_object, _rope_spec, _without_nulls, read_rope,
)
from ferrum.arch.keys import (
    Key, KeyReader, boolean, falsy, lists_of, one_of, optional_non_negative_int, optional_positive_int,
    optional_positive_number, optional_size, positive_int, positive_number, size,
)
from ferrum.arch.per_layer import PerLayerInputs
from ferrum.arch.rope import Rope
from ferrum.arch.heads import StoredHeads
from ferrum.arch.spec import Architecture, LayerSpec
from ferrum.moe.spec import KEYS as MOE_KEYS, gemma4_moe
from ferrum.recurrent.conv_kv_gated import ConvKvGatedSpec
#: Gemma 2 / 3's window where a config leaves it out, as their transformers config classes default it (after _GEMMA).
_GEMMA_WINDOW = (Key("sliding_window", default=4096, check=optional_positive_int),)


#: transformers' Gemma (1) reads ``hidden_act`` only, taking the legacy "gelu" of the official configs as the tanh
#: approximation Gemma was trained with.
_GEMMA1_ACTIVATIONS = {"gelu": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu"}


def _gemma1(r: KeyReader, sizes: Sizes) -> Architecture:
    """Llama's two pre-norms with Gemma's ``1 + w`` weights, a GeGLU MLP and embeddings scaled by sqrt(hidden)."""
    r("use_bidirectional_attention")
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, _LLAMA_ROPES)
    return Architecture(
        layers=tuple(LayerSpec(None, rope) for _ in range(sizes.num_layers)),
        norms=LLAMA_NORMS,
        norm_offset=1.0,
        activation=_GEMMA1_ACTIVATIONS[r("hidden_act")],
        embed_scale=math.sqrt(sizes.hidden_size),
        attn_scale=1.0 / math.sqrt(sizes.head_dim),
        qkv_bias=r("attention_bias"),
        o_bias=r("attention_bias"),
    )


def _gemma(r: KeyReader, sizes: Sizes, pattern_default: int, qk_norm: str | None, ropes: Callable,
           norms: dict[str, str] = SANDWICH_NORMS) -> Architecture:
    r.get("use_bidirectional_attention")  # VaultGemma has no such key: always causal
    r("hidden_activation")
    pattern = r.get("sliding_window_pattern") or pattern_default
    window, types = _layer_kinds(r, sizes, lambda i: SLIDING if (i + 1) % pattern else FULL)
    sliding_rope, full_rope = ropes(r, sizes)
    return Architecture(
        layers=tuple(
            LayerSpec(window, sliding_rope) if t == SLIDING else LayerSpec(None, full_rope) for t in types
        ),
        norms=norms,
        norm_offset=1.0,
        activation="gelu_tanh",
        embed_scale=math.sqrt(sizes.hidden_size),
        attn_scale=float(r("query_pre_attn_scalar")) ** -0.5,
        attn_softcap=r("attn_logit_softcapping"),
        final_softcap=r("final_logit_softcapping"),
        qk_norm=qk_norm,
        qkv_bias=r("attention_bias"),
        o_bias=r("attention_bias"),
    )


def _gemma2_ropes(r: KeyReader, sizes: Sizes) -> tuple[Rope, Rope]:
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, ("default", "linear", "dynamic"))
    return rope, rope


def _gemma3_ropes(r: KeyReader, sizes: Sizes) -> tuple[Rope, Rope]:
    """Full-attention layers: rope_theta (and rope_scaling); sliding ones: rope_local_base_freq, unscaled."""
    specs = _per_kind_rope_specs(r, "Gemma 3")
    if specs is not None:
        full, sliding = specs
        full = read_rope(r, sizes, full, "rope_parameters", ("default", "linear"), theta_default=1_000_000.0)
        sliding = read_rope(r, sizes, {"rope_theta": r("rope_local_base_freq"), **sliding}, "rope_parameters",
                            ("default", "linear"))
        return sliding, full
    key, spec = _rope_spec(r)
    full = read_rope(r, sizes, spec, key, ("default", "linear"), theta_default=1_000_000.0)
    local = r("rope_local_base_freq")
    theta = 10_000.0 if local is None else float(local)
    return Rope(theta=theta, head_dim=sizes.head_dim, rotary_dim=sizes.head_dim), full


def _by_layer_index(r: KeyReader, per_layer: dict) -> dict[int, Any]:
    """per_layer_config's entries by layer index: transformers saves the keys zero-padded ("05" of 30 layers)."""
    by_index: dict[int, Any] = {}
    for key, over in per_layer.items():
        if isinstance(key, bool) or not (isinstance(key, int) or isinstance(key, str) and key.isdigit()):
            r.fail("per_layer_config", f"has the key {key!r}; its keys are layer indices")
        if int(key) in by_index:
            r.fail("per_layer_config", f"gives layer {int(key)} twice (key {key!r})")
        by_index[int(key)] = over
    return by_index


def _gemma4_shapes(r: KeyReader) -> dict[str, tuple[int, int]]:
    """Each attention kind's (head_dim, key/value heads) as transformers' Gemma4TextConfig resolves them: the full
    layers' from global_head_dim and (with attention_k_eq_v) num_global_key_value_heads, as releases write them;
    or, where the config has one (transformers 5.24 saves it in their place), from per_layer_config, one entry of
    overrides per layer index."""
    head_dim, heads = r("head_dim"), r("num_attention_heads")
    kv = r("num_key_value_heads") or heads
    types = _gemma4_types(r)
    per_layer = r("per_layer_config")
    if per_layer is None:
        full_kv = r("num_global_key_value_heads") if r("attention_k_eq_v") else None
        own = {FULL: {"head_dim": r("global_head_dim"), **({"num_key_value_heads": full_kv} if full_kv else {})}}
        per_layer = {str(i): own[FULL] for i, t in enumerate(types) if t == FULL}
    if not isinstance(per_layer, dict):
        r.fail("per_layer_config", f"must map layer indices to overrides, got {per_layer!r}")
    by_index = _by_layer_index(r, per_layer)
    shapes: dict[str, set] = {}
    for i, kind in enumerate(types):
        over = by_index.get(i) or {}
        if not isinstance(over, dict) or set(over) - {"head_dim", "num_key_value_heads"}:
            r.fail("per_layer_config", f"overrides layer {i} with {over!r}; Ferrum reads head_dim and "
                                       "num_key_value_heads only", unsupported=True)
        shape = (over.get("head_dim", head_dim), over.get("num_key_value_heads", kv))
        if any(positive_int(v) for v in shape) or shape[0] % 2:
            r.fail("per_layer_config", f"gives layer {i} heads of {shape[0]} dims and {shape[1]} key/value heads; "
                                       "both must be positive integers, the dims even")
        shapes.setdefault(kind, set()).add(shape)
    if any(len(s) > 1 for s in shapes.values()):
        r.fail("per_layer_config", f"gives layers of one attention kind different heads ({shapes!r}), which Ferrum "
                                   "does not run", unsupported=True)
    out = {kind: next(iter(s)) for kind, s in shapes.items()}
    most = max(k for _, k in out.values())
    for kind, (d, k) in out.items():
        # the full layers' own count is the one that can disagree (else num_key_value_heads is)
        name = "num_global_key_value_heads" if out.get(FULL, (0, kv))[1] != kv else "num_key_value_heads"
        if heads % k or most % k:
            r.fail(name, f"gives {kind} layers {k} key/value heads; num_attention_heads ({heads}) and every "
                         f"layer's key/value heads ({most}) must be multiples of it")
    if SLIDING in out and out[FULL][0] < out[SLIDING][0]:  # the last layer is always full
        r.fail("global_head_dim", f"gives full layers heads of {out[FULL][0]} dims, below the sliding layers' "
                                  f"{out[SLIDING][0]}; Ferrum pads the sliding layers' heads to the full layers', "
                                  "not the other way", unsupported=True)
    return out


def _gemma4_head_dim(r: KeyReader) -> int:
    """The model's heads: the widest layer's (the full layers' global_head_dim in every release); the others are
    padded to it at load (``StoredHeads.head_dim``)."""
    return max(d for d, _ in _gemma4_shapes(r).values())


def _gemma4_kv_heads(r: KeyReader, heads: int) -> int:
    """The most key/value heads of any layer; fewer are repeated at load (``StoredHeads.kv_heads``)."""
    return max(k for _, k in _gemma4_shapes(r).values())


def _gemma4_types(r: KeyReader) -> list[str]:
    """layer_types, else five sliding layers to one full; the last layer is always full (transformers forces it)."""
    layers = r("num_hidden_layers")
    types = r("layer_types")
    if types is None:
        types = [SLIDING if (i + 1) % 6 else FULL for i in range(layers)]
    elif not lists_of(types, layers, (SLIDING, FULL)):
        r.fail("layer_types", f"must list {layers} entries of {SLIDING!r} / {FULL!r}, got {types!r}")
    return [*types[:-1], FULL]


def _gemma4_ropes(r: KeyReader, sizes: Sizes, full_dim: int, sliding_dim: int) -> tuple[Rope, Rope]:
    """rope_parameters per attention kind: the sliding layers' default rope over their own heads (placed at the
    start of the padded ones, rotary_dim of them), the full layers' "proportional" rope."""
    params = r("rope_parameters")
    if params is None:
        params = {SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                  FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0}}
    if not isinstance(params, dict) or not isinstance(params.get(FULL), dict) or (
            not isinstance(params.get(SLIDING), dict) and SLIDING in _gemma4_types(r)):
        r.fail("rope_parameters", f"must hold one entry per attention kind ({FULL!r}, {SLIDING!r}), got {params!r}")
    ropes = []
    for kind, dim in ((SLIDING, sliding_dim), (FULL, full_dim)):
        spec = params.get(kind) or {}
        rope_type = spec.get("rope_type", "default")
        if rope_type not in ("default", "proportional"):
            r.fail("rope_parameters", f"has rope type {rope_type!r} for {kind}; Ferrum runs Gemma 4's 'default' "
                                      "and 'proportional'", unsupported=True)
        theta, factor = spec.get("rope_theta", 10_000.0), spec.get("factor", 1.0)
        share = spec.get("partial_rotary_factor", 1.0)
        for name, value in (("rope_theta", theta), ("partial_rotary_factor", share)):
            if positive_number(value) or (name == "partial_rotary_factor" and value > 1):
                r.fail("rope_parameters", f"field {name!r} of {kind} must be a positive number (at most 1 for "
                                          f"partial_rotary_factor), got {value!r}")
        if factor not in (1, 1.0) or (rope_type == "default" and share not in (1, 1.0)):
            r.fail("rope_parameters", f"sets {kind}'s factor {factor!r} or partial_rotary_factor {share!r}, which "
                                      "Ferrum does not run for Gemma 4", unsupported=True)
        if rope_type == "proportional":  # transformers: int(share * head_dim // 2) pairs turn, spaced over the head
            if dim != sizes.head_dim:
                r.fail("rope_parameters", f"gives {kind} layers a proportional rope, which Ferrum runs on the widest "
                                          "heads only", unsupported=True)
            ropes.append(Rope(theta=float(theta), head_dim=sizes.head_dim, rotary_dim=2 * int(share * dim // 2),
                              proportional=True))
        else:  # the stored head's default rope: its first `dim` dims of the padded head
            ropes.append(Rope(theta=float(theta), head_dim=sizes.head_dim, rotary_dim=dim))
    return ropes[0], ropes[1]


def _gemma4_and_3n_blocks(r: KeyReader, sizes: Sizes) -> dict[str, Any]:
    """What Gemma 4's and Gemma 3n's blocks share: sandwich norms, GeLU-tanh, embeddings scaled by sqrt(hidden),
    unscaled scores over q/k/v head norms, soft-capped logits."""
    return dict(norms=SANDWICH_NORMS, activation="gelu_tanh", embed_scale=math.sqrt(sizes.hidden_size), attn_scale=1.0,
                final_softcap=r("final_logit_softcapping"), qk_norm="head", v_norm=True)


def _gemma4_kv_sources(r: KeyReader, types: list[str]) -> list[int | None]:
    """Which layer's keys and values each layer attends (None: its own), as transformers' kv_sharing_modes: the last
    num_kv_shared_layers layers (E2B / E4B) read those of the last layer before them of their attention kind."""
    shared = r("num_kv_shared_layers") or 0
    first = len(types) - shared
    if shared and first <= 0:
        r.fail("num_kv_shared_layers", f"is {shared}: no layer of the {len(types)} would compute keys and values "
                                       "for the others to read; it must be below num_hidden_layers")
    last_of = {kind: i for i, kind in enumerate(types[:first])}
    for kind in set(types[first:]) - set(last_of):
        r.fail("num_kv_shared_layers", f"is {shared}: the shared {kind} layers have no earlier {kind} layer to "
                                       "read keys and values from (transformers refuses it too)")
    return [None] * first + [last_of[kind] for kind in types[first:]]


def _unread_shared_kv(sources: list[int | None]) -> str | None:
    """The key/value tensors releases store for the layers that read another's, which transformers ignores
    (Gemma4TextModel's _keys_to_ignore_on_load_unexpected), as ``Architecture.unloaded``; None without such layers."""
    shared = "|".join(str(i) for i, source in enumerate(sources) if source is not None)
    return rf"\.layers\.({shared})\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\." if shared else None


def _gemma4(r: KeyReader, sizes: Sizes) -> Architecture:
    """Gemma 4's text decoder (gemma4_text, and the text_config of the gemma4 wrapper): Gemma 3's sandwich norms,
    q/k norms and GeGLU with plain ``w`` RMSNorms (no ``1 +``), a weightless norm on the values, q.k unscaled,
    full layers with their own head_dim (global_head_dim), key/value heads (num_global_key_value_heads) and, with
    attention_k_eq_v, values that are their keys, rope "proportional" on them, and each layer's layer_scalar on the
    stream. Every layer runs in the one KV pool at the widest heads: narrower heads padded with zero dims, fewer
    key/value heads repeated, at load (exact: see :mod:`ferrum.arch.heads`). E2B / E4B add per-layer inputs
    (hidden_size_per_layer_input, :mod:`ferrum.arch.per_layer`) and last layers that read an earlier layer's keys
    and values (num_kv_shared_layers: ``LayerSpec.kv_source``), twice as wide with use_double_wide_mlp; 26B-A4B
    runs experts beside every dense MLP (enable_moe_block: :func:`ferrum.moe.spec.gemma4_moe`). Gemma 4 unified
    (gemma4_unified_text) declares neither key: its blocks have neither."""
    r("hidden_activation")
    types = _gemma4_types(r)
    window = r("sliding_window")
    shapes = _gemma4_shapes(r)
    sliding_rope, full_rope = _gemma4_ropes(r, sizes, shapes[FULL][0], shapes.get(SLIDING, shapes[FULL])[0])
    k_eq_v = bool(r("attention_k_eq_v"))
    sources = _gemma4_kv_sources(r, types)
    wide = 2 * sizes.intermediate_size if r("use_double_wide_mlp") else None
    per_layer = r.get("hidden_size_per_layer_input")

    def layer(kind: str, source: int | None) -> LayerSpec:
        dim, kv = shapes[kind]
        return LayerSpec(window if kind == SLIDING else None, full_rope if kind == FULL else sliding_rope,
                         heads=StoredHeads(kv_heads=None if kv == sizes.num_kv_heads else kv,
                                           head_dim=None if dim == sizes.head_dim else dim,
                                           values_are_keys=k_eq_v and kind == FULL), kv_source=source,
                         intermediate_size=None if source is None else wide)

    arch = Architecture(
        layers=tuple(layer(t, source) for t, source in zip(types, sources)),
        per_layer_inputs=PerLayerInputs(per_layer, _per_layer_vocab(r, sizes)) if per_layer else None,
        unloaded=_unread_shared_kv(sources),
        layer_scalar=True,
        **_gemma4_and_3n_blocks(r, sizes),
    )
    return gemma4_moe(r, arch) if r.get("enable_moe_block") else arch  # 26B-A4B: experts beside every dense MLP


def _gemma3n_widths(r: KeyReader, sizes: Sizes) -> Sizes:
    """Gemma 3n's intermediate_size, one for all layers or (as releases write it) one per layer: the model's is the
    widest, each layer's its own (``LayerSpec.intermediate_size``, set by :func:`_gemma3n`)."""
    widths = _gemma3n_list(r, "intermediate_size", sizes.num_layers, lambda w: not positive_int(w) and w <= 1 << 20)
    return replace(sizes, intermediate_size=max(widths))


def _gemma3n_list(r: KeyReader, key: str, layers: int, fits: Callable[[Any], bool]) -> list:
    """A per-layer key of Gemma 3n: a list of one fitting value per layer, or one value for all."""
    value = r(key)
    values = value if isinstance(value, list) else [value] * layers
    if len(values) != layers or not all(fits(v) for v in values):
        r.fail(key, f"must give one value for all {layers} layers or a list of one per layer, got {value!r}")
    return values


def _gemma3n(r: KeyReader, sizes: Sizes) -> Architecture:
    """Gemma 3n's text decoder (gemma3n_text, and the text_config of the gemma3n wrapper): Gemma 4 E2B / E4B's
    attention (plain ``w`` RMSNorms, q/k norms, a weightless v norm, q.k unscaled, the last num_kv_shared_layers
    reading an earlier layer's keys and values) and per-layer inputs, on Gemma 3's ropes (rope_theta on full layers,
    rope_local_base_freq on sliding ones; four sliding layers to one full unless layer_types says otherwise), with
    AltUp's stream of copies and Laurel's residual (:mod:`ferrum.arch.altup`), a width per layer and the first
    layers' MLP gates cut to their largest values (activation_sparsity_pattern, :mod:`ferrum.arch.rowwise`)."""
    r("hidden_activation")
    window, types = _layer_kinds(r, sizes, lambda i: FULL if (i + 1) % 5 == 0 else SLIDING)
    sliding_rope, full_rope = _gemma3_ropes(r, sizes)
    sources = _gemma4_kv_sources(r, types)
    layers = sizes.num_layers
    widths = _gemma3n_list(r, "intermediate_size", layers, lambda w: True)
    pattern = r("activation_sparsity_pattern")
    if pattern is None:  # transformers' default: the first 10 layers of a model of more
        pattern = [0.95 if i < 10 and layers > 10 else 0.0 for i in range(layers)]
    if not isinstance(pattern, list) or len(pattern) != layers or not all(
            isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p < 1 for p in pattern):
        r.fail("activation_sparsity_pattern", f"must list {layers} sparsities in [0, 1), one per layer, got "
                                              f"{pattern!r}")
    copies, active = r("altup_num_inputs"), r("altup_active_idx")
    if active >= copies:
        r.fail("altup_active_idx", f"is {active}, but there are only {copies} AltUp copies (altup_num_inputs)")
    return Architecture(
        layers=tuple(LayerSpec(window if t == SLIDING else None, full_rope if t == FULL else sliding_rope,
                               kv_source=source, gate_sparsity=float(sparsity),
                               intermediate_size=None if width == sizes.intermediate_size else width)
                     for t, source, width, sparsity in zip(types, sources, widths, pattern)),
        per_layer_inputs=PerLayerInputs(r("hidden_size_per_layer_input"), r("vocab_size_per_layer_input")),
        altup=AltUpSpec(copies, active, bool(r("altup_correct_scale")), r("altup_coef_clip"), r("laurel_rank")),
        unloaded=_unread_shared_kv(sources),
        **_gemma4_and_3n_blocks(r, sizes),
    )


def _per_layer_vocab(r: KeyReader, sizes: Sizes) -> int:
    """The rows of Gemma 4's per-layer input table: every token id looks one up, so it covers the vocabulary."""
    rows = r("vocab_size_per_layer_input")
    if rows < sizes.vocab_size:
        r.fail("vocab_size_per_layer_input", f"is {rows}, fewer rows than the vocabulary's {sizes.vocab_size} ids, "
                                             "each of which looks a row up; it must be at least vocab_size")
    return rows


_CAUSAL_GEMMA = (
    Key("attention_bias", default=False, check=boolean),
    Key("use_bidirectional_attention", default=False,
        check=falsy("bidirectional Gemma (an embedding model) is not a causal LM; use a causal checkpoint"),
        unsupported=True),
)
_GEMMA = (
    Key("hidden_activation", default="gelu_pytorch_tanh", check=one_of("gelu_pytorch_tanh", "gelu_tanh"),
        unsupported=True),
    Key("query_pre_attn_scalar", default=256, check=positive_number),
    *_CAUSAL_GEMMA, *_WINDOW, *_LAYER_TYPES,
)
#: Gemma 2's soft-caps, as its config class defaults them.
_GEMMA2_SOFTCAPS = (
    Key("attn_logit_softcapping", default=50.0, check=optional_positive_number),
    Key("final_logit_softcapping", default=30.0, check=optional_positive_number),
)


def _causal_over_text(value: Any) -> str | None:
    """Gemma 4's use_bidirectional_attention: "vision" has image tokens attend each other both ways and text
    causally, which is causal over text alone; "all" is not a causal LM."""
    if value in (None, "vision"):
        return None
    return (f"is {value!r}, which has every token attend every other (not a causal LM); Ferrum runs null and "
            "'vision' (text attends causally); use a causal checkpoint")


#: Gemma4TextConfig's sizes, for configs that leave them out (after ``_core``).
_GEMMA4_SIZES = _core_defaults(hidden_size=2304, intermediate_size=9216, num_hidden_layers=30, num_attention_heads=8,
                               num_key_value_heads=4, vocab_size=262_144, max_position_embeddings=131_072)
#: The keys of Gemma 4's attention and dense blocks, as Gemma4TextConfig defaults them.
_GEMMA4 = (
    Key("rope_parameters"),
    Key("hidden_activation", default="gelu_pytorch_tanh", check=one_of("gelu_pytorch_tanh", "gelu_tanh"),
        unsupported=True),
    Key("attention_bias", default=False, check=falsy("Gemma 4 releases have no attention biases"), unsupported=True),
    Key("sliding_window", default=512, check=optional_positive_int),
    Key("layer_types"),
    Key("final_logit_softcapping", check=optional_positive_number),
    Key("global_head_dim", default=512, check=size(4096)),
    Key("per_layer_config"),  # transformers 5.24 saves it in place of the two keys around
    Key("num_global_key_value_heads", check=optional_size(4096)),
    Key("attention_k_eq_v", default=False, check=boolean),
    Key("num_kv_shared_layers", default=0, check=optional_non_negative_int),
    Key("use_double_wide_mlp", default=False, check=boolean),
)
#: VaultGemma: Gemma 2's blocks without the norms on attention's and the MLP's outputs.
VAULTGEMMA_NORMS = {"pre_attn": "input_layernorm", "pre_mlp": "pre_feedforward_layernorm"}


def _plamo3(r: KeyReader, sizes: Sizes) -> Architecture:
    """Preferred Networks' PLaMo 3, as mlx-lm runs it: PLaMo 2's attention blocks alone (sandwich norms with offsets
    of their own, fused q/k/v and gate/up) with Gemma's ``1 + w`` q/k norms, every sliding_window_pattern-th layer
    full (rope_theta), the others sliding (rope_local_theta) over ``window_size + 1`` keys, as mlx-lm's prompt pass
    masks them (sliding_window, where set, is window_size)."""
    r("image_token_id"), r("image_feature_size"), r("image_proj_type"), r("linear_type")
    window = r("window_size") if r("sliding_window") is None else r("sliding_window")
    pattern, head = r("sliding_window_pattern"), sizes.head_dim
    full, local = (Rope(theta=float(r(key)), head_dim=head, rotary_dim=head, kind="default")
                   for key in ("rope_theta", "rope_local_theta"))
    return Architecture(
        layers=tuple(LayerSpec(None, full) if (i + 1) % pattern == 0 else LayerSpec(window + 1, local)
                     for i in range(sizes.num_layers)),
        norms=SANDWICH_NORMS, norm_offset=1.0, norm_offsets=PLAMO_NORM_OFFSETS, attn_scale=head ** -0.5,
        qk_norm="head", fused_qkv=True, fused_gate_up=True,
        stored_names={**PLAMO_STORED, "self_attn.q_norm": "mixer.q_norm", "self_attn.k_norm": "mixer.k_norm"},
    )


#: Gear's layer kind of gated key/value convolutions (:mod:`ferrum.recurrent.conv_kv_gated`), beside its two
#: attention kinds.
GEAR_CONV = "conv_mixer"
#: Gear's activations as mlx-lm runs them (gelu_fast as the tanh approximation too).
_GEAR_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
                     "gelu": "gelu", "silu": "silu", "swish": "silu"}


def _gear(r: KeyReader, sizes: Sizes) -> Architecture:
    """Gear (remote code; mlx-lm's gear): Gemma 3's blocks ((1 + w) sandwich norms, embeddings times sqrt(hidden),
    per-head q/k norms, query_pre_attn_scalar, soft-capping where set; sliding layers rotated at
    rope_local_base_freq, full ones at rope_theta with rope_scaling), some layers (``conv_mixer``) running gated
    key/value convolutions in place of attention (:mod:`ferrum.recurrent.conv_kv_gated`). Without layer_types every
    layer is full attention, as mlx-lm reads it."""
    kinds = (FULL, SLIDING, GEAR_CONV)
    types = r("layer_types")
    if types is None:
        types = [FULL] * sizes.num_layers
    elif not lists_of(types, sizes.num_layers, kinds):
        r.fail("layer_types", f"must list {sizes.num_layers} entries of {', '.join(map(repr, kinds))}, got {types!r}")
    scaling = _rope_object(r, "rope_scaling") or {}
    full = read_rope(r, sizes, scaling, "rope_scaling", ("default", "linear"), theta_default=1_000_000.0)
    sliding = Rope(theta=float(r("rope_local_base_freq")), head_dim=sizes.head_dim, rotary_dim=sizes.head_dim)
    layers = {FULL: LayerSpec(None, full), SLIDING: LayerSpec(r("sliding_window"), sliding),
              GEAR_CONV: LayerSpec(None, Rope.unrotated(sizes.head_dim), mixer="conv_kv_gated")}
    bias, scalar = r("attention_bias"), r("query_pre_attn_scalar")
    conv = ConvKvGatedSpec(sizes.num_heads, sizes.num_kv_heads, sizes.head_dim, r("conv_L_cache"), bias)
    return Architecture(
        layers=tuple(layers[kind] for kind in types), norms=SANDWICH_NORMS, norm_offset=1.0,
        activation=_GEAR_ACTIVATIONS[r("hidden_activation")], embed_scale=math.sqrt(sizes.hidden_size),
        attn_scale=float(sizes.head_dim if scalar is None else scalar) ** -0.5,
        attn_softcap=r("attn_logit_softcapping") or None, final_softcap=r("final_logit_softcapping") or None,
        qk_norm="head", qkv_bias=bias, o_bias=bias, conv_kv_gated=conv if GEAR_CONV in types else None,
    )


def _muse_glimmer_ropes(r: KeyReader, sizes: Sizes, types: list[str]) -> list[Rope]:
    """Each layer's rope: layer_rope_theta's entry 0 is none, any other the model's (mlx-lm rotates every such layer
    at rope_theta, rope_parameters' where given); without the list, the sliding layers rotate and the full don't."""
    params = _rope_object(r, "rope_parameters") or {}
    rope = read_rope(r, sizes, params, "rope_parameters", ("default",))
    thetas = r("layer_rope_theta")
    if thetas is None:
        thetas = [0 if kind == FULL else rope.theta for kind in types]
    if not isinstance(thetas, list) or len(thetas) != sizes.num_layers or any(
            t != 0 and positive_number(t) for t in thetas):
        r.fail("layer_rope_theta", f"must list {sizes.num_layers} rope bases, positive or 0 (no rope), got {thetas!r}")
    return [rope if theta else Rope.unrotated(sizes.head_dim) for theta in thetas]


def _muse_glimmer(r: KeyReader, sizes: Sizes) -> Architecture:
    """Muse Glimmer's text model (Meta; mlx-lm's muse_glimmer): Gemma 3's sandwich blocks of (1 + w) norms, those after
    attention and the MLP at post_norm_eps, a plain RMSNorm at the end; the token embeddings RMS-normed without a
    weight (not scaled); q and k RMS-normed per head without a weight before rope, q then times qk_scale_factor
    (folded into the attention scale); each head's output times the sigmoid of its gate (``gate_proj``, its own
    projection); three sliding layers to one full unless layer_types says otherwise, rope only where
    layer_rope_theta is not 0 (by default the sliding layers); a SiLU MLP; the logits times output_multiplier
    (folded into the final norm), then soft-capped."""
    window, types = _layer_kinds(r, sizes, lambda i: FULL if i % 4 == 3 else SLIDING)
    ropes = _muse_glimmer_ropes(r, sizes, types)
    r("hidden_activation")
    return Architecture(
        layers=tuple(LayerSpec(window if kind == SLIDING else None, rope) for kind, rope in zip(types, ropes)),
        norms=SANDWICH_NORMS, norm_offset=1.0, norm_offsets={"norm": 0.0},
        norm_eps=dict.fromkeys(("post_attn", "post_mlp"), float(r("post_norm_eps"))),
        embed_norm=True, embed_norm_params=False, attn_scale=float(r("qk_scale_factor")) / math.sqrt(sizes.head_dim),
        qk_norm="head", qk_norm_params=False, attn_output_gate=True, attn_gate_stored=True,
        final_softcap=float(r("final_logit_softcapping")), logit_scale=float(r("output_multiplier")),
    )


TABLE: dict[str, Family] = {
    "plamo3": Family(  # Preferred Networks' PLaMo 3: sliding and full attention layers in PLaMo's sandwich norms
        _keys((
            *_plamo_core("head_dim"),
            Key("window_size", default=2048, check=positive_int),
            Key("sliding_window", check=optional_positive_int),
            Key("sliding_window_pattern", default=8, check=positive_int),
            Key("rope_theta", default=1_000_000.0, check=positive_number),
            Key("rope_local_theta", default=10_000.0, check=positive_number),
            # the vision projection's (mlx-lm builds none), and how the release's linears were trained
            Key("image_token_id"), Key("image_feature_size"), Key("image_proj_type"), Key("linear_type"),
        )),
        _plamo3,
        derive=_without_nulls,
    ),
    "gemma": Family(
        _keys(_core(True, 256), _ROPE, _CAUSAL_GEMMA, (
            Key("hidden_act", default="gelu_pytorch_tanh", check=one_of(*_GEMMA1_ACTIVATIONS), unsupported=True),
        )),
        _gemma1,
    ),
    "gemma2": Family(
        _keys(_core(True, 256), _ROPE[:3], _GEMMA, _GEMMA_WINDOW, _GEMMA2_SOFTCAPS),
        lambda r, s: _gemma(r, s, 2, None, _gemma2_ropes),
    ),
    # Google's VaultGemma (differentially private Gemma 2): Gemma 2's config keys and blocks (1 + w RMSNorms, GeGLU,
    # sqrt(hidden) embeddings, query_pre_attn_scalar, both soft-caps, every other layer sliding unless layer_types
    # says otherwise) with a norm before attention and before the MLP only; always causal (its config has no
    # use_bidirectional_attention, which transformers' VaultGemma never reads)
    "vaultgemma": Family(
        _keys(_core(True, 256), _core_defaults(vocab_size=256_000, max_position_embeddings=8192), _ROPE[:3],
              tuple(k for k in _GEMMA if k.name != "use_bidirectional_attention"), _GEMMA_WINDOW, _GEMMA2_SOFTCAPS),
        lambda r, s: _gemma(r, s, 2, None, _gemma2_ropes, VAULTGEMMA_NORMS),
    ),
    "gemma3_text": Family(
        _keys(_core(True, 256), _core_defaults(
            hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
            num_key_value_heads=4, vocab_size=262_208, max_position_embeddings=131_072,
        ), _ROPE[:3], _GEMMA, _GEMMA_WINDOW, (
            # transformers' Gemma 3 reads this key but never applies it; Gemma 3 releases leave it null
            Key("attn_logit_softcapping", check=falsy("transformers' Gemma 3 does not apply it either; set it to "
                                                      "null"), unsupported=True),
            Key("final_logit_softcapping", check=optional_positive_number),
            # null: the sliding layers' rope_parameters theta, else 10,000, as transformers 5 reads it
            Key("rope_local_base_freq", default=10_000.0, check=optional_positive_number),
            Key("sliding_window_pattern", default=6, check=optional_positive_int),
        )),
        lambda r, s: _gemma(r, s, 6, "head", _gemma3_ropes),
    ),
    "gear": Family(  # Gear (remote code; mlx-lm's gear): ModelArgs' defaults
        _keys(_core(True), _LAYER_TYPES, (
            Key("sliding_window", default=512, check=optional_positive_int),
            Key("rope_theta", default=1_000_000.0, check=positive_number),
            Key("rope_local_base_freq", default=10_000.0, check=positive_number),
            Key("rope_scaling"),
            Key("query_pre_attn_scalar", check=optional_positive_number),  # null: head_dim
            Key("hidden_activation", default="gelu_pytorch_tanh", check=one_of(*_GEAR_ACTIVATIONS), unsupported=True),
            Key("attention_bias", default=False, check=boolean),
            Key("attn_logit_softcapping", check=lambda v: None if not v else positive_number(v)),  # 0 / null: none
            Key("final_logit_softcapping", check=lambda v: None if not v else positive_number(v)),
            Key("conv_L_cache", default=3, check=lambda v: positive_int(v) or (
                None if v >= 2 else "is 1 (no state to carry), which Ferrum does not run"), unsupported=True),
            Key("use_bidirectional_attention", default=False, check=falsy(
                "mlx-lm refuses it too: Gear is run as a causal LM only"), unsupported=True),
        )),
        _gear,
        unloaded=r"embed_scale$",  # a buffer mlx-lm's sanitize drops
    ),
    "muse_glimmer_text": Family(  # Meta's Muse Glimmer's text model (mlx-lm's muse_glimmer): ModelArgs' defaults
        _keys(_core(False, head_dim_default=128), _core_defaults(
            hidden_size=6656, intermediate_size=19968, num_hidden_layers=52, num_attention_heads=32,
            num_key_value_heads=2, vocab_size=202_048, max_position_embeddings=131_072,
        ), _LAYER_TYPES, (
            Key("sliding_window", default=2048, check=optional_positive_int),
            Key("post_norm_eps", default=1e-8, check=positive_number),
            Key("qk_scale_factor", default=3.87, check=positive_number),
            Key("hidden_activation", default="silu", check=one_of("silu"), unsupported=True),
            Key("rope_theta", default=500_000.0, check=positive_number),
            Key("rope_parameters"),
            Key("layer_rope_theta"),
            Key("final_logit_softcapping", default=20.0, check=positive_number),
            Key("output_multiplier", default=0.19611613513818404, check=positive_number),
        )),
        _muse_glimmer,
        eps_default=1e-5,
    ),
    # Google's Gemma 4 text decoders (31B, E2B / E4B, and 26B-A4B's MoE block: ferrum.moe.spec.gemma4_moe);
    # "gemma4" wrappers' text_config too (ferrum.config.TEXT_WRAPPERS)
    "gemma4_text": Family(
        _keys(_core(True, 256), _GEMMA4_SIZES, _GEMMA4, (
            # the larger releases' "vision" (image tokens both ways) is causal over text, as transformers runs it
            Key("use_bidirectional_attention", default=None, check=_causal_over_text, unsupported=True),
            Key("hidden_size_per_layer_input", default=256, check=optional_non_negative_int),
            Key("vocab_size_per_layer_input", default=262_144, check=size(1 << 24)),
            Key("enable_moe_block", default=False, check=boolean),
        ), MOE_KEYS["gemma4_text"]),
        _gemma4,
        kv_heads=_gemma4_kv_heads,
        head_dim=_gemma4_head_dim,
    ),
    # Google's Gemma 4 unified (encoder-free multimodal: patches and audio frames projected straight into the
    # decoder): Gemma 4's text decoder without per-layer inputs or experts, its keys unread as transformers leaves
    # them; "gemma4_unified" wrappers' text_config too (ferrum.config.TEXT_WRAPPERS)
    "gemma4_unified_text": Family(
        _keys(_core(True, 256), _GEMMA4_SIZES, _core_defaults(max_position_embeddings=262_144), _GEMMA4, (
            Key("sliding_window", default=1024, check=optional_positive_int),
            Key("use_bidirectional_attention", default="vision", check=_causal_over_text, unsupported=True),
        )),
        _gemma4,
        kv_heads=_gemma4_kv_heads,
        head_dim=_gemma4_head_dim,
    ),
    # Google's Gemma 3n (E2B / E4B); "gemma3n" wrappers' text_config too (ferrum.config.TEXT_WRAPPERS)
    "gemma3n_text": Family(
        _keys(_core(True, 256), _core_defaults(
            hidden_size=2048, num_hidden_layers=35, num_attention_heads=8, num_key_value_heads=2,
            vocab_size=262_400, max_position_embeddings=32_768,
        ), _ROPE, (
            # one width for all layers, or one per layer (as releases write it): checked by _gemma3n_widths
            Key("intermediate_size", default=16_384),
            Key("rope_local_base_freq", default=10_000.0, check=optional_positive_number),
            Key("hidden_activation", default="gelu_pytorch_tanh", check=one_of("gelu_pytorch_tanh", "gelu_tanh"),
                unsupported=True),
            Key("attention_bias", default=False, check=falsy("Gemma 3n releases have no attention biases"),
                unsupported=True),
            Key("sliding_window", default=512, check=optional_positive_int),
            Key("layer_types"),
            Key("final_logit_softcapping", default=30.0, check=optional_positive_number),
            Key("hidden_size_per_layer_input", default=256, check=size(1 << 16)),
            Key("vocab_size_per_layer_input", default=262_144, check=size(1 << 24)),
            Key("num_kv_shared_layers", default=15, check=optional_non_negative_int),
            Key("activation_sparsity_pattern"),
            Key("altup_num_inputs", default=4, check=size(64)),
            Key("altup_active_idx", default=0, check=optional_non_negative_int),
            Key("altup_coef_clip", default=120.0, check=optional_positive_number),
            Key("altup_correct_scale", default=True, check=boolean),
            Key("laurel_rank", default=64, check=size(1 << 16)),
        )),
        _gemma3n,
        sizes=_gemma3n_widths,
    ),
}
