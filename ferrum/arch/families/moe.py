"""Families whose MLPs are routed experts over attention-only layers (ferrum.moe builds the experts)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from ferrum.arch.families._shared import (
    FULL, Family, LLAMA_NORMS, POST_NORMS, SLIDING, Sizes, _LAYER_NORM_ROPES, _LAYER_TYPES, _LLAMA_ROPES, _ROPE,
    _SILU, _WINDOW, _agreeing_aliases, _aliased, _core, _core_defaults, _keys, _layer_kinds, _layer_types,
    _per_kind_rope_specs, _rope_spec, _rotary_dim, _theta, _window, read_rope,
)
from ferrum.arch.families.latent import SARVAM_ALIASES
from ferrum.arch.families.layer_norm import _COHERE, _cohere_blocks
from ferrum.arch.families.llama_like import (
    _EXAONE4, _GRANITE, _QWEN_WINDOW, _ernie4_5, _every_layer_window, _exaone4_rotated, _exaone4_windows, _granite,
    _granite_swa, _hunyuan_dense, _llama_like, _no_windows,
)
from ferrum.arch.keys import (
    Key, KeyReader, boolean, falsy, lists_of, one_of, optional_non_negative_int, optional_positive_int,
    optional_positive_number, positive_int, positive_number, required, size,
)
from ferrum.arch import msa
from ferrum.arch.moa import MoaSpec
from ferrum.arch.norms import OFFSETS_ADDED
from ferrum.arch.rope import Rope
from ferrum.arch.heads import StoredHeads
from ferrum.arch.spec import Architecture, LayerSpec
from ferrum.moe.activation import ClampedSwiGLU
from ferrum.moe.routing import CORRECTION_BIAS
from ferrum.moe.spec import KEYS as MOE_KEYS, step3p5_sparse, with_moe


#: Kolibri-1's four norms: GLM-4's, its post-norms under the release's names.
KOLIBRI1_NORMS = {"pre_attn": "input_layernorm", "post_attn": "post_attn_norm", "pre_mlp": "post_attention_layernorm",
                  "post_mlp": "post_ffn_norm"}
#: Kolibri-1's correction bias, which its checkpoints store beside the layer's modules, not in the router.
KOLIBRI1_NAMES = {"mlp.gate.e_score_correction_bias": "moe.router.expert_bias"}


def _kolibri1(r: KeyReader, sizes: Sizes) -> Architecture:
    """Aleph Alpha's Kolibri-1 (transformers' Kolibri1): EXAONE 4's attention (per-head q/k norms before rope; with a
    sliding window the full layers take no rope) in GLM-4's four-norm blocks; its layers sliding or full by
    layer_types, else every fifth full. The sparse MLPs on every layer are :func:`ferrum.moe.spec.with_moe`'s."""
    window, kinds = _layer_kinds(r, sizes, lambda i: FULL if (i + 1) % 5 == 0 else SLIDING)
    arch = _llama_like(False, "head", lambda r, sizes: [window if kind == SLIDING else None for kind in kinds],
                       lambda r, sizes: [kind == SLIDING or window is None for kind in kinds],
                       norms=KOLIBRI1_NORMS)(r, sizes)
    return replace(arch, stored_names=KOLIBRI1_NAMES)


#: Llama 4's feed-forward modules under Llama's names (its sparse ones are ``feed_forward`` itself: MoeSpec.module).
LLAMA4_NAMES = {f"mlp.{p}": f"feed_forward.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
CHUNKED = "chunked_attention"


def _llama4_rotated(r: KeyReader, sizes: Sizes) -> list[bool]:
    """transformers' Llama 4: ``no_rope_layers[i]`` is 1 where layer ``i`` applies rope (at least one entry per layer;
    empty or null: every ``no_rope_layer_interval``-th layer skips it)."""
    flags = r("no_rope_layers")
    if not flags:
        interval = r("no_rope_layer_interval")
        return [(i + 1) % interval != 0 for i in range(sizes.num_layers)]
    if not isinstance(flags, list) or len(flags) < sizes.num_layers or any(f not in (0, 1) for f in flags):
        r.fail("no_rope_layers",
               f"must list at least {sizes.num_layers} entries of 1 (rope) or 0 (none), got {flags!r}")
    return [bool(f) for f in flags[:sizes.num_layers]]


def _llama4(r: KeyReader, sizes: Sizes) -> Architecture:
    """Llama 4's text decoder (Scout, Maverick; transformers' Llama4TextModel): Llama's blocks with rope applied to
    q and k as complex numbers over adjacent dims (GPT-J's pairing), on the layers no_rope_layers marks (the others,
    NoPE, every fourth by default, take none); on rope layers, with use_qk_norm, q and k L2-normed once rotated (an
    RMSNorm without a weight) and, with an attention_chunk_size, attention within chunks of that many positions
    (``layer_types``' "chunked_attention"); on NoPE layers, with attn_temperature_tuning, queries scaled by ``1 +
    attn_scale * log(1 + floor((position + 1) / floor_scale))``. The dense MLPs (``feed_forward``) are
    intermediate_size_mlp wide; the sparse ones are :func:`ferrum.moe.spec.with_moe`'s."""
    key, spec = _rope_spec(r)
    rope = replace(read_rope(r, sizes, spec, key, _LLAMA_ROPES, theta_default=500_000.0), interleaved=True)
    r("hidden_act")
    rotated = _llama4_rotated(r, sizes)
    chunk = r("attention_chunk_size")
    types = r("layer_types")
    if types is None:
        types = [CHUNKED if on and chunk is not None else FULL for on in rotated]
    elif not lists_of(types, sizes.num_layers, (CHUNKED, FULL)):
        r.fail("layer_types", f"must list {sizes.num_layers} entries of {CHUNKED!r} / {FULL!r}, got {types!r}")
    if chunk is None and CHUNKED in types:
        r.fail("attention_chunk_size", "must be set when layer_types lists chunked layers")
    scaling = (float(r("attn_scale")), int(r("floor_scale")), 1) if r("attn_temperature_tuning") else None
    qk_norm = bool(r("use_qk_norm"))
    bias = r("attention_bias")
    return Architecture(
        layers=tuple(LayerSpec(None, rope if on else Rope.unrotated(sizes.head_dim),
                               chunk=chunk if kind == CHUNKED else None, qk_norm=on,
                               query_scaling=None if on else scaling)
                     for on, kind in zip(rotated, types)),
        norms=LLAMA_NORMS, attn_scale=1.0 / math.sqrt(sizes.head_dim),
        qk_norm="head" if qk_norm else None, qk_norm_after_rope=True, qk_norm_params=False,
        qkv_bias=bias, o_bias=bias, stored_names=LLAMA4_NAMES,
    )


_LLAMA4 = (
    Key("intermediate_size_mlp", default=16384, check=size(1 << 20)),
    Key("no_rope_layers"), Key("no_rope_layer_interval", default=4, check=positive_int),
    Key("attention_chunk_size", default=8192, check=optional_positive_int), *_LAYER_TYPES,
    Key("use_qk_norm", default=True, check=boolean),
    Key("attn_temperature_tuning", default=True, check=boolean),
    Key("floor_scale", default=8192, check=positive_int),
    Key("attn_scale", default=0.1, check=positive_number),
    Key("attention_bias", default=False, check=boolean),
)


def _dots1_windows(r: KeyReader, sizes: Sizes) -> list:
    """transformers' dots1: layer_types, else the layers from max_window_layers on wherever sliding_window is set
    (Qwen's rule without its use_sliding_window switch, which transformers does not read for dots1: a config whose
    use_sliding_window is false where that rule slides is refused, as the two readings differ)."""
    window, types = r("sliding_window"), _layer_types(r, sizes)
    if types is None:
        first = r("max_window_layers")
        if window is not None and first is None:
            r.fail("max_window_layers", "is null, but a sliding_window needs the index of the first sliding layer; "
                                        "set it, or set sliding_window to null")
        types = [SLIDING if window is not None and i >= first else FULL for i in range(sizes.num_layers)]
    if window is None and SLIDING in types:  # transformers cannot build such a model either
        r.fail("sliding_window", "must be set when layer_types lists sliding layers")
    windows = [window if t == SLIDING else None for t in types]
    if r("use_sliding_window") is False and any(windows):
        r.fail("use_sliding_window", f"is false, but transformers' dots1 ignores it and slides layers "
                                     f"{[i for i, w in enumerate(windows) if w]} (sliding_window, max_window_layers, "
                                     "layer_types); set sliding_window to null to keep every layer full")
    return windows


_DOTS1_WINDOW = (
    Key("sliding_window", default=4096, check=optional_positive_int), *_LAYER_TYPES,
    Key("max_window_layers", default=62, check=optional_non_negative_int),
    Key("use_sliding_window", check=boolean),  # not transformers' (see _dots1_windows)
)


def _glm4_moe(r: KeyReader, sizes: Sizes) -> Architecture:
    """GLM-4.5 / 4.6 (transformers' Glm4Moe), DeepSeek-V3's MoE with GQA attention: Llama's two norms, q/k/v biased
    by attention_bias (o never), per-head q/k norms before rope with use_qk_norm, and rope on partial_rotary_factor
    (0.5) of each head with Llama's rotate-half pairs (not GLM-4's adjacent ones); the sparse MLPs (grouped
    sigmoid routing, an ungated shared expert, the first first_k_dense_replace layers dense) are
    :func:`ferrum.moe.spec.with_moe`'s."""
    return _glm4_moe_blocks(r, sizes, 0.5)


def _glm4_moe_blocks(r: KeyReader, sizes: Sizes, rotated: float) -> Architecture:
    """GLM-4.5's blocks, rope on ``rotated`` of each head where partial_rotary_factor does not say."""
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, _LLAMA_ROPES, rotary_dim=_rotary_dim(r, sizes, spec, rotated))
    r("hidden_act")
    return Architecture(
        layers=tuple(LayerSpec(None, rope) for _ in range(sizes.num_layers)),
        norms=LLAMA_NORMS,
        attn_scale=1.0 / math.sqrt(sizes.head_dim),
        qk_norm="head" if r("use_qk_norm") else None,
        qkv_bias=r("attention_bias"),
        mtp_layers=r("num_nextn_predict_layers") or 0,
    )


#: Sarvam-30B's modules under Llama's names, as its release (and transformers' save_pretrained) stores them: q, k
#: and v in one matrix, rows in that order.
SARVAM_NAMES = {"embed_tokens": "word_embeddings", "self_attn.qkv_proj": "attention.query_key_value",
                "self_attn.o_proj": "attention.dense", "self_attn.q_norm": "attention.query_layernorm",
                "self_attn.k_norm": "attention.key_layernorm"}


def _sarvam_moe(r: KeyReader, sizes: Sizes) -> Architecture:
    """Sarvam-30B (transformers' SarvamMoE, run as GLM-4.5): GLM-4.5's blocks with q/k norms by default and rope over
    whole heads unless partial_rotary_factor says, stored under Sarvam's names (:data:`SARVAM_NAMES`, q/k/v fused);
    the sparse MLPs (grouped sigmoid routing chosen with ``gate.expert_bias``, an ungated shared expert, dense first
    layers) are :func:`ferrum.moe.spec.with_moe`'s."""
    _agreeing_aliases(r, SARVAM_ALIASES)
    return replace(_glm4_moe_blocks(r, sizes, 1.0), fused_qkv=True, stored_names=SARVAM_NAMES)


#: The rope scalings mlx-lm's initialize_rope runs as transformers does (not "dynamic", which it refuses).
_BAILING_ROPES = ("default", "linear", "llama3", "yarn")
#: mlx-lm's conversions of Ling (``bailing_moe.sanitize``): the router a Linear ``gate.gate_proj`` (packed at 8 bits),
#: its expert bias left beside it (named only where the router has one: a layout's modules must all be held).
_BAILING_MLX_LM_ROUTER = {"mlp.gate": "mlp.gate.gate_proj"}
_BAILING_MLX_LM_BIAS = {"mlp.gate.expert_bias": "mlp.gate.expert_bias"}


