"""Model configuration read from a Hugging Face ``config.json``, through the family table of :mod:`ferrum.arch`."""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ferrum.arch import Architecture
from ferrum.arch.families import FAMILIES, Sizes, lift_nested, read_sizes
from ferrum.arch.keys import KeyReader
from ferrum.checkpoint import require_regular_file
from ferrum.errors import ConfigError, UnsupportedFeatureError
from ferrum.quant.config import SIDECARS, QuantConfig, sidecar_section

_log = logging.getLogger(__name__)

#: model_type values Ferrum runs (the keys of the family table).
SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILIES))
#: Multimodal wrappers whose ``text_config`` holds a supported decoder -> that decoder's model_type.
TEXT_WRAPPERS = {"gemma3": "gemma3_text", "mistral3": "mistral",  # Mistral Small 3.1+, Magistral, Devstral 2507
                 "cohere_compass": "cohere_compass_text",  # North-Micro-Vision
                 "exaone4_5": "exaone4", "qwen2_vl": "qwen2", "qwen2_5_vl": "qwen2", "qwen3_vl": "qwen3",
                 "qwen3_vl_moe": "qwen3_vl_moe", "llama4": "llama4_text",
                 "gemma4": "gemma4_text", "gemma3n": "gemma3n_text",  # Llama 4 Scout / Maverick
                 "gemma4_unified": "gemma4_unified_text",
                 "qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text", "lfm2_vl": "lfm2",
                 "minimax_m3_vl": "minimax_m3_vl_text", "aria": "aria_text", "apertus1p5": "apertus1p5_text",
                 "minimax_vl_01": "minimax_text_01",  # MiniMax-VL-01: LLaVA-NeXT's wrapper of MiniMax-Text-01
                 "dots3_note": "dots3_note_text",
                 "kimi_vl": "deepseek_v3", "kimi_k25": "deepseek_v3",  # Kimi-VL, Kimi K2.5 (text_config: kimi_k2)
                 "pixtral": "mistral",  # mlx-lm's pixtral: the text model of Pixtral's conversions
                 "lfm2-vl": "lfm2",  # LFM2-VL's releases spell lfm2_vl so (mlx-lm's lfm2-vl module)
                 "muse_glimmer": "muse_glimmer_text",  # Meta's release nests its text model, mlx-community's don't
                 "kimi_k3": "kimi_k3"}  # Kimi K3: its text_config (or flat config) is mlx-lm's kimi_k3 TextArgs
#: A wrapper's text model_type -> the family it is (EXAONE 4.5's first release named its decoder so; the Qwen VL
#: decoders are Qwen 2's and Qwen 3's).
TEXT_ALIASES = {"exaone4_5_text": "exaone4", "qwen2_vl_text": "qwen2", "qwen2_5_vl_text": "qwen2",
                "qwen3_vl_text": "qwen3", "qwen3_vl_moe_text": "qwen3_vl_moe"}
#: A wrapper's text model_type that names another family inside that wrapper: Kimi K3's text_config says
#: "kimi_linear" (mlx-lm's TextArgs default), but runs SiTU, gated latent attention... (the kimi_k3 family).
WRAPPED_TEXT_ALIASES = {"kimi_k3": {"kimi_linear": "kimi_k3"}}
#: A vision-language model's rope over (time, height, width) positions (Qwen's mrope): a text token has the same
#: position on all three, which makes it the family's own rope over the whole head.
_MROPE_FIELDS = ("mrope_section", "mrope_interleaved")


def _text_positions(raw: dict[str, Any]) -> dict[str, Any]:
    """A wrapped text model's config with mrope read as the plain rope it is for text alone."""
    for key in ("rope_scaling", "rope_parameters"):
        spec = raw.get(key)
        if isinstance(spec, dict) and any(field in spec for field in _MROPE_FIELDS):
            spec = {k: v for k, v in spec.items() if k not in _MROPE_FIELDS}
            for kind in ("type", "rope_type"):
                if spec.get(kind) == "mrope":
                    spec[kind] = "default"
            raw = {**raw, key: spec}
    return raw


def eos_token_ids(eos: Any, vocab_size: int, where: str) -> tuple[int, ...]:
    """An ``eos_token_id`` entry (config.json, generation_config.json) as end-of-sequence ids: integers, or a
    ConfigError; one outside the vocabulary (a multimodal wrapper's default over a smaller text model) is left out
    with a warning, as transformers warns of it."""
    ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ConfigError(f"{where}: eos_token_id must be a token id or a list of them, got {eos!r}")
    inside = tuple(t for t in ids if 0 <= t < vocab_size)
    if inside != ids:
        warnings.warn(f"{where}: eos_token_id {eos!r} names ids outside the vocabulary [0, {vocab_size}); "
                      f"generation ends at {list(inside)} only", stacklevel=3)
    return inside


