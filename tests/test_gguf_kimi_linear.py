"""GGUF imports of Kimi Linear (``kimi-linear``): a tiny random transformers KimiLinear saved in its release's layout
and written as llama.cpp's KimiLinearModel writes it (the KV head count per layer, 0 on the Kimi Delta Attention
ones; A_log as -exp(A_log), dt_bias as ssm_dt.bias, the convolutions' taps as [1, C, 1, K]; kv_b_proj split per
head; the experts stacked, the correction bias as exp_probs_b; the KDA and latent sizes, routing numbers and dense
first layers in the metadata), imported, and run against transformers (float32) or its float import (Q8_0).
Control: A_log read as stored misses transformers' logits."""

from __future__ import annotations

import re
import types
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from safetensors.numpy import load_file  # noqa: E402

from ferrum.errors import CheckpointError, UnsupportedFeatureError  # noqa: E402
from ferrum.gguf_import import convert_gguf, kimi_linear  # noqa: E402
from ferrum.gguf_import.gated_delta import Restored  # noqa: E402
from gguf_writer import (  # noqa: E402
    add_metadata, add_tensor, assert_logits_match, config_writer, finish, imported, tiny_model,
)
from test_gguf_import import _moved_norms_and_biases  # noqa: E402

Q = gguf.GGMLQuantizationType
TYPES = ["linear_attention", "full_attention", "linear_attention", "linear_attention"]
#: Kimi Linear's layout, small: KDA layers of the query heads' count (as llama.cpp runs them), latent attention without
#: rope or a compressed query, 8 experts in two groups of which one is kept, one shared expert, a dense first layer.
_SETTINGS = dict(intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4, num_key_value_heads=4,
                 kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                 num_local_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, num_shared_experts=1,
                 routed_scaling_factor=2.446, linear_head_dim=8, linear_num_heads=4, linear_conv_kernel_dim=4,
                 layer_types=TYPES, tie_word_embeddings=False)
GATING = "kimi-linear.expert_gating_func"


def _tiny():
    hf, config = tiny_model(transformers.KimiLinearConfig, **_SETTINGS)
    return _moved_norms_and_biases(hf, 0.3), config


