"""Model configuration read from a Hugging Face ``config.json``."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ferrum.errors import ConfigError, UnsupportedFeatureError
from ferrum.quant.config import QuantConfig

#: model_type values whose weights follow the Llama layout.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelConfig:
    """The numbers a Llama-family decoder needs, validated."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_seq_len: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias
    o_proj_bias: bool
    mlp_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm on each head of q and k before rope
    layer_sliding_windows: tuple[int | None, ...]  # per layer; None = full attention
    torch_dtype: str | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    quantization: QuantConfig | None = None  # packed affine weights (mlx-community layout)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"no config.json at {path}; point Ferrum at a Hugging Face checkpoint folder")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_dict(raw, where=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config") -> "ModelConfig":
        quantization = QuantConfig.from_config(raw, where)
        if "text_config" in raw and "hidden_size" not in raw:
            raw = raw["text_config"]
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedFeatureError(
                f"{where}: model_type {model_type!r} is not supported; "
                f"Ferrum runs {', '.join(SUPPORTED_MODEL_TYPES)}"
            )

        def need(key: str, kind: type = int) -> Any:
            if key not in raw or raw[key] is None:
                raise ConfigError(f"{where}: missing required key {key!r}")
            value = raw[key]
            if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"{where}: {key!r} must be a positive integer, got {value!r}")
            if kind is float and (not isinstance(value, (int, float)) or value <= 0):
                raise ConfigError(f"{where}: {key!r} must be a positive number, got {value!r}")
            return value

        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        kv_heads = raw.get("num_key_value_heads") or heads
        if not isinstance(kv_heads, int) or kv_heads <= 0 or heads % kv_heads:
            raise ConfigError(
                f"{where}: num_attention_heads ({heads}) must be a multiple of "
                f"num_key_value_heads ({kv_heads})"
            )
        head_dim = raw.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise ConfigError(f"{where}: hidden_size {hidden} is not divisible by {heads} heads; set head_dim")
            head_dim = hidden // heads
        if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
            raise ConfigError(f"{where}: head_dim must be a positive even integer, got {head_dim!r}")

        num_layers = need("num_hidden_layers")
        rope_theta, rope_scaling = _rope_settings(raw, where)
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        default_bias = model_type == "qwen2"
        attention_bias = bool(raw.get("attention_bias", default_bias))
        return cls(
            model_type=model_type,
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=need("vocab_size"),
            max_seq_len=need("max_position_embeddings"),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            # Llama's attention_bias also covers o_proj; Qwen2 biases q/k/v only.
            o_proj_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            layer_sliding_windows=_sliding_windows(raw, model_type, num_layers),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            quantization=quantization,
        )

    def rope_inv_freq(self) -> np.ndarray:
        """Per-pair inverse frequencies, with the checkpoint's rope scaling applied."""
        dim = self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
        scaling = self.rope_scaling
        if scaling is None:
            return inv_freq.astype(np.float32)
        kind = scaling["rope_type"]
        factor = float(scaling["factor"])
        if kind == "linear":
            return (inv_freq / factor).astype(np.float32)
        # llama3: leave high frequencies, divide low ones by factor, blend between.
        old_ctx = float(scaling["original_max_position_embeddings"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return np.where(medium, blended, scaled).astype(np.float32)


def _rope_settings(raw: dict[str, Any], where: str) -> tuple[float, dict | None]:
    """rope_theta and scaling from either the v4 keys or v5's ``rope_parameters``."""
    params = raw.get("rope_parameters") or {}
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    scaling = raw.get("rope_scaling") or None
    if params and params.get("rope_type", "default") != "default":
        scaling = params
    if scaling is None:
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return float(theta), None
    if kind not in ("linear", "llama3"):
        raise UnsupportedFeatureError(
            f"{where}: rope scaling {kind!r} is not supported; Ferrum handles 'linear' and 'llama3'"
        )
    if "factor" not in scaling or (kind == "llama3" and "original_max_position_embeddings" not in scaling):
        raise ConfigError(f"{where}: rope scaling {kind!r} lacks its factor / original_max_position_embeddings")
    return float(theta), {**scaling, "rope_type": kind}


def _sliding_windows(raw: dict[str, Any], model_type: str, num_layers: int) -> tuple[int | None, ...]:
    window = raw.get("sliding_window")
    layer_types = raw.get("layer_types")
    if layer_types and len(layer_types) == num_layers:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if model_type in ("qwen2", "qwen3"):
        if not raw.get("use_sliding_window", False) or not window:
            return (None,) * num_layers
        first = raw.get("max_window_layers", num_layers)
        return tuple(window if i >= first else None for i in range(num_layers))
    return (window or None,) * num_layers