@dataclass(frozen=True)
class ModelConfig(Sizes):
    """The sizes of a decoder (:class:`ferrum.arch.Sizes`) and its :class:`ferrum.arch.Architecture`, validated."""

    model_type: str
    arch: Architecture
    torch_dtype: str | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    quantization: QuantConfig | None = None  # quantized weights (MLX's modes, AWQ, GPTQ: see ferrum.quant)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"no config.json at {path}; point Ferrum at a Hugging Face checkpoint folder")
        raw = _json_object(path)
        if raw.get("quantization") is None and raw.get("quantization_config") is None:  # older AWQ / GPTQ releases
            section = sidecar_section({name: _json_object(path.parent / name) for name in SIDECARS
                                       if (path.parent / name).exists()})
            if section is not None:
                raw = {**raw, "quantization_config": section}
        return cls.from_dict(raw, where=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config") -> "ModelConfig":
        quantization = QuantConfig.from_config(raw, where)
        for config in (raw, raw.get("text_config")):
            if isinstance(config, dict) and not isinstance(config.get("model_type", ""), str):
                raise ConfigError(f"{where}: model_type must be a string naming the architecture (e.g. \"llama\"), "
                                  f"got {config['model_type']!r}")
        if raw.get("text_config") is not None and not isinstance(raw["text_config"], dict):
            raise ConfigError(f"{where}: config key 'text_config' must be an object (the decoder's config), got "
                              f"{raw['text_config']!r}")
        outer = raw
        if isinstance(raw.get("text_config"), dict) and "hidden_size" not in raw:
            raw = {"model_type": TEXT_WRAPPERS.get(outer.get("model_type")), **raw["text_config"]}
            text_type = raw["model_type"]
            raw["model_type"] = WRAPPED_TEXT_ALIASES.get(outer.get("model_type"), {}).get(
                text_type, TEXT_ALIASES.get(text_type, text_type))
            for key in ("torch_dtype", "dtype", "bos_token_id", "eos_token_id"):
                if key in outer and key not in raw:
                    raw[key] = outer[key]
            if "tie_word_embeddings" in outer:  # the wrapper's own says whether its LM head is tied (transformers 5)
                raw["tie_word_embeddings"] = outer["tie_word_embeddings"]
            raw = _text_positions(raw)
        elif raw.get("model_type") in TEXT_WRAPPERS:  # written flat, its decoder's keys beside vision_config
            raw = _text_positions({**raw, "model_type": TEXT_WRAPPERS[raw["model_type"]]})
        model_type = raw.get("model_type")
        family = FAMILIES.get(model_type)
        if model_type is None:
            raise ConfigError(f"{where}: no model_type names the architecture (e.g. \"llama\"); a Hugging Face "
                              "config.json has one: check the file is the model's own")
        if family is None:
            raise UnsupportedFeatureError(
                f"{where}: model_type {model_type!r} is not supported; "
                f"Ferrum runs {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        raw = lift_nested(raw, family.nested, model_type, where)
        raw = family.derive(raw) if family.derive is not None else raw
        reader = KeyReader(raw, family.keys, model_type, where)
        reader.validate_all()
        sizes = read_sizes(reader, family.eps_default, family.eps_key, family.names, family.kv_heads,
                           family.head_dim)
        if family.sizes is not None:
            sizes = family.sizes(reader, sizes)
        arch = family.build(reader, sizes)
        unloaded = "|".join(f"(?:{p})" for p in (family.unloaded, arch.unloaded) if p)  # the family's and builder's
        arch = replace(arch, unloaded=unloaded or None)
        scaled = [c for c in (spec.rope.scaled_context for spec in arch.layers) if c is not None]
        if scaled and max(scaled) > sizes.max_seq_len:  # a YaRN added to a config opens the context it scales to
            sizes = replace(sizes, max_seq_len=max(scaled))
        if arch.context_limit is not None and arch.context_limit[0] < sizes.max_seq_len:
            tokens, why = arch.context_limit
            _log.warning("%s: %s runs a context of %d tokens, not %d: %s", where, model_type, tokens,
                         sizes.max_seq_len, why)
            sizes = replace(sizes, max_seq_len=tokens)
        eos_ids = eos_token_ids(raw.get("eos_token_id"), sizes.vocab_size, where)
        return cls(
            **asdict(sizes),
            model_type=model_type,
            arch=arch,
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            quantization=quantization,
        )

    @property
    def rope_theta(self) -> float:
        """The first layer's rope base."""
        return self.arch.layers[0].rope.theta

    @property
    def rope_scaling(self) -> dict | None:
        """The first layer's rope scaling (``rope_type`` and ``factor``), or None for plain rope."""
        rope = self.arch.layers[0].rope
        return None if rope.kind == "default" else {"rope_type": rope.kind, "factor": rope.factor}

    def rope_inv_freq(self) -> np.ndarray:
        """The first layer's per-pair inverse frequencies, with the checkpoint's rope scaling applied."""
        return self.arch.layers[0].rope.inv_freq()


def _json_object(path: Path) -> dict[str, Any]:
    """The JSON object a checkpoint file holds, or a :class:`ConfigError` naming the file and the problem."""
    require_regular_file(path, ConfigError)
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # not UTF-8, not JSON, absurdly nested
        raise ConfigError(f"{path} is not valid UTF-8 JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return raw
