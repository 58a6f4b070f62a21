"""The older decoders: GPT-2, GPT-J, GPT-NeoX, GPT-Neo, Falcon, OPT, fairseq's, CodeGen, BLOOM, MPT."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable

from ferrum.arch.alibi import alibi_slopes
from ferrum.arch.families._shared import (
    Family, KvHeads, LLAMA_NORMS, Sizes, _LAYER_NORM_ROPES, _ROPE, _core, _keys, _rope_spec, _rotary_dim, read_rope,
)
from ferrum.arch.families.layer_norm import _GELU_ACTIVATIONS, _gelu_activation, _gelu_key, _layer_norm_family
from ferrum.arch.keys import (
    Key, KeyReader, boolean, falsy, one_of, optional_positive_int, optional_positive_number, optional_size,
    positive_int, size,
)
from ferrum.arch.rope import Rope
from ferrum.arch.spec import Architecture, LayerSpec


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


def _gpt2_family(build: Callable[[KeyReader, Sizes], Architecture], tie_default: bool, positions_default: int,
                 *groups: tuple[Key, ...], kv_heads: KvHeads | None = None) -> Family:
    """A family of GPT-2's config keys (:data:`GPT2_CONFIG_NAMES`)."""
    return Family(_keys(_renamed_core(GPT2_CONFIG_NAMES, tie_default, positions_default), *groups), build,
                  eps_default=1e-5, eps_key="layer_norm_epsilon", names=GPT2_CONFIG_NAMES, kv_heads=kv_heads)


TABLE: dict[str, Family] = {
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
}
