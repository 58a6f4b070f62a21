"""``config.json`` from a GGUF file's metadata (rope scaling included)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ferrum.arch.families import FAMILIES
from ferrum.errors import CheckpointError, ConfigError, UnsupportedFeatureError
from ferrum.gguf_import.architectures import ARCHITECTURES, ROPE_FACTOR_TENSORS, SUPPORTED_ARCHITECTURES
from ferrum.gguf_import.files import Metadata, float32_value, llama3_rope_scaling
from ferrum.gguf_import.tensors import dequantized, numpy_shape


def _longrope_scaling(meta: Metadata, p: str, factors: dict[str, Any], rope_dims: int, where: str) -> dict[str, Any]:
    """Phi-3.5 / Phi-4-mini's and MiniCPM3's longrope, which llama.cpp keeps as two factor tensors and two numbers."""
    if any(t is None for t in factors.values()):
        raise CheckpointError(f"{where}: the file holds one of rope_factors_short / rope_factors_long, not both")
    scaling: dict[str, Any] = {"rope_type": "longrope"}
    for key, tensor in factors.items():
        values = dequantized(tensor, where).reshape(-1)
        if len(values) != rope_dims // 2:
            raise CheckpointError(f"{where}: {key} holds {len(values)} factors for {rope_dims // 2} rotary pairs")
        scaling[key] = [float32_value(v) for v in values]
    # as llama.cpp reads a file without it (MiniCPM3's converter writes none): the training context
    original = meta.get(p + "rope.scaling.original_context_length") or meta.need(p + "context_length")
    scaling["original_max_position_embeddings"] = int(original)
    attention = meta.get(p + "rope.scaling.attn_factor")
    if attention is not None:
        scaling["attention_factor"] = float32_value(attention)
    return scaling


def _yarn_scaling(meta: Metadata, p: str, where: str, latent: bool = False, mscale: bool = False) -> dict[str, Any]:
    """YaRN's numbers (Qwen's long-context files) back into transformers' names; the two llama.cpp-only knobs are
    refused unless neutral, since transformers' YaRN has no place for them. Latent attention's (deepseek2) are
    :func:`_latent_yarn`'s; Ministral 3's log multiplier is its mscale_all_dim (``mscale``)."""
    original = meta.get(p + "rope.scaling.original_context_length")
    if not original:
        raise CheckpointError(f"{where}: yarn rope scaling without {p}rope.scaling.original_context_length")
    scaling: dict[str, Any] = {"original_max_position_embeddings": int(original)}
    if latent:
        scaling.update(_latent_yarn(meta, p, where))
    for key, name in (("yarn_attn_factor", "attention_factor"), ("yarn_beta_fast", "beta_fast"),
                      ("yarn_beta_slow", "beta_slow")):
        value = meta.get(f"{p}rope.scaling.{key}")
        if value is not None:
            scaling[name] = float32_value(value)
    for key, neutral in (("yarn_ext_factor", 1.0), ("yarn_log_multiplier", 0.0)):
        value = meta.get(f"{p}rope.scaling.{key}")
        if key == "yarn_log_multiplier" and (latent or mscale):
            if mscale and value:  # mscale_all_dim, mscale equal to it (_Architecture.yarn_mscale)
                scaling["mscale"] = scaling["mscale_all_dim"] = float32_value(value)
            continue
        if value is not None and value != neutral:
            raise UnsupportedFeatureError(f"{where}: {p}rope.scaling.{key} = {value} is not supported "
                                          f"(transformers' YaRN has no such setting; {neutral} is accepted)")
    return scaling


def _latent_yarn(meta: Metadata, p: str, where: str) -> dict[str, Any]:
    """DeepSeek's YaRN as llama.cpp runs a deepseek2 file: the converter stores ``0.1 * mscale_all_dim`` as
    ``yarn_log_multiplier`` (divided back at load), and llama.cpp takes ``mscale`` to equal it: cos and sin
    unscaled, the softmax scale times ``(0.1 * mscale_all_dim * ln(factor) + 1) ** 2``, which is transformers'
    reading of ``mscale = mscale_all_dim``, as every DeepSeek and Kimi release sets them. A file without it (or
    with its own attention factor) llama.cpp scales otherwise than transformers can."""
    log_multiplier = meta.get(p + "rope.scaling.yarn_log_multiplier")
    if not log_multiplier:
        raise UnsupportedFeatureError(f"{where}: a {p[:-1]} file with yarn rope scaling but no (or a zero) "
                                      f"{p}rope.scaling.yarn_log_multiplier is not supported: llama.cpp then scales "
                                      "the attention as transformers' YaRN has no setting for")
    if meta.get(p + "rope.scaling.yarn_attn_factor") is not None:
        raise UnsupportedFeatureError(f"{where}: {p}rope.scaling.yarn_attn_factor in a {p[:-1]} file is not "
                                      "supported (llama.cpp scales both the rope and the softmax by it)")
    weight = float32_value(np.float32(log_multiplier) / np.float32(0.1))  # llama.cpp divides in float32
    return {"mscale": weight, "mscale_all_dim": weight}


def _norm_epsilon(meta: Metadata, p: str, model_type: str) -> dict[str, float]:
    """The norms' epsilon under the key the family reads: RMSNorm's, or LayerNorm's (``layer_norm_eps``...)."""
    key = FAMILIES[model_type].eps_key
    if key is None:  # the family fixes it
        return {}
    if key == "rms_norm_eps":
        return {key: float32_value(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-6))}
    return {key: float32_value(meta.get(p + "attention.layer_norm_epsilon", 1e-5))}