#: Ling's own keys (mlx-lm's bailing_moe ModelArgs; Ring-linear's too).
BAILING_KEYS = (
    Key("partial_rotary_factor", default=1.0, check=optional_positive_number),  # in place of _ROPE's refusal
    Key("rotary_dim", check=optional_positive_int),
    Key("use_qkv_bias", default=False, check=boolean),
    Key("use_bias", default=False, unsupported=True, check=falsy(
        "no Ling release biases its projections and MLPs; set it to false")),
    Key("use_qk_norm", default=False, check=boolean),
    Key("norm_head", default=False, check=boolean),
    Key("num_nextn_predict_layers", default=0, check=optional_non_negative_int),
)


def _bailing_moe(r: KeyReader, sizes: Sizes) -> Architecture:
    """inclusionAI's Ling / Ring v1 (Ling-lite, Ling-plus) and 2.0 (Ling-mini / flash-2.0, Ring-*-2.0), model_type
    "bailing_moe" (their releases' remote code, mlx-lm's bailing_moe): Llama's blocks under Ling's names (Sarvam-30B
    kept them: :data:`SARVAM_NAMES`, q/k/v fused), q/k/v biased by use_qkv_bias, per-head q/k norms before rope where
    use_qk_norm (2.0's), rope with rotate-half pairs over rotary_dim dims, else partial_rotary_factor of each head
    (2.0's half), heads of hidden_size / num_attention_heads dims (mlx-lm ignores head_dim: one that differs is
    refused), the LM head's columns normed where norm_head; the sparse MLPs are :func:`ferrum.moe.spec.with_moe`'s.
    2.0's multi-token prediction layers, which its release counts in num_hidden_layers and mlx-lm cannot load, are
    refused."""
    hidden, heads = r("hidden_size"), r("num_attention_heads")
    if r("head_dim") not in (None, hidden // heads):
        r.fail("head_dim", f"is {r('head_dim')}, but mlx-lm sizes Ling's heads hidden_size / num_attention_heads "
                           f"({hidden // heads}) and ignores it, where Ling's own code reads it; make them agree",
               unsupported=True)
    if r("num_nextn_predict_layers"):
        r.fail("num_nextn_predict_layers", "counts multi-token prediction layers among num_hidden_layers, which "
                                           "mlx-lm runs as decoder layers (and cannot load); a release without them "
                                           "sets it to 0", unsupported=True)
    if r("norm_head") and sizes.tie_word_embeddings:
        r.fail("norm_head", "norms the LM head, but tie_word_embeddings ties it to the embedding (mlx-lm cannot load "
                            "that); set one of them to false", unsupported=True)
    key, spec = _rope_spec(r)
    rotary = r("rotary_dim")
    if rotary is not None and (rotary % 2 or rotary > sizes.head_dim):
        r.fail("rotary_dim", f"is {rotary}; it must be an even number of dims up to head_dim ({sizes.head_dim})")
    rope = read_rope(r, sizes, spec, key, _BAILING_ROPES,
                     rotary_dim=rotary or _rotary_dim(r, sizes, spec, 1.0))
    r("hidden_act")
    biased = r("moe_router_enable_expert_bias")
    return Architecture(
        layers=tuple(LayerSpec(None, rope) for _ in range(sizes.num_layers)),
        norms=LLAMA_NORMS, attn_scale=1.0 / math.sqrt(sizes.head_dim),
        qk_norm="head" if r("use_qk_norm") else None, qkv_bias=r("use_qkv_bias"), fused_qkv=True,
        stored_names=SARVAM_NAMES, head_normed=r("norm_head"),
        layouts=(("model.", "lm_head.weight", {**_BAILING_MLX_LM_ROUTER, **(_BAILING_MLX_LM_BIAS if biased else {})}),),
    )


def _solar_open(r: KeyReader, sizes: Sizes) -> Architecture:
    """Upstage's Solar Open (transformers' SolarOpen): Llama's blocks with q/k/v biased by attention_bias (o never)
    and rope over whole heads (transformers' SolarOpen cannot run a partial_rotary_factor below 1, which mlx-lm's
    glm4_moe would read: refused); the sparse MLPs (DeepSeek-V3's grouped sigmoid routing, an ungated shared expert)
    on every layer are :func:`ferrum.moe.spec.with_moe`'s."""
    return replace(_llama_like(False, None, _no_windows)(r, sizes), o_bias=False)


def _ernie4_5_moe(r: KeyReader, sizes: Sizes) -> Architecture:
    """The dense family's blocks; use_bias biases the LM head too (transformers' Ernie4_5_MoeForCausalLM), its
    weight the embedding's where tied."""
    return replace(_ernie4_5(r, sizes), lm_head_bias=r("use_bias"))


#: transformers' MellumConfig rope settings where a config gives none.
_MELLUM_ROPES = {FULL: {"rope_type": "default", "rope_theta": 500_000.0},
                 SLIDING: {"rope_type": "default", "rope_theta": 10_000.0}}


def _mellum(r: KeyReader, sizes: Sizes) -> Architecture:
    """JetBrains' Mellum (transformers' Mellum): Qwen3-MoE's attention (per-head q/k norms before rope; q/k/v and o
    biased by attention_bias) with full and sliding layers as layer_types lists them (every layer full by default),
    each kind with its own rope (rope_parameters per kind, over whole heads); the sparse MLPs (softmax routing, on the
    layers mlp_layer_types makes sparse) are :func:`ferrum.moe.spec.with_moe`'s."""
    window, types = _layer_kinds(r, sizes, lambda _: FULL)
    r("hidden_act")
    r("partial_rotary_factor")
    specs = _per_kind_rope_specs(r, "Mellum") or (dict(_MELLUM_ROPES[FULL]), dict(_MELLUM_ROPES[SLIDING]))
    full, sliding = (read_rope(r, sizes, spec, "rope_parameters", _LLAMA_ROPES) for spec in specs)
    theta = r("rope_theta")
    if theta is not None and theta != full.theta:
        r.fail("rope_theta", f"is {theta!r}, but transformers' Mellum reads each attention kind's rope_theta from "
                             f"rope_parameters (the full layers' {full.theta!r}) and ignores it; make them agree",
               unsupported=True)
    bias = r("attention_bias")
    return Architecture(
        layers=tuple(LayerSpec(window, sliding) if t == SLIDING else LayerSpec(None, full) for t in types),
        norms=LLAMA_NORMS, attn_scale=1.0 / math.sqrt(sizes.head_dim), qk_norm="head", qkv_bias=bias, o_bias=bias,
    )


def _qwen3_moe_windows(r: KeyReader, sizes: Sizes) -> list:
    """transformers' Qwen3-MoE: every layer, when use_sliding_window."""
    return [_window(r) if r("use_sliding_window") else None] * sizes.num_layers


def _qwen2_moe_windows(r: KeyReader, sizes: Sizes) -> list:
    """transformers' Qwen2-MoE: layer_types, else odd layers below max_window_layers when use_sliding_window."""
    types = _layer_types(r, sizes)
    if types is None and r("use_sliding_window"):
        first = r("max_window_layers")
        types = [SLIDING if (i + 1) % 2 and i < first else FULL for i in range(sizes.num_layers)]
    window = (r("sliding_window") or None) if r("use_sliding_window") else None  # 0 written when disabled
    return [window if t == SLIDING else None for t in types or [FULL] * sizes.num_layers]


#: transformers' gpt-oss rope where config.json has none: YaRN, 32x over 4,096 positions, the ramp's ends unrounded.
_GPT_OSS_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                 "original_max_position_embeddings": 4096}


def _gpt_oss(r: KeyReader, sizes: Sizes) -> Architecture:
    """Llama's blocks with every attention projection biased, a learned sink per query head, and one
    sliding layer to one full (unless layer_types says otherwise); one rope for both kinds."""
    window, types = _layer_kinds(r, sizes, lambda i: SLIDING if i % 2 == 0 else FULL)
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec or dict(_GPT_OSS_ROPE), key, _LLAMA_ROPES, theta_default=150_000.0)
    r("hidden_act")
    bias = r("attention_bias")
    return Architecture(
        layers=tuple(LayerSpec(window if t == SLIDING else None, rope) for t in types),
        norms=LLAMA_NORMS, attn_scale=1.0 / math.sqrt(sizes.head_dim), qkv_bias=bias, o_bias=bias, sinks=True,
    )


#: transformers' MiMo-V2-Flash rope settings where a config gives none: the release's bases, a third of each head.
_MIMO_ROPES = {FULL: {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.334},
               SLIDING: {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.334}}
#: MiMo-V2-Flash's release stores its sinks under their own name.
MIMO_NAMES = {"self_attn.sinks": "self_attn.attention_sink_bias"}


def _mimo_types(r: KeyReader, sizes: Sizes) -> tuple[int, list[str]]:
    """The window and each layer's kind as transformers reads them: layer_types, else the first layer and every sixth
    full; the release's sliding_window_size (the tokens before the query) is a window of one more. Its
    hybrid_layer_pattern (1: sliding), which transformers ignores and mlx-lm reads, must agree."""
    window, types = _layer_kinds(r, sizes, lambda i: FULL if i == 0 or not (i + 1) % 6 else SLIDING)
    before = r("sliding_window_size")
    window = window if before is None else before + 1
    pattern = r("hybrid_layer_pattern")
    if pattern is not None and [SLIDING if kind == 1 else FULL for kind in pattern] != types:
        r.fail("hybrid_layer_pattern", f"is {pattern!r}, but transformers makes layers "
                                       f"{[i for i, t in enumerate(types) if t == SLIDING]} sliding (by layer_types, "
                                       "else the first and every sixth layer full) and ignores it; make them agree")
    return window, types


def _agrees(r: KeyReader, name: str, want: Any, how: str) -> None:
    """Refuses release key ``name`` (one transformers ignores) where it asks for another value than ``want``, which
    transformers runs (``how`` says whence)."""
    value = r(name)
    if value is not None and value != want:
        r.fail(name, f"is {value!r}, but transformers runs {want!r} ({how}) and ignores it; make them agree",
               unsupported=True)


def _mimo_kv_heads(r: KeyReader, heads: int) -> int:
    """The sliding layers' key/value heads, twice num_key_value_heads (the full layers')."""
    kv = 2 * (r("num_key_value_heads") or heads)
    if heads % kv:
        r.fail("num_key_value_heads", f"is {kv // 2}; the sliding layers' twice that ({kv}) must divide the "
                                      f"{heads} attention heads (num_attention_heads)")
    return kv


def _mimo_v2_flash(r: KeyReader, sizes: Sizes) -> Architecture:
    """Xiaomi's MiMo-V2-Flash (transformers' MiMoV2Flash): Llama's norms; attention with q/k heads of head_dim and
    values of v_head_dim (padded at load: ``Architecture.value_head_dim``) times attention_value_scale, rope on
    partial_rotary_factor of each head with a base per attention kind; the sliding layers with twice the key/value
    heads and sinks, the full layers' heads repeated at load (``StoredHeads.kv_heads``) and without sinks; the
    sparse MLPs (grouped sigmoid routing, no shared expert, dense layers as mlp_layer_types lists them) are
    :func:`ferrum.moe.spec.with_moe`'s. The release config's own keys (swa_*, hybrid_layer_pattern, rope_theta...),
    which transformers ignores, are refused where they ask for another model."""
    window, types = _mimo_types(r, sizes)
    kv = sizes.num_kv_heads // 2
    specs = _per_kind_rope_specs(r, "MiMo-V2-Flash") or (dict(_MIMO_ROPES[FULL]), dict(_MIMO_ROPES[SLIDING]))
    full, sliding = (read_rope(r, sizes, spec, "rope_parameters", ("default",), rotary_dim=_rotary_dim(
        r, sizes, {"partial_rotary_factor": spec.get("partial_rotary_factor", 0.334)}, 0.334)) for spec in specs)
    v_dim = r("v_head_dim")
    if v_dim > sizes.head_dim:
        r.fail("v_head_dim", f"({v_dim}) exceeds head_dim ({sizes.head_dim}); Ferrum pads values to the keys' heads",
               unsupported=True)
    factor = r("partial_rotary_factor")
    if factor is not None and any(int(sizes.head_dim * factor) != rope.rotary_dim for rope in (full, sliding)):
        r.fail("partial_rotary_factor", f"is {factor!r}, but transformers rotates {full.rotary_dim} / "
                                        f"{sliding.rotary_dim} dims of each head (full / sliding) by rope_parameters "
                                        "and ignores it; make them agree", unsupported=True)
    for name, want, how in (("rope_theta", full.theta, "the full layers' rope_parameters"),
                            ("swa_rope_theta", sliding.theta, "the sliding layers' rope_parameters"),
                            ("swa_num_attention_heads", sizes.num_heads, "num_attention_heads"),
                            ("swa_num_key_value_heads", sizes.num_kv_heads, "twice num_key_value_heads"),
                            ("swa_head_dim", sizes.head_dim, "head_dim"), ("swa_v_head_dim", v_dim, "v_head_dim"),
                            ("add_swa_attention_sink_bias", True, "sinks on the sliding layers"),
                            ("add_full_attention_sink_bias", False, "none on the full layers"),
                            ("layernorm_epsilon", sizes.rms_norm_eps, "rms_norm_eps")):
        _agrees(r, name, want, how)
    r("hidden_act")
    scale = r("attention_value_scale")
    return Architecture(
        layers=tuple(LayerSpec(window, sliding) if kind == SLIDING else
                     LayerSpec(None, full, heads=StoredHeads(kv_heads=kv), sinks=False) for kind in types),
        norms=LLAMA_NORMS, attn_scale=1.0 / math.sqrt(sizes.head_dim), sinks=True,
        value_head_dim=None if v_dim == sizes.head_dim else v_dim, value_scale=1.0 if scale is None else float(scale),
        qkv_bias=r("attention_bias"), stored_names=MIMO_NAMES,
    )


