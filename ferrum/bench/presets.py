"""Benchmark checkpoints: public models' shapes with random bfloat16 weights, written
once into the cache (see :mod:`ferrum.random_checkpoint`) so benchmarks run without downloads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ferrum.sources import cache_lock, cache_root
from ferrum.errors import InvalidRequestError
from ferrum.random_checkpoint import has_own_expert_layout, write_random_checkpoint

#: Shapes of public models; the weights are random.
PRESETS: dict[str, dict] = {
    "smollm2-135m": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
        max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
    ),
    "qwen2-0.5b": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=896, intermediate_size=4864,
        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
        max_position_embeddings=4096, rope_theta=1000000.0, tie_word_embeddings=True,
    ),
    "llama-1b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=True,
    ),
    # Qwen3-30B-A3B's design (128 experts, 8 active, 768-wide experts, q/k norms) scaled down to run on a laptop.
    "qwen3-moe-small": dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=512, intermediate_size=1536,
        moe_intermediate_size=256, num_experts=32, num_experts_per_tok=8, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[],  # mlx-lm requires both
        num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=64, vocab_size=32000,
        max_position_embeddings=4096, rope_theta=1000000.0, tie_word_embeddings=False,
    ),
    # Gemma 3 1B's blocks (head_dim 256, MQA, q/k norms, sandwich norms, GeGLU, 512-token windows on 5 of
    # every 6 layers with their own rope base) at 6 of its 26 layers and a 32k vocabulary, to run here.
    "gemma3-1b-shaped": dict(
        architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", hidden_size=1152, intermediate_size=6912,
        num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=32768,
        max_position_embeddings=32768, rope_theta=1000000.0, rope_local_base_freq=10000.0, sliding_window=512,
        sliding_window_pattern=6, query_pre_attn_scalar=256, hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
    ),
    # gpt-oss-20b's design (32 experts, 4 active, biased; attention sinks; 128-token windows on every other
    # layer; YaRN) at a fifth of its width and a third of its layers, to run on a laptop.
    "gpt-oss-small": dict(
        architectures=["GptOssForCausalLM"], model_type="gpt_oss", hidden_size=576, intermediate_size=576,
        num_local_experts=32, num_experts_per_tok=4, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=2, head_dim=64, vocab_size=32000, sliding_window=128, max_position_embeddings=131072,
        rope_theta=150000.0, rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                           "truncate": False, "original_max_position_embeddings": 4096},
        tie_word_embeddings=False,
    ),
    # Phi-2's blocks (LayerNorms with biases, attention and a GELU MLP side by side, rope on 32 of each head's 80
    # dims, a biased LM head) at half its width and 6 of its 32 layers, to run on a laptop.
    "phi2-shaped": dict(
        architectures=["PhiForCausalLM"], model_type="phi", hidden_size=1280, intermediate_size=5120,
        num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=16,  # mlx-lm's default is 32
        vocab_size=51200, max_position_embeddings=2048, partial_rotary_factor=0.4, layer_norm_eps=1e-5,
        hidden_act="gelu_new", rope_theta=10000.0, tie_word_embeddings=False,
    ),
    "tiny": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
        max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=True,
    ),
}


def preset_checkpoint(name: str, progress: Callable[[int, int, str], None] | None = None,
                      expert_layout: str = "mlx-lm") -> Path:
    """The cached checkpoint folder of preset ``name``, written on first use; a family with expert
    layouts of its own (gpt-oss) is written in ``expert_layout``, the one its peer reads."""
    if name not in PRESETS:
        raise InvalidRequestError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    config = PRESETS[name]
    own_layout = expert_layout != "mlx-lm" and has_own_expert_layout(config)
    folder = cache_root() / "bench" / (f"{name}-{expert_layout}" if own_layout else name)
    if not _written(folder, config):
        with cache_lock(folder):  # concurrent first runs write it once (they raced on its staging folder)
            if not _written(folder, config):
                write_random_checkpoint(folder, config, progress=progress, expert_layout=expert_layout)
    return folder


def _written(folder: Path, config: dict) -> bool:
    """Whether ``folder`` holds the preset as ``config`` now defines it (a changed definition is written anew)."""
    try:
        stored = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (folder / "model.safetensors").exists() and all(stored.get(key) == value for key, value in config.items())
