"""Mamba-1 / Mamba-2 families and their attention hybrids (Jamba, Bamba, Falcon-H1, Nemotron-H, Granite 4)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable

from ferrum.arch.families._shared import (
    FULL, Family, LINEAR, PLAMO_NORM_OFFSETS, PLAMO_STORED, SANDWICH_NORMS, Sizes, _LLAMA_ROPES, _ROPE, _SILU, _core,
    _core_defaults, _keys, _plamo_core, _rope_spec, _without_nulls, read_rope,
)
from ferrum.arch.families.llama_like import _GRANITE, _granite_multipliers, _llama_like, _no_windows
from ferrum.arch.families.moe import GRANITEMOESHARED_NAMES
from ferrum.arch.keys import (
    Key, KeyReader, boolean, falsy, lists_of, one_of, optional_non_negative_int, optional_positive_int,
    optional_positive_number, optional_size, positive_int, positive_number, size,
)
from ferrum.arch.rope import Rope
from ferrum.arch.shared_block import MAMBA, SharedBlockSpec
from ferrum.arch.spec import Architecture, LayerSpec
from ferrum.moe.spec import KEYS as MOE_KEYS, nemotron_h_moe, with_moe
from ferrum.recurrent.mamba import MambaSpec
from ferrum.recurrent.mamba2 import Mamba2Spec
from ferrum.recurrent.plamo2 import Plamo2MambaSpec


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
    types = next((t for t in (r("layer_types"), r("layers_block_type")) if t is not None), ["mamba"] * sizes.num_layers)
    if not lists_of(types, sizes.num_layers, _MAMBA_HYBRID_MIXERS):
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


#: Zamba 2's layer kinds, as transformers 5 remaps them and as the releases write them: a Mamba-2 layer, or a hybrid
#: one (a shared block before its Mamba-2).
_ZAMBA2_LAYERS = {"mamba": "mamba2", LINEAR: "mamba2", "hybrid": "shared_mamba2"}
#: Zamba 2's modules: the final norm ``final_layernorm``.
ZAMBA2_STORED = {"norm": "final_layernorm"}


def _zamba2_layers(r: KeyReader, sizes: Sizes) -> list[str]:
    """Each layer's mixer from layers_block_type; transformers' default pattern (Zamba2-2.7B's) where it is absent."""
    types = r("layers_block_type")
    if types is None:
        types = ["mamba"] + (["mamba"] * 5 + ["hybrid"]) * 7 + ["mamba"] * 4 + ["hybrid"] + ["mamba"] * 3 + [
            "hybrid"] + ["mamba"] * 2
    if not lists_of(types, sizes.num_layers, _ZAMBA2_LAYERS):
        r.fail("layers_block_type", f"must list {sizes.num_layers} entries of 'mamba' (or 'linear_attention') / "
                                    f"'hybrid', got {types!r}")
    return [_ZAMBA2_LAYERS[t] for t in types]


def _zamba2(r: KeyReader, sizes: Sizes) -> Architecture:
    """Zyphra's Zamba 2: Mamba-2 layers, and hybrid ones that run one of num_mem_blocks shared attention + gated GELU
    MLP blocks (ABAB...) on ``[x, embeddings]`` before their Mamba-2, with per-use adapters and a per-use linear
    (:mod:`ferrum.arch.shared_block`); attention without rope unless use_mem_rope, its scores scaled by
    ``(head_dim / 2) ** -0.5`` as transformers does. Mamba-2's steps are clamped below at time_step_min, as
    transformers' prompt pass clamps them."""
    h = sizes.hidden_size
    heads, groups = r("n_mamba_heads"), r("mamba_ngroups")
    inner = r("mamba_expand") * h
    if inner % heads:
        r.fail("n_mamba_heads", f"({heads}) must divide mamba_expand * hidden_size ({inner})")
    if heads % groups:
        r.fail("mamba_ngroups", f"({groups}) must divide n_mamba_heads ({heads})")
    r("hidden_act"), r("add_bias_linear"), r("chunk_size"), r("use_mem_eff_path")
    if r("use_shared_attention_adapter") and sizes.num_kv_heads != sizes.num_heads:
        r.fail("num_key_value_heads", f"({sizes.num_kv_heads}) must equal num_attention_heads ({sizes.num_heads}) "
                                      "where use_shared_attention_adapter is set: the k and v adapters give every head "
                                      "(transformers cannot run it either)")
    mixers = _zamba2_layers(r, sizes)
    uses = tuple(i for i, m in enumerate(mixers) if m == "shared_mamba2")
    mamba = Mamba2Spec(heads, inner // heads, groups, r("mamba_d_state"), r("mamba_d_conv"),
                       (float(r("time_step_min")), float("inf")), conv_bias=r("use_conv_bias"), module="mamba",
                       norm_eps=1e-5)  # Zamba2RMSNormGated's, in every layer whatever rms_norm_eps
    shared = SharedBlockSpec(h, sizes.num_heads, sizes.num_kv_heads, sizes.head_dim, sizes.intermediate_size, uses,
                             r("num_mem_blocks"), r("adapter_rank"), bool(r("use_shared_attention_adapter")),
                             replace(mamba, module=MAMBA), tied=sizes.tie_word_embeddings)
    if r("use_mem_rope"):
        key, spec = _rope_spec(r)
        rope = read_rope(r, sizes, spec, key, ("default",))
    else:
        rope = Rope.unrotated(sizes.head_dim)
    layers = tuple(LayerSpec(None, rope, mixer=m, mlp="none", norms=() if m == "shared_mamba2" else None,
                             shared_use=uses.index(i) if m == "shared_mamba2" else None)
                   for i, m in enumerate(mixers))
    return Architecture(
        layers=layers, norms={"pre_attn": "input_layernorm"}, attn_scale=(sizes.head_dim / 2) ** -0.5,
        mamba2=mamba, shared_block=shared, aliases=shared.aliases, unloaded=shared.unloaded,
        keep_float32=(".A_log", ".dt_bias", ".D"), stored_names=ZAMBA2_STORED)


def _zamba2_context(raw: dict[str, Any]) -> dict[str, Any]:
    """use_long_context: transformers sets max_position_embeddings to 16384 (and changes nothing else)."""
    return {**raw, "max_position_embeddings": 16384} if raw.get("use_long_context") else raw


def _at_least_two(value: Any) -> str | None:
    return None if isinstance(value, int) and not isinstance(value, bool) and value >= 2 else (
        f"must be an integer of at least 2 (one attention layer in each mamba_step), got {value!r}")


def _plamo2_mixers(r: KeyReader, sizes: Sizes) -> list[str]:
    """Each layer's mixer as mlx-lm's ``is_mamba`` picks it: attention where ``i % mamba_step == mamba_step // 2``,
    or on the last layer alone where there are no more than ``mamba_step // 2``; Mamba elsewhere; attention
    everywhere without mamba_enabled."""
    step, count = r("mamba_step"), sizes.num_layers
    if not r("mamba_enabled"):
        return ["attention"] * count
    if count <= step // 2:
        return ["attention" if i == count - 1 else "mamba2" for i in range(count)]
    return ["attention" if i % step == step // 2 else "mamba2" for i in range(count)]


def _plamo2(r: KeyReader, sizes: Sizes) -> Architecture:
    """Preferred Networks' PLaMo 2, as mlx-lm runs it: Mamba layers (:mod:`ferrum.recurrent.plamo2`) and rope
    attention layers with per-head q/k weights after a weightless RMSNorm (eps 1e-6), each mixer and the SwiGLU MLP
    between a norm before and one after, the norms' offsets their own. mlx-lm attends over the whole context in
    every attention layer (its TODO: attention_window_size and full_attention_idx are not read), and so does
    Ferrum."""
    r("attention_window_size"), r("full_attention_idx"), r("mamba_chunk_size")
    h = sizes.hidden_size
    mamba = Plamo2MambaSpec(r("mamba_num_heads"), sizes.head_dim, r("mamba_d_state"), r("mamba_d_conv"),
                            max(64, h // 16))
    rope = Rope(theta=10000.0, head_dim=sizes.head_dim, rotary_dim=sizes.head_dim, kind="default")
    return Architecture(
        layers=tuple(LayerSpec(None, rope, mixer=m) for m in _plamo2_mixers(r, sizes)),
        norms=SANDWICH_NORMS, norm_offset=1.0,
        norm_offsets={**PLAMO_NORM_OFFSETS, "self_attn.q_norm": 0.0, "self_attn.k_norm": 0.0},
        attn_scale=1.0 / math.sqrt(sizes.head_dim), qk_norm="each_head", norm_eps={"qk": 1e-6},
        fused_qkv=True, fused_gate_up=True, mamba2=mamba, keep_float32=(".A_log", ".dt_bias", ".D"),
        stored_names={**PLAMO_STORED, "self_attn.q_norm.weight": "mixer.q_weight",
                      "self_attn.k_norm.weight": "mixer.k_weight"},
    )


TABLE: dict[str, Family] = {
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
    "zamba2": Family(  # Zyphra's Zamba 2: Mamba-2 layers, shared attention + MLP blocks before some of them
        _keys(_core(True), _core_defaults(max_position_embeddings=4096), (
            Key("intermediate_size", check=optional_size(1 << 20)),  # None: 4 * hidden_size
            Key("head_dim"),  # transformers' alias of attention_head_dim, which it computes: 2 * hidden / heads
            Key("layers_block_type"),
            Key("mamba_d_state", default=64, check=positive_int),
            Key("mamba_d_conv", default=4, check=positive_int),
            Key("mamba_expand", default=2, check=positive_int),
            Key("mamba_ngroups", default=1, check=positive_int),
            Key("n_mamba_heads", default=8, check=positive_int),
            Key("use_conv_bias", default=True, check=boolean),
            Key("time_step_min", default=0.001, check=positive_number),
            Key("chunk_size", default=256),  # the training kernels' chunks: the same numbers whatever it is
            Key("use_mem_eff_path", default=False),  # a fused training path: the same numbers
            Key("num_mem_blocks", default=1, check=positive_int),
            Key("use_shared_attention_adapter", default=False, check=boolean),
            Key("adapter_rank", default=128, check=positive_int),
            Key("use_mem_rope", default=False, check=boolean),
            Key("use_long_context", default=False, check=boolean),
            Key("rope_theta", check=optional_positive_number), Key("rope_scaling"), Key("rope_parameters"),
            Key("hidden_act", default="gelu", check=one_of("gelu"), unsupported=True),
            Key("add_bias_linear", default=False, check=falsy(
                "Ferrum runs Zamba 2's projections unbiased, as its releases are; load such a checkpoint elsewhere"),
                unsupported=True),
        )),
        _zamba2,
        eps_default=1e-5, derive=_zamba2_context, head_dim=lambda r: 2 * r("hidden_size") // r("num_attention_heads"),
    ),
    "plamo2": Family(  # Preferred Networks' PLaMo 2: Mamba and attention layers in sandwich norms (mlx-lm's)
        _keys((
            *_plamo_core("hidden_size_per_head"),
            Key("attention_window_size", default=2048),  # not read by mlx-lm (see _plamo2)
            Key("full_attention_idx"),  # nor this
            Key("mamba_d_state", default=64, check=positive_int),
            Key("mamba_d_conv", default=4, check=positive_int),
            Key("mamba_num_heads", default=64, check=positive_int),
            Key("mamba_step", default=2, check=_at_least_two),
            Key("mamba_chunk_size", default=256),  # the training kernels' chunks: the same numbers
            Key("mamba_enabled", default=True, check=boolean),
        )),
        _plamo2,
        derive=_without_nulls, head_dim=lambda r: r("hidden_size_per_head"),
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
}