#: AFMoE's norm before and after each of attention and the MLP, under its names.
AFMOE_NORMS = {"pre_attn": "input_layernorm", "post_attn": "post_attention_layernorm",
               "pre_mlp": "pre_mlp_layernorm", "post_mlp": "post_mlp_layernorm"}


def _afmoe(r: KeyReader, sizes: Sizes) -> Architecture:
    """Arcee's Trinity Nano / Mini / Large (transformers' Afmoe): a norm before and after each of attention and the
    MLP, per-head q/k norms before rope, the attention output times the sigmoid of its own projection
    (``self_attn.gate_proj``), rope on the sliding layers only (every global_attn_every_n_layers-th layer full and
    NoPE, unless layer_types says otherwise), the embeddings times sqrt(hidden_size) where mup_enabled; the sparse
    MLPs (sigmoid routing with a per-expert bias, shared experts, dense first layers) are
    :func:`ferrum.moe.spec.with_moe`'s."""
    every = r("global_attn_every_n_layers")
    window, types = _layer_kinds(r, sizes, lambda i: SLIDING if (i + 1) % every else FULL)
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, _LLAMA_ROPES)
    r("hidden_act")
    bias = r("attention_bias")
    return Architecture(
        layers=tuple(LayerSpec(window, rope) if kind == SLIDING else LayerSpec(None, Rope.unrotated(sizes.head_dim))
                     for kind in types),
        norms=AFMOE_NORMS, attn_scale=1.0 / math.sqrt(sizes.head_dim), qk_norm="head", qkv_bias=bias, o_bias=bias,
        attn_output_gate=True, attn_gate_stored=True,
        embed_scale=math.sqrt(sizes.hidden_size) if r("mup_enabled") else None,
    )


def _cohere2_moe_kinds(r: KeyReader, sizes: Sizes) -> tuple[list[str], list[bool]]:
    """Each layer's attention kind and whether its MLP is dense, as Cohere2MoeConfig resolves them: layer_types, else
    the first first_k_dense_replace layers in a pattern of their own (prefix_dense_sliding_window_pattern; 1: all
    full) and the others every sliding_window_pattern-th full; mlp_layer_types, else those first layers dense."""
    first, prefix, pattern = r("first_k_dense_replace"), r("prefix_dense_sliding_window_pattern"), r(
        "sliding_window_pattern")
    default = [SLIDING if (i + 1) % prefix else FULL for i in range(min(first, sizes.num_layers))] + [
        SLIDING if (i + 1) % pattern else FULL for i in range(sizes.num_layers - first)]
    types = _layer_types(r, sizes) or default
    dense = [i < first for i in range(sizes.num_layers)]
    kinds = r("mlp_layer_types")
    if kinds is not None:
        if len(kinds) != sizes.num_layers:
            r.fail("mlp_layer_types", f"lists {len(kinds)} layers, but the model has {sizes.num_layers}")
        dense = [kind == "dense" for kind in kinds]
    return types, dense


def _cohere2_moe(r: KeyReader, sizes: Sizes) -> Architecture:
    """Cohere's Command A MoE (transformers' Cohere2Moe): Command R7B's parallel blocks (sliding layers with rope, full
    ones NoPE, but the dense layers rotated where prefix_dense_sliding_window_pattern is 1), RMSNorms where
    rms_norm_eps is set (else Cohere's biasless LayerNorms), dense layers of prefix_dense_intermediate_size; the sparse
    MLPs are :func:`ferrum.moe.spec.with_moe`'s."""
    types, dense = _cohere2_moe_kinds(r, sizes)
    window = r("sliding_window")
    if window is None and SLIDING in types:
        r.fail("sliding_window", "must be set when layers use sliding attention")
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, _LAYER_NORM_ROPES)
    forced = r("prefix_dense_sliding_window_pattern") == 1
    ropes = [rope if t == SLIDING or (d and forced) else Rope.unrotated(sizes.head_dim) for t, d in zip(types, dense)]
    arch = _cohere_blocks(r, sizes, ropes, [window if t == SLIDING else None for t in types])
    width = r("prefix_dense_intermediate_size")
    return replace(arch, norm="layer" if r("rms_norm_eps") is None else "rms", layers=tuple(
        replace(layer, intermediate_size=width if d else None) for layer, d in zip(arch.layers, dense)))


def _cohere2_moe_sizes(r: KeyReader, sizes: Sizes) -> Sizes:
    """The norms' epsilon: rms_norm_eps where set (the norms are then RMSNorms), else layer_norm_eps."""
    eps = r("rms_norm_eps")
    return sizes if eps is None else replace(sizes, rms_norm_eps=float(eps))


#: GraniteMoeShared's shared MLP, a layer's ``shared_mlp`` beside its experts, under the MoE kind's names.
GRANITEMOESHARED_NAMES = {"block_sparse_moe.shared_mlp.gate_up_proj": "shared_mlp.input_linear",
                          "block_sparse_moe.shared_mlp.down_proj": "shared_mlp.output_linear"}


def _granitemoeshared(r: KeyReader, sizes: Sizes) -> Architecture:
    """Granite 3 MoE's blocks with a shared MLP (``shared_mlp``: gate and up in ``input_linear``) whose output
    joins the experts' before residual_multiplier scales their sum (:func:`ferrum.moe.spec.with_moe`)."""
    return replace(_granite(r, sizes), stored_names=GRANITEMOESHARED_NAMES)


def _phimoe(r: KeyReader, sizes: Sizes) -> Architecture:
    """Phi-3.5-MoE (transformers' Phimoe): Llama's blocks with biased LayerNorms, every attention projection biased
    by attention_bias, sliding_window on every layer, a biased LM head by lm_head_bias, and experts on every layer
    routed by sparsemixer (:func:`ferrum.moe.spec.with_moe`).

    Its longrope multiplies cos and sin by ``short_mscale`` and, past ``original_max_position_embeddings``,
    ``long_mscale`` (else longrope's attention factor). Ferrum switches table and factor per token, as for Phi-3
    (:mod:`ferrum.arch.rope`), as Microsoft's release code does; transformers 5.24's Phimoe keeps the short table
    at every length (its rotary forward recomputes the frequencies without the sequence length) while switching
    the factor, so the two agree within the original context."""
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, ("default", "longrope"), theta_default=1_000_000.0)
    r("hidden_act")
    r("partial_rotary_factor")
    if rope.kind == "longrope":
        factors = {}
        for name in ("short_mscale", "long_mscale"):
            value = spec.get(name)
            if value is not None and positive_number(value):
                r.fail(key, f"field {name!r} must be a positive number, got {value!r}")
            factors[name] = rope.attention_factor if value is None else float(value)
        rope = replace(rope, attention_factor=factors["short_mscale"], long_attention_factor=factors["long_mscale"])
    bias = r("attention_bias")
    return Architecture(
        layers=tuple(LayerSpec(w, rope) for w in _every_layer_window(r, sizes)),
        norms=LLAMA_NORMS, norm="layer", norm_bias=True, attn_scale=1.0 / math.sqrt(sizes.head_dim),
        qkv_bias=bias, o_bias=bias, lm_head_bias=r("lm_head_bias"),
    )


def _olmoe(r: KeyReader, sizes: Sizes) -> Architecture:
    """OLMoE: Llama's norms, q and k normed over their whole projections, then with v clipped by clip_qkv; experts
    on every layer."""
    return replace(with_moe("olmoe", _llama_like(False, "projection", _no_windows))(r, sizes), clip_qkv=r("clip_qkv"))


def _agreeing_rotary_dims(r: KeyReader, sizes: Sizes, spec: dict[str, Any], fallback: float) -> int:
    """The rotary dims transformers reads (partial_rotary_factor, in the rope settings or beside them, else
    ``fallback`` of each head); a rotary_dim, which MiniMax's code, mlx-lm and vLLM read, saying otherwise is
    refused."""
    dims, rotary = _rotary_dim(r, sizes, spec, fallback), r("rotary_dim")
    if rotary is not None and rotary != dims:
        r.fail("rotary_dim", f"is {rotary}, but partial_rotary_factor gives {dims} rotary dims of {sizes.head_dim} "
                             "(transformers reads partial_rotary_factor, MiniMax's code and mlx-lm rotary_dim); make "
                             f"them agree: partial_rotary_factor {rotary / sizes.head_dim:g} in rope_parameters")
    return dims


def _minimax_m2(r: KeyReader, sizes: Sizes) -> Architecture:
    """MiniMax-M2 (transformers' MiniMaxM2): Llama's norms, q and k normed over their whole projections (OLMo 2's),
    rope on the first rotary_dim dims of each head (rotate-half pairs); experts on every layer, sigmoid scores chosen
    with the sparse MLP's correction bias (:func:`ferrum.moe.spec.with_moe`). transformers reads the rotary dims
    from partial_rotary_factor (in the rope settings, then beside them), else from rotary_dim, which is what
    mlx-lm and MiniMax's code read: a config where the two disagree is refused."""
    key, spec = _rope_spec(r)
    rotary = r("rotary_dim")
    dims = _agreeing_rotary_dims(r, sizes, spec, 1.0 if rotary is None else rotary / sizes.head_dim)
    rope = read_rope(r, sizes, spec, key, _LLAMA_ROPES, rotary_dim=dims)
    r("hidden_act")
    return Architecture(
        layers=tuple(LayerSpec(None, rope) for _ in range(sizes.num_layers)),
        norms=LLAMA_NORMS, attn_scale=1.0 / math.sqrt(sizes.head_dim), qk_norm="projection",
    )


#: The release's (and transformers' save of the multimodal wrapper's) modules under transformers' text model's names:
#: the sparse MLP under block_sparse_moe, its correction bias beside the router, the experts and the shared expert
#: unfused (``ferrum.arch.tensors`` reads them so where stored so), the indexers' modules in self_attn.
MINIMAX_M3_MOE_NAMES = {"mlp.gate": "block_sparse_moe.gate",
                        "mlp.gate.e_score_correction_bias": "block_sparse_moe.e_score_correction_bias",
                        **{f"mlp.{stack}.{p}": f"block_sparse_moe.{stack}.{p}"
                           for stack in ("switch_mlp", "shared_experts")
                           for p in ("gate_proj", "up_proj", "down_proj")}}
MINIMAX_M3_INDEXER_NAMES = {f"{msa.INDEXER}{p}": f"self_attn.index_{p}"
                            for p in ("q_proj", "k_proj", "q_norm", "k_norm")}


