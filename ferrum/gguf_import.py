"""Turning a llama (Mixtral too), qwen2, qwen2moe, qwen3, qwen3moe, phi3, smollm3, granite, gemma2 or gemma3
GGUF file into a Hugging Face-style checkpoint folder.

Ferrum loads safetensors folders. A GGUF file (llama.cpp's format) holds the same
model in another layout, so :func:`convert_gguf` rewrites it once:

* ``config.json`` from the ``<architecture>.*`` metadata (:data:`_ARCHITECTURES` maps each onto its
  Hugging Face family);
* ``model.safetensors`` with Hugging Face tensor names. Quantized matrices stay
  packed: :mod:`ferrum.quant.gguf` rewrites their blocks into the affine form
  (``X.weight`` uint32, ``X.scales``, ``X.biases``) without going through float,
  so the folder is about the GGUF's size and dequantizes to exactly llama.cpp's
  values; ``config.json`` gets mlx-lm's ``quantization`` section. Dense tensors
  (norms, F16/BF16/F32 matrices) are kept as they are. ``dequantize_to`` turns
  everything into one float dtype instead;
* ``tokenizer.json`` rebuilt with the ``tokenizers`` library from
  ``tokenizer.ggml.*``, plus ``tokenizer_config.json`` (chat template, special
  tokens) and ``generation_config.json`` (stop token ids).

Two details of the GGUF layout matter:

* GGUF lists a tensor's dimensions fastest-first (``ne0, ne1, ...``), the reverse
  of numpy / PyTorch order; a ``[576, 49152]`` GGUF embedding is ``(49152, 576)``
  here. The reader's ``data`` is already row-major, one row per outer index.
* for Llama, llama.cpp's converter permutes the rows of ``q_proj`` and ``k_proj`` so that its
  rope rotates adjacent pairs ``(2j, 2j+1)`` of each head (Qwen's it leaves alone); Hugging Face's Llama
  rotates the two halves ``(j, j + d/2)``. :func:`unpermute_qk` undoes it; it
  moves whole rows, so it applies to packed words, scales and biases alike.
* for Gemma, the converter stores every norm weight as ``1 + w`` (Gemma's RMSNorm scales by ``1 + w``;
  llama.cpp's by the stored value); the import subtracts the 1 again.

The ``gguf`` package (llama.cpp's own reader) is needed: ``pip install 'ferrum[gguf]'``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from ferrum.arch.tensors import weight_shapes
from ferrum.checkpoint import write_safetensors_header
from ferrum.config import ModelConfig
from ferrum.errors import CheckpointError, ConfigError, UnsupportedFeatureError
from ferrum.quant.affine import QuantizedWeight
from ferrum.quant.config import QuantConfig
from ferrum.quant.gguf import StoredForm, describe, repack

ProgressFn = Callable[[int, int, str], None]


@dataclass(frozen=True)
class _Experts:
    """Where a family keeps its sparse MLP, and how its config.json spells the MoE numbers."""

    module: str  # the sparse MLP's module in a layer
    count_key: str  # the expert count
    size_key: str | None  # each expert's intermediate size (None: intermediate_size)
    renormalise_key: str | None  # renormalising the top-k weights (None: the family always does)
    renormalise: bool = True  # what llama.cpp does when the file does not say (``expert_weights_norm``)
    shared: bool = False  # Qwen2-MoE's sigmoid-gated shared expert beside the routed ones


@dataclass(frozen=True)
class _Architecture:
    """How one GGUF architecture maps onto a Hugging Face family."""

    model_type: str
    hf_class: str
    #: llama.cpp's converter permuted q/k rows for its adjacent-pair rope (Llama); the rotate-half families
    #: (Qwen) are stored as Hugging Face has them.
    permuted_qk: bool
    config: tuple[tuple[str, Any], ...] = ()  # config.json entries fixed by the family
    #: Phi-3: q/k/v in one ``attn_qkv``, gate and up in one ``ffn_up``, as the Hugging Face checkpoint has them.
    fused: bool = False
    #: A router and stacked experts in place of the dense MLP, written in mlx-lm's ``switch_mlp`` layout.
    moe: _Experts | None = None
    #: Block tensors whose Hugging Face name differs from Llama's (Gemma's four norms): GGUF -> Hugging Face.
    renamed: tuple[tuple[str, str], ...] = ()
    #: What the converter added to every norm weight (Gemma's ``1 + w``), subtracted again on import.
    norm_offset: float = 0.0
    #: config.json entries the family reads from its own metadata keys (``meta``, ``arch.`` prefix, config so far).
    configure: Callable[[_Metadata, str, dict[str, Any]], dict[str, Any]] | None = None


def _query_pre_attn_scalar(meta: _Metadata, p: str, cfg: dict[str, Any], layers_of_27b: int) -> float:
    """Gemma's attention scale as ``1 / sqrt(query_pre_attn_scalar)``. The converter does not write it, so llama.cpp
    takes head_dim, except for the 27B model (known by its layer count), whose Hugging Face config says
    hidden / heads; a file that does carry ``attention.scale`` is taken at its word."""
    scale = meta.get(p + "attention.scale")
    if scale:
        return 1.0 / float(scale) ** 2
    if cfg["num_hidden_layers"] == layers_of_27b:
        return cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["head_dim"]


def _gemma2_config(meta: _Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's Gemma 2 reading: both soft-caps (50 and 30 where absent), a 4096-token window where absent."""
    return {
        "query_pre_attn_scalar": _query_pre_attn_scalar(meta, p, cfg, layers_of_27b=46),
        "attn_logit_softcapping": _float32_value(meta.get(p + "attn_logit_softcapping", 50.0)),
        "final_logit_softcapping": _float32_value(meta.get(p + "final_logit_softcapping", 30.0)),
        "sliding_window": int(meta.get(p + "attention.sliding_window", 4096)),
    }


