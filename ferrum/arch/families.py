"""The family table: per ``model_type``, the config keys that change the math and how they build an Architecture.

Adding a family is one entry here (its keys and a builder) plus tests; the
model reads only the resulting :class:`ferrum.arch.spec.Architecture`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from ferrum.arch.alibi import alibi_slopes
from ferrum.arch.keys import (
    Key, KeyReader, boolean, falsy, one_of, optional_non_negative_int, optional_positive_int,
    optional_positive_number, optional_size, positive_int, positive_number, size,
)
from ferrum.arch.altup import AltUpSpec
from ferrum.arch.mla import MlaSpec
from ferrum.arch.per_layer import PerLayerInputs
from ferrum.arch.rope import Rope, longrope_attention_factor, yarn_attention_factor
from ferrum.arch.spec import Architecture, LayerSpec
from ferrum.errors import ConfigError
from ferrum.moe.spec import KEYS as MOE_KEYS, gemma4_moe, nemotron_h_moe, with_moe
from ferrum.recurrent.gated_delta import GatedDeltaSpec
from ferrum.recurrent.kimi_delta import KimiDeltaSpec
from ferrum.recurrent.mamba import MambaSpec
from ferrum.recurrent.mamba2 import Mamba2Spec
from ferrum.recurrent.short_conv import ShortConvSpec

LLAMA_NORMS = {"pre_attn": "input_layernorm", "pre_mlp": "post_attention_layernorm"}
SANDWICH_NORMS = {
    "pre_attn": "input_layernorm", "post_attn": "post_attention_layernorm",
    "pre_mlp": "pre_feedforward_layernorm", "post_mlp": "post_feedforward_layernorm",
}
#: OLMo 2: no norm before attention or MLP; each one's output is normed before it joins the residual stream.
POST_NORMS = {"post_attn": "post_attention_layernorm", "post_mlp": "post_feedforward_layernorm"}
SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass(frozen=True)
class Sizes:
    """The numbers every family has."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_seq_len: int
    rms_norm_eps: float
    tie_word_embeddings: bool


#: How a family counts its key/value heads: ``(reader, attention heads) -> key/value heads``.
KvHeads = Callable[[KeyReader, int], int]
#: How a family sizes its heads where head_dim does not (latent attention: qk_nope + qk_rope dims).
HeadDim = Callable[[KeyReader], int]


@dataclass(frozen=True)
class Family:
    keys: dict[str, Key]
    build: Callable[[KeyReader, Sizes], Architecture]
    eps_default: float = 1e-6
    #: the norms' epsilon (LayerNorm families: layer_norm_eps, norm_epsilon); None where it is fixed (OLMo 1's)
    eps_key: str | None = "rms_norm_eps"
    names: dict[str, str] = field(default_factory=dict)  # the sizes' keys where the family has its own (GPT-2)
    kv_heads: KvHeads | None = None  # where the family does not say num_key_value_heads (multi_query...)
    head_dim: HeadDim | None = None  # where head_dim is not the heads' size (DeepSeek-V3's is its rope dims)
    unloaded: str | None = None  # Architecture.unloaded: what the family's releases hold that transformers skips
    #: Sections of config.json whose keys the family reads as ``<section>.<key>`` (DBRX's attn_config and
    #: ffn_config), lifted beside the top-level keys before they are read (:func:`lift_nested`)
    nested: tuple[str, ...] = ()
    #: Keys a config may leave out that the family computes from others, filled in before any is read
    #: (Nemotron-H's layer count, its block list's length): ``raw -> raw``.
    derive: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    #: Where the family derives sizes from others once read (LFM2's feed-forward width): ``(reader, sizes) ->
    #: sizes``.
    sizes: Callable[[KeyReader, "Sizes"], "Sizes"] | None = None


def lift_nested(raw: dict[str, Any], sections: tuple[str, ...], family: str, where: str) -> dict[str, Any]:
    """``raw`` with each key of each of its ``sections`` also at ``<section>.<key>``, so that a family's key
    table reads them (and its refusals name them) as any other; a section that is not an object is refused."""
    lifted = dict(raw)
    for section in sections:
        values = raw.get(section)
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: {family} config key {section!r} must be an object, got {values!r}")
        lifted.update({f"{section}.{key}": value for key, value in values.items()})
    return lifted


def _keys(*groups: tuple[Key, ...]) -> dict[str, Key]:
    return {k.name: k for group in groups for k in group}


# ---------------------------------------------------------------- shared keys

def _core(tie_default: bool, head_dim_default: int | None = None,
          eps_key: str | None = "rms_norm_eps") -> tuple[Key, ...]:
    """The sizes' keys, and the norms' epsilon under ``eps_key`` (None: the family fixes it)."""
    return (
        Key("hidden_size", check=size(1 << 17)),
        Key("intermediate_size", check=size(1 << 20)),
        Key("num_hidden_layers", check=size(1024)),
        Key("num_attention_heads", check=size(4096)),
        Key("num_key_value_heads", check=optional_size(4096)),
        Key("head_dim", default=head_dim_default, check=optional_size(4096)),
        Key("vocab_size", check=size(1 << 23)),
        Key("max_position_embeddings", check=size(1 << 28)),
        *((Key(eps_key, check=optional_positive_number),) if eps_key else ()),
        Key("tie_word_embeddings", default=tie_default, check=boolean),
    )


def _core_defaults(**defaults: Any) -> tuple[Key, ...]:
    """Core keys as the family's transformers config class defaults them, for configs that leave them out (after
    ``_core``): Gemma 3's releases give their text model's few sizes, LLaMA 1's no max_position_embeddings."""
    core = {k.name: k for k in _core(False)}
    return tuple(replace(core[name], default=value) for name, value in defaults.items())


_ROPE = (
    Key("rope_theta", check=optional_positive_number),
    Key("rope_scaling"),  # transformers 4 spelling
    Key("rope_parameters"),  # transformers 5 spelling
    Key("partial_rotary_factor", check=one_of(None, 1, 1.0), unsupported=True),
    Key("original_max_position_embeddings", check=optional_positive_int),  # yarn's, where a config writes it here
)
_SILU = (Key("hidden_act", default="silu", check=one_of("silu"), unsupported=True),)


def _theta(default: float) -> tuple[Key, ...]:
    """rope_theta where the config leaves it out: the family's transformers default (after ``_ROPE``)."""
    return (Key("rope_theta", default=default, check=optional_positive_number),)


def read_sizes(r: KeyReader, eps_default: float, eps_key: str | None = "rms_norm_eps",
               names: dict[str, str] | None = None, count_kv_heads: KvHeads | None = None,
               size_heads: HeadDim | None = None) -> Sizes:
    """The sizes under their usual keys, or under ``names`` (usual key -> the family's: GPT-2's n_embd...);
    the key/value heads as ``count_kv_heads(r, heads)`` counts them, else from num_key_value_heads; the heads'
    dims as ``size_heads(r)`` sizes them, else from head_dim."""
    names = names or {}
    hidden_key, heads_key = names.get("hidden_size", "hidden_size"), names.get("num_attention_heads",
                                                                               "num_attention_heads")
    hidden, heads = r(hidden_key), r(heads_key)
    kv_heads = count_kv_heads(r, heads) if count_kv_heads is not None else r.get("num_key_value_heads") or heads
    if heads % kv_heads:
        r.fail("num_key_value_heads", f"is {kv_heads}, but {heads_key} ({heads}) must be a multiple of it")
    head_dim = r.get("head_dim") if size_heads is None else size_heads(r)
    if head_dim is None:
        if hidden % heads:
            r.fail(hidden_key, f"{hidden} is not divisible by {heads} heads; set head_dim")
        head_dim = hidden // heads
    if head_dim % 2:
        r.fail("head_dim" if "head_dim" in r.keys else hidden_key, f"gives heads of {head_dim} dims; "
                                                                   "Ferrum needs an even number (rope rotates pairs)")
    eps = None if eps_key is None else r(eps_key)
    intermediate = r(names.get("intermediate_size", "intermediate_size"))
    return Sizes(
        hidden_size=hidden, intermediate_size=4 * hidden if intermediate is None else intermediate,  # GPT-2's n_inner
        num_layers=r(names.get("num_hidden_layers", "num_hidden_layers")),
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=r("vocab_size"),
        max_seq_len=r(names.get("max_position_embeddings", "max_position_embeddings")),
        rms_norm_eps=float(eps_default if eps is None else eps), tie_word_embeddings=bool(r("tie_word_embeddings")),
    )


# ---------------------------------------------------------------------- rope

def _rope_spec(r: KeyReader) -> tuple[str, dict[str, Any]]:
    """(the key it came from, one dict of rope settings) from either spelling. A config saved by
    transformers 5 and then given a ``rope_scaling`` by hand (as model cards say to for long contexts)
    holds both; where they disagree, which one was meant is not Ferrum's guess."""
    params, scaling = _rope_object(r, "rope_parameters"), _rope_object(r, "rope_scaling")
    if scaling and "rope_parameters" not in r.raw:  # a family's default settings stand only for a config's silence
        return "rope_scaling", dict(scaling)
    if params:
        if scaling and _scalings_differ(params, scaling):
            r.fail("rope_scaling", f"is {scaling!r} but rope_parameters is {params!r}; the two disagree "
                                   "(transformers 5 reads rope_scaling); keep the one meant")
        return "rope_parameters", dict(params)
    return "rope_scaling", dict(scaling or {})


def _rope_object(r: KeyReader, key: str) -> dict[str, Any] | None:
    """``key`` (rope_parameters, rope_scaling): an object, or None where the config leaves it out or null; anything
    else is refused, not read as no scaling."""
    value = r(key)
    if value is not None and not isinstance(value, dict):
        r.fail(key, f"must be an object, got {value!r}")
    return value


def _scalings_differ(params: dict[str, Any], scaling: dict[str, Any]) -> bool:
    """Whether ``rope_scaling`` asks for another scaling than ``rope_parameters`` holds (its type, or a
    field both could set; rope_theta lives outside rope_scaling)."""
    def kind(spec: dict[str, Any]) -> str:
        return spec.get("rope_type", spec.get("type")) or "default"

    fields = set(scaling) - {"type", "rope_type", "rope_theta"}
    return kind(params) != kind(scaling) or any(params.get(f) != scaling[f] for f in fields)


def read_rope(
    r: KeyReader, sizes: Sizes, spec: dict[str, Any], key: str, kinds: tuple[str, ...],
    theta_default: float = 10000.0, rotary_dim: int | None = None,
) -> Rope:
    """A validated :class:`Rope` from one rope settings dict; ``kinds`` are the scalings the family allows."""
    theta = spec.get("rope_theta", r.get("rope_theta"))
    theta = theta_default if theta is None else theta
    if positive_number(theta):
        if "rope_theta" in spec:
            r.fail(key, f"field 'rope_theta' must be a positive number, got {theta!r}")
        r.fail("rope_theta", f"must be a positive number, got {theta!r}")
    kind = spec.get("rope_type", spec.get("type")) or "default"
    if not isinstance(kind, str):
        r.fail(key, f"has rope type {kind!r}; it must be a name such as 'linear' or 'yarn'")
    kind = {"su": "longrope", "yarn": "longrope"}.get(kind, kind) if "longrope" in kinds else kind
    if kind not in kinds:
        r.fail(key, f"has rope type {kind!r}, which Ferrum does not support for this family; "
                    f"it handles {', '.join(kinds)}", unsupported=True)
    if rotary_dim is None and spec.get("partial_rotary_factor") not in (None, 1, 1.0):
        r.fail(key, f"sets partial_rotary_factor {spec['partial_rotary_factor']!r}, which Ferrum does not "
                    "support for this family", unsupported=True)
    rope = dict(theta=float(theta), head_dim=sizes.head_dim, rotary_dim=rotary_dim or sizes.head_dim, kind=kind)
    if kind == "default":
        return Rope(**rope)

    def number(name: str, default: Any = None) -> float:
        value = spec.get(name)
        value = default if value is None else value  # null: the default, as transformers reads it
        if positive_number(value):
            r.fail(key, f"field {name!r} must be a positive number, got {value!r}")
        return float(value)

    if kind in ("linear", "dynamic"):
        return Rope(**rope, factor=number("factor"))
    if kind == "llama3":
        low, high = number("low_freq_factor", 1.0), number("high_freq_factor", 4.0)
        if high < low:  # equal: no blend, every frequency kept or divided (Llama 4 Scout's), as transformers runs it
            r.fail(key, f"high_freq_factor ({high}) must not be below low_freq_factor ({low})")
        return Rope(**rope, factor=number("factor"), low_freq_factor=low, high_freq_factor=high,
                    original_max=_pretraining_context(r, sizes, spec, key))
    if kind == "yarn":
        return _yarn(r, sizes, spec, key, rope, number)
    # longrope
    original = _pretraining_context(r, sizes, spec, key)
    half = rope["rotary_dim"] // 2
    factors = {}
    for name in ("short_factor", "long_factor"):
        values = spec.get(name)
        if not isinstance(values, list) or len(values) != half or any(positive_number(v) for v in values):
            r.fail(key, f"field {name!r} must be a list of {half} positive numbers (rotary_dim / 2), got {values!r}")
        factors[name] = tuple(float(v) for v in values)
    for name in ("factor", "attention_factor"):
        if spec.get(name) is not None:
            number(name)
    attention = longrope_attention_factor(spec, sizes.max_seq_len, original)
    return Rope(**rope, original_max=original, attention_factor=attention, **factors)


def _pretraining_context(r: KeyReader, sizes: Sizes, spec: dict[str, Any], key: str) -> int:
    """llama3, YaRN and longrope's ``original_max_position_embeddings`` as transformers reads it: the config's top
    level first (Phi-3 writes it there, and its config class defaults it to 4096), then the rope settings, then
    ``max_position_embeddings``."""
    original = r.get("original_max_position_embeddings")
    if original is None:
        original = spec.get("original_max_position_embeddings", sizes.max_seq_len)
    if positive_int(original):
        r.fail(key, f"field 'original_max_position_embeddings' must be a positive integer, got {original!r}")
    return original


def _yarn(r: KeyReader, sizes: Sizes, spec: dict[str, Any], key: str, rope: dict[str, Any],
          number: Callable[..., float]) -> Rope:
    """transformers' reading: the pretraining context as :func:`_pretraining_context` says; no ``factor`` means
    the ratio of the context to it."""
    original = _pretraining_context(r, sizes, spec, key)
    factor = sizes.max_seq_len / original if spec.get("factor") is None else number("factor")
    # mscale and mscale_all_dim of 0 mean unset (transformers weighs them only when both are non-zero)
    for name in ("attention_factor", "mscale", "mscale_all_dim"):
        if spec.get(name) is not None and not (name != "attention_factor" and spec[name] == 0):
            number(name)
    beta_fast, beta_slow = number("beta_fast", 32.0), number("beta_slow", 1.0)
    truncate = spec.get("truncate", True)
    truncate = False if truncate is None else truncate  # transformers tests it for truth: null does not round
    if not isinstance(truncate, bool):
        r.fail(key, f"field 'truncate' must be true or false, got {truncate!r}")
    return Rope(**rope, factor=factor, original_max=original, attention_factor=yarn_attention_factor(spec, factor),
                beta_fast=beta_fast, beta_slow=beta_slow, truncate=truncate)


# ------------------------------------------------------------ sliding windows

def _layer_types(r: KeyReader, sizes: Sizes) -> list[str] | None:
    types = r("layer_types")
    if types is None:
        return None
    if not isinstance(types, list) or len(types) != sizes.num_layers or any(t not in (SLIDING, FULL) for t in types):
        r.fail("layer_types", f"must list {sizes.num_layers} entries of {SLIDING!r} / {FULL!r}, got {types!r}")
    return types


def _layer_kinds(r: KeyReader, sizes: Sizes, default: Callable[[int], str]) -> tuple[int | None, list[str]]:
    """The sliding window and each layer's attention kind: layer_types, else ``default(layer)``; sliding
    layers need a window."""
    window, types = r("sliding_window"), _layer_types(r, sizes)
    types = types or [default(i) for i in range(sizes.num_layers)]
    if window is None and SLIDING in types:
        r.fail("sliding_window", "must be set when layers use sliding attention")
    return window, types


def _window(r: KeyReader) -> int | None:
    return r("sliding_window")


_WINDOW = (Key("sliding_window", check=optional_positive_int),)
#: Gemma 2 / 3's window where a config leaves it out, as their transformers config classes default it (after _GEMMA).
_GEMMA_WINDOW = (Key("sliding_window", default=4096, check=optional_positive_int),)
_LAYER_TYPES = (Key("layer_types"),)


# ------------------------------------------------------------------ families

#: The rope scalings transformers' Llama-derived families apply.
_LLAMA_ROPES = ("default", "linear", "dynamic", "llama3", "yarn")


def _llama_like(qkv_bias_default: bool, qk_norm: str | None, windows: Callable[[KeyReader, Sizes], list],
                rotated: Callable[[KeyReader, Sizes], list[bool]] | None = None, norms: dict[str, str] = LLAMA_NORMS):
    """``rotated``: which layers apply rope (SmolLM3's NoPE layers do not); every layer when None."""

    def build(r: KeyReader, sizes: Sizes) -> Architecture:
        key, spec = _rope_spec(r)
        rope = read_rope(r, sizes, spec, key, _LLAMA_ROPES)
        r("hidden_act")
        r("partial_rotary_factor")
        attention_bias = r.get("attention_bias")
        attention_bias = qkv_bias_default if attention_bias is None else attention_bias
        ropes = [rope if on else Rope.unrotated(sizes.head_dim)
                 for on in (rotated(r, sizes) if rotated else [True] * sizes.num_layers)]
        return Architecture(
            layers=tuple(LayerSpec(w, layer_rope) for w, layer_rope in zip(windows(r, sizes), ropes)),
            norms=norms,
            attn_scale=1.0 / math.sqrt(sizes.head_dim),
            qk_norm=qk_norm,
            qkv_bias=attention_bias,
            # Llama's attention_bias also covers o_proj; Qwen2 biases q/k/v only.
            o_bias=attention_bias and not qkv_bias_default,
            mlp_bias=bool(r.get("mlp_bias")),
        )

    return build


def _no_windows(r: KeyReader, sizes: Sizes) -> list:
    return [None] * sizes.num_layers


def _every_layer_window(r: KeyReader, sizes: Sizes) -> list:
    return [r("sliding_window")] * sizes.num_layers


def _ministral_windows(r: KeyReader, sizes: Sizes) -> list:
    """transformers' Ministral: layer_types, else every layer sliding when sliding_window is set."""
    every = SLIDING if r("sliding_window") else FULL
    window, types = _layer_kinds(r, sizes, lambda _: every)
    return [window if t == SLIDING else None for t in types]


#: transformers' Ministral 3 rope settings where a config gives none (rope_theta included: a top-level one is
#: not read then).
_MINISTRAL3_ROPE = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": 16384,
                    "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0,
                    "llama_4_scaling_beta": 0.1}


def _ministral3(r: KeyReader, sizes: Sizes) -> Architecture:
    """Mistral's blocks, YaRN, and Llama 4's attention scaling (:func:`_llama4_query_scaling`)."""
    return _llama4_query_scaling(r, _llama_like(False, None, _every_layer_window)(r, sizes))


def _llama4_query_scaling(r: KeyReader, arch: Architecture) -> Architecture:
    """``arch`` with Llama 4's attention scaling as Ministral 3 and Mistral 4 read it from their rope settings'
    llama_4_scaling_beta: queries multiplied by ``1 + beta * log(1 + floor(position /
    original_max_position_embeddings))`` (``query_scaling``); none where the settings give no beta."""
    key, spec = _rope_spec(r)
    beta = spec.get("llama_4_scaling_beta")
    if not beta:
        return arch
    if positive_number(beta):
        r.fail(key, f"field 'llama_4_scaling_beta' must be a positive number, got {beta!r}")
    original = spec.get("original_max_position_embeddings")  # transformers reads it from the rope settings
    if positive_int(original):
        r.fail(key, "field 'original_max_position_embeddings' must be a positive integer with llama_4_scaling_beta, "
                    f"got {original!r}")
    return replace(arch, query_scaling=(float(beta), int(original)))


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
    elif not isinstance(types, list) or len(types) != sizes.num_layers or any(t not in (CHUNKED, FULL) for t in types):
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


def _qwen_windows(r: KeyReader, sizes: Sizes) -> list:
    """transformers' Qwen2 / Qwen3: no window unless use_sliding_window; then layer_types, else the layers
    from max_window_layers on."""
    window = r("sliding_window") if r("use_sliding_window") else None
    types = _layer_types(r, sizes)
    if types is None:
        first = r("max_window_layers")
        if window is not None and first is None:
            r.fail("max_window_layers", "is null, but use_sliding_window needs the index of the first sliding layer")
        types = [SLIDING if window is not None and i >= first else FULL for i in range(sizes.num_layers)]
    return [window if t == SLIDING else None for t in types]