def _minimax_m3_config(raw: dict[str, Any]) -> dict[str, Any]:
    """The release's spellings read as transformers' MiniMaxM3VLTextConfig reads them: sparse_attention_config's
    sizes over the flat index_* keys, its sparse_attention_freq as layer_types and moe_layer_freq as
    mlp_layer_types where those are not given."""
    sparse = raw.get("sparse_attention_config") or {}
    raw = {**raw, **{flat: sparse[nested] for flat, nested in msa.RELEASE_NAMES.items() if nested in sparse}}
    if raw.get("layer_types") is None and isinstance(sparse.get("sparse_attention_freq"), list):
        raw["layer_types"] = [msa.SPARSE if f else FULL for f in sparse["sparse_attention_freq"]]
    if raw.get("mlp_layer_types") is None and isinstance(raw.get("moe_layer_freq"), list):
        raw["mlp_layer_types"] = ["sparse" if f else "dense" for f in raw["moe_layer_freq"]]
    return raw


def _minimax_m3(r: KeyReader, sizes: Sizes) -> Architecture:
    """MiniMax-M3's text model (transformers' MiniMaxM3VLTextModel): Llama's blocks with Gemma's norms (``1 + w``)
    everywhere, q and k normed per head before rope on the first rotary dims of each head (rotate-half pairs),
    dense MLPs of dense_intermediate_size where mlp_layer_types says, all MLPs running gpt-oss's clamped SwiGLU; the
    sparse MLPs are :func:`ferrum.moe.spec.with_moe`'s. Its "minimax_m3_sparse" layers' block indexers run as dense
    attention up to their cap (:mod:`ferrum.arch.msa`). transformers reads the rotary dims from
    partial_rotary_factor alone; the release and other runtimes (mlx-lm, vLLM) read rotary_dim: a config where the
    two disagree is refused."""
    key, spec = _rope_spec(r)
    dims = _agreeing_rotary_dims(r, sizes, spec, 1.0)  # transformers reads partial_rotary_factor alone
    rope = read_rope(r, sizes, spec, key, _LLAMA_ROPES, theta_default=5_000_000.0, rotary_dim=dims)
    r("hidden_act")
    types = r("layer_types")
    if types is None:
        types = [FULL] * sizes.num_layers
    if not lists_of(types, sizes.num_layers, (FULL, msa.SPARSE)):
        r.fail("layer_types", f"must list {sizes.num_layers} entries of {FULL!r} / {msa.SPARSE!r}, got {types!r}")
    dense = r("dense_intermediate_size")
    indexed = [t == msa.SPARSE for t in types]
    indexer = msa.read(r, indexed) if any(indexed) else None
    arch = Architecture(
        layers=tuple(LayerSpec(None, rope, intermediate_size=dense) for _ in range(sizes.num_layers)),
        norms=LLAMA_NORMS, norm_offset=1.0, attn_scale=1.0 / math.sqrt(sizes.head_dim), qk_norm="head",
        fused_gate_up=True, activation=ClampedSwiGLU(float(r("swiglu_alpha")), float(r("swiglu_limit"))),
        indexer=indexer, context_limit=None if indexer is None else (indexer.topk, indexer.why),
        unloaded=r"(^|\.)mtp\.",
    )
    arch = with_moe("minimax_m3_vl_text", lambda r, sizes: arch)(r, sizes)
    names = {**(MINIMAX_M3_MOE_NAMES if any(layer.mlp == "moe" for layer in arch.layers) else {}),
             **(MINIMAX_M3_INDEXER_NAMES if indexer is not None else {})}
    return replace(arch, layouts=(("language_model.model.", "language_model.lm_head.weight", names),))


#: DBRX's modules under Llama's names (its experts: :mod:`ferrum.moe.dbrx`).
DBRX_NAMES = {"layers": "blocks", "embed_tokens": "wte", "norm": "norm_f",
              "input_layernorm": "norm_attn_norm.norm_1", "post_attention_layernorm": "norm_attn_norm.norm_2",
              "self_attn.qkv_proj": "norm_attn_norm.attn.Wqkv", "self_attn.o_proj": "norm_attn_norm.attn.out_proj"}
#: DBRX's config keys for the sizes (the experts' width in its ffn_config).
DBRX_CONFIG_NAMES = {"hidden_size": "d_model", "intermediate_size": "ffn_config.ffn_hidden_size",
                     "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                     "max_position_embeddings": "max_seq_len"}


def _dbrx(r: KeyReader, sizes: Sizes) -> Architecture:
    """DBRX (transformers' Dbrx): LayerNorms without bias (eps 1e-5), q/k/v in one matrix (all queries, then keys,
    then values) clipped to [-clip_qkv, clip_qkv] once projected, plain rope; experts on every layer
    (:func:`ferrum.moe.spec.with_moe`). The rope base is attn_config's rope_theta, which Databricks' code and mlx-lm
    read; transformers 5 reads rope_parameters (rope_theta beside it) instead, 10000 where it says none, so a
    config where the two disagree is refused; either alone is read."""
    attn = r("attn_config.rope_theta")
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, ("default",), theta_default=10000.0 if attn is None else attn)
    stated, where = (spec["rope_theta"], key) if "rope_theta" in spec else (r("rope_theta"), "rope_theta")
    if attn is not None and stated is not None and float(stated) != float(attn):
        r.fail("attn_config.rope_theta", f"is {attn!r}, but {where} says {stated!r} (transformers reads the latter, "
                                         "mlx-lm and Databricks' code the former); make them agree")
    return Architecture(
        layers=tuple(LayerSpec(None, rope) for _ in range(sizes.num_layers)),
        norms=LLAMA_NORMS, norm="layer", attn_scale=1.0 / math.sqrt(sizes.head_dim), fused_qkv=True,
        clip_qkv=r("attn_config.clip_qkv"), prefix="transformer.", stored_names=DBRX_NAMES,
    )


def _flint_kinds(r: KeyReader, sizes: Sizes) -> tuple[int | None, list[str]]:
    """transformers' Flint: layer_types, else full layers at the first two, every fourth from the second and the
    last; the others sliding."""
    last = sizes.num_layers - 1
    return _layer_kinds(r, sizes, lambda i: FULL if i < 2 or i % 4 == 1 or i == last else SLIDING)


#: Flint's checkpoints store its sinks as softmax_offset.
FLINT_NAMES = {"self_attn.sinks": "self_attn.softmax_offset"}


def _flint(r: KeyReader, sizes: Sizes) -> Architecture:
    """Recursive's Flint (transformers' Flint): Qwen3-MoE's blocks (per-head q/k norms before rope) with a learned
    sink per query head (gpt-oss's, stored as ``softmax_offset``, kept in float32 as transformers keeps it), rope on
    the sliding layers only (the full layers NoPE); the sparse MLPs (sigmoid routing, an ungated shared expert) are
    :func:`ferrum.moe.spec.with_moe`'s."""
    window, types = _flint_kinds(r, sizes)
    arch = _llama_like(False, "head", lambda r, sizes: [window if t == SLIDING else None for t in types],
                       rotated=lambda r, sizes: [t == SLIDING for t in types])(r, sizes)
    return replace(arch, sinks=True, keep_float32=(*arch.keep_float32, ".self_attn.sinks"), stored_names=FLINT_NAMES)


#: transformers' LagunaConfig rope settings where a config gives none: half of each full layer's head rotated.
_LAGUNA_ROPES = {FULL: {"rope_type": "default", "rope_theta": 500_000.0, "partial_rotary_factor": 0.5},
                 SLIDING: {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 1.0}}
#: Laguna's output gate under its own name.
LAGUNA_NAMES = {"self_attn.gate_proj": "self_attn.g_proj"}
#: mlx-lm's conversions (``laguna.sanitize``): the router a Linear ``gate.proj`` (packed with the experts), the
#: correction bias moved beside it from under ``experts``; the experts stacked in ``switch_mlp``.
_LAGUNA_MLX_LM_NAMES = {"mlp.gate": "mlp.gate.proj",
                        f"mlp.experts.{CORRECTION_BIAS}": f"mlp.gate.{CORRECTION_BIAS}"}


def _laguna_heads(raw: dict[str, Any]) -> dict[str, Any]:
    """The model's query heads: the most of any layer (num_attention_heads_per_layer), fewer padded at load."""
    listed = raw.get("num_attention_heads_per_layer")
    if isinstance(listed, list) and listed and all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                                                   for n in listed):
        return {**raw, "num_attention_heads": max(listed)}
    return raw


def _laguna_ropes(r: KeyReader, sizes: Sizes) -> tuple[Rope, Rope]:
    """(full, sliding) ropes from rope_parameters per attention kind, each rotating its own partial_rotary_factor of
    the head (1 where its entry gives none, as transformers reads it; mlx-lm falls back to a top-level one: refused
    where that would differ)."""
    specs = _per_kind_rope_specs(r, "Laguna") or (dict(_LAGUNA_ROPES[FULL]), dict(_LAGUNA_ROPES[SLIDING]))
    top = r("partial_rotary_factor")
    if top not in (None, 1, 1.0) and any("partial_rotary_factor" not in spec for spec in specs):
        r.fail("partial_rotary_factor", f"is {top!r}, but transformers rotates whole heads where a kind's "
                                        "rope_parameters give no partial_rotary_factor and ignores it; give each kind "
                                        "its own", unsupported=True)
    return tuple(read_rope(r, sizes, spec, "rope_parameters", _LLAMA_ROPES, rotary_dim=_rotary_dim(
        r, sizes, {"partial_rotary_factor": spec.get("partial_rotary_factor", 1.0)}, 1.0)) for spec in specs)


def _laguna(r: KeyReader, sizes: Sizes) -> Architecture:
    """poolside's Laguna (transformers' Laguna): Llama's blocks, per-head q/k norms before rope, each attention kind's
    own rope (rope_parameters per kind, the full layers' over part of each head), every layer full unless layer_types
    says otherwise; each head's output times the softplus of its own gate (``g_proj``: one per head, or per head dim
    by gating "per-element"); a layer's query heads as num_attention_heads_per_layer lists them (fewer than the most
    padded at load: ``StoredHeads.query_heads``); the sparse MLPs (sigmoid routing with a correction bias, an ungated
    shared expert, a dense first layer) are :func:`ferrum.moe.spec.with_moe`'s."""
    window, types = _layer_kinds(r, sizes, lambda _: FULL)
    if not window and SLIDING in types:  # 0: no window (Laguna-M.1's, every layer full)
        r.fail("sliding_window", f"is {window}, but layer_types lists sliding layers")
    full, sliding = _laguna_ropes(r, sizes)
    r("hidden_act")
    heads = r("num_attention_heads_per_layer") or [sizes.num_heads] * sizes.num_layers
    if len(heads) != sizes.num_layers or any(n % sizes.num_kv_heads for n in heads):
        r.fail("num_attention_heads_per_layer", f"must list {sizes.num_layers} head counts, each a multiple of the "
                                                f"{sizes.num_kv_heads} key/value heads, got {heads!r}")
    bias = r("attention_bias")
    return Architecture(
        layers=tuple(LayerSpec(window if kind == SLIDING else None, sliding if kind == SLIDING else full,
                               heads=StoredHeads(query_heads=None if n == sizes.num_heads else n))
                     for kind, n in zip(types, heads)),
        norms=LLAMA_NORMS, attn_scale=1.0 / math.sqrt(sizes.head_dim), qk_norm="head", qkv_bias=bias, o_bias=bias,
        attn_output_gate=True, attn_gate_stored=True, attn_gate="softplus",
        attn_gate_per_head=r("gating") in (True, "per-head"), stored_names=LAGUNA_NAMES,
        layouts=(("model.", "lm_head.weight", _LAGUNA_MLX_LM_NAMES),),
    )


