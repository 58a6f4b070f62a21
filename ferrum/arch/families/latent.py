"""Latent (multi-head latent) attention families: DeepSeek V2 / V3, Mistral 4, MiniCPM3, Sarvam MLA, ..."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from ferrum.arch import dsa
from ferrum.arch.families._shared import (
    FULL, Family, LLAMA_NORMS, SLIDING, Sizes, _LLAMA_ROPES, _ROPE, _SILU, _agreeing_aliases, _aliased, _core,
    _core_defaults, _keys, _rope_spec, _theta, read_rope,
)
from ferrum.arch.families.llama_like import _llama4_query_scaling, _minicpm_scalings
from ferrum.arch.keys import (
    Key, KeyReader, boolean, falsy, one_of, optional_count, optional_non_negative_int, optional_positive_number,
    optional_size, positive_int, positive_number, size,
)
from ferrum.arch.hyper import HyperSpec
from ferrum.arch.mla import MlaSpec
from ferrum.arch.ngram import MODULE as NGRAM_MODULE, NgramSpec
from ferrum.arch.spec import Architecture, LayerSpec
from ferrum.arch.sublayers import SubLayers
from ferrum.moe.activation import ClampedSwiGLU
from ferrum.moe.spec import KEYS as MOE_KEYS, MoeSpec, with_moe
from ferrum.moe.zero import saved_rows
#: The names Sarvam's release config gives keys (transformers' attribute_map) -> the names Ferrum reads them by.
SARVAM_ALIASES = {"num_experts": "n_routed_experts", "num_shared_experts": "n_shared_experts",
                  "use_qkv_bias": "attention_bias", "num_mtp_layers": "num_nextn_predict_layers"}


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
#: MiniCPM3Config's: null depth and base scale nothing.
_MINICPM3 = (
    Key("scale_emb", default=12, check=positive_number),
    Key("scale_depth", default=1.4, check=optional_positive_number),
    Key("dim_model_base", default=256, check=optional_positive_number),
)


TABLE: dict[str, Family] = {
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
TABLE["youtu_llm"] = TABLE["youtu"]
#: DeepSeek-V3 under its releases' own model_type (mlx-lm's MODEL_REMAPPING maps both to deepseek_v3): Kimi K2 /
#: K2-Instruct / K2-Thinking (remote code, architectures DeepseekV3ForCausalLM; Kimi K2.5's text_config too) and JD's
#: JoyAI-LLM-Flash, whose MTP layer after the decoder's is left out as DeepSeek-V3's is.
TABLE["kimi_k2"] = TABLE["joyai_llm_flash"] = TABLE["deepseek_v3"]


# ---------------------------------------------------------------- DeepSeek-V3.2, GLM-5 (DSA), A.X-K1

#: transformers' DeepSeek-V3.2, GLM-5 and A.X-K1 always read queries through their latent (q_lora_rank).
_Q_LATENT = (Key("q_lora_rank", default=1536, check=size(1 << 17)),)
#: ... and DeepSeek-V3.2's, GLM-5's and A.X-K2's always rotate in DeepSeek's adjacent pairs, whatever rope_interleave
#: says.
_ALWAYS_INTERLEAVED = (Key("rope_interleave", default=True, unsupported=True, check=lambda v: None if v in (
    None, True) else f"is {v!r}, but transformers' DeepSeek-V3.2, GLM-5 and A.X-K2 always rotate adjacent pairs; set "
                     "it to true"),)


def _dsa(r: KeyReader, sizes: Sizes, indexer: dsa.IndexerSpec) -> Architecture:
    """DeepSeek-V3's latent attention with DSA's indexers, run as the dense attention it is up to index_topk tokens
    (:mod:`ferrum.arch.dsa`: the indexers checked for shape and dropped, the context capped at index_topk)."""
    return replace(_latent_attention(r, sizes, interleaved=True), indexer=indexer,
                   context_limit=(indexer.topk, indexer.why))


def _deepseek_v32(r: KeyReader, sizes: Sizes) -> Architecture:
    """DeepSeek-V3.2 (transformers' DeepseekV32): :func:`_dsa` with an indexer on every layer; the sparse MLPs
    (DeepSeek-V3's grouped sigmoid routing, an ungated shared expert, dense first layers) are
    :func:`ferrum.moe.spec.with_moe`'s."""
    return _dsa(r, sizes, dsa.read(r, sizes.num_layers))


def _glm_moe_dsa(r: KeyReader, sizes: Sizes) -> Architecture:
    """GLM-5 (transformers' GlmMoeDsa): :func:`_deepseek_v32` under GLM-5's defaults, its "shared" layers reusing the
    previous layer's selection without an indexer of their own (:func:`ferrum.arch.dsa.glm_kinds`)."""
    return _dsa(r, sizes, dsa.read(r, sizes.num_layers, dsa.glm_kinds(r, sizes.num_layers)))


#: A.X-K1's sparse layers: transformers' DeepseekV3 blocks with the sparse MLP's output normed by this.
AXK1_NORMS = (*LLAMA_NORMS.items(), ("post_mlp", "post_mlp_layernorm"))


def _axk1(r: KeyReader, sizes: Sizes) -> Architecture:
    """SK Telecom's A.X-K1 (transformers' AXK1): DeepSeek-V3 (:func:`_deepseek_v3`, its queries always through their
    latent; :func:`ferrum.moe.spec.with_moe`'s sparse MLPs) with each sparse MLP's output, routed and shared experts
    summed, RMS-normed by the layer's ``post_mlp_layernorm`` before it joins the residual stream. The releases store
    that norm on the dense layers too, where nothing runs it (transformers skips it): left unread quietly."""
    arch = with_moe("axk1", _deepseek_v3)(r, sizes)
    dense = [str(i) for i, layer in enumerate(arch.layers) if layer.mlp != "moe"]
    return replace(arch, layers=tuple(replace(layer, norms=AXK1_NORMS) if layer.mlp == "moe" else layer
                                      for layer in arch.layers),
                   unloaded=rf"\.layers\.(?:{'|'.join(dense)})\.post_mlp_layernorm\." if dense else None)


#: A.X-K2's block norms: gated RMSNorms (``<module>.norm`` and its gate, ferrum.arch.norms.NormGate) before attention
#: on every layer and before the MLP on the sparse ones; the dense layers' post_attention_layernorm is a plain one.
AXK2_NORMS = {"pre_attn": "input_layernorm.norm", "pre_mlp": "post_attention_layernorm"}
AXK2_SPARSE_NORMS = (("pre_attn", "input_layernorm.norm"), ("pre_mlp", "post_attention_layernorm.norm"))


def _axk2_config(raw: dict[str, Any]) -> dict[str, Any]:
    """A.X-K2's routing groups as transformers' AXK2TopkRouter runs them: n_group and topk_group both null (absent:
    AXK2Config's default, A.X-K2-Light's) route over every expert, which is one group of them."""
    if raw.get("n_group") is None and raw.get("topk_group") is None:
        return {**raw, "n_group": 1, "topk_group": 1}
    return raw


def _axk2_attention(r: KeyReader, sizes: Sizes) -> Architecture:
    """A.X-K2's attention (:func:`_dsa`): DeepSeek-V3.2's, its queries and their output gate from the query latent and
    its norm (``MlaSpec.output_gate``); the gated norms' rank."""
    for key, other in (("n_group", "topk_group"), ("topk_group", "n_group")):
        if r.raw.get(key) is None and r.raw.get(other) is not None:
            r.fail(key, f"is null but {other} is {r.raw[other]!r}; transformers' A.X-K2 takes both (grouped routing) "
                        "or neither (ungrouped)")
    arch = _dsa(r, sizes, dsa.read(r, sizes.num_layers))
    return replace(arch, mla=replace(arch.mla, output_gate=True), norm_gate_rank=r("gated_norm_rank"))


def _axk2(r: KeyReader, sizes: Sizes) -> Architecture:
    """SK Telecom's A.X-K2 (transformers' AXK2): DeepSeek-V3.2 (DSA run densely up to index_topk tokens,
    :func:`_dsa`) without q_b_proj's plain query: ``q_b_proj`` reads the query latent beside its norm and gives each
    head's query and a sigmoid gate of its values (:mod:`ferrum.arch.mla`); gated RMSNorms before attention and
    before the sparse MLPs (:data:`AXK2_NORMS`); sigmoid routing with a correction bias, ungrouped or grouped with
    the dropped groups masked by 0 (:data:`ferrum.moe.routing.NOAUX_TC_ZERO_MASKED`), renormalized and scaled, beside
    a shared expert, the dense layers A.X-K1's (:func:`ferrum.moe.spec.with_moe`)."""
    arch = with_moe("axk2", _axk2_attention)(r, sizes)
    return replace(arch, norms=AXK2_NORMS, layers=tuple(
        replace(layer, norms=AXK2_SPARSE_NORMS, gated_norms=("pre_attn", "pre_mlp")) if layer.mlp == "moe" else
        replace(layer, gated_norms=("pre_attn",)) for layer in arch.layers))


TABLE.update({
    "deepseek_v32": Family(  # DeepSeek-V3.2: DeepSeek-V3 with DSA, run densely up to index_topk tokens
        _keys(_core(False), _ROPE, _SILU, _MLA, _Q_LATENT, _ALWAYS_INTERLEAVED, dsa.keys(64), (
            Key("num_nextn_predict_layers", default=1, check=optional_non_negative_int),
        ), MOE_KEYS["deepseek_v32"]),
        with_moe("deepseek_v32", _deepseek_v32),
        kv_heads=_mla_kv_heads,
        head_dim=_mla_head_dim,
    ),
    "glm_moe_dsa": Family(  # GLM-5: DeepSeek-V3.2 under GLM-5's defaults, some layers sharing an indexer's selection
        _keys(_core(False), _ROPE, _SILU, _mla_keys(2048, 192, 256), _Q_LATENT, _ALWAYS_INTERLEAVED, dsa.keys(32),
              dsa.GLM_KEYS, (
            Key("q_lora_rank", default=2048, check=size(1 << 17)),
            Key("num_nextn_predict_layers", default=1, check=optional_non_negative_int),
        ), MOE_KEYS["glm_moe_dsa"]),
        with_moe("glm_moe_dsa", _glm_moe_dsa),
        eps_default=1e-5,
        kv_heads=_mla_kv_heads,
        head_dim=_mla_head_dim,
    ),
    "axk1": Family(  # SK Telecom's A.X-K1: DeepSeek-V3 with its sparse MLPs' output normed
        _keys(_core(False), _ROPE, _SILU, _MLA, _Q_LATENT, (
            Key("rope_interleave", default=True, check=boolean),
            Key("num_nextn_predict_layers", default=1, check=optional_non_negative_int),
        ), MOE_KEYS["axk1"]),
        _axk1,
        kv_heads=_mla_kv_heads,
        head_dim=_mla_head_dim,
    ),
    "axk2": Family(  # SK Telecom's A.X-K2: DeepSeek-V3.2 with gated queries and norms, groups masked with 0
        _keys(_core(False), _core_defaults(
            hidden_size=2048, intermediate_size=5120, num_hidden_layers=48, num_attention_heads=32,
            vocab_size=163840, max_position_embeddings=131072,
        ), _ROPE, _SILU, _mla_keys(384, 64, 64, kv_lora=128), (
            Key("q_lora_rank", default=384, check=size(1 << 17)),
            Key("qk_rope_head_dim", default=32, check=size(4096)),
            Key("gated_norm_rank", default=16, check=positive_int),
        ), _ALWAYS_INTERLEAVED, dsa.keys(16), MOE_KEYS["axk2"]),
        _axk2,
        kv_heads=_mla_kv_heads,
        head_dim=_mla_head_dim,
        derive=_axk2_config,
    ),
})
#: A.X-K1's release (remote code) names it AXK1; transformers, axk1.
TABLE["AXK1"] = TABLE["axk1"]


# ---------------------------------------------------------------- LongCat-Flash

#: transformers' LongcatFlashConfig attribute_map: the names a config may give keys -> the names Ferrum reads.
LONGCAT_ALIASES = {"num_local_experts": "n_routed_experts", "num_experts_per_tok": "moe_topk",
                   "moe_intermediate_size": "expert_ffn_hidden_size", "intermediate_size": "ffn_hidden_size"}
#: A LongCat-Flash layer's modules kept once per sub-block (Ferrum's, the checkpoint's); its MoE is the first's.
LONGCAT_SUBLAYERS = SubLayers(2, (("self_attn", "self_attn"), ("input_layernorm", "input_layernorm"),
                                  ("post_attention_layernorm", "post_attention_layernorm"),
                                  *((f"mlp.{p}", f"mlps.{p}") for p in ("gate_proj", "up_proj", "down_proj"))),
                              lora_refusal="several attention blocks, whose projections are numbered per sub-block "
                                           "(self_attn.1.q_a_proj), which Ferrum does not adapt")


def _longcat_config(raw: dict[str, Any]) -> dict[str, Any]:
    """LongCat-Flash's config as Ferrum's sizes read it: the aliases, ffn_hidden_size as intermediate_size, and
    the layer counts as transformers' num_hidden_layers property and setter give them where the config leaves one
    out: twice num_layers (two sub-blocks a layer), or num_layers as half num_hidden_layers. A count that is no
    positive integer derives nothing: its own key's check names it."""
    raw = _aliased(LONGCAT_ALIASES)(raw)
    derived: dict[str, Any] = {"intermediate_size": raw.get("ffn_hidden_size", 12288)}
    if "num_layers" in raw or "num_hidden_layers" not in raw:
        layers = raw.get("num_layers", 28)
        if positive_int(layers) is None:
            derived["num_hidden_layers"] = 2 * layers
    elif positive_int(raw["num_hidden_layers"]) is None:
        derived["num_layers"] = raw["num_hidden_layers"] // 2
    return {**derived, **raw}


def _mla_scale_on(name: str) -> Any:
    return lambda v: None if v in (None, True) else (
        f"is {v!r}, but transformers' LongCat-Flash always scales its latent by sqrt(hidden_size / rank) ({name}); "
        "Ferrum runs it as transformers does")


def _longcat_flash(r: KeyReader, sizes: Sizes) -> Architecture:
    """Meituan's LongCat-Flash (transformers' LongcatFlash): each stored layer is two sub-blocks, run as two of
    Ferrum's layers (:data:`LONGCAT_SUBLAYERS`), each DeepSeek-V3's latent attention (queries always through their
    latent, rope always in adjacent pairs, its own KV cache) then a dense MLP of ffn_hidden_size; the query scaled by
    ``sqrt(hidden_size / q_lora_rank)`` and the normed key/value latent by ``sqrt(hidden_size / kv_lora_rank)``
    (folded into ``q_b_proj`` and ``kv_a_layernorm`` at load). The first sub-block's normed MLP input also feeds the
    layer's shortcut MoE, whose output joins the stream after the second sub-block (``LayerSpec.shortcut``): a
    float32 router ``mlp.router.classifier`` over n_routed_experts + zero_expert_num experts, softmax scores plus
    ``mlp.router.e_score_correction_bias`` choosing the moe_topk, weighed by their scores times
    routed_scaling_factor, unnormalized; SwiGLU experts of expert_ffn_hidden_size and identity zero experts
    (:mod:`ferrum.moe.zero`). The multi-token prediction module (``model.mtp``) is not run, as transformers does
    not; nor are the zero experts' gate/up rows transformers saves."""
    _agreeing_aliases(r, LONGCAT_ALIASES)
    layers, stacked = r("num_layers"), r("num_hidden_layers")
    if stacked % 2:
        r.fail("num_hidden_layers", f"is {stacked}, odd, but each LongCat-Flash layer is two sub-blocks "
                                    f"(transformers would run {stacked - 1}); give num_layers instead")
    if stacked != 2 * layers:
        r.fail("num_hidden_layers", f"is {stacked}, but transformers derives it as twice num_layers "
                                    f"({layers}): two sub-blocks a layer; leave it out")
    rotary = r("qk_rope_head_dim")
    if r("head_dim") != rotary:
        r.fail("head_dim", f"is {r('head_dim')}, but transformers sizes LongCat-Flash's rope by head_dim and "
                           f"rotates the qk_rope_head_dim ({rotary}) dims with it: make them equal")
    count, zero, top_k = r("n_routed_experts"), r("zero_expert_num") or 0, r("moe_topk")
    if top_k > count + zero:
        r.fail("moe_topk", f"({top_k}) exceeds the {count} routed and {zero} zero experts")
    arch = _latent_attention(r, sizes, interleaved=True)
    spec = MoeSpec("mlp", ("gate_proj", "up_proj", "down_proj"), count, top_k, r("expert_ffn_hidden_size"), False,
                   None, router="router.classifier", shared_gate=None, routing="softmax_corrected",
                   routed_scale=float(r("routed_scaling_factor")), router_float32=True,
                   correction_bias="router.e_score_correction_bias", zero_experts=zero)
    hidden, mla = sizes.hidden_size, arch.mla
    unloaded = rf"^{arch.prefix}mtp\."
    if zero:
        unloaded += rf"|\.mlp\.experts\.{saved_rows(count, zero)}"
    return replace(
        arch, moe=spec, sublayers=LONGCAT_SUBLAYERS, unloaded=unloaded, mtp_layers=0,
        layers=tuple(replace(layer, mlp="dense+shortcut", shortcut="give") if i % 2 == 0 else
                     replace(layer, shortcut="take") for i, layer in enumerate(arch.layers)),
        scales={"self_attn.q_b_proj": ((hidden / mla.q_lora_rank) ** 0.5, 1.0),
                "self_attn.kv_a_layernorm.weight": ((hidden / mla.kv_lora_rank) ** 0.5, 1.0)},
        keep_float32=(f".{spec.bias_name}", f".{spec.router}.weight"))


TABLE["longcat_flash"] = Family(  # Meituan's LongCat-Flash: two latent-attention sub-blocks a layer, shortcut MoE
    # num_layers checked before num_hidden_layers, which is derived from it
    _keys((Key("num_layers", default=28, check=size(512)),), _core(False, head_dim_default=64), _ROPE,
          _theta(10000000.0), _SILU, _mla_keys(1536, 128, 128), (
              Key("q_lora_rank", default=1536, check=size(1 << 17)),
              Key("ffn_hidden_size", default=12288, check=size(1 << 20)),
              Key("n_routed_experts", default=512, check=positive_int),
              Key("zero_expert_num", default=256, check=optional_count(1 << 16)),
              Key("moe_topk", default=12, check=positive_int),
              Key("expert_ffn_hidden_size", default=2048, check=positive_int),
              Key("routed_scaling_factor", default=6.0, check=positive_number),
              Key("zero_expert_type", default="identity", unsupported=True, check=one_of(None, "identity")),
              Key("attention_method", default="MLA", unsupported=True, check=lambda v: None if v is None or (
                  isinstance(v, str) and v.upper() == "MLA") else f"is {v!r}; Ferrum runs LongCat-Flash's latent "
                                                                  "attention (MLA) only"),
              Key("mla_scale_q_lora", default=True, unsupported=True, check=_mla_scale_on("q_lora_rank")),
              Key("mla_scale_kv_lora", default=True, unsupported=True, check=_mla_scale_on("kv_lora_rank")),
              Key("router_bias", default=False, unsupported=True, check=falsy(
                  "no LongCat-Flash release biases its router; load a checkpoint without one")),
              Key("norm_topk_prob", default=False, unsupported=True, check=falsy(
                  "transformers' LongCat-Flash ignores it and weighs the chosen experts by their scores as they are; "
                  "set it to false to run the model as transformers does")),
          )),
    _longcat_flash,
    eps_default=1e-5,
    kv_heads=_mla_kv_heads,
    head_dim=_mla_head_dim,
    derive=_longcat_config,
)


# ---------------------------------------------------------------- LongCat-Flash-Lite (n-gram embedding)

#: mlx-lm's conversions keep the word embedding inside the n-gram embedding (its sanitize moves the release's
#: model.embed_tokens there).
LONGCAT_NGRAM_MLX_LM = (("model.", "lm_head.weight", {"embed_tokens": f"{NGRAM_MODULE}.word_embeddings"}),)
#: mlx-lm's defaults (ModelArgs) of the n-gram embedding's keys, which an absent or null key takes.
NGRAM_DEFAULTS = {"ngram_vocab_size_ratio": 78, "emb_neighbor_num": 4, "emb_split_num": 4}


def _longcat_flash_ngram(r: KeyReader, sizes: Sizes) -> Architecture:
    """Meituan's LongCat-Flash-Lite (mlx-lm's longcat_flash_ngram; the release's remote code): LongCat-Flash
    (:func:`_longcat_flash`) whose token embedding also sums hashed embeddings of the n-grams each token ends
    (:mod:`ferrum.arch.ngram`), stored under ``model.ngram_embeddings`` (the word embedding as the release's
    ``model.embed_tokens``, or mlx-lm's ``ngram_embeddings.word_embeddings``)."""
    ratio, neighbors, splits = (NGRAM_DEFAULTS[key] if r(key) is None else r(key) for key in NGRAM_DEFAULTS)
    if neighbors < 2:
        r.fail("emb_neighbor_num", f"is {neighbors}, but an n-gram embedding spans at least 2 tokens (mlx-lm builds "
                                   "no tables below that and divides by their count)")
    spec = NgramSpec(sizes.vocab_size, ratio, neighbors, splits, sizes.hidden_size)
    if spec.dim == 0:
        r.fail("emb_split_num", f"({splits}) times emb_neighbor_num - 1 ({neighbors - 1}) exceeds hidden_size "
                                f"({sizes.hidden_size}): the n-gram tables would have no columns")
    if spec.rows(spec.tables - 1) >= 1 << 31:
        r.fail("ngram_vocab_size_ratio", f"({ratio}) times vocab_size ({sizes.vocab_size}) gives n-gram tables of "
                                         "2^31 rows or more, beyond any real model; the config is corrupt")
    return replace(_longcat_flash(r, sizes), ngram=spec, layouts=LONGCAT_NGRAM_MLX_LM)


#: LongCat-Flash-Lite: LongCat-Flash's family (its epsilon, latent heads and derived keys) with the n-gram
#: embedding's keys and build.
TABLE["longcat_flash_ngram"] = replace(
    TABLE["longcat_flash"],
    keys=_keys(tuple(TABLE["longcat_flash"].keys.values()), (
        Key("ngram_vocab_size_ratio", default=NGRAM_DEFAULTS["ngram_vocab_size_ratio"], check=optional_size(1 << 12)),
        Key("emb_neighbor_num", default=NGRAM_DEFAULTS["emb_neighbor_num"], check=optional_size(64)),
        Key("emb_split_num", default=NGRAM_DEFAULTS["emb_split_num"], check=optional_size(256)),
        Key("oe_ignored_token_ids", default=None, unsupported=True, check=falsy(
            "mlx-lm's longcat_flash_ngram reads no such list (LongCat-Next's remote code does); Ferrum runs the "
            "model as mlx-lm does: leave it out or empty")),
    )),
    build=_longcat_flash_ngram,
)


# ---------------------------------------------------------------- Hy4 (hyper-connections)

#: Hy4's release names (transformers' conversion mapping for hy_v4, which its save_pretrained writes back): Ferrum's
#: name -> the checkpoint's.
HY_V4_NAMES = {**{f"{ours}.{p}": f"hc_pre.{theirs}.hc_{p}" for ours, theirs in (("attn_hc", "hc_attn_layer"),
                                                                                 ("ffn_hc", "hc_mlp_layer"))
                  for p in ("fn", "base", "scale")},
               **{f"hc_head.hc_{p}": f"hc_pre.hc_head.hc_head_{p}" for p in ("fn", "base", "scale")},
               "self_attn.sinks": "self_attn.learnable_sink_param", "self_attn.gate_proj": "self_attn.linear_gate"}
#: transformers' save_pretrained renames every ``gate_proj`` to ``linear_gate``, the MLPs' too (its mapping's reverse):
#: the dense MLPs' and the shared experts' ``gate_proj``, each a layout of its own as well, for a model whose MLPs are
#: all dense or all sparse (a layout is chosen where the checkpoint holds every module it renames).
_HY_V4_DENSE = {"mlp.gate_proj": "mlp.linear_gate"}
_HY_V4_SHARED = {"mlp.shared_experts.gate_proj": "mlp.shared_experts.linear_gate"}
HY_V4_SAVED = tuple(("model.", "lm_head.weight", names)
                    for names in ({**_HY_V4_DENSE, **_HY_V4_SHARED}, _HY_V4_DENSE, _HY_V4_SHARED))


def _hy_kinds(r: KeyReader, layers: int) -> list[str]:
    """Hy4's indexer kinds: indexer_types, else HYV4Config's: layer 0 and every fourth from layer 1 "full"."""
    kinds = r("indexer_types")
    if kinds is None:
        return [dsa.FULL if i == 0 or (i - 1) % 4 == 0 else dsa.SHARED for i in range(layers)]
    if not isinstance(kinds, list) or any(kind not in (dsa.FULL, dsa.SHARED) for kind in kinds):
        r.fail("indexer_types", f"must list 'full' or 'shared' per layer, got {kinds!r}")
    if len(kinds) != layers:
        r.fail("indexer_types", f"lists {len(kinds)} layers, but the model has {layers} (num_hidden_layers)")
    if kinds and kinds[0] == dsa.SHARED:
        r.fail("indexer_types", "makes the first layer 'shared', but a shared layer reuses the previous full layer's "
                                "selection")
    return kinds


def _hy_v4_attention(r: KeyReader, sizes: Sizes) -> Architecture:
    """Hy4's decoder without its experts: latent attention with rotate-half rope (:func:`_latent_attention`), its
    queries always through their latent, DSA's indexers run as the dense attention they equal up to index_topk keys
    (:func:`_dsa`'s cap), gpt-oss's sinks, each head's output times the sigmoid of its own ``gate_proj``, and the
    residual stream as hc_mult streams (:mod:`ferrum.arch.hyper`)."""
    v, head = r("v_head_dim"), sizes.head_dim
    if v != head:
        r.fail("v_head_dim", f"({v}) differs from a query/key head's {head} dims (qk_nope_head_dim + "
                             "qk_rope_head_dim); Ferrum gates each head's output (gate_proj) only where they are "
                             "equal, as in Hy4's releases", unsupported=True)
    kinds = r("layer_types")
    if kinds is not None and (not isinstance(kinds, list) or set(kinds) - {"indexed_attention"}):
        r.fail("layer_types", f"must list 'indexed_attention' per layer (HYV4's only kind), got {kinds!r}")
    indexer = dsa.read(r, sizes.num_layers, _hy_kinds(r, sizes.num_layers))
    for key in ("hc_magnitude", "hc_eps", "learnable_sink_init"):  # the last initialises the sinks only
        r(key)
    hyper = HyperSpec(r("hc_mult"), sizes.rms_norm_eps, float(r("hc_eps")), float(r("hc_magnitude")))
    arch = _latent_attention(r, sizes, interleaved=False)
    return replace(arch, indexer=indexer, context_limit=(
        indexer.topk, indexer.why), sinks=True, attn_output_gate=True, attn_gate_stored=True, hyper=hyper,
        stored_names=HY_V4_NAMES, layouts=HY_V4_SAVED,
        keep_float32=(*arch.keep_float32, *hyper.float32),
        unloaded=r"^model\.mtp_layers\.", mtp_layers=0)


def _hy_v4(r: KeyReader, sizes: Sizes) -> Architecture:
    """Tencent's Hy4 (transformers' HYV4): :func:`_hy_v4_attention` over GLM-4.7-Flash's sparse MLPs (sigmoid
    routing with a correction bias, one group, renormalized, scaled, an ungated shared expert, the layers
    mlp_layer_types makes dense, first by default), the routed experts' SwiGLU clamped at swiglu_limit (the gate's
    top, the up projection's both ends). The MTP layers are not run, as transformers does not."""
    arch = with_moe("hy_v4", _hy_v4_attention)(r, sizes)
    limit = r("swiglu_limit")
    if limit <= 0:
        r.fail("swiglu_limit", f"is {limit!r}: HYV4Config's docstring reads a limit <= 0 as no clamp, but its experts "
                               "clamp with it all the same (0 zeroes every expert's output), so which model it means "
                               "is unclear; set a positive limit (the release's is 10)", unsupported=True)
    return replace(arch, moe=replace(arch.moe, activation=ClampedSwiGLU(1.0, float(limit), up_offset=0.0)))


def _number(value: Any) -> str | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return None
    return f"must be a number, got {value!r}"


def _non_negative(value: Any) -> str | None:
    return _number(value) or (None if value >= 0 else f"must not be negative, got {value!r}")


TABLE["hy_v4"] = Family(  # Tencent's Hy4: DSA latent attention, sinks, gated heads, hyper-connections, clamped experts
    _keys(_core(False), _core_defaults(
        hidden_size=2816, intermediate_size=6912, num_hidden_layers=34, num_attention_heads=32, vocab_size=120832,
        max_position_embeddings=262144), _ROPE, _SILU, _mla_keys(1536, 192, 256), _Q_LATENT, dsa.keys(16), (
        Key("indexer_types"), Key("layer_types"),
        Key("hc_mult", default=4, check=size(64)),
        Key("hc_magnitude", default=2.0, check=_number),
        Key("hc_eps", default=1e-6, check=_non_negative),
        Key("learnable_sink_init", default=0.0, check=_number),
        Key("swiglu_limit", default=10.0, check=_number),
    ), MOE_KEYS["hy_v4"]),
    _hy_v4,
    eps_default=1e-5,
    kv_heads=lambda r, heads: (r("num_key_value_heads"), heads)[1],  # HYV4Config makes it the heads, whatever given
    head_dim=_mla_head_dim,
)


# ---------------------------------------------------------------- Dots 3 (per-layer latent sizes)

INDEXED = "indexed_attention"
#: The sliding layers' latent sizes as the release spells them (``swa_<key>``), with Dots3NoteTextConfig's defaults.
_DOTS3_SWA = {"num_attention_heads": 64, "num_key_value_heads": 64, "q_lora_rank": 1024, "kv_lora_rank": 1024,
              "head_dim": 256, "qk_nope_head_dim": 192, "v_head_dim": 128}
#: What a layer's per_layer_config entry may set: its latent attention's sizes.
_DOTS3_LAYER_KEYS = (*_DOTS3_SWA, "qk_rope_head_dim")


def _dots3_config(raw: dict[str, Any]) -> dict[str, Any]:
    """Dots3NoteTextConfig's reading of the release's spellings: mlp_layer_types from first_k_dense_replace and
    moe_layer_freq; layer_types from use_dsa and use_sliding_window (layers 0, 1 and every fourth from 1 indexed, the
    others sliding; "full_attention" read as indexed unless use_dsa is false); the sliding layers' per_layer_config
    from the swa_* keys; sliding_window from sliding_window_size; rope_parameters per layer kind from rope_theta and
    swa_rope_theta; shared_experts_intermediate_size from moe_shared_expert_intermediate_size. Values of the wrong
    type derive nothing: their keys' checks name them."""
    raw = dict(raw)
    layers = raw.get("num_hidden_layers", 46)
    if positive_int(layers) is not None:
        return raw
    first, freq = raw.get("first_k_dense_replace", 1), raw.get("moe_layer_freq", 1)
    listed = isinstance(freq, list) and len(freq) == layers
    if raw.get("mlp_layer_types") is None and _non_negative(first) is None and (listed or positive_int(freq) is None):
        raw["mlp_layer_types"] = ["sparse" if i >= first and (bool(freq[i]) if listed else i % freq == 0) else "dense"
                                  for i in range(layers)]
    if raw.get("mlp_layer_types") is not None:  # transformers reads it, whatever first_k_dense_replace says
        raw.pop("first_k_dense_replace", None)
        raw.pop("moe_layer_freq", None)
    use_dsa = raw.pop("use_dsa", None if "per_layer_config" in raw else True)
    if raw.get("layer_types") is None:
        full = "full_attention" if use_dsa is False else INDEXED
        sliding = raw.pop("use_sliding_window", True)
        raw["layer_types"] = [full if not sliding or i < 2 or i % 4 == 1 else SLIDING for i in range(layers)]
    kinds = raw["layer_types"]
    if use_dsa is not None and isinstance(kinds, list):
        old, new = (FULL, INDEXED) if use_dsa else (INDEXED, FULL)
        kinds = raw["layer_types"] = [new if kind == old else kind for kind in kinds]
    swa = {key: raw.pop(f"swa_{key}", value) for key, value in _DOTS3_SWA.items()}
    rope = raw.pop("swa_qk_rope_head_dim", None)
    if rope is None and all(positive_int(swa[key]) is None for key in ("head_dim", "qk_nope_head_dim")):
        rope = swa["head_dim"] - swa["qk_nope_head_dim"]
    if "per_layer_config" not in raw and isinstance(kinds, list):
        raw["per_layer_config"] = {str(i): {**swa, "qk_rope_head_dim": rope}
                                   for i, kind in enumerate(kinds) if kind == SLIDING}
    if raw.get("sliding_window") is None:
        raw["sliding_window"] = raw.pop("sliding_window_size", 512)
    if "moe_shared_expert_intermediate_size" in raw:
        raw["shared_experts_intermediate_size"] = raw.pop("moe_shared_expert_intermediate_size")
    swa_theta, theta = raw.pop("swa_rope_theta", 50_000.0), raw.get("rope_theta", 80_000_000.0)
    params = raw.get("rope_parameters") or raw.get("rope_scaling")
    if params is None and isinstance(kinds, list):
        params = {kind: {"rope_type": "default", "rope_theta": swa_theta if kind == SLIDING else theta}
                  for kind in set(kinds) if isinstance(kind, str)}
    elif isinstance(params, dict) and isinstance(kinds, list) and not set(params) <= {INDEXED, SLIDING, FULL}:
        params = {kind: {"rope_theta": theta, **params} for kind in set(kinds) if isinstance(kind, str)}
    raw["rope_parameters"] = params
    return raw


def _dots3_types(r: KeyReader, layers: int) -> list[str]:
    kinds = r("layer_types")
    if not isinstance(kinds, list) or len(kinds) != layers or set(kinds) - {INDEXED, SLIDING, FULL}:
        r.fail("layer_types", f"must list {layers} layer kinds ({INDEXED!r}, {SLIDING!r} or {FULL!r}), got {kinds!r}")
    return kinds


def _dots3_latent(r: KeyReader, layers: int) -> list[dict[str, Any]]:
    """Each layer's latent attention sizes: the model's, with its per_layer_config entry's over them."""
    given = r("per_layer_config") or {}
    if not isinstance(given, dict):
        r.fail("per_layer_config", f"must map layer indices to their sizes, got {given!r}")
    own: dict[int, dict[str, Any]] = {}
    for index, sizes in given.items():
        if not str(index).isdigit() or int(index) >= layers or not isinstance(sizes, dict):
            r.fail("per_layer_config", f"maps {index!r} to {sizes!r}; it must map layer indices below {layers} to "
                                       "their sizes")
        for key, value in sizes.items():
            if key not in _DOTS3_LAYER_KEYS:
                r.fail("per_layer_config", f"sets {key!r} for layer {index}; Ferrum runs Dots 3's layers with their "
                                           f"own latent attention sizes ({', '.join(_DOTS3_LAYER_KEYS)}) only",
                       unsupported=True)
            if positive_int(value) is not None:
                r.fail("per_layer_config", f"sets {key!r} to {value!r} for layer {index}; it must be a positive "
                                           "integer")
        own[int(index)] = sizes
    model = {key: r(key) for key in _DOTS3_LAYER_KEYS}
    return [{**model, **own.get(i, {})} for i in range(layers)]


def _dots3_sizes(r: KeyReader, sizes: Sizes) -> Sizes:
    """The KV pool's heads: the most any layer has, each of the most dims (nope + rope) any has; every layer's are
    padded to them at load (:mod:`ferrum.arch.mla`)."""
    latent = _dots3_latent(r, sizes.num_layers)
    heads = max(own["num_attention_heads"] for own in latent)
    dims = max(own["qk_nope_head_dim"] + own["qk_rope_head_dim"] for own in latent)
    return replace(sizes, num_heads=heads, num_kv_heads=heads, head_dim=dims)


def _dots3_mla(r: KeyReader, sizes: Sizes, own: dict[str, Any], where: str) -> MlaSpec:
    """One layer kind's latent attention, padded to the KV pool's heads (:func:`_dots3_sizes`)."""
    heads, nope, rope, v = (own[key] for key in ("num_attention_heads", "qk_nope_head_dim", "qk_rope_head_dim",
                                                 "v_head_dim"))
    if own["num_key_value_heads"] != heads:
        r.fail("per_layer_config", f"gives the {where} layers {own['num_key_value_heads']} key/value heads for "
                                   f"{heads} query heads; latent attention expands them to every query head "
                                   "(transformers refuses unequal counts)")
    if nope % 2 or rope % 2:
        r.fail("per_layer_config", f"gives the {where} layers qk_nope_head_dim {nope} and qk_rope_head_dim {rope}; "
                                   "Ferrum needs even numbers (each head's dims pair up)")
    if v > sizes.head_dim:
        r.fail("per_layer_config", f"gives the {where} layers v_head_dim {v}, above the KV pool's {sizes.head_dim} "
                                   "dims a head; Ferrum caches values padded to a key head's size", unsupported=True)
    hidden, q_lora, kv_lora = sizes.hidden_size, own["q_lora_rank"], own["kv_lora_rank"]
    return MlaSpec(heads=heads, q_lora_rank=q_lora, kv_lora_rank=kv_lora, nope=nope, rope=rope, v_head_dim=v,
                   bias=r("attention_bias"), eps=sizes.rms_norm_eps, rope_norm=True, q_scale=math.sqrt(hidden / q_lora),
                   kv_scale=math.sqrt(hidden / kv_lora), dim=None if nope + rope == sizes.head_dim else sizes.head_dim,
                   pool_heads=None if heads == sizes.num_heads else sizes.num_heads)


def _dots3_attention(r: KeyReader, sizes: Sizes) -> Architecture:
    """Dots 3's decoder without its experts: DeepSeek-V3.2's latent attention (queries always through their latent,
    rope always in adjacent pairs), sized per layer kind (per_layer_config: the sliding layers' fewer, wider heads,
    padded to the KV pool's at load, ``LayerSpec.mla``), each kind's rope (rope_parameters per kind, over its
    qk_rope_head_dim dims), the normed latents scaled by ``sqrt(hidden_size / rank)`` and the shared rope key
    RMS-normed, all at rms_norm_eps; each head's output times the sigmoid of its own gate (``g_proj``); sliding
    layers over sliding_window tokens; the indexed layers' DSA run as the dense attention it is up to index_topk
    tokens (:func:`_dsa`'s cap)."""
    kinds, latent = _dots3_types(r, sizes.num_layers), _dots3_latent(r, sizes.num_layers)
    specs: dict[str, MlaSpec] = {}
    for kind, own in zip(kinds, latent):
        first = latent[kinds.index(kind)]
        if own != first:
            r.fail("per_layer_config", f"sizes two {kind} layers differently ({first} and {own}); transformers reads "
                                       "one rope per layer kind from its first layer's sizes, so Ferrum runs one "
                                       "size per kind", unsupported=True)
        specs.setdefault(kind, _dots3_mla(r, sizes, own, kind))
    params = r("rope_parameters")
    if not isinstance(params, dict) or set(kinds) - set(params):
        r.fail("rope_parameters", f"must hold an entry per layer kind ({', '.join(sorted(set(kinds)))}), got "
                                  f"{params!r}")
    ropes = {kind: replace(read_rope(r, sizes, dict(params[kind]), "rope_parameters", ("default",),
                                     rotary_dim=spec.rope), interleaved=True) for kind, spec in specs.items()}
    window = r("sliding_window")
    if positive_int(window) is not None and SLIDING in kinds:
        r.fail("sliding_window", f"must be a positive number of tokens for the sliding layers, got {window!r}")
    base = specs.get(INDEXED) or specs[kinds[0]]
    indexer = dsa.read(r, sizes.num_layers, [dsa.FULL if kind == INDEXED else "none" for kind in kinds])
    indexed = INDEXED in kinds
    return Architecture(
        layers=tuple(LayerSpec(window if kind == SLIDING else None, ropes[kind],
                               attn_scale=1.0 / math.sqrt(specs[kind].qk_head_dim),
                               mla=None if specs[kind] == base else specs[kind]) for kind in kinds),
        norms=LLAMA_NORMS, attn_scale=1.0 / math.sqrt(base.qk_head_dim), mla=base,
        indexer=indexer if indexed else None, context_limit=(indexer.topk, indexer.why) if indexed else None,
        attn_output_gate=True, attn_gate_stored=True, attn_gate_per_head=True,
        stored_names={"self_attn.gate_proj": "self_attn.g_proj"})


TABLE["dots3_note_text"] = Family(  # Dots 3 (Note): DSA and sliding latent attention of per-kind sizes, gated heads
    _keys(_core(False), _core_defaults(
        hidden_size=5120, intermediate_size=13824, num_hidden_layers=46, num_attention_heads=128,
        num_key_value_heads=128, vocab_size=152064, max_position_embeddings=524288,
    ), _ROPE, _SILU, _mla_keys(1024, 128, 128, kv_lora=512), (
        Key("q_lora_rank", default=1024, check=size(1 << 17)),
        Key("head_dim", default=256, check=size(4096)),  # sizes only the rope's share, which qk_rope_head_dim says
        Key("layer_types"), Key("per_layer_config"),
        Key("sliding_window", default=512),
    ), _ALWAYS_INTERLEAVED, dsa.keys(64), MOE_KEYS["dots3_note_text"]),
    with_moe("dots3_note_text", _dots3_attention),
    eps_default=1e-5,
    kv_heads=_mla_kv_heads,
    head_dim=_mla_head_dim,
    sizes=_dots3_sizes,
    derive=_dots3_config,
    # transformers' _keys_to_ignore_on_load_unexpected: the release's multi-token prediction layer
    unloaded=r"^model\.(?:language_model\.)?(?:layers\.46\.|mtp\.)",
)