def _gemma3_config(meta: _Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's Gemma 3 reading: five sliding layers of the file's window to one global; the sliding ones
    rotate at base 10000, unscaled; no attention soft-cap; the final one only where the file sets it."""
    final = meta.get(p + "final_logit_softcapping")
    return {
        "query_pre_attn_scalar": _query_pre_attn_scalar(meta, p, cfg, layers_of_27b=62),
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None if final is None else _float32_value(final),
        "sliding_window": int(meta.need(p + "attention.sliding_window")),
        "sliding_window_pattern": 6,
        "rope_local_base_freq": 10000.0,
    }


def _granite_config(meta: _Metadata, p: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Granite's four multipliers, which llama.cpp requires in the file."""
    keys = {"embedding_multiplier": "embedding_scale", "residual_multiplier": "residual_scale",
            "attention_multiplier": "attention.scale", "logits_scaling": "logit_scale"}
    return {name: _float32_value(meta.need(p + key)) for name, key in keys.items()}


#: Gemma's norms: one before and one after each of attention and the MLP.
_GEMMA_NORMS = (("post_attention_norm.weight", "post_attention_layernorm.weight"),
                ("ffn_norm.weight", "pre_feedforward_layernorm.weight"),
                ("post_ffw_norm.weight", "post_feedforward_layernorm.weight"))
_GEMMA_ACTIVATION = (("hidden_act", "gelu_pytorch_tanh"), ("hidden_activation", "gelu_pytorch_tanh"))

#: Which tensors each block holds (q/k/v biases, q/k norms, experts) follows from the config written, through
#: the family's own table (``ferrum.arch.tensors.weight_shapes``).
_ARCHITECTURES = {
    "llama": _Architecture("llama", "LlamaForCausalLM", True, (("attention_bias", False), ("mlp_bias", False))),
    "qwen2": _Architecture("qwen2", "Qwen2ForCausalLM", False, (("use_sliding_window", False),)),
    "qwen3": _Architecture("qwen3", "Qwen3ForCausalLM", False,
                           (("attention_bias", False), ("use_sliding_window", False))),
    "phi3": _Architecture("phi3", "Phi3ForCausalLM", False, fused=True),
    "qwen2moe": _Architecture("qwen2_moe", "Qwen2MoeForCausalLM", False,
                              (("use_sliding_window", False), ("decoder_sparse_step", 1), ("mlp_only_layers", [])),
                              moe=_Experts("mlp", "num_experts", "moe_intermediate_size", "norm_topk_prob",
                                           renormalise=False, shared=True)),
    "qwen3moe": _Architecture("qwen3_moe", "Qwen3MoeForCausalLM", False,
                              (("attention_bias", False), ("use_sliding_window", False), ("decoder_sparse_step", 1),
                               ("mlp_only_layers", [])),
                              moe=_Experts("mlp", "num_experts", "moe_intermediate_size", "norm_topk_prob")),
    # llama.cpp's SmolLM3: every fourth layer without rope, which the file does not say (nor does the config)
    "smollm3": _Architecture("smollm3", "SmolLM3ForCausalLM", True,
                             (("attention_bias", False), ("mlp_bias", False), ("no_rope_layer_interval", 4))),
    "granite": _Architecture("granite", "GraniteForCausalLM", True, (("attention_bias", False), ("mlp_bias", False)),
                             configure=_granite_config),
    "gemma2": _Architecture("gemma2", "Gemma2ForCausalLM", False, (*_GEMMA_ACTIVATION, ("attention_bias", False)),
                            renamed=_GEMMA_NORMS, norm_offset=1.0, configure=_gemma2_config),
    "gemma3": _Architecture("gemma3_text", "Gemma3ForCausalLM", False, (*_GEMMA_ACTIVATION, ("attention_bias", False)),
                            renamed=_GEMMA_NORMS, norm_offset=1.0, configure=_gemma3_config),
}
#: A ``llama`` file with experts (llama.cpp writes Mixtral so).
_MIXTRAL = _Architecture("mixtral", "MixtralForCausalLM", True,
                         moe=_Experts("block_sparse_moe", "num_local_experts", None, None))
#: The MoE blocks: GGUF name -> Hugging Face suffix within the sparse MLP module (mlx-lm's stacked names).
_MOE_BLOCK_TENSORS = {
    "ffn_gate_inp.weight": "gate.weight",
    "ffn_gate_exps.weight": "switch_mlp.gate_proj.weight",
    "ffn_up_exps.weight": "switch_mlp.up_proj.weight",
    "ffn_down_exps.weight": "switch_mlp.down_proj.weight",
}
#: The shared expert, where the family has one.
_SHARED_EXPERT_TENSORS = {
    "ffn_gate_inp_shexp.weight": "shared_expert_gate.weight",
    "ffn_gate_shexp.weight": "shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "shared_expert.down_proj.weight",
}
#: Phi-3's fused blocks: GGUF name -> Hugging Face suffix, in place of the separate projections.
_FUSED_BLOCK_TENSORS = {"attn_qkv.weight": "self_attn.qkv_proj.weight", "ffn_up.weight": "mlp.gate_up_proj.weight"}
#: longrope's per-pair factors, which llama.cpp stores as tensors: GGUF name -> rope_scaling key.
_ROPE_FACTOR_TENSORS = {"rope_factors_short.weight": "short_factor", "rope_factors_long.weight": "long_factor"}
SUPPORTED_ARCHITECTURES = tuple(_ARCHITECTURES)

#: Float dtypes ``dequantize_to`` accepts.
DEQUANTIZE_DTYPES = ("float32", "float16", "bfloat16")
#: safetensors' name of each stored dtype.
_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "uint32": "U32"}

#: Tokens llama.cpp ends generation at wherever the vocabulary has them, whatever the file names as EOS: chat
#: models' end-of-turn markers, which many conversions (Gemma's, older Llama 3 ones) do not name.
_END_OF_GENERATION = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>",
    "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
))

# GGUF token types (llama.cpp's llama_token_type).
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 3, 4