#: Step 3.5's tensors under its release's names (its remote code's, which mlx-lm's ``step3p5.sanitize`` takes in): the
#: per-head output gate ``g_proj``, the shared expert beside the sparse MLP ``moe`` in the layer.
_SWIGLU = ("gate_proj", "up_proj", "down_proj")
STEP3P5_NAMES = {**LAGUNA_NAMES, **{f"moe.share_expert.{p}": f"share_expert.{p}" for p in _SWIGLU}}
#: mlx-lm's conversions (after ``sanitize``): the router a Linear ``mlp.gate.gate`` beside its bias, the experts in
#: ``mlp.switch_mlp``, the shared expert under ``mlp``; the zero-centred norms stored plus 1, as sanitize adds it.
_STEP3P5_MLX_LM = ("model.", "lm_head.weight", {
    "moe.gate": "mlp.gate.gate", "moe.router_bias": "mlp.gate.router_bias",
    **{f"moe.{m}.{p}": f"mlp.{m}.{p}" for m in ("switch_mlp", "share_expert") for p in _SWIGLU}},
    None, OFFSETS_ADDED)
_STEP3P5_ROPES = ("default", "linear", "llama3")  # of mlx-lm's initialize_rope, those Ferrum runs as it does


def _step3p5_kinds(r: KeyReader, layers: int) -> list[str]:
    """Each layer's attention kind as mlx-lm reads it: layer_types (the releases list their MTP layers' too), else
    the even layers sliding."""
    types = r("layer_types")
    if types is None:
        return [SLIDING if i % 2 == 0 else FULL for i in range(layers)]
    if not isinstance(types, list) or len(types) < layers or not set(types[:layers]) <= {FULL, SLIDING}:
        r.fail("layer_types", f"must list {FULL!r} or {SLIDING!r} for each of the {layers} layers, got {types!r}")
    return types[:layers]


def _step3p5_other(r: KeyReader) -> dict[str, Any]:
    """attention_other_setting, the sliding layers' heads (none: the full layers'); what mlx-lm does not read
    (their head_dim, the kind they are for) refused where it asks for another model."""
    other = r("attention_other_setting") or {}
    if not isinstance(other, dict):
        r.fail("attention_other_setting", f"must be an object, got {other!r}")
    for name in ("num_attention_heads", "num_attention_groups"):
        if name in other and positive_int(other[name]):
            r.fail("attention_other_setting", f"field {name!r} {positive_int(other[name])}")
    if other.get("attention_type", SLIDING) != SLIDING:
        r.fail("attention_other_setting", f"is for {other['attention_type']!r} layers; mlx-lm gives its heads to the "
                                          f"{SLIDING!r} ones", unsupported=True)
    if other.get("head_dim", r("head_dim")) != r("head_dim"):
        r.fail("attention_other_setting", f"gives the sliding layers heads of {other['head_dim']} dims, but mlx-lm "
                                          f"runs every layer's at head_dim ({r('head_dim')})", unsupported=True)
    return other


def _step3p5_sizes(r: KeyReader, sizes: Sizes) -> Sizes:
    """The model's query heads: the most of any layer's (the sliding layers' attention_other_setting may give more
    than num_attention_heads), fewer padded at load."""
    if SLIDING not in _step3p5_kinds(r, sizes.num_layers):
        return sizes
    return replace(sizes, num_heads=max(sizes.num_heads, _step3p5_other(r).get("num_attention_heads", 0)))


def _step3p5_per_layer(r: KeyReader, name: str, layers: int, default: Any, padded: bool = True) -> list[Any]:
    """Key ``name``'s value for each layer: one for all, or a list (longer for the releases' MTP layers; shorter,
    where ``padded``, read as mlx-lm reads it: ``default`` past its end)."""
    value = r(name)
    if not isinstance(value, list):
        return [default if value is None else value] * layers
    if len(value) < layers and not padded:
        r.fail(name, f"lists {len(value)} values, but the model has {layers} layers")
    return [*value, *[default] * layers][:layers]


def _step3p5_ropes(r: KeyReader, sizes: Sizes, kinds: list[str]) -> list[Rope]:
    """Each layer's rope as mlx-lm builds it: its own base (rope_theta, a list per layer) over int(head_dim * its
    partial_rotary_factors entry) dims, rope_scaling on the kinds yarn_only_types lists (every kind where it lists
    none)."""
    scaling, params = r("rope_scaling"), r("rope_parameters")
    if scaling is not None and not isinstance(scaling, dict):
        r.fail("rope_scaling", f"must be an object, got {scaling!r}")
    if isinstance(params, dict) and set(params) - {"rope_theta", "rope_type"} and params != scaling:
        r.fail("rope_parameters", f"is {params!r}, but mlx-lm reads rope_scaling ({scaling!r}) and ignores it; move "
                                  "the scaling there", unsupported=True)
    scaled = r("yarn_only_types") or [FULL, SLIDING]
    thetas = _step3p5_per_layer(r, "rope_theta", sizes.num_layers, 10000.0, padded=False)
    factors = _step3p5_per_layer(r, "partial_rotary_factors", sizes.num_layers, 1.0)
    ropes = []
    for kind, theta, factor in zip(kinds, thetas, factors):
        rotary = int(sizes.head_dim * factor) if not positive_number(factor) else 0
        if rotary < 2 or rotary % 2 or rotary > sizes.head_dim:
            r.fail("partial_rotary_factors", f"gives a layer {rotary} rope dims of its {sizes.head_dim}; each needs "
                                             "an even number, at least 2")
        spec = {**(scaling if scaling and kind in scaled else {}), "rope_theta": theta}
        if spec.get("rope_type", spec.get("type")) == "llama3":
            spec.setdefault("original_max_position_embeddings", 8192)  # mlx-lm's Llama3RoPE's default
        ropes.append(read_rope(r, sizes, spec, "rope_scaling", _STEP3P5_ROPES, rotary_dim=rotary))
    return ropes


def _step3p5_activations(r: KeyReader, layers: int) -> list[tuple[Any, Any] | None]:
    """Each layer's (experts', dense MLP's or shared expert's) SwiGLU: the swish clamped to at most its
    swiglu_limits (swiglu_limits_shared) entry and the up projection to within it, where that is above 0."""
    def clamped(limit: float | None) -> ClampedSwiGLU | None:
        return ClampedSwiGLU(1.0, float(limit), up_offset=0.0, clamp="swish") if limit else None

    pairs = zip(*(_step3p5_per_layer(r, name, layers, None) for name in ("swiglu_limits", "swiglu_limits_shared")))
    return [None if not any(pair) else (clamped(pair[0]), clamped(pair[1])) for pair in pairs]


def _step3p5(r: KeyReader, sizes: Sizes) -> Architecture:
    """StepFun's Step 3.5 (mlx-lm's step3p5; its release ships remote code): Llama's blocks with zero-centred
    RMSNorms (``1 + w``), per-head q/k norms before rope, full and sliding layers each with its own query heads
    (attention_other_setting's for the sliding ones, the fewer padded at load) and rope (:func:`_step3p5_ropes`),
    each head's output times the sigmoid of its own gate (``g_proj``, use_head_wise_attn_gate); dense and sparse MLPs
    (:func:`ferrum.moe.spec.with_moe`) under per-layer clamps (:func:`_step3p5_activations`). mlx-lm's conversions
    store the norms plus 1; a model without sparse layers, whose release mlx-lm cannot tell from a conversion, is
    read as one."""
    kinds = _step3p5_kinds(r, sizes.num_layers)
    other, full_heads, groups = _step3p5_other(r), r("num_attention_heads"), r("num_attention_groups")
    heads = {FULL: full_heads, SLIDING: other.get("num_attention_heads", full_heads)}
    if SLIDING in kinds and other.get("num_attention_groups", groups) != groups:
        r.fail("attention_other_setting", f"gives the sliding layers {other['num_attention_groups']} key/value heads "
                                          f"beside the full layers' {groups} (num_attention_groups); Ferrum runs "
                                          "one count", unsupported=True)
    if heads[SLIDING] % groups:
        r.fail("attention_other_setting", f"gives the sliding layers {heads[SLIDING]} heads, not a multiple of the "
                                          f"{groups} key/value heads (num_attention_groups)")
    window, gated = r("sliding_window"), r("use_head_wise_attn_gate")
    sparse = step3p5_sparse(r, sizes.num_layers)
    layers = tuple(LayerSpec(window if kind == SLIDING else None, rope, activations=activations,
                             heads=StoredHeads(query_heads=None if heads[kind] == sizes.num_heads else heads[kind]))
                   for kind, rope, activations in zip(kinds, _step3p5_ropes(r, sizes, kinds),
                                                      _step3p5_activations(r, sizes.num_layers)))
    return Architecture(
        layers=layers, norms=LLAMA_NORMS, norm_offset=1.0 if any(sparse) else 0.0,
        attn_scale=1.0 / math.sqrt(sizes.head_dim), qk_norm="head", attn_output_gate=gated, attn_gate_stored=gated,
        attn_gate_per_head=gated, stored_names=STEP3P5_NAMES, layouts=(_STEP3P5_MLX_LM,),
        mtp_layers=r("num_nextn_predict_layers"),
    )


def _rope_thetas(value: Any) -> str | None:
    values = value if isinstance(value, list) and value else [value]
    if value is None or not any(map(positive_number, values)):
        return None
    return f"must be a positive number or a list of one per layer, got {value!r}"


def _head_counts(value: Any) -> str | None:
    if value is None or (isinstance(value, list) and all(not positive_int(n) for n in value)):
        return None
    return f"must list a positive head count per layer, got {value!r}"


def _granitemoe_swa(r: KeyReader, sizes: Sizes) -> Architecture:
    """Granite SWA's attention (sliding layers, a rope base per layer, sinks) in Granite 3 MoE's blocks with a shared
    MLP (GraniteMoeShared's names); the experts (transformers 5's fused stacks under ``block_sparse_moe.experts``,
    routed by ``block_sparse_moe.router``) are :func:`ferrum.moe.spec.with_moe`'s."""
    return replace(_granite_swa(r, sizes), stored_names=GRANITEMOESHARED_NAMES)


def _jetmoe_heads(raw: dict[str, Any]) -> dict[str, Any]:
    """transformers' JetMoeConfig: num_attention_heads is num_key_value_heads * num_experts_per_tok, whatever the
    config says (a bad value of either is refused by its own key)."""
    kv, top_k = raw.get("num_key_value_heads", 16), raw.get("num_experts_per_tok", 2)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (kv, top_k)):
        return raw
    return {**raw, "num_attention_heads": kv * top_k}


def _jetmoe_sizes(r: KeyReader, sizes: Sizes) -> Sizes:
    """The blocks' norms: transformers' JetMoeDecoderLayer builds them with eps 1e-6 whatever rms_norm_eps says
    (only the final norm reads it: ``Architecture.norm_eps``)."""
    return replace(sizes, rms_norm_eps=1e-6)


def _jetmoe(r: KeyReader, sizes: Sizes) -> Architecture:
    """JetMoE (transformers' JetMoe): Llama's pre-norm blocks whose attention is a mixture of attention heads
    (:mod:`ferrum.arch.moa`: num_experts_per_tok of num_local_experts query/output projection experts around
    num_key_value_heads shared key/value heads of kv_channels dims) and whose MLPs are GraniteMoE's stacked SwiGLU
    experts with an output bias (:func:`ferrum.moe.spec.with_moe`); the final norm alone reads rms_norm_eps."""
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, ("default", "linear", "llama3"))
    r("activation_function")
    experts = r("num_local_experts") or 8
    moa = MoaSpec(experts, r("num_experts_per_tok"), sizes.num_kv_heads, sizes.head_dim)
    eps = r("rms_norm_eps")
    return Architecture(
        layers=tuple(LayerSpec(None, rope, mixer="moa") for _ in range(sizes.num_layers)),
        norms=LLAMA_NORMS, attn_scale=1.0 / math.sqrt(sizes.head_dim), moa=moa,
        norm_eps={"final": 1e-6 if eps is None else float(eps)},
    )


def _remote_code_key(name: str, ours: str) -> Key:
    """A key of JetMoE's first remote-code config, which transformers' JetMoe does not read: refused by name."""
    return Key(name, unsupported=True, check=lambda v: None if v is None else (
        f"is JetMoE's remote-code spelling, which transformers' JetMoe ignores; write it as {ours}"))