def _first(value: int | list[int]) -> int:
    """A size the file gives once, or per layer (the first layer's that has one, 0 where a layer has no MLP:
    ``configure`` reads the rest)."""
    return int(next((v for v in value if v), value[0]) if isinstance(value, list) else value)


def build_config(meta: Metadata, reader: Any, tokens: list[str] | None) -> dict[str, Any]:
    where = meta.where
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedFeatureError(
            f"{where}: GGUF architecture {arch!r} is not supported; Ferrum converts "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} GGUF files (for other models use a Hugging Face "
            "safetensors checkpoint folder)"
        )
    p = f"{arch}."
    hidden = int(meta.need(p + "embedding_length"))
    family = ARCHITECTURES[arch]
    heads = meta.need(p + "attention.head_count")
    if isinstance(heads, list):  # one per layer (Laguna's): the most, fewer padded at load, configure lists them
        if not family.per_layer:
            raise UnsupportedFeatureError(f"{where}: per-layer query head counts {sorted(set(heads))} are not "
                                          f"supported for {arch}")
        heads = max(heads)
    heads = int(heads)
    kv_heads = meta.get(p + "attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # one per layer, 0 for those without attention (Granite 4.0-H's Mamba-2 ones)
        kv_heads = [k for k in kv_heads if k] or kv_heads
        if len(set(kv_heads)) != 1 and not family.per_layer:
            raise UnsupportedFeatureError(
                f"{where}: per-layer KV head counts {sorted(set(kv_heads))} are not supported"
            )
        kv_heads = kv_heads[0]
    widths = meta.get(p + "feed_forward_length")  # per layer, 0 for those without an MLP (Nemotron-H's)
    if isinstance(widths, list) and len(set(widths) - {0} or {0}) != 1 and not family.per_layer:
        raise UnsupportedFeatureError(f"{where}: per-layer MLP widths {sorted(set(widths))} are not supported "
                                      f"for {arch}")
    kv_heads = int(kv_heads)
    if p + "attention.key_length" in meta:
        head_dim = int(meta.get(p + "attention.key_length"))
    elif heads == 0 and not family.attention:  # its configure sizes the heads and the width (pure Mamba-2's)
        head_dim = 0
    elif heads <= 0 or hidden % heads:
        raise ConfigError(f"{where}: hidden size {hidden} is not divisible by {heads} heads")
    else:
        head_dim = hidden // heads
    value_dim = int(meta.get(p + "attention.value_length", head_dim))
    if value_dim != head_dim and not (family.latent or family.value_heads):  # latent attention's: its cache's
        raise UnsupportedFeatureError(f"{where}: key length {head_dim} != value length {value_dim} is not supported")
    rope_dims = int(meta.get(p + "rope.dimension_count", head_dim))
    if rope_dims != head_dim and not (family.partial_rotary or family.latent):
        raise UnsupportedFeatureError(
            f"{where}: partial rotary embeddings ({rope_dims} of {head_dim} dims) are not supported for {arch}"
        )
    if meta.get(p + "expert_count", 0) and family.moe is None:
        if family.with_experts is None:
            with_moe = [name for name, a in ARCHITECTURES.items() if a.moe is not None or a.with_experts is not None]
            raise UnsupportedFeatureError(f"{where}: mixture-of-experts {arch} GGUF files are not supported "
                                          f"(Ferrum imports {', '.join(with_moe)} ones)")
        family = family.with_experts
    shared_expert = family.moe and (family.moe.shared_key or family.moe.shared_tensors)  # Hunyuan's: no key
    if meta.get(p + "expert_shared_feed_forward_length") and not shared_expert:
        if family.with_shared_expert is None:
            raise UnsupportedFeatureError(f"{where}: {arch} with a shared expert is not supported; Ferrum imports "
                                          "qwen2moe's and granitemoe's (GraniteMoeShared) shared experts")
        family = family.with_shared_expert

    tensors = {t.name: t for t in reader.tensors}
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise CheckpointError(f"{where}: GGUF file has no token_embd.weight")
    vocab = numpy_shape(embed)[0]
    declared = meta.get(p + "vocab_size") or (len(tokens) if tokens else None)
    if declared is not None and int(declared) != vocab:
        raise CheckpointError(f"{where}: vocab size {declared} in the metadata but token_embd has {vocab} rows")
    if tokens and len(tokens) > vocab:  # the tokenizer would write ids the model has no embedding for
        raise CheckpointError(f"{where}: the tokenizer lists {len(tokens)} tokens but token_embd has {vocab} rows; "
                              "the file is damaged or was converted wrongly")

    theta = float32_value(meta.get(p + "rope.freq_base", 10000.0))
    rope_scaling: dict[str, Any] | None = None
    # as llama.cpp reads it: no type is linear, and the old converter's key holds the factor
    kind = meta.get(p + "rope.scaling.type", "linear")
    factor = meta.get(p + "rope.scaling.factor", meta.get(p + "rope.scale_linear"))
    if kind != "none" and not (kind == "linear" and factor in (None, 0, 1)):
        if kind not in ("linear", "yarn") or not factor:
            raise UnsupportedFeatureError(
                f"{where}: rope scaling {kind!r} (factor {factor}) is not supported; Ferrum handles 'linear', "
                "'yarn', longrope and Llama 3's"
            )
        rope_scaling = {"rope_type": kind, "factor": float32_value(factor)}
        if kind == "yarn":
            rope_scaling.update(_yarn_scaling(meta, p, where, family.latent, family.yarn_mscale))
    factors = {key: tensors.get(name) for name, key in ROPE_FACTOR_TENSORS.items()}
    if any(t is not None for t in factors.values()):
        rope_scaling = _longrope_scaling(meta, p, factors, rope_dims, where)
    freqs = tensors.get("rope_freqs.weight")
    if freqs is not None and (not family.per_layer or family.llama3_rope_freqs):  # else configure's to read
        fitted = llama3_rope_scaling(dequantized(freqs, where), head_dim, theta)
        if fitted is None:
            raise UnsupportedFeatureError(
                f"{where}: the file's rope_freqs tensor does not match Llama 3 rope scaling; not supported"
            )
        if fitted:
            if rope_scaling is not None:
                raise UnsupportedFeatureError(
                    f"{where}: both {rope_scaling['rope_type']} and Llama 3 rope scaling; not supported")
            rope_scaling = fitted

    config: dict[str, Any] = {
        "architectures": [family.hf_class],
        "model_type": family.model_type,
        "hidden_size": hidden,
        # an optional width absent or 0 (llama.cpp's unset) is the family's default, which the tensors' shapes check
        "intermediate_size": None if family.optional_mlp_width and not meta.get(p + "feed_forward_length") else _first(
            meta.get(p + "feed_forward_length") or (
                0 if not family.attention else meta.need(p + "expert_feed_forward_length"))),
        "num_hidden_layers": int(meta.need(p + "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": int(meta.need(p + "context_length")),
        **_norm_epsilon(meta, p, family.model_type),
        "rope_theta": theta,
        "rope_scaling": rope_scaling,
        "hidden_act": "silu",
        **dict(family.config),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if family.moe is not None:
        experts = family.moe
        config[experts.count_key] = int(meta.need(p + "expert_count"))
        config["num_experts_per_tok"] = int(meta.need(p + "expert_used_count"))
        if experts.size_key is not None:
            config[experts.size_key] = int(meta.need(p + "expert_feed_forward_length"))
        if experts.renormalise_key is not None:  # as llama.cpp does unless the file says
            config[experts.renormalise_key] = bool(meta.get(p + "expert_weights_norm", experts.renormalise))
        if experts.shared_key is not None:
            config[experts.shared_key] = int(meta.need(p + "expert_shared_feed_forward_length"))
    if rope_dims != head_dim and not family.latent:
        config["partial_rotary_factor"] = rope_dims / head_dim
    if rope_scaling is not None and "original_max_position_embeddings" in rope_scaling:
        # where transformers reads it first (and Phi-3's config class would otherwise default it to 4096)
        config["original_max_position_embeddings"] = rope_scaling["original_max_position_embeddings"]
    if family.configure is not None:
        config.update(family.configure(meta, p, config))
    for key in ("bos", "eos", "padding"):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            config["pad_token_id" if key == "padding" else f"{key}_token_id"] = int(token_id)
    # the family's own spelling of the sizes (GPT-2's n_embd...), unless ``configure`` wrote it: Llama 4's dense
    # width is its intermediate_size_mlp, its experts' the intermediate_size
    names = {key: name for key, name in FAMILIES[config["model_type"]].names.items() if name not in config}
    return {names.get(key, key): value for key, value in config.items()}