# ``tokenizer.ggml.pre`` values, grouped by how llama.cpp splits text before BPE.
# GPT-2's regex only (tokenizers' ByteLevel pre-tokenizer with use_regex=True).
_PRE_GPT2 = {"gpt2", "mpt", "olmo", "jais"}
# Every digit on its own first (tokenizers' Digits), then GPT-2's regex: SmolLM,
# StarCoder and relatives (llama.cpp: regex "\p{N}" then the GPT-2 one).
_PRE_DIGITS_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
# Llama 3's regex (tiktoken-style).
_PRE_LLAMA3 = {"llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "pixtral"}
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's: Llama 3's with every digit on its own.
_PRE_QWEN2 = {"qwen2", "deepseek-r1-qwen"}
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")

# GGUF tensor name -> Hugging Face name, per block and global.
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
# Present in some files, carry nothing a Hugging Face checkpoint needs.
_IGNORED_BLOCK_TENSORS = {"attn_rot_embd"}


def _import_gguf() -> Any:
    try:
        import gguf
        import gguf.quants  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            "reading GGUF files needs the 'gguf' package: pip install 'ferrum[gguf]' (or pip install gguf)"
        ) from exc
    return gguf


# ---------------------------------------------------------------- file layout

#: Fewest bytes a metadata entry (key length, 1-byte key, type, 1-byte value) and a tensor info (name length,
#: 1-byte name, dimension count, one dimension, type, offset) take: a header claiming more entries than the
#: file can hold is refused before the reader loops over them.
_MIN_KV_BYTES, _MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 1, 8 + 1 + 4 + 8 + 4 + 8
_MAX_DIMS = 4  # GGML_MAX_DIMS


def _check_header(path: Path, where: str) -> None:
    """Magic, version and entry counts against the file size, in microseconds and without allocating."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != b"GGUF":
        raise CheckpointError(f"{where} is not a readable GGUF file: no GGUF header (magic and counts)")
    version, tensors, kvs = struct.unpack("<IQQ", head[4:])
    if version not in (2, 3):
        raise CheckpointError(f"{where} is not a readable GGUF file: format version {version} (Ferrum reads 2 and 3)")
    room = size - 24
    if kvs * _MIN_KV_BYTES > room or tensors * _MIN_TENSOR_INFO_BYTES > room:
        raise CheckpointError(
            f"{where}: the GGUF header claims {kvs} metadata entries and {tensors} tensors, more than its "
            f"{size} bytes can hold; the file is truncated or corrupt"
        )


def _check_tensor_layout(reader: Any, size: int, where: str) -> None:
    """Every tensor's dimensions, byte size, alignment and extent within the file; no two overlap."""
    from gguf import GGML_QUANT_SIZES

    extents = []
    for t in reader.tensors:
        dims = [int(n) for n in t.shape]
        if not 1 <= len(dims) <= _MAX_DIMS or any(n <= 0 for n in dims):
            raise CheckpointError(f"{where}: tensor {t.name} has dimensions {dims}; each must be positive, "
                                  f"at most {_MAX_DIMS} of them")
        block, type_size = GGML_QUANT_SIZES[t.tensor_type]
        if dims[0] % block:
            raise CheckpointError(f"{where}: tensor {t.name} rows of {dims[0]} values do not fill whole "
                                  f"{t.tensor_type.name} blocks of {block}")
        n_bytes = math.prod(dims) // block * type_size
        start = int(t.data_offset)
        if (start - reader.data_offset) % reader.alignment:
            raise CheckpointError(f"{where}: tensor {t.name} starts at byte {start}, not aligned to "
                                  f"{reader.alignment} bytes")
        if start + n_bytes > size or t.data.nbytes != n_bytes:
            raise CheckpointError(f"{where}: tensor {t.name} ({n_bytes} bytes at {start}) runs past the end of "
                                  f"the file ({size} bytes); the file is truncated or corrupt")
        extents.append((start, start + n_bytes, t.name))
    extents.sort()
    for (_, end, first), (start, _, second) in zip(extents, extents[1:]):
        if start < end:
            raise CheckpointError(f"{where}: tensors {first} and {second} overlap in the file")


def _check_finite(plan: list["_PlannedTensor"], where: str) -> None:
    """Float tensors hold finite values (quantized ones: their scales, checked by ``describe``)."""
    for p in plan:
        t = p.source
        if t.data.dtype.kind == "f" and not np.isfinite(t.data).all():
            raise CheckpointError(f"{where}: tensor {t.name} holds NaN or infinite values")


# ---------------------------------------------------------------- metadata


class _Metadata:
    """Typed access to a GGUF file's key/value fields."""

    def __init__(self, reader: Any, where: str):
        self._fields = reader.fields
        self.where = where

    def __contains__(self, key: str) -> bool:
        return key in self._fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        if field is None:
            return default
        value = _field_value(field, key, self.where)
        kind = _kind_of(key)
        if kind is not None and not _is_kind(value, kind):
            raise CheckpointError(
                f"{self.where}: GGUF metadata {key!r} must be {kind}, got {type(value).__name__} {value!r:.80}; "
                "the file is corrupt or was written by a broken converter"
            )
        return value

    def need(self, key: str) -> Any:
        if key not in self._fields:
            raise CheckpointError(f"{self.where}: GGUF metadata lacks {key!r}")
        return self.get(key)


#: The type every metadata field Ferrum reads must have, by the end of its key.
_FIELD_KINDS = {
    **dict.fromkeys((
        "embedding_length", "attention.head_count", "attention.head_count_kv", "attention.key_length",
        "attention.value_length", "rope.dimension_count", "expert_count", "vocab_size", "feed_forward_length",
        "block_count", "context_length", "_token_id", "original_context_length", "attention.sliding_window",
        "expert_used_count", "expert_feed_forward_length", "expert_shared_feed_forward_length",
    ), "a non-negative integer"),
    **dict.fromkeys((
        "rope.freq_base", "rope.scaling.factor", "attention.layer_norm_rms_epsilon", "rope.scaling.attn_factor",
        "attn_logit_softcapping", "final_logit_softcapping", "attention.scale", "embedding_scale",
        "residual_scale", "logit_scale",
    ), "a finite number"),
    **dict.fromkeys((
        "general.architecture", "rope.scaling.type", "tokenizer.ggml.model", "tokenizer.ggml.pre",
        "tokenizer.chat_template", "general.name",
    ), "a string"),
    **dict.fromkeys(("tokenizer.ggml.tokens", "tokenizer.ggml.merges"), "a list of strings"),
    "tokenizer.ggml.token_type": "a list of integers",
    "tokenizer.ggml.scores": "a list of finite numbers",
    **dict.fromkeys(("add_bos_token", "add_eos_token", "add_space_prefix", "expert_weights_norm"), "a boolean"),
}


