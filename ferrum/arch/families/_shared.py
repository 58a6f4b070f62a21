"""What more than one kind of family uses: the Family record, the sizes', rope and layer-kind readers."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

from ferrum.arch.keys import (
    Key, KeyReader, boolean, lists_of, one_of, optional_positive_int, optional_positive_number, optional_size,
    positive_int, positive_number, size,
)
from ferrum.arch.rope import Rope, longrope_attention_factor, yarn_attention_factor
from ferrum.arch.spec import Architecture
from ferrum.errors import ConfigError

LLAMA_NORMS = {"pre_attn": "input_layernorm", "pre_mlp": "post_attention_layernorm"}
SANDWICH_NORMS = {
    "pre_attn": "input_layernorm", "post_attn": "post_attention_layernorm",
    "pre_mlp": "pre_feedforward_layernorm", "post_mlp": "post_feedforward_layernorm",
}
#: OLMo 2: no norm before attention or MLP; each one's output is normed before it joins the residual stream.
POST_NORMS = {"post_attn": "post_attention_layernorm", "post_mlp": "post_feedforward_layernorm"}
SLIDING, FULL = "sliding_attention", "full_attention"
LINEAR = "linear_attention"


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


#: PLaMo 2's and 3's modules: its layers under ``layers.layers``, each one ``mixer`` (attention or Mamba) between a
#: norm before and after it, then the MLP between two more.
PLAMO_STORED = {"layers": "layers.layers", "input_layernorm": "pre_mixer_norm",
                "post_attention_layernorm": "post_mixer_norm", "pre_feedforward_layernorm": "pre_mlp_norm",
                "post_feedforward_layernorm": "post_mlp_norm", "self_attn.qkv_proj": "mixer.qkv_proj",
                "self_attn.o_proj": "mixer.o_proj"}
#: PLaMo's norms after its mixer and MLP scale by ``w`` plus these (the others by ``1 + w``), as mlx-lm's do.
PLAMO_NORM_OFFSETS = {"post_attention_layernorm": 1.0 / 5, "post_feedforward_layernorm": 1.0 / 5 ** 1.5}


def _plamo_core(head_dim_key: str) -> tuple[Key, ...]:
    """PLaMo 2's and 3's sizes' keys with the defaults mlx-lm's ModelArgs give them, one table for both releases;
    the heads' size is under ``head_dim_key`` (PLaMo 2's hidden_size_per_head, PLaMo 3's head_dim)."""
    return (
        Key("hidden_size", default=4096, check=size(1 << 17)),
        Key("intermediate_size", default=13312, check=size(1 << 20)),
        Key("num_hidden_layers", default=32, check=size(1024)),
        Key("num_attention_heads", default=32, check=size(4096)),
        Key("num_key_value_heads", default=4, check=size(4096)),
        Key(head_dim_key, default=128, check=size(4096)),
        Key("vocab_size", default=32000, check=size(1 << 23)),
        Key("max_position_embeddings", default=2048, check=size(1 << 28)),
        Key("rms_norm_eps", default=1e-6, check=positive_number),
        Key("tie_word_embeddings", default=True, check=boolean),
    )



def _without_nulls(raw: dict[str, Any]) -> dict[str, Any]:
    """A config whose null keys take their defaults, as they do in mlx-lm's ModelArgs where releases leave them."""
    return {key: value for key, value in raw.items() if value is not None}



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
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=r(names.get("vocab_size", "vocab_size")),
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
    if not lists_of(types, sizes.num_layers, (SLIDING, FULL)):
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
_LAYER_TYPES = (Key("layer_types"),)


# ------------------------------------------------------------ read by several kinds

#: The rope scalings transformers' Llama-derived families apply.
_LLAMA_ROPES = ("default", "linear", "dynamic", "llama3", "yarn")


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
    for kind in (FULL, SLIDING):
        if not isinstance(params.get(kind, {}), (dict, type(None))):
            r.fail("rope_parameters", f"entry {kind!r} must be an object of rope settings, got {params[kind]!r}")
    full, sliding = (dict(params.get(kind) or {}) for kind in (FULL, SLIDING))
    scaling = _rope_object(r, "rope_scaling")
    if scaling and _scalings_differ(full, scaling):
        r.fail("rope_scaling", f"is {scaling!r} but rope_parameters' {FULL!r} entry is {full!r}; the two disagree "
                               "(transformers 5 merges rope_scaling into it); keep the one meant in rope_parameters")
    return full, sliding


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


#: The rope scalings the LayerNorm families' configs may ask for.
_LAYER_NORM_ROPES = ("default", "linear", "dynamic")