def _deepseek(r: KeyReader, sizes: Sizes) -> Architecture:
    """DeepSeek-MoE 16B (v1, ``deepseek``; no transformers class: mlx-lm's deepseek, which its release's remote code
    runs alike): Llama's blocks, every attention projection biased by attention_bias, heads of hidden_size /
    num_attention_heads (a head_dim key is not read), rope unscaled or linear (mlx-lm ignores other scalings, which
    Ferrum refuses); the sparse MLPs (softmax routing, shared experts, dense first layers) are
    :func:`ferrum.moe.spec.with_moe`'s."""
    key, spec = _rope_spec(r)
    read_rope(r, sizes, spec, key, ("default", "linear"))
    return _llama_like(False, None, _no_windows)(r, sizes)


def _hunyuan(r: KeyReader, sizes: Sizes) -> Architecture:
    """Hunyuan-Large's and Hunyuan-7B's releases (``hunyuan``; no transformers class: mlx-lm's hunyuan, as their
    remote code runs them): Hunyuan v1's blocks (:func:`_hunyuan_dense`: q and k normed once rotated, where
    use_qk_norm; rope_scaling's alpha raising the base) over heads of hidden_size / num_attention_heads, every
    attention projection biased by attention_bias, the LM head the embeddings (mlx-lm ties it whatever
    tie_word_embeddings says). With use_cla, each layer off a multiple of cla_share_factor attends the keys and values
    the last one on a multiple projected, normed with its own key norm (cross-layer attention:
    ``LayerSpec.own_key_norm``). The sparse MLPs are :func:`ferrum.moe.spec.with_moe`'s."""
    key, spec = _rope_spec(r)
    if spec and spec.get("alpha") is None:
        r.fail(key, f"is {spec!r}; mlx-lm's hunyuan scales rope by its 'alpha' alone (NTK: the base times alpha ** "
                    "(head_dim / (head_dim - 2))) and has no other scaling; give it an alpha, or leave it out",
               unsupported=True)
    arch = _hunyuan_dense(r, sizes)
    if not r("use_qk_norm"):
        arch = replace(arch, qk_norm=None)
    factor = r("cla_share_factor") if r("use_cla") else 1
    if factor is None:
        r.fail("cla_share_factor", "must be set where use_cla is: the model's runtimes have no default for it")
    shared = [i % factor != 0 for i in range(sizes.num_layers)]
    return replace(arch, layouts=HUNYUAN_FUSED, layers=tuple(
        replace(layer, kv_source=i - i % factor, own_key_norm=arch.qk_norm is not None) if on else layer
        for i, (layer, on) in enumerate(zip(arch.layers, shared))))


#: Hunyuan-7B's release (mlx-lm's sanitize splits it): q/k/v in one ``qkv_proj`` grouped by key/value head (its
#: queries, its key, its value), gate and up in one ``gate_and_up_proj``, the up rows first.
HUNYUAN_FUSED = (("model.", "lm_head.weight", {"mlp.gate_up_proj": "mlp.gate_and_up_proj"}, None,
                  {"fused_qkv": True, "qkv_grouped": True, "fused_gate_up": True, "up_rows_first": True}),)


#: Phixtral's modules (its release's and mlx-lm's): GPT-style ``transformer.h`` layers, the final norm and the LM head
#: in one ``lm_head`` module (``ln``, ``linear``), read under the empty prefix.
PHIXTRAL_NAMES = {"embed_tokens": "transformer.embd.wte", "layers": "transformer.h", "norm": "lm_head.ln",
                  "input_layernorm": "ln", "self_attn.qkv_proj": "mixer.Wqkv", "self_attn.o_proj": "mixer.out_proj"}
#: The sizes' keys mlx-lm's phixtral reads, and the phi-msft spellings of its release's config.json beside them.
PHIXTRAL_SIZES = {"hidden_size": "model_dim", "num_attention_heads": "num_heads", "num_hidden_layers": "num_layers",
                  "vocab_size": "num_vocab", "intermediate_size": "n_inner", "max_position_embeddings": "n_positions"}
_PHI_MSFT_SIZES = {"n_embd": "model_dim", "n_head": "num_heads", "n_layer": "num_layers", "vocab_size": "num_vocab"}


def _phixtral(r: KeyReader, sizes: Sizes) -> Architecture:
    """Phixtral (``phixtral``, and its releases' ``phi-msft``; no transformers class: mlx-lm's phixtral): Phi-2's
    parallel blocks (one biased LayerNorm feeding attention and the sparse MLP, both added) with fused biased q/k/v
    (``Wqkv``) and a biased ``out_proj``, rope (base 10000) on the first rotary_dim dims of each head, a biased LM head
    after its own LayerNorm; the sizes under mlx-lm's keys (model_dim, num_heads, num_layers, num_vocab, with its
    defaults), the release's n_embd / n_head / n_layer / vocab_size refused where they say otherwise, as mlx-lm reads
    only its own. The sparse MLPs are :func:`ferrum.moe.spec.with_moe`'s."""
    for theirs, ours in _PHI_MSFT_SIZES.items():
        if r(theirs) is not None and r(theirs) != r(ours):
            r.fail(theirs, f"is {r(theirs)}, but mlx-lm's phixtral reads {ours} ({r(ours)}) and ignores it; set {ours} "
                           f"to {r(theirs)}")
    rotary = r("rotary_dim")
    if rotary > sizes.head_dim or rotary % 2:
        r.fail("rotary_dim", f"is {rotary}; it must be even and at most a head's {sizes.head_dim} dims")
    rope = Rope(theta=10000.0, head_dim=sizes.head_dim, rotary_dim=rotary)
    return Architecture(
        layers=tuple(LayerSpec(None, rope) for _ in range(sizes.num_layers)),
        norms={"pre_attn": "input_layernorm"}, norm="layer", norm_bias=True, parallel=True,
        attn_scale=1.0 / math.sqrt(sizes.head_dim), fused_qkv=True, qkv_bias=True, o_bias=True, lm_head_bias=True,
        prefix="", lm_head="lm_head.linear.weight", stored_names=PHIXTRAL_NAMES,
        layouts=(("", "lm_head.linear.weight", {}),),
    )


_PHIXTRAL = Family(  # Phixtral (mlabonne's phixtral-2x2_8 / 4x2_8): Phi-2's parallel blocks over ungated GELU experts
    _keys((
        Key("model_dim", default=2560, check=size(1 << 17)), Key("num_heads", default=32, check=size(4096)),
        Key("num_layers", default=32, check=size(1024)), Key("num_vocab", default=51200, check=size(1 << 23)),
        Key("rotary_dim", default=32, check=positive_int),
        Key("n_positions", default=2048, check=size(1 << 28)),
        # the release's phi-msft keys, which mlx-lm does not read
        *(Key(name, check=optional_positive_int) for name in _PHI_MSFT_SIZES),
        Key("n_inner", unsupported=True, check=lambda v: None if v is None else (
            f"is {v!r}, but mlx-lm's phixtral sizes each expert 4 x model_dim; leave it null")),
        Key("layer_norm_epsilon", unsupported=True, check=lambda v: None if v in (None, 1e-5) else (
            f"is {v!r}, but mlx-lm's phixtral runs its LayerNorms with 1e-5")),
        Key("tie_word_embeddings", default=False, unsupported=True, check=falsy(
            "mlx-lm's phixtral reads an LM head of its own (lm_head.linear); set it to false")),
    ), MOE_KEYS["phixtral"]),
    with_moe("phixtral", _phixtral),
    eps_default=1e-5, eps_key=None, names=PHIXTRAL_SIZES,
)


def _tied(raw: dict[str, Any]) -> dict[str, Any]:
    """mlx-lm's hunyuan reads its LM head from the embeddings whatever tie_word_embeddings says."""
    return {**raw, "tie_word_embeddings": True}


def _own_head_core(runtimes: str) -> tuple[Key, ...]:
    """The core keys of a family whose heads are always hidden_size / num_attention_heads (a head_dim key unread) and
    whose LM head is its own (``runtimes`` read it so; a tied one refused)."""
    return (*(k for k in _core(False) if k.name not in ("head_dim", "tie_word_embeddings")),
            Key("tie_word_embeddings", default=False, unsupported=True, check=falsy(
                f"{runtimes} read an LM head of its own (lm_head); set it to false")))


def _klear(r: KeyReader, sizes: Sizes) -> Architecture:
    """Kwai's Klear (``Klear``; no transformers class: mlx-lm's Klear): Qwen 3's blocks (per-head q/k norms before
    rope, over heads of hidden_size / num_attention_heads) with every attention projection biased by attention_bias
    and rope unscaled (mlx-lm reads no scaling); the sparse MLPs (sigmoid routing chosen with a per-expert bias,
    shared experts mixed in by learned weights) are :func:`ferrum.moe.spec.with_moe`'s."""
    key, spec = _rope_spec(r)
    read_rope(r, sizes, spec, key, ("default",))
    return _llama_like(False, "head", _no_windows)(r, sizes)


_QWEN2_MOE_WINDOW = (
    Key("sliding_window", default=4096, check=lambda v: None if v == 0 else optional_positive_int(v)),
    *_QWEN_WINDOW[1:],
)