def _kind_of(key: str) -> str | None:
    return next((kind for end, kind in _FIELD_KINDS.items() if key.endswith(end)), None)


def _is_kind(value: Any, kind: str) -> bool:
    def integer(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if kind == "a non-negative integer":
        return integer(value) and value >= 0
    if kind == "a finite number":
        return (integer(value) or isinstance(value, float)) and math.isfinite(value)
    if kind == "a string":
        return isinstance(value, str)
    if kind == "a list of strings":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "a list of integers":
        return isinstance(value, list) and all(integer(v) for v in value)
    if kind == "a list of finite numbers":
        return isinstance(value, list) and all((integer(v) or isinstance(v, float)) and math.isfinite(v) for v in value)
    return isinstance(value, bool)


def _field_value(field: Any, key: str, where: str) -> Any:
    """Decode a ReaderField from its raw parts (works across gguf package versions)."""
    from gguf import GGUFValueType

    types = list(field.types)
    if not types:
        return None

    def scalar(part: np.ndarray) -> Any:
        value = part.tolist()
        return value[0] if isinstance(value, list) else value

    def string(part: np.ndarray) -> str:
        try:
            return bytes(part).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CheckpointError(f"{where}: GGUF field {key!r} holds invalid UTF-8: {exc}") from exc

    if types[0] == GGUFValueType.ARRAY:
        if len(types) > 2:
            raise UnsupportedFeatureError(f"{where}: nested GGUF arrays ({key!r}) are not supported")
        sub = types[-1] if len(types) > 1 else None
        if sub == GGUFValueType.STRING:
            return [string(field.parts[i]) for i in field.data]
        return [scalar(field.parts[i]) for i in field.data]
    if types[0] == GGUFValueType.STRING:
        return string(field.parts[field.data[0]])
    value = scalar(field.parts[field.data[0]])
    if types[0] == GGUFValueType.BOOL:
        return bool(value)
    return value


def _float32_value(value: float) -> float:
    """A float32 metadata value as the short decimal it was written from (1e-05, not 9.99e-06)."""
    return float(str(np.float32(value)))


# ---------------------------------------------------------------- tensors


def unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of a q/k projection (``[n_heads * head_dim, ...]``).

    llama.cpp's converter reorders each head's rows ``(half, j) -> (j, half)`` so
    that the rotary pairs ``(j, j + d/2)`` of the rotate-half layout become the
    adjacent rows ``(2j, 2j + 1)`` its rope kernel rotates. Reading each head's
    rows as ``(j, half)`` and swapping back restores Hugging Face's order.
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise CheckpointError(f"cannot un-permute a q/k tensor of {rows} rows over {n_heads} heads")
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@dataclass
class _PlannedTensor:
    hf_name: str
    source: Any  # gguf ReaderTensor
    shape: tuple[int, ...]  # numpy / Hugging Face order
    unpermute_heads: int | None  # q/k: heads to un-permute over
    offset: float = 0.0  # subtracted from the values (Gemma's norms)
    form: StoredForm | None = None  # how it is written, set by _choose_forms

    @property
    def module(self) -> str:
        return self.hf_name.removesuffix(".weight")


def _numpy_shape(tensor: Any) -> tuple[int, ...]:
    """GGUF lists ne0 (fastest) first; numpy wants the slowest dimension first."""
    return tuple(int(n) for n in reversed(list(tensor.shape)))


def _dequantize(tensor: Any, where: str) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        array = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as exc:
        raise UnsupportedFeatureError(
            f"{where}: tensor {tensor.name} is stored as {tensor.tensor_type.name}, which the installed "
            f"gguf package cannot dequantize ({exc}); try upgrading it: pip install -U gguf"
        ) from exc
    shape = _numpy_shape(tensor)
    if array.size != math.prod(shape):
        raise CheckpointError(
            f"{where}: tensor {tensor.name} dequantized to {array.size} values but its shape {shape} "
            f"needs {math.prod(shape)}"
        )
    return np.ascontiguousarray(array, dtype=np.float32).reshape(shape)


def _check_quant_types(tensors: Iterable[Any], where: str) -> None:
    """Dequantize one block of every storage type up front, so nothing is written for a file we cannot read."""
    from gguf.quants import dequantize

    seen: dict[Any, Any] = {}
    for t in tensors:
        seen.setdefault(t.tensor_type, t)
    for qtype, t in seen.items():
        first_row = t.data.reshape(-1, t.data.shape[-1])[:1] if t.data.ndim else t.data
        try:
            dequantize(first_row, qtype)
        except NotImplementedError as exc:
            raise UnsupportedFeatureError(
                f"{where}: tensor {t.name} is stored as {qtype.name}, which the installed gguf package cannot "
                f"dequantize ({exc}); try upgrading it: pip install -U gguf"
            ) from exc


def _plan_tensors(reader: Any, cfg: dict[str, Any], where: str) -> list[_PlannedTensor]:
    """Map every GGUF tensor to its Hugging Face name and the shape the model reads it in: ``weight_shapes`` of
    the config being written (rope_freqs and longrope's factors are read into the config instead)."""
    arch = next(a for a in (*_ARCHITECTURES.values(), _MIXTRAL) if a.model_type == cfg["model_type"])
    expected = weight_shapes(ModelConfig.from_dict(cfg, where))
    by_name = {t.name: t for t in reader.tensors}
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    block_tensors = {**_BLOCK_TENSORS, **(_FUSED_BLOCK_TENSORS if arch.fused else {}), **dict(arch.renamed)}
    if arch.moe is not None:
        block_tensors.update({name: f"{arch.moe.module}.{suffix}"
                              for name, suffix in {**_MOE_BLOCK_TENSORS, **_SHARED_EXPERT_TENSORS}.items()})
    plan: list[_PlannedTensor] = []
    unknown: list[str] = []
    block = re.compile(r"blk\.(\d+)\.(.+)$")
    for name, tensor in by_name.items():
        if name == "rope_freqs.weight" or name in _ROPE_FACTOR_TENSORS:  # read into the config
            continue
        heads_to_unpermute, hf_name = None, _GLOBAL_TENSORS.get(name)
        m = block.match(name)
        if m is not None:
            i, rest = int(m.group(1)), m.group(2)
            if rest.split(".")[0] in _IGNORED_BLOCK_TENSORS:
                continue
            hf_name = f"model.layers.{i}.{block_tensors[rest]}" if rest in block_tensors else None
            if arch.permuted_qk and rest == "attn_q.weight":
                heads_to_unpermute = heads
            elif arch.permuted_qk and rest == "attn_k.weight":
                heads_to_unpermute = kv_heads
        want = expected.get(hf_name)
        if want is None:
            unknown.append(name)
            continue
        shape = _numpy_shape(tensor)
        if len(shape) == 1 and want == (1, *shape):  # a one-row matrix llama.cpp stores as a vector
            shape = want
        if shape != want:
            raise CheckpointError(
                f"{where}: tensor {name} ({hf_name}) has shape {shape} but the metadata implies {want}"
            )
        offset = arch.norm_offset if hf_name.endswith("norm.weight") else 0.0
        plan.append(_PlannedTensor(hf_name, tensor, shape, heads_to_unpermute, offset))
    if unknown:
        shown = ", ".join(sorted(unknown)[:8]) + (" ..." if len(unknown) > 8 else "")
        raise UnsupportedFeatureError(
            f"{where}: {len(unknown)} tensor(s) have no place in a {arch.hf_class} checkpoint: {shown}. "
            f"Ferrum's GGUF import handles dense {', '.join(SUPPORTED_ARCHITECTURES)} files as llama.cpp's "
            "converter writes them"
        )
    have = {p.hf_name for p in plan}
    missing = [n for n in expected if n not in have]
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise CheckpointError(f"{where}: GGUF file lacks {len(missing)} tensor(s) a {arch.hf_class} needs: {shown}")
    return plan


def _choose_forms(plan: list[_PlannedTensor], dequantize_to: str | None, where: str) -> None:
    """Decide how every tensor is stored, checking types, block shapes and scales before anything is written."""
    if dequantize_to is not None:
        _check_quant_types([p.source for p in plan], where)
        for p in plan:
            p.form = StoredForm(p.shape, dequantize_to)
        return
    for p in plan:
        t = p.source
        try:
            p.form = replace(describe(t.data, t.tensor_type.name, _as_matrix(p.shape), t.name), shape=p.shape)
        except (CheckpointError, UnsupportedFeatureError) as exc:
            raise type(exc)(f"{where}: {exc}") from None


def _as_matrix(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A stack of experts ``[E, N, K]`` as the ``[E * N, K]`` rows its blocks are stored in."""
    return (math.prod(shape[:-1]), shape[-1]) if len(shape) == 3 else shape


def _quantization_section(plan: list[_PlannedTensor]) -> dict[str, Any] | None:
    """mlx-lm's ``quantization`` entry: the commonest (bits, group size), then every matrix that differs."""
    matrices = [p for p in plan if len(p.shape) >= 2]  # expert stacks too
    formats = Counter((p.form.bits, p.form.group_size) for p in matrices if p.form.packed)
    if not formats:
        return None
    default = formats.most_common(1)[0][0]
    overrides: dict[str, tuple[int, int] | None] = {}
    for p in matrices:
        fmt = (p.form.bits, p.form.group_size) if p.form.packed else None
        if fmt != default:
            overrides[p.module] = fmt  # None: kept dense (``false``)
    return QuantConfig(*default, overrides).to_json()


def _torch_dtype(plan: list[_PlannedTensor]) -> str:
    """The one float dtype every matrix's scales (or dense values) are stored in, else float32.

    float16 for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 imports (their parameters are float16
    values), float32 once any K-quant or overflowing scale needs it: a backend
    following ``torch_dtype`` then computes at the precision the file was made in.
    """
    dtypes = {p.form.dtype for p in plan if len(p.shape) >= 2}
    return dtypes.pop() if len(dtypes) == 1 else "float32"


def _numpy_dtype(name: str) -> Any:
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def _stored_arrays(p: _PlannedTensor, dequantize_to: str | None, where: str) -> list[np.ndarray]:
    """The arrays ``p.form.parts()`` describes, q/k rows un-permuted."""
    t = p.source
    if dequantize_to is None:
        value = repack(t.data, t.tensor_type.name, _as_matrix(p.shape), t.name)  # checked by _choose_forms
    else:
        value = _dequantize(t, where)
    if isinstance(value, QuantizedWeight):
        arrays = [a.reshape(*p.shape[:-1], -1) for a in (value.packed, value.scales, value.biases)]
    else:
        value = value.reshape(p.shape)
        if p.offset:  # in float32: exact for the norm weights near 1 the converter wrote
            value = value.astype(np.float32) - np.float32(p.offset)
        if not np.isfinite(value.astype(np.float32, copy=False)).all():
            raise CheckpointError(f"{where}: tensor {t.name} holds NaN or infinite values")
        arrays = [value.astype(_numpy_dtype(p.form.dtype), copy=False)]
    if p.unpermute_heads is not None:
        arrays = [unpermute_qk(a, p.unpermute_heads) for a in arrays]  # whole rows move: exact when packed
    return arrays


def _write_safetensors(
    path: Path, plan: list[_PlannedTensor], dequantize_to: str | None, where: str, progress: ProgressFn | None
) -> None:
    """Stream tensors into a safetensors file one at a time (never all in memory at once)."""
    tensors = [(f"{p.module}.{suffix}" if p.form.packed else p.hf_name, _SAFETENSORS_DTYPES[dtype], shape)
               for p in plan for suffix, dtype, shape in p.form.parts()]  # a dense tensor keeps its name (a bias)
    with open(path, "wb") as f:
        write_safetensors_header(f, tensors, {"format": "pt"})
        for done, p in enumerate(plan, start=1):
            for array in _stored_arrays(p, dequantize_to, where):
                f.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
            if progress is not None:
                progress(done, len(plan), p.hf_name)


# ---------------------------------------------------------------- config


def _llama3_rope_scaling(factors: np.ndarray, head_dim: int, theta: float) -> dict[str, Any] | None:
    """Recover Llama 3.x rope scaling from llama.cpp's per-pair ``rope_freqs`` divisors.

    llama.cpp stores ``1``, ``factor`` or a blend per frequency; Hugging Face
    stores the four numbers that generate them. Try the values every Llama 3.x
    release uses (low 1, high 4, original context 8192) with the largest divisor
    as ``factor``; ``None`` if they do not reproduce the file.
    """
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    if factors.size != head_dim // 2 or not np.all(factors > 0):
        return None
    if np.allclose(factors, 1.0):
        return {}
    factor = _float32_value(factors.max())
    low, high, old_ctx = 1.0, 4.0, 8192
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    want = np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, blended))
    if not np.allclose(factors, want, rtol=1e-4, atol=1e-6):
        return None
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": old_ctx,
    }