_QWEN_WINDOW = (
    Key("sliding_window", default=4096, check=optional_positive_int), *_LAYER_TYPES,
    Key("use_sliding_window", default=False, check=boolean),
    Key("max_window_layers", default=28, check=optional_non_negative_int),  # 0: every layer slides
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


def _smollm3_rotated(r: KeyReader, sizes: Sizes) -> list[bool]:
    """transformers' SmolLM3: ``no_rope_layers[i]`` is 1 where layer ``i`` applies rope (despite the name),
    else every ``no_rope_layer_interval``-th layer skips it."""
    flags = r("no_rope_layers")
    if flags is None:
        interval = r("no_rope_layer_interval")
        return [(i + 1) % interval != 0 for i in range(sizes.num_layers)]
    if not isinstance(flags, list) or len(flags) != sizes.num_layers or any(f not in (0, 1) for f in flags):
        r.fail("no_rope_layers", f"must list {sizes.num_layers} entries of 1 (rope) or 0 (none), got {flags!r}")
    return [bool(f) for f in flags]


def _smollm3_windows(r: KeyReader, sizes: Sizes) -> list:
    """transformers' SmolLM3: the layers layer_types marks sliding (by default, the NoPE layers when
    use_sliding_window) attend through sliding_window; an explicit layer_types applies whatever
    use_sliding_window says."""
    window, types = r("sliding_window"), _layer_types(r, sizes)
    if types is None:
        slides = r("use_sliding_window") and window is not None
        types = [SLIDING if slides and not on else FULL for on in _smollm3_rotated(r, sizes)]
    if window is None and SLIDING in types:
        r.fail("sliding_window", "must be set when layer_types has sliding layers")
    return [window if t == SLIDING else None for t in types]


def _exaone4_kinds(r: KeyReader, sizes: Sizes) -> list[str]:
    """transformers' EXAONE 4: layer_types, else ``sliding_window_pattern``: a number ``n`` (every ``n``-th
    layer full, the rest sliding) or a string of ``L`` (sliding) and ``G`` (full) repeated over the layers.
    Without a sliding_window every layer is full."""
    window, types = r("sliding_window"), _layer_types(r, sizes)
    if window is None:
        return [FULL] * sizes.num_layers
    if types is not None:
        return types
    pattern = r("sliding_window_pattern")
    if isinstance(pattern, str) and pattern and set(pattern) <= {"L", "G"}:
        return [SLIDING if pattern[i % len(pattern)] == "L" else FULL for i in range(sizes.num_layers)]
    if isinstance(pattern, int) and not isinstance(pattern, bool) and pattern > 0:
        return [SLIDING if (i + 1) % pattern else FULL for i in range(sizes.num_layers)]
    r.fail("sliding_window_pattern", f"must be a positive integer or a string of 'L' and 'G', got {pattern!r}")


def _exaone4_windows(r: KeyReader, sizes: Sizes) -> list:
    window = r("sliding_window")
    return [window if kind == SLIDING else None for kind in _exaone4_kinds(r, sizes)]


def _exaone4_rotated(r: KeyReader, sizes: Sizes) -> list[bool]:
    """With a sliding window, the full layers take no rope (NoPE); without one, every layer takes it."""
    return [kind == SLIDING or r("sliding_window") is None for kind in _exaone4_kinds(r, sizes)]


_EXAONE4 = (
    Key("sliding_window", default=4096, check=optional_positive_int), *_LAYER_TYPES,
    Key("sliding_window_pattern", default=4),
)


#: GLM-4's four norms: Gemma's sandwich under its own names.
GLM4_NORMS = {
    "pre_attn": "input_layernorm", "post_attn": "post_self_attn_layernorm",
    "pre_mlp": "post_attention_layernorm", "post_mlp": "post_mlp_layernorm",
}


def _glm4(r: KeyReader, sizes: Sizes) -> Architecture:
    """GLM-4 (0414): a norm before and after each of attention and the MLP, q/k/v biases by attention_bias,
    gate and up in one matrix, and GPT-J's rope (adjacent dims paired) on partial_rotary_factor of each head."""
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, _LLAMA_ROPES, rotary_dim=_rotary_dim(r, sizes, spec, 0.5))
    r("hidden_act")
    return Architecture(
        layers=tuple(LayerSpec(None, replace(rope, interleaved=True)) for _ in range(sizes.num_layers)),
        norms=GLM4_NORMS,
        attn_scale=1.0 / math.sqrt(sizes.head_dim),
        qkv_bias=r("attention_bias"),
        fused_gate_up=True,
    )


def _glm(r: KeyReader, sizes: Sizes) -> Architecture:
    """GLM-4 (9B, 0520 and later ``-hf`` releases; transformers' Glm): GLM-4-0414's attention and MLP (q/k/v biased
    by attention_bias, gate and up in one matrix, GPT-J's rope on half of each head) with Llama's two norms."""
    return replace(_glm4(r, sizes), norms=LLAMA_NORMS)


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
#: The names Sarvam's release config gives keys (transformers' attribute_map) -> the names Ferrum reads them by.
SARVAM_ALIASES = {"num_experts": "n_routed_experts", "num_shared_experts": "n_shared_experts",
                  "use_qkv_bias": "attention_bias", "num_mtp_layers": "num_nextn_predict_layers"}


