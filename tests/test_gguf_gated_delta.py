"""GGUF imports of the Gated DeltaNet hybrids (``qwen35``, ``qwen35moe``, ``qwen3next``): tiny random transformers
models written as llama.cpp's converter writes them (A_log as -exp(A_log), the 1 added to the zero-centred norms,
the convolution squeezed, Qwen3.5's value heads tiled, Qwen3-Next's in_proj_qkvz cut in two), imported, and run
against transformers (float32 files) or the same file imported in float32 (Q8_0 files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from ferrum.errors import CheckpointError, UnsupportedFeatureError  # noqa: E402
from ferrum.gguf_import import convert_gguf  # noqa: E402
from gguf_writer import (  # noqa: E402
    add_sentencepiece_vocab, assert_logits_match, assert_runs_as_its_float_import, finish, sentencepiece_vocab,
)

Q = gguf.GGMLQuantizationType

#: Two key heads, four value heads (so Qwen3.5's are tiled), head sizes whole Q8_0 blocks.
_SIZES = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=4,
              full_attention_interval=2, linear_conv_kernel_dim=4, linear_key_head_dim=32, linear_value_head_dim=32,
              linear_num_key_heads=2, linear_num_value_heads=4, max_position_embeddings=128, tie_word_embeddings=False,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
_EXPERTS = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64)
#: GGUF architecture -> the transformers config written from.
_CONFIGS = {
    "qwen35": lambda **kw: transformers.Qwen3_5TextConfig(**{**_SIZES, "intermediate_size": 96, **kw}),
    "qwen35moe": lambda **kw: transformers.Qwen3_5MoeTextConfig(**{**_SIZES, **_EXPERTS, **kw}),
    "qwen3next": lambda **kw: transformers.Qwen3NextConfig(**{**_SIZES, **_EXPERTS, "intermediate_size": 96,
                                                              "norm_topk_prob": True, **kw}),
}


def _tiny(arch: str, **settings: Any) -> tuple[Any, Any]:
    """A random float32 model of ``arch``'s family over the test vocabulary: norms away from 0 (each stored as 1 + w
    but the Gated DeltaNet's own), A_log and dt_bias spread, so a wrong inverse or head order shows in the logits."""
    config = _CONFIGS[arch](vocab_size=len(sentencepiece_vocab()[0]), **settings)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(-0.5, 0.5)
            elif name.endswith(("A_log", "dt_bias")):
                param.uniform_(-1.0, 1.0)
            else:
                param.normal_(0, 0.2)
    return hf, config