def _longrope_scaling(meta: _Metadata, p: str, factors: dict[str, Any], rope_dims: int, where: str) -> dict[str, Any]:
    """Phi-3.5 / Phi-4-mini's longrope, which llama.cpp keeps as two factor tensors and two numbers."""
    if any(t is None for t in factors.values()):
        raise CheckpointError(f"{where}: the file holds one of rope_factors_short / rope_factors_long, not both")
    scaling: dict[str, Any] = {"rope_type": "longrope"}
    for key, tensor in factors.items():
        values = _dequantize(tensor, where).reshape(-1)
        if len(values) != rope_dims // 2:
            raise CheckpointError(f"{where}: {key} holds {len(values)} factors for {rope_dims // 2} rotary pairs")
        scaling[key] = [_float32_value(v) for v in values]
    original = meta.get(p + "rope.scaling.original_context_length")
    if not original:
        raise CheckpointError(f"{where}: longrope factors without {p}rope.scaling.original_context_length")
    scaling["original_max_position_embeddings"] = int(original)
    attention = meta.get(p + "rope.scaling.attn_factor")
    if attention is not None:
        scaling["attention_factor"] = _float32_value(attention)
    return scaling


def _build_config(meta: _Metadata, reader: Any, tokens: list[str] | None) -> dict[str, Any]:
    where = meta.where
    arch = meta.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise UnsupportedFeatureError(
            f"{where}: GGUF architecture {arch!r} is not supported; Ferrum converts "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} GGUF files (for other models use a Hugging Face "
            "safetensors checkpoint folder)"
        )
    p = f"{arch}."
    hidden = int(meta.need(p + "embedding_length"))
    heads = int(meta.need(p + "attention.head_count"))
    kv_heads = meta.get(p + "attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        if len(set(kv_heads)) != 1:
            raise UnsupportedFeatureError(f"{where}: per-layer KV head counts {sorted(set(kv_heads))} are not supported")
        kv_heads = kv_heads[0]
    kv_heads = int(kv_heads)
    if p + "attention.key_length" in meta:
        head_dim = int(meta.get(p + "attention.key_length"))
    elif heads <= 0 or hidden % heads:
        raise ConfigError(f"{where}: hidden size {hidden} is not divisible by {heads} heads")
    else:
        head_dim = hidden // heads
    value_dim = int(meta.get(p + "attention.value_length", head_dim))
    if value_dim != head_dim:
        raise UnsupportedFeatureError(f"{where}: key length {head_dim} != value length {value_dim} is not supported")
    rope_dims = int(meta.get(p + "rope.dimension_count", head_dim))
    if rope_dims != head_dim and arch != "phi3":
        raise UnsupportedFeatureError(
            f"{where}: partial rotary embeddings ({rope_dims} of {head_dim} dims) are not supported for {arch}"
        )
    family = _ARCHITECTURES[arch]
    if meta.get(p + "expert_count", 0) and family.moe is None:
        if arch != "llama":
            raise UnsupportedFeatureError(f"{where}: mixture-of-experts {arch} GGUF files are not supported "
                                          f"(Ferrum imports llama (Mixtral), qwen2moe and qwen3moe ones)")
        family = _MIXTRAL

    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise CheckpointError(f"{where}: GGUF file has no token_embd.weight")
    vocab = _numpy_shape(embed)[0]
    declared = meta.get(p + "vocab_size") or (len(tokens) if tokens else None)
    if declared is not None and int(declared) != vocab:
        raise CheckpointError(f"{where}: vocab size {declared} in the metadata but token_embd has {vocab} rows")

    theta = _float32_value(meta.get(p + "rope.freq_base", 10000.0))
    rope_scaling: dict[str, Any] | None = None
    kind = meta.get(p + "rope.scaling.type")
    if kind not in (None, "none"):
        factor = meta.get(p + "rope.scaling.factor")
        if kind != "linear" or not factor:
            raise UnsupportedFeatureError(
                f"{where}: rope scaling {kind!r} is not supported; Ferrum handles 'linear' and Llama 3's"
            )
        rope_scaling = {"rope_type": "linear", "factor": _float32_value(factor)}
    factors = {key: next((t for t in reader.tensors if t.name == name), None)
               for name, key in _ROPE_FACTOR_TENSORS.items()}
    if any(t is not None for t in factors.values()):
        rope_scaling = _longrope_scaling(meta, p, factors, rope_dims, where)
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        fitted = _llama3_rope_scaling(_dequantize(freqs, where), head_dim, theta)
        if fitted is None:
            raise UnsupportedFeatureError(
                f"{where}: the file's rope_freqs tensor does not match Llama 3 rope scaling; not supported"
            )
        if fitted:
            if rope_scaling is not None:
                raise UnsupportedFeatureError(f"{where}: both linear and Llama 3 rope scaling; not supported")
            rope_scaling = fitted

    names = {t.name for t in reader.tensors}
    config: dict[str, Any] = {
        "architectures": [family.hf_class],
        "model_type": family.model_type,
        "hidden_size": hidden,
        "intermediate_size": int(meta.get(p + "feed_forward_length") or meta.need(p + "expert_feed_forward_length")),
        "num_hidden_layers": int(meta.need(p + "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": int(meta.need(p + "context_length")),
        "rms_norm_eps": _float32_value(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": rope_scaling,
        "hidden_act": "silu",
        **dict(family.config),
        "tie_word_embeddings": "output.weight" not in names,
    }
    if family.moe is not None:
        experts = family.moe
        config[experts.count_key] = int(meta.need(p + "expert_count"))
        config["num_experts_per_tok"] = int(meta.need(p + "expert_used_count"))
        if experts.size_key is not None:
            config[experts.size_key] = int(meta.need(p + "expert_feed_forward_length"))
        if experts.renormalise_key is not None:  # as llama.cpp does unless the file says
            config[experts.renormalise_key] = bool(meta.get(p + "expert_weights_norm", experts.renormalise))
        if experts.shared:
            config["shared_expert_intermediate_size"] = int(meta.need(p + "expert_shared_feed_forward_length"))
    if rope_dims != head_dim:
        config["partial_rotary_factor"] = rope_dims / head_dim
    if family.configure is not None:
        config.update(family.configure(meta, p, config))
    if family.fused:  # Phi-3: the window, where the file sets one
        config["sliding_window"] = meta.get(p + "attention.sliding_window") or None
    for key in ("bos", "eos", "padding"):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            config["pad_token_id" if key == "padding" else f"{key}_token_id"] = int(token_id)
    return config


# ---------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE vocabularies)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level_model(meta: _Metadata, tokens: list[str], types: list[int]) -> tuple[Any, list[Any]]:
    """Byte-level BPE ('gpt2'): the file's merges, its pre-tokenizer regex, tokens in GPT-2's byte alphabet."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    where = meta.where
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    if pre in _PRE_GPT2:
        pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre in _PRE_DIGITS_GPT2:
        pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    elif pre in _PRE_LLAMA3 or pre in _PRE_QWEN2:
        pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT if pre in _PRE_LLAMA3 else _QWEN2_SPLIT),
                                     behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        known = sorted(_PRE_GPT2 | _PRE_DIGITS_GPT2 | _PRE_LLAMA3 | _PRE_QWEN2)
        raise UnsupportedFeatureError(
            f"{where}: GGUF pre-tokenizer {pre!r} is not supported; Ferrum knows {', '.join(known)}"
        )
    merges_raw = meta.get("tokenizer.ggml.merges")
    if not merges_raw:
        raise UnsupportedFeatureError(f"{where}: the GGUF byte-level BPE tokenizer lists no merges")
    merges: list[tuple[str, str]] = []
    for m in merges_raw:
        parts = m.split(" ")
        if len(parts) != 2:
            raise CheckpointError(f"{where}: malformed BPE merge {m!r} in tokenizer.ggml.merges")
        merges.append((parts[0], parts[1]))

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    added: list[AddedToken] = []
    for index, (token, token_type) in enumerate(zip(tokens, types)):
        if token_type in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED):
            # Matched whole in the raw text, written as is.
            added.append(AddedToken(token, special=token_type == _TOKEN_CONTROL, normalized=False))
        elif not set(token) <= alphabet:
            # A plain token spelled in raw text: write it in the byte alphabet like the rest.
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, index)
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    return tok, added


def _sentencepiece_model(meta: _Metadata, tokens: list[str], types: list[int]) -> tuple[Any, list[Any]]:
    """SentencePiece BPE ('llama': Llama 2, Mistral, TinyLlama...) as llama.cpp runs it: pieces spelled with
    ``\u2581`` for a space, unknown characters as ``<0xNN>`` byte pieces, a space put before the text
    (``add_space_prefix``).

    The file keeps scores, not merges: a piece is merged from any two pieces that spell it, the highest-scored
    piece first, which is the order llama.cpp merges in."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    where = meta.where
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise CheckpointError(f"{where}: a sentencepiece GGUF tokenizer needs one score per token "
                              f"(tokenizer.ggml.scores), got {None if scores is None else len(scores)}")
    vocab: dict[str, int] = {}
    added: list[AddedToken] = []
    for index, (token, token_type) in enumerate(zip(tokens, types)):
        if token_type in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED):
            added.append(AddedToken(token, special=token_type == _TOKEN_CONTROL, normalized=False))
        vocab.setdefault(token, index)
    candidates = []
    for piece, score in zip(tokens, scores):
        cuts = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        cuts.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        candidates += [(-float(score), -len(left), -len(right), left, right) for left, right in cuts]
    candidates.sort(key=lambda c: c[:3])  # stable: ties keep the file's order
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(c[3], c[4]) for c in candidates], dropout=None,
                               fuse_unk=True, byte_fallback=True))
    # llama.cpp puts the space before every run of text that starts the prompt or follows an added token, even
    # one that starts with a space; the normalizer runs on exactly those runs
    spaces = normalizers.Replace(" ", "\u2581")
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), spaces]) if prefix else spaces
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok, added