def _aliased(aliases: dict[str, str]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A ``Family.derive`` giving each key of ``aliases`` its alias's value where the config has only the alias
    (transformers' attribute_map); where it has both, :func:`_agreeing_aliases` checks them."""
    def derive(raw: dict[str, Any]) -> dict[str, Any]:
        return {**raw, **{name: raw[alias] for alias, name in aliases.items() if alias in raw and name not in raw}}

    return derive


def _agreeing_aliases(r: KeyReader, aliases: dict[str, str]) -> None:
    """Refuses a config that gives a key and its alias different values: which one transformers keeps depends on
    their order."""
    for alias, name in aliases.items():
        if alias in r.raw and r.raw[alias] != r.raw.get(name, r.raw[alias]):
            r.fail(alias, f"is {r.raw[alias]!r}, but {name!r}, which it is another name of, is {r.raw[name]!r}; keep "
                          "one of the two")


#: Sarvam-105B's release config names (transformers' SarvamMLA attribute_map) -> the names Ferrum reads them by.
SARVAM_MLA_ALIASES = {key: name for key, name in SARVAM_ALIASES.items() if key != "use_qkv_bias"}


def _sarvam_mla_config(raw: dict[str, Any]) -> dict[str, Any]:
    """Sarvam-105B's release config as transformers' SarvamMLAConfig reads it: the aliases, and its rope scaling type
    "deepseek_yarn", which is YaRN (its head_dim and q_head_dim, which the remote code wrote for vLLM, go unread: the
    heads' sizes are latent attention's)."""
    raw = _aliased(SARVAM_MLA_ALIASES)(raw)
    scaling = raw.get("rope_scaling")
    if isinstance(scaling, dict) and "deepseek_yarn" in (scaling.get("type"), scaling.get("rope_type")):
        raw = {**raw, "rope_scaling": {**{k: v for k, v in scaling.items() if k != "type"}, "rope_type": "yarn"}}
    return raw


def _sarvam_mla(r: KeyReader, sizes: Sizes) -> Architecture:
    """Sarvam-105B (transformers' SarvamMLA, run as DeepSeek-V3 under other defaults): :func:`_deepseek_v3`."""
    _agreeing_aliases(r, SARVAM_MLA_ALIASES)
    return _deepseek_v3(r, sizes)


def _sarvam_moe(r: KeyReader, sizes: Sizes) -> Architecture:
    """Sarvam-30B (transformers' SarvamMoE, run as GLM-4.5): GLM-4.5's blocks with q/k norms by default and rope over
    whole heads unless partial_rotary_factor says, stored under Sarvam's names (:data:`SARVAM_NAMES`, q/k/v fused);
    the sparse MLPs (grouped sigmoid routing chosen with ``gate.expert_bias``, an ungated shared expert, dense first
    layers) are :func:`ferrum.moe.spec.with_moe`'s."""
    _agreeing_aliases(r, SARVAM_ALIASES)
    return replace(_glm4_moe_blocks(r, sizes, 1.0), fused_qkv=True, stored_names=SARVAM_NAMES)


def _solar_open(r: KeyReader, sizes: Sizes) -> Architecture:
    """Upstage's Solar Open (transformers' SolarOpen): Llama's blocks with q/k/v biased by attention_bias (o never)
    and rope over whole heads (transformers' SolarOpen cannot run a partial_rotary_factor below 1, which mlx-lm's
    glm4_moe would read: refused); the sparse MLPs (DeepSeek-V3's grouped sigmoid routing, an ungated shared expert)
    on every layer are :func:`ferrum.moe.spec.with_moe`'s."""
    return replace(_llama_like(False, None, _no_windows)(r, sizes), o_bias=False)


def _mla_head_dim(r: KeyReader) -> int:
    """Latent attention's q/k heads: qk_nope_head_dim + qk_rope_head_dim dims (its head_dim key, which
    transformers sets to qk_rope_head_dim, sizes only the rope); values of v_head_dim are zero-padded to them."""
    nope, rope, v = r("qk_nope_head_dim"), r("qk_rope_head_dim"), r("v_head_dim")
    if rope % 2:
        r.fail("qk_rope_head_dim", f"is {rope}; Ferrum needs an even number (rope rotates pairs)")
    if nope % 2:
        r.fail("qk_nope_head_dim", f"is {nope}; Ferrum needs an even number (each head's dims pair up)")
    if v > nope + rope:
        r.fail("v_head_dim", f"({v}) exceeds the {nope + rope} dims of a query/key head (qk_nope_head_dim + "
                             "qk_rope_head_dim); Ferrum caches values padded to a key head's size", unsupported=True)
    return nope + rope


def _mla_kv_heads(r: KeyReader, heads: int) -> int:
    """Every attention head has its own key and value, expanded from the shared latent."""
    kv_heads = r("num_key_value_heads")
    if kv_heads is not None and kv_heads != heads:
        r.fail("num_key_value_heads", f"is {kv_heads}, but latent attention expands its keys and values to all "
                                      f"{heads} attention heads (num_attention_heads); transformers runs only equal "
                                      "counts")
    return heads


def _mla_keys(q_lora: int, nope: int, v: int, kv_lora: int = 512) -> tuple[Key, ...]:
    """Latent attention's sizes, with a family's transformers defaults."""
    return (
        Key("q_lora_rank", default=q_lora, check=optional_size(1 << 17)),  # null: a plain q_proj
        Key("kv_lora_rank", default=kv_lora, check=size(1 << 17)),
        Key("qk_nope_head_dim", default=nope, check=size(4096)),
        Key("qk_rope_head_dim", default=64, check=size(4096)),
        Key("v_head_dim", default=v, check=size(4096)),
        Key("attention_bias", default=False, check=boolean),
    )


#: transformers' DeepseekV2Config and DeepseekV3Config defaults.
_MLA = _mla_keys(1536, 128, 128)


def _yarn_mscale(factor: float, weight: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * weight * math.log(factor) + 1.0


def _deepseek_v3(r: KeyReader, sizes: Sizes) -> Architecture:
    """DeepSeek-V3 / R1, Moonlight, Kimi K2 (transformers' DeepseekV3), and GLM-4.7-Flash (Glm4MoeLite: the same
    attention and routing under other defaults): :func:`_latent_attention`, DeepSeek's adjacent rope pairs where
    rope_interleave (null: rotate-half); the sparse MLPs (grouped sigmoid routing, an ungated shared expert, dense
    layers first) are :func:`ferrum.moe.spec.with_moe`'s."""
    return _latent_attention(r, sizes, interleaved=bool(r("rope_interleave")))


def _deepseek_v2(r: KeyReader, sizes: Sizes) -> Architecture:
    """DeepSeek-V2, V2-Lite, V2.5, DeepSeek-Coder-V2 (transformers' DeepseekV2): :func:`_latent_attention` with rope
    always in adjacent pairs (transformers' complex form views dims 2j, 2j+1 as one complex number; the q and k it
    rotates stay in that layout, which leaves their products as V3's interleaved rope does); the sparse MLPs (softmax
    routing, an ungated shared expert, the first first_k_dense_replace layers dense) are
    :func:`ferrum.moe.spec.with_moe`'s."""
    return _latent_attention(r, sizes, interleaved=True)


def _latent_attention(r: KeyReader, sizes: Sizes, interleaved: bool, partial: bool = False,
                      kinds: tuple[str, ...] = _LLAMA_ROPES) -> Architecture:
    """Llama's blocks with Multi-head Latent Attention (:mod:`ferrum.arch.mla`): rope on the qk_rope_head_dim dims of
    each q/k head, the softmax scale ``1/sqrt(qk_nope + qk_rope)`` times ``mscale(factor, mscale_all_dim)**2`` under
    a rope scaling that sets mscale_all_dim. ``partial``: the rope settings' partial_rotary_factor sizes the rotary
    dims as a fraction of the whole head (Mistral 4's config class sets it so), which must come to
    qk_rope_head_dim. ``kinds``: the rope scalings the family allows."""
    key, spec = _rope_spec(r)
    rotary = r("qk_rope_head_dim")
    factor = spec.get("partial_rotary_factor")
    if partial and factor is not None:
        if positive_number(factor) or int(sizes.head_dim * factor) != rotary:
            r.fail(key, f"sets partial_rotary_factor {factor!r}; transformers then rotates int({sizes.head_dim} * "
                        f"factor) dims of each head (qk_nope_head_dim + qk_rope_head_dim), which must be the "
                        f"{rotary} of qk_rope_head_dim ({rotary / sizes.head_dim!r})")
    elif factor not in (None, 1, 1.0):
        r.fail(key, f"sets partial_rotary_factor {factor!r}; latent attention rotates "
                    "qk_rope_head_dim dims of each head, which Ferrum does not combine with it", unsupported=True)
    rope = read_rope(r, sizes, spec, key, kinds, rotary_dim=rotary)
    rope = replace(rope, interleaved=interleaved)
    r("hidden_act")
    r("partial_rotary_factor")
    scale = 1.0 / math.sqrt(sizes.head_dim)
    weight = spec.get("mscale_all_dim")
    if rope.kind != "default" and weight:  # transformers' yarn_apply_mscale
        if positive_number(weight):
            r.fail(key, f"field 'mscale_all_dim' must be a positive number, got {weight!r}")
        scale *= _yarn_mscale(rope.factor, float(weight)) ** 2
    mla = MlaSpec(heads=sizes.num_heads, q_lora_rank=r("q_lora_rank"), kv_lora_rank=r("kv_lora_rank"),
                  nope=r("qk_nope_head_dim"), rope=rotary, v_head_dim=r("v_head_dim"), bias=r("attention_bias"))
    return Architecture(
        layers=tuple(LayerSpec(None, rope) for _ in range(sizes.num_layers)),
        norms=LLAMA_NORMS,
        attn_scale=scale,
        mla=mla,
        mtp_layers=r.get("num_nextn_predict_layers") or 0,  # Mistral 4 has no such key
    )


#: transformers' Mistral 4 rope settings where a config gives none (its config class adds partial_rotary_factor, the
#: qk_rope_head_dim share of a head, which :func:`_latent_attention` checks where given).
_MISTRAL4_ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 128.0, "original_max_position_embeddings": 8192,
                  "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0,
                  "llama_4_scaling_beta": 0.1}


def _mistral4(r: KeyReader, sizes: Sizes) -> Architecture:
    """Mistral Small 4 (transformers' Mistral4): DeepSeek-V3's latent attention (:func:`_latent_attention`, rope in
    DeepSeek's adjacent pairs where rope_interleave, else rotate-half) with Llama 4's attention scaling of the whole
    query once rotated, as Ministral 3 scales it (:func:`_llama4_query_scaling`); the sparse MLPs (softmax routing
    grouped by each group's two best probabilities, an ungated shared expert, the first first_k_dense_replace layers
    dense) are :func:`ferrum.moe.spec.with_moe`'s."""
    return _llama4_query_scaling(r, _latent_attention(r, sizes, interleaved=bool(r("rope_interleave")), partial=True))


def _hunyuan_dense(r: KeyReader, sizes: Sizes) -> Architecture:
    """Hunyuan (dense): Llama's blocks with per-head q/k norms (``query_layernorm``, ``key_layernorm``) applied
    once q and k are rotated. Its checkpoints' rope scaling is "dynamic" with an ``alpha``, which transformers
    reads as a fixed base, ``rope_theta * alpha ** (head_dim / (head_dim - 2))``."""
    arch = _llama_like(False, "head", _no_windows)(r, sizes)
    key, spec = _rope_spec(r)
    alpha = spec.get("alpha")
    if alpha is not None:
        if positive_number(alpha) or (spec.get("rope_type", spec.get("type")) or "default") != "dynamic":
            r.fail(key, f"field 'alpha' must be a positive number, with rope type 'dynamic'; got {alpha!r}")
        d = sizes.head_dim
        arch = replace(arch, layers=tuple(replace(layer, rope=replace(
            layer.rope, theta=layer.rope.theta * float(alpha) ** (d / (d - 2)), kind="default", factor=1.0))
            for layer in arch.layers))
    return replace(arch, qk_norm_names=("query_layernorm", "key_layernorm"), qk_norm_after_rope=True)


def _interleaved(arch: Architecture) -> Architecture:
    """``arch`` with GPT-J's rope on every layer: adjacent dims paired."""
    return replace(arch, layers=tuple(replace(layer, rope=replace(layer.rope, interleaved=True))
                                      for layer in arch.layers))


def _ernie4_5(r: KeyReader, sizes: Sizes) -> Architecture:
    """Llama's blocks, use_bias on every projection, and GPT-J's rope pairing adjacent dims (interleaved)."""
    bias = r("use_bias")
    return replace(_interleaved(_llama_like(False, None, _no_windows)(r, sizes)), qkv_bias=bias, o_bias=bias,
                   mlp_bias=bias)


def _ernie4_5_moe(r: KeyReader, sizes: Sizes) -> Architecture:
    """The dense family's blocks; use_bias biases the LM head too (transformers' Ernie4_5_MoeForCausalLM), its
    weight the embedding's where tied."""
    return replace(_ernie4_5(r, sizes), lm_head_bias=r("use_bias"))


def _helium(r: KeyReader, sizes: Sizes) -> Architecture:
    """Kyutai's Helium: Llama's blocks with GPT-J's rope (adjacent dims paired); attention_bias on q/k/v only
    (its o_proj never has one), mlp_bias on the MLP. Its o_proj maps hidden_size to hidden_size, so the heads
    must split hidden_size."""
    if sizes.head_dim * sizes.num_heads != sizes.hidden_size:
        r.fail("head_dim", f"is {sizes.head_dim}, but Helium's o_proj takes hidden_size ({sizes.hidden_size}) "
                           f"inputs, {sizes.num_heads} heads of hidden_size / num_attention_heads; transformers "
                           "cannot load such a checkpoint either")
    return replace(_interleaved(_llama_like(False, None, _no_windows)(r, sizes)), o_bias=False)


def _seed_oss(r: KeyReader, sizes: Sizes) -> Architecture:
    """Llama's blocks with attention_bias on q/k/v only (Qwen 2's) and attention_out_bias on o_proj."""
    return replace(_llama_like(True, None, _no_windows)(r, sizes), o_bias=r("attention_out_bias"))


def _granite(r: KeyReader, sizes: Sizes) -> Architecture:
    """Llama with four multipliers: on the embeddings, on what each block adds to the residual stream,
    as the attention scale (instead of 1/sqrt(head_dim)), and a divisor of the logits."""
    return _granite_multipliers(r, _llama_like(False, None, _no_windows)(r, sizes))


def _granite_multipliers(r: KeyReader, arch: Architecture) -> Architecture:
    return replace(
        arch,
        embed_scale=None if r("embedding_multiplier") == 1 else float(r("embedding_multiplier")),
        residual_scale=float(r("residual_multiplier")),
        attn_scale=float(r("attention_multiplier")),
        logit_scale=1.0 / float(r("logits_scaling")),
    )


_GRANITE = (
    Key("attention_bias", check=boolean), Key("mlp_bias", check=boolean),
    *(Key(name, default=1.0, check=positive_number)
      for name in ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")),
)


_SMOLLM3 = (
    Key("sliding_window", check=optional_positive_int), *_LAYER_TYPES,
    Key("use_sliding_window", default=False, check=boolean),
    Key("no_rope_layers"),
    Key("no_rope_layer_interval", default=4, check=optional_positive_int),
    Key("attention_bias", check=boolean), Key("mlp_bias", check=boolean),
)


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


def _per_kind_rope_specs(r: KeyReader, family: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """transformers 5's ``rope_parameters`` with one entry per attention kind: ``(full, sliding)`` settings, None
    for a config without them. A ``rope_scaling`` beside them (added by hand for a longer context) must agree
    with the full layers' entry, which transformers merges it into; a flat ``rope_parameters`` is refused."""
    params = _rope_object(r, "rope_parameters")
    if not params:
        return None
    if FULL not in params and SLIDING not in params:
        r.fail("rope_parameters", f"must hold one entry per attention kind ({FULL!r}, {SLIDING!r}) for {family}; "
                                  "transformers ignores a flat one", unsupported=True)
    full, sliding = (dict(params.get(kind) or {}) for kind in (FULL, SLIDING))
    scaling = _rope_object(r, "rope_scaling")
    if scaling and _scalings_differ(full, scaling):
        r.fail("rope_scaling", f"is {scaling!r} but rope_parameters' {FULL!r} entry is {full!r}; the two disagree "
                               "(transformers 5 merges rope_scaling into it); keep the one meant in rope_parameters")
    return full, sliding


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
    shapes: dict[str, set] = {}
    for i, kind in enumerate(types):
        over = per_layer.get(str(i), per_layer.get(i)) or {}
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
    padded to it at load (``LayerSpec.stored_head_dim``)."""
    return max(d for d, _ in _gemma4_shapes(r).values())


def _gemma4_kv_heads(r: KeyReader, heads: int) -> int:
    """The most key/value heads of any layer; fewer are repeated at load (``LayerSpec.stored_kv_heads``)."""
    return max(k for _, k in _gemma4_shapes(r).values())


def _gemma4_types(r: KeyReader) -> list[str]:
    """layer_types, else five sliding layers to one full; the last layer is always full (transformers forces it)."""
    layers = r("num_hidden_layers")
    types = r("layer_types")
    if types is None:
        types = [SLIDING if (i + 1) % 6 else FULL for i in range(layers)]
    elif not isinstance(types, list) or len(types) != layers or any(t not in (SLIDING, FULL) for t in types):
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
    key/value heads repeated, at load (exact: see ``LayerSpec.stored_head_dim``). E2B / E4B add per-layer inputs
    (hidden_size_per_layer_input, :mod:`ferrum.arch.per_layer`) and last layers that read an earlier layer's keys
    and values (num_kv_shared_layers: ``LayerSpec.kv_source``), twice as wide with use_double_wide_mlp; 26B-A4B
    runs experts beside every dense MLP (enable_moe_block: :func:`ferrum.moe.spec.gemma4_moe`)."""
    r("hidden_activation")
    types = _gemma4_types(r)
    window = r("sliding_window")
    shapes = _gemma4_shapes(r)
    sliding_rope, full_rope = _gemma4_ropes(r, sizes, shapes[FULL][0], shapes.get(SLIDING, shapes[FULL])[0])
    k_eq_v = bool(r("attention_k_eq_v"))
    sources = _gemma4_kv_sources(r, types)
    wide = 2 * sizes.intermediate_size if r("use_double_wide_mlp") else None
    per_layer = r("hidden_size_per_layer_input")

    def layer(kind: str, source: int | None) -> LayerSpec:
        dim, kv = shapes[kind]
        return LayerSpec(window if kind == SLIDING else None, full_rope if kind == FULL else sliding_rope,
                         stored_head_dim=None if dim == sizes.head_dim else dim,
                         stored_kv_heads=None if kv == sizes.num_kv_heads else kv,
                         values_are_keys=k_eq_v and kind == FULL, kv_source=source,
                         intermediate_size=None if source is None else wide)

    arch = Architecture(
        layers=tuple(layer(t, source) for t, source in zip(types, sources)),
        per_layer_inputs=PerLayerInputs(per_layer, _per_layer_vocab(r, sizes)) if per_layer else None,
        unloaded=_unread_shared_kv(sources),
        layer_scalar=True,
        **_gemma4_and_3n_blocks(r, sizes),
    )
    return gemma4_moe(r, arch) if r("enable_moe_block") else arch  # 26B-A4B: experts beside every dense MLP


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


def _olmo3(r: KeyReader, sizes: Sizes) -> Architecture:
    """OLMo 2's blocks, three sliding layers to one full (unless layer_types says otherwise), and a rope per
    attention kind: the full layers' scaled (rope_scaling, e.g. YaRN), the sliding layers' plain."""
    window, types = _layer_kinds(r, sizes, lambda i: FULL if (i + 1) % 4 == 0 else SLIDING)
    r("hidden_act")
    specs = _per_kind_rope_specs(r, "OLMo 3")
    if specs is not None:
        full, sliding = (read_rope(r, sizes, spec, "rope_parameters", _LLAMA_ROPES, theta_default=500_000.0)
                         for spec in specs)
    else:  # transformers 4's spelling: rope_scaling scales the full layers only
        key, spec = _rope_spec(r)
        full = read_rope(r, sizes, spec, key, _LLAMA_ROPES, theta_default=500_000.0)
        sliding = read_rope(r, sizes, {}, key, ("default",), theta_default=500_000.0)
    bias = r("attention_bias")
    return Architecture(
        layers=tuple(LayerSpec(window, sliding) if t == SLIDING else LayerSpec(None, full) for t in types),
        norms=POST_NORMS, attn_scale=1.0 / math.sqrt(sizes.head_dim), qk_norm="projection",
        qkv_bias=bias, o_bias=bias,
    )


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
#: VaultGemma: Gemma 2's blocks without the norms on attention's and the MLP's outputs.
VAULTGEMMA_NORMS = {"pre_attn": "input_layernorm", "pre_mlp": "pre_feedforward_layernorm"}


def _rotary_dim(r: KeyReader, sizes: Sizes, spec: dict, default: float, beside: str = "partial_rotary_factor") -> int:
    """The dims of a head that rope rotates: partial_rotary_factor of them, in the rope settings or beside them
    (under the name ``beside``: GPT-NeoX's rotary_pct)."""
    name = "partial_rotary_factor" if "partial_rotary_factor" in spec else beside
    factor = spec.get("partial_rotary_factor", r(beside))
    factor = default if factor is None else factor
    if positive_number(factor) or factor > 1:
        r.fail(name, f"must be in (0, 1], got {factor!r}")
    rotary_dim = int(sizes.head_dim * factor)
    if rotary_dim < 2 or rotary_dim % 2:
        r.fail(name, f"gives {rotary_dim} rotary dims of {sizes.head_dim}; Ferrum needs an even number of at least 2")
    return rotary_dim


def _phi3(r: KeyReader, sizes: Sizes) -> Architecture:
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, ("default", "longrope"), rotary_dim=_rotary_dim(r, sizes, spec, 1.0))
    r("hidden_act")
    scale = 1.0 / math.sqrt(sizes.head_dim)
    return Architecture(
        layers=tuple(LayerSpec(w, rope) for w in _every_layer_window(r, sizes)),
        norms=LLAMA_NORMS,
        attn_scale=scale,
        fused_qkv=True,
        fused_gate_up=True,
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


LINEAR = "linear_attention"
#: A hybrid's layer types -> the mixer each runs (LayerSpec.mixer).
_HYBRID_MIXERS = {LINEAR: "gated_delta", FULL: "attention"}


def _hybrid_mixers(r: KeyReader, sizes: Sizes) -> list[str]:
    """Each layer's mixer from layer_types, else every ``full_attention_interval``-th layer attends (transformers'
    default of 4: three Gated DeltaNet layers, then full attention)."""
    types = r("layer_types")
    if types is None:
        interval = r("full_attention_interval")
        types = [FULL if (i + 1) % interval == 0 else LINEAR for i in range(sizes.num_layers)]
    if not isinstance(types, list) or len(types) != sizes.num_layers or any(t not in _HYBRID_MIXERS for t in types):
        r.fail("layer_types", f"must list {sizes.num_layers} entries of {LINEAR!r} / {FULL!r}, got {types!r}")
    return [_HYBRID_MIXERS[t] for t in types]


def _gated_delta_spec(r: KeyReader, grouped: bool) -> GatedDeltaSpec:
    k_heads, v_heads = r("linear_num_key_heads"), r("linear_num_value_heads")
    if v_heads % k_heads:
        r.fail("linear_num_value_heads", f"({v_heads}) must be a multiple of linear_num_key_heads ({k_heads})")
    return GatedDeltaSpec(k_heads, v_heads, r("linear_key_head_dim"), r("linear_value_head_dim"),
                          r("linear_conv_kernel_dim"), grouped=grouped)


def _qwen3_hybrid(grouped: bool) -> Callable[[KeyReader, Sizes], Architecture]:
    """Qwen3-Next (``grouped``: its in_proj_qkvz / in_proj_ba) and Qwen3.5: Gated DeltaNet layers between gated
    full-attention layers (q/k norms before a partial rope), every block norm and the q/k norms zero-centred
    (``1 + w``); the Gated DeltaNet's own gated norm is not."""

    def build(r: KeyReader, sizes: Sizes) -> Architecture:
        key, spec = _rope_spec(r)
        rope = read_rope(r, sizes, spec, key, _LLAMA_ROPES, rotary_dim=_rotary_dim(r, sizes, spec, 0.25))
        r("hidden_act")
        bias = r("attention_bias")
        return Architecture(
            layers=tuple(LayerSpec(None, rope, mixer=m) for m in _hybrid_mixers(r, sizes)),
            norms=LLAMA_NORMS,
            norm_offset=1.0,
            attn_scale=1.0 / math.sqrt(sizes.head_dim),
            qk_norm="head",
            qkv_bias=bias,
            o_bias=bias,
            attn_output_gate=True,
            gated_delta=_gated_delta_spec(r, grouped),
            keep_float32=(".A_log", ".dt_bias"),
        )

    return build


_QWEN3_HYBRID = (
    Key("partial_rotary_factor", check=optional_positive_number),
    Key("attention_bias", default=False, check=boolean),
    Key("layer_types"),
    Key("full_attention_interval", default=4, check=positive_int),
    Key("linear_conv_kernel_dim", default=4, check=positive_int),
    Key("linear_key_head_dim", default=128, check=positive_int),
    Key("linear_value_head_dim", default=128, check=positive_int),
    Key("linear_num_key_heads", default=16, check=positive_int),
    Key("linear_num_value_heads", default=32, check=positive_int),
)


#: Kimi Linear's keys as its release (and transformers' attribute_map) spells them -> DeepSeek-V3's, which the MoE
#: table reads.
_KIMI_ALIASES = {"num_experts_per_token": "num_experts_per_tok", "moe_renormalize": "norm_topk_prob",
                 "num_expert_group": "n_group", "num_shared_experts": "n_shared_experts",
                 "model_max_length": "max_position_embeddings"}
#: Kimi Linear's linear_attn_config (its release's, which transformers reads) -> transformers' own keys.
_KIMI_LINEAR_CONFIG = {"head_dim": "linear_head_dim", "num_heads": "linear_num_heads",
                       "short_conv_kernel_size": "linear_conv_kernel_dim"}


def _kimi_linear_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """Kimi Linear's config as transformers' KimiLinearConfig reads it: its release's spellings (model_max_length,
    num_experts_per_token...) under DeepSeek-V3's names where those are absent, linear_attn_config's sizes, its
    1-indexed kda_layers / full_attn_layers as layer_types, and first_k_dense_replace as mlp_layer_types, where
    the config gives neither."""
    out = dict(raw)
    for kimi, ours in _KIMI_ALIASES.items():
        if kimi in raw and ours not in raw:
            out[ours] = raw[kimi]
    section = raw.get("linear_attn_config")
    section = section if isinstance(section, dict) else {}
    for kimi, ours in _KIMI_LINEAR_CONFIG.items():
        if kimi in section:
            out[ours] = section[kimi]
    layers = raw.get("num_hidden_layers")
    if out.get("layer_types") is None and isinstance(layers, int) and layers > 0:
        full, kda = section.get("full_attn_layers"), section.get("kda_layers")
        if isinstance(full, list) and isinstance(kda, list):
            kinds: list[Any] = [None] * layers
            for kind, listed in ((FULL, full), (LINEAR, kda)):
                for index in listed:
                    if isinstance(index, int) and 1 <= index <= layers:
                        kinds[index - 1] = kind
            out["layer_types"] = kinds
        else:  # transformers' default
            out["layer_types"] = [FULL if i and i % 4 == 0 else LINEAR for i in range(layers)]
    first = raw.get("first_k_dense_replace", 1)
    if out.get("mlp_layer_types") is None and isinstance(layers, int) and isinstance(first, int):
        out["mlp_layer_types"] = ["dense" if i < first else "sparse" for i in range(layers)]
    return out


#: transformers 5 saves a Kimi Linear's dense MLPs under the sparse ones' module (its conversion mapping renames
#: ``block_sparse_moe`` to ``mlp`` on load and back on save); the release keeps them under ``mlp``.
_KIMI_DENSE_UNDER_MOE = {f"mlp.{proj}": f"block_sparse_moe.{proj}" for proj in ("gate_proj", "up_proj", "down_proj")}
_KIMI_PROJS = ("gate_proj", "up_proj", "down_proj")
#: mlx-lm's conversions (``kimi_linear.sanitize``): the sparse MLP under ``mlp`` (its experts stacked in switch_mlp, the
#: correction bias beside the router: MoeSpec.correction_bias_aliases), each KDA convolution in a module of its own
#: (taps ``[C, K, 1]``: KimiDeltaSpec.conv_last), kv_b_proj split into embed_q / unembed_out (joined back at load as
#: DeepSeek-V3's). Its latent norm takes rms_norm_eps where the release's remote code and transformers take 1e-6
#: (ferrum.arch.mla.LATENT_EPS, kept: the release's), a difference below float32 noise for a latent of any scale.
_KIMI_MLX_LM_MLP = {
    "block_sparse_moe": "mlp", "block_sparse_moe.gate": "mlp.gate",
    **{f"block_sparse_moe.{stack}.{proj}": f"mlp.{stack}.{proj}"
       for stack in ("switch_mlp", "shared_experts") for proj in _KIMI_PROJS},
}
_KIMI_MLX_LM_NAMES = {**_KIMI_MLX_LM_MLP, **{f"self_attn.{p}_conv1d": f"self_attn.{p}_conv.conv" for p in "qkv"}}


def _kimi_linear(r: KeyReader, sizes: Sizes) -> Architecture:
    """Kimi Linear (transformers' KimiLinear): Kimi Delta Attention layers (:mod:`ferrum.recurrent.kimi_delta`)
    between DeepSeek-V3's latent attention without any rope (transformers' KimiLinearAttention: the rope dims of q
    and the shared key stay as projected), softmax scale ``1/sqrt(qk_nope + qk_rope)``; the sparse MLPs (grouped
    sigmoid routing, an ungated shared expert, dense MLPs where mlp_layer_types says) are
    :func:`ferrum.moe.spec.with_moe`'s."""
    types = r("layer_types")
    if not isinstance(types, list) or len(types) != sizes.num_layers or any(t not in (LINEAR, FULL) for t in types):
        r.fail("layer_types", f"must list {sizes.num_layers} entries of {LINEAR!r} / {FULL!r} (or linear_attn_config's "
                              f"kda_layers and full_attn_layers every layer between them), got {types!r}")
    r("hidden_act")
    r("mla_use_nope")
    rope = Rope.unrotated(sizes.head_dim)
    mla = MlaSpec(heads=sizes.num_heads, q_lora_rank=r("q_lora_rank"), kv_lora_rank=r("kv_lora_rank"),
                  nope=r("qk_nope_head_dim"), rope=r("qk_rope_head_dim"), v_head_dim=r("v_head_dim"),
                  bias=r("attention_bias"))
    return Architecture(
        layers=tuple(LayerSpec(None, rope, mixer="kimi_delta" if t == LINEAR else "attention") for t in types),
        norms=LLAMA_NORMS,
        attn_scale=1.0 / math.sqrt(sizes.head_dim),
        mla=mla,
        kimi_delta=KimiDeltaSpec(r("linear_num_heads"), r("linear_head_dim"), r("linear_conv_kernel_dim")),
        keep_float32=(".A_log", ".dt_bias"),
        # ferrum quantize's output: mlx-lm's MLP names, the taps as transformers stores them (mlx-lm's sanitize
        # moves those)
        layouts=tuple(("model.", "lm_head.weight", names)
                      for names in (_KIMI_DENSE_UNDER_MOE, _KIMI_MLX_LM_NAMES, _KIMI_MLX_LM_MLP)),
    )


_KIMI_LINEAR = (
    Key("linear_head_dim", default=128, check=positive_int),
    Key("linear_num_heads", default=32, check=positive_int),
    Key("linear_conv_kernel_dim", default=4, check=positive_int),
    Key("layer_types"),
    # the release's remote code says so; transformers never rotates (a false asks for rope it does not run)
    Key("mla_use_nope", default=True, unsupported=True, check=one_of(None, True)),
    Key("moe_router_activation_func", default="sigmoid", unsupported=True, check=one_of("sigmoid")),
    Key("moe_layer_freq", default=1, unsupported=True, check=one_of(1)),
)


#: OLMo Hybrid's blocks: its attention layers OLMo 3's (norms after attention and MLP), its Gated DeltaNet layers
#: Llama's (norms before).
_OLMO_HYBRID_NORMS = {LINEAR: tuple(LLAMA_NORMS.items()), FULL: tuple(POST_NORMS.items())}
#: Its release's (OLMo-core's) names of the norms, which transformers 5 saves back.
_OLMO_HYBRID_STORED = {"input_layernorm": "attention_layer_norm", "post_attention_layernorm": "feedforward_layer_norm"}


def _olmo_hybrid(r: KeyReader, sizes: Sizes) -> Architecture:
    """AllenAI's OLMo Hybrid (transformers' OlmoHybrid): OLMo 3's full-attention layers (q/k normed over their whole
    projections, norms after attention and the MLP, no rope where rope_theta is null, as in the releases) between
    Gated DeltaNet layers with one projection each and Llama's norms, whose ``beta`` is doubled where
    linear_allow_neg_eigval and whose gated output norm has FLA's epsilon, 1e-5."""
    types = r("layer_types")
    if types is None:  # transformers' default: every fourth layer attends, the last at least
        types = [FULL if i % 4 == 3 else LINEAR for i in range(sizes.num_layers)]
        types[-1] = FULL if FULL not in types else types[-1]
    if not isinstance(types, list) or len(types) != sizes.num_layers or any(t not in (LINEAR, FULL) for t in types):
        r.fail("layer_types", f"must list {sizes.num_layers} entries of {LINEAR!r} / {FULL!r}, got {types!r}")
    r("hidden_act")
    key, spec = _rope_spec(r)
    # transformers skips rope only where rope_theta is null: the rope object's, else the top-level key's (the
    # older spelling), else its default 10000
    theta = spec["rope_theta"] if "rope_theta" in spec else r.raw.get("rope_theta", 10000.0)
    nope = theta is None
    rope = Rope.unrotated(sizes.head_dim) if nope else read_rope(r, sizes, spec, key, _LLAMA_ROPES,
                                                                 theta_default=10000.0)
    k_heads, v_heads = r("linear_num_key_heads") or sizes.num_heads, r("linear_num_value_heads") or sizes.num_heads
    if v_heads % k_heads:
        r.fail("linear_num_value_heads", f"({v_heads}) must be a multiple of linear_num_key_heads ({k_heads})")
    k_dim = r("linear_key_head_dim") or int(0.75 * sizes.hidden_size / k_heads)
    delta = GatedDeltaSpec(k_heads, v_heads, k_dim, r("linear_value_head_dim") or 2 * k_dim,
                           r("linear_conv_kernel_dim"), separate=True,
                           beta_scale=2.0 if r("linear_allow_neg_eigval") else 1.0, norm_eps=1e-5)
    bias = r("attention_bias")
    return Architecture(
        layers=tuple(LayerSpec(None, rope, mixer="gated_delta" if t == LINEAR else "attention",
                               norms=_OLMO_HYBRID_NORMS[t]) for t in types),
        norms=LLAMA_NORMS, attn_scale=1.0 / math.sqrt(sizes.head_dim), qk_norm="projection",
        qkv_bias=bias, o_bias=bias, gated_delta=delta, keep_float32=(".A_log", ".dt_bias"),
        layouts=(("model.", "lm_head.weight", _OLMO_HYBRID_STORED),),
    )


_OLMO_HYBRID = (
    Key("attention_bias", default=False, check=boolean),
    Key("layer_types"),
    Key("linear_num_key_heads", check=optional_positive_int),
    Key("linear_num_value_heads", check=optional_positive_int),
    Key("linear_key_head_dim", check=optional_positive_int),
    Key("linear_value_head_dim", check=optional_positive_int),
    Key("linear_conv_kernel_dim", default=4, check=positive_int),
    Key("linear_allow_neg_eigval", default=True, check=boolean),
)


#: Granite 4.0-H's layer types (transformers 4's names, then 5's) -> the mixer each runs (LayerSpec.mixer).
_MAMBA_HYBRID_MIXERS = {"mamba": "mamba2", LINEAR: "mamba2", "attention": "attention", FULL: "attention"}


#: transformers 5 saves a float JSON cannot hold as ``{"__float__": "Infinity"}``.
_TAGGED_FLOATS = {"Infinity": float("inf"), "-Infinity": float("-inf"), "NaN": float("nan")}


def _tagged_float(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"__float__"}:
        return _TAGGED_FLOATS.get(value["__float__"], value)
    return value


def _time_step_limit(value: Any) -> str | None:
    if value is not None and not isinstance(value, (list, tuple)):
        return f"must be [min, max] with 0 <= min <= max (max may be Infinity), got {value!r}"
    limits = None if value is None else [_tagged_float(v) for v in value]
    if limits is None or (len(limits) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   for v in limits) and 0 <= limits[0] <= limits[1]):
        return None
    return f"must be [min, max] with 0 <= min <= max (max may be Infinity), got {value!r}"


def _mamba2_spec(r: KeyReader, sizes: Sizes, module: str) -> Mamba2Spec:
    """Mamba-2's sizes; ``mamba_d_head`` "auto" is ``mamba_expand * hidden_size / mamba_n_heads``."""
    heads, groups, head = r("mamba_n_heads"), r("mamba_n_groups"), r("mamba_d_head")
    inner = r("mamba_expand") * sizes.hidden_size
    head = inner // heads if head == "auto" else head
    if not isinstance(head, int) or head <= 0 or head * heads != inner:
        r.fail("mamba_d_head", f"({head!r}) times mamba_n_heads ({heads}) must be mamba_expand * hidden_size "
                               f"({inner})")
    if heads % groups:
        r.fail("mamba_n_groups", f"({groups}) must divide mamba_n_heads ({heads})")
    limit = [float(_tagged_float(v)) for v in r("time_step_limit") or (0.0, float("inf"))]
    return Mamba2Spec(heads, head, groups, r("mamba_d_state"), r("mamba_d_conv"), (limit[0], limit[1]),
                      conv_bias=r("mamba_conv_bias"), proj_bias=r("mamba_proj_bias"), module=module)


def _granitemoehybrid(r: KeyReader, sizes: Sizes) -> Architecture:
    """Granite 4.0-H: Mamba-2 and attention layers (rope only where position_embedding_type is "rope", else none)
    with Granite's multipliers (``residual_multiplier`` on the Mamba-2 output too); each layer's MLP the experts
    with GraniteMoeShared's shared MLP, or that shared MLP alone where num_local_experts is 0 (H-Micro, 1B, 350M)."""
    rope_on = r("position_embedding_type") == "rope"
    arch = _granite_multipliers(r, _llama_like(False, None, _no_windows,
                                               lambda r, sizes: [rope_on] * sizes.num_layers)(r, sizes))
    types = r("layer_types") or r("layers_block_type") or ["mamba"] * sizes.num_layers
    if not isinstance(types, list) or len(types) != sizes.num_layers or any(
            t not in _MAMBA_HYBRID_MIXERS for t in types):
        r.fail("layer_types", f"must list {sizes.num_layers} entries of 'mamba' / 'attention', got {types!r}")
    layers = tuple(replace(spec, mixer=_MAMBA_HYBRID_MIXERS[t]) for spec, t in zip(arch.layers, types))
    arch = replace(arch, layers=layers,
                   mamba2=_mamba2_spec(r, sizes, "mamba"), keep_float32=(".A_log", ".dt_bias", ".D"))
    if not r("num_local_experts"):
        return replace(arch, fused_gate_up=True, stored_names=GRANITE_SHARED_MLP_NAMES)
    experts = replace(sizes, intermediate_size=r("intermediate_size"))  # the sizes' is the shared MLP's (names=)
    return with_moe("granitemoeshared", lambda r, sizes: replace(arch, stored_names=GRANITEMOESHARED_NAMES))(r, experts)


#: A dense Granite 4.0-H layer's MLP: the shared MLP alone, gate and up in ``input_linear``.
GRANITE_SHARED_MLP_NAMES = {"mlp.gate_up_proj": "shared_mlp.input_linear", "mlp.down_proj": "shared_mlp.output_linear"}

_MAMBA2 = (
    Key("mamba_n_heads", default=128, check=positive_int),
    Key("mamba_n_groups", default=1, check=positive_int),
    Key("mamba_d_state", default=256, check=positive_int),
    Key("mamba_d_head", default="auto"),
    Key("mamba_d_conv", default=4, check=positive_int),
    Key("mamba_expand", default=2, check=positive_int),
    Key("mamba_conv_bias", default=True, check=boolean),
    Key("mamba_proj_bias", default=False, check=boolean),
    Key("time_step_limit", default=[0.0, float("inf")], check=_time_step_limit),
)


#: Nemotron-H's block kinds, as ``hybrid_override_pattern`` writes them and as transformers 5's layers_block_type
#: (and its legacy names) does -> (LayerSpec.mixer, LayerSpec.mlp): each block is one norm and one of these.
_NEMOTRON_H_BLOCKS = {"M": ("mamba2", "none"), "*": ("attention", "none"), "-": ("none", "plain"), "E": ("none", "moe")}
_NEMOTRON_H_NAMES = {"linear_attention": "M", "mamba": "M", "full_attention": "*", "attention": "*", "mlp": "-",
                     "moe": "E"}
#: Nemotron-H's modules: each block's one module is its ``mixer``, under one ``norm``; the final norm ``norm_f``.
NEMOTRON_H_STORED = {"embed_tokens": "embeddings", "norm": "norm_f", "input_layernorm": "norm",
                     **{f"self_attn.{p}": f"mixer.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
                     "mlp.up_proj": "mixer.up_proj", "mlp.down_proj": "mixer.down_proj"}


def _nemotron_h_pattern(raw: dict[str, Any]) -> str | None:
    """The block kinds as one pattern string: layers_block_type (or its alias layer_types), else
    hybrid_override_pattern, as transformers reads them; None where neither is a list of known kinds."""
    listed = raw.get("layers_block_type") or raw.get("layer_types")
    if isinstance(listed, list) and all(isinstance(t, str) and t in _NEMOTRON_H_NAMES for t in listed):
        return "".join(_NEMOTRON_H_NAMES[t] for t in listed)
    pattern = raw.get("hybrid_override_pattern")
    if listed is None and isinstance(pattern, str) and set(pattern) <= set(_NEMOTRON_H_BLOCKS):
        return pattern
    return None


def _block_list(value: Any) -> str | None:
    if value is None or isinstance(value, list) and all(t in _NEMOTRON_H_NAMES for t in value):
        return None
    return f"must list the blocks as {', '.join(map(repr, _NEMOTRON_H_NAMES))}, got {value!r}"


def _block_pattern(value: Any) -> str | None:
    if value is None or isinstance(value, str) and set(value) <= set(_NEMOTRON_H_BLOCKS):
        return None
    return f"must list the blocks as 'M' / '*' / '-' / 'E' (mamba, attention, mlp, moe), got {value!r}"


#: Read first, so that a list of unknown blocks is named before the layer count it leaves unknown.
_NEMOTRON_H_PATTERN = (Key("layers_block_type", check=_block_list), Key("layer_types", check=_block_list),
                       Key("hybrid_override_pattern", check=_block_pattern))


def _nemotron_h_layer_count(raw: dict[str, Any]) -> dict[str, Any]:
    """transformers counts Nemotron-H's layers by its block list (and saves no num_hidden_layers)."""
    pattern = _nemotron_h_pattern(raw)
    return raw if not pattern else {**raw, "num_hidden_layers": len(pattern)}


def _nemotron_h(r: KeyReader, sizes: Sizes) -> Architecture:
    """Nemotron-H / Nemotron Nano 2 / Nemotron 3 Nano: blocks of one RMSNorm and one module, a Mamba-2 mixer (its
    gated norm per group of heads), attention without rope, an ungated squared-ReLU MLP, or a mixture of ungated
    squared-ReLU experts (:func:`ferrum.moe.spec.nemotron_h_moe`), as the block pattern lists them."""
    pattern = _nemotron_h_pattern(r.raw)
    if pattern is None or len(pattern) != sizes.num_layers:
        r.fail("hybrid_override_pattern", "(or layers_block_type) must list the blocks as 'M' / '*' / '-' / 'E' "
                                          "(mamba, attention, mlp, moe)")
    limit = [float(_tagged_float(v)) for v in r("time_step_limit") or (0.0, float("inf"))]
    mamba = Mamba2Spec(r("mamba_num_heads"), r("mamba_head_dim"), r("n_groups"), r("ssm_state_size"),
                       r("conv_kernel"), (limit[0], limit[1]), conv_bias=r("use_conv_bias"), proj_bias=r("use_bias"),
                       module="mixer")
    if mamba.num_heads % mamba.num_groups:
        r.fail("n_groups", f"({mamba.num_groups}) must divide mamba_num_heads ({mamba.num_heads})")
    r("attention_bias"), r("mamba_hidden_act"), r("mlp_hidden_act")
    rope = Rope.unrotated(sizes.head_dim)
    arch = Architecture(
        layers=tuple(LayerSpec(None, rope, mixer=_NEMOTRON_H_BLOCKS[b][0], mlp=_NEMOTRON_H_BLOCKS[b][1])
                     for b in pattern),
        norms={"pre_attn": "input_layernorm"}, activation="relu2", attn_scale=1.0 / math.sqrt(sizes.head_dim),
        mlp_bias=bool(r("mlp_bias")), mamba2=mamba, keep_float32=(".A_log", ".dt_bias", ".D"),
        stored_names=NEMOTRON_H_STORED, layouts=(("backbone.", "lm_head.weight", {}),),
    )
    return nemotron_h_moe(r, arch) if "E" in pattern else arch


#: Mamba's and Falcon Mamba's modules: each block's ``mixer`` under one ``norm``; the embeddings and final norm
#: ``backbone.embeddings`` / ``backbone.norm_f``.
MAMBA_STORED = {"embed_tokens": "embeddings", "norm": "norm_f", "input_layernorm": "norm"}


def _mamba_inner(r: KeyReader, hidden: int) -> int:
    """The scan's channels: intermediate_size where the config gives it (the releases and mlx-lm read it), else
    ``expand * hidden_size`` (transformers computes it so)."""
    inner = r("intermediate_size")
    return r("expand") * hidden if inner is None else inner


def _dt_rank(r: KeyReader, key: str, hidden: int) -> int:
    """The step's rank: ``ceil(hidden_size / 16)`` where "auto"."""
    rank = r(key)
    if rank == "auto":
        return math.ceil(hidden / 16)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        r.fail(key, f'must be a positive integer or "auto", got {rank!r}')
    return rank


def _mamba(inner_norms: str | None) -> Callable[[KeyReader, Sizes], Architecture]:
    """Mamba / Falcon Mamba (``inner_norms`` "weightless": the step, B and C RMS-normed without weights): blocks of
    one RMSNorm and a Mamba-1 mixer (:mod:`ferrum.recurrent.mamba`), no attention, no MLP."""

    def build(r: KeyReader, sizes: Sizes) -> Architecture:
        h = sizes.hidden_size
        spec = MambaSpec(_mamba_inner(r, h), r("state_size"), r("conv_kernel"), _dt_rank(r, "time_step_rank", h),
                         conv_bias=r("use_conv_bias"), proj_bias=r("use_bias"), inner_norms=inner_norms,
                         norm_eps=float(r.get("mixer_rms_eps") or 1e-6))
        return Architecture(
            layers=tuple(LayerSpec(None, Rope.unrotated(sizes.head_dim), mixer="mamba", mlp="none")
                         for _ in range(sizes.num_layers)),
            norms={"pre_attn": "input_layernorm"}, mamba=spec, keep_float32=(".A_log", ".dt_bias", ".D"),
            stored_names=MAMBA_STORED, prefix="backbone.",
        )

    return build


_MAMBA = (
    Key("hidden_size", check=size(1 << 17)),
    Key("num_hidden_layers", check=size(1024)),
    Key("vocab_size", check=size(1 << 23)),
    Key("layer_norm_epsilon", check=optional_positive_number),
    Key("tie_word_embeddings", default=True, check=boolean),
    # no attention: one nominal head, no positions to bound the context (Ferrum's cap)
    Key("num_attention_heads", default=1, check=one_of(1)),
    Key("max_position_embeddings", default=1 << 20, check=size(1 << 28)),
    Key("intermediate_size", check=optional_size(1 << 20)),
    Key("expand", default=2, check=positive_int),
    Key("state_size", default=16, check=positive_int),
    Key("conv_kernel", default=4, check=positive_int),
    Key("time_step_rank", default="auto"),
    Key("use_conv_bias", default=True, check=boolean),
    Key("use_bias", default=False, check=boolean),
    Key("hidden_act", default="silu", check=one_of("silu"), unsupported=True),
    Key("rms_norm", default=True, check=one_of(True), unsupported=True),  # mamba_ssm's LayerNorm variant
)


def _jamba_layers(r: KeyReader, sizes: Sizes) -> list[str]:
    """Each layer's mixer: attention where ``i % attn_layer_period == attn_layer_offset``, else Mamba-1."""
    period, offset = r("attn_layer_period"), r("attn_layer_offset")
    if offset >= period:
        r.fail("attn_layer_offset", f"({offset}) must be below attn_layer_period ({period})")
    return ["attention" if i % period == offset else "mamba" for i in range(sizes.num_layers)]


#: Jamba's modules: the MLP is the layer's ``feed_forward``, the final norm ``final_layernorm``.
JAMBA_STORED = {"norm": "final_layernorm", "mlp.gate_proj": "feed_forward.gate_proj",
                "mlp.up_proj": "feed_forward.up_proj", "mlp.down_proj": "feed_forward.down_proj"}


def _jamba(r: KeyReader, sizes: Sizes) -> Architecture:
    """AI21's Jamba: Mamba-1 layers (the step, B and C RMS-normed with weights) and attention layers without rope
    (attn_layer_period / offset), each followed by a SwiGLU MLP or, every expert_layer_period-th from
    expert_layer_offset, Mixtral-style softmax experts whose top-k weights are not renormalized (:mod:`ferrum.moe`);
    num_experts 1 makes every layer dense."""
    h = sizes.hidden_size
    spec = MambaSpec(r("mamba_expand") * h, r("mamba_d_state"), r("mamba_d_conv"),
                     _dt_rank(r, "mamba_dt_rank", h), conv_bias=r("mamba_conv_bias"), proj_bias=r("mamba_proj_bias"),
                     inner_norms="weighted", norm_eps=sizes.rms_norm_eps, module="mamba")
    rope = Rope.unrotated(sizes.head_dim)
    arch = Architecture(
        layers=tuple(LayerSpec(None, rope, mixer=mixer) for mixer in _jamba_layers(r, sizes)),
        norms={"pre_attn": "input_layernorm", "pre_mlp": "pre_ff_layernorm"},
        attn_scale=1.0 / math.sqrt(sizes.head_dim), mamba=spec, keep_float32=(".A_log", ".dt_bias", ".D"),
        stored_names=JAMBA_STORED,
    )
    return arch if r("num_experts") == 1 else with_moe("jamba", lambda r, sizes: arch)(r, sizes)


_JAMBA = (
    Key("mamba_d_state", default=16, check=positive_int),
    Key("mamba_d_conv", default=4, check=positive_int),
    Key("mamba_expand", default=2, check=positive_int),
    Key("mamba_dt_rank", default="auto"),
    Key("mamba_conv_bias", default=True, check=boolean),
    Key("mamba_proj_bias", default=False, check=boolean),
    Key("attn_layer_period", default=8, check=positive_int),
    Key("attn_layer_offset", default=4, check=optional_non_negative_int),
    # Jamba-v0.1's remote code could leave out the step / B / C norms; transformers (and every release) has them
    Key("mamba_inner_layernorms", default=True, check=one_of(True), unsupported=True),
)


#: Bamba's and Falcon-H1's modules under Llama's names: the MLP is ``feed_forward``, the final norm
#: ``final_layernorm``; the block norms are ``input_layernorm`` and ``pre_ff_layernorm``.
FEED_FORWARD_NAMES = {"mlp.gate_proj": "feed_forward.gate_proj", "mlp.up_proj": "feed_forward.up_proj",
                      "mlp.down_proj": "feed_forward.down_proj", "norm": "final_layernorm"}
FEED_FORWARD_NORMS = {"pre_attn": "input_layernorm", "pre_mlp": "pre_ff_layernorm"}


def _attention_layers(r: KeyReader, sizes: Sizes, rope: Rope, mixers: list[str], norms: dict[str, str]) -> Architecture:
    """Llama's attention (biased where attention_bias), gated MLP and norms, each layer's mixer from ``mixers``."""
    r("hidden_act")
    bias = bool(r("attention_bias"))
    return Architecture(
        layers=tuple(LayerSpec(None, rope, mixer=mixer) for mixer in mixers), norms=norms,
        attn_scale=1.0 / math.sqrt(sizes.head_dim), qkv_bias=bias, o_bias=bias, mlp_bias=bool(r("mlp_bias")),
        keep_float32=(".A_log", ".dt_bias", ".D"), stored_names=FEED_FORWARD_NAMES)


def _bamba(r: KeyReader, sizes: Sizes) -> Architecture:
    """IBM's Bamba: Granite 4.0-H's Mamba-2 layers (``mamba``) with attention at attn_layer_indices, without
    multipliers or experts; rope turns the first half of each head's dims, whatever the config says, as
    transformers (which fixes partial_rotary_factor at 0.5) runs it."""
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, _LLAMA_ROPES, rotary_dim=sizes.head_dim // 2)
    attending = r("attn_layer_indices") or []
    if not isinstance(attending, list) or any(not isinstance(i, int) or isinstance(i, bool)
                                              or not 0 <= i < sizes.num_layers for i in attending):
        r.fail("attn_layer_indices", f"must list layer indices below num_hidden_layers ({sizes.num_layers}), "
                                     f"got {attending!r}")
    mixers = ["attention" if i in attending else "mamba2" for i in range(sizes.num_layers)]
    arch = _attention_layers(r, sizes, rope, mixers, FEED_FORWARD_NORMS)
    return replace(arch, mamba2=_mamba2_spec(r, sizes, "mamba"))


def _multiplier_list(count: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value is None or isinstance(value, list) and len(value) == count and not any(
                positive_number(v) for v in value):
            return None
        return f"must list {count} positive numbers, got {value!r}"

    return check


def _falcon_h1_mamba(r: KeyReader, sizes: Sizes) -> Mamba2Spec:
    """Falcon-H1's Mamba-2: mamba_d_ssm wide (else mamba_expand * hidden_size), its gated norm optional
    (mamba_rms_norm) and possibly before the gate (mamba_norm_before_gate), out_proj biased by projectors_bias."""
    heads, groups, head = r("mamba_n_heads"), r("mamba_n_groups"), r("mamba_d_head")
    inner = r("mamba_d_ssm") or r("mamba_expand") * sizes.hidden_size
    head = inner // heads if head == "auto" else head
    if not isinstance(head, int) or head <= 0 or head * heads != inner:
        r.fail("mamba_d_head", f"({head!r}) times mamba_n_heads ({heads}) must be mamba_d_ssm ({inner})")
    if heads % groups:
        r.fail("mamba_n_groups", f"({groups}) must divide mamba_n_heads ({heads})")
    r("mamba_chunk_size")  # the scan's chunk length in training kernels: the same numbers whatever it is
    limit = [float(_tagged_float(v)) for v in r("time_step_limit") or (0.0, float("inf"))]
    gate = "no_norm" if not r("mamba_rms_norm") else "after_norm" if r("mamba_norm_before_gate") else "before_norm"
    return Mamba2Spec(heads, head, groups, r("mamba_d_state"), r("mamba_d_conv"), (limit[0], limit[1]),
                      conv_bias=r("mamba_conv_bias"), proj_bias=r("mamba_proj_bias"), gate=gate,
                      out_bias=r("projectors_bias"))


def _other_than_one(scales: dict[str, tuple[Any, float]]) -> dict[str, tuple[Any, float]]:
    """``Architecture.scales`` entries that change something (a 1 leaves the weight as is)."""
    return {module: (rows, inputs) for module, (rows, inputs) in scales.items()
            if inputs != 1.0 or any(factor != 1.0 for factor in (rows if isinstance(rows, tuple) else (rows,)))}


def _falcon_h1(r: KeyReader, sizes: Sizes) -> Architecture:
    """TII's Falcon-H1: every layer attention and Mamba-2 side by side on the normed input (``LayerSpec.beside``),
    their outputs summed, then the gated MLP. Its muP multipliers are constants folded into the weights at load
    (``Architecture.scales``: exact, every one multiplies a projection's input or output): attention_in on q/k/v's
    input, key_multiplier on k, attention_out on o_proj, ssm_in on in_proj's input and ssm_multipliers on its
    five parts (z, x, B, C, dt), ssm_out on out_proj, mlp_multipliers on gate_proj and down_proj; the embedding
    and LM head multipliers scale the embeddings and the logits. mlx-lm's conversions fold some into the weights
    (``Architecture.converted``): every weight's but k_proj's key_multiplier and v_proj's attention_in (its
    ``key_proj`` rule names no module it has; v_proj it skips), and no bias's, so those are applied at load."""
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, _LLAMA_ROPES)
    r("partial_rotary_factor")
    mamba = _falcon_h1_mamba(r, sizes)
    arch = _attention_layers(r, sizes, rope, ["attention"] * sizes.num_layers, FEED_FORWARD_NORMS)
    ssm = [float(v) for v in r("ssm_multipliers") or [1.0] * 5]
    gate, down = (float(v) for v in r("mlp_multipliers") or [1.0, 1.0])
    attn_in, ssm_in = float(r("attention_in_multiplier")), float(r("ssm_in_multiplier"))
    groups = mamba.num_groups * mamba.state_size
    scales = {"self_attn.q_proj": (1.0, attn_in), "self_attn.k_proj": (float(r("key_multiplier")), attn_in),
              "self_attn.v_proj": (1.0, attn_in), "self_attn.o_proj": (float(r("attention_out_multiplier")), 1.0),
              "mamba.in_proj_z": (ssm[0], ssm_in),
              "mamba.in_proj_xbc": (tuple([ssm[1]] * mamba.inner + [ssm[2]] * groups + [ssm[3]] * groups), ssm_in),
              "mamba.in_proj_dt": (ssm[4], ssm_in), "mamba.out_proj": (float(r("ssm_out_multiplier")), 1.0),
              "mlp.gate_proj": (gate, 1.0), "mlp.down_proj": (down, 1.0)}
    scales = _other_than_one(scales)
    # mlx-lm's sanitize scales the weights alone: k_proj's and v_proj's input by attention_in (k's key_multiplier
    # left out), the other outputs by their multipliers; so the biases lack every output multiplier
    lacked = {"self_attn.k_proj": (float(r("key_multiplier")), 1.0), "self_attn.v_proj": (1.0, attn_in),
              **{f"{module}.bias": (rows, 1.0) for module, (rows, _) in scales.items()
                 if module not in ("self_attn.k_proj", "self_attn.v_proj")}}
    embedding, head = float(r("embedding_multiplier")), float(r("lm_head_multiplier"))
    # mlx-lm folds the embedding multiplier into the (tied) embeddings, so its tied head divides it back out
    converted = {"scales": _other_than_one(lacked), "embed_scale": None,
                 "logit_scale": head / embedding if sizes.tie_word_embeddings else 1.0}
    return replace(arch, layers=tuple(replace(layer, beside="mamba2") for layer in arch.layers), mamba2=mamba,
                   scales=scales, embed_scale=None if embedding == 1 else embedding, logit_scale=head,
                   converted=converted)


#: Mamba-2 checkpoints' modules (transformers' Mamba2ForCausalLM), as Nemotron-H's: each block one ``norm`` and
#: one ``mixer``, the embeddings ``embeddings`` (``embedding`` in the first releases), the final norm ``norm_f``.
MAMBA2_STORED = {"embed_tokens": "embeddings", "norm": "norm_f", "input_layernorm": "norm"}


def _mamba2(r: KeyReader, sizes: Sizes) -> Architecture:
    """Pure Mamba-2 (state-spaces' mamba2-*, Mamba-Codestral): every block an RMSNorm and a Mamba-2 mixer, no
    attention and no MLP. The residual stream stays in the compute dtype (residual_in_fp32 changes precision,
    not the math)."""
    heads, head, groups = r("num_heads"), r("head_dim"), r("n_groups")
    if heads * head != r("expand") * sizes.hidden_size:
        r.fail("num_heads", f"({heads}) times head_dim ({head}) must be expand * hidden_size "
                            f"({r('expand') * sizes.hidden_size})")
    if heads % groups:
        r.fail("n_groups", f"({groups}) must divide num_heads ({heads})")
    r("hidden_act"), r("residual_in_fp32")
    limit = [float(_tagged_float(v)) for v in r("time_step_limit") or (0.0, float("inf"))]
    state = r("state_size") if r("ssm_state_size") is None else r("ssm_state_size")
    mamba = Mamba2Spec(heads, head, groups, state, r("conv_kernel"), (limit[0], limit[1]),
                       conv_bias=r("use_conv_bias"), proj_bias=r("use_bias"), module="mixer")
    rope = Rope.unrotated(sizes.head_dim)
    return Architecture(
        layers=tuple(LayerSpec(None, rope, mixer="mamba2", mlp="none") for _ in range(sizes.num_layers)),
        norms={"pre_attn": "input_layernorm"}, mamba2=mamba, keep_float32=(".A_log", ".dt_bias", ".D"),
        stored_names=MAMBA2_STORED, prefix="backbone.",
        layouts=(("backbone.", "lm_head.weight", {"embed_tokens": "embedding"}),),
    )


#: LFM2's layer types -> the mixer each runs (LayerSpec.mixer).
_LFM2_MIXERS = {"conv": "short_conv", FULL: "attention"}
LFM2_NORMS = {"pre_attn": "operator_norm", "pre_mlp": "ffn_norm"}
#: LFM2's modules under Llama's names; its final norm is stored as ``embedding_norm``, its convolutions' taps as
#: ``conv.conv`` (the recurrent mixers' ``conv1d``).
LFM2_NAMES = {"self_attn.o_proj": "self_attn.out_proj", "mlp.gate_proj": "feed_forward.w1",
              "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2", "norm": "embedding_norm",
              "conv.conv1d": "conv.conv"}


def _lfm2_mixers(r: KeyReader, sizes: Sizes) -> list[str]:
    """Each layer's mixer from layer_types, else from full_attn_idxs, else every layer attends (transformers); where
    a config gives both, mlx-lm reads full_attn_idxs, so the two must agree."""
    n, types, attending = sizes.num_layers, r("layer_types"), r("full_attn_idxs")
    from_indices = None
    if attending is not None:
        if not isinstance(attending, list) or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n
                                                  for i in attending):
            r.fail("full_attn_idxs", f"must list layer indices in [0, {n}), got {attending!r}")
        from_indices = [FULL if i in attending else "conv" for i in range(n)]
    if types is None:
        types = from_indices or [FULL] * n
    if not isinstance(types, list) or len(types) != n or any(t not in _LFM2_MIXERS for t in types):
        r.fail("layer_types", f"must list {n} entries of 'conv' / {FULL!r}, got {types!r}")
    if from_indices is not None and from_indices != types:
        r.fail("full_attn_idxs", f"is {attending!r}, but layer_types attends at "
                                 f"{[i for i, t in enumerate(types) if t == FULL]} (transformers reads layer_types, "
                                 "mlx-lm full_attn_idxs); make them agree")
    return [_LFM2_MIXERS[t] for t in types]


def _lfm2_sizes(r: KeyReader, sizes: Sizes) -> Sizes:
    """LFM2's feed-forward width as its MLP sizes it: block_ff_dim (else intermediate_size); with
    block_auto_adjust_ff_dim, two thirds of that, times block_ffn_dim_multiplier and rounded up to a multiple of
    block_multiple_of (transformers rounds only where a multiplier is set, as here); LFM2-MoE, which declares none
    of these keys, takes intermediate_size as it is. tie_embedding, where set, is tie_word_embeddings."""
    width = r.get("block_ff_dim")
    width = sizes.intermediate_size if width is None else width
    if r.get("block_auto_adjust_ff_dim"):
        width = int(2 * width / 3)
        multiplier = r("block_ffn_dim_multiplier")
        if multiplier is not None:
            step = r("block_multiple_of")
            width = step * ((int(multiplier * width) + step - 1) // step)
    tie = r("tie_embedding")
    tie = sizes.tie_word_embeddings if tie is None else tie
    return replace(sizes, intermediate_size=width, tie_word_embeddings=tie)


def _lfm2(r: KeyReader, sizes: Sizes) -> Architecture:
    """Liquid AI's LFM2 / LFM2.5: gated short-convolution layers (:mod:`ferrum.recurrent.short_conv`) between
    attention layers that RMS-norm each q/k head before rope, Llama's SwiGLU MLP (``feed_forward.w1 / w3 / w2``),
    and a final norm named ``embedding_norm`` (it norms the last block's output, not the embeddings)."""
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, _LLAMA_ROPES)
    return Architecture(
        layers=tuple(LayerSpec(None, rope, mixer=m) for m in _lfm2_mixers(r, sizes)),
        norms=LFM2_NORMS,
        attn_scale=1.0 / math.sqrt(sizes.head_dim),
        qk_norm="head",
        qk_norm_names=("q_layernorm", "k_layernorm"),
        short_conv=ShortConvSpec(sizes.hidden_size, r("conv_L_cache")),
        stored_names=LFM2_NAMES,
    )


#: mlx-lm's conversions of LFM2-MoE: its dense MLPs' w1 / w3 / w2 renamed (the experts' too, then stacked).
LFM2_MOE_MLX_LM_NAMES = {"mlp.gate_proj": "feed_forward.gate_proj", "mlp.up_proj": "feed_forward.up_proj",
                         "mlp.down_proj": "feed_forward.down_proj"}


def _lfm2_moe(r: KeyReader, sizes: Sizes) -> Architecture:
    """LFM2-MoE (LFM2-8B-A1B): LFM2's layers over sparse MLPs (:func:`ferrum.moe.spec.with_moe`), its dense MLPs of
    intermediate_size as transformers sizes them (no LFM2 block_* rounding)."""
    arch = with_moe("lfm2_moe", _lfm2)(r, sizes)
    return replace(arch, layouts=(("model.", "lm_head.weight", LFM2_MOE_MLX_LM_NAMES),))


_LFM2_LAYERS = (
    Key("layer_types"),
    Key("full_attn_idxs"),
    Key("conv_L_cache", default=3, check=size(64)),
    Key("conv_bias", default=False, check=falsy("no LFM2 release biases its convolutions; set it to false"),
        unsupported=True),
    Key("tie_embedding", check=boolean),
)
_LFM2 = (
    Key("block_ff_dim", check=optional_size(1 << 20)),
    Key("block_auto_adjust_ff_dim", default=True, check=boolean),
    Key("block_ffn_dim_multiplier", default=1.0, check=optional_positive_number),
    Key("block_multiple_of", default=256, check=positive_int),
)


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


#: transformers' names of the ungated MLP's activations: the tanh approximation of GELU, or the exact one.
_GELU_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                     "gelu": "gelu"}
#: The rope scalings the LayerNorm families' configs may ask for.
_LAYER_NORM_ROPES = ("default", "linear", "dynamic")
#: Phi-1 / 1.5 / 2's modules under Llama's names.
PHI_NAMES = {"self_attn.o_proj": "self_attn.dense", "mlp.up_proj": "mlp.fc1", "mlp.down_proj": "mlp.fc2",
             "norm": "final_layernorm"}


def _gelu_activation(r: KeyReader) -> str:
    return _GELU_ACTIVATIONS[r("hidden_act")]


def _phi(r: KeyReader, sizes: Sizes) -> Architecture:
    """Phi-1 / 1.5 / 2: one LayerNorm feeding attention and an ungated GELU MLP side by side (a parallel block),
    every projection and the LM head biased, rope on partial_rotary_factor (0.5) of each head; qk_layernorm
    adds a LayerNorm per head dimension to q and k."""
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, _LAYER_NORM_ROPES, rotary_dim=_rotary_dim(r, sizes, spec, 0.5))
    return Architecture(
        layers=tuple(LayerSpec(None, rope, mlp="plain") for _ in range(sizes.num_layers)),
        norms={"pre_attn": "input_layernorm"}, norm="layer", norm_bias=True, parallel=True,
        activation=_gelu_activation(r), attn_scale=1.0 / math.sqrt(sizes.head_dim),
        qk_norm="head" if r("qk_layernorm") else None, qk_norm_names=("q_layernorm", "k_layernorm"),
        qkv_bias=True, o_bias=True, mlp_bias=True, lm_head_bias=True, stored_names=PHI_NAMES,
    )


def _stablelm(r: KeyReader, sizes: Sizes) -> Architecture:
    """StableLM (3B 4E1T, 2 1.6B, 2 12B): Llama's blocks with biased LayerNorms, q/k/v biased by use_qkv_bias,
    rope on partial_rotary_factor (0.25) of each head; use_parallel_residual puts attention and the MLP side by
    side after the one norm; qk_layernorm adds a LayerNorm (no bias) per head to q and k."""
    if sizes.head_dim * sizes.num_heads != sizes.hidden_size:
        r.fail("head_dim", f"is {sizes.head_dim}, but StableLM splits hidden_size ({sizes.hidden_size}) among its "
                           f"{sizes.num_heads} heads; leave head_dim out")
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, _LAYER_NORM_ROPES, rotary_dim=_rotary_dim(r, sizes, spec, 0.25))
    r("hidden_act")
    parallel = r("use_parallel_residual")
    return Architecture(
        layers=tuple(LayerSpec(None, rope) for _ in range(sizes.num_layers)),
        norms={"pre_attn": "input_layernorm"} if parallel else LLAMA_NORMS, norm="layer", norm_bias=True,
        parallel=parallel, attn_scale=1.0 / math.sqrt(sizes.head_dim), qkv_bias=r("use_qkv_bias"),
        qk_norm="each_head" if r("qk_layernorm") else None, qk_norm_names=("q_layernorm", "k_layernorm"),
        qk_norm_split=True,
    )


