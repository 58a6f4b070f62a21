"""GGUF import of Step 3.5 (``step35``): mlx-lm's step3p5 given random weights (tests/test_step3p5.py; the family has
no transformers class), written as llama.cpp's Step35Model converts the release (per-layer query / key-value heads and
sliding flags, both rope bases, the SwiGLU clamps per layer, every norm plus 1, the llama3 rope as rope_freqs over the
full layers' rotary dims, the MTP layer appended), imported, and run against mlx-lm (float32) or the same file
imported in float32 (Q8_0). Controls: the norms left shifted, or the clamps unread, miss mlx-lm; what llama.cpp runs
otherwise is refused by name."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("mlx_lm.models.step3p5")

from ferrum.errors import UnsupportedFeatureError  # noqa: E402
from ferrum.gguf_import import architectures, convert_gguf, step35  # noqa: E402
from gguf_writer import (  # noqa: E402
    LONG_TOKENS, add_metadata, add_sentencepiece_vocab, add_tensor, assert_runs_as_its_float_import, ferrum_logits,
    finish, sentencepiece_vocab,
)
from mlx_lm_release import model_logits, random_mlx_lm_model  # noqa: E402
from support import scaled_error  # noqa: E402
from test_step3p5 import CONFIG, _draw, _release_name  # noqa: E402

Q = gguf.GGMLQuantizationType
#: tests/test_step3p5.py's model (4 query heads on the full layers, 8 on the sliding ones, clamps binding on some
#: layers, an MTP layer's entries) with the llama3 rope over the releases' pretraining context (the one llama.cpp's
#: rope_freqs are read back for) and a full-layer base at which its bands of 8 rotary dims are kept, blended and scaled.
ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}


def _tiny(**change: Any) -> tuple[Any, dict]:
    config = {**CONFIG, "vocab_size": len(sentencepiece_vocab()[0]), "rope_scaling": ROPE,
              "rope_theta": [500000.0, 100.0, 500000.0, 100.0, 500000.0], **change}
    return random_mlx_lm_model(config, 0, _draw), config


def _rope_freqs(config: dict) -> np.ndarray:
    """Step35Model.generate_extra_tensors: the llama3 divisors over the full layers' rotary dims."""
    rope, dim = config["rope_scaling"], int(config["head_dim"] * 0.5)
    freqs = 1.0 / (config["rope_theta"][0] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    old, low, high = rope["original_max_position_embeddings"], rope["low_freq_factor"], rope["high_freq_factor"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / float(freq)
        smooth = (old / wavelen - low) / (high - low)
        out.append(1.0 if wavelen < old / high else rope["factor"] if wavelen > old / low else
                   1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(out, np.float32)


def _step35_gguf(path: Path, model: Any, config: dict, qtype, **meta: Any) -> None:
    """mlx-lm's ``model`` as llama.cpp's Step35Model converts the release (``meta`` overriding its metadata), the MTP
    layer's (unread) attention norm and eh_proj appended."""
    from mlx.utils import tree_flatten

    layers, blocks, other = config["num_hidden_layers"], config["num_hidden_layers"] + 1, config[
        "attention_other_setting"]
    kinds = config["layer_types"][:blocks]
    sliding = [kind == "sliding_attention" for kind in kinds]
    w = gguf.GGUFWriter(str(path), "step35")
    add_metadata(w, {**dict(
        block_count=blocks, context_length=config["max_position_embeddings"], embedding_length=config["hidden_size"],
        feed_forward_length=config["intermediate_size"], vocab_size=config["vocab_size"],
        head_count=[other["num_attention_heads"] if s else config["num_attention_heads"] for s in sliding],
        head_count_kv=[config["num_attention_groups"]] * blocks, key_length=config["head_dim"],
        value_length=config["head_dim"], rope_freq_base=config["rope_theta"][0],
        rope_freq_base_swa=config["rope_theta"][1], layer_norm_rms_eps=config["rms_norm_eps"],
        sliding_window=config["sliding_window"], sliding_window_pattern=sliding,
        expert_count=config["moe_num_experts"], expert_used_count=config["moe_top_k"],
        expert_gating_func=gguf.ExpertGatingFuncType.SIGMOID,
        expert_feed_forward_length=config["moe_intermediate_size"],
        expert_shared_feed_forward_length=config["share_expert_dim"],
        expert_weights_scale=config["moe_router_scaling_factor"], expert_weights_norm=config["norm_expert_weight"],
        leading_dense_block_count=1, swiglu_clamp_exp=[float(v or 0.0) for v in config["swiglu_limits"]],
        swiglu_clamp_shexp=[float(v or 0.0) for v in config["swiglu_limits_shared"]], nextn_predict_layers=1),
        **meta})
    add_sentencepiece_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.STEP35, blocks)
    tensors = {"rope_freqs.weight": _rope_freqs(config),
               f"blk.{layers}.attn_norm.weight": np.ones(config["hidden_size"], np.float32),
               f"blk.{layers}.nextn.eh_proj.weight": np.zeros((config["hidden_size"], 2 * config["hidden_size"]))}
    for name, p in tree_flatten(model.parameters()):
        name = _release_name(name)  # mlx-lm's norms are the release's plus 1, as the converter writes them
        name = name + ".bias" if name.endswith(".moe.router_bias") else name
        tensors[names.get_name(name, try_suffixes=(".weight", ".bias"))] = np.array(p)
    for name, array in tensors.items():
        add_tensor(w, name, array, qtype)
    finish(w)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=["F32", "Q8_0"])
def test_step35_gguf_matches_mlx_lm(tmp_path, qtype):
    """A float32 file gives mlx-lm's logits, its config the release's heads, ropes, clamps and routing; a Q8_0 one
    (kept packed) what its float import gives, and mlx-lm's within Q8_0's rounding."""
    model, config = _tiny()
    _step35_gguf(tmp_path / "m.gguf", model, config, qtype)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    ours = json.loads((out / "config.json").read_text())
    for key in ("num_attention_heads", "num_attention_groups", "sliding_window", "moe_layers_enum", "moe_top_k",
                "share_expert_dim", "moe_router_scaling_factor", "norm_expert_weight", "num_nextn_predict_layers"):
        assert ours[key] == config[key], key
    assert ours["layer_types"] == config["layer_types"][:4]
    assert ours["rope_theta"] == config["rope_theta"][:4] and ours["rope_scaling"] == ROPE
    assert ours["partial_rotary_factors"] == config["partial_rotary_factors"][:4]
    assert ours["swiglu_limits"] == [0.0, 0.0, np.float32(0.4), np.float32(0.4)]
    if qtype == Q.F32:
        assert scaled_error(ferrum_logits(out, LONG_TOKENS), model_logits(model, LONG_TOKENS)) <= 1e-4
    else:  # the packed file runs as its own float import; against mlx-lm's float model Q8_0's rounding flips this
        # random model's sigmoid routing at some tokens (0.4 scaled), a property of the weights, not of the import
        assert_runs_as_its_float_import(tmp_path / "m.gguf", out, tmp_path / "float")


@pytest.mark.parametrize("change", [dict(norm_offset=0.0), dict(configure=lambda meta, p, cfg: {
    **step35.step35_config(meta, p, cfg), "swiglu_limits": None, "swiglu_limits_shared": None})],
    ids=["norms-shifted", "clamps-unread"])
def test_step35_gguf_read_otherwise_misses_mlx_lm(tmp_path, monkeypatch, change):
    monkeypatch.setitem(architectures.ARCHITECTURES, "step35",
                        replace(architectures.ARCHITECTURES["step35"], **change))
    model, config = _tiny()
    _step35_gguf(tmp_path / "m.gguf", model, config, Q.F32)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert scaled_error(ferrum_logits(out, LONG_TOKENS), model_logits(model, LONG_TOKENS)) > 1e-2


@pytest.mark.parametrize(("meta", "words"), [
    (dict(expert_gating_func=gguf.ExpertGatingFuncType.SOFTMAX), "step35.expert_gating_func 1"),
    (dict(head_count_kv=[2, 1, 2, 1, 2]), "key/value heads [1, 2] by layer"),
    (dict(rope_scaling_type=gguf.RopeScalingType.LINEAR, rope_scaling_factor=2.0), "linear rope scaling in a step35"),
], ids=["gating", "kv-heads", "rope-scaling"])
def test_a_step35_gguf_run_otherwise_is_refused(tmp_path, meta, words):
    model, config = _tiny()
    _step35_gguf(tmp_path / "m.gguf", model, config, Q.F32, **meta)
    with pytest.raises(UnsupportedFeatureError, match=re.escape(words)):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
