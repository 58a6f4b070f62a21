"""Linear-attention hybrids: Gated DeltaNet (Qwen3.5, Qwen3-Next, OLMo Hybrid), Kimi Linear, LFM2, MiniMax,
RecurrentGemma."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable

import numpy as np

from ferrum.arch.attn_res import RELEASE_NAMES as RES_RELEASE_NAMES, AttnResSpec
from ferrum.arch.families._shared import (
    FULL, Family, LINEAR, LLAMA_NORMS, POST_NORMS, SLIDING, Sizes, _LLAMA_ROPES, _ROPE, _SILU, _WINDOW,
    _agreeing_aliases, _aliased, _core, _core_defaults, _keys, _per_kind_rope_specs, _rope_spec, _rotary_dim,
    _theta, read_rope,
)
from ferrum.arch.families.latent import _latent_attention, _mla_head_dim, _mla_keys, _mla_kv_heads
from ferrum.arch.families.moe import BAILING_KEYS, SARVAM_NAMES, _bailing_moe
from ferrum.arch.keys import (
    Key, KeyReader, boolean, falsy, lists_of, one_of, optional_non_negative_int, optional_positive_int,
    optional_positive_number, optional_size, positive_int, positive_number, size,
)
from ferrum.arch.mla import MlaSpec
from ferrum.arch.rope import Rope
from ferrum.arch.spec import Architecture, LayerSpec
from ferrum.moe.activation import Situ
from ferrum.moe.spec import KEYS as MOE_KEYS, with_moe
from ferrum.recurrent.gated_delta import GatedDeltaSpec
from ferrum.recurrent.kimi_delta import FUSED_TAPS, KimiDeltaSpec
from ferrum.recurrent.lightning import (
    A_LOG, BUFFERS, LightningSpec, release_slope_rates, ring_slope_rates, slope_rates,
)
from ferrum.recurrent.rg_lru import RgLruSpec
from ferrum.recurrent.short_conv import ShortConvSpec
#: A hybrid's layer types -> the mixer each runs (LayerSpec.mixer).
_HYBRID_MIXERS = {LINEAR: "gated_delta", FULL: "attention"}


def _hybrid_mixers(r: KeyReader, sizes: Sizes) -> list[str]:
    """Each layer's mixer from layer_types, else every ``full_attention_interval``-th layer attends (transformers'
    default of 4: three Gated DeltaNet layers, then full attention)."""
    types = r("layer_types")
    if types is None:
        interval = r("full_attention_interval")
        types = [FULL if (i + 1) % interval == 0 else LINEAR for i in range(sizes.num_layers)]
    if not lists_of(types, sizes.num_layers, _HYBRID_MIXERS):
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
    if not lists_of(types, sizes.num_layers, (LINEAR, FULL)):
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


def _kimi_k3_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """Kimi K3's config as mlx-lm's kimi_k3 reads it, in Kimi Linear's terms (:func:`_kimi_linear_keys`): a layer
    is Kimi Delta Attention where linear_attn_config's kda_layers (1-indexed) lists it, latent attention otherwise;
    sparse from first_k_dense_replace (default 0) every moe_layer_freq-th; the KDA gate's lower bound and full-rank
    gate from linear_attn_config."""
    section = raw.get("linear_attn_config")
    section = section if isinstance(section, dict) else {}
    out = dict(raw)
    layers, kda = raw.get("num_hidden_layers"), section.get("kda_layers")
    if out.get("layer_types") is None and isinstance(layers, int) and isinstance(kda, list):
        out["layer_types"] = [LINEAR if i + 1 in kda else FULL for i in range(layers)]
    first, every = raw.get("first_k_dense_replace", 0), raw.get("moe_layer_freq", 1)
    if out.get("mlp_layer_types") is None and isinstance(layers, int) and isinstance(first, int) and isinstance(
            every, int) and every > 0:
        out["mlp_layer_types"] = ["sparse" if i >= first and i % every == 0 else "dense" for i in range(layers)]
    for theirs, ours in (("gate_lower_bound", "kda_gate_lower_bound"), ("use_full_rank_gate", "kda_full_rank_gate")):
        if theirs in section:
            out[ours] = section[theirs]
    return _kimi_linear_keys(out)


def _kimi_k3(r: KeyReader, sizes: Sizes) -> Architecture:
    """Moonshot's Kimi K3 as mlx-lm runs it (``kimi_k3``): Kimi Linear's layers (:func:`_kimi_linear`) with SiTU
    (:class:`ferrum.moe.activation.Situ`) in every MLP and expert, the latent attention's output gated elementwise by
    the sigmoid of ``g_proj`` (mla_use_output_gate), the KDA output gate one full-rank ``g_proj`` where
    use_full_rank_gate and its log-decay bounded below where gate_lower_bound (Ling 3's bound, API 1.27), routed as
    mlx-lm routes it (dropped groups' experts masked with 0: :data:`ferrum.moe.routing.NOAUX_TC_ZERO_MASKED`);
    attention residuals where attn_res_block_size (:mod:`ferrum.arch.attn_res`, the release's ``<mix>.proj_weight``
    / ``.norm_weight``)."""
    arch = _kimi_linear(r, sizes)
    gate, bound, situ = r("mla_use_output_gate"), r("kda_gate_lower_bound"), Situ(
        float(r("activation_situ_beta") or 1.0), r("activation_situ_linear_beta"))
    delta = replace(arch.kimi_delta, gate=("gate_proj",) if r("kda_full_rank_gate") else arch.kimi_delta.gate,
                    lower_bound=None if bound is None else float(bound))
    block = r("attn_res_block_size")
    res = None if block is None else AttnResSpec(block, sizes.rms_norm_eps)
    return replace(arch, activation=situ, kimi_delta=delta, mla=replace(arch.mla, value_gate=gate),
                   attn_output_gate=gate, attn_gate_stored=gate, attn_res=res,
                   stored_names={"self_attn.gate_proj": "self_attn.g_proj", **(RES_RELEASE_NAMES if res else {})},
                   unloaded=_layers_past(sizes.num_layers))


def _layers_past(count: int) -> str:
    """A regular expression of the tensors of layers numbered ``count`` on: the releases' multi-token prediction
    layers stored as extra layers, which mlx-lm's kimi_k3 sanitize drops."""
    return rf"(^|\.)layers\.(?!(?:{'|'.join(map(str, range(count)))})\.)\d+\."


def _kimi_k3_moe(r: KeyReader, sizes: Sizes) -> Architecture:
    """:func:`_kimi_k3` over its sparse MLPs, whose routed and shared experts run SiTU too; latent experts where
    routed_expert_hidden_size (``MoeSpec.latent``: its routed_expert_down_proj / _norm, where latent_moe_use_norm,
    / _up_proj). Without num_experts (mlx-lm's default) or with 0, every MLP is dense, as mlx-lm runs it."""
    arch = with_moe("kimi_k3", _kimi_k3)(r, sizes) if r("num_experts") else _kimi_k3(r, sizes)  # none: dense only
    if arch.moe is not None:
        moe = replace(arch.moe, activation=arch.activation, shared_activation=arch.activation)
        if r("routed_expert_hidden_size") is not None:
            norm = "routed_expert_norm" if r("latent_moe_use_norm") else None
            moe = replace(moe, latent=("routed_expert_down_proj", norm, "routed_expert_up_proj"),
                          latent_size=r("routed_expert_hidden_size"))
        arch = replace(arch, moe=moe)
    return replace(arch, layouts=(("language_model.model.", "language_model.lm_head.weight",
                                   _kimi_k3_mlx_lm_names(arch)), *arch.layouts))


def _kimi_k3_mlx_lm_names(arch: Architecture) -> dict[str, str]:
    """mlx-lm's conversions (kimi_k3's sanitize; always under its wrapper's ``language_model.``): the sparse MLPs
    under ``mlp`` (experts stacked in switch_mlp, the correction bias beside the router), KDA's q/k/v fused in
    ``qkv_proj`` and their taps in ``qkv_conv.conv`` (``KimiDeltaSpec.fused``). Only modules the model has, so a
    checkpoint holds them all (a dense-only one no sparse MLP); attention residuals' tensors under mlx-lm's names."""
    names = {f"self_attn.{FUSED_TAPS}": "self_attn.qkv_conv.conv"} if any(
        layer.mixer == "kimi_delta" for layer in arch.layers) else {}
    if arch.attn_res is not None:  # mlx-lm's names are Ferrum's
        names.update({ours: ours for ours in RES_RELEASE_NAMES})
    moe = arch.moe
    if moe is not None:
        modules = [f"switch_mlp.{p}" for p in _KIMI_PROJS] + [m for m in moe.latent or () if m is not None]
        modules += [f"shared_experts.{p}" for p in _KIMI_PROJS] if moe.shared_expert_size else []
        names.update({"block_sparse_moe": "mlp", "block_sparse_moe.gate": "mlp.gate",
                      **{f"block_sparse_moe.{m}": f"mlp.{m}" for m in modules}})
    return names


_KIMI_K3 = (
    *(key for key in _KIMI_LINEAR if key.name not in ("moe_layer_freq",)),
    Key("hidden_act", default="situ", check=one_of("situ"), unsupported=True),
    Key("moe_layer_freq", default=1, check=positive_int),
    Key("activation_situ_beta", check=optional_positive_number),
    Key("activation_situ_linear_beta", check=optional_positive_number),
    Key("mla_use_output_gate", default=False, check=boolean),
    Key("kda_gate_lower_bound", check=lambda v: None if v is None else _negative(v)),
    Key("kda_full_rank_gate", default=False, check=boolean),
    Key("attn_res_block_size", check=optional_positive_int),
    Key("routed_expert_hidden_size", check=optional_positive_int),
    Key("latent_moe_use_norm", default=False, check=boolean),
)


#: Ling 3's keys as transformers' attribute_map (and its save_pretrained) spells them -> DeepSeek-V3's.
_BAILING_ALIASES = {**_KIMI_ALIASES, "num_mtp_layers": "num_nextn_predict_layers"}
#: The architectures that ship as model_type "bailing_hybrid": Ling 3's (transformers', its release's remote code).
_BAILING_ARCHITECTURES = ("BailingHybridForCausalLM", "BailingMoeV3ForCausalLM")
#: Ling 3's modules under its release's names (transformers' save_pretrained writes them back): ``attention`` for
#: both layer kinds, the latent attention's output ``dense`` and its per-head gate ``g_proj``, which the linear
#: layers' output gate is read by too (KimiDeltaSpec.gate); transformers saves the linear layers' output as
#: ``dense`` as well: ``dense`` reads back as o_proj (``_BAILING_READ``), which KimiDeltaSpec.split renames out_proj
#: in the linear layers.
BAILING_NAMES = {
    "embed_tokens": "word_embeddings",
    **{f"self_attn.{m}": f"attention.{m}" for m in (
        "q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj",
        "k_proj", "v_proj", "q_conv1d", "k_conv1d", "v_conv1d", "f_proj", "b_proj", "o_norm", "A_log", "dt_bias")},
    "self_attn.out_proj": "attention.dense",
    "self_attn.o_proj": "attention.dense",
    "self_attn.gate_proj": "attention.g_proj",
}
_BAILING_READ = {"attention.dense": "self_attn.o_proj"}
#: Its release's linear layers' output projection, ``o_proj`` (transformers loads it so).
_BAILING_RELEASED = {"self_attn.out_proj": "attention.o_proj"}


def _bailing_hybrid_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """Ling 3's config as transformers' BailingHybridConfig reads it: the attribute_map's spellings
    (num_experts_per_token, model_max_length...) under DeepSeek-V3's names where those are absent, the linear
    layers' heads of head_dim (its release's key; transformers sets head_dim to qk_rope_head_dim and saves
    linear_head_dim beside it), num_attention_heads of them, their convolution short_conv_kernel_size wide (whatever
    the linear_* copies say, as transformers sets them), and
    layer_types from layer_group_size (each group's last layer full attention) where the config gives none and the
    groups fill the layers (where they do not, transformers and Ling's own code disagree: :func:`_bailing_hybrid`)."""
    out = dict(raw)
    for theirs, ours in _BAILING_ALIASES.items():
        if theirs in raw and ours not in raw:
            out[ours] = raw[theirs]
    if out.get("linear_head_dim") is None:  # transformers saves it beside head_dim, which it then overwrites
        out["linear_head_dim"] = raw.get("head_dim") if raw.get("head_dim") is not None else 128
    for ours, theirs, default in (("linear_num_heads", "num_attention_heads", 32),
                                  ("linear_conv_kernel_dim", "short_conv_kernel_size", 4)):
        out[ours] = raw.get(theirs) if raw.get(theirs) is not None else default  # always theirs, as transformers
    layers, group = raw.get("num_hidden_layers", 42), raw.get("layer_group_size", 6)
    if out.get("layer_types") is None and isinstance(layers, int) and isinstance(group, int) and group > 0 and (
            layers % group == 0):
        out["layer_types"] = [FULL if (i + 1) % group == 0 else LINEAR for i in range(layers)]
    return out


def _bailing_hybrid(r: KeyReader, sizes: Sizes) -> Architecture:
    """inclusionAI's Ling 3 (transformers' BailingHybrid): Kimi Delta Attention layers (:mod:`ferrum.recurrent.
    kimi_delta`, one projection for the decay's input and one for the output gate, the log-decay bounded below where
    kda_safe_gate) between DeepSeek-V3's latent attention with rope in adjacent pairs, each head's output times the
    sigmoid of its own gate (``g_proj``); the sparse MLPs (grouped sigmoid routing, an ungated shared expert, dense
    first layers) are :func:`ferrum.moe.spec.with_moe`'s. Ling 2.5 / 2.6, also released as "bailing_hybrid", run
    lightning attention instead and are refused."""
    named = r.raw.get("architectures") or []
    other = [a for a in named if a not in _BAILING_ARCHITECTURES] if isinstance(named, list) else [named]
    if other:
        r.fail("architectures", f"names {other!r}; Ferrum runs Ling 3's bailing_hybrid "
                                f"({', '.join(_BAILING_ARCHITECTURES)}), not Ling 2.5 / 2.6's lightning attention "
                                "(BailingMoeV2_5ForCausalLM)", unsupported=True)
    types, n, group = r("layer_types"), sizes.num_layers, r("layer_group_size")
    if types is None and n % group:
        r.fail("layer_group_size", f"({group}) does not divide the {n} layers: transformers runs the last "
                                   f"{n % group} as linear attention, Ling's own code (and mlx-lm) as full attention; "
                                   "list layer_types in config.json to say which", unsupported=True)
    if not lists_of(types, n, (LINEAR, FULL)):
        r.fail("layer_types", f"must list {n} entries of {LINEAR!r} / {FULL!r}, got {types!r}")
    shared, routed = r("moe_shared_expert_intermediate_size"), r("moe_intermediate_size")
    if shared not in (None, routed):
        r.fail("moe_shared_expert_intermediate_size", f"is {shared}, but transformers sizes the shared experts "
                                                      f"moe_intermediate_size ({routed}) wide", unsupported=True)
    for limits in ("expert_swiglu_limit_list", "share_expert_swiglu_limit_list"):
        if any(limit not in (None, 0) for limit in r(limits) or []):
            r.fail(limits, "clamps the experts' SwiGLU, which transformers does not run and Ferrum does not "
                           "support; Ling's release was trained with it, so the model would run unclamped",
                   unsupported=True)
    r("no_kda_lora"), r("rope_interleave")
    arch = _latent_attention(r, sizes, interleaved=True)
    rope, unrotated = arch.layers[0].rope, Rope.unrotated(sizes.head_dim)  # the linear layers' q/k as stored
    delta = KimiDeltaSpec(r("linear_num_heads"), r("linear_head_dim"), r("linear_conv_kernel_dim"), forget=("f_proj",),
                          gate=("gate_proj",), out="out_proj",
                          lower_bound=float(r("kda_lower_bound")) if r("kda_safe_gate") else None)
    return replace(
        arch, layers=tuple(LayerSpec(None, unrotated, mixer="kimi_delta") if t == LINEAR else LayerSpec(None, rope)
                           for t in types),
        kimi_delta=delta, attn_output_gate=True, attn_gate_stored=True, attn_gate_per_head=True,
        keep_float32=(".A_log", ".dt_bias"), stored_names=BAILING_NAMES, read_names=_BAILING_READ,
        layouts=(("model.", "lm_head.weight", _BAILING_RELEASED),),
    )


def _negative(value: Any) -> str | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and -math.inf < value < 0:
        return None
    return f"must be a negative number, got {value!r}"


_BAILING_HYBRID = (
    Key("linear_head_dim", default=128, check=positive_int),
    Key("linear_num_heads", default=32, check=positive_int),
    Key("linear_conv_kernel_dim", default=4, check=positive_int),
    Key("layer_types"),
    Key("layer_group_size", default=6, check=positive_int),
    Key("kda_safe_gate", default=True, check=boolean),
    Key("kda_lower_bound", default=-5.0, check=_negative),
    Key("num_nextn_predict_layers", default=1, check=optional_non_negative_int),
    Key("moe_shared_expert_intermediate_size", check=optional_positive_int),
    Key("expert_swiglu_limit_list"),
    Key("share_expert_swiglu_limit_list"),
    # Ling's release code says so; transformers always turns adjacent pairs and reads one f_proj / g_proj
    Key("rope_interleave", default=True, unsupported=True, check=one_of(None, True)),
    Key("no_kda_lora", default=True, unsupported=True, check=one_of(None, True)),
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
    if not lists_of(types, sizes.num_layers, (LINEAR, FULL)):
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
    if not lists_of(types, n, _LFM2_MIXERS):
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


#: Lara Mini's released layer pattern, repeated (LaraMiniConfig's default).
_LARA_PATTERN = (LINEAR, SLIDING, LINEAR, FULL, SLIDING)
#: Lara Mini's checkpoints name the Gated DeltaNet's gated norm out_norm.
LARA_MINI_NAMES = {"linear_attn.norm": "linear_attn.out_norm"}


def _lara_mini(r: KeyReader, sizes: Sizes) -> Architecture:
    """translated's Lara Mini (transformers' LaraMini): Qwen3.5's Gated DeltaNet layers (their input projections one
    ``in_proj``, their gated norm ``out_norm``) between Qwen 3's attention layers (per-head q/k norms, no output gate),
    rope and a window on the sliding ones, none on the full ones; plain RMSNorms (``w``, not Qwen3-Next's ``1 + w``);
    the sparse MLPs (a float32 softmax router, an ungated shared expert, on every layer) are
    :func:`ferrum.moe.spec.with_moe`'s."""
    types = r("layer_types")
    if types is None:
        types = [_LARA_PATTERN[i % len(_LARA_PATTERN)] for i in range(sizes.num_layers)]
    if not lists_of(types, sizes.num_layers, _LARA_PATTERN):
        r.fail("layer_types", f"must list {sizes.num_layers} entries of {LINEAR!r} / {SLIDING!r} / {FULL!r}, got "
                              f"{types!r}")
    window = r("sliding_window")
    if window is None and SLIDING in types:
        r.fail("sliding_window", "must be set when layers use sliding attention")
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, _LLAMA_ROPES)
    r("hidden_act")
    bias = r("attention_bias")
    kinds = {LINEAR: LayerSpec(None, Rope.unrotated(sizes.head_dim), mixer="gated_delta"),
             SLIDING: LayerSpec(window, rope), FULL: LayerSpec(None, Rope.unrotated(sizes.head_dim))}
    return Architecture(
        layers=tuple(kinds[t] for t in types), norms=LLAMA_NORMS, attn_scale=1.0 / math.sqrt(sizes.head_dim),
        qk_norm="head", qkv_bias=bias, o_bias=bias, gated_delta=replace(_gated_delta_spec(r, False), fused=True),
        keep_float32=(".A_log", ".dt_bias"), stored_names=LARA_MINI_NAMES,
    )


#: LFM3's modules under Llama's names: LFM2's but for the attention's (Qwen 3's o_proj, q_norm, k_norm).
LFM3_NAMES = {name: stored for name, stored in LFM2_NAMES.items() if name != "self_attn.o_proj"}
#: LFM3's sandwich norms (use_sandwich_norm): LFM2's, and one on each of the mixer's and the MLP's outputs.
LFM3_SANDWICH_NORMS = {**LFM2_NORMS, "post_attn": "post_operator_norm", "post_mlp": "post_ffn_norm"}
#: transformers' Lfm3Config rope settings where a config gives none.
_LFM3_ROPES = {FULL: {"rope_type": "proportional", "rope_theta": 1_000_000.0, "partial_rotary_factor": 0.5},
               SLIDING: {"rope_type": "default", "rope_theta": 10_000.0}}


def _lfm3_eps(raw: dict[str, Any]) -> dict[str, Any]:
    """Lfm3Config's rms_norm_eps is an alias of norm_eps (its attribute_map), which wins where both are given."""
    return raw if raw.get("rms_norm_eps") is None else {**raw, "norm_eps": raw["rms_norm_eps"]}


def _lfm3_kinds(r: KeyReader, sizes: Sizes) -> list[str]:
    """layer_types, else transformers' rule: full attention at every fourth layer from the third, sliding at every
    fourth from the fifth, short convolutions between."""
    kinds = r("layer_types")
    if kinds is None:
        kinds = [FULL if i % 4 == 2 else SLIDING if i % 4 == 0 and i > 0 else "conv" for i in range(sizes.num_layers)]
    if not lists_of(kinds, sizes.num_layers, ("conv", FULL, SLIDING)):
        r.fail("layer_types", f"must list {sizes.num_layers} entries of 'conv' / {FULL!r} / {SLIDING!r}, got {kinds!r}")
    if SLIDING in kinds and r("sliding_window") is None:
        r.fail("sliding_window", "must be set when layers use sliding attention")
    return kinds


def _lfm3_rope(r: KeyReader, sizes: Sizes, spec: dict[str, Any]) -> Rope:
    """One attention kind's rope, over whole heads (OLMo's rotate-half): "default", or Gemma 4's "proportional"
    (the first partial_rotary_factor of each half's pairs turning at frequencies spaced over the whole head)."""
    if spec.get("rope_type", "default") != "proportional":
        return read_rope(r, sizes, spec, "rope_parameters", ("default",))
    theta, share = spec.get("rope_theta", 10_000.0), spec.get("partial_rotary_factor", 1.0)
    if positive_number(theta) or positive_number(share) or share > 1 or spec.get("factor", 1.0) not in (1, 1.0):
        r.fail("rope_parameters", f"has a proportional rope {spec!r}; Ferrum runs a positive rope_theta, a "
                                  "partial_rotary_factor in (0, 1] and no factor", unsupported=True)
    return Rope(theta=float(theta), head_dim=sizes.head_dim, rotary_dim=2 * int(share * sizes.head_dim // 2),
                proportional=True)


def _lfm3(r: KeyReader, sizes: Sizes) -> Architecture:
    """Liquid AI's LFM3 (transformers' Lfm3): LFM2's gated short convolutions between Qwen 3's attention layers (q/k
    norms), full or sliding, each kind with its own rope (the full layers' Gemma 4's proportional one by default), each
    head's output times the sigmoid of its own gate (``self_attn.gate_proj``, one row per head) where
    use_attention_gate; with use_sandwich_norm, a norm on each mixer's and MLP's output too; LFM2-MoE's dense MLPs
    (``feed_forward.w1 / w3 / w2``) of intermediate_size."""
    kinds = _lfm3_kinds(r, sizes)
    specs = _per_kind_rope_specs(r, "LFM3") or (dict(_LFM3_ROPES[FULL]), dict(_LFM3_ROPES[SLIDING]))
    full, sliding = (_lfm3_rope(r, sizes, spec) for spec in specs)
    window, gated, bias = r("sliding_window"), r("use_attention_gate"), r("attention_bias")
    layers = {"conv": LayerSpec(None, Rope.unrotated(sizes.head_dim), mixer="short_conv"),
              FULL: LayerSpec(None, full), SLIDING: LayerSpec(window, sliding)}
    return Architecture(
        layers=tuple(layers[kind] for kind in kinds),
        norms=LFM3_SANDWICH_NORMS if r("use_sandwich_norm") else LFM2_NORMS,
        attn_scale=1.0 / math.sqrt(sizes.head_dim), qk_norm="head", qkv_bias=bias, o_bias=bias,
        attn_output_gate=gated, attn_gate_stored=gated, attn_gate_per_head=gated,
        short_conv=ShortConvSpec(sizes.hidden_size, r("conv_L_cache")) if "conv" in kinds else None,
        stored_names=LFM3_NAMES,
    )
#: MiniMax's layer kinds as its releases list them (attn_type_list): 0 lightning attention, 1 softmax attention.
_MINIMAX_LISTED = {0: LINEAR, 1: FULL}
_MINIMAX_KINDS = (LINEAR, FULL)
#: The residual factors under the names of MiniMax's own code (its releases' config.json) -> transformers'.
MINIMAX_ALIASES = {f"layernorm_{kind}_attention_{which}": f"{short}_attn_{which}_factor"
                   for kind, short in (("full", "full"), ("linear", "linear")) for which in ("alpha", "beta")}
MINIMAX_ALIASES.update({f"layernorm_mlp_{which}": f"mlp_{which}_factor" for which in ("alpha", "beta")})


def _minimax_types(r: KeyReader, sizes: Sizes) -> list[str]:
    """Each layer's kind from layer_types, else from the releases' attn_type_list, else transformers' default (the
    even layers attend); a config giving both must agree."""
    n, types, listed = sizes.num_layers, r("layer_types"), r("attn_type_list")
    from_list = None
    if listed is not None:
        if not lists_of(listed, n, _MINIMAX_LISTED):
            r.fail("attn_type_list", f"must list {n} entries of 0 (lightning) / 1 (softmax attention), got {listed!r}")
        from_list = [_MINIMAX_LISTED[t] for t in listed]
    if types is None:
        types = from_list or [FULL if (i + 1) % 2 else LINEAR for i in range(n)]
    if not lists_of(types, n, _MINIMAX_KINDS):
        r.fail("layer_types", f"must list {n} entries of {LINEAR!r} / {FULL!r}, got {types!r}")
    if from_list is not None and from_list != types:
        r.fail("attn_type_list", f"is {listed!r}, but layer_types is {types!r}; make them agree")
    return types


def _minimax_blocks(r: KeyReader, sizes: Sizes, rope: Rope,
                    rates: Callable[[int, int, int], np.ndarray]) -> Architecture:
    """MiniMax's layers around ``rope`` (the softmax layers') and ``rates`` (the lightning layers' decay per head:
    ``(heads, layer, layers) -> rates``)."""
    _agreeing_aliases(r, MINIMAX_ALIASES)
    types = _minimax_types(r, sizes)
    r("hidden_act")
    r("postnorm")
    mlp = (r("mlp_alpha_factor"), r("mlp_beta_factor"))
    scales = {kind: (r(f"{short}_attn_alpha_factor"), r(f"{short}_attn_beta_factor"), *mlp)
              for kind, short in ((LINEAR, "linear"), (FULL, "full"))}
    window, layers = r("sliding_window"), sizes.num_layers
    lightning = LightningSpec(sizes.num_heads, sizes.head_dim)
    # the lightning layers' q and k (all heads) are left as stored: no rope rows to move
    kinds = {FULL: LayerSpec(window, rope), LINEAR: LayerSpec(None, Rope.unrotated(sizes.head_dim), mixer="lightning")}
    return Architecture(
        layers=tuple(replace(kinds[t], residual="normed", residual_scales=tuple(float(f) for f in scales[t]))
                     for t in types),
        norms=LLAMA_NORMS,
        attn_scale=1.0 / math.sqrt(sizes.head_dim),
        lightning=lightning,
        computed={f"layers.{i}.{A_LOG}": tuple(np.log(rates(sizes.num_heads, i, layers)).tolist())
                  for i, t in enumerate(types) if t == LINEAR},
        unloaded=BUFFERS,
    )


def _minimax(r: KeyReader, sizes: Sizes) -> Architecture:
    """MiniMax-Text-01 / MiniMax-M1 as transformers ports them (``minimax``): lightning attention layers
    (:mod:`ferrum.recurrent.lightning`, their decay rates computed per layer) between Mixtral's attention layers
    (sliding where sliding_window says), post-norm blocks (each half adds ``beta`` times its output to ``alpha``
    times its normed input, the factors per layer kind) over Mixtral's experts (:func:`ferrum.moe.spec.with_moe`).
    transformers rotates whole heads: a rotary_dim below head_dim (the releases' own code rotates that many dims;
    their model types run it) is refused."""
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, _LLAMA_ROPES, theta_default=1_000_000.0)
    rotary = r("rotary_dim")
    if rotary is not None and rotary != sizes.head_dim:
        r.fail("rotary_dim", f"is {rotary} of {sizes.head_dim} head dims; transformers' MiniMax rotates whole heads "
                             "and MiniMax's own code the first rotary_dim dims: Ferrum runs transformers' reading "
                             "for model_type 'minimax' (set rotary_dim to head_dim, or remove it, to run that) and "
                             "the release code's for 'minimax_text_01' / 'minimax_m1'", unsupported=True)
    return _minimax_blocks(r, sizes, rope, slope_rates)


def _minimax_release(r: KeyReader, sizes: Sizes) -> Architecture:
    """MiniMax-Text-01 / MiniMax-M1 as their releases' own code runs them (model_type ``minimax_text_01`` /
    ``minimax_m1``, ``modeling_minimax_text_01.py``): :func:`_minimax`'s blocks, with the first rotary_dim dims of
    each head rotated (rotate_half over them, frequencies spaced over rotary_dim, the rest passed through; all of
    the head where rotary_dim is left out) and the decay rates of :func:`release_slope_rates`. That code reads no
    rope scaling."""
    key, spec = _rope_spec(r)
    rotary = r("rotary_dim") or sizes.head_dim
    if rotary % 2 or rotary > sizes.head_dim:
        r.fail("rotary_dim", f"is {rotary}; it must be even and at most head_dim ({sizes.head_dim})")
    rope = read_rope(r, sizes, spec, key, ("default",), theta_default=1_000_000.0, rotary_dim=rotary)
    return _minimax_blocks(r, sizes, rope, release_slope_rates)


#: Ring-linear's lightning layers' modules beyond Ling's (:data:`SARVAM_NAMES`: its q/k/v, q/k norms and ``dense``).
RING_LINEAR_NAMES = {**SARVAM_NAMES, "self_attn.g_proj": "attention.g_proj", "self_attn.g_norm": "attention.g_norm"}


def _bailing_moe_linear(r: KeyReader, sizes: Sizes) -> Architecture:
    """inclusionAI's Ring-mini-linear-2.0 / Ring-flash-linear-2.0 (model_type "bailing_moe_linear", mlx-lm's
    bailing_moe_linear): Ling 2.0's blocks (:func:`ferrum.arch.families.moe._bailing_moe`) whose layers attend where
    ``(i + 1) % layer_group_size == 0`` and in the last ``num_layers % layer_group_size``; the others run lightning
    attention (:mod:`ferrum.recurrent.lightning`) as mlx-lm's ``LinearAttention``: q/k/v stored all heads' queries,
    then keys, then values, no SiLU, Ling's per-head q/k norms and rope, the queries scaled by head_dim ** -0.5,
    ALiBi's decay slopes shrinking with depth (:func:`ring_slope_rates`), the output RMS-normed in group_norm_size
    groups (rms_norm_eps) times the sigmoid of ``g_proj``, then ``dense``. Its heads are all key/value heads."""
    if r("linear_silu"):
        r.fail("linear_silu", "puts q, k and v of the linear layers through SiLU, which mlx-lm's bailing_moe_linear "
                              "does not run (nor Ferrum); a Ring-linear 2.0 release sets it to false", unsupported=True)
    arch = _bailing_moe(r, sizes)
    group, n, groups = r("layer_group_size"), sizes.num_layers, r("group_norm_size")
    width = sizes.num_heads * sizes.head_dim
    if width % groups:
        r.fail("group_norm_size", f"({groups}) must divide the linear layers' width ({width})")
    lightning = LightningSpec(
        sizes.num_heads, sizes.head_dim, layout="grouped", silu=False, qk_norm=r("use_qk_norm"), rotated=True,
        query_scale=sizes.head_dim ** -0.5, qkv_bias=r("use_qkv_bias"), norm_groups=groups, norm_eps=None,
        gate="g_proj", norm="g_norm", out="o_proj")
    linear = [(i + 1) % group != 0 and i < n // group * group for i in range(n)]
    return replace(
        arch, layers=tuple(replace(spec, mixer="lightning") if lin else spec for spec, lin in zip(arch.layers, linear)),
        lightning=lightning, stored_names=RING_LINEAR_NAMES,
        computed={f"layers.{i}.{A_LOG}": tuple(np.log(ring_slope_rates(sizes.num_heads, i, n)).tolist())
                  for i, lin in enumerate(linear) if lin},
    )


def _finite(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"must be a number, got {value!r}"
    return None


def _no_shared_expert(value: Any) -> str | None:
    """shared_intermediate_size: none, 0, or 0 per layer (a list, as MiniMax-VL-01's text config writes it)."""
    if value in (None, 0) or isinstance(value, list) and all(v == 0 and not isinstance(v, bool) for v in value):
        return None
    return (f"is {value!r}: MiniMax's code adds a shared expert where it is set, which no release has, nor "
            "transformers, nor Ferrum; set it to 0")


def _minimax_keys(release: bool) -> tuple[Key, ...]:
    """MiniMax's own keys, as transformers (``release`` false) or the releases' code reads them. transformers'
    blocks always add to the normed input; the releases' code does where postnorm, a missing or null one false."""
    return (
        Key("layer_types"),
        Key("attn_type_list"),
        Key("rotary_dim", check=optional_positive_int),
        Key("postnorm", default=not release, unsupported=True, check=_post_norm((True,) if release else (None, True))),
        Key("shared_intermediate_size", default=0, unsupported=True, check=_no_shared_expert),
        Key("shared_moe_mode"),  # read by MiniMax's code only beside a shared expert
        *(Key(f"{short}_attn_{which}_factor", default=1, check=_finite) for short in ("linear", "full")
          for which in ("alpha", "beta")),
        *(Key(f"mlp_{which}_factor", default=1, check=_finite) for which in ("alpha", "beta")),
    )


def _post_norm(accepted: tuple[Any, ...]) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if any(value is a for a in accepted):
            return None
        return (f"is {value!r}: MiniMax's code then adds each block's output to its un-normed input, which no "
                "release does (they set postnorm true) nor transformers; Ferrum runs post-norm blocks only")

    return check


#: RecurrentGemma's block kinds -> the mixer each runs.
_GRIFFIN_MIXERS = {"recurrent": "rg_lru", "attention": "attention"}
#: RecurrentGemma's modules: each block's mixer is its ``temporal_block``, its MLP ``mlp_block``; the final norm
#: ``final_norm``.
GRIFFIN_STORED = {"norm": "final_norm",
                  **{f"self_attn.{p}": f"temporal_block.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
                  **{f"mlp.{p}": f"mlp_block.{p}" for p in ("gate_proj", "up_proj", "down_proj")}}


def _bfloat16(value: float) -> float:
    """``value`` rounded to bfloat16 (to nearest, ties to even)."""
    bits = np.array([value], dtype=np.float32).view(np.uint32)
    bits = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return float(bits.view(np.float32)[0])


def _block_types(value: Any) -> str | None:
    if value is None or isinstance(value, list) and value and lists_of(value, len(value), _GRIFFIN_MIXERS):
        return None
    return f"must list block kinds 'recurrent' / 'attention', got {value!r}"


def _recurrent_gemma(r: KeyReader, sizes: Sizes) -> Architecture:
    """Google's RecurrentGemma (Griffin): residual blocks of RG-LRU recurrent blocks (:mod:`ferrum.recurrent.rg_lru`)
    and local multi-query attention over attention_window_size tokens, as block_types cycles them, each before a
    biased GeLU-tanh MLP half intermediate_size wide; Gemma's (1 + w) norms, embeddings scaled by sqrt(hidden) rounded
    to bfloat16 (transformers' normalizer buffer), o_proj always biased, the first partial_rotary_factor (0.5) of each
    head rotated, the logits soft-capped at logits_soft_cap."""
    width = r("lru_width") or sizes.hidden_size
    if width % sizes.num_heads:
        r.fail("lru_width", f"({width}) must be a multiple of num_attention_heads ({sizes.num_heads}): the RG-LRU's "
                            "gates are one block per head")
    key, spec = _rope_spec(r)
    rope = read_rope(r, sizes, spec, key, ("default",), rotary_dim=_rotary_dim(r, sizes, spec, 0.5))
    kinds = r("block_types") or ["recurrent", "recurrent", "attention"]
    window = r("attention_window_size")
    r("hidden_activation"), r("embeddings_scale_by_sqrt_dim")
    return Architecture(
        layers=tuple(LayerSpec(window, rope) if kinds[i % len(kinds)] == "attention" else
                     LayerSpec(None, rope, mixer="rg_lru") for i in range(sizes.num_layers)),
        norms={"pre_attn": "temporal_pre_norm", "pre_mlp": "channel_pre_norm"}, norm_offset=1.0,
        activation="gelu_tanh", embed_scale=_bfloat16(math.sqrt(sizes.hidden_size)),
        attn_scale=1.0 / math.sqrt(sizes.head_dim), final_softcap=float(r("logits_soft_cap")),
        qkv_bias=bool(r("attention_bias")), o_bias=True, mlp_bias=True,
        rg_lru=RgLruSpec(width, sizes.num_heads, r("conv1d_width")), keep_float32=(".recurrent_param",),
        stored_names=GRIFFIN_STORED,
    )


TABLE: dict[str, Family] = {
    "recurrent_gemma": Family(  # Google's RecurrentGemma (Griffin): RG-LRU blocks and local MQA, two to one
        _keys(_core(True), _core_defaults(max_position_embeddings=8192), (
            Key("rope_theta", check=optional_positive_number), Key("rope_scaling"), Key("rope_parameters"),
            Key("partial_rotary_factor", check=optional_positive_number),
            Key("lru_width", check=optional_size(1 << 17)),
            Key("attention_window_size", default=2048, check=positive_int),
            Key("conv1d_width", default=4, check=positive_int),
            Key("logits_soft_cap", default=30.0, check=positive_number),
            Key("block_types", check=_block_types),
            Key("attention_bias", default=False, check=boolean),
            Key("hidden_activation", default="gelu_pytorch_tanh", check=one_of("gelu_pytorch_tanh"),
                unsupported=True),
            # the releases' flag; transformers always scales them
            Key("embeddings_scale_by_sqrt_dim", default=True, check=one_of(True), unsupported=True),
        )),
        _recurrent_gemma,
        # transformers sizes the heads hidden_size / num_attention_heads whatever head_dim says, and the MLP half
        # intermediate_size wide
        head_dim=lambda r: r("hidden_size") // r("num_attention_heads"),
        sizes=lambda r, sizes: replace(sizes, intermediate_size=sizes.intermediate_size // 2),
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
    "kimi_k3": Family(  # Moonshot's Kimi K3 (mlx-lm's kimi_k3; flat or wrapped): Kimi Linear's layers with SiTU and
        # gated latent attention over mlx-lm's grouped sigmoid routing
        _keys(_core(False), _core_defaults(
            hidden_size=7168, intermediate_size=33792, num_hidden_layers=93, num_attention_heads=96,
            vocab_size=163840, max_position_embeddings=1048576,
        ), _mla_keys(None, 128, 128), _KIMI_K3, MOE_KEYS["kimi_k3"]),
        _kimi_k3_moe,
        eps_default=1e-5,
        kv_heads=_mla_kv_heads,
        head_dim=_mla_head_dim,
        derive=_kimi_k3_keys,
        unloaded=r"(^|\.)mtp\.",  # the releases' multi-token prediction layers (mlx-lm drops them)
    ),
    "bailing_hybrid": Family(  # inclusionAI's Ling 3: Kimi Delta Attention with a bounded decay and gated latent
        # attention over DeepSeek-V3's grouped sigmoid routing
        _keys(_core(False), _core_defaults(
            hidden_size=2560, intermediate_size=6144, num_hidden_layers=42, num_attention_heads=32, vocab_size=157184,
            max_position_embeddings=262144,
        ), _ROPE, _theta(6_000_000.0), _SILU, _mla_keys(None, 128, 128), _BAILING_HYBRID,
            MOE_KEYS["bailing_hybrid"]),
        with_moe("bailing_hybrid", _bailing_hybrid),
        kv_heads=_mla_kv_heads,
        head_dim=_mla_head_dim,
        derive=_bailing_hybrid_keys,
    ),
    "lara_mini": Family(  # translated's Lara Mini: Gated DeltaNet, sliding and NoPE full attention over Flint's MoE
        _keys(_core(True, head_dim_default=128), _core_defaults(
            hidden_size=1024, num_hidden_layers=34, num_attention_heads=16, num_key_value_heads=4,
            vocab_size=151936, max_position_embeddings=131072,
        ), _ROPE, _SILU, _QWEN3_HYBRID, (
            # transformers' LaraMini has none (no dense MLP): a config's is not read
            Key("intermediate_size", check=optional_size(1 << 20)),
            Key("sliding_window", default=512, check=optional_positive_int),
            Key("linear_num_key_heads", default=8, check=positive_int),
            Key("linear_num_value_heads", default=16, check=positive_int),
        ), MOE_KEYS["lara_mini"]),
        with_moe("lara_mini", _lara_mini),
    ),
    "lfm3": Family(  # Liquid AI's LFM3: LFM2's short convolutions, gated full and sliding attention, sandwich norms
        _keys(_core(True, eps_key="norm_eps"), _core_defaults(
            vocab_size=128_000, hidden_size=2048, intermediate_size=7680, num_hidden_layers=24, num_attention_heads=16,
            num_key_value_heads=4, head_dim=128, max_position_embeddings=128_000,
        ), _ROPE, _SILU, (
            Key("layer_types"),
            Key("conv_L_cache", default=7, check=size(64)),
            Key("conv_bias", default=False, check=falsy("no LFM3 release biases its convolutions; set it to false"),
                unsupported=True),
            Key("sliding_window", default=256, check=optional_positive_int),
            Key("use_sandwich_norm", default=True, check=boolean),
            Key("use_attention_gate", default=True, check=boolean),
            Key("attention_bias", default=False, check=boolean),
        )),
        _lfm3, eps_default=1e-5, eps_key="norm_eps", derive=_lfm3_eps,
    ),
    "minimax": Family(  # MiniMax-Text-01 / MiniMax-M1: lightning attention and softmax attention in post-norm blocks
        # over Mixtral's experts
        _keys(_core(False), _ROPE, _theta(1_000_000.0), _SILU, _WINDOW, _minimax_keys(False), MOE_KEYS["minimax"]),
        with_moe("minimax", _minimax),
        eps_default=1e-5,
        derive=_aliased(MINIMAX_ALIASES),
    ),
    **{model_type: Family(  # the releases' own spellings (attn_type_list, layernorm_*_alpha / _beta, postnorm,
        # rotary_dim) read as their code reads them: rope on the first rotary_dim dims of each head
        _keys(_core(False), _ROPE, _theta(1_000_000.0), _SILU, _WINDOW, _minimax_keys(True), MOE_KEYS["minimax"]),
        with_moe("minimax", _minimax_release),
        eps_default=1e-5,
        derive=_aliased(MINIMAX_ALIASES),
    ) for model_type in ("minimax_text_01", "minimax_m1")},
    "bailing_moe_linear": Family(  # inclusionAI's Ring-linear 2.0: Ling 2.0's blocks, most of them lightning
        # attention with Ling's q/k norms and rope, grouped output norms
        _keys(_core(False), _ROPE, _SILU, BAILING_KEYS, (
            # the release code's defaults (mlx-lm requires both)
            Key("layer_group_size", default=1, check=positive_int),
            Key("group_norm_size", default=1, check=positive_int),
            Key("linear_silu", default=False, check=boolean),
        ), MOE_KEYS["bailing_moe"]),
        with_moe("bailing_moe", _bailing_moe_linear),
    ),
    "olmo_hybrid": Family(  # AllenAI's OLMo Hybrid: OLMo 3's attention between Gated DeltaNet layers
        _keys(_core(False), _core_defaults(
            hidden_size=3840, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=30,
            vocab_size=100352, max_position_embeddings=65536,
        ), _ROPE[:3], _SILU, _OLMO_HYBRID),
        _olmo_hybrid,
    ),
}