def _starcoder2(r: KeyReader, sizes: Sizes) -> Architecture:
    """StarCoder2: Llama's blocks with biased LayerNorms, every projection biased by use_bias, an ungated GELU
    MLP (c_fc, c_proj), and sliding_window on every layer."""
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, _LAYER_NORM_ROPES)
    bias = r("use_bias")
    return Architecture(
        layers=tuple(LayerSpec(w, rope, mlp="plain") for w in _every_layer_window(r, sizes)),
        norms=LLAMA_NORMS, norm="layer", norm_bias=True, activation=_gelu_activation(r),
        attn_scale=1.0 / math.sqrt(sizes.head_dim), qkv_bias=bias, o_bias=bias, mlp_bias=bias,
        stored_names={"mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"},
    )


#: The ungated MLP's activations by transformers' names: GELU's, and the squared ReLU of Nemotron and Arcee.
_UNGATED_ACTIVATIONS = {**_GELU_ACTIVATIONS, "relu2": "relu2"}


def _ungated_key(default: str) -> Key:
    return Key("hidden_act", default=default, check=one_of(*_UNGATED_ACTIVATIONS), unsupported=True)


def _nemotron(r: KeyReader, sizes: Sizes) -> Architecture:
    """Nemotron (Nemotron-3, Minitron, Nemotron-Mini): Llama's blocks with LayerNorm1P (biased LayerNorms scaling by
    ``1 + w``), an ungated MLP (squared ReLU by default), rope on partial_rotary_factor (0.5) of each head,
    attention_bias on every attention projection and mlp_bias on the MLP."""
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, _LLAMA_ROPES, rotary_dim=_rotary_dim(r, sizes, spec, 0.5))
    bias = r("attention_bias")
    return Architecture(
        layers=tuple(LayerSpec(None, rope, mlp="plain") for _ in range(sizes.num_layers)),
        norms=LLAMA_NORMS, norm="layer", norm_bias=True, norm_offset=1.0,
        activation=_UNGATED_ACTIVATIONS[r("hidden_act")], attn_scale=1.0 / math.sqrt(sizes.head_dim),
        qkv_bias=bias, o_bias=bias, mlp_bias=r("mlp_bias"),
    )