_TOKENIZER_MODELS = {"gpt2": _byte_level_model, "llama": _sentencepiece_model}


def _build_tokenizer(meta: _Metadata, tokens: list[str]) -> tuple[Any, dict[str, Any]]:
    """A ``tokenizers.Tokenizer`` equal to the one the GGUF describes, and its tokenizer_config entries."""
    from tokenizers import processors

    where = meta.where
    kind = meta.get("tokenizer.ggml.model")
    if kind not in _TOKENIZER_MODELS:
        raise UnsupportedFeatureError(
            f"{where}: GGUF tokenizer model {kind!r} is not supported; Ferrum's GGUF import rebuilds "
            "byte-level BPE ('gpt2') and sentencepiece BPE ('llama') tokenizers"
        )
    types = meta.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise CheckpointError(f"{where}: {len(tokens)} tokens but {len(types)} token types")
    tok, added = _TOKENIZER_MODELS[kind](meta, tokens, types)
    special = [t for t in added if t.special]
    plain = [t for t in added if not t.special]
    if special:
        tok.add_special_tokens(special)
    if plain:
        tok.add_tokens(plain)

    def token_of(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

    bos, eos = token_of("bos"), token_of("eos")
    # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if (add_bos and bos is None) or (add_eos and eos is None):
        raise CheckpointError(f"{where}: the tokenizer adds BOS/EOS but names no such token")
    if add_bos or add_eos:
        first = [f"{bos}:0"] if add_bos else []
        last = [f"{eos}:0"] if add_eos else []
        second_first = [f"{bos}:1"] if add_bos else []
        second_last = [f"{eos}:1"] if add_eos else []
        ids = {t: tok.token_to_id(t) for t in (bos if add_bos else None, eos if add_eos else None) if t}
        tok.post_processor = processors.TemplateProcessing(
            single=first + ["$A:0"] + last,
            pair=first + ["$A:0"] + last + second_first + ["$B:1"] + second_last,
            special_tokens=list(ids.items()),
        )
    elif kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
    }
    for key, name in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"), ("padding", "pad_token")):
        text = token_of(key)
        if text is not None:
            tokenizer_config[name] = text
    template = meta.get("tokenizer.chat_template")
    if template:
        tokenizer_config["chat_template"] = template
    return tok, tokenizer_config


