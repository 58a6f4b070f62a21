"""GGUF metadata of the wrong type, or out of range, in the keys the gemma3n and mimo2 imports read: written to a
real file, read back through the import's typed metadata, and refused by name (CheckpointError naming the key and
the file), never a raw TypeError or ValueError; a gemma3n period (the u32 llama.cpp's converter writes for some
architectures) read as llama.cpp reads one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

gguf = pytest.importorskip("gguf")

from ferrum.errors import CheckpointError, UnsupportedFeatureError  # noqa: E402
from ferrum.gguf_import import architectures, gemma3n, kimi_linear, mimo2  # noqa: E402
from ferrum.gguf_import.files import Metadata  # noqa: E402

_GEMMA3N = {"feed_forward_length": 96, "attention.sliding_window": 6, "embedding_length_per_layer_input": 32,
            "attention.shared_kv_layers": 2}
_MIMO2 = {"attention.sliding_window": 8, "attention.sliding_window_pattern": [True, True, False, True],
          "attention.head_count_kv": [8, 8, 4, 8], "attention.value_length": 12}
_KIMI_LINEAR = {"attention.head_count_kv": [0, 1, 0, 0], "expert_shared_count": 1, "kda.head_dim": 8,
                "ssm.conv_kernel": 4}
_EXAONE_MOE = {"expert_gating_func": 2, "expert_feed_forward_length": 32, "attention.sliding_window": 8}
_DEEPSEEK2 = {"rope.dimension_count": 8, "attention.key_length": 24, "attention.value_length": 16,
              "attention.kv_lora_rank": 16, "expert_shared_count": 2}
#: The readers under test: the architecture, its config function, the block-derived config it is called with.
_READERS = {"gemma3n": (gemma3n.gemma3n_config, {"num_hidden_layers": 22}, _GEMMA3N),
            "mimo2": (mimo2.mimo2_config, {"num_hidden_layers": 4, "rope_theta": 1e4}, _MIMO2),
            "kimi-linear": (kimi_linear.kimi_linear_config, {"num_hidden_layers": 4, "num_attention_heads": 4},
                            _KIMI_LINEAR),
            "exaone-moe": (architectures._exaone_moe_config, {"num_hidden_layers": 4}, _EXAONE_MOE),
            "deepseek2": (architectures._latent_config, {"num_hidden_layers": 4, "num_attention_heads": 4},
                          _DEEPSEEK2)}


def _metadata(path: Path, arch: str, fields: dict[str, Any]) -> Metadata:
    """``fields`` (under the architecture's prefix) as a converter writes them: integers u32, floats f32."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in fields.items():
        if isinstance(value, list):
            w.add_array(f"{arch}.{key}", value)
        elif isinstance(value, str):
            w.add_string(f"{arch}.{key}", value)
        elif isinstance(value, float):
            w.add_float32(f"{arch}.{key}", value)
        else:
            w.add_uint32(f"{arch}.{key}", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Metadata(gguf.GGUFReader(str(path)), "x.gguf")


def _config(tmp_path: Path, arch: str, **fields: Any) -> dict[str, Any]:
    read, cfg, base = _READERS[arch]
    return read(_metadata(tmp_path / "m.gguf", arch, {**base, **fields}), f"{arch}.", dict(cfg))


@pytest.mark.parametrize(("arch", "key", "value", "message"), [
    ("gemma3n", "attention.sliding_window_pattern", "five", "must be a non-negative integer, or a list of one flag"),
    ("gemma3n", "attention.sliding_window_pattern", [2, 3], "must be a non-negative integer, or a list of one flag"),
    ("gemma3n", "activation_sparsity_scale", ["x"] * 22, "must be a list of numbers"),
    ("gemma3n", "altup.num_inputs", "four", "must be a non-negative integer"),
    ("gemma3n", "altup.active_idx", 0.5, "must be a non-negative integer"),
    ("gemma3n", "attention.shared_kv_layers", [2], "must be a non-negative integer"),
    ("gemma3n", "rope.freq_base_swa", "x", "must be a finite number"),
    ("mimo2", "nextn_predict_layers", "x", "must be a non-negative integer"),
    ("mimo2", "nextn_predict_layers", 4, "nextn_predict_layers 4 leaves none of its 4 blocks a decoder layer"),
    ("mimo2", "nextn_predict_layers", 6, "nextn_predict_layers 6 leaves none of its 4 blocks a decoder layer"),
    ("mimo2", "rope.freq_base_swa", [1.0], "must be a finite number"),
    ("mimo2", "attention.value_scale", "x", "must be a finite number"),
    ("mimo2", "expert_weights_scale", "x", "must be a finite number"),
    # read with int(): a string was a ValueError, "8" or 8.7 silently an integer
    ("kimi-linear", "ssm.conv_kernel", "x", "must be a non-negative integer"),
    ("kimi-linear", "kda.head_dim", 8.7, "must be a non-negative integer"),
    ("kimi-linear", "expert_shared_count", "1", "must be a non-negative integer"),
    ("exaone-moe", "expert_feed_forward_length", 0, "expert_feed_forward_length is 0"),  # a ZeroDivisionError
    ("deepseek2", "expert_shared_count", 2.7, "must be a non-negative integer"),  # int() made it 2
    ("deepseek2", "expert_shared_count", "2", "must be a non-negative integer"),
])
def test_metadata_of_the_wrong_type_is_refused_by_name(tmp_path, arch, key, value, message):
    with pytest.raises(CheckpointError) as refused:
        _config(tmp_path, arch, **{key: value})
    said = str(refused.value)
    assert said.startswith("x.gguf: ") and f"{arch}.{key}" in said and message in said


def test_a_gemma3n_period_is_read_as_llama_cpp_reads_one(tmp_path):
    """A scalar sliding_window_pattern is llama.cpp's period (set_swa_pattern: the last of every n layers full): 5 is
    Gemma 3n's own layout; 4 or 0 (every layer sliding) is not, and is refused by name."""
    types = _config(tmp_path, "gemma3n", **{"attention.sliding_window_pattern": 5})["layer_types"]
    assert types == ["full_attention" if i % 5 == 4 else "sliding_attention" for i in range(22)]
    for period in (4, 0):
        with pytest.raises(UnsupportedFeatureError, match=f"sliding_window_pattern {period} is not supported"):
            _config(tmp_path, "gemma3n", **{"attention.sliding_window_pattern": period})