def _arcee(r: KeyReader, sizes: Sizes) -> Architecture:
    """Arcee AFM: Llama's blocks with Nemotron's ungated MLP (up_proj, down_proj; squared ReLU by default)."""
    arch = _llama_like(False, None, _no_windows)(r, sizes)
    return replace(arch, layers=tuple(replace(layer, mlp="plain") for layer in arch.layers),
                   activation=_UNGATED_ACTIVATIONS[r("hidden_act")])


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
    heads and sinks, the full layers' heads repeated at load (``LayerSpec.stored_kv_heads``) and without sinks; the
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
        layers=tuple(LayerSpec(window, sliding) if kind == SLIDING else LayerSpec(None, full, stored_kv_heads=kv,
                                                                                 sinks=False) for kind in types),
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


#: nanochat's modules under Llama's names: transformers' (fc1, fc2), and mlx-lm's (nanochat's own: the decoder under
#: ``transformer.``, ``wte``, ``h.N.attn.c_q``..., ``mlp.c_fc`` / ``c_proj``).
NANOCHAT_NAMES = {"mlp.up_proj": "mlp.fc1", "mlp.down_proj": "mlp.fc2"}
NANOCHAT_MLX_LM_NAMES = {"embed_tokens": "wte", "layers": "h", "self_attn.q_proj": "attn.c_q",
                         "self_attn.k_proj": "attn.c_k", "self_attn.v_proj": "attn.c_v",
                         "self_attn.o_proj": "attn.c_proj", "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}
#: mlx-lm's nanochat norms with this epsilon, whatever config.json says (transformers' default is 1e-6); the configs
#: of its conversions, written for its ModelArgs, give none. Ferrum takes it for checkpoints in mlx-lm's layout whose
#: config gives no rms_norm_eps.
NANOCHAT_MLX_LM_EPS = 1e-5


def _nanochat(r: KeyReader, sizes: Sizes) -> Architecture:
    """Karpathy's nanochat (transformers' NanoChatForCausalLM): Llama's pre-norm blocks with RMSNorms that have no
    weight, the embeddings normed too before the first block, rope turning the other way (rotate_half as
    ``cat(x2, -x1)``: frequencies negated) and q and k RMS-normed (no weight either) once rotated, an ungated MLP
    (fc1, fc2; squared ReLU by default), attention_bias on q/k/v and o, the logits soft-capped
    (final_logit_softcapping, 15), an untied LM head. mlx-lm's conversions keep nanochat's own names, and norm
    with 1e-5 (:data:`NANOCHAT_MLX_LM_EPS`) where a config gives no rms_norm_eps."""
    key, spec = _rope_spec(r)
    rope = replace(read_rope(r, sizes, spec, key, _LLAMA_ROPES), negated=True)
    bias = r("attention_bias")
    mlx_lm_eps = None if r.get("rms_norm_eps") is not None else NANOCHAT_MLX_LM_EPS
    return Architecture(
        layers=tuple(LayerSpec(None, rope, mlp="plain") for _ in range(sizes.num_layers)),
        norms=LLAMA_NORMS, norm_params=False, embed_norm=True,
        activation=_UNGATED_ACTIVATIONS[r("hidden_act")], attn_scale=1.0 / math.sqrt(sizes.head_dim),
        qk_norm="head", qk_norm_after_rope=True, qk_norm_params=False,
        qkv_bias=bias, o_bias=bias, final_softcap=r("final_logit_softcapping"),
        stored_names=NANOCHAT_NAMES,
        layouts=(("transformer.", "lm_head.weight", NANOCHAT_MLX_LM_NAMES, mlx_lm_eps),),
    )


#: Apertus's two norms, under its names.
APERTUS_NORMS = {"pre_attn": "attention_layernorm", "pre_mlp": "feedforward_layernorm"}
#: transformers' Apertus rope where a config gives none (rope_theta included: a top-level one is not read then).
_APERTUS_ROPE = {"rope_type": "llama3", "rope_theta": 12_000_000.0, "factor": 8.0,
                 "original_max_position_embeddings": 8192, "low_freq_factor": 1.0, "high_freq_factor": 4.0}


def _apertus(r: KeyReader, sizes: Sizes) -> Architecture:
    """Swiss AI's Apertus: Llama's blocks under its own norm names, per-head q/k RMSNorms before rope (Qwen 3's),
    attention_bias on every attention projection, and an ungated MLP (up_proj, down_proj; never biased, whatever
    mlp_bias says, as transformers builds it) whose xIELU activation learns its slopes per layer."""
    arch = _llama_like(False, "head", _no_windows, norms=APERTUS_NORMS)(r, sizes)
    return replace(arch, layers=tuple(replace(layer, mlp="plain") for layer in arch.layers),
                   activation=_APERTUS_ACTIVATIONS[r("hidden_act")], mlp_bias=False)


#: Apertus's activations: xIELU, or another ungated one transformers' ApertusMLP takes by name.
_APERTUS_ACTIVATIONS = {"xielu": "xielu", **_UNGATED_ACTIVATIONS}


def _cohere_blocks(r: KeyReader, sizes: Sizes, ropes: list[Rope], windows: list) -> Architecture:
    """Command R's blocks: one LayerNorm without a bias feeding attention and the MLP side by side, GPT-J's rope
    (adjacent dims paired), attention_bias on every attention projection, logits scaled by logit_scale; with
    use_qk_norm (Command R+) q and k LayerNormed head by head, with a weight per head."""
    r("hidden_act")
    bias = r("attention_bias")
    return Architecture(
        layers=tuple(LayerSpec(w, replace(rope, interleaved=True)) for w, rope in zip(windows, ropes)),
        norms={"pre_attn": "input_layernorm"}, norm="layer", parallel=True, attn_scale=1.0 / math.sqrt(sizes.head_dim),
        logit_scale=float(r("logit_scale")), qkv_bias=bias, o_bias=bias,
        qk_norm="each_head" if r("use_qk_norm") else None,
    )


def _cohere(r: KeyReader, sizes: Sizes) -> Architecture:
    """Command R (v01, 08-2024), Command R+."""
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, _LAYER_NORM_ROPES)
    return _cohere_blocks(r, sizes, [rope] * sizes.num_layers, [None] * sizes.num_layers)


def _cohere2(r: KeyReader, sizes: Sizes) -> Architecture:
    """Command R7B, Command A: Command R's blocks, three sliding layers with rope to one full layer without (NoPE),
    unless layer_types says otherwise. Its heads split hidden_size: transformers ignores a head_dim."""
    if sizes.head_dim * sizes.num_heads != sizes.hidden_size:
        r.fail("head_dim", f"is {sizes.head_dim}, but Cohere 2 splits hidden_size ({sizes.hidden_size}) among its "
                           f"{sizes.num_heads} heads; leave head_dim out")
    pattern = r("sliding_window_pattern")
    window, types = _layer_kinds(r, sizes, lambda i: SLIDING if (i + 1) % pattern else FULL)
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, _LAYER_NORM_ROPES)
    return _cohere_blocks(r, sizes, [rope if t == SLIDING else Rope.unrotated(sizes.head_dim) for t in types],
                          [window if t == SLIDING else None for t in types])


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


_COHERE = (
    Key("hidden_act", default="silu", check=one_of("silu"), unsupported=True),
    Key("attention_bias", default=False, check=boolean),
    Key("logit_scale", default=0.0625, check=positive_number),
    Key("use_qk_norm", default=False, check=boolean),
)


#: GPT-NeoX's modules under Llama's names.
GPT_NEOX_NAMES = {"embed_tokens": "embed_in", "norm": "final_layer_norm",
                  "self_attn.qkv_proj": "attention.query_key_value", "self_attn.o_proj": "attention.dense",
                  "mlp.up_proj": "mlp.dense_h_to_4h", "mlp.down_proj": "mlp.dense_4h_to_h"}


def _gpt_neox(r: KeyReader, sizes: Sizes) -> Architecture:
    """GPT-NeoX (Pythia, RedPajama-INCITE, Dolly 2): q/k/v in one matrix grouped by head, rope on rotary_pct
    (0.25) of each head from rotary_emb_base, biased LayerNorms and projections, an ungated GELU MLP; with
    use_parallel_residual (the default) attention and the MLP read the block input through their own norms."""
    if sizes.head_dim * sizes.num_heads != sizes.hidden_size or sizes.num_kv_heads != sizes.num_heads:
        r.fail("head_dim" if sizes.head_dim * sizes.num_heads != sizes.hidden_size else "num_key_value_heads",
               "GPT-NeoX attends with num_attention_heads heads of hidden_size / num_attention_heads; leave it out")
    key, spec = _rope_spec(r)
    theta = r("rotary_emb_base")
    rope = read_rope(r, sizes, spec, key, _LAYER_NORM_ROPES, theta_default=10000.0 if theta is None else theta,
                     rotary_dim=_rotary_dim(r, sizes, spec, 0.25, beside="rotary_pct"))
    bias = r("attention_bias")
    return Architecture(
        layers=tuple(LayerSpec(None, rope, mlp="plain") for _ in range(sizes.num_layers)),
        norms=LLAMA_NORMS, norm="layer", norm_bias=True, parallel=r("use_parallel_residual"),
        activation=_gelu_activation(r), attn_scale=1.0 / math.sqrt(sizes.head_dim), qkv_bias=bias, o_bias=bias,
        mlp_bias=True, fused_qkv=True, qkv_grouped=True, prefix="gpt_neox.", lm_head="embed_out.weight",
        stored_names=GPT_NEOX_NAMES, layouts=(("model.", "model.embed_out.weight", {"layers": "h"}),),
    )


