"""Random-weight Hugging Face checkpoints of any Llama-family shape.

Benchmarks use them at realistic sizes and the plugin conformance kit at
tiny ones, so neither needs a download. The folder is an ordinary
checkpoint (``config.json`` in the v4 style that transformers, mlx-lm and
Ferrum all read, plus ``model.safetensors``), written atomically.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

_STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor the config implies (qkv bias for qwen2, q/k norms for qwen3)."""
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    d = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, h)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        })
        if config["model_type"] == "qwen2":
            shapes.update({p + f"self_attn.{n}_proj.bias": (s,) for n, s in (("q", q), ("k", kv), ("v", kv))})
        if config["model_type"] == "qwen3":
            shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
    return shapes


def write_random_checkpoint(
    folder: Path,
    config: dict,
    dtype: str = "bfloat16",
    std: float = 0.02,
    seed: int = 0,
    progress: Callable[[int, int, str], None] | None = None,
) -> Path:
    """Write ``config`` with normal(0, ``std``) weights (norm weights near 1) into ``folder``."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    full = {"rms_norm_eps": 1e-6, "bos_token_id": 0, "eos_token_id": 1, **config, "torch_dtype": dtype}
    (staging / "config.json").write_text(json.dumps(full, indent=2))
    shapes = tensor_shapes(config)
    tensors = {}
    for done, (name, shape) in enumerate(shapes.items(), start=1):
        array = rng.standard_normal(shape, dtype=np.float32) * std
        if name.endswith("norm.weight"):
            array += 1.0
        tensors[name] = array.astype(_STORAGE[dtype])
        if progress is not None:
            progress(done, len(shapes), name)
    save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder
