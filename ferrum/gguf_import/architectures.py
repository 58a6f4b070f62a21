"""How each GGUF architecture maps onto a Hugging Face family: its tensors' names and the config.json
entries its metadata gives."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable

from ferrum.errors import CheckpointError, UnsupportedFeatureError
from ferrum.moe.spec import ROUTER
from ferrum.gguf_import.files import Metadata, float32_value, prediction_blocks, routed_groups, routed_scale
from ferrum.gguf_import import (
    apertus, bailing, deci, falcon_h1, gemma3n, gemma4, glm_dsa, granite_hybrid, kimi_linear, laguna, lfm2, mamba,
    mimo2, nemotron_h, openelm, plamo, plamo2, plamo3, qwen1, rwkv7, step35,
)
from ferrum.gguf_import.gated_delta import OWN_TENSORS, UNSHIFTED_NORMS, Restored, fused_gate_up, qwen3_hybrid_config


@dataclass(frozen=True)
class _Experts:
    """Where a family keeps its sparse MLP, and how its config.json spells the MoE numbers."""

    module: str  # the sparse MLP's module in a layer
    count_key: str  # the expert count
    size_key: str | None  # each expert's intermediate size (None: intermediate_size)
    renormalise_key: str | None  # renormalising the top-k weights (None: the family's fixed rule, no key)
    renormalise: bool = True  # what llama.cpp does when the file does not say (``expert_weights_norm``)
    #: config.json's key for the shared expert's width (``expert_shared_feed_forward_length``), where there is one
    shared_key: str | None = None
    #: the shared expert's GGUF tensors -> their suffixes in the sparse MLP module
    shared_tensors: tuple[tuple[str, str], ...] = ()
    #: the router's module in the sparse MLP, where ``ferrum.moe.spec.ROUTER`` does not name it by model_type
    #: (Granite 4.0-H's, routed as GraniteMoeShared's)
    router: str | None = None


@dataclass(frozen=True)
class _Architecture:
    """How one GGUF architecture maps onto a Hugging Face family."""

    model_type: str
    hf_class: str
    #: llama.cpp's converter permuted q/k rows for its adjacent-pair rope (Llama); the rotate-half families
    #: (Qwen) are stored as Hugging Face has them.
    permuted_qk: bool
    config: tuple[tuple[str, Any], ...] = ()  # config.json entries fixed by the family
    #: A router and stacked experts in place of the dense MLP, written in mlx-lm's ``switch_mlp`` layout.
    moe: _Experts | None = None
    #: Block tensors whose Hugging Face name differs from Llama's (Gemma's four norms, Phi-3's fused
    #: projections): GGUF -> Hugging Face.
    renamed: tuple[tuple[str, str], ...] = ()
    #: What the converter added to every norm weight (Gemma's ``1 + w``), subtracted again on import.
    norm_offset: float = 0.0
    #: config.json entries the family reads from its own metadata keys (``meta``, ``arch.`` prefix, config so far).
    configure: Callable[[Metadata, str, dict[str, Any]], dict[str, Any]] | None = None
    #: Rope over part of each head (``rope.dimension_count``), which the Hugging Face family reads.
    partial_rotary: bool = False
    #: What a file of this architecture with experts is (llama.cpp writes Mixtral as ``llama``).
    with_experts: "_Architecture | None" = None
    #: llama.cpp's converter put the fused q/k/v's rows in q, k, v order (or wrote q, k and v apart, joined back:
    #: InternLM2's); the family reads them grouped by key/value head, as the checkpoint had them (GPT-NeoX, Falcon).
    grouped_qkv: bool = False
    #: Renames that hold where the file's blocks have the named tensor (Falcon 40B's second norm).
    renamed_with: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    #: Multi-head Latent Attention (deepseek2): the file's key_length / value_length size the compressed cache
    #: llama.cpp runs, not the heads; ``configure`` reads the latent sizes, rope over ``rope.dimension_count`` of
    #: each q/k head (never a partial_rotary_factor).
    latent: bool = False
    #: The other (model_type, Hugging Face class) ``configure`` may make a file of this architecture, its tensors
    #: named alike (deepseek2: DeepSeek-V2 as well as V3).
    variants: tuple[tuple[str, str], ...] = ()
    #: What a file of this architecture with a shared expert is (llama.cpp writes GraniteMoeShared as
    #: ``granitemoe``, telling it by ``expert_shared_feed_forward_length``).
    with_shared_expert: "_Architecture | None" = None
    #: The file's ``rope.scaling.yarn_log_multiplier`` is YaRN's mscale_all_dim, mscale taken equal to it (Ministral
    #: 3's, both 1 in every release: llama.cpp's mistral3 leaves cos and sin unscaled), not refused.
    yarn_mscale: bool = False
    #: Block tensors the converter split that the family reads as one: GGUF parts -> the Hugging Face tensor
    #: whose rows they are, in that order (GraniteMoeShared's shared gate and up, fused in ``input_linear``).
    joined: tuple[tuple[tuple[str, ...], str], ...] = ()
    #: The reverse: block tensors the converter kept fused that the family reads as several, each its share of the
    #: rows in order, sized by the config (ChatGLM's q/k/v): GGUF tensor -> the Hugging Face tensors.
    split: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: Global tensors the converter stacked that the family reads apart, each its share of the stack's rows in order
    #: (Gemma 3n's AltUp projections): GGUF name -> the Hugging Face tensors.
    split_globals: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: Block tensors the family reads its own way (Gated DeltaNet's): the GGUF name within a block and the config
    #: -> the Hugging Face tensors made from it, or None where the name is not one of them.
    own_tensors: Callable[[str, dict[str, Any]], tuple[Restored, ...] | None] | None = None
    #: Norm weights (suffixes) the converter left unshifted where ``norm_offset`` shifts the others.
    unshifted_norms: tuple[str, ...] = ()
    #: Norm weights (suffixes of the checkpoint's names) the converter shifted by offsets of their own, subtracted on
    #: import before ``norm_offset`` is considered (PLaMo's norms after the mixer and the MLP).
    norm_offsets: tuple[tuple[str, float], ...] = ()
    #: The file lists KV heads and MLP widths per layer and keeps its rope in ``rope_freqs``, all of which
    #: ``configure`` reads (Gemma 4's; Gemma 3n's widths; MiMo-V2's KV heads).
    per_layer: bool = False
    #: The file's ``value_length`` sizes the value heads apart from the keys, which ``configure`` reads (MiMo-V2's).
    value_heads: bool = False
    #: Global tensors whose Hugging Face name differs from :data:`GLOBAL_TENSORS`' (LFM2's final norm).
    renamed_globals: tuple[tuple[str, str], ...] = ()
    #: False: the blocks have neither attention nor an MLP, the file's head count and MLP width are 0 (pure
    #: Mamba-2's); ``configure`` gives the heads.
    attention: bool = True
    #: Tensors the converter moved into the metadata (Apertus's xIELU parameters): the file's metadata, the
    #: ``arch.`` prefix and the config -> Llama-style Hugging Face names and their float32 values.
    metadata_tensors: Callable[[Metadata, str, dict[str, Any]], dict[str, Any]] | None = None
    #: GGUF tensors (a full-name regex) the converter writes as dummies the family does not read (RWKV-7's first
    #: layer's value-residual LoRA, copies of another's).
    unread: str | None = None
    #: The file may leave ``feed_forward_length`` out, the MLP then the family's default width (GPT-J's: n_inner
    #: unset, 4 x hidden).
    optional_mlp_width: bool = False
    #: A ``per_layer`` file's ``rope_freqs`` is Llama 3's rope scaling, read as other families' are (Nemotron NAS's).
    llama3_rope_freqs: bool = False
    #: Block tensors under another Hugging Face name in the layers that do not read the usual one: GGUF -> that name
    #: (Nemotron NAS's linear map in place of attention, written as ``attn_output``).
    otherwise: tuple[tuple[str, str], ...] = ()


def _query_pre_attn_scalar(meta: Metadata, p: str, cfg: dict[str, Any], layers_of_27b: int) -> float:
    """Gemma's attention scale as ``1 / sqrt(query_pre_attn_scalar)``. The converter does not write it, so llama.cpp
    takes head_dim, except for the 27B model (known by its layer count), whose Hugging Face config says
    hidden / heads; a file that does carry ``attention.scale`` is taken at its word."""
    scale = meta.get(p + "attention.scale")
    if scale:
        return 1.0 / float(scale) ** 2
    if cfg["num_hidden_layers"] == layers_of_27b:
        return cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["head_dim"]


def _gemma2_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's Gemma 2 reading: both soft-caps (50 and 30 where absent), a 4096-token window where absent."""
    return {
        "query_pre_attn_scalar": _query_pre_attn_scalar(meta, p, cfg, layers_of_27b=46),
        "attn_logit_softcapping": float32_value(meta.get(p + "attn_logit_softcapping", 50.0)),
        "final_logit_softcapping": float32_value(meta.get(p + "final_logit_softcapping", 30.0)),
        "sliding_window": int(meta.get(p + "attention.sliding_window", 4096)),
    }


def _gemma3_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's Gemma 3 reading: five sliding layers of the file's window to one global; the sliding ones
    rotate at base 10000, unscaled; no attention soft-cap; the final one only where the file sets it."""
    final = meta.get(p + "final_logit_softcapping")
    return {
        "query_pre_attn_scalar": _query_pre_attn_scalar(meta, p, cfg, layers_of_27b=62),
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None if final is None else float32_value(final),
        "sliding_window": int(meta.need(p + "attention.sliding_window")),
        "sliding_window_pattern": 6,
        "rope_local_base_freq": 10000.0,
    }


def _phi3_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Phi-3's window, where the file sets one."""
    return {"sliding_window": meta.get(p + "attention.sliding_window") or None}


def _granite_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Granite's four multipliers, which llama.cpp requires in the file."""
    keys = {"embedding_multiplier": "embedding_scale", "residual_multiplier": "residual_scale",
            "attention_multiplier": "attention.scale", "logits_scaling": "logit_scale"}
    return {name: float32_value(meta.need(p + key)) for name, key in keys.items()}


def _olmo2_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """OLMo 2 attends in full; llama.cpp reads a file with a window as OLMo 3's three sliding layers in four."""
    if meta.get(p + "attention.sliding_window"):
        raise UnsupportedFeatureError(f"{p}attention.sliding_window: OLMo 3's sliding layers are not supported; "
                                      "OLMo 2 files have no window")
    return {}


def _exaone4_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """EXAONE 4: the window and a flag per layer for the sliding ones (which rotate; the full ones take no rope).
    Without a window every layer attends in full, with rope: config.json says so outright (transformers' default
    would be a 4096 window)."""
    window = meta.get(p + "attention.sliding_window")
    if not window:
        return {"sliding_window": None}
    flags = meta.get(p + "attention.sliding_window_pattern")
    if flags is None:  # transformers' default: every fourth layer full
        return {"sliding_window": int(window)}
    layers = cfg["num_hidden_layers"]
    if not isinstance(flags, (list, tuple)) or len(flags) != layers or any(f not in (0, 1) for f in flags):
        raise CheckpointError(f"{meta.where}: {p}attention.sliding_window_pattern must flag each of the {layers} "
                              "layers sliding (true) or not")
    return {"sliding_window": int(window),
            "layer_types": ["sliding_attention" if f else "full_attention" for f in flags]}


def _shared_experts(meta: Metadata, p: str, absent_is_one: bool) -> int:
    """How many experts' widths the shared MLP spans, from the widths the file gives (transformers sizes it so,
    K-EXAONE's and ERNIE 4.5's): where the file gives none, one expert's (``absent_is_one``) or none."""
    experts = int(meta.need(p + "expert_feed_forward_length"))
    if experts == 0:
        raise CheckpointError(f"{meta.where}: {p}expert_feed_forward_length is 0; the experts must have a width")
    shared = int(meta.get(p + "expert_shared_feed_forward_length") or (experts if absent_is_one else 0))
    if shared % experts:
        raise UnsupportedFeatureError(f"{meta.where}: a shared MLP {shared} wide beside experts {experts} wide is not "
                                      "supported: transformers makes it a whole number of experts' widths")
    return shared // experts


def _exaone_moe_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """K-EXAONE (exaone-moe) as llama.cpp runs it: EXAONE 4's attention in Llama's pre-norm blocks, rope on the sliding
    layers alone, which are three in every four or as the file's sliding_window_pattern period says (llama.cpp
    requires the window and leaves a per-layer list unread: one naming other layers is refused); sigmoid routing (the
    gate, which llama.cpp requires, must be the sigmoid) with the correction bias, groups, scale and renormalisation as
    the file says, beside a shared MLP as wide as the file's shared width (expert_feed_forward_length where absent),
    whole experts' widths; dense first layers; the next-token-prediction blocks left out."""
    _sigmoid_gate(meta, p, "K-EXAONE", needed=True)
    layers = cfg["num_hidden_layers"] - prediction_blocks(meta, p, cfg["num_hidden_layers"])
    flags, period = meta.get(p + "attention.sliding_window_pattern"), 4
    if isinstance(flags, int) and not isinstance(flags, bool):
        flags, period = None, flags
    sliding = [period == 0 or i % period < period - 1 for i in range(layers)]
    if flags is not None and [bool(f) for f in flags] != sliding:
        raise UnsupportedFeatureError(f"{meta.where}: {p}attention.sliding_window_pattern {flags!r:.80} is not "
                                      f"supported: llama.cpp's exaone-moe leaves a per-layer list unread and runs "
                                      f"three sliding layers in every four ({sliding!r:.80}); convert the model again")
    shared = _shared_experts(meta, p, absent_is_one=True)
    dense = int(meta.get(p + "leading_dense_block_count", 0))
    return {"num_hidden_layers": layers, "num_nextn_predict_layers": cfg["num_hidden_layers"] - layers,
            "sliding_window": int(meta.need(p + "attention.sliding_window")), "sliding_window_pattern": period,
            "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
            "mlp_layer_types": ["dense" if i < dense else "sparse" for i in range(layers)],
            "num_shared_experts": shared, "routed_scaling_factor": routed_scale(meta, p),
            **routed_groups(meta, p)}


def _minicpm_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """MiniCPM's scalings back from the three the converter writes (scale_emb; scale_depth / sqrt(layers); hidden /
    dim_model_base, which llama.cpp divides the logits by). Older files without them llama.cpp runs on fixed
    defaults no release's config states: refused by name."""
    missing = [key for key in ("embedding_scale", "residual_scale", "logit_scale") if p + key not in meta]
    if missing:
        raise UnsupportedFeatureError(f"{meta.where}: a minicpm file without {', '.join(p + k for k in missing)} is "
                                      "not supported (older converters wrote none; convert the release again)")
    residual, logit = (float32_value(meta.get(p + key)) for key in ("residual_scale", "logit_scale"))
    return {"scale_emb": float32_value(meta.get(p + "embedding_scale")),
            "scale_depth": residual * math.sqrt(cfg["num_hidden_layers"]), "dim_model_base": cfg["hidden_size"] / logit}


#: MiniCPM3's scalings, which llama.cpp fixes (the 4B release's) and the converter does not write.
_MINICPM3_SCALINGS = {"scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 256}


def _minicpm3_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """MiniCPM3 as llama.cpp runs it: latent attention of the file's ranks, q/k heads key_length wide with rope over
    rope.dimension_count of them (rotate-half, rows as stored), values hidden / heads wide unless the file says
    (value_length, which the converter does not write), every head its own key and value; the fixed scalings."""
    rope, heads = int(meta.need(p + "rope.dimension_count")), cfg["num_attention_heads"]
    value = meta.get(p + "attention.value_length") or cfg["hidden_size"] // heads
    q_lora = int(meta.need(p + "attention.q_lora_rank")) if "blk.0.attn_q_a.weight" in meta.tensors else None
    return {"head_dim": rope, "qk_rope_head_dim": rope, "qk_nope_head_dim": cfg["head_dim"] - rope,
            "v_head_dim": int(value), "kv_lora_rank": int(meta.need(p + "attention.kv_lora_rank")),
            "q_lora_rank": q_lora, "num_key_value_heads": heads, "attention_bias": False, **_MINICPM3_SCALINGS}


def _xverse_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """XVERSE as llama.cpp reads an xverse file: Llama's blocks, every head its own key and value (all releases'). The
    converter permutes fewer key heads' rows over head_count / head_count_kv groups, not per key head, which llama.cpp
    then rotates as no XVERSE model does: refused by name."""
    if cfg["num_key_value_heads"] != cfg["num_attention_heads"]:
        raise UnsupportedFeatureError(f"{meta.where}: an xverse file with {cfg['num_key_value_heads']} key/value heads "
                                      f"for {cfg['num_attention_heads']} query heads is not supported: llama.cpp's "
                                      "converter permutes such keys' rows across heads (XVERSE's releases have one "
                                      "key/value head per query head)")
    return {}


def _command_r_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Command R's logit scale, which llama.cpp requires in the file; Command R+'s q/k norms where it has them."""
    return {"logit_scale": float32_value(meta.need(p + "logit_scale")),
            "use_qk_norm": "blk.0.attn_q_norm.weight" in meta.tensors}


def _cohere2_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Command R7B / A: Command R's logit scale, and the window on three layers of every four (llama.cpp's
    fixed pattern; the last of each four attends in full, without rope)."""
    return {**_command_r_config(meta, p, cfg), "sliding_window": int(meta.need(p + "attention.sliding_window")),
            "sliding_window_pattern": 4}


def _qwen2vl_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Qwen2-VL / Qwen2.5-VL's text model as llama.cpp runs it on text: its mrope rotates each (time, height, width)
    section of rope.dimension_sections (required) by the token's one position, the fourth by 0; so where the fourth is
    empty, the rope is Qwen 2's plain one. A fourth section with dims (left unrotated for text, which no transformers
    Qwen2-VL does) or no section at all (llama.cpp divides by their sum) is refused."""
    key = p + "rope.dimension_sections"
    sections = meta.need(key)
    if len(sections) > 4 or any(s < 0 for s in sections):  # a list of integers (files._FIELD_KINDS)
        raise CheckpointError(f"{meta.where}: {key} must list at most four non-negative section sizes, got "
                              f"{sections!r}")
    time, height, width, extra = [*sections, 0, 0, 0, 0][:4]
    if extra or not time + height + width:
        raise UnsupportedFeatureError(f"{meta.where}: {key} {sections} is not supported: Ferrum runs a qwen2vl file's "
                                      "text as plain rope, which llama.cpp's mrope is where the time, height and width "
                                      "sections hold dims and the fourth (unrotated for text) none")
    return {}


def _gpt_neox_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """GPT-NeoX's parallel blocks, where the file says (llama.cpp's default: parallel)."""
    return {"use_parallel_residual": bool(meta.get(p + "use_parallel_residual", True))}


def _clamp(value: float | None) -> float | None:
    """``attention.clamp_kqv`` as llama.cpp applies it (build_qkv): q/k/v clipped only by a positive one."""
    return float32_value(value) if value is not None and value > 0 else None


def _clip_qkv_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """OLMo's and OLMoE's q, k and v clipping, where the file sets one (``attention.clamp_kqv``)."""
    return {"clip_qkv": _clamp(meta.get(p + "attention.clamp_kqv"))}


#: StableLM 2 12B's per-head q/k norms, which the converter stacks into one ``[heads, head_dim]`` tensor each.
_STABLELM_QK_NORMS = (("attn_q_norm.weight", "self_attn.q_layernorm.weight"),
                      ("attn_k_norm.weight", "self_attn.k_layernorm.weight"))


def _stablelm_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """StableLM: q/k/v biases where the file has them; attention and the MLP side by side where the blocks have no
    MLP norm, as llama.cpp decides (the converter writes ``use_parallel_residual`` true where the config is silent)."""
    return {"use_qkv_bias": "blk.0.attn_q.bias" in meta.tensors,
            "use_parallel_residual": "blk.0.ffn_norm.weight" not in meta.tensors,
            "qk_layernorm": "blk.0.attn_q_norm.weight" in meta.tensors}  # StableLM 2 12B's, stacked [heads, dim]


def _gptj_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """GPT-J as transformers runs it, its file as the GGUF spec's gptj keys and gguf's tensor map write it (llama.cpp
    has no GPT-J graph nor converter): rope in adjacent pairs, as the checkpoint stores q/k (rows as stored), over
    rope.dimension_count of each head (the whole head where absent) at base 10000, every head its own key and value.
    Another base, rope scaling or fewer key/value heads, which transformers' GPT-J has no setting for, are refused."""
    where = meta.where
    if cfg["rope_theta"] != 10000.0:
        raise UnsupportedFeatureError(f"{where}: {p}rope.freq_base {cfg['rope_theta']} is not supported (GPT-J "
                                      "rotates at base 10000, which transformers' GPT-J fixes)")
    if cfg["rope_scaling"] is not None:
        raise UnsupportedFeatureError(f"{where}: {cfg['rope_scaling']['rope_type']} rope scaling in a gptj file is not "
                                      "supported (transformers' GPT-J has none)")
    if cfg["num_key_value_heads"] != cfg["num_attention_heads"]:
        raise UnsupportedFeatureError(f"{where}: {cfg['num_key_value_heads']} key/value heads for "
                                      f"{cfg['num_attention_heads']} query heads are not supported (GPT-J gives every "
                                      "head its own key and value)")
    return {"rotary_dim": round(cfg.get("partial_rotary_factor", 1.0) * cfg["head_dim"])}


def _falcon_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Falcon: attention and the MLP side by side, as llama.cpp always runs it. A second norm (Falcon 40B and
    180B's) or several key/value heads (those and Falcon 2) make it the new decoder architecture."""
    two_norms, kv_heads = "blk.0.attn_norm_2.weight" in meta.tensors, cfg["num_key_value_heads"]
    return {"parallel_attn": True, "new_decoder_architecture": two_norms or kv_heads > 1,
            "num_ln_in_parallel_attn": 2 if two_norms else 1, "num_kv_heads": kv_heads, "multi_query": kv_heads == 1,
            "bias": "blk.0.attn_qkv.bias" in meta.tensors}


def _mpt_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """MPT: ALiBi's bias max and q/k/v's clamp (none where the file says 0 or less, or nothing), in its
    attn_config."""
    bias_max = meta.get(p + "attention.max_alibi_bias", 8.0)
    return {"attn_config": {"alibi": True, "alibi_bias_max": float32_value(bias_max),
                            "clip_qkv": _clamp(meta.get(p + "attention.clamp_kqv"))}}


def _starcoder_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """StarCoder (GPT-BigCode): one key/value head, as llama.cpp's converter always writes it."""
    return {"multi_query": cfg["num_key_value_heads"] == 1}


def _gpt_oss_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """gpt-oss: the file's window on every other layer, the first sliding; its YaRN with the ramp's ends
    unrounded, as transformers' and OpenAI's own model have them (llama.cpp rounds them)."""
    scaling = cfg.get("rope_scaling")
    return {"sliding_window": int(meta.need(p + "attention.sliding_window")),
            **({"rope_scaling": {**scaling, "truncate": False}} if scaling and scaling["rope_type"] == "yarn" else {})}


def _glm4_moe_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """GLM-4.5's sparse MLPs as llama.cpp reads them: the sigmoid gate (the only one it runs for this architecture;
    a file that names another is refused), its groups, scale and dense first layers, the shared experts, the q/k
    biases and norms the blocks hold, and the trailing next-token-prediction layers, which are not decoder layers."""
    gating = meta.get(p + "expert_gating_func", _SIGMOID_GATING)
    if gating != _SIGMOID_GATING:
        raise UnsupportedFeatureError(f"{meta.where}: {p}expert_gating_func {gating} is not supported; GLM-4.5 routes "
                                      f"with the sigmoid gate ({_SIGMOID_GATING})")
    mtp = prediction_blocks(meta, p, cfg["num_hidden_layers"])
    return {"num_hidden_layers": cfg["num_hidden_layers"] - mtp, "num_nextn_predict_layers": mtp,
            "n_shared_experts": int(meta.need(p + "expert_shared_count")),
            "first_k_dense_replace": int(meta.get(p + "leading_dense_block_count", 0)),
            "routed_scaling_factor": float32_value(meta.get(p + "expert_weights_scale", 1.0)),
            **routed_groups(meta, p),
            "attention_bias": "blk.0.attn_q.bias" in meta.tensors,
            "use_qk_norm": "blk.0.attn_q_norm.weight" in meta.tensors}


def _mistral3_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's mistral3: Ministral 3 / Devstral 2 (transformers' ministral3) where the file sets Llama 4's
    attention temperature (``attention.temperature_scale``, the rope's llama_4_scaling_beta, over the YaRN's
    original context, as transformers reads it), Mistral Small 3.x's text model (mistral) where it sets none; no
    window either way (llama.cpp runs none)."""
    beta = meta.get(p + "attention.temperature_scale")
    if not beta:
        return {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": None}
    scaling = cfg.get("rope_scaling")
    if not scaling or scaling["rope_type"] != "yarn":
        raise UnsupportedFeatureError(f"{meta.where}: {p}attention.temperature_scale without YaRN rope scaling is not "
                                      "supported (Ministral 3's temperature counts in the YaRN's original context)")
    rope = {**scaling, "rope_theta": cfg["rope_theta"], "llama_4_scaling_beta": float32_value(beta)}
    return {"rope_parameters": rope, "rope_scaling": None, "sliding_window": None}


#: llama.cpp's ``expert_gating_func`` values for the softmax and sigmoid gates (``LLAMA_EXPERT_GATING_FUNC_TYPE_*``).
_SOFTMAX_GATING, _SIGMOID_GATING = 1, 2


def _dots1_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """dots.llm1 as llama.cpp reads it: DeepSeek-V3's sigmoid routing with its correction bias (the gate the model
    was trained with; a file naming softmax is refused), its scale, groups (one unless the file says), dense first
    layers and shared experts; Qwen 3's attention, without the window no release sets (llama.cpp runs none)."""
    gating = meta.get(p + "expert_gating_func")
    if gating and gating != _SIGMOID_GATING:
        raise UnsupportedFeatureError(f"{meta.where}: {p}expert_gating_func {gating} is not supported; dots.llm1 "
                                      f"routes with the sigmoid gate ({_SIGMOID_GATING})")
    return {"n_shared_experts": int(meta.need(p + "expert_shared_count")),
            "first_k_dense_replace": int(meta.need(p + "leading_dense_block_count")),
            "routed_scaling_factor": float32_value(meta.need(p + "expert_weights_scale")),
            **routed_groups(meta, p),
            "sliding_window": None, "attention_bias": "blk.0.attn_q.bias" in meta.tensors}


def _ernie4_5_moe_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """ERNIE 4.5 MoE as llama.cpp reads it: sparse layers from ``leading_dense_block_count`` to the last, every
    ``interleave_moe_layer_step``-th (no end index: the releases' is the last layer); shared experts where the file
    gives their width (``expert_shared_feed_forward_length``, which the converter writes only with some), as
    transformers reads it: moe_num_shared_experts experts' widths together."""
    return {"moe_layer_interval": int(meta.need(p + "interleave_moe_layer_step")),
            "moe_layer_start_index": int(meta.need(p + "leading_dense_block_count")), "moe_layer_end_index": -1,
            "moe_num_shared_experts": _shared_experts(meta, p, absent_is_one=False),
            "moe_k": cfg["num_experts_per_tok"]}


#: What llama.cpp fixes for every llama4 file with chunked attention, whatever the file says: chunks of 8192
#: positions, every fourth layer NoPE, and the attention temperature (floor 8192, scale 0.1), as Scout's and
#: Maverick's configs set them.
_LLAMA4_CHUNK, _LLAMA4_NOPE_STEP = 8192, 4
_LLAMA4_TEMPERATURE = (("floor_scale", 8192), ("attn_scale", 0.1), ("attn_temperature_tuning", True))


def _llama4_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Llama 4 (Scout, Maverick) as llama.cpp runs a ``llama4`` file: chunked attention of 8192 positions on the
    layers ``attention.sliding_window_pattern`` leaves chunked (three in four unless it says), every fourth layer
    without rope (its queries take the attention temperature), q/k L2-normed on rope layers unless the file has 128
    experts (Maverick, whose config sets use_qk_norm false), top-1 sigmoid routing weighing the expert's input, a
    shared expert as wide as the routed ones, every ``interleave_moe_layer_step``-th layer sparse (the others'
    MLPs feed_forward_length wide). A file whose ``attention.sliding_window`` is 0 (MobileLLM-R1's) llama.cpp runs
    without chunks and with its last layer NoPE, which no transformers config says: refused."""
    where = meta.where
    if meta.get(p + "attention.sliding_window") == 0:
        raise UnsupportedFeatureError(f"{where}: a llama4 file without chunked attention ({p}attention.sliding_window "
                                      "= 0, MobileLLM-R1's) is not supported: llama.cpp then runs its last layer "
                                      "without rope, as no transformers config says")
    period = meta.get(p + "attention.sliding_window_pattern", _LLAMA4_NOPE_STEP)
    if not isinstance(period, int) or period < 1:
        raise UnsupportedFeatureError(f"{where}: {p}attention.sliding_window_pattern {period!r} is not supported; "
                                      "Ferrum reads one period (a chunked layer in each but the last of it)")
    base_swa = meta.get(p + "rope.freq_base_swa")
    if base_swa is not None and float32_value(base_swa) != cfg["rope_theta"]:
        raise UnsupportedFeatureError(f"{where}: {p}rope.freq_base_swa {base_swa} other than rope.freq_base is not "
                                      "supported (transformers' Llama 4 rotates every rope layer alike)")
    _refuse_expert_scale(meta, p, "Llama 4")
    experts = int(meta.need(p + "expert_feed_forward_length"))
    shared = meta.get(p + "expert_shared_feed_forward_length")
    if shared is not None and int(shared) != experts:
        raise UnsupportedFeatureError(f"{where}: a shared expert {shared} wide beside experts {experts} wide is not "
                                      "supported (llama.cpp and transformers make it as wide as the routed ones)")
    layers = cfg["num_hidden_layers"]
    return {"intermediate_size_mlp": cfg["intermediate_size"], "intermediate_size": experts,
            "interleave_moe_layer_step": int(meta.need(p + "interleave_moe_layer_step")),
            "no_rope_layer_interval": _LLAMA4_NOPE_STEP, "attention_chunk_size": _LLAMA4_CHUNK,
            "layer_types": ["chunked_attention" if (i + 1) % period else "full_attention" for i in range(layers)],
            "use_qk_norm": cfg["num_local_experts"] != 128, **dict(_LLAMA4_TEMPERATURE)}


def _refuse_expert_scale(meta: Metadata, p: str, family: str) -> None:
    """A family that does not scale its routed experts refuses a file's expert_weights_scale other than 1 (0: unset)."""
    scale = meta.get(p + "expert_weights_scale")
    if scale not in (None, 0, 1):
        raise UnsupportedFeatureError(f"{meta.where}: {p}expert_weights_scale {scale} is not supported ({family} "
                                      "does not scale its routed experts)")


def _afmoe_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Arcee Trinity as llama.cpp runs an afmoe file: three sliding layers of the file's window to one full one, the
    full ones without rope (its fixed step of 4), the embeddings times sqrt(hidden) (muP, always), sigmoid routing
    with the correction bias, the chosen weights renormalised and scaled by expert_weights_scale, shared experts,
    dense first layers. A file without a window, renormalisation or with another gate llama.cpp runs otherwise than
    transformers' AFMoE can: refused by name."""
    where, gating = meta.where, meta.get(p + "expert_gating_func", _SIGMOID_GATING)
    if gating != _SIGMOID_GATING:
        raise UnsupportedFeatureError(f"{where}: {p}expert_gating_func {gating} is not supported; AFMoE routes with "
                                      f"the sigmoid gate ({_SIGMOID_GATING})")
    if not meta.get(p + "expert_weights_norm"):
        raise UnsupportedFeatureError(f"{where}: an afmoe file without {p}expert_weights_norm true is not supported "
                                      "(llama.cpp then leaves the chosen weights unnormalised; transformers' AFMoE "
                                      "always renormalises them)")
    window = meta.get(p + "attention.sliding_window")
    if not window:
        raise UnsupportedFeatureError(f"{where}: an afmoe file without {p}attention.sliding_window is not supported "
                                      "(llama.cpp then attends in full on every layer, yet without rope on every "
                                      "fourth)")
    return {"sliding_window": int(window), "global_attn_every_n_layers": 4, "layer_types": None, "mup_enabled": True,
            "num_shared_experts": int(meta.get(p + "expert_shared_count", 0)),
            "num_dense_layers": int(meta.get(p + "leading_dense_block_count", 0)),
            "route_scale": routed_scale(meta, p),
            "attention_bias": False}


def _minimax_m2_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """MiniMax-M2 as llama.cpp runs a minimax-m2 file: sigmoid scores chosen with the correction bias, the top-k
    weights always renormalised, unscaled (the converter writes the gate from scoring_func and no scale); the experts
    as wide as intermediate_size, which transformers sizes them by. Another gate or a scale is refused by name."""
    gating = meta.get(p + "expert_gating_func", _SIGMOID_GATING)
    if gating != _SIGMOID_GATING:
        raise UnsupportedFeatureError(f"{meta.where}: {p}expert_gating_func {gating} is not supported; MiniMax-M2 "
                                      f"routes with the sigmoid gate ({_SIGMOID_GATING})")
    _refuse_expert_scale(meta, p, "MiniMax-M2")
    experts = int(meta.need(p + "expert_feed_forward_length"))
    if experts != cfg["intermediate_size"]:
        raise UnsupportedFeatureError(f"{meta.where}: {p}expert_feed_forward_length {experts} differs from "
                                      f"feed_forward_length {cfg['intermediate_size']}; transformers' MiniMax-M2 "
                                      "sizes its experts by intermediate_size")
    return {}


def _dbrx_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """DBRX's config under its own nested keys (flat, dotted: ``attn_config.kv_n_heads``...), as llama.cpp runs a dbrx
    file: q/k/v clipped by the clamp it requires (none where 0 or less), softmax top-k weights always renormalised
    (moe_normalize_expert_weights 1, the releases'), LayerNorms at 1e-5, which the family fixes (a file saying
    otherwise is refused)."""
    eps = float32_value(meta.get(p + "attention.layer_norm_epsilon", 1e-5))
    if eps != 1e-5:
        raise UnsupportedFeatureError(f"{meta.where}: {p}attention.layer_norm_epsilon {eps} is not supported (DBRX's "
                                      "LayerNorms are fixed at 1e-5)")
    _refuse_expert_scale(meta, p, "DBRX")
    return {"attn_config.kv_n_heads": cfg["num_key_value_heads"], "attn_config.rope_theta": cfg["rope_theta"],
            "attn_config.clip_qkv": _clamp(meta.need(p + "attention.clamp_kqv")),
            "ffn_config.moe_top_k": cfg["num_experts_per_tok"], "ffn_config.moe_normalize_expert_weights": 1.0}


def _hunyuan_moe_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Hunyuan-A13B as llama.cpp runs it and transformers reads its config: softmax top-k renormalised, unscaled,
    one shared MLP; transformers sizes the experts and the shared MLP by intermediate_size, so a file whose
    expert or shared widths differ from ``feed_forward_length`` (no release's) is refused. The converter folds
    the NTK alpha into rope.freq_base, as for the dense family."""
    where, inter = meta.where, cfg["intermediate_size"]
    for key in ("expert_feed_forward_length", "expert_shared_feed_forward_length"):
        width = meta.get(p + key)
        if width is not None and int(width) != inter:
            raise UnsupportedFeatureError(f"{where}: {p}{key} {width} differs from feed_forward_length {inter}; "
                                          "transformers' Hunyuan-A13B sizes its experts and shared MLP alike")
    shared = int(meta.get(p + "expert_shared_count", 1))
    if shared != 1:
        raise UnsupportedFeatureError(f"{where}: {p}expert_shared_count {shared} is not supported (Hunyuan-A13B "
                                      "has one shared MLP)")
    _refuse_expert_scale(meta, p, "Hunyuan-A13B")
    return {"moe_topk": cfg["num_experts_per_tok"], "num_shared_expert": 1,
            "attention_bias": "blk.0.attn_q.bias" in meta.tensors}


def _deepseek_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek-MoE 16B (v1) as llama.cpp runs a deepseek file, which is how mlx-lm's deepseek reads the release:
    softmax top-k weights neither renormalised nor scaled, shared experts expert_shared_count experts wide, every layer
    from leading_dense_block_count on sparse (moe_layer_freq 1: llama.cpp reads no other), q/k/v/o biases where the
    file holds them. llama.cpp fixes the softmax gate and never renormalises, as the release's code does; a file naming
    another gate or renormalisation (which its config would have asked for, and neither runs), a scale, expert groups
    (which llama.cpp would run and the release's code does not) or a tied LM head (mlx-lm's reads its own) is
    refused by name."""
    where, gating = meta.where, meta.get(p + "expert_gating_func")
    if gating not in (None, 0, _SOFTMAX_GATING) or meta.get(p + "expert_weights_norm"):
        raise UnsupportedFeatureError(f"{where}: a deepseek file naming expert_gating_func {gating} or "
                                      f"expert_weights_norm {meta.get(p + 'expert_weights_norm')} is not supported: "
                                      "DeepSeek-MoE's softmax top-k weights are unrenormalised, as llama.cpp runs "
                                      "every deepseek file whatever it says")
    _refuse_expert_scale(meta, p, "DeepSeek-MoE")
    groups = routed_groups(meta, p)
    if groups["n_group"] > 1:
        raise UnsupportedFeatureError(f"{where}: {p}expert_group_count {groups['n_group']} is not supported "
                                      "(DeepSeek-MoE routes over all its experts; llama.cpp would limit them to "
                                      "groups)")
    if "output.weight" not in meta.tensors:
        raise UnsupportedFeatureError(f"{where}: a deepseek file without output.weight (its LM head tied to the "
                                      "embeddings) is not supported: DeepSeek-MoE has an LM head of its own")
    return {"n_shared_experts": int(meta.need(p + "expert_shared_count")),
            "first_k_dense_replace": int(meta.get(p + "leading_dense_block_count", 0)), "moe_layer_freq": 1,
            "attention_bias": "blk.0.attn_q.bias" in meta.tensors}


def _deepseek2_gating(meta: Metadata, p: str, cfg: dict[str, Any]) -> int:
    """The gate as llama.cpp reads it: the file's, else (no key, or 0: none) softmax (DeepSeek-V2's early files),
    except that a file of GLM-4.7-Flash's shape (47 or 48 blocks, 154880 tokens) routes with the sigmoid."""
    gating = meta.get(p + "expert_gating_func")
    if not gating:
        flash = int(meta.need(p + "block_count")) in (47, 48) and cfg["vocab_size"] == 154880
        return _SIGMOID_GATING if flash else _SOFTMAX_GATING
    if gating not in (_SOFTMAX_GATING, _SIGMOID_GATING):
        raise UnsupportedFeatureError(f"{meta.where}: {p}expert_gating_func {gating} is not supported; Ferrum imports "
                                      f"deepseek2 files gated by softmax ({_SOFTMAX_GATING}) or sigmoid "
                                      f"({_SIGMOID_GATING})")
    return int(gating)


def _sigmoid_gate(meta: Metadata, p: str, model: str, needed: bool) -> None:
    """Refuses a file whose gate is not the sigmoid ``model`` routes with (transformers' has no other); one naming
    none is taken as the sigmoid unless llama.cpp requires the key (``needed``)."""
    key = p + "expert_gating_func"
    gating = meta.need(key) if needed else meta.get(key)
    if (gating or needed) and gating != _SIGMOID_GATING:
        raise UnsupportedFeatureError(f"{meta.where}: {key} {gating} is not supported; {model} routes with the "
                                      f"sigmoid gate ({_SIGMOID_GATING})")


def _latent_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek's latent attention and shared experts as llama.cpp reads a deepseek2 or glm-dsa file: the heads'
    sizes are the latent ones (``attention.key_length_mla`` / ``value_length_mla``, or, in files older than
    llama.cpp's MLA cache, key_length / value_length); every head has its own key and value; rope over
    rope.dimension_count dims in adjacent pairs, as llama.cpp rotates them and the converter stores them; the
    trailing next-token-prediction blocks are not decoder layers."""
    mtp = prediction_blocks(meta, p, cfg["num_hidden_layers"])
    rope = int(meta.need(p + "rope.dimension_count"))
    head_dim = int(meta.get(p + "attention.key_length_mla") or meta.need(p + "attention.key_length"))
    value_dim = int(meta.get(p + "attention.value_length_mla") or meta.need(p + "attention.value_length"))
    return {"num_hidden_layers": cfg["num_hidden_layers"] - mtp, "num_key_value_heads": cfg["num_attention_heads"],
            "head_dim": rope, "qk_rope_head_dim": rope, "qk_nope_head_dim": head_dim - rope,
            "v_head_dim": value_dim, "kv_lora_rank": int(meta.need(p + "attention.kv_lora_rank")),
            "q_lora_rank": int(meta.need(p + "attention.q_lora_rank")) if "blk.0.attn_q_a.weight" in meta.tensors
            else None,
            "n_shared_experts": int(meta.need(p + "expert_shared_count")),
            "first_k_dense_replace": int(meta.get(p + "leading_dense_block_count", 0))}


def _deepseek2_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's deepseek2 (DeepSeek-V2 / V2-Lite / V3 / R1, Kimi K2, Moonlight, GLM-4.7-Flash) as transformers'
    family that runs it: DeepSeek-V2 where the gate is softmax, DeepSeek-V3 where it is sigmoid (GLM-4.7-Flash's
    Glm4MoeLite is DeepSeek-V3's attention and routing under other defaults); the attention
    :func:`_latent_config`'s."""
    where = meta.where
    if meta.get(p + "attention.temperature_scale"):
        raise UnsupportedFeatureError(f"{where}: {p}attention.temperature_scale (Mistral Large 3's attention "
                                      "temperature tuning) is not supported")
    groups, kept = int(meta.get(p + "expert_group_count", 1)), int(meta.get(p + "expert_group_used_count", 1))
    config = {**_latent_config(meta, p, cfg),
              "routed_scaling_factor": float32_value(meta.get(p + "expert_weights_scale", 1.0))}
    mtp = cfg["num_hidden_layers"] - config["num_hidden_layers"]
    if _deepseek2_gating(meta, p, {**cfg, **config}) == _SIGMOID_GATING:
        return {**config, "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"],
                "rope_interleave": True, "num_nextn_predict_layers": mtp, "n_group": groups, "topk_group": kept}
    if groups > 1 and kept < groups:  # transformers' and DeepSeek's V2 rank the groups by their best expert
        raise UnsupportedFeatureError(f"{where}: softmax routing limited to {kept} of {groups} expert groups is not "
                                      "supported: llama.cpp ranks the groups by their two best experts' sum, "
                                      "DeepSeek-V2 by its best, and the file cannot say which it was made for")
    if cfg.get("norm_topk_prob"):
        raise UnsupportedFeatureError(f"{where}: {p}expert_weights_norm with softmax routing is not supported "
                                      "(no DeepSeek-V2 release renormalizes its top-k weights)")
    if mtp:
        raise UnsupportedFeatureError(f"{where}: next-token-prediction layers in a softmax-routed (DeepSeek-V2) "
                                      "deepseek2 file are not supported")
    return {**config, "model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"], "topk_method": "greedy"}


def _mistral4_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Mistral Small 4 (mistral4) as llama.cpp runs it, through its deepseek2 graph: :func:`_latent_config`'s attention
    (rope in adjacent pairs over the rows as stored: rope_interleave, whatever the release said), YaRN's mscale as
    deepseek2's; Llama 4's query temperature only where the file sets ``attention.temperature_scale`` (the Hugging
    Face converter writes none: llama.cpp then runs none, as transformers does without llama_4_scaling_beta), counted
    in ``attention.temperature_length`` positions, which must be the YaRN's original context transformers counts in;
    softmax routing (a sigmoid gate, transformers' Mistral 4 has no other, refused) limited to the groups whose two
    best probabilities sum highest, as both rank them, renormalised where expert_weights_norm, scaled; no
    next-token-prediction layers (a file with them refused)."""
    where = meta.where
    if _deepseek2_gating(meta, p, cfg) != _SOFTMAX_GATING:
        raise UnsupportedFeatureError(f"{where}: a mistral4 file routed by the sigmoid gate is not supported; "
                                      f"Mistral 4 routes with softmax ({_SOFTMAX_GATING})")
    config = _latent_config(meta, p, cfg)
    if config["num_hidden_layers"] != cfg["num_hidden_layers"]:
        raise UnsupportedFeatureError(f"{where}: {p}nextn_predict_layers in a mistral4 file is not supported "
                                      "(Mistral 4 has no next-token-prediction layers)")
    scaling = cfg.get("rope_scaling") or {"rope_type": "default"}
    rope = {**scaling, "rope_theta": cfg["rope_theta"]}
    beta = meta.get(p + "attention.temperature_scale")
    if beta:
        length, original = meta.get(p + "attention.temperature_length"), scaling.get("original_max_position_embeddings")
        if original is None or length != original:
            raise UnsupportedFeatureError(f"{where}: {p}attention.temperature_scale counted every {length} positions "
                                          f"beside YaRN's original context {original} is not supported: transformers' "
                                          "Mistral 4 counts Llama 4's temperature in the YaRN's original context")
        rope["llama_4_scaling_beta"] = float32_value(beta)
    return {**config, "rope_parameters": rope, "rope_scaling": None, "rope_interleave": True,
            "routed_scaling_factor": routed_scale(meta, p), **routed_groups(meta, p)}


def _dsa_config(meta: Metadata, p: str, cfg: dict[str, Any], model: str, gating_needed: bool) -> dict[str, Any]:
    """DeepSeek-V3.2's latent attention and routing as llama.cpp runs a deepseek32 or glm-dsa file (``model`` names
    the release): :func:`_latent_config`'s attention, its queries always through their latent; sigmoid routing with
    the correction bias, its groups, scale and renormalisation as the file says. The gate must be the sigmoid:
    another is refused by name, and a file naming none taken as the sigmoid unless llama.cpp requires the key
    (``gating_needed``: deepseek32's)."""
    _sigmoid_gate(meta, p, model, gating_needed)
    config = _latent_config(meta, p, cfg)
    return {**config, "q_lora_rank": int(meta.need(p + "attention.q_lora_rank")),
            "num_nextn_predict_layers": cfg["num_hidden_layers"] - config["num_hidden_layers"],
            "routed_scaling_factor": routed_scale(meta, p), **routed_groups(meta, p)}


def _deepseek32_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek-V3.2 (deepseek32) as llama.cpp runs it: :func:`_dsa_config`'s, the gate required, with a DSA indexer
    on every layer (see ferrum.gguf_import.glm_dsa), which Ferrum runs as the dense attention it is up to index_topk
    keys."""
    return {**_dsa_config(meta, p, cfg, "DeepSeek-V3.2", gating_needed=True), **glm_dsa.indexer_sizes(meta, p)}


def _glm_dsa_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """GLM-5 (glm-dsa) as llama.cpp runs it: :func:`_dsa_config`'s (llama.cpp's gate where the file names none), with
    DSA's indexers on the layers the file names or llama.cpp guesses (see ferrum.gguf_import.glm_dsa), which Ferrum
    runs as the dense attention they are up to index_topk keys."""
    config = _dsa_config(meta, p, cfg, "GLM-5", gating_needed=False)
    return {**config, **glm_dsa.indexer_config(meta, p, config["num_hidden_layers"], cfg["max_position_embeddings"])}


def _kimi_linear_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Kimi Linear (kimi-linear) as llama.cpp runs it: DeepSeek's latent attention (:func:`_latent_config`) without
    rope between Kimi Delta Attention layers (see ferrum.gguf_import.kimi_linear), the gate, which llama.cpp requires,
    the sigmoid."""
    _sigmoid_gate(meta, p, "Kimi Linear", needed=True)
    return {**_latent_config(meta, p, cfg), **kimi_linear.kimi_linear_config(meta, p, cfg)}


def _present(**keys: str) -> Callable[[Metadata, str, dict[str, Any]], dict[str, Any]]:
    """A ``configure`` setting each config.json key to whether the first block holds its tensor: biases the
    converter writes only where the checkpoint has them, and llama.cpp adds where the file holds them."""
    return lambda meta, p, cfg: {key: f"blk.0.{tensor}" in meta.tensors for key, tensor in keys.items()}


def _phimoe_config(meta: Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Phi-3.5-MoE as transformers runs the checkpoint the file was converted from: LayerNorms, sparsemixer routing
    (router_jitter_noise at its default, 0.01, which the file does not record and every release sets), Phi-3's
    window, the biases the file holds, and longrope's factor tensors with the file's ``rope.scaling.attn_factor`` as
    both ``short_mscale`` and ``long_mscale``.

    llama.cpp runs this architecture through Phi-3's graph instead: RMS norms (adding the biases), softmax top-2
    routing renormalised, and that attention factor, which its converter computes as Phi-3's
    ``sqrt(1 + ln(s) / ln(original))`` rather than copying the checkpoint's mscales (Phi-3.5-MoE's config says
    1.2432 where the file says 1.1902). Ferrum follows the checkpoint where the file records it, and the file's
    factor where it does not."""
    config = {**_phi3_config(meta, p, cfg), "attention_bias": "blk.0.attn_q.bias" in meta.tensors,
              "lm_head_bias": "output.bias" in meta.tensors}
    scaling = cfg.get("rope_scaling")
    if scaling and scaling["rope_type"] == "longrope":
        if "attention_factor" not in scaling:
            raise CheckpointError(f"{meta.where}: longrope factors without {p}rope.scaling.attn_factor")
        factor = scaling["attention_factor"]
        config["rope_scaling"] = {**scaling, "short_mscale": factor, "long_mscale": factor}
    return config


#: GLM-4's four norms: GGUF's names for the two after attention and the MLP; and its fused gate/up.
_GLM4_TENSORS = (("post_attention_norm.weight", "post_self_attn_layernorm.weight"),
                 ("post_ffw_norm.weight", "post_mlp_layernorm.weight"), ("ffn_up.weight", "mlp.gate_up_proj.weight"))
#: GLM-4.5's norm after attention, its router's correction bias and its ungated shared experts.
_GLM4_MOE_TENSORS = (("post_attention_norm.weight", "post_attention_layernorm.weight"),
                     ("exp_probs_b.bias", "mlp.gate.e_score_correction_bias"),
                     *((f"ffn_{p}_shexp.weight", f"mlp.shared_experts.{p}_proj.weight")
                       for p in ("gate", "up", "down")))

#: DeepSeek's latent attention (mlx-lm's names for the per-head ``attn_k_b`` / ``attn_v_b`` that newer converters
#: split ``kv_b_proj`` into, read back into it at load: ``ferrum.arch.mla``), its router's correction bias and its
#: ungated shared experts.
_DEEPSEEK2_TENSORS = (
    ("attn_q_a.weight", "self_attn.q_a_proj.weight"), ("attn_q_a_norm.weight", "self_attn.q_a_layernorm.weight"),
    ("attn_q_b.weight", "self_attn.q_b_proj.weight"), ("attn_kv_a_mqa.weight", "self_attn.kv_a_proj_with_mqa.weight"),
    ("attn_kv_a_norm.weight", "self_attn.kv_a_layernorm.weight"), ("attn_kv_b.weight", "self_attn.kv_b_proj.weight"),
    ("attn_k_b.weight", "self_attn.embed_q.weight"), ("attn_v_b.weight", "self_attn.unembed_out.weight"),
    *_GLM4_MOE_TENSORS[1:],
)

#: K-EXAONE's router correction bias, beside the router as LG's checkpoints keep it, and its shared MLP, in the sparse
#: MLP module.
_EXAONE_MOE_BIAS = (("exp_probs_b.bias", "mlp.e_score_correction_bias"),)
#: Shared experts under ``mlp.shared_experts`` (DeepSeek-V3's names): K-EXAONE's, ERNIE 4.5's, Kimi Linear's.
#: q, k and v that the converter cut out of one fused projection (InternLM2's wqkv, Ling v1's query_key_value),
#: joined back in that order.
_JOINED_QKV = ((("attn_q.weight", "attn_k.weight", "attn_v.weight"), "self_attn.qkv_proj.weight"),)
SHARED_EXPERTS = tuple((f"ffn_{p}_shexp.weight", f"shared_experts.{p}_proj.weight") for p in ("gate", "up", "down"))
#: Hunyuan's q/k norms (the dense family's and A13B's) and A13B's ungated shared MLP, in the sparse MLP module.
_HUNYUAN_QK_NORMS = (("attn_q_norm.weight", "self_attn.query_layernorm.weight"),
                     ("attn_k_norm.weight", "self_attn.key_layernorm.weight"))
_HUNYUAN_SHARED = tuple((f"ffn_{p}_shexp.weight", f"shared_mlp.{p}_proj.weight") for p in ("gate", "up", "down"))

#: ERNIE 4.5 MoE's router correction bias (``[1, E]`` in the checkpoint) and ungated shared experts, in the sparse
#: MLP module.
_ERNIE_MOE_TENSORS = (("exp_probs_b.bias", "moe_statics.e_score_correction_bias"), *SHARED_EXPERTS)
#: AFMoE's norms after attention and around the MLP, its output gate, router correction bias and shared experts.
_AFMOE_TENSORS = (("post_attention_norm.weight", "post_attention_layernorm.weight"),
                  ("ffn_norm.weight", "pre_mlp_layernorm.weight"),
                  ("post_ffw_norm.weight", "post_mlp_layernorm.weight"),
                  ("attn_gate.weight", "self_attn.gate_proj.weight"), ("exp_probs_b.bias", "mlp.expert_bias"),
                  *((f"ffn_{p}_shexp.weight", f"mlp.shared_experts.{p}_proj.weight") for p in ("gate", "up", "down")))
#: Llama 4's shared expert, in the sparse MLP module.
_LLAMA4_SHARED = tuple((f"ffn_{p}_shexp.weight", f"shared_expert.{p}_proj.weight") for p in ("gate", "up", "down"))
#: Qwen2-MoE's sigmoid-gated shared expert: GGUF name -> suffix in the sparse MLP module.
_QWEN2_MOE_SHARED = (("ffn_gate_inp_shexp.weight", "shared_expert_gate.weight"),
                     *((f"ffn_{p}_shexp.weight", f"shared_expert.{p}_proj.weight") for p in ("gate", "up", "down")))
#: GraniteMoeShared's ungated shared MLP: its down projection; its gate and up, which the converter splits, are
#: joined back into the one ``input_linear`` the family reads (``_Architecture.joined``).
_GRANITE_SHARED = (("ffn_down_shexp.weight", "shared_mlp.down_proj.weight"),)
_GRANITE_SHARED_JOINED = ((("ffn_gate_shexp.weight", "ffn_up_shexp.weight"),
                           "block_sparse_moe.shared_mlp.gate_up_proj.weight"),)

#: Phi-3's fused blocks, kept fused as the Hugging Face checkpoint has them: q/k/v in one ``attn_qkv``, gate and
#: up in one ``ffn_up``.
_PHI3_FUSED = (("attn_qkv.weight", "self_attn.qkv_proj.weight"), ("ffn_up.weight", "mlp.gate_up_proj.weight"))
#: Gemma's norms: one before and one after each of attention and the MLP.
_GEMMA_NORMS = (("post_attention_norm.weight", "post_attention_layernorm.weight"),
                ("ffn_norm.weight", "pre_feedforward_layernorm.weight"),
                ("post_ffw_norm.weight", "post_feedforward_layernorm.weight"))
_GEMMA_ACTIVATION = (("hidden_act", "gelu_pytorch_tanh"), ("hidden_activation", "gelu_pytorch_tanh"))
#: gpt-oss's blocks beyond Llama's: its MLP norm, attention sinks, biases on o_proj, the router and the experts.
_GPT_OSS_TENSORS = (
    ("post_attention_norm.weight", "post_attention_layernorm.weight"),
    ("attn_sinks.weight", "self_attn.sinks"), ("attn_sinks", "self_attn.sinks"),
    ("attn_output.bias", "self_attn.o_proj.bias"), ("ffn_gate_inp.bias", "mlp.router.bias"),
    *((f"ffn_{p}_exps.bias", f"mlp.switch_mlp.{p}_proj.bias") for p in ("gate", "up", "down")),
)
#: GPT-2's (and GPT-BigCode's) norms, before attention and before the MLP.
_GPT2_NORMS = tuple((f"{gguf}.{part}", f"{hf}.{part}") for gguf, hf in (("attn_norm", "ln_1"), ("ffn_norm", "ln_2"))
                    for part in ("weight", "bias"))
#: OLMo 2's norms: one after each of attention and the MLP, none before.
_OLMO2_NORMS = (_GEMMA_NORMS[0], _GEMMA_NORMS[2])

#: ChatGLM's fused, biased q/k/v, read as the separate projections transformers' Glm has; gate and up fused.
_CHATGLM_SPLIT = tuple((f"attn_qkv.{kind}", tuple(f"self_attn.{p}_proj.{kind}" for p in "qkv"))
                       for kind in ("weight", "bias"))

#: Which tensors each block holds (q/k/v biases, q/k norms, experts) follows from the config written, through
#: the family's own table (``ferrum.arch.tensors.weight_shapes``).
ARCHITECTURES = {
    "llama": _Architecture("llama", "LlamaForCausalLM", True, (("attention_bias", False), ("mlp_bias", False)),
                           with_experts=_Architecture("mixtral", "MixtralForCausalLM", True, moe=_Experts(
                               "block_sparse_moe", "num_local_experts", None, None))),
    "qwen2": _Architecture("qwen2", "Qwen2ForCausalLM", False, (("use_sliding_window", False),)),
    "qwen3": _Architecture("qwen3", "Qwen3ForCausalLM", False,
                           (("attention_bias", False), ("use_sliding_window", False))),
    "phi3": _Architecture("phi3", "Phi3ForCausalLM", False, renamed=_PHI3_FUSED, configure=_phi3_config,
                          partial_rotary=True),
    "qwen2moe": _Architecture("qwen2_moe", "Qwen2MoeForCausalLM", False,
                              (("use_sliding_window", False), ("decoder_sparse_step", 1), ("mlp_only_layers", [])),
                              moe=_Experts("mlp", "num_experts", "moe_intermediate_size", "norm_topk_prob",
                                           renormalise=False, shared_key="shared_expert_intermediate_size",
                                           shared_tensors=_QWEN2_MOE_SHARED)),
    "qwen3moe": _Architecture("qwen3_moe", "Qwen3MoeForCausalLM", False,
                              (("attention_bias", False), ("use_sliding_window", False), ("decoder_sparse_step", 1),
                               ("mlp_only_layers", [])),
                              moe=_Experts("mlp", "num_experts", "moe_intermediate_size", "norm_topk_prob")),
    # Qwen2-VL's and Qwen2.5-VL's text model (the vision tower is the mmproj file's): Qwen 2's blocks, rows as stored,
    # its mrope over text plain rope (see _qwen2vl_config)
    "qwen2vl": _Architecture("qwen2", "Qwen2ForCausalLM", False, (("use_sliding_window", False),),
                             configure=_qwen2vl_config),
    # Qwen3-VL's text model (the vision tower is another file, the mmproj): Qwen 3's blocks. Its rope over (time,
    # height, width) sections (rope.dimension_sections) rotates a text token, whose three positions are one, as
    # plain rope does; the deepstack features (n_deepstack_layers) llama.cpp adds to the first layers' outputs are
    # the image's, zero for text. So a text-only run is Qwen 3's, as Ferrum reads Qwen3-VL's own text_config.
    "qwen3vl": _Architecture("qwen3", "Qwen3ForCausalLM", False,
                             (("attention_bias", False), ("use_sliding_window", False))),
    # Qwen3-VL-MoE's: Qwen3-MoE's, its top-k weights always renormalised (llama.cpp and transformers alike, whatever
    # expert_weights_norm or norm_topk_prob say)
    "qwen3vlmoe": _Architecture("qwen3_moe", "Qwen3MoeForCausalLM", False,
                                (("attention_bias", False), ("use_sliding_window", False), ("decoder_sparse_step", 1),
                                 ("mlp_only_layers", []), ("norm_topk_prob", True)),
                                moe=_Experts("mlp", "num_experts", "moe_intermediate_size", None)),
    # Mistral3's text model (Ministral 3, Devstral 2, Mistral Small 3.x from newer converters): Llama's layout, q/k
    # permuted; which family is the temperature's say (see _mistral3_config)
    "mistral3": _Architecture("ministral3", "Ministral3ForCausalLM", True, (("attention_bias", False),),
                              configure=_mistral3_config, yarn_mscale=True,
                              variants=(("mistral", "MistralForCausalLM"),)),
    # ERNIE 4.5 MoE: the dense model's blocks (adjacent-pair rope stored as is); a softmax router whose correction
    # bias (exp_probs_b) only chooses, top-k weights renormalised, ungated shared experts (see _ernie4_5_moe_config)
    "ernie4_5-moe": _Architecture("ernie4_5_moe", "Ernie4_5_MoeForCausalLM", False, (("use_bias", False),),
                                  configure=_ernie4_5_moe_config,
                                  moe=_Experts("mlp", "moe_num_experts", "moe_intermediate_size", None,
                                               shared_tensors=_ERNIE_MOE_TENSORS)),
    # Llama 4's text model (the vision tower is the mmproj file's): q/k rows as transformers has them (its rope
    # pairs adjacent dims, as llama.cpp's does); experts split out of the fused stacks (see _llama4_config)
    "llama4": _Architecture("llama4_text", "Llama4ForCausalLM", False, (("attention_bias", False),),
                            configure=_llama4_config,
                            moe=_Experts("feed_forward", "num_local_experts", None, None,
                                         shared_tensors=_LLAMA4_SHARED)),
    # llama.cpp's SmolLM3: every fourth layer without rope, which the file does not say (nor does the config)
    "smollm3": _Architecture("smollm3", "SmolLM3ForCausalLM", True,
                             (("attention_bias", False), ("mlp_bias", False), ("no_rope_layer_interval", 4))),
    "granite": _Architecture("granite", "GraniteForCausalLM", True, (("attention_bias", False), ("mlp_bias", False)),
                             configure=_granite_config),
    # llama.cpp splits GraniteMoE's fused input_linear into gate and up stacks, and permutes q/k as for Llama;
    # GraniteMoeShared is the same architecture with a shared MLP (``ffn_*_shexp``)
    "granitemoe": _Architecture("granitemoe", "GraniteMoeForCausalLM", True, (("attention_bias", False),),
                                configure=_granite_config,
                                moe=_Experts("block_sparse_moe", "num_local_experts", None, None),
                                with_shared_expert=_Architecture(
                                    "granitemoeshared", "GraniteMoeSharedForCausalLM", True,
                                    (("attention_bias", False),), configure=_granite_config,
                                    moe=_Experts("block_sparse_moe", "num_local_experts", None, None,
                                                 shared_key="shared_intermediate_size",
                                                 shared_tensors=_GRANITE_SHARED),
                                    joined=_GRANITE_SHARED_JOINED)),
    # Phi-3.5-MoE: Phi-3's rotate-half rope and longrope, separate q/k/v, experts as Mixtral's (see _phimoe_config)
    "phimoe": _Architecture("phimoe", "PhimoeForCausalLM", False, configure=_phimoe_config,
                            moe=_Experts("block_sparse_moe", "num_local_experts", None, None)),
    # OLMoE: q and k normed over their whole projections; llama.cpp never renormalises its top-k weights
    "olmoe": _Architecture("olmoe", "OlmoeForCausalLM", False, (("attention_bias", False),), configure=_clip_qkv_config,
                           moe=_Experts("mlp", "num_experts", None, "norm_topk_prob", renormalise=False)),
    # OLMo 1: LayerNorms without parameters (the file holds none), q/k permuted as for Llama, q/k/v clipped
    "olmo": _Architecture("olmo", "OlmoForCausalLM", True, (("attention_bias", False),), configure=_clip_qkv_config),
    "olmo2": _Architecture("olmo2", "Olmo2ForCausalLM", False, (("attention_bias", False),), renamed=_OLMO2_NORMS,
                           configure=_olmo2_config),
    "gpt-oss": _Architecture("gpt_oss", "GptOssForCausalLM", False, (("attention_bias", True),),
                             moe=_Experts("mlp", "num_local_experts", None, None), renamed=_GPT_OSS_TENSORS,
                             configure=_gpt_oss_config),
    # EXAONE 4: OLMo 2's norms and Qwen 3's q/k norms; rope over rotate-half pairs, stored as transformers has it
    "exaone4": _Architecture("exaone4", "Exaone4ForCausalLM", False, renamed=_OLMO2_NORMS, configure=_exaone4_config),
    # ERNIE 4.5: llama.cpp rotates adjacent pairs, as the checkpoint does, so its q/k rows are stored unchanged
    "ernie4_5": _Architecture("ernie4_5", "Ernie4_5ForCausalLM", False, (("use_bias", False),)),
    # EXAONE 3 / 3.5: Llama's blocks under the release's names (ferrum.arch.families.llama_like's EXAONE_NAMES);
    # llama.cpp rotates rotate-half pairs, rows as the checkpoint has them; 3.5's llama3 rope comes back from rope_freqs
    "exaone": _Architecture("exaone", "ExaoneForCausalLM", False, (("attention_bias", False), ("mlp_bias", False))),
    # K-EXAONE: EXAONE 4's attention (rows as stored, q/k norms, NoPE full layers) in Llama's pre-norm blocks over
    # sigmoid-routed experts with a shared MLP (see _exaone_moe_config)
    "exaone-moe": _Architecture("exaone_moe", "ExaoneMoeForCausalLM", False, renamed=_EXAONE_MOE_BIAS,
                                configure=_exaone_moe_config,
                                moe=_Experts("mlp", "num_experts", "moe_intermediate_size", "norm_topk_prob",
                                             renormalise=False, shared_tensors=SHARED_EXPERTS)),
    # InternLM2 / 2.5: Llama's blocks, q/k/v packed in one wqkv grouped by key/value head, which the converter cut
    # into q, k and v (q/k permuted as Llama's): joined back and regrouped. Its dynamic rope (2.5's) llama.cpp does
    # not run, nor does the converter write it; no release has biases, which llama.cpp reads none of
    # Arcee Trinity: gated attention with q/k norms, rows as stored (llama.cpp's rotate-half rope), sandwich norms,
    # sigmoid-routed experts (see _afmoe_config)
    "afmoe": _Architecture("afmoe", "AfmoeForCausalLM", False, renamed=_AFMOE_TENSORS, configure=_afmoe_config,
                           moe=_Experts("mlp", "num_experts", "moe_intermediate_size", None, router="router.gate")),
    # DBRX: biasless LayerNorms, q/k/v fused as all queries, then keys, then values, rotate-half rope rows as stored,
    # the norm before the experts as attn_output_norm, softmax-routed experts (w1 / v1 / w2 as gate / up / down) on
    # every layer (see _dbrx_config)
    "dbrx": _Architecture("dbrx", "DbrxForCausalLM", False, renamed=(("attn_output_norm.weight",
                                                                      "post_attention_layernorm.weight"),),
                          configure=_dbrx_config, moe=_Experts("ffn", "ffn_config.moe_num_experts", None, None)),
    # MiniMax-M2 / M2.1: q and k normed over their whole projections, rotate-half rope over rope.dimension_count of
    # each head (rows as stored), sigmoid-routed experts (w1 / w3 / w2 stacked as gate / up / down) with the correction
    # bias on every layer (see _minimax_m2_config)
    "minimax-m2": _Architecture("minimax_m2", "MiniMaxM2ForCausalLM", False, partial_rotary=True,
                                renamed=(("exp_probs_b.bias", "block_sparse_moe.e_score_correction_bias"),),
                                configure=_minimax_m2_config,
                                moe=_Experts("block_sparse_moe", "num_local_experts", None, None)),
    # MiniCPM 1B / 2B: Llama's layout (q/k permuted), its scalings in the metadata (see _minicpm_config)
    "minicpm": _Architecture("minicpm", "MiniCPMForCausalLM", True, configure=_minicpm_config),
    # Qwen (1): the release's fused c_attn (q, k, v rows in turn) as attn_qkv, rows as stored (rotate-half rope),
    # plain rope to the whole context (see ferrum.gguf_import.qwen1)
    "qwen": _Architecture("qwen", "QWenLMHeadModel", False, configure=qwen1.qwen_config),
    # OpenELM: per-layer heads and MLP widths, q/k/v fused with per-head q/k norms, the MLP's gate and up joined back
    # (see ferrum.gguf_import.openelm)
    "openelm": _Architecture("openelm", "OpenELMForCausalLM", False, configure=openelm.openelm_config,
                             per_layer=True, joined=openelm.JOINED, renamed=openelm.NORMS),
    # XVERSE: Llama's layout, q/k permuted as Llama's (see _xverse_config)
    "xverse": _Architecture("xverse", "XverseForCausalLM", True, configure=_xverse_config),
    # MiniCPM3: DeepSeek-V2's latent attention, rotate-half (see _minicpm3_config)
    "minicpm3": _Architecture("minicpm3", "MiniCPM3ForCausalLM", False, renamed=_DEEPSEEK2_TENSORS[:6], latent=True,
                              configure=_minicpm3_config),
    "internlm2": _Architecture("internlm2", "InternLM2ForCausalLM", True, (("bias", False),), grouped_qkv=True,
                               joined=_JOINED_QKV),
    # Arcee AFM: Llama's layout (q/k permuted) with an ungated squared-ReLU MLP, the only one llama.cpp runs for it
    "arcee": _Architecture("arcee", "ArceeForCausalLM", True, (("hidden_act", "relu2"), ("attention_bias", False),
                                                                ("mlp_bias", False))),
    # Seed-OSS: rotate-half rope stored as the checkpoint has it, q/k/v biases where the file holds them, the
    # MLP's norm under llama.cpp's name for a norm after attention
    "seed_oss": _Architecture("seed_oss", "SeedOssForCausalLM", False,
                              (("attention_out_bias", False), ("mlp_bias", False)), renamed=_OLMO2_NORMS[:1],
                              configure=_present(attention_bias="attn_q.bias")),
    # Hunyuan (dense): rotate-half rope stored as the checkpoint has it, q/k RMS-normed per head once rotated; the
    # converter folds the checkpoint's NTK alpha into rope.freq_base (rope scaling none), as transformers reads it
    "hunyuan-dense": _Architecture("hunyuan_v1_dense", "HunYuanDenseV1ForCausalLM", False,
                                   renamed=_HUNYUAN_QK_NORMS, configure=_present(attention_bias="attn_q.bias")),
    # Nemotron: the converter stores LayerNorm1P's weights as 1 + w (llama.cpp's LayerNorm scales by the stored
    # value), taken off again; squared ReLU always (llama.cpp runs no other); rotate-half rope over
    # rope.dimension_count of each head, rows as the checkpoint has them
    "nemotron": _Architecture("nemotron", "NemotronForCausalLM", False, (("hidden_act", "relu2"),), norm_offset=1.0,
                              partial_rotary=True,
                              configure=_present(attention_bias="attn_q.bias", mlp_bias="ffn_up.bias")),
    # The LayerNorm families: biased norms and projections, under the checkpoint's own module names
    # (``ferrum.arch.tensors.stored_name``). llama.cpp rotates Phi-2's and StarCoder2's rotate-half pairs and Command
    # R's adjacent ones as the checkpoints store them; it runs StarCoder2 without the window its config.json sets.
    "phi2": _Architecture("phi", "PhiForCausalLM", False, (("hidden_act", "gelu_new"),), partial_rotary=True),
    "starcoder2": _Architecture("starcoder2", "Starcoder2ForCausalLM", False,
                                (("hidden_act", "gelu_pytorch_tanh"), ("use_bias", True), ("sliding_window", None))),
    # Apertus: Llama's blocks under its own norm names, Qwen 3's per-head q/k norms, rotate-half rope rotated as the
    # checkpoint stores it (its llama3 scaling from rope_freqs), an ungated xIELU MLP whose per-layer parameters the
    # converter keeps in the metadata (see ferrum.gguf_import.apertus)
    "apertus": _Architecture("apertus", "ApertusForCausalLM", False,
                             (("hidden_act", "xielu"), ("attention_bias", False)), renamed=apertus.NORMS,
                             configure=apertus.apertus_config, metadata_tensors=apertus.xielu_tensors),
    # Jais 2: biased LayerNorms and projections, an ungated squared-ReLU MLP (the only one llama.cpp runs for it),
    # rotate-half rope rotated as the checkpoint stores it
    "jais2": _Architecture("jais2", "Jais2ForCausalLM", False, (("hidden_act", "relu2"),),
                           configure=_present(attention_bias="attn_q.bias", mlp_bias="ffn_up.bias")),
    "command-r": _Architecture("cohere", "CohereForCausalLM", False, (("attention_bias", False),),
                               configure=_command_r_config),
    "cohere2": _Architecture("cohere2", "Cohere2ForCausalLM", False, (("attention_bias", False),),
                             configure=_cohere2_config),
    "gptneox": _Architecture("gpt_neox", "GPTNeoXForCausalLM", False, (("hidden_act", "gelu"),
                                                                        ("attention_bias", True)),
                             partial_rotary=True, configure=_gpt_neox_config, grouped_qkv=True),
    # StableLM rotates its rotate-half pairs as stored; GPT-2's and StarCoder's projections are stored [out, in]
    # (GPT-2's transposed from its Conv1D by the converter, read so by ``ferrum.arch.tensors.resolve_layout``)
    "stablelm": _Architecture("stablelm", "StableLmForCausalLM", False, partial_rotary=True,
                              configure=_stablelm_config, renamed=_STABLELM_QK_NORMS),
    "falcon": _Architecture("falcon", "FalconForCausalLM", False, (("activation", "gelu"),), configure=_falcon_config,
                            grouped_qkv=True, renamed_with=(("attn_norm_2.weight", (
                                ("attn_norm_2.weight", "ln_attn.weight"), ("attn_norm_2.bias", "ln_attn.bias"),
                                ("attn_norm.weight", "ln_mlp.weight"), ("attn_norm.bias", "ln_mlp.bias"))),)),
    "gpt2": _Architecture("gpt2", "GPT2LMHeadModel", False, (("activation_function", "gelu_new"),),
                          renamed=_GPT2_NORMS),
    # GPT-J: one biased LayerNorm (ln_1) feeding attention and the MLP side by side, unbiased q/k/v/o, a biased LM
    # head (see _gptj_config)
    "gptj": _Architecture("gptj", "GPTJForCausalLM", False, (("activation_function", "gelu_new"),),
                          renamed=_GPT2_NORMS[:2], partial_rotary=True, configure=_gptj_config,
                          optional_mlp_width=True),
    # ALiBi: BLOOM's embeddings LayerNormed (token_embd_norm), its q/k/v regrouped by the converter (every q, then
    # k, then v); MPT's q/k/v as stored, clamped by the file's clamp_kqv
    "bloom": _Architecture("bloom", "BloomForCausalLM", False, grouped_qkv=True, renamed_globals=tuple(
        (f"token_embd_norm.{part}", f"model.embed_norm.{part}") for part in ("weight", "bias"))),
    "mpt": _Architecture("mpt", "MptForCausalLM", False, configure=_mpt_config),
    "starcoder": _Architecture("gpt_bigcode", "GPTBigCodeForCausalLM", False,
                               (("activation_function", "gelu_pytorch_tanh"),), renamed=_GPT2_NORMS,
                               configure=_starcoder_config, grouped_qkv=True),
    # GLM-4-9B (chat, 0520; ChatGLM's remote code or transformers' Glm): rope over adjacent pairs of half of each
    # head, as the checkpoint has it (rows stored unchanged); q/k/v fused (ChatGLM's) or not (Glm's), biased
    "chatglm": _Architecture("glm", "GlmForCausalLM", False, renamed=_GLM4_TENSORS[2:], partial_rotary=True,
                             split=_CHATGLM_SPLIT,
                             configure=lambda meta, p, cfg: {"attention_bias": any(
                                 f"blk.0.attn_{t}.bias" in meta.tensors for t in ("qkv", "q"))}),
    # GLM-4 (0414) rotates adjacent pairs, as the checkpoint does, so llama.cpp stores its q/k rows unchanged;
    # GLM-4.5 rotates rotate-half pairs, also stored unchanged. Both rotate part of each head.
    "glm4": _Architecture("glm4", "Glm4ForCausalLM", False, renamed=_GLM4_TENSORS, partial_rotary=True,
                          configure=lambda meta, p, cfg: {"attention_bias": "blk.0.attn_q.bias" in meta.tensors}),
    "glm4moe": _Architecture("glm4_moe", "Glm4MoeForCausalLM", False, renamed=_GLM4_MOE_TENSORS, partial_rotary=True,
                             configure=_glm4_moe_config,
                             moe=_Experts("mlp", "n_routed_experts", "moe_intermediate_size", "norm_topk_prob",
                                          renormalise=False)),
    # llama.cpp rotates DeepSeek's adjacent pairs, as the checkpoint stores them; which family is the gate's choice
    "deepseek2": _Architecture("deepseek_v3", "DeepseekV3ForCausalLM", False, (("attention_bias", False),),
                               renamed=_DEEPSEEK2_TENSORS, configure=_deepseek2_config, latent=True,
                               moe=_Experts("mlp", "n_routed_experts", "moe_intermediate_size", "norm_topk_prob",
                                            renormalise=False),
                               variants=(("deepseek_v2", "DeepseekV2ForCausalLM"),)),
    # Mistral Small 4: DeepSeek's latent attention, rows as stored, the experts' gate and up fused as transformers
    # stores them (or apart, as llama.cpp also reads them), softmax routing grouped (see _mistral4_config)
    "mistral4": _Architecture("mistral4", "Mistral4ForCausalLM", False, (("attention_bias", False),),
                              renamed=_DEEPSEEK2_TENSORS, configure=_mistral4_config, latent=True,
                              own_tensors=partial(fused_gate_up, module="mlp.", count_key="n_routed_experts"),
                              moe=_Experts("mlp", "n_routed_experts", "moe_intermediate_size", "norm_topk_prob",
                                           renormalise=False)),
    # DeepSeek-V3.2: DeepSeek-V3's attention and routing, rows as stored, an indexer on every layer checked and
    # dropped (see _deepseek32_config)
    "deepseek32": _Architecture("deepseek_v32", "DeepseekV32ForCausalLM", False, (("attention_bias", False),),
                                renamed=_DEEPSEEK2_TENSORS + glm_dsa.TENSORS, configure=_deepseek32_config,
                                latent=True, moe=_Experts("mlp", "n_routed_experts", "moe_intermediate_size",
                                                          "norm_topk_prob", renormalise=False)),
    # Kimi Linear: KDA layers between DeepSeek's latent attention without rope, over grouped sigmoid routing (see
    # _kimi_linear_config)
    "kimi-linear": _Architecture("kimi_linear", "KimiLinearForCausalLM", False, (("attention_bias", False),),
                                 renamed=_DEEPSEEK2_TENSORS[3:8] + kimi_linear.TENSORS, configure=_kimi_linear_config,
                                 latent=True, own_tensors=kimi_linear.own_tensors,
                                 moe=_Experts("block_sparse_moe", "num_experts", "moe_intermediate_size", None,
                                              shared_tensors=SHARED_EXPERTS)),
    # GLM-5: the same, its indexers on the layers the file names or llama.cpp guesses (see _glm_dsa_config)
    "glm-dsa": _Architecture("glm_moe_dsa", "GlmMoeDsaForCausalLM", False, (("attention_bias", False),),
                             renamed=_DEEPSEEK2_TENSORS + glm_dsa.TENSORS, configure=_glm_dsa_config, latent=True,
                             moe=_Experts("mlp", "n_routed_experts", "moe_intermediate_size", "norm_topk_prob",
                                          renormalise=False)),
    # dots.llm1: Qwen 3's attention (rows as stored) over DeepSeek-V3's sigmoid routing, its correction bias and
    # shared experts as GLM-4.5's are named
    "dots1": _Architecture("dots1", "Dots1ForCausalLM", False, renamed=_GLM4_MOE_TENSORS[1:], configure=_dots1_config,
                           moe=_Experts("mlp", "n_routed_experts", "moe_intermediate_size", "norm_topk_prob",
                                        renormalise=False)),
    # DeepSeek-MoE 16B (v1): Llama's blocks, q/k rows and biases permuted as Llama's, softmax-routed experts beside
    # shared ones after dense first layers (see _deepseek_config)
    "deepseek": _Architecture("deepseek", "DeepseekForCausalLM", True,
                              (("norm_topk_prob", False), ("scoring_func", "softmax")), configure=_deepseek_config,
                              moe=_Experts("mlp", "n_routed_experts", "moe_intermediate_size", None,
                                           shared_tensors=SHARED_EXPERTS)),
    # Hunyuan-A13B: the dense family's attention (q/k normed once rotated), experts and a shared MLP on every layer
    "hunyuan-moe": _Architecture("hunyuan_v1_moe", "HunYuanMoEV1ForCausalLM", False, renamed=_HUNYUAN_QK_NORMS,
                                 configure=_hunyuan_moe_config,
                                 moe=_Experts("mlp", "num_experts", "moe_intermediate_size", None,
                                              shared_tensors=_HUNYUAN_SHARED)),
    # Qwen3.5 and Qwen3-Next: Gated DeltaNet layers between gated full-attention ones, every norm but the Gated
    # DeltaNet's stored as 1 + w (see ferrum.gguf_import.gated_delta); llama.cpp runs Qwen3-Next as Qwen3.5-MoE
    "qwen35": _Architecture("qwen3_5_text", "Qwen3_5ForCausalLM", False, (("attention_bias", False),),
                            norm_offset=1.0, partial_rotary=True, configure=qwen3_hybrid_config,
                            own_tensors=OWN_TENSORS["qwen35"], unshifted_norms=UNSHIFTED_NORMS),
    "qwen35moe": _Architecture("qwen3_5_moe_text", "Qwen3_5MoeForCausalLM", False, (("attention_bias", False),),
                               norm_offset=1.0, partial_rotary=True, configure=qwen3_hybrid_config,
                               moe=_Experts("mlp", "num_experts", "moe_intermediate_size", None,
                                            shared_key="shared_expert_intermediate_size",
                                            shared_tensors=_QWEN2_MOE_SHARED),
                               own_tensors=OWN_TENSORS["qwen35"], unshifted_norms=UNSHIFTED_NORMS),
    "gemma": _Architecture("gemma", "GemmaForCausalLM", False, (("hidden_act", "gelu_pytorch_tanh"),
                                                                 ("attention_bias", False)), norm_offset=1.0),
    "gemma2": _Architecture("gemma2", "Gemma2ForCausalLM", False, (*_GEMMA_ACTIVATION, ("attention_bias", False)),
                            renamed=_GEMMA_NORMS, norm_offset=1.0, configure=_gemma2_config),
    "gemma3": _Architecture("gemma3_text", "Gemma3ForCausalLM", False, (*_GEMMA_ACTIVATION, ("attention_bias", False)),
                            renamed=_GEMMA_NORMS, norm_offset=1.0, configure=_gemma3_config),
}


# Gemma 4 (31B, E2B / E4B, 26B-A4B, whose experts configure reads: see ferrum.gguf_import.gemma4)
_GEMMA4 = _Architecture("gemma4_text", "Gemma4ForCausalLM", False, renamed=gemma4.TENSORS,
                        configure=gemma4.gemma4_config, own_tensors=fused_gate_up, per_layer=True)
ARCHITECTURES["gemma4"] = replace(_GEMMA4, with_experts=_GEMMA4)
# Gemma 3n (E2B / E4B): Gemma 4 E2B's attention and per-layer inputs with AltUp and Laurel, as llama.cpp runs it (see
# ferrum.gguf_import.gemma3n); a width per layer
ARCHITECTURES["gemma3n"] = _Architecture("gemma3n_text", "Gemma3nForCausalLM", False,
                                         (("hidden_activation", "gelu_pytorch_tanh"), ("attention_bias", False)),
                                         renamed=gemma3n.TENSORS, configure=gemma3n.gemma3n_config, per_layer=True,
                                         split_globals=gemma3n.SPLIT_GLOBALS)
# MiMo-V2-Flash: sliding layers (twice the key/value heads, sinks, their own rope base) among full ones, values
# narrower than the keys, rotate-half rope over rope.dimension_count (rows as stored), sigmoid-routed experts always
# renormalised, dense where a block has no router (see ferrum.gguf_import.mimo2)
ARCHITECTURES["mimo2"] = _Architecture("mimo_v2_flash", "MiMoV2FlashForCausalLM", False, (("norm_topk_prob", True),),
                                       renamed=mimo2.TENSORS, configure=mimo2.mimo2_config, partial_rotary=True,
                                       per_layer=True, value_heads=True,
                                       moe=_Experts("mlp", "n_routed_experts", "moe_intermediate_size", None))
# Laguna: a query head count per layer, a softplus gate per head or per element, q/k norms, a rope per attention kind
# over rotate-half pairs (rows as stored), sigmoid-routed experts renormalised and scaled beside an ungated shared one,
# dense first layers (see ferrum.gguf_import.laguna)
ARCHITECTURES["laguna"] = _Architecture("laguna", "LagunaForCausalLM", False, renamed=laguna.TENSORS,
                                        configure=laguna.laguna_config, partial_rotary=True, per_layer=True,
                                        moe=_Experts("mlp", "num_experts", "moe_intermediate_size", None,
                                                     shared_key="shared_expert_intermediate_size"))
# Ling v1: Llama's blocks under Ling's names, q/k/v cut apart and q/k permuted as Llama's (joined back, un-permuted),
# softmax-routed experts beside shared ones on every layer, the LM head normed by the converter (see
# ferrum.gguf_import.bailing)
ARCHITECTURES["bailingmoe"] = _Architecture("bailing_moe", "BailingMoeForCausalLM", True, joined=_JOINED_QKV,
                                            configure=bailing.bailingmoe_config,
                                            moe=_Experts("mlp", "num_experts", "moe_intermediate_size",
                                                         "norm_topk_prob", renormalise=False,
                                                         shared_tensors=SHARED_EXPERTS))
# Ling 2.0 (and Sarvam-MoE): fused q/k/v as stored, q/k norms, partial rotate-half rope, softmax or sigmoid routing
# corrected, grouped and scaled, shared experts of their own width, dense first layers (see ferrum.gguf_import.bailing)
ARCHITECTURES["bailingmoe2"] = _Architecture("bailing_moe", "BailingMoeV2ForCausalLM", False, partial_rotary=True,
                                             configure=bailing.bailingmoe2_config, own_tensors=bailing.own_tensors,
                                             variants=(("sarvam_moe", "SarvamMoEForCausalLM"),),
                                             moe=_Experts("mlp", "num_experts", "moe_intermediate_size",
                                                          "norm_topk_prob", renormalise=False,
                                                          shared_tensors=SHARED_EXPERTS))
# Qwen3-Next's files: Qwen3.5-MoE's blocks, the Gated DeltaNet's projections grouped per key head
ARCHITECTURES["qwen3next"] = replace(ARCHITECTURES["qwen35moe"], own_tensors=OWN_TENSORS["qwen3next"])


# Granite 4.0-H: Mamba-2 layers among Granite's attention ones (see ferrum.gguf_import.granite_hybrid); the shared MLP
# alone (its width the file's shared-expert width, its gate and up joined into input_linear), or experts beside it as
# GraniteMoeShared's
_GRANITE_HYBRID = _Architecture("granitemoehybrid", "GraniteMoeHybridForCausalLM", True, (("attention_bias", False),),
                                configure=granite_hybrid.granite_hybrid_config, own_tensors=granite_hybrid.own_tensors,
                                joined=((("ffn_gate.weight", "ffn_up.weight"), "mlp.gate_up_proj.weight"),))
ARCHITECTURES["granitehybrid"] = replace(_GRANITE_HYBRID, with_shared_expert=_GRANITE_HYBRID, with_experts=replace(
    _GRANITE_HYBRID, joined=_GRANITE_SHARED_JOINED,
    moe=_Experts("block_sparse_moe", "num_local_experts", None, None, shared_key="shared_intermediate_size",
                 shared_tensors=_GRANITE_SHARED, router=ROUTER["granitemoeshared"])))

# LFM2: gated short convolutions between attention layers (see ferrum.gguf_import.lfm2); rows as the checkpoint has
# them
ARCHITECTURES["lfm2"] = _Architecture("lfm2", "Lfm2ForCausalLM", False, configure=lfm2.lfm2_config,
                                      own_tensors=lfm2.own_tensors, renamed=lfm2.RENAMED,
                                      renamed_globals=lfm2.GLOBAL_TENSORS)
# LFM2-MoE: LFM2's layers over sigmoid-routed experts after dense first layers
ARCHITECTURES["lfm2moe"] = replace(ARCHITECTURES["lfm2"], model_type="lfm2_moe", hf_class="Lfm2MoeForCausalLM",
                                   configure=lfm2.lfm2_moe_config, renamed=lfm2.RENAMED + lfm2.MOE_RENAMED,
                                   moe=_Experts("feed_forward", "num_experts", "moe_intermediate_size", None))

# Nemotron-H: Mamba-2, attention and squared-ReLU MLP blocks, written as Granite 4.0-H's (see
# ferrum.gguf_import.nemotron_h); q/k permuted as Llama's
ARCHITECTURES["nemotron_h"] = _Architecture("nemotron_h", "NemotronHForCausalLM", True, (("mlp_hidden_act", "relu2"),),
                                            configure=nemotron_h.nemotron_h_config,
                                            own_tensors=nemotron_h.own_tensors)
# Falcon-H1: attention and Mamba-2 side by side in every layer, the multipliers folded by the converter (see
# ferrum.gguf_import.falcon_h1); q/k as the checkpoint has them
ARCHITECTURES["falcon-h1"] = _Architecture("falcon_h1", "FalconH1ForCausalLM", False,
                                           configure=falcon_h1.falcon_h1_config, own_tensors=falcon_h1.own_tensors,
                                           renamed=falcon_h1.RENAMED)
# Nemotron NAS (DeciLM): Llama's blocks, q/k permuted as Llama's, each layer's attention (its own key/value heads, a
# linear map or none) and MLP width (or none) from per-layer counts (see ferrum.gguf_import.deci)
ARCHITECTURES["deci"] = _Architecture("nemotron-nas", "DeciLMForCausalLM", True, configure=deci.deci_config,
                                      per_layer=True, llama3_rope_freqs=True, otherwise=deci.OTHERWISE)
# PLaMo 2: Mamba layers (0 heads) among rope attention ones (rows as stored), sandwich norms with offsets of their
# own, in the release's layout (see ferrum.gguf_import.plamo2)
ARCHITECTURES["plamo2"] = _Architecture("plamo2", "Plamo2ForCausalLM", False, configure=plamo2.plamo2_config,
                                        own_tensors=plamo2.own_tensors, renamed=plamo2.TENSORS, norm_offset=1.0,
                                        norm_offsets=plamo2.NORM_OFFSETS, per_layer=True)
# PLaMo-13B: parallel blocks, key/value heads tiled over the queries, whose order the converter changed (see
# ferrum.gguf_import.plamo); rows as stored
ARCHITECTURES["plamo"] = _Architecture("plamo", "PlamoForCausalLM", False, configure=plamo.plamo_config,
                                       own_tensors=plamo.own_tensors, renamed=plamo.TENSORS)
# PLaMo 3: PLaMo 2's attention blocks alone, sliding layers with a rope base of their own (see
# ferrum.gguf_import.plamo3)
ARCHITECTURES["plamo3"] = _Architecture("plamo3", "Plamo3ForCausalLM", False, configure=plamo3.plamo3_config,
                                        renamed=plamo2.TENSORS, norm_offset=1.0, norm_offsets=plamo2.NORM_OFFSETS)
# Step 3.5: full and sliding layers with their own query heads, ropes and SwiGLU clamps, head-wise output gates,
# sigmoid-routed experts beside a shared one; rows as stored (see ferrum.gguf_import.step35)
ARCHITECTURES["step35"] = _Architecture("step3p5", "Step3p5ForCausalLM", False, configure=step35.step35_config,
                                        renamed=step35.TENSORS, norm_offset=1.0, partial_rotary=True, per_layer=True,
                                        moe=_Experts("moe", "moe_num_experts", "moe_intermediate_size", None,
                                                     shared_key="share_expert_dim", shared_tensors=step35.SHARED))
# RWKV-7: fla-hub's release layout, each stored layer Ferrum's time and channel mixes (see ferrum.gguf_import.rwkv7)
ARCHITECTURES["rwkv7"] = _Architecture("rwkv7", "RWKV7ForCausalLM", False, configure=rwkv7.rwkv7_config,
                                       renamed=rwkv7.TENSORS, split=rwkv7.SPLIT, renamed_globals=rwkv7.GLOBAL_TENSORS,
                                       unread=rwkv7.UNREAD, attention=False)
# Pure Mamba-2: Nemotron-H's Mamba-2 blocks alone, written as Granite 4.0-H's (see ferrum.gguf_import.nemotron_h)
ARCHITECTURES["mamba2"] = _Architecture("mamba2", "Mamba2ForCausalLM", False, configure=nemotron_h.mamba2_config,
                                        own_tensors=nemotron_h.own_tensors, attention=False)
# Mamba-1 blocks alone (Mamba; Falcon Mamba where ssm.dt_b_c_rms) and Jamba's Mamba-1 and rope-less attention layers,
# its experts placed where a block has a router, their top-k weights never renormalised (llama.cpp's and
# transformers'), ffn_norm as Falcon-H1's pre_ff_layernorm (see ferrum.gguf_import.mamba)
ARCHITECTURES["mamba"] = _Architecture("mamba", "MambaForCausalLM", False, configure=mamba.mamba_config,
                                       own_tensors=mamba.mamba_tensors("mixer"), attention=False,
                                       variants=(("falcon_mamba", "FalconMambaForCausalLM"),))
ARCHITECTURES["jamba"] = _Architecture("jamba", "JambaForCausalLM", False, configure=mamba.jamba_config,
                                       own_tensors=mamba.mamba_tensors("mamba"), renamed=falcon_h1.RENAMED,
                                       moe=_Experts("feed_forward", "num_experts", None, None))
# Nemotron 3 Nano: 'E' blocks of sigmoid-routed squared-ReLU experts beside a shared MLP, llama.cpp's own architecture
ARCHITECTURES["nemotron_h_moe"] = replace(ARCHITECTURES["nemotron_h"], renamed=nemotron_h.MOE_RENAMED, moe=_Experts(
    "mixer", "n_routed_experts", "moe_intermediate_size", "norm_topk_prob",
    shared_key="moe_shared_expert_intermediate_size", shared_tensors=nemotron_h.SHARED_TENSORS))


def for_model_type(model_type: str, gguf_arch: str | None = None, experts: bool | None = None) -> _Architecture:
    """The architecture whose config.json names ``model_type`` (Mixtral's and GraniteMoeShared's included), the
    file's own (``gguf_arch``) first where several write the same family, and the one with or without a sparse MLP as
    ``experts`` says where both write it (Granite 4.0-H's)."""
    first = [ARCHITECTURES[gguf_arch]] if gguf_arch in ARCHITECTURES else []
    every = [*first, *ARCHITECTURES.values(), *(a.with_experts for a in ARCHITECTURES.values() if a.with_experts),
             *(a.with_shared_expert for a in ARCHITECTURES.values() if a.with_shared_expert)]
    every += [replace(a, model_type=kind, hf_class=hf_class) for a in every for kind, hf_class in a.variants]
    named = [a for a in every if a.model_type == model_type]
    return next((a for a in named if experts is None or (a.moe is not None) == experts), named[0])


#: The MoE blocks: GGUF name -> Hugging Face suffix within the sparse MLP module (mlx-lm's stacked names); the
#: router, ``ffn_gate_inp``, is the family's router module (``ferrum.moe.spec.ROUTER``).
MOE_BLOCK_TENSORS = {
    "ffn_gate_exps.weight": "switch_mlp.gate_proj.weight",
    "ffn_up_exps.weight": "switch_mlp.up_proj.weight",
    "ffn_down_exps.weight": "switch_mlp.down_proj.weight",
}
#: longrope's per-pair factors, which llama.cpp stores as tensors: GGUF name -> rope_scaling key.
ROPE_FACTOR_TENSORS = {"rope_factors_short.weight": "short_factor", "rope_factors_long.weight": "long_factor"}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)

# GGUF tensor name -> Hugging Face name, per block and global.
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "position_embd.weight": "model.embed_positions.weight",
    "output_norm.weight": "model.norm.weight",
    "output_norm.bias": "model.norm.bias",
    "output.weight": "lm_head.weight",
    "output.bias": "lm_head.bias",
    **gemma4.GLOBAL_TENSORS,
}
BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_qkv.weight": "self_attn.qkv_proj.weight",
    "attn_qkv.bias": "self_attn.qkv_proj.bias",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.bias": "mlp.down_proj.bias",
    "attn_norm.bias": "input_layernorm.bias",
    "ffn_norm.bias": "post_attention_layernorm.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
# Present in some files, carry nothing a Hugging Face checkpoint needs.
IGNORED_BLOCK_TENSORS = {"attn_rot_embd"}