#: GPT-2's modules, and its config's keys for the sizes, under Llama's names.
GPT2_NAMES = {"layers": "h", "embed_tokens": "wte", "embed_positions": "wpe", "norm": "ln_f",
              "self_attn.qkv_proj": "attn.c_attn", "self_attn.o_proj": "attn.c_proj",
              "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}
GPT2_CONFIG_NAMES = {"hidden_size": "n_embd", "intermediate_size": "n_inner", "num_hidden_layers": "n_layer",
                     "num_attention_heads": "n_head", "max_position_embeddings": "n_positions"}


def _gpt2_blocks(r: KeyReader, sizes: Sizes) -> Architecture:
    """GPT-2's blocks: learned positions added to the token embeddings (no rope), q/k/v in one matrix, every
    projection biased, an ungated GELU MLP, biased LayerNorms."""
    return Architecture(
        layers=tuple(LayerSpec(None, Rope.unrotated(sizes.head_dim), mlp="plain") for _ in range(sizes.num_layers)),
        norms={"pre_attn": "ln_1", "pre_mlp": "ln_2"}, norm="layer", norm_bias=True,
        activation=_GELU_ACTIVATIONS[r("activation_function")],
        attn_scale=1.0 / math.sqrt(sizes.head_dim) if r("scale_attn_weights") else 1.0,
        qkv_bias=True, o_bias=True, mlp_bias=True, fused_qkv=True, position_embedding=True,
        prefix="transformer.", stored_names=GPT2_NAMES,
    )


def _gpt2(r: KeyReader, sizes: Sizes) -> Architecture:
    """GPT-2: its blocks with every projection stored transposed (its Conv1D); scale_attn_by_inverse_layer_idx
    (Stanford CRFM's GPT-2s) divides layer i's attention scale by i + 1."""
    arch = replace(_gpt2_blocks(r, sizes), transposed=True)
    if not r("scale_attn_by_inverse_layer_idx"):
        return arch
    return replace(arch, layers=tuple(replace(layer, attn_scale=arch.attn_scale / (i + 1))
                                      for i, layer in enumerate(arch.layers)))


def _gpt_bigcode(r: KeyReader, sizes: Sizes) -> Architecture:
    """GPT-BigCode (StarCoder, SantaCoder): GPT-2's blocks, projections stored as Linear, q/k/v grouped by
    key/value head (multi_query: one group, the queries then one key and one value)."""
    return replace(_gpt2_blocks(r, sizes), qkv_grouped=True)


#: GPT-J's modules under Llama's names.
GPTJ_NAMES = {"layers": "h", "embed_tokens": "wte", "norm": "ln_f", "self_attn.q_proj": "attn.q_proj",
              "self_attn.k_proj": "attn.k_proj", "self_attn.v_proj": "attn.v_proj", "self_attn.o_proj": "attn.out_proj",
              "mlp.up_proj": "mlp.fc_in", "mlp.down_proj": "mlp.fc_out"}


def _gptj(r: KeyReader, sizes: Sizes) -> Architecture:
    """GPT-J: one LayerNorm feeding attention and an ungated GELU MLP side by side, GPT-J's rope (adjacent pairs)
    on the first rotary_dim dims of each head, unbiased attention, a biased LM head."""
    rotary = r("rotary_dim") or sizes.head_dim
    if rotary > sizes.head_dim or rotary % 2:
        r.fail("rotary_dim", f"is {rotary}; it must be even and at most the head size, {sizes.head_dim}")
    rope = Rope(theta=10000.0, head_dim=sizes.head_dim, rotary_dim=rotary, interleaved=True)
    return Architecture(
        layers=tuple(LayerSpec(None, rope, mlp="plain") for _ in range(sizes.num_layers)),
        norms={"pre_attn": "ln_1"}, norm="layer", norm_bias=True, parallel=True,
        activation=_GELU_ACTIVATIONS[r("activation_function")], attn_scale=1.0 / math.sqrt(sizes.head_dim),
        mlp_bias=True, lm_head_bias=True, prefix="transformer.", stored_names=GPTJ_NAMES,
    )


def _renamed_core(names: dict[str, str], tie_default: bool, positions_default: int) -> tuple[Key, ...]:
    """The sizes' keys under a family's own ``names`` (usual key -> the family's), the MLP's width optional (None:
    4 x the hidden size), the context as transformers defaults it (older configs leave it out), and the norms'
    epsilon as GPT-2 and Falcon name it."""
    def key(usual: str) -> str:
        return names.get(usual, usual)

    return (
        Key(key("hidden_size"), check=size(1 << 17)),
        Key(key("intermediate_size"), check=optional_size(1 << 20)),
        Key(key("num_hidden_layers"), check=size(1024)),
        Key(key("num_attention_heads"), check=size(4096)),
        Key("vocab_size", check=size(1 << 23)),
        Key(key("max_position_embeddings"), default=positions_default, check=size(1 << 28)),
        Key("layer_norm_epsilon", check=optional_positive_number),
        Key("tie_word_embeddings", default=tie_default, check=boolean),
    )


#: Falcon's modules under Llama's names.
FALCON_NAMES = {"layers": "h", "embed_tokens": "word_embeddings", "norm": "ln_f",
                "self_attn.qkv_proj": "self_attention.query_key_value", "self_attn.o_proj": "self_attention.dense",
                "mlp.up_proj": "mlp.dense_h_to_4h", "mlp.down_proj": "mlp.dense_4h_to_h"}


FALCON_CONFIG_NAMES = {"intermediate_size": "ffn_hidden_size"}


def _falcon_kv_heads(r: KeyReader, heads: int) -> int:
    """Falcon's key/value heads: num_kv_heads (every head by default) in the new decoder architecture; before it,
    one with multi_query, else one per head (its q/k/v matrix holds three of each)."""
    if r("new_decoder_architecture"):
        return r("num_kv_heads") or heads
    return 1 if r("multi_query") else heads


def _falcon(r: KeyReader, sizes: Sizes) -> Architecture:
    """Falcon (7B, 40B, 180B, RW): q/k/v in one matrix grouped by key/value head, an ungated GELU MLP, biased
    LayerNorms, projections biased by ``bias``; with parallel_attn attention and the MLP read the block input
    side by side, through one norm or (num_ln_in_parallel_attn 2, the new decoder architecture) two."""
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, _LAYER_NORM_ROPES)
    lns = r("num_ln_in_parallel_attn") or (2 if r("new_decoder_architecture") else 1)
    if not r("parallel_attn"):
        norms = LLAMA_NORMS
    elif lns == 2 and r("new_decoder_architecture"):
        norms = {"pre_attn": "ln_attn", "pre_mlp": "ln_mlp"}
    elif lns == 1:
        norms = {"pre_attn": "input_layernorm"}
    else:
        r.fail("num_ln_in_parallel_attn", f"is {lns}; two norms run only with new_decoder_architecture, and a "
                                          "block has one or two")
    bias = r("bias")
    return Architecture(
        layers=tuple(LayerSpec(None, rope, mlp="plain") for _ in range(sizes.num_layers)),
        norms=norms, norm="layer", norm_bias=True, parallel=r("parallel_attn"),
        activation=_GELU_ACTIVATIONS[r("activation")], attn_scale=1.0 / math.sqrt(sizes.head_dim),
        qkv_bias=bias, o_bias=bias, mlp_bias=bias, fused_qkv=True, qkv_grouped=True,
        prefix="transformer.", stored_names=FALCON_NAMES,
    )


#: GPT-Neo's modules, and its config's keys for the sizes, under Llama's names.
GPT_NEO_NAMES = {"layers": "h", "embed_tokens": "wte", "embed_positions": "wpe", "norm": "ln_f",
                 "self_attn.q_proj": "attn.attention.q_proj", "self_attn.k_proj": "attn.attention.k_proj",
                 "self_attn.v_proj": "attn.attention.v_proj", "self_attn.o_proj": "attn.attention.out_proj",
                 "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}
GPT_NEO_CONFIG_NAMES = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads"}


def _gpt_neo_kinds(r: KeyReader, sizes: Sizes) -> list[str]:
    """Each layer's attention kind from attention_types, ``[[kinds, repeat], ...]`` (GPT-Neo's expansion)."""
    types = r("attention_types")
    try:
        kinds = [kind for group, repeat in types for _ in range(repeat) for kind in group]
    except (TypeError, ValueError):
        r.fail("attention_types", f"must be a list of [[kind, ...], repeat] pairs, got {types!r}")
    unknown = sorted(set(map(str, kinds)) - {"global", "local"})
    if unknown:
        r.fail("attention_types", f"names {unknown}; GPT-Neo's layers are 'global' or 'local'", unsupported=True)
    if len(kinds) != sizes.num_layers:
        r.fail("attention_types", f"gives {len(kinds)} layers, but num_layers is {sizes.num_layers}")
    return kinds


def _gpt_neo(r: KeyReader, sizes: Sizes) -> Architecture:
    """GPT-Neo (125M-2.7B): GPT-2's blocks with learned positions, unbiased q/k/v and a biased out_proj, its
    layers global or local (a window of window_size tokens, the query's own included) by attention_types, and
    scores never scaled by 1/sqrt(head_dim)."""
    window = r("window_size")
    return Architecture(
        layers=tuple(LayerSpec(window if kind == "local" else None, Rope.unrotated(sizes.head_dim), mlp="plain")
                     for kind in _gpt_neo_kinds(r, sizes)),
        norms={"pre_attn": "ln_1", "pre_mlp": "ln_2"}, norm="layer", norm_bias=True,
        activation=_GELU_ACTIVATIONS[r("activation_function")], attn_scale=1.0, o_bias=True, mlp_bias=True,
        position_embedding=True, prefix="transformer.", stored_names=GPT_NEO_NAMES,
    )


#: fairseq's decoder layers (OPT, BioGPT, XGLM) under Llama's names; their final norm is the family's.
FAIRSEQ_NAMES = {"self_attn.o_proj": "self_attn.out_proj", "mlp.up_proj": "fc1", "mlp.down_proj": "fc2"}
FAIRSEQ_NORMS = {"pre_attn": "self_attn_layer_norm", "pre_mlp": "final_layer_norm"}
#: OPT names its layers' pre-MLP norm as its decoder's final norm (``final_layer_norm``): the slot is named "norm"
#: as the final one is, so that one stored name stands for one name of Llama's.
OPT_NAMES = {**FAIRSEQ_NAMES, "norm": "final_layer_norm"}
OPT_CONFIG_NAMES = {"intermediate_size": "ffn_dim"}
_OPT_ACTIVATIONS = {"relu": "relu", **_GELU_ACTIVATIONS}


def _opt(r: KeyReader, sizes: Sizes) -> Architecture:
    """OPT (125M-66B, Galactica): fairseq's pre-norm blocks, learned positions two rows in, an ungated ReLU MLP (fc1,
    fc2), every projection biased by enable_bias, LayerNorms with or without parameters
    (layer_norm_elementwise_affine). Releases saved as OPTModel store the decoder under ``decoder.``. OPT-350m's
    post-norm blocks and embedding projections are refused (do_layer_norm_before, word_embed_proj_dim)."""
    projected = r("word_embed_proj_dim")
    if projected not in (None, sizes.hidden_size):
        r.fail("word_embed_proj_dim", f"is {projected}, not hidden_size ({sizes.hidden_size}): OPT-350m's "
                                      "project_in / project_out are not supported; use another OPT size", True)
    affine, bias = r("layer_norm_elementwise_affine"), r("enable_bias")
    r("do_layer_norm_before")
    r("_remove_final_layer_norm")
    return Architecture(
        layers=tuple(LayerSpec(None, Rope.unrotated(sizes.head_dim), mlp="plain") for _ in range(sizes.num_layers)),
        norms={"pre_attn": "self_attn_layer_norm", "pre_mlp": "norm"}, norm="layer", norm_bias=affine,
        norm_params=affine, activation=_OPT_ACTIVATIONS[r("activation_function")],
        attn_scale=1.0 / math.sqrt(sizes.head_dim), qkv_bias=bias, o_bias=bias, mlp_bias=bias,
        position_embedding=True, position_offset=2, prefix="model.decoder.", stored_names=OPT_NAMES,
        layouts=(("decoder.", "lm_head.weight", {}),),
    )


def _fairseq_blocks(r: KeyReader, sizes: Sizes, activation: str) -> Architecture:
    """BioGPT's and XGLM's blocks: fairseq's pre-norm layers, every projection biased, an ungated GELU MLP, the final
    norm ``layer_norm``, learned positions two rows in, the token embeddings scaled by sqrt(hidden_size) with
    scale_embedding (before the positions join them)."""
    return Architecture(
        layers=tuple(LayerSpec(None, Rope.unrotated(sizes.head_dim), mlp="plain") for _ in range(sizes.num_layers)),
        norms=FAIRSEQ_NORMS, norm="layer", norm_bias=True, activation=_GELU_ACTIVATIONS[r(activation)],
        attn_scale=1.0 / math.sqrt(sizes.head_dim), qkv_bias=True, o_bias=True, mlp_bias=True,
        embed_scale=math.sqrt(sizes.hidden_size) if r("scale_embedding") else None, position_embedding=True,
        position_offset=2, stored_names={**FAIRSEQ_NAMES, "norm": "layer_norm"},
    )


def _biogpt(r: KeyReader, sizes: Sizes) -> Architecture:
    """Microsoft's BioGPT: fairseq's blocks under ``biogpt.``, its LM head ``output_projection``."""
    return replace(_fairseq_blocks(r, sizes, "hidden_act"), prefix="biogpt.", lm_head="output_projection.weight")


XGLM_CONFIG_NAMES = {"hidden_size": "d_model", "intermediate_size": "ffn_dim", "num_hidden_layers": "num_layers",
                     "num_attention_heads": "attention_heads"}


def _xglm(r: KeyReader, sizes: Sizes) -> Architecture:
    """Meta's XGLM: fairseq's blocks, the positions fairseq's sinusoids (computed, not stored) two rows in."""
    return replace(_fairseq_blocks(r, sizes, "activation_function"), sinusoidal_positions=True)


#: Persimmon's (and Fuyu's language model's) modules under Llama's names.
PERSIMMON_NAMES = {"self_attn.qkv_proj": "self_attn.query_key_value", "self_attn.o_proj": "self_attn.dense",
                   "mlp.up_proj": "mlp.dense_h_to_4h", "mlp.down_proj": "mlp.dense_4h_to_h", "norm": "final_layernorm"}


def _persimmon(r: KeyReader, sizes: Sizes) -> Architecture:
    """Adept's Persimmon: Llama's pre-norm blocks with biased LayerNorms, q/k/v in one matrix grouped by head
    (GPT-NeoX's), q and k LayerNormed per head (qk_layernorm) before rope on partial_rotary_factor (0.5) of each
    head, an ungated squared-ReLU MLP, every projection biased."""
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, _LAYER_NORM_ROPES, rotary_dim=_rotary_dim(r, sizes, spec, 0.5))
    return Architecture(
        layers=tuple(LayerSpec(None, rope, mlp="plain") for _ in range(sizes.num_layers)),
        norms=LLAMA_NORMS, norm="layer", norm_bias=True, activation=_UNGATED_ACTIVATIONS[r("hidden_act")],
        attn_scale=1.0 / math.sqrt(sizes.head_dim), qk_norm="head" if r("qk_layernorm") else None,
        qk_norm_names=("q_layernorm", "k_layernorm"), qkv_bias=True, o_bias=True, mlp_bias=True, fused_qkv=True,
        qkv_grouped=True, stored_names=PERSIMMON_NAMES,
    )


#: CodeGen's modules under Llama's names (GPT-J's, q/k/v in one matrix).
CODEGEN_NAMES = {**GPTJ_NAMES, "self_attn.qkv_proj": "attn.qkv_proj"}
#: The model-parallel shards CodeGen's q/k/v matrix is laid out in (transformers' mp_num).
CODEGEN_SHARDS = 4


def _codegen(r: KeyReader, sizes: Sizes) -> Architecture:
    """Salesforce's CodeGen (mono, multi, nl): GPT-J's blocks with q/k/v in one matrix in four model-parallel shards,
    each its share of the queries, then of the values, then of the keys, and an unbiased out_proj."""
    if sizes.hidden_size % CODEGEN_SHARDS:
        r.fail("n_embd", f"is {sizes.hidden_size}; CodeGen's q/k/v matrix splits it into {CODEGEN_SHARDS} shards")
    return replace(_gptj(r, sizes), fused_qkv=True, qkv_shards=CODEGEN_SHARDS, stored_names=CODEGEN_NAMES)


#: BLOOM's modules, and its config's keys for the sizes, under Llama's names.
BLOOM_NAMES = {"layers": "h", "embed_tokens": "word_embeddings", "embed_norm": "word_embeddings_layernorm",
               "norm": "ln_f", "self_attn.qkv_proj": "self_attention.query_key_value",
               "self_attn.o_proj": "self_attention.dense", "mlp.up_proj": "mlp.dense_h_to_4h",
               "mlp.down_proj": "mlp.dense_4h_to_h"}
BLOOM_CONFIG_NAMES = {"num_hidden_layers": "n_layer", "num_attention_heads": "n_head"}


def _bloom_hidden(raw: dict[str, Any]) -> dict[str, Any]:
    """BLOOM's first configs say ``n_embed`` where transformers now writes hidden_size."""
    return raw if "hidden_size" in raw or "n_embed" not in raw else {**raw, "hidden_size": raw["n_embed"]}


def _bloom(r: KeyReader, sizes: Sizes) -> Architecture:
    """BigScience's BLOOM / BLOOMZ: ALiBi positions, the embeddings LayerNormed before the first
    block, q/k/v in one matrix grouped by head, every projection biased, an ungated tanh-GELU MLP, tied."""
    r("apply_residual_connection_post_layernorm")
    return Architecture(
        layers=tuple(LayerSpec(None, Rope.unrotated(sizes.head_dim), mlp="plain") for _ in range(sizes.num_layers)),
        norms=LLAMA_NORMS, norm="layer", norm_bias=True, embed_norm=True, activation="gelu_tanh",
        attn_scale=1.0 / math.sqrt(sizes.head_dim), alibi_slopes=alibi_slopes(sizes.num_heads), qkv_bias=True,
        o_bias=True, mlp_bias=True, fused_qkv=True, qkv_grouped=True, prefix="transformer.", stored_names=BLOOM_NAMES,
    )


#: MPT's modules, and its config's keys for the sizes, under Llama's names.
MPT_NAMES = {"layers": "blocks", "embed_tokens": "wte", "norm": "norm_f", "input_layernorm": "norm_1",
             "post_attention_layernorm": "norm_2", "self_attn.qkv_proj": "attn.Wqkv",
             "self_attn.o_proj": "attn.out_proj", "mlp.up_proj": "ffn.up_proj", "mlp.down_proj": "ffn.down_proj"}
MPT_CONFIG_NAMES = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                    "max_position_embeddings": "max_seq_len"}


def _mpt(r: KeyReader, sizes: Sizes) -> Architecture:
    """MosaicML's MPT (7B, 30B and their chat / instruct / storywriter tunes), as transformers' Mpt runs it: ALiBi
    positions (alibi_bias_max 8), q/k/v in one matrix (queries, keys, values) clipped by clip_qkv, scores
    scaled by softmax_scale, LayerNorms and projections without biases, an ungated exact-GELU MLP four times as wide,
    tied."""
    for name in ("attn_config.alibi", "attn_config.alibi_bias_max", "attn_config.attn_type", "attn_config.qk_ln",
                 "attn_config.prefix_lm", "expansion_ratio", "no_bias", "logit_scale"):
        r(name)
    scale = r("attn_config.softmax_scale")
    return Architecture(
        layers=tuple(LayerSpec(None, Rope.unrotated(sizes.head_dim), mlp="plain") for _ in range(sizes.num_layers)),
        norms=LLAMA_NORMS, norm="layer", activation="gelu",
        attn_scale=1.0 / math.sqrt(sizes.head_dim) if scale is None else float(scale),
        alibi_slopes=alibi_slopes(sizes.num_heads), clip_qkv=r("attn_config.clip_qkv"),
        fused_qkv=True, prefix="transformer.", stored_names=MPT_NAMES,
    )


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


def _olmo(r: KeyReader, sizes: Sizes) -> Architecture:
    """OLMo (1): Llama's blocks with LayerNorms that have no weight or bias, at a fixed epsilon of 1e-5; q, k and v
    clipped by clip_qkv (OLMo 1.7: 7B 0424, 0724)."""
    return replace(_llama_like(False, None, _no_windows)(r, sizes), norm="layer", norm_params=False,
                   clip_qkv=r("clip_qkv"))


def _olmoe(r: KeyReader, sizes: Sizes) -> Architecture:
    """OLMoE: Llama's norms, q and k normed over their whole projections, then with v clipped by clip_qkv; experts
    on every layer."""
    return replace(with_moe("olmoe", _llama_like(False, "projection", _no_windows))(r, sizes), clip_qkv=r("clip_qkv"))


def _minimax_m2(r: KeyReader, sizes: Sizes) -> Architecture:
    """MiniMax-M2 (transformers' MiniMaxM2): Llama's norms, q and k normed over their whole projections (OLMo 2's),
    rope on the first rotary_dim dims of each head (rotate-half pairs); experts on every layer, sigmoid scores chosen
    with the sparse MLP's correction bias (:func:`ferrum.moe.spec.with_moe`). transformers reads the rotary dims
    from partial_rotary_factor (in the rope settings, then beside them), else from rotary_dim, which is what
    mlx-lm and MiniMax's code read: a config where the two disagree is refused."""
    key, spec = _rope_spec(r)
    rotary = r("rotary_dim")
    dims = _rotary_dim(r, sizes, spec, 1.0 if rotary is None else rotary / sizes.head_dim)
    if rotary is not None and rotary != dims:
        r.fail("rotary_dim", f"is {rotary}, but partial_rotary_factor gives {dims} rotary dims of {sizes.head_dim} "
                             "(transformers reads partial_rotary_factor, other runtimes rotary_dim); make them agree")
    rope = read_rope(r, sizes, spec, key, _LLAMA_ROPES, rotary_dim=dims)
    r("hidden_act")
    return Architecture(
        layers=tuple(LayerSpec(None, rope) for _ in range(sizes.num_layers)),
        norms=LLAMA_NORMS, attn_scale=1.0 / math.sqrt(sizes.head_dim), qk_norm="projection",
    )


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


def _gelu_key(default: str, name: str = "hidden_act") -> Key:
    return Key(name, default=default, check=one_of(*_GELU_ACTIVATIONS), unsupported=True)


def _layer_norm_family(build: Callable[[KeyReader, Sizes], Architecture], tie_default: bool,
                       *groups: tuple[Key, ...], eps_key: str = "layer_norm_eps") -> Family:
    """A LayerNorm family: the core keys with the epsilon (1e-5 unless set) under ``eps_key``, the rope's."""
    return Family(_keys(_core(tie_default, eps_key=eps_key), _ROPE[:3], *groups), build, eps_default=1e-5,
                  eps_key=eps_key)


def _gpt2_family(build: Callable[[KeyReader, Sizes], Architecture], tie_default: bool, positions_default: int,
                 *groups: tuple[Key, ...], kv_heads: KvHeads | None = None) -> Family:
    """A family of GPT-2's config keys (:data:`GPT2_CONFIG_NAMES`)."""
    return Family(_keys(_renamed_core(GPT2_CONFIG_NAMES, tie_default, positions_default), *groups), build,
                  eps_default=1e-5, eps_key="layer_norm_epsilon", names=GPT2_CONFIG_NAMES, kv_heads=kv_heads)


_QWEN2_MOE_WINDOW = (
    Key("sliding_window", default=4096, check=lambda v: None if v == 0 else optional_positive_int(v)),
    *_QWEN_WINDOW[1:],
)


# ----------------------------------------------------- dense families of remote-code origin

def _aliases(names: dict[str, str]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A ``derive`` reading a release's own spelling of keys (its remote-code config's; transformers' config class maps
    them the same way, its ``attribute_map``): ``names`` alias -> the key Ferrum reads, filled in where absent."""

    def derive(raw: dict[str, Any]) -> dict[str, Any]:
        return {**{ours: raw[alias] for alias, ours in names.items() if alias in raw and ours not in raw}, **raw}

    return derive


#: EXAONE 3 / 3.5's modules (its release's names, which transformers 5 keeps when it saves one) under Llama's.
EXAONE_NAMES = {"layers": "h", "embed_tokens": "wte", "norm": "ln_f", "input_layernorm": "ln_1",
                "post_attention_layernorm": "ln_2", "self_attn.q_proj": "attn.attention.q_proj",
                "self_attn.k_proj": "attn.attention.k_proj", "self_attn.v_proj": "attn.attention.v_proj",
                "self_attn.o_proj": "attn.attention.out_proj", "mlp.gate_proj": "mlp.c_fc_0",
                "mlp.up_proj": "mlp.c_fc_1", "mlp.down_proj": "mlp.c_proj"}


def _exaone(r: KeyReader, sizes: Sizes) -> Architecture:
    """EXAONE 3 / 3.5 (transformers runs it as Llama after renaming): Llama's blocks under ``transformer.h``."""
    return replace(_llama_like(False, None, _no_windows)(r, sizes), prefix="transformer.", stored_names=EXAONE_NAMES)