def _as_converted(folder: Path, config, whole_kv_b: bool) -> dict[str, np.ndarray]:
    """The release-layout checkpoint in ``folder`` under llama.cpp's names, changed as KimiLinearModel changes it."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.KIMI_LINEAR, config.num_hidden_layers)
    heads, nope, kv_lora = config.num_attention_heads, config.qk_nope_head_dim, config.kv_lora_rank
    tensors, experts = {}, {}
    for name, a in load_file(str(folder / "model.safetensors")).items():
        m = re.match(r"model\.layers\.(\d+)\.(.+)$", name)
        block, rest = (f"blk.{m.group(1)}.", m.group(2)) if m else ("", "")
        if e := re.match(r"block_sparse_moe\.experts\.(\d+)\.(w\d)\.weight$", rest):
            experts.setdefault((block, e.group(2)), {})[int(e.group(1))] = a
        elif d := re.match(r"block_sparse_moe\.(gate|up|down)_proj\.weight$", rest):  # transformers 5 saves the dense
            tensors[f"{block}ffn_{d.group(1)}.weight"] = a  # MLP under the sparse one's module; the release, mlp
        elif c := re.match(r"self_attn\.([qkv])_conv1d\.weight$", rest):  # [C, 1, K] -> [1, C, 1, K]
            tensors[f"{block}ssm_conv1d_{c.group(1)}.weight"] = a.reshape(1, a.shape[0], 1, a.shape[-1])
        elif rest == "self_attn.A_log":
            tensors[f"{block}ssm_a"] = -np.exp(a)
        elif rest == "self_attn.dt_bias":
            tensors[f"{block}ssm_dt.bias"] = a
        elif rest == "block_sparse_moe.gate.e_score_correction_bias":
            tensors[f"{block}exp_probs_b.bias"] = a
        elif rest == "self_attn.kv_b_proj.weight" and not whole_kv_b:
            per_head = a.reshape(heads, -1, kv_lora)
            tensors[f"{block}attn_k_b.weight"] = per_head[:, :nope].transpose(0, 2, 1)
            tensors[f"{block}attn_v_b.weight"] = per_head[:, nope:]
        else:
            tensors[names.get_name(name, try_suffixes=(".weight", ".bias"))] = a
    for (block, w), stack in experts.items():
        kind = {"w1": "gate", "w2": "down", "w3": "up"}[w]
        tensors[f"{block}ffn_{kind}_exps.weight"] = np.stack([stack[x] for x in sorted(stack)])
    return tensors


def _kimi_gguf(tmp_path: Path, hf, config, qtype, whole_kv_b: bool = False, extra=(), kv_heads=None,
               **overrides) -> None:
    """``hf`` as KimiLinearModel writes it; matrices as ``qtype``, the router float32 as the converter keeps it.
    ``extra``: tensors added; ``kv_heads``: head_count_kv written otherwise; ``overrides``: other metadata written
    otherwise (None: not)."""
    hf.save_pretrained(tmp_path / "hf")
    rope, kv_lora = config.qk_rope_head_dim, config.kv_lora_rank
    kv_heads = [1 if kind == "full_attention" else 0 for kind in TYPES] if kv_heads is None else kv_heads
    sizes = types.SimpleNamespace(  # the converter writes the rope base, which kimi-linear leaves unread
        **{key: getattr(config, key) for key in ("num_hidden_layers", "max_position_embeddings", "hidden_size",
                                                 "intermediate_size", "num_attention_heads", "rms_norm_eps")},
        rope_parameters={"rope_theta": 10000.0})
    w = config_writer(tmp_path / "m.gguf", "kimi-linear", sizes, kv_heads=kv_heads)
    meta = {"vocab_size": config.vocab_size, "expert_count": 8, "expert_used_count": 2, "expert_group_count": 2,
            "expert_group_used_count": 1, "expert_gating_func": gguf.ExpertGatingFuncType.SIGMOID,
            "ssm_conv_kernel": 4, "kda_head_dim": 8, "kv_lora_rank": kv_lora, "rope_dimension_count": rope,
            "key_length": kv_lora + rope, "key_length_mla": config.qk_nope_head_dim + rope,
            "value_length_mla": config.v_head_dim, "expert_feed_forward_length": 32, "expert_shared_count": 1,
            "leading_dense_block_count": 1, "expert_weights_scale": config.routed_scaling_factor, **overrides}
    add_metadata(w, meta)
    for name, array in {**_as_converted(tmp_path / "hf", config, whole_kv_b), **dict(extra)}.items():
        add_tensor(w, name, array, qtype, kept_float=("ffn_gate_inp",))
    finish(w)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
def test_kimi_linear_gguf_matches_the_model_it_was_written_from(tmp_path, qtype):
    """Imported as transformers' KimiLinear as llama.cpp runs the file: float32 gives transformers' logits, Q8_0 its
    float import's."""
    hf, config = _tiny()
    _kimi_gguf(tmp_path, hf, config, qtype)
    ours = imported(tmp_path, hf, qtype)
    arch, moe = ours.arch, ours.arch.moe
    assert ours.model_type == "kimi_linear"
    assert [layer.mixer for layer in arch.layers] == ["kimi_delta", "attention", "kimi_delta", "kimi_delta"]
    assert [layer.mlp for layer in arch.layers] == ["dense", "moe", "moe", "moe"]
    assert (arch.kimi_delta.heads, arch.kimi_delta.head_dim) == (4, 8) and arch.layers[1].rope.rotary_dim == 0
    assert (arch.mla.q_lora_rank, arch.mla.kv_lora_rank, arch.mla.nope, arch.mla.rope, arch.mla.v_head_dim) == (
        None, 32, 32, 16, 32)
    assert (moe.routing, moe.routed_scale, moe.normalize, moe.n_group, moe.topk_group) == (
        "sigmoid_grouped", pytest.approx(2.446), True, 2, 1)


def test_a_kimi_linear_gguf_with_a_log_read_as_stored_misses_transformers(tmp_path, monkeypatch):
    """Control: ssm_a taken as A_log itself (-exp(A_log), not its log(-x)) misses transformers' logits."""
    hf, config = _tiny()
    _kimi_gguf(tmp_path, hf, config, Q.F32)
    monkeypatch.setitem(kimi_linear._OWN, "ssm_a", Restored("self_attn.A_log"))
    with pytest.raises(AssertionError):
        assert_logits_match(hf, convert_gguf(tmp_path / "m.gguf", tmp_path / "out"))


@pytest.mark.parametrize(("changes", "error", "message"), [
    (dict(expert_gating_func=gguf.ExpertGatingFuncType.SOFTMAX), UnsupportedFeatureError,
     "expert_gating_func 1 is not supported; Kimi Linear routes with the sigmoid gate"),
    (dict(expert_gating_func=None), CheckpointError, f"lacks '{GATING}'"),
    (dict(whole_kv_b=True), UnsupportedFeatureError, "a whole blk.1.attn_kv_b is not supported"),
    # every layer KDA by its head count, yet blk.1 holds latent attention's halves (a KeyError before)
    (dict(kv_heads=0), CheckpointError, "blk.1.attn_output.weight .* has shape"),
    (dict(extra={"blk.1.attn_q_a.weight": np.zeros((32, 64))}), UnsupportedFeatureError,
     r"a compressed query \(blk.1.attn_q_a\) is not supported"),
    (dict(expert_shared_count=0), UnsupportedFeatureError, "expert_shared_count 0 is not supported"),
], ids=["softmax", "no-gate", "whole-kv_b", "all-kda", "compressed-query", "no-shared-expert"])
def test_a_kimi_linear_gguf_llama_cpp_runs_otherwise_or_not_at_all_is_refused(tmp_path, changes, error, message):
    hf, config = _tiny()
    _kimi_gguf(tmp_path, hf, config, Q.F32, **changes)
    with pytest.raises(error, match=message):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