def _retile(array: np.ndarray, config, width: int, axis: int = 0, back: bool = False) -> np.ndarray:
    """The converter's value-head reorder along ``axis``: heads of ``width`` grouped by key head ``(k, r)`` to tiled
    ``(r, k)``; ``back``: the reverse."""
    k, v = config.linear_num_key_heads, config.linear_num_value_heads
    moved = np.moveaxis(array, axis, 0)
    outer = (v // k, k) if back else (k, v // k)
    heads = moved.reshape(*outer, width, *moved.shape[1:]).swapaxes(0, 1)
    return np.moveaxis(heads.reshape(moved.shape), 0, axis)


def _converted_tensors(name: str, array: np.ndarray, config, arch: str, whole_qkvz: bool,
                       fused: bool = False) -> dict[str, np.ndarray]:
    """One transformers tensor as llama.cpp's converter changes it, under transformers' names (the converter's
    renames included; ``whole_qkvz``: Qwen3-Next's in_proj_qkvz kept whole, as the first converter kept it;
    ``fused``: the experts' gate and up stacks kept fused, as newer converters may write them)."""
    k, v = config.linear_num_key_heads, config.linear_num_value_heads
    dk, dv = config.linear_key_head_dim, config.linear_value_head_dim
    keys = 2 * k * dk
    if arch != "qwen3next" and k != v and ".linear_attn." in name:  # Qwen3.5: value heads tiled
        if ".in_proj_qkv." in name or ".conv1d." in name:
            array = np.concatenate([array[:keys], _retile(array[keys:], config, dv)])
        elif ".in_proj_z." in name:
            array = _retile(array, config, dv)
        elif name.endswith((".in_proj_b.weight", ".in_proj_a.weight", ".A_log", ".dt_bias")):
            array = _retile(array, config, 1)
        elif ".out_proj." in name:
            array = _retile(array, config, dv, axis=1)
    if name.endswith(".A_log"):
        return {name: -np.exp(array)}
    if name.endswith(".dt_bias"):
        return {name.replace(".dt_bias", ".dt_proj.bias"): array}
    if ".conv1d." in name:
        return {name: array.squeeze()}
    if name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
        return {name: array + 1}
    if name.endswith("in_proj_qkvz.weight") and not whole_qkvz:  # per key head q, k, v, z -> all q, all k, all v; all z
        rows = array.reshape(k, 2 * dk + 2 * (v // k) * dv, -1)
        parts = np.split(rows, np.cumsum([dk, dk, v // k * dv]), axis=1)
        stem = name.removesuffix("in_proj_qkvz.weight")
        return {stem + "in_proj_qkv.weight": np.concatenate([p.reshape(-1, array.shape[1]) for p in parts[:3]]),
                stem + "in_proj_z.weight": parts[3].reshape(-1, array.shape[1])}
    if name.endswith("mlp.experts.gate_up_proj") and fused:  # [E, 2I, H], each expert's gate then its up rows
        return {name + ".weight": array}
    if name.endswith("mlp.experts.gate_up_proj"):  # transformers' stack [E, 2I, H], split as the converter does
        inter = config.moe_intermediate_size
        return {name.replace("gate_up_proj", "gate_proj.weight"): array[:, :inter],
                name.replace("gate_up_proj", "up_proj.weight"): array[:, inter:]}
    if name.endswith("mlp.experts.down_proj"):
        return {name + ".weight": array}
    if name.endswith("shared_expert_gate.weight"):
        return {name: array.reshape(-1)}
    return {name: array}


def _gated_delta_gguf(path: Path, hf, config, arch: str, qtype, prediction_layers: int = 0,
                      whole_qkvz: bool = False, fused: bool = False) -> None:
    """``hf``'s weights and sizes as llama.cpp's converter writes ``arch``: the ssm keys, the partial rope's
    dimension count, expert keys; names from gguf's own tensor map; matrices as ``qtype``, the routers, norms,
    convolutions and vectors float, as llama.cpp keeps them."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config.num_hidden_layers + prediction_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    if getattr(config, "intermediate_size", None):
        w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_freq_base(config.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_ssm_conv_kernel(config.linear_conv_kernel_dim)
    w.add_ssm_state_size(config.linear_key_head_dim)
    w.add_ssm_group_count(config.linear_num_key_heads)
    w.add_ssm_time_step_rank(config.linear_num_value_heads)
    w.add_ssm_inner_size(config.linear_value_head_dim * config.linear_num_value_heads)
    w.add_full_attention_interval(_SIZES["full_attention_interval"])  # as the checkpoint's config.json says
    w.add_rope_dimension_count(int(config.head_dim * config.rope_parameters["partial_rotary_factor"]))
    if arch != "qwen3next":
        w.add_rope_dimension_sections([11, 11, 10, 0])
    if prediction_layers:
        w.add_nextn_predict_layers(prediction_layers)
    if arch != "qwen35":
        w.add_expert_count(config.num_experts)
        w.add_expert_used_count(config.num_experts_per_tok)
        w.add_expert_feed_forward_length(config.moe_intermediate_size)
        w.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    add_sentencepiece_vocab(w)
    kind = next(k for k, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names = gguf.get_tensor_name_map(kind, config.num_hidden_layers + prediction_layers)
    for name, tensor in hf.state_dict().items():
        for hf_name, array in _converted_tensors(name, tensor.float().numpy(), config, arch, whole_qkvz,
                                                 fused).items():
            module, suffix = hf_name.rsplit(".", 1) if hf_name.endswith((".weight", ".bias")) else (hf_name, None)
            gguf_name = names.get_name(module) + ("" if suffix is None else f".{suffix}")
            array = np.ascontiguousarray(array, dtype=np.float32)
            if qtype == Q.F32 or array.ndim < 2 or ".conv1d" in module or module.endswith("mlp.gate"):
                w.add_tensor(gguf_name, array)
            else:
                w.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    rng = np.random.default_rng(1)  # a next-token-prediction block, which the import must leave unread
    for block in range(config.num_hidden_layers, config.num_hidden_layers + prediction_layers):
        for part, shape in (("attn_norm.weight", (config.hidden_size,)),
                            ("nextn.eh_proj.weight", (config.hidden_size, 2 * config.hidden_size))):
            w.add_tensor(f"blk.{block}.{part}", rng.standard_normal(shape).astype(np.float32))
    finish(w)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("arch", ["qwen35", "qwen35moe", "qwen3next"])
def test_gated_delta_gguf_matches_the_model_it_was_written_from(tmp_path, arch, qtype):
    """Each file imports as its Qwen3.5 family (Qwen3-Next as Qwen3.5-MoE, as llama.cpp runs it): recurrent layers,
    partial rope, the next-token-prediction block left out; float32 files give transformers' logits, Q8_0 ones
    (packed, out_proj's value heads moved as whole blocks) what the same file imported in float32 gives."""
    import ferrum
    from ferrum.config import ModelConfig

    hf, config = _tiny(arch)
    _gated_delta_gguf(tmp_path / "m.gguf", hf, config, arch, qtype, prediction_layers=int(arch == "qwen35"))
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    ours = ModelConfig.from_file(out)
    assert ours.model_type == ("qwen3_5_text" if arch == "qwen35" else "qwen3_5_moe_text")
    assert [s.mixer for s in ours.arch.layers] == ["gated_delta", "attention"] * 2
    assert ours.arch.layers[1].rope.rotary_dim == 4 and not ours.arch.gated_delta.grouped
    if arch != "qwen35":
        assert ours.arch.moe.normalize and ours.arch.moe.shared_expert_size == 64
    if qtype == Q.F32:
        assert_logits_match(hf, out)
        vocab = sentencepiece_vocab()[0]
        tokenizer = ferrum.load(out, backend="cpu").tokenizer
        assert tokenizer.encode("hello world", add_special_tokens=False) == [vocab.index("\u2581hello"),
                                                                             vocab.index("\u2581world")]
        return
    assert ours.quantization is not None
    assert_runs_as_its_float_import(tmp_path / "m.gguf", out, tmp_path / "float")


def test_an_older_qwen3next_file_with_the_whole_in_proj_qkvz_imports(tmp_path):
    """llama.cpp's first Qwen3-Next converter kept in_proj_qkvz whole, grouped per key head, as ``ssm_in``."""
    hf, config = _tiny("qwen3next")
    _gated_delta_gguf(tmp_path / "m.gguf", hf, config, "qwen3next", Q.F32, whole_qkvz=True)
    assert "blk.0.ssm_in.weight" in {t.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert_logits_match(hf, convert_gguf(tmp_path / "m.gguf", tmp_path / "out"))


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("arch", ["qwen35moe", "qwen3next"])
def test_experts_with_gate_and_up_fused_import(tmp_path, arch, qtype):
    """Newer llama.cpp converters may keep the experts' gate and up stacks fused (``ffn_gate_up_exps``, each expert's
    gate rows then its up rows); the import cuts them apart, packed rows moved whole."""
    hf, config = _tiny(arch)
    _gated_delta_gguf(tmp_path / "m.gguf", hf, config, arch, qtype, fused=True)
    names = {t.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert "blk.0.ffn_gate_up_exps.weight" in names and "blk.0.ffn_gate_exps.weight" not in names
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    if qtype == Q.F32:
        assert_logits_match(hf, out)
    else:
        assert_runs_as_its_float_import(tmp_path / "m.gguf", out, tmp_path / "float")


def test_value_heads_that_split_a_quant_block_are_refused_packed_and_import_through_float(tmp_path):
    """Value heads 16 wide tile out_proj's columns at half a Q8_0 block: the packed import refuses by name (moving
    them would tear blocks apart), and dequantize_to='float32' imports the file."""
    hf, config = _tiny("qwen35", linear_value_head_dim=16)
    _gated_delta_gguf(tmp_path / "m.gguf", hf, config, "qwen35", Q.Q8_0)
    with pytest.raises(UnsupportedFeatureError, match=r"ssm_out.weight's 4 column groups \(value heads\) do not fall "
                                                      r"on whole Q8_0 blocks.*dequantize_to='float32'"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    from safetensors.numpy import load_file

    convert_gguf(tmp_path / "m.gguf", tmp_path / "float", dequantize_to="float32")
    stored = next(t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors if t.name == "blk.0.ssm_out.weight")
    values = gguf.quants.dequantize(stored.data, stored.tensor_type).reshape(64, -1)
    got = load_file(str(tmp_path / "float" / "model.safetensors"))["model.layers.0.linear_attn.out_proj.weight"]
    np.testing.assert_array_equal(got, _retile(values, config, 16, axis=1, back=True))


def test_an_ssm_a_that_is_not_negative_is_refused(tmp_path):
    """``ssm_a`` holds -exp(A_log); a value >= 0 has no A_log, and the import says so rather than write NaN."""
    hf, config = _tiny("qwen35")
    with torch.no_grad():
        hf.model.layers[0].linear_attn.A_log[0] = float("-inf")  # stored as -exp(-inf) = -0.0
    _gated_delta_gguf(tmp_path / "m.gguf", hf, config, "qwen35", Q.F32)
    with pytest.raises(CheckpointError, match=r"blk\.0\.ssm_a holds values >= 0"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