def _internlm3(r: KeyReader, sizes: Sizes) -> Architecture:
    """InternLM3: Llama's blocks; its qkv_bias and bias (o_proj and the MLP) must agree, as transformers requires."""
    if bool(r("attention_bias")) != bool(r("mlp_bias")):
        r.fail("qkv_bias", f"(attention_bias: {r('attention_bias')!r}) differs from bias (mlp_bias: "
                           f"{r('mlp_bias')!r}); transformers runs InternLM3 with one setting for both, and no "
                           "release differs", unsupported=True)
    return _llama_like(False, None, _no_windows)(r, sizes)


#: InternLM2 / 2.5's modules (remote code: q/k/v packed in ``wqkv`` grouped by key/value head) under Llama's.
INTERNLM2_NAMES = {"embed_tokens": "tok_embeddings", "input_layernorm": "attention_norm",
                   "post_attention_layernorm": "ffn_norm", "self_attn.qkv_proj": "attention.wqkv",
                   "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1",
                   "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2"}


def _internlm2(r: KeyReader, sizes: Sizes) -> Architecture:
    """InternLM2 / 2.5 (remote code, mlx-lm's internlm2): Llama's blocks with q/k/v in one ``wqkv`` whose rows are
    grouped by key/value head (its queries, then its key, then its value), ``bias`` on wqkv and wo, the LM head
    ``output``."""
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, _LAYER_NORM_ROPES)
    r("hidden_act")
    bias = r("bias")
    return Architecture(
        layers=tuple(LayerSpec(None, rope) for _ in range(sizes.num_layers)),
        norms=LLAMA_NORMS, attn_scale=1.0 / math.sqrt(sizes.head_dim), qkv_bias=bias, o_bias=bias,
        fused_qkv=True, qkv_grouped=True, stored_names=INTERNLM2_NAMES,
        layouts=(("model.", "output.weight", {}),),
    )


def _cwm_windows(r: KeyReader, sizes: Sizes) -> list:
    """transformers' CWM: layer_types, else every fourth layer full from the first on, the others sliding."""
    window, types = _layer_kinds(r, sizes, lambda i: FULL if i % 4 == 0 else SLIDING)
    return [window if t == SLIDING else None for t in types]


#: transformers' CWM rope settings where a config gives none (rope_theta included).
_CWM_ROPE = {"rope_type": "llama3", "rope_theta": 1_000_000.0, "factor": 16.0, "high_freq_factor": 4.0,
             "low_freq_factor": 1.0, "original_max_position_embeddings": 8192}


def _jais2(r: KeyReader, sizes: Sizes) -> Architecture:
    """Jais 2: Llama's blocks with biased LayerNorms, attention_bias on every attention projection and an ungated
    MLP (up_proj, down_proj; squared ReLU) biased by mlp_bias."""
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, _LLAMA_ROPES)
    bias = r("attention_bias")
    return Architecture(
        layers=tuple(LayerSpec(None, rope, mlp="plain") for _ in range(sizes.num_layers)),
        norms=LLAMA_NORMS, norm="layer", norm_bias=True, activation=_UNGATED_ACTIVATIONS[r("hidden_act")],
        attn_scale=1.0 / math.sqrt(sizes.head_dim), qkv_bias=bias, o_bias=bias, mlp_bias=r("mlp_bias"),
    )


def _granite_swa(r: KeyReader, sizes: Sizes) -> Architecture:
    """Granite SWA: Granite's multipliers, sliding layers (every fourth full from the first on, unless layer_types
    says otherwise), each layer's rope base from layer_rope_theta (0: no rope), and a learned sink per query head
    (its output times ``sigmoid(logsumexp(scores) - sink)``: gpt-oss's sink, which joins the softmax)."""
    window, types = _layer_kinds(r, sizes, lambda i: FULL if i % 4 == 0 else SLIDING)
    arch = _granite(r, sizes)
    thetas = r("layer_rope_theta")
    if thetas is None:
        thetas = [arch.layers[0].rope.theta] * sizes.num_layers
    if not isinstance(thetas, list) or len(thetas) != sizes.num_layers or any(
            t != 0 and positive_number(t) for t in thetas):
        r.fail("layer_rope_theta", f"must list {sizes.num_layers} rope bases, positive or 0 (no rope), got {thetas!r}")
    ropes = [replace(spec.rope, theta=float(t)) if t else Rope.unrotated(sizes.head_dim)
             for spec, t in zip(arch.layers, thetas)]
    return replace(arch, sinks=True, layers=tuple(
        LayerSpec(window if t == SLIDING else None, rope) for t, rope in zip(types, ropes)))


#: HyperCLOVA X's Peri-LN: a norm before and after each of attention and the MLP.
HYPERCLOVAX_NORMS = {"pre_attn": "input_layernorm", "post_attn": "post_norm1",
                     "pre_mlp": "post_attention_layernorm", "post_mlp": "post_norm2"}


def _hyperclovax(r: KeyReader, sizes: Sizes) -> Architecture:
    """HyperCLOVA X SEED: Granite's multipliers (the logits multiplied by logits_scaling, not divided; the attention
    scale 1/sqrt(head_dim) unless attention_multiplier), with use_post_norm a norm after attention and after the MLP
    (its output then scaled by residual_multiplier: ``ferrum.arch.tensors`` folds the scale into those norms)."""
    arch = _llama_like(False, None, _no_windows)(r, sizes)
    scale = r("attention_multiplier")
    return replace(
        arch,
        norms=HYPERCLOVAX_NORMS if r("use_post_norm") else LLAMA_NORMS,
        embed_scale=None if r("embedding_multiplier") == 1 else float(r("embedding_multiplier")),
        residual_scale=float(r("residual_multiplier")),
        attn_scale=arch.attn_scale if scale is None else float(scale),
        logit_scale=float(r("logits_scaling")),
    )


def _minicpm_scalings(r: KeyReader, sizes: Sizes, arch: Architecture) -> Architecture:
    """MiniCPM's muP scalings: embeddings times scale_emb, what each block adds times ``scale_depth /
    sqrt(num_hidden_layers)`` (null: 1), the final hidden state divided by ``hidden_size / dim_model_base`` (null:
    1) before the LM head."""
    depth, base = r("scale_depth"), r("dim_model_base")
    return replace(
        arch,
        embed_scale=None if r("scale_emb") == 1 else float(r("scale_emb")),
        residual_scale=1.0 if depth is None else float(depth) / math.sqrt(sizes.num_layers),
        logit_scale=1.0 if base is None else float(base) / sizes.hidden_size,
    )


def _minicpm(r: KeyReader, sizes: Sizes) -> Architecture:
    """MiniCPM (1B, 2B; remote code, mlx-lm's minicpm): Llama's blocks with :func:`_minicpm_scalings`. The LM head
    reads the scaled-down state whether tied or not, as OpenBMB's code runs it (mlx-lm skips the scaling when tied)."""
    return _minicpm_scalings(r, sizes, _llama_like(False, None, _no_windows)(r, sizes))


#: The rope scalings MiniCPM3's releases ship (longrope) beside Llama's.
_MINICPM3_ROPES = ("default", "linear", "dynamic", "longrope")


def _minicpm3(r: KeyReader, sizes: Sizes) -> Architecture:
    """MiniCPM3: DeepSeek-V2's latent attention with rotate-half rope (longrope as its releases ship it) and
    :func:`_minicpm_scalings`."""
    return _minicpm_scalings(r, sizes, _latent_attention(r, sizes, interleaved=False, kinds=_MINICPM3_ROPES))