TABLE: dict[str, Family] = {
    "mixtral": Family(
        _keys(_core(False), _ROPE, _theta(1_000_000.0), _SILU, _WINDOW, MOE_KEYS["mixtral"]),
        with_moe("mixtral", _llama_like(False, None, _every_layer_window)),
        eps_default=1e-5,
    ),
    "qwen2_moe": Family(
        _keys(_core(False), _ROPE, _SILU, _QWEN2_MOE_WINDOW, MOE_KEYS["qwen2_moe"]),
        with_moe("qwen2_moe", _llama_like(True, None, _qwen2_moe_windows)),
    ),
    "qwen3_moe": Family(
        _keys(_core(False), _ROPE, _SILU, _QWEN_WINDOW, (Key("attention_bias", check=boolean),), MOE_KEYS["qwen3_moe"]),
        with_moe("qwen3_moe", _llama_like(False, "head", _qwen3_moe_windows)),
    ),
    "qwen3_vl_moe": Family(  # Qwen3-VL-MoE's text model (its wrapper's text_config): Qwen3-MoE, experts fused
        _keys(_core(True), _ROPE, _SILU, _QWEN_WINDOW, (Key("attention_bias", check=boolean),),
              MOE_KEYS["qwen3_vl_moe"]),
        with_moe("qwen3_vl_moe", _llama_like(False, "head", _qwen3_moe_windows)),
    ),
    "granitemoe": Family(  # Granite 3 MoE: Granite's multipliers, experts on every layer, routed by "router.layer"
        _keys(_core(False), _ROPE, _SILU, _GRANITE, MOE_KEYS["granitemoe"]),
        with_moe("granitemoe", _granite),
    ),
    "phimoe": Family(  # Phi-3.5-MoE, Phi-mini-MoE
        _keys(_core(False), _ROPE[:3], _ROPE[3:4], _SILU, _WINDOW, (
            Key("original_max_position_embeddings", check=optional_positive_int),
            Key("attention_bias", default=False, check=boolean),
            Key("lm_head_bias", default=False, check=boolean),
        ), MOE_KEYS["phimoe"]),
        with_moe("phimoe", _phimoe),
        eps_default=1e-5,
    ),
    "granitemoeshared": Family(  # Granite 3 MoE with a shared expert (GraniteMoeShared)
        _keys(_core(False), _ROPE, _SILU, _GRANITE, MOE_KEYS["granitemoeshared"]),
        with_moe("granitemoeshared", _granitemoeshared),
    ),
    "olmoe": Family(  # OLMoE: Llama's norms, q and k normed over their whole projections, experts on every layer
        _keys(_core(False), _ROPE, _SILU, (
            Key("attention_bias", check=boolean),
            Key("clip_qkv", check=optional_positive_number),
        ), MOE_KEYS["olmoe"]),
        _olmoe,
        eps_default=1e-5,
    ),
    "glm4_moe": Family(  # GLM-4.5, GLM-4.5-Air, GLM-4.6: DeepSeek-V3's grouped sigmoid routing
        _keys(_core(False), _ROPE, _SILU, (
            Key("partial_rotary_factor", default=0.5, check=optional_positive_number),  # in place of _ROPE's refusal
            Key("attention_bias", default=False, check=boolean),
            Key("use_qk_norm", default=False, check=boolean),
            Key("num_nextn_predict_layers", default=1, check=optional_non_negative_int),
        ), MOE_KEYS["glm4_moe"]),
        with_moe("glm4_moe", _glm4_moe),
        eps_default=1e-5,
    ),
    "sarvam_moe": Family(  # Sarvam-30B: GLM-4.5's blocks under Sarvam's names, whole-head rope
        _keys(_core(False, head_dim_default=64), _core_defaults(
            hidden_size=4096, intermediate_size=8192, num_hidden_layers=19, num_attention_heads=64,
            num_key_value_heads=4, vocab_size=262144, max_position_embeddings=131072,
        ), _ROPE, _theta(8_000_000.0), _SILU, (
            Key("partial_rotary_factor", default=1.0, check=optional_positive_number),  # in place of _ROPE's refusal
            Key("attention_bias", default=False, check=boolean),
            Key("use_qk_norm", default=True, check=boolean),
            Key("num_nextn_predict_layers", default=0, check=optional_non_negative_int),
        ), MOE_KEYS["sarvam_moe"]),
        with_moe("sarvam_moe", _sarvam_moe),
        derive=_aliased(SARVAM_ALIASES),
    ),
    "bailing_moe": Family(  # inclusionAI's Ling / Ring v1 and 2.0: Llama's blocks under Ling's names, fused q/k/v,
        # partial rope, softmax or grouped sigmoid routing, shared experts
        _keys(_core(False), _ROPE, _SILU, BAILING_KEYS, MOE_KEYS["bailing_moe"]),
        with_moe("bailing_moe", _bailing_moe),
    ),
    "solar_open": Family(  # Upstage's Solar Open 100B: GLM-4.5's attention without q/k norms, DeepSeek-V3's
        # grouped sigmoid routing and a shared expert on every layer
        _keys(_core(False, head_dim_default=128), _core_defaults(
            hidden_size=4096, num_hidden_layers=48, num_attention_heads=64, num_key_value_heads=8,
            vocab_size=196608, max_position_embeddings=131072,
            # SolarOpenConfig has no intermediate_size (no layer is dense): any a config gives is unread
            intermediate_size=1280,
        ), _ROPE, _theta(1_000_000.0), _SILU, (
            Key("attention_bias", default=False, check=boolean),
            # mlx-lm (its glm4_moe) reads this one; transformers never norms q and k
            Key("use_qk_norm", default=False, unsupported=True, check=falsy(
                "transformers' Solar Open never norms q and k; set it to false")),
        ), MOE_KEYS["solar_open"]),
        with_moe("solar_open", _solar_open),
        eps_default=1e-5,
    ),
    "mellum": Family(  # JetBrains' Mellum 2: Qwen3-MoE's attention, full and sliding layers each with its own rope,
        # softmax-routed experts on the layers mlp_layer_types makes sparse
        _keys(_core(False, head_dim_default=128), _core_defaults(
            hidden_size=2304, intermediate_size=7168, num_hidden_layers=28, num_attention_heads=32,
            num_key_value_heads=4, vocab_size=98304, max_position_embeddings=131072,
        ), _ROPE, _SILU, _LAYER_TYPES, (
            Key("sliding_window", default=1024, check=optional_positive_int),
            Key("attention_bias", default=False, check=boolean),
        ), MOE_KEYS["mellum"]),
        with_moe("mellum", _mellum),
        unloaded=r"^mtp\.",  # the releases' multi-token prediction layer
    ),
    "hy_v3": Family(  # Tencent's Hy3: Qwen 3's attention (q/k norms before rope) over sigmoid routing with a correction
        # bias and a shared MLP, its first layer dense
        _keys(_core(False, head_dim_default=128), _core_defaults(
            hidden_size=4096, intermediate_size=13312, num_hidden_layers=80, num_attention_heads=64,
            num_key_value_heads=8, vocab_size=120832, max_position_embeddings=131072,
        ), _ROPE, _theta(11_158_840.0), _SILU, (
            Key("attention_bias", default=False, check=boolean),
            # transformers biases the dense MLPs and the shared MLP by it (never the routed experts); Ferrum's shared
            # experts take no biases
            Key("mlp_bias", default=False, unsupported=True, check=falsy(
                "biases the shared MLP (shared_mlp), which Ferrum does not support")),
        ), MOE_KEYS["hy_v3"]),
        with_moe("hy_v3", _llama_like(False, "head", _no_windows)),
        eps_default=1e-5,
        unloaded=r"model\.layers\.80.*",  # the release's multi-token prediction layer, which transformers skips
    ),
    "dots1": Family(  # rednote's dots.llm1: Qwen 3's attention over DeepSeek-V3's MoE
        _keys(_core(False), _core_defaults(vocab_size=152064, max_position_embeddings=2048), _ROPE, _SILU,
              _DOTS1_WINDOW, (Key("attention_bias", default=False, check=boolean),), MOE_KEYS["dots1"]),
        with_moe("dots1", _llama_like(False, "head", _dots1_windows)),
    ),
    "llama4_text": Family(  # Llama 4 Scout / Maverick's text decoder (the text_config of a llama4 wrapper)
        _keys(_core(False, head_dim_default=128), _core_defaults(
            hidden_size=5120, intermediate_size=8192, num_hidden_layers=48, num_attention_heads=40,
            num_key_value_heads=8, vocab_size=202048, max_position_embeddings=131072,
        ), _ROPE, _SILU, _LLAMA4, MOE_KEYS["llama4_text"]),
        with_moe("llama4_text", _llama4),
        eps_default=1e-5,
        names={"intermediate_size": "intermediate_size_mlp"},  # the dense layers'; the experts' is intermediate_size
    ),
    "hunyuan_v1_moe": Family(  # Tencent's Hunyuan-A13B: the dense family's blocks, experts on every layer
        _keys(_core(False), _core_defaults(vocab_size=290943, max_position_embeddings=2048), _ROPE, _SILU, (
            Key("attention_bias", default=False, check=boolean),
            # Tencent's own code (and mlx-lm) read these two; transformers always norms q and k, never shares keys
            # and values between layers
            Key("use_qk_norm", default=True, unsupported=True, check=lambda v: None if v in (None, True) else (
                f"is {v!r}, but transformers norms q and k whatever it says")),
            Key("use_cla", default=False, unsupported=True, check=falsy(
                "cross-layer attention (keys and values shared between layers) is not supported, nor by "
                "transformers")),
        ), MOE_KEYS["hunyuan_v1_moe"]),
        with_moe("hunyuan_v1_moe", _hunyuan_dense),
        eps_default=1e-5,
    ),
    "minimax_m2": Family(  # MiniMax-M2 / M2.1: OLMo 2's q/k norms, partial rope, sigmoid routing on every layer
        _keys(_core(False, head_dim_default=128), _ROPE, _theta(5_000_000.0), _SILU, (
            Key("partial_rotary_factor", check=optional_positive_number),  # in place of _ROPE's refusal
            Key("rotary_dim", check=optional_positive_int),
            # MiniMax's own code (and mlx-lm) read it; transformers always norms q and k
            Key("use_qk_norm", default=True, unsupported=True, check=lambda v: None if v in (None, True) else (
                f"is {v!r}, but transformers norms q and k whatever it says")),
            Key("qk_norm_type", default="per_layer", unsupported=True, check=lambda v: None if v in (
                None, "per_layer") else f"is {v!r}, but transformers norms q and k over their whole projections "
                                        "('per_layer')"),
        ), MOE_KEYS["minimax_m2"]),
        with_moe("minimax_m2", _minimax_m2),
    ),
    "minimax_m3_vl_text": Family(  # MiniMax-M3: Gemma norms, partial rope, clamped SwiGLU, sigmoid routing, indexers
        _keys(_core(False, head_dim_default=128), _core_defaults(vocab_size=200064, max_position_embeddings=524288),
              _ROPE, _theta(5_000_000.0), (
                  Key("partial_rotary_factor", check=optional_positive_number),  # in place of _ROPE's refusal
                  Key("rotary_dim", default=64, check=positive_int),  # null: transformers refuses it too
                  Key("hidden_act"),  # the release's "swigluoai": transformers runs the clamped SwiGLU whatever it says
                  Key("dense_intermediate_size", default=12288, check=positive_int),
                  Key("layer_types"), *msa.KEYS,
                  # the release's keys of MiniMax's code, which transformers ignores: refused where they ask for
                  # another model than it runs
                  Key("use_qk_norm", default=True, unsupported=True, check=one_of(None, True)),
                  Key("use_gemma_norm", default=True, unsupported=True, check=one_of(None, True)),
                  Key("qk_norm_type", default="per_head", unsupported=True, check=one_of(None, "per_head")),
              ), MOE_KEYS["minimax_m3_vl_text"]),
        _minimax_m3,
        derive=_minimax_m3_config,
    ),
    "dbrx": Family(  # Databricks' DBRX: biasless LayerNorms, fused clipped q/k/v, experts under ffn on every layer
        _keys((
            Key("d_model", default=2048, check=size(1 << 17)),
            Key("ffn_config.ffn_hidden_size", default=3584, check=size(1 << 20)),
            Key("n_layers", default=24, check=size(1024)),
            Key("n_heads", default=16, check=size(4096)),
            Key("attn_config.kv_n_heads", default=1, check=size(4096)),
            Key("vocab_size", default=32000, check=size(1 << 23)),
            Key("max_seq_len", default=2048, check=size(1 << 28)),
            Key("tie_word_embeddings", default=False, check=lambda v: None if v in (None, False) else (
                f"is {v!r}, but DBRX's LM head is its own (transformers refuses tied embeddings)")),
            Key("attn_config.clip_qkv", check=optional_positive_number),
            Key("attn_config.rope_theta", check=optional_positive_number),
        ), _ROPE[:3], MOE_KEYS["dbrx"]),
        with_moe("dbrx", _dbrx),
        eps_default=1e-5,
        eps_key=None,
        names=DBRX_CONFIG_NAMES,
        kv_heads=lambda r, heads: r("attn_config.kv_n_heads"),
        nested=("attn_config", "ffn_config"),
    ),
    "ernie4_5_moe": Family(  # Baidu's ERNIE 4.5 MoE (21B-A3B, 300B-A47B): the dense family's blocks, experts
        # from moe_layer_start_index on; head_dim, which Ernie4_5_MoeConfig does not declare, defaults to
        # hidden_size / num_attention_heads
        _keys(_core(True), _ROPE, _theta(500_000.0), _SILU, (Key("use_bias", default=False, check=boolean),),
              MOE_KEYS["ernie4_5_moe"]),
        with_moe("ernie4_5_moe", _ernie4_5_moe),
        eps_default=1e-5,
        unloaded="mtp",  # the releases' mtp_block.*, mtp_emb_norm.*, mtp_hidden_norm.*, mtp_linear_proj.*
    ),
    "exaone_moe": Family(  # K-EXAONE: EXAONE 4's attention (q/k norms, NoPE full layers) in Llama's pre-norm
        # blocks, over DeepSeek-V3's MoE with dense first layers
        _keys(_core(False), _ROPE, _SILU, _EXAONE4, MOE_KEYS["exaone_moe"]),
        with_moe("exaone_moe", _llama_like(False, "head", _exaone4_windows, _exaone4_rotated)),
        eps_default=1e-5,
        unloaded="mtp.*",  # the releases' mtp.* layer
    ),
    "kolibri1": Family(  # Aleph Alpha's Kolibri-1: EXAONE 4's attention in GLM-4's four-norm blocks over sigmoid
        # experts chosen by logits plus a correction bias, and a shared expert, on every layer
        _keys(_core(False, head_dim_default=128), _core_defaults(
            hidden_size=2560, num_hidden_layers=50, num_attention_heads=48, num_key_value_heads=4, vocab_size=128000,
            max_position_embeddings=262144,
            intermediate_size=512,  # Kolibri1Config has none (no layer is dense): any a config gives is unread
        ), _ROPE, _SILU, _LAYER_TYPES, (
            Key("sliding_window", default=513, check=optional_positive_int),
            Key("attention_bias", default=False, unsupported=True, check=falsy(
                "transformers' Kolibri1 has no attention biases; set it to false")),
        ), MOE_KEYS["kolibri1"]),
        with_moe("kolibri1", _kolibri1),
    ),
    "aria_text": Family(  # Rhymes' Aria (its aria wrapper's text model): Llama's blocks over softmax-routed experts
        # and shared experts on every layer
        _keys(_core(False), _core_defaults(
            vocab_size=32000, hidden_size=4096, intermediate_size=4096, num_hidden_layers=32, num_attention_heads=32,
            max_position_embeddings=2048,
        ), _ROPE, _SILU, (
            Key("attention_bias", default=False, check=boolean),
            Key("mlp_bias", default=False, check=boolean),  # the shared experts' (the routed ones have none)
        ), MOE_KEYS["aria_text"]),
        with_moe("aria_text", _llama_like(False, None, _no_windows)),
    ),
    "flex_olmo": Family(  # FlexOlmo: OLMo 2's blocks (norms after attention and the MLP) with OLMoE's experts
        _keys(_core(False), _ROPE, _theta(500_000.0), _SILU, (Key("attention_bias", default=False, check=boolean),),
              MOE_KEYS["flex_olmo"]),
        with_moe("flex_olmo", _llama_like(False, "projection", _no_windows, norms=POST_NORMS)),
    ),
    "gpt_oss": Family(
        _keys(_core(False, head_dim_default=64), _ROPE, _SILU, _LAYER_TYPES, (
            Key("sliding_window", default=128, check=optional_positive_int),
            Key("attention_bias", default=True, check=boolean),
        ), MOE_KEYS["gpt_oss"]),
        with_moe("gpt_oss", _gpt_oss),
        eps_default=1e-5,
    ),
    "cohere2_moe": Family(  # Command A MoE: Command R7B's parallel blocks over softmax- or sigmoid-routed experts
        _keys(_core(True, head_dim_default=128, eps_key="layer_norm_eps"), _core_defaults(
            hidden_size=8192, intermediate_size=22528, num_hidden_layers=40, num_attention_heads=64,
            vocab_size=256000, max_position_embeddings=8192,
        ), _ROPE[:3], _COHERE[:3], _LAYER_TYPES, (
            # transformers' Cohere2Moe norms neither q nor k, whatever it says (Command R+'s key)
            Key("use_qk_norm", default=False, unsupported=True, check=falsy(
                "transformers' Cohere2Moe has no q/k norms; set it to false")),
            Key("rms_norm_eps", check=optional_positive_number),
            Key("sliding_window", default=4096, check=optional_positive_int),
            Key("sliding_window_pattern", default=4, check=positive_int),
            Key("prefix_dense_sliding_window_pattern", default=1, check=positive_int),
            Key("prefix_dense_intermediate_size", check=optional_positive_int),
        ), MOE_KEYS["cohere2_moe"]),
        with_moe("cohere2_moe", _cohere2_moe),
        eps_default=1e-5,
        eps_key="layer_norm_eps",
        sizes=_cohere2_moe_sizes,
    ),
    "mimo_v2_flash": Family(  # Xiaomi MiMo-V2-Flash: sliding layers with sinks and twice the kv heads, NoPE-free
        _keys(_core(False, head_dim_default=192), _core_defaults(
            hidden_size=4096, intermediate_size=16384, num_hidden_layers=48, num_attention_heads=64,
            num_key_value_heads=4, vocab_size=152576, max_position_embeddings=131072,
        ), _ROPE, _SILU, _LAYER_TYPES, (
            Key("sliding_window", default=129, check=optional_positive_int),
            Key("sliding_window_size", check=optional_positive_int),
            Key("v_head_dim", default=128, check=size(4096)),
            Key("attention_value_scale", default=0.707, check=optional_positive_number),
            Key("attention_bias", default=False, check=boolean),
            Key("partial_rotary_factor", check=optional_positive_number),  # in place of _ROPE's refusal
            Key("hybrid_layer_pattern", check=lambda v: None if v is None or (isinstance(v, list) and set(v) <= {
                0, 1}) else f"must list 0 (full) or 1 (sliding) per layer, got {v!r}"),
            *(Key(name, check=optional_positive_number) for name in ("swa_rope_theta", "layernorm_epsilon")),
            *(Key(name, check=optional_positive_int) for name in (
                "swa_num_attention_heads", "swa_num_key_value_heads", "swa_head_dim", "swa_v_head_dim")),
            *(Key(name, check=boolean) for name in ("add_swa_attention_sink_bias", "add_full_attention_sink_bias")),
        ), MOE_KEYS["mimo_v2_flash"]),
        with_moe("mimo_v2_flash", _mimo_v2_flash),
        eps_default=1e-5,
        kv_heads=_mimo_kv_heads,
        unloaded=r"^model\.mtp\.",  # the release's multi-token prediction layers
    ),
    "jetmoe": Family(  # JetMoE-8B: mixture of attention heads and biased stacked experts on every layer
        _keys(_core(True), _core_defaults(
            hidden_size=2048, intermediate_size=5632, num_hidden_layers=12, num_key_value_heads=16, vocab_size=32000,
            max_position_embeddings=4096, tie_word_embeddings=True,
        ), _ROPE, (
            Key("kv_channels", default=128, check=size(4096)),
            Key("activation_function", default="silu", check=one_of("silu"), unsupported=True),
            *(_remote_code_key(name, ours) for name, ours in (
                ("moe_num_experts", "num_local_experts"), ("moe_top_k", "num_experts_per_tok"),
                ("ffn_hidden_size", "intermediate_size"), ("num_layers", "num_hidden_layers"))),
        ), MOE_KEYS["jetmoe"]),
        with_moe("jetmoe", _jetmoe),
        derive=_jetmoe_heads,
        head_dim=lambda r: r("kv_channels"),
        sizes=_jetmoe_sizes,
    ),
    "afmoe": Family(  # Arcee Trinity Nano / Mini / Large: gated attention, NoPE full layers, sigmoid-routed experts
        _keys(_core(False, head_dim_default=128), _core_defaults(
            hidden_size=2048, intermediate_size=6144, num_hidden_layers=32, num_attention_heads=16,
            vocab_size=200192, max_position_embeddings=16384,
        ), _ROPE, _SILU, _LAYER_TYPES, (
            Key("sliding_window", default=1024, check=optional_positive_int),
            Key("global_attn_every_n_layers", default=4, check=positive_int),
            Key("mup_enabled", default=False, check=boolean),
            Key("attention_bias", default=False, check=boolean),
        ), MOE_KEYS["afmoe"]),
        with_moe("afmoe", _afmoe),
        eps_default=1e-5,
    ),
    "flint": Family(  # Recursive's Flint: Qwen3-MoE's attention with sinks, NoPE full layers, sigmoid routing
        _keys(_core(False, head_dim_default=128), _core_defaults(
            hidden_size=2048, intermediate_size=6144, num_hidden_layers=49, num_attention_heads=32,
            num_key_value_heads=4, vocab_size=150144, max_position_embeddings=262144,
        ), _ROPE, _SILU, _LAYER_TYPES, (
            Key("sliding_window", default=513, check=optional_positive_int),
            Key("attention_bias", default=False, check=boolean),
        ), MOE_KEYS["flint"]),
        with_moe("flint", _flint),
    ),
    "laguna": Family(  # poolside's Laguna: softplus-gated attention, per-layer heads, sigmoid-routed experts
        _keys(_core(False, head_dim_default=128), _core_defaults(
            hidden_size=2048, intermediate_size=8192, num_hidden_layers=40, num_attention_heads=48,
            num_key_value_heads=8, vocab_size=100352, max_position_embeddings=131072,
        ), _ROPE, _SILU, _LAYER_TYPES, (
            Key("partial_rotary_factor", check=optional_positive_number),  # in place of _ROPE's refusal
            # 0 where no layer slides (Laguna-M.1's release)
            Key("sliding_window", default=512, check=lambda v: None if v == 0 else optional_positive_int(v)),
            Key("attention_bias", default=False, check=boolean),
            Key("num_attention_heads_per_layer", check=_head_counts),
            # transformers gates per element where gating is false; mlx-lm does not gate then
            Key("gating", default=True, unsupported=True, check=one_of(True, "per-head", "per-element")),
        ), MOE_KEYS["laguna"]),
        with_moe("laguna", _laguna),
        derive=_laguna_heads,
    ),
    "deepseek": Family(  # DeepSeek-MoE 16B: Llama's blocks over softmax-routed experts and shared experts
        _keys(_own_head_core("mlx-lm and DeepSeek's code"), _core_defaults(
            vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=30,
            num_attention_heads=32, max_position_embeddings=2048,
        ), _ROPE, _SILU, (Key("attention_bias", default=False, check=boolean),), MOE_KEYS["deepseek"]),
        with_moe("deepseek", _deepseek),
    ),
    "Klear": Family(  # Kwai's Klear: Qwen 3's blocks over sigmoid-routed experts mixed with shared experts
        _keys(_own_head_core("mlx-lm and Kwai's code"), _ROPE, _SILU,
              (Key("attention_bias", check=required(boolean)),),
              MOE_KEYS["Klear"]),
        with_moe("Klear", _klear),
    ),
    "hunyuan": Family(  # Tencent's Hunyuan-Large (cross-layer attention) and Hunyuan-7B: Hunyuan v1 as mlx-lm runs it
        _keys((*(k for k in _core(True) if k.name != "head_dim"),), _ROPE, _SILU, (
            Key("attention_bias", check=required(boolean)),
            Key("use_qk_norm", check=required(boolean)),
            Key("use_cla", check=required(boolean)),
            Key("cla_share_factor", check=optional_positive_int),
        ), MOE_KEYS["hunyuan"]),
        with_moe("hunyuan", _hunyuan),
        derive=_tied,
    ),
    "phixtral": _PHIXTRAL,
    "phi-msft": _PHIXTRAL,  # Phixtral's releases' model_type (mlx-lm's MODEL_REMAPPING: phixtral)
    "step3p5": Family(  # StepFun's Step 3.5: per-kind heads and ropes, gated heads, clamped sigmoid-routed experts
        _keys(_core(False), _core_defaults(max_position_embeddings=262144), (
            Key("head_dim", check=size(4096)),  # mlx-lm has no default for these two
            Key("num_attention_groups", check=size(4096)),
            Key("rope_theta", default=10000.0, check=_rope_thetas),
            Key("rope_scaling"), Key("rope_parameters"),
            Key("sliding_window", default=512, check=positive_int),
            Key("layer_types"), Key("yarn_only_types", check=lambda v: None if v is None or isinstance(v, list) else (
                f"must list attention kinds, got {v!r}")),
            Key("partial_rotary_factors", check=lambda v: None if v is None or isinstance(v, list) else (
                f"must list a factor per layer, got {v!r}")),
            Key("attention_other_setting"),
            Key("use_head_wise_attn_gate", default=True, check=boolean),
            Key("num_nextn_predict_layers", default=0, check=optional_non_negative_int),
            # the release's keys mlx-lm does not read, as it runs them
            Key("use_qk_norm", default=True, unsupported=True, check=one_of(True)),
            Key("zero_centered", default=True, unsupported=True, check=one_of(True)),
            Key("att_impl_type", default="GQA", unsupported=True, check=one_of("GQA")),
            Key("sink", default=False, unsupported=True, check=one_of(False)),
        ), MOE_KEYS["step3p5"]),
        with_moe("step3p5", _step3p5),
        eps_default=1e-5,
        kv_heads=lambda r, heads: r("num_attention_groups"),
        sizes=_step3p5_sizes,
    ),
    "granitemoe_swa": Family(  # IBM's Granite Swash: Granite SWA's attention over Granite 3 MoE's experts
        _keys(_core(False), _ROPE, _SILU, _GRANITE, _LAYER_TYPES, (
            Key("sliding_window", default=128, check=optional_positive_int),
            Key("layer_rope_theta"),
        ), MOE_KEYS["granitemoe_swa"]),
        with_moe("granitemoe_swa", _granitemoe_swa),
    ),
}