# ---------------------------------------------------------------- entry point


def convert_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    progress: ProgressFn | None = None,
    *,
    dequantize_to: str | None = None,
) -> Path:
    """Write ``gguf_path`` (an architecture of :data:`SUPPORTED_ARCHITECTURES`) into ``out_dir`` as a Hugging Face
    checkpoint.

    By default quantized matrices stay packed, exactly (see the module
    docstring); GGUF types without an exact packed form are refused by name.
    ``dequantize_to`` ("float32", "float16" or "bfloat16") instead stores every
    tensor dequantised to that dtype: float32 keeps the values exactly at 4-8x
    the size, and accepts every type the ``gguf`` package can dequantize.
    ``progress(done, total, name)`` is called after each tensor. Everything is
    checked (architecture, shapes, quant types, tokenizer) before the first file
    is written. Returns ``out_dir``.
    """
    gguf = _import_gguf()
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    where = str(gguf_path)
    if dequantize_to is not None and dequantize_to not in DEQUANTIZE_DTYPES:
        raise ConfigError(f"dequantize_to must be one of {', '.join(DEQUANTIZE_DTYPES)} or None, got {dequantize_to!r}")
    if not gguf_path.is_file():
        raise CheckpointError(f"no GGUF file at {gguf_path}")
    _check_header(gguf_path, where)
    try:
        reader = gguf.GGUFReader(str(gguf_path), "r")
    except (ValueError, OSError, struct.error, IndexError, KeyError, OverflowError, MemoryError) as exc:
        raise CheckpointError(f"{where} is not a readable GGUF file: {str(exc)[:200]}") from exc
    _check_tensor_layout(reader, gguf_path.stat().st_size, where)
    meta = _Metadata(reader, where)
    tokens = meta.get("tokenizer.ggml.tokens")
    config = _build_config(meta, reader, tokens)
    if not tokens:
        raise CheckpointError(f"{where}: GGUF metadata has no tokenizer.ggml.tokens; cannot build a tokenizer")
    tokenizer, tokenizer_config = _build_tokenizer(meta, tokens)
    tokenizer_config["model_max_length"] = config["max_position_embeddings"]
    plan = _plan_tensors(reader, config, where)
    _choose_forms(plan, dequantize_to, where)
    _check_finite(plan, where)
    config["torch_dtype"] = _torch_dtype(plan)
    quantization = _quantization_section(plan)
    if quantization is not None:
        config["quantization"] = quantization
        config["quantization_config"] = dict(quantization)

    generation: dict[str, Any] = {}
    if "bos_token_id" in config:
        generation["bos_token_id"] = config["bos_token_id"]
    stops = [
        int(meta.get(f"tokenizer.ggml.{k}_token_id"))
        for k in ("eos", "eot", "eom")
        if meta.get(f"tokenizer.ggml.{k}_token_id") is not None
    ]
    stops += [i for i, token in enumerate(tokens) if token in _END_OF_GENERATION]
    stops = list(dict.fromkeys(stops))
    if stops:
        generation["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    if "pad_token_id" in config:
        generation["pad_token_id"] = config["pad_token_id"]
    config["ferrum_gguf_source"] = {
        "file": gguf_path.name,
        "name": meta.get("general.name"),
        "tensor_types": sorted({t.tensor_type.name for t in reader.tensors}),
    }

    _write_folder(out_dir, {
        "model.safetensors": lambda path: _write_safetensors(path, plan, dequantize_to, where, progress),
        "tokenizer.json": lambda path: tokenizer.save(str(path)),
        "tokenizer_config.json": lambda path: path.write_text(
            json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n"),
        "generation_config.json": lambda path: path.write_text(json.dumps(generation, indent=2) + "\n"),
        "config.json": lambda path: path.write_text(json.dumps(config, indent=2) + "\n"),
    })
    return out_dir


def _write_folder(out_dir: Path, files: dict[str, Callable[[Path], None]]) -> None:
    """Write ``files`` into ``out_dir``; on any failure (a full disk, an interrupt) remove what was written,
    and ``out_dir`` itself if it did not exist, so no half-written checkpoint is ever left."""
    created = not out_dir.exists()
    written: list[Path] = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, write in files.items():
            written.append(out_dir / name)
            write(out_dir / name)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