def _minicpm3_v_head_dim(raw: dict[str, Any]) -> dict[str, Any]:
    """MiniCPM3Config's v_head_dim where a config leaves it out or null: ``hidden_size / num_attention_heads``."""
    hidden, heads = raw.get("hidden_size"), raw.get("num_attention_heads")
    if raw.get("v_head_dim") is None and isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        return {**raw, "v_head_dim": hidden // heads}
    return raw


#: OpenBMB's MiniCPM configs carry all three (its remote code has no defaults Ferrum could vouch for).
_MINICPM = tuple(Key(name, check=positive_number) for name in ("scale_emb", "scale_depth", "dim_model_base"))
#: MiniCPM3Config's: null depth and base scale nothing.
_MINICPM3 = (
    Key("scale_emb", default=12, check=positive_number),
    Key("scale_depth", default=1.4, check=optional_positive_number),
    Key("dim_model_base", default=256, check=optional_positive_number),
)


FAMILIES: dict[str, Family] = {
    "llama": Family(
        _keys(_core(False), _core_defaults(vocab_size=32000, max_position_embeddings=2048), _ROPE, _SILU,
              (Key("attention_bias", check=boolean), Key("mlp_bias", check=boolean))),
        _llama_like(False, None, _no_windows),
    ),
    "mistral": Family(
        _keys(_core(False), _core_defaults(vocab_size=32000, max_position_embeddings=131072), _ROPE, _SILU,
              (Key("sliding_window", default=4096, check=optional_positive_int),)),
        _llama_like(False, None, _every_layer_window),
    ),
    "olmo3": Family(
        _keys(_core(False), _ROPE[:3], _SILU, _LAYER_TYPES, (
            Key("sliding_window", default=4096, check=optional_positive_int),
            Key("attention_bias", default=False, check=boolean),
        )),
        _olmo3,
        eps_default=1e-5,
    ),
    "ministral": Family(  # Ministral 8B (2410)
        _keys(_core(False), _ROPE, _SILU, _LAYER_TYPES,
              (Key("sliding_window", default=4096, check=optional_positive_int),)),
        _llama_like(False, None, _ministral_windows),
    ),
    "ministral3": Family(  # Ministral 3 (3B / 8B / 14B), Devstral 2: the text model of a Mistral3 wrapper
        _keys(_core(False, head_dim_default=128), _ROPE, _SILU, _WINDOW,
              (Key("rope_parameters", default=_MINISTRAL3_ROPE),)),
        _ministral3,
        eps_default=1e-5,
    ),
    "qwen2": Family(  # transformers' Qwen2 always biases q/k/v and never o; it ignores attention_bias
        _keys(_core(False), _ROPE, _SILU, _QWEN_WINDOW),
        _llama_like(True, None, _qwen_windows),
    ),
    "qwen3": Family(
        _keys(_core(False, head_dim_default=128), _ROPE, _SILU, _QWEN_WINDOW,
              (Key("attention_bias", check=boolean),)),
        _llama_like(False, "head", _qwen_windows),
    ),
    "granite": Family(
        _keys(_core(False), _ROPE, _SILU, _GRANITE),
        _granite,
    ),
    "smollm3": Family(
        _keys(_core(True), _ROPE, _theta(2_000_000.0), _SILU, _SMOLLM3),
        _llama_like(False, None, _smollm3_windows, _smollm3_rotated),
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
    # Google's Gemma 4 text decoders (31B, E2B / E4B, and 26B-A4B's MoE block: ferrum.moe.spec.gemma4_moe);
    # "gemma4" wrappers' text_config too (ferrum.config.TEXT_WRAPPERS)
    "gemma4_text": Family(
        _keys(_core(True, 256), _core_defaults(
            hidden_size=2304, intermediate_size=9216, num_hidden_layers=30, num_attention_heads=8,
            num_key_value_heads=4, vocab_size=262_144, max_position_embeddings=131_072,
        ), (
            Key("rope_parameters"),
            Key("hidden_activation", default="gelu_pytorch_tanh", check=one_of("gelu_pytorch_tanh", "gelu_tanh"),
                unsupported=True),
            Key("attention_bias", default=False, check=falsy("Gemma 4 releases have no attention biases"),
                unsupported=True),
            Key("use_bidirectional_attention", default=None,
                check=falsy("bidirectional Gemma 4 is not a causal LM; use a causal checkpoint"), unsupported=True),
            Key("sliding_window", default=512, check=optional_positive_int),
            Key("layer_types"),
            Key("final_logit_softcapping", check=optional_positive_number),
            Key("global_head_dim", default=512, check=size(4096)),
            Key("per_layer_config"),  # transformers 5.24 saves it in place of the two keys around
            Key("num_global_key_value_heads", check=optional_size(4096)),
            Key("attention_k_eq_v", default=False, check=boolean),
            Key("hidden_size_per_layer_input", default=256, check=optional_non_negative_int),
            Key("vocab_size_per_layer_input", default=262_144, check=size(1 << 24)),
            Key("num_kv_shared_layers", default=0, check=optional_non_negative_int),
            Key("use_double_wide_mlp", default=False, check=boolean),
            Key("enable_moe_block", default=False, check=boolean),
        ), MOE_KEYS["gemma4_text"]),
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
    "lfm2": Family(  # Liquid AI's LFM2 / LFM2.5: gated short convolutions and attention
        _keys(_core(True, eps_key="norm_eps"), _core_defaults(intermediate_size=12288, num_key_value_heads=8,
                                                              vocab_size=65536, max_position_embeddings=128_000),
              _ROPE, _theta(1_000_000.0), _LFM2_LAYERS, _LFM2),
        _lfm2, eps_default=1e-5, eps_key="norm_eps", sizes=_lfm2_sizes,
    ),
    "lfm2_moe": Family(  # LFM2-8B-A1B: LFM2's layers over sigmoid-routed experts
        _keys(_core(True, eps_key="norm_eps"), _core_defaults(intermediate_size=7168, num_key_value_heads=8,
                                                              vocab_size=65536, max_position_embeddings=128_000),
              _ROPE, _theta(1_000_000.0), _LFM2_LAYERS, MOE_KEYS["lfm2_moe"]),
        _lfm2_moe, eps_default=1e-5, eps_key="norm_eps", sizes=_lfm2_sizes,
    ),
    "qwen3_5_text": Family(  # Qwen3.5 (dense): Gated DeltaNet and gated attention layers (its wrapper: qwen3_5)
        _keys(_core(False, head_dim_default=256), _ROPE, _SILU, _QWEN3_HYBRID),
        _qwen3_hybrid(grouped=False),
        unloaded=r"(^|\.)mtp\.",  # the releases' multi-token prediction layer
    ),
    "qwen3_next": Family(  # Qwen3-Next: Qwen3.5's layers (its Gated DeltaNet projections grouped per key head)
        # over Qwen2-MoE's experts with a sigmoid-gated shared expert
        _keys(_core(False, head_dim_default=256), _ROPE, _SILU, _QWEN3_HYBRID, MOE_KEYS["qwen3_next"]),
        with_moe("qwen3_next", _qwen3_hybrid(grouped=True)),
        unloaded=r"(^|\.)mtp\.",
    ),
    "qwen3_5_moe_text": Family(  # Qwen3.5-MoE (its wrapper: qwen3_5_moe)
        _keys(_core(False, head_dim_default=256), _ROPE, _SILU, _QWEN3_HYBRID, MOE_KEYS["qwen3_5_moe_text"]),
        with_moe("qwen3_5_moe_text", _qwen3_hybrid(grouped=False)),
        unloaded=r"(^|\.)mtp\.",
    ),
    "kimi_linear": Family(  # Moonshot's Kimi Linear: Kimi Delta Attention and NoPE latent attention over DeepSeek-V3's
        # grouped sigmoid routing
        _keys(_core(False), _core_defaults(
            hidden_size=2304, intermediate_size=9216, num_hidden_layers=27, num_attention_heads=32,
            vocab_size=163840, max_position_embeddings=1048576,
        ), _SILU, _mla_keys(None, 128, 128), _KIMI_LINEAR, MOE_KEYS["kimi_linear"]),
        with_moe("kimi_linear", _kimi_linear),
        eps_default=1e-5,
        kv_heads=_mla_kv_heads,
        head_dim=_mla_head_dim,
        derive=_kimi_linear_keys,
    ),
    "olmo_hybrid": Family(  # AllenAI's OLMo Hybrid: OLMo 3's attention between Gated DeltaNet layers
        _keys(_core(False), _core_defaults(
            hidden_size=3840, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=30,
            vocab_size=100352, max_position_embeddings=65536,
        ), _ROPE[:3], _SILU, _OLMO_HYBRID),
        _olmo_hybrid,
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
    "granitemoehybrid": Family(  # Granite 4.0-H: Mamba-2 + attention layers, Granite's multipliers, shared MLP
        _keys(_core(False), _ROPE, _SILU, _GRANITE, MOE_KEYS["granitemoeshared"], _MAMBA2, (
            Key("num_local_experts", default=8, check=optional_non_negative_int),
            Key("shared_intermediate_size", default=1024, check=positive_int),
            Key("position_embedding_type", check=one_of(None, "rope", "nope")),
            Key("layer_types"), Key("layers_block_type"),
        )),
        _granitemoehybrid,
        names={"intermediate_size": "shared_intermediate_size"},  # the dense MLP's; the experts' is intermediate_size
    ),
    "nemotron_h": Family(  # Nemotron-H, Nemotron Nano 2, 3 Nano: Mamba-2, NoPE attention, squared-ReLU MLP / MoE blocks
        _keys(_NEMOTRON_H_PATTERN, _core(False, 128, eps_key="layer_norm_epsilon"), (
            Key("mamba_num_heads", default=128, check=positive_int),
            Key("mamba_head_dim", default=64, check=positive_int),
            Key("n_groups", default=8, check=positive_int),
            Key("ssm_state_size", default=128, check=positive_int),
            Key("conv_kernel", default=4, check=positive_int),
            Key("use_conv_bias", default=True, check=boolean),
            Key("use_bias", default=False, check=boolean),  # Mamba-2's in_proj and out_proj (transformers')
            Key("mlp_bias", default=False, check=boolean),
            Key("time_step_limit", default=[0.0, float("inf")], check=_time_step_limit),
            Key("attention_bias", default=False, check=falsy(
                "transformers builds Nemotron-H's attention without biases (mlx-lm with them)"), unsupported=True),
            Key("mamba_hidden_act", default="silu", check=one_of("silu"), unsupported=True),
            Key("mlp_hidden_act", default="relu2", check=one_of("relu2"), unsupported=True),
        ), MOE_KEYS["nemotron_h"]),
        _nemotron_h,
        eps_default=1e-5, eps_key="layer_norm_epsilon", derive=_nemotron_h_layer_count,
        unloaded=r"^mtp\.",  # the multi-token prediction layers transformers skips
    ),
    "mamba": Family(  # state-spaces' Mamba (mamba-*-hf): Mamba-1 blocks alone
        _keys(_MAMBA), _mamba(None), eps_default=1e-5, eps_key="layer_norm_epsilon",
    ),
    "falcon_mamba": Family(  # Falcon Mamba 7B: Mamba with the step, B and C RMS-normed without weights
        _keys(_MAMBA, (Key("mixer_rms_eps", default=1e-6, check=positive_number),)), _mamba("weightless"),
        eps_default=1e-5, eps_key="layer_norm_epsilon",
    ),
    "jamba": Family(  # AI21's Jamba: Mamba-1 and rope-less attention layers, dense and expert MLPs
        _keys(_core(False), _core_defaults(num_key_value_heads=8, max_position_embeddings=262144), _SILU, _JAMBA,
              MOE_KEYS["jamba"]),
        _jamba,
    ),
    "bamba": Family(  # IBM's Bamba: Mamba-2 layers, attention at attn_layer_indices (half-rotary), gated MLP
        _keys(_core(False), _ROPE, (Key("partial_rotary_factor"),), _SILU, _MAMBA2, (
            Key("attention_bias", check=boolean), Key("mlp_bias", check=boolean), Key("attn_layer_indices"),
        )),
        _bamba,
        eps_default=1e-5,
    ),
    "falcon_h1": Family(  # TII's Falcon-H1 / H1R: attention and Mamba-2 side by side in every layer, muP multipliers
        _keys(_core(False), _ROPE, _SILU, _MAMBA2, (
            Key("attention_bias", check=boolean), Key("mlp_bias", check=boolean),
            Key("mamba_d_ssm", default=1024, check=optional_positive_int),
            Key("mamba_chunk_size", check=optional_positive_int),
            Key("mamba_rms_norm", default=False, check=boolean),
            Key("mamba_norm_before_gate", default=True, check=boolean),
            Key("projectors_bias", default=False, check=boolean),
            *(Key(name, default=1.0, check=positive_number) for name in (
                "embedding_multiplier", "lm_head_multiplier", "attention_in_multiplier", "attention_out_multiplier",
                "key_multiplier", "ssm_in_multiplier", "ssm_out_multiplier")),
            Key("mlp_multipliers", check=_multiplier_list(2)),
            Key("ssm_multipliers", check=_multiplier_list(5)),
        )),
        _falcon_h1,
        eps_default=1e-5,
    ),
    "mamba2": Family(  # pure Mamba-2 (state-spaces' mamba2-*, Mamba-Codestral): Mamba-2 blocks alone
        _keys((
            Key("hidden_size", check=size(1 << 17)),
            Key("intermediate_size", check=optional_size(1 << 20)),  # mlx-lm's expand * hidden_size; no MLP reads it
            Key("num_hidden_layers", check=size(1024)),
            Key("num_heads", default=128, check=size(4096)),
            Key("head_dim", default=64, check=size(4096)),
            Key("vocab_size", default=32768, check=size(1 << 23)),
            # no positions: the state carries any length; the context defaults to 1M tokens (max_seq_len narrows it)
            Key("max_position_embeddings", default=1 << 20, check=size(1 << 28)),
            Key("layer_norm_epsilon", check=optional_positive_number),
            Key("tie_word_embeddings", default=False, check=boolean),
            Key("state_size", default=128, check=positive_int),
            Key("ssm_state_size", check=optional_positive_int),  # mlx-lm's spelling
            Key("expand", default=2, check=positive_int),
            Key("n_groups", default=8, check=positive_int),
            Key("conv_kernel", default=4, check=positive_int),
            Key("use_bias", default=False, check=boolean),
            Key("use_conv_bias", default=True, check=boolean),
            Key("time_step_limit", default=[0.0, float("inf")], check=_time_step_limit),
            Key("residual_in_fp32", default=True, check=boolean),
        ), _SILU),
        _mamba2,
        eps_default=1e-5, eps_key="layer_norm_epsilon", names={"num_attention_heads": "num_heads"},
    ),
    "olmoe": Family(  # OLMoE: Llama's norms, q and k normed over their whole projections, experts on every layer
        _keys(_core(False), _ROPE, _SILU, (
            Key("attention_bias", check=boolean),
            Key("clip_qkv", check=optional_positive_number),
        ), MOE_KEYS["olmoe"]),
        _olmoe,
        eps_default=1e-5,
    ),
    "glm4": Family(  # GLM-4-0414
        _keys(_core(False, head_dim_default=128), _ROPE, _SILU, (
            Key("partial_rotary_factor", check=optional_positive_number),  # in place of _ROPE's refusal
            Key("attention_bias", default=True, check=boolean),
        )),
        _glm4,
        eps_default=1.5625e-07,
    ),
    "glm": Family(  # GLM-4 9B chat (-hf), GLM-Edge
        _keys(_core(False, head_dim_default=128), _ROPE, _SILU, (
            Key("partial_rotary_factor", check=optional_positive_number),  # in place of _ROPE's refusal
            Key("attention_bias", default=True, check=boolean),
        )),
        _glm,
        eps_default=1.5625e-07,
    ),
    "helium": Family(  # Kyutai's Helium 1
        _keys(_core(False, head_dim_default=128), _ROPE, _theta(100_000.0), _SILU, (
            Key("attention_bias", default=False, check=boolean), Key("mlp_bias", default=False, check=boolean))),
        _helium,
        eps_default=1e-8,
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
    "deepseek_v3": Family(  # DeepSeek-V3 / R1, Moonlight, Kimi K2: latent attention, grouped sigmoid routing
        _keys(_core(False), _ROPE, _SILU, _MLA, (
            Key("rope_interleave", default=True, check=boolean),
            Key("num_nextn_predict_layers", default=1, check=optional_non_negative_int),
        ), MOE_KEYS["deepseek_v3"]),
        with_moe("deepseek_v3", _deepseek_v3),
        kv_heads=_mla_kv_heads,
        head_dim=_mla_head_dim,
    ),
    "sarvam_mla": Family(  # Sarvam-105B: DeepSeek-V3's latent attention and routing under SarvamMLAConfig's defaults
        _keys(_core(False), _core_defaults(
            hidden_size=4096, intermediate_size=16384, num_hidden_layers=32, num_attention_heads=64,
            vocab_size=262144, max_position_embeddings=4096,
        ), _ROPE, _SILU, _mla_keys(None, 128, 128), (
            Key("rope_interleave", default=True, check=boolean),
            Key("num_nextn_predict_layers", default=0, check=optional_non_negative_int),
        ), MOE_KEYS["sarvam_mla"]),
        with_moe("sarvam_mla", _sarvam_mla),
        kv_heads=_mla_kv_heads,
        head_dim=_mla_head_dim,
        derive=_sarvam_mla_config,
    ),
    "deepseek_v2": Family(  # DeepSeek-V2, V2-Lite, V2.5, Coder-V2: latent attention, softmax routing
        _keys(_core(False), _ROPE, _SILU, _MLA, (
            Key("mlp_bias", default=False, unsupported=True, check=falsy(
                "no DeepSeek-V2 release has MLP biases; load a checkpoint without them")),
        ), MOE_KEYS["deepseek_v2"]),
        with_moe("deepseek_v2", _deepseek_v2),
        kv_heads=_mla_kv_heads,
        head_dim=_mla_head_dim,
    ),
    "glm4_moe_lite": Family(  # GLM-4.7-Flash: DeepSeek-V3's latent attention over GLM-4.5's MoE
        _keys(_core(False), _ROPE, _SILU, _mla_keys(768, 192, 256), (
            Key("rope_interleave", default=True, check=boolean),
            # transformers drops the release's layer 47 by name (_keys_to_ignore_on_load_unexpected)
            Key("num_nextn_predict_layers", default=1, check=optional_non_negative_int),
        ), MOE_KEYS["glm4_moe_lite"]),
        with_moe("glm4_moe_lite", _deepseek_v3),
        eps_default=1e-5,
        kv_heads=_mla_kv_heads,
        head_dim=_mla_head_dim,
    ),
    "mistral4": Family(  # Mistral Small 4: latent attention, Llama 4's query scaling, grouped softmax routing
        _keys(_core(False), _ROPE, _SILU, _mla_keys(1024, 64, 128, kv_lora=256), (
            Key("rope_parameters", default=_MISTRAL4_ROPE),
            Key("rope_interleave", default=True, check=boolean),
        ), MOE_KEYS["mistral4"]),
        with_moe("mistral4", _mistral4),
        kv_heads=_mla_kv_heads,
        head_dim=_mla_head_dim,
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
    "hunyuan_v1_dense": Family(  # Tencent's Hunyuan 0.5B-7B
        _keys(_core(False), _ROPE, _SILU, (Key("attention_bias", default=False, check=boolean),)),
        _hunyuan_dense,
        eps_default=1e-5,
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
    "ernie4_5": Family(  # Baidu's ERNIE 4.5 (dense)
        _keys(_core(True, head_dim_default=128), _ROPE, _theta(500_000.0), _SILU,
              (Key("use_bias", default=False, check=boolean),)),
        _ernie4_5,
        eps_default=1e-5,
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
    "seed_oss": Family(  # ByteDance's Seed-OSS
        _keys(_core(False, head_dim_default=128), _ROPE, _SILU, (
            Key("attention_bias", default=True, check=boolean), Key("attention_out_bias", default=False, check=boolean),
            Key("mlp_bias", default=False, check=boolean))),
        _seed_oss,
    ),
    "exaone4": Family(  # EXAONE 4: OLMo 2's norms after attention and MLP, Qwen 3's q/k norms, NoPE full layers
        _keys(_core(False), _ROPE, _SILU, _EXAONE4),
        _llama_like(False, "head", _exaone4_windows, _exaone4_rotated, norms=POST_NORMS),
        eps_default=1e-5,
    ),
    "exaone_moe": Family(  # K-EXAONE: EXAONE 4's attention (q/k norms, NoPE full layers) in Llama's pre-norm
        # blocks, over DeepSeek-V3's MoE with dense first layers
        _keys(_core(False), _ROPE, _SILU, _EXAONE4, MOE_KEYS["exaone_moe"]),
        with_moe("exaone_moe", _llama_like(False, "head", _exaone4_windows, _exaone4_rotated)),
        eps_default=1e-5,
        unloaded="mtp.*",  # the releases' mtp.* layer
    ),
    "olmo": Family(  # OLMo 1 (1B, 7B)
        _keys(_core(False, eps_key=None), _ROPE, _SILU, (
            Key("attention_bias", check=boolean),
            Key("clip_qkv", check=optional_positive_number),
        )),
        _olmo,
        eps_default=1e-5,
        eps_key=None,
    ),
    "olmo2": Family(  # transformers' OLMo 2: attention_bias covers q/k/v and o, like Llama's
        _keys(_core(False), _ROPE, _SILU, (Key("attention_bias", check=boolean),)),
        _llama_like(False, "projection", _no_windows, norms=POST_NORMS),
        eps_default=1e-5,
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
    "phi3": Family(
        _keys(_core(False), _ROPE[:3], _SILU, _WINDOW, (
            Key("partial_rotary_factor", check=optional_positive_number),
            Key("original_max_position_embeddings", default=4096, check=optional_positive_int),
        )),
        _phi3,
        eps_default=1e-5,
    ),
    "phi": _layer_norm_family(_phi, False, (  # Phi-1, Phi-1.5, Phi-2
        _gelu_key("gelu_new"),
        Key("partial_rotary_factor", check=optional_positive_number),
        Key("qk_layernorm", default=False, check=boolean),
    )),
    "stablelm": _layer_norm_family(_stablelm, False, (
        Key("hidden_act", default="silu", check=one_of("silu"), unsupported=True),
        Key("partial_rotary_factor", check=optional_positive_number),
        Key("use_qkv_bias", default=False, check=boolean),
        Key("use_parallel_residual", default=False, check=boolean),
        Key("qk_layernorm", default=False, check=boolean),  # StableLM 2 12B: a LayerNorm per head on q and k
    )),
    "cohere": _layer_norm_family(_cohere, True, _COHERE, _theta(500_000.0)),  # Command R, Command R+
    "cohere2": _layer_norm_family(_cohere2, True, _COHERE, _LAYER_TYPES, (  # Command R7B, Command A
        Key("sliding_window", default=4096, check=optional_positive_int),
        Key("sliding_window_pattern", default=4, check=positive_int),
    )),
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
    "gpt_neox": _layer_norm_family(_gpt_neox, False, (  # Pythia, RedPajama-INCITE, Dolly 2, GPT-NeoX-20B
        _gelu_key("gelu"),
        Key("rotary_emb_base", check=optional_positive_number),
        Key("rotary_pct", check=optional_positive_number),
        Key("use_parallel_residual", default=True, check=boolean),
        Key("attention_bias", default=True, check=boolean),
    )),
    "gpt2": _gpt2_family(_gpt2, True, 1024, (
        _gelu_key("gelu_new", "activation_function"),
        Key("scale_attn_weights", default=True, check=boolean),
        Key("scale_attn_by_inverse_layer_idx", default=False, check=boolean),
    )),
    "gpt_bigcode": _gpt2_family(_gpt_bigcode, True, 1024, (  # StarCoder (1), SantaCoder, WizardCoder, OctoCoder
        _gelu_key("gelu_pytorch_tanh", "activation_function"),
        Key("scale_attn_weights", default=True, check=boolean),
        Key("multi_query", default=True, check=boolean),
    ), kv_heads=lambda r, heads: 1 if r("multi_query") else heads),
    "gptj": _gpt2_family(_gptj, False, 2048, (
        _gelu_key("gelu_new", "activation_function"),
        Key("rotary_dim", default=64, check=optional_positive_int),
    )),
    "falcon": Family(
        _keys(_renamed_core(FALCON_CONFIG_NAMES, True, 2048), (
            Key("num_kv_heads", check=optional_size(4096)),
            Key("multi_query", default=True, check=boolean),
            Key("new_decoder_architecture", default=False, check=boolean),
            Key("parallel_attn", default=True, check=boolean),
            Key("num_ln_in_parallel_attn", check=optional_positive_int),
            Key("bias", default=False, check=boolean),
            # Falcon-RW's biases are rounded to bfloat16 per position, and transformers' eager and SDPA paths add
            # them differently (once or twice): no one reference to hold Ferrum's ALiBi to
            Key("alibi", default=False, unsupported=True, check=falsy(
                "Falcon-RW's ALiBi positions are not supported (BLOOM's and MPT's are); use a Falcon with rope")),
            _gelu_key("gelu", "activation"),
        ), _ROPE[:3]),
        _falcon,
        eps_default=1e-5,
        eps_key="layer_norm_epsilon",
        names=FALCON_CONFIG_NAMES,
        kv_heads=_falcon_kv_heads,
    ),
    "gpt_neo": Family(  # EleutherAI's GPT-Neo 125M-2.7B
        _keys(_renamed_core(GPT_NEO_CONFIG_NAMES, True, 2048), (
            Key("attention_types", default=[[["global", "local"], 12]]),
            Key("window_size", default=256, check=positive_int),
            _gelu_key("gelu_new", "activation_function"),
        )),
        _gpt_neo,
        eps_default=1e-5,
        eps_key="layer_norm_epsilon",
        names=GPT_NEO_CONFIG_NAMES,
    ),
    "opt": Family(  # Meta's OPT, Galactica
        _keys(_renamed_core(OPT_CONFIG_NAMES, True, 2048), (
            Key("activation_function", default="relu", check=one_of(*_OPT_ACTIVATIONS), unsupported=True),
            Key("enable_bias", default=True, check=boolean),
            Key("layer_norm_elementwise_affine", default=True, check=boolean),
            Key("word_embed_proj_dim", check=optional_positive_int),
            Key("do_layer_norm_before", default=True, unsupported=True, check=lambda v: None if v in (None, True) else (
                f"is {v!r}: OPT-350m's post-norm blocks are not supported; use another OPT size")),
            Key("_remove_final_layer_norm", default=False, unsupported=True, check=falsy(
                "an OPT without its final norm is not supported; use a checkpoint converted with it")),
        )),
        _opt,
        eps_default=1e-5,
        eps_key=None,  # nn.LayerNorm's
        names=OPT_CONFIG_NAMES,
    ),
    "biogpt": Family(  # Microsoft's BioGPT, BioGPT-Large
        _keys(_core(True, eps_key="layer_norm_eps"), (
            _gelu_key("gelu"),
            Key("scale_embedding", default=True, check=boolean),
        )),
        _biogpt,
        eps_default=1e-12,
        eps_key="layer_norm_eps",
    ),
    "xglm": Family(  # Meta's XGLM 564M-7.5B
        _keys(_renamed_core(XGLM_CONFIG_NAMES, True, 2048), (
            _gelu_key("gelu", "activation_function"),
            Key("scale_embedding", default=True, check=boolean),
        )),
        _xglm,
        eps_default=1e-5,
        eps_key=None,  # nn.LayerNorm's
        names=XGLM_CONFIG_NAMES,
    ),
    "persimmon": _layer_norm_family(_persimmon, False, (  # Adept's Persimmon 8B (Fuyu's language model)
        _ungated_key("relu2"),
        Key("partial_rotary_factor", check=optional_positive_number),
        Key("qk_layernorm", default=True, check=boolean),
    )),
    "codegen": _gpt2_family(_codegen, False, 2048, (  # Salesforce's CodeGen 350M-16B
        _gelu_key("gelu_new", "activation_function"),
        Key("rotary_dim", default=64, check=optional_positive_int),
    )),
    "bloom": Family(  # BigScience's BLOOM, BLOOMZ (560M-176B)
        _keys(_renamed_core(BLOOM_CONFIG_NAMES, True, 2048), (
            Key("apply_residual_connection_post_layernorm", default=False, unsupported=True, check=falsy(
                "a BLOOM whose residual stream carries the normed input is not supported")),
        )),
        _bloom,
        eps_default=1e-5,
        eps_key="layer_norm_epsilon",
        names=BLOOM_CONFIG_NAMES,
        derive=_bloom_hidden,
    ),
    "mpt": Family(  # MosaicML's MPT-7B / 30B
        _keys(_renamed_core(MPT_CONFIG_NAMES, True, 2048), (
            Key("attn_config.alibi", default=True, unsupported=True, check=lambda v: None if v in (None, True) else (
                f"is {v!r}: an MPT without ALiBi (learned positions) is not supported, nor by transformers")),
            # MosaicML's code reads it, transformers always runs 8 (as every release says)
            Key("attn_config.alibi_bias_max", default=8, unsupported=True, check=one_of(None, 8, 8.0)),
            Key("attn_config.clip_qkv", check=optional_positive_number),
            Key("attn_config.softmax_scale", check=optional_positive_number),
            Key("attn_config.attn_type", default="multihead_attention", unsupported=True,
                check=one_of(None, "multihead_attention")),
            Key("attn_config.qk_ln", default=False, unsupported=True, check=falsy(
                "MPT's q/k LayerNorms are not supported, nor by transformers")),
            Key("attn_config.prefix_lm", default=False, unsupported=True, check=falsy(
                "MPT's prefix-LM attention (bidirectional over the prompt) is not supported")),
            Key("expansion_ratio", default=4, unsupported=True, check=one_of(4, 4.0)),
            Key("no_bias", default=True, unsupported=True, check=lambda v: None if v in (None, True) else (
                f"is {v!r}: an MPT with biases is not supported, nor by transformers (it builds none)")),
            Key("logit_scale", unsupported=True, check=lambda v: None if v is None else (
                f"is {v!r}: scaled MPT logits are not supported, nor by transformers")),
        )),
        _mpt,
        eps_default=1e-5,
        eps_key="layer_norm_epsilon",
        names=MPT_CONFIG_NAMES,
        nested=("attn_config",),
    ),
    "starcoder2": _layer_norm_family(_starcoder2, True, _core_defaults(num_key_value_heads=2), _WINDOW, (
        _gelu_key("gelu_pytorch_tanh"),
        Key("use_bias", default=True, check=boolean),
    ), eps_key="norm_epsilon"),
    "nemotron": _layer_norm_family(_nemotron, False, _core_defaults(vocab_size=256_000, max_position_embeddings=4096), (
        _ungated_key("relu2"),
        Key("partial_rotary_factor", check=optional_positive_number),
        Key("attention_bias", default=False, check=boolean),
        Key("mlp_bias", default=False, check=boolean),
    ), eps_key="norm_eps"),
    "apertus": Family(  # Swiss AI's Apertus 8B / 70B
        _keys(_core(False), _core_defaults(vocab_size=131_072, max_position_embeddings=65_536), _ROPE, (
            Key("rope_parameters", default=_APERTUS_ROPE),
            Key("hidden_act", default="xielu", check=one_of(*_APERTUS_ACTIVATIONS), unsupported=True),
            Key("attention_bias", default=False, check=boolean),
        )),
        _apertus,
        eps_default=1e-5,
    ),
    "nanochat": Family(  # Karpathy's nanochat (transformers' port; mlx-lm's conversions under nanochat's own names)
        _keys(_core(False), _core_defaults(  # NanoChatConfig's (mlx-lm's conversions give every size)
            hidden_size=768, intermediate_size=8192, num_hidden_layers=12, num_attention_heads=6, vocab_size=50304,
            max_position_embeddings=2048,
        ), _ROPE, (
            _ungated_key("relu2"),
            Key("attention_bias", default=False, check=boolean),
            Key("final_logit_softcapping", default=15.0, check=optional_positive_number),
        )),
        _nanochat,
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
    "arcee": Family(  # Arcee AFM-4.5B
        _keys(_core(False), _core_defaults(vocab_size=32000, max_position_embeddings=4096), _ROPE, (
            _ungated_key("relu2"),
            Key("attention_bias", default=False, check=boolean),
            Key("mlp_bias", default=False, check=boolean),
        )),
        _arcee,
        eps_default=1e-5,
    ),
    "exaone": Family(  # EXAONE 3 / 3.5: Llama's blocks under the release's names and config keys
        _keys(_core(False), _ROPE, _theta(500_000.0), _SILU,
              (Key("attention_bias", default=False, check=boolean), Key("mlp_bias", default=False, check=boolean))),
        _exaone,
        eps_default=1e-5,
        derive=_aliases({"num_layers": "num_hidden_layers", "layer_norm_epsilon": "rms_norm_eps",
                         "activation_function": "hidden_act"}),
    ),
    "internlm3": Family(  # InternLM3: Llama's blocks; the release's qkv_bias / bias are attention_bias / mlp_bias
        _keys(_core(False, head_dim_default=128), _ROPE, _SILU,
              (Key("attention_bias", default=False, check=boolean), Key("mlp_bias", default=False, check=boolean))),
        _internlm3,
        eps_default=1e-5,
        derive=_aliases({"qkv_bias": "attention_bias", "bias": "mlp_bias"}),
    ),
    "internlm2": Family(  # InternLM2 / 2.5 (remote code): packed, grouped wqkv
        _keys(_core(False), _ROPE, _SILU, (Key("bias", default=True, check=boolean),)),
        _internlm2,
    ),
    "iquestcoder": Family(  # IQuest-Coder-V1 (not its Loop variants): Llama's blocks
        _keys(_core(False, head_dim_default=128), _ROPE, _SILU, (
            Key("attention_bias", default=False, check=boolean), Key("mlp_bias", default=False, check=boolean),
            Key("clip_qkv", check=falsy("transformers' IQuestCoder refuses it too; load a release without it"),
                unsupported=True),
            Key("use_sliding_window", default=False, check=falsy(
                "transformers' IQuestCoder refuses it too; set it to false"), unsupported=True),
        )),
        _llama_like(False, None, _no_windows),
        eps_default=1e-5,
    ),
    "cwm": Family(  # Meta's Code World Model: Llama's blocks, three sliding layers to one full
        _keys(_core(False, head_dim_default=128), _ROPE, _SILU, _LAYER_TYPES, (
            Key("rope_parameters", default=_CWM_ROPE),
            Key("sliding_window", default=8192, check=optional_positive_int),
            Key("mlp_bias", default=False, check=boolean),
        )),
        _llama_like(False, None, _cwm_windows),
        eps_default=1e-5,
    ),
    "jais2": _layer_norm_family(_jais2, False, (  # Inception's Jais 2
        _ungated_key("relu2"),
        Key("attention_bias", default=True, check=boolean),
        Key("mlp_bias", default=True, check=boolean),
    )),
    "hyperclovax": Family(  # NAVER's HyperCLOVA X SEED (Think 14B): Granite's multipliers, Peri-LN
        _keys(_core(False), _ROPE, _SILU, (
            Key("attention_bias", default=False, check=boolean), Key("mlp_bias", default=False, check=boolean),
            *(Key(name, default=1.0, check=positive_number)
              for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling")),
            Key("attention_multiplier", check=optional_positive_number),  # null: 1 / sqrt(head_dim)
            Key("use_post_norm", default=True, check=boolean),
        )),
        _hyperclovax,
    ),
    "granite_swa": Family(  # IBM's Granite SWA: Granite's multipliers, sliding layers, per-layer rope, sinks
        _keys(_core(True), _ROPE, _SILU, _GRANITE, _LAYER_TYPES, (
            Key("sliding_window", default=128, check=optional_positive_int),
            Key("layer_rope_theta"),
        )),
        _granite_swa,
        eps_default=1e-5,
    ),
    "minicpm": Family(  # OpenBMB's MiniCPM 1B / 2B (remote code): Llama's blocks with muP scalings
        _keys(_core(True), _ROPE, _SILU, _MINICPM),
        _minicpm,
    ),
    "minicpm3": Family(  # OpenBMB's MiniCPM3: latent attention, muP scalings
        _keys(_core(True), _ROPE, _SILU, _mla_keys(768, 64, 64, kv_lora=256), _MINICPM3,
              (Key("qk_rope_head_dim", default=32, check=size(4096)),)),
        _minicpm3,
        eps_default=1e-5,
        kv_heads=_mla_kv_heads,
        head_dim=_mla_head_dim,
        derive=_minicpm3_v_head_dim,
    ),
    "youtu": Family(  # Tencent's Youtu-LLM: DeepSeek-V3's latent attention over Llama's dense MLPs
        _keys(_core(True), _ROPE, _SILU, _MLA, (Key("rope_interleave", default=True, check=boolean),)),
        lambda r, sizes: _latent_attention(r, sizes, interleaved=bool(r("rope_interleave"))),
        kv_heads=_mla_kv_heads,
        head_dim=_mla_head_dim,
    ),
}
#: Youtu-LLM's release (remote code; mlx-lm's conversions) names it youtu_llm; transformers, youtu.
FAMILIES["youtu_llm"] = FAMILIES["youtu"]
