"""AutoAWQ (GEMM) and GPTQ checkpoints: written here in their published layouts from a float model, loaded on
every backend and compared with transformers running the same weights dequantized (and, for AWQ, with mlx-lm,
whose loader unpacks AWQ words on its own)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import ferrum
from ferrum.config import ModelConfig
from ferrum.errors import UnsupportedFeatureError
from ferrum.quant import QuantConfig

from support import runnable_backends, write_text_checkpoint, write_tiny_qwen3_moe

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

GROUP = 32
TOKENS = [0, 5, 9, 33, 77, 120, 201, 7]
#: AutoAWQ's packing order: nibble i of a word holds output ``8c + AWQ_ORDER[i]``.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _quantize(w: np.ndarray, bits: int, symmetric: bool, lowest_zero: int = 0
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[out, in]`` -> codes ``[out, in]``, zeros (from ``lowest_zero``) and float16 scales ``[out, groups]``."""
    top = (1 << bits) - 1
    groups = w.reshape(w.shape[0], -1, GROUP)
    if symmetric:
        scale = (np.abs(groups).max(-1) * 2 / top).astype(np.float16)
        zero = np.full(scale.shape, (top + 1) // 2)
    else:
        low, high = groups.min(-1), groups.max(-1)
        scale = ((high - low) / top).astype(np.float16)
        zero = np.clip(np.round(-low / scale.astype(np.float32)), lowest_zero, top).astype(np.int64)
    s = scale.astype(np.float32)[..., None]
    q = np.clip(np.round(groups / s) + zero[..., None], 0, top).astype(np.int64)
    return q.reshape(w.shape), zero, scale


def _pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """``[rows, n]`` codes -> int32 ``[rows, n * bits / 32]``, in order from the lowest bits."""
    per = 32 // bits
    v = values.reshape(values.shape[0], -1, per).astype(np.uint64)
    words = (v << (np.arange(per, dtype=np.uint64) * bits)).sum(-1).astype(np.uint32)
    return np.ascontiguousarray(words).view(np.int32)  # safetensors writes an F-ordered array's memory as is


def _pack_awq(values: np.ndarray) -> np.ndarray:
    """``[rows, out]`` 4-bit codes -> AWQ's int32 ``[rows, out / 8]``."""
    v = values.reshape(values.shape[0], -1, 8)[..., list(AWQ_ORDER)]
    return _pack_rows(v.reshape(values.shape[0], -1), 4)


def _write(folder, src, method: str, bits: int = 4, symmetric: bool = False, **extra) -> dict[str, np.ndarray]:
    """``src``'s linear layers in ``method``'s layout into ``folder``; returns the dequantized weights."""
    shutil.copytree(src, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    dequantized = {}
    quantized = [n for n, a in tensors.items() if n.startswith("model.layers.") and n.endswith(".weight")
                 and a.ndim == 2 and not n.endswith(".mlp.gate.weight")]  # norms are vectors; a MoE router stays float
    for name in quantized:
        module = name.removesuffix(".weight")
        v1 = method == "gptq" and extra.get("checkpoint_format", "gptq") == "gptq"
        q, zero, scale = _quantize(tensors.pop(name).astype(np.float32), bits, symmetric)
        if v1 and not symmetric:  # zeros of 0 beside others in a word, which v1's subtraction borrows across
            zero[::2, 0] = 0
        dequantized[name] = ((q.reshape(*zero.shape, GROUP) - zero[..., None]) * scale.astype(np.float32)[..., None]
                             ).reshape(q.shape)
        if method == "awq":
            tensors[f"{module}.qweight"] = _pack_awq(q.T)
            tensors[f"{module}.qzeros"] = _pack_awq(zero.T)
        else:
            tensors[f"{module}.qweight"] = _pack_rows(q, bits).T.copy()  # [in * bits / 32, out]
            ones = sum(1 << shift for shift in range(0, 32, bits)) if v1 else 0  # v1: each zero less one,
            words = _pack_rows(zero.T, bits).view(np.uint32) - np.uint32(ones)  # as GPTQModel subtracts it
            tensors[f"{module}.qzeros"] = words.view(np.int32)
            tensors[f"{module}.g_idx"] = (np.arange(q.shape[1]) // GROUP).astype(np.int32)
        tensors[f"{module}.scales"] = np.ascontiguousarray(scale.T)
    save_file(tensors, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": bits, "group_size": GROUP, **extra}
    (folder / "config.json").write_text(json.dumps(config))
    return dequantized


def _reference_logits(src, dequantized, tmp_path) -> np.ndarray:
    """transformers on the float model with every quantized layer replaced by its dequantized weights."""
    folder = tmp_path / "dequantized"
    shutil.copytree(src, folder)
    save_file({**load_file(str(src / "model.safetensors")), **dequantized}, str(folder / "model.safetensors"))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].numpy()


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    return write_text_checkpoint(tmp_path_factory.mktemp("awq_gptq") / "float")


def scaled_error(got, ref) -> float:
    return float(np.abs(got - ref).max() / max(1.0, float(np.abs(ref).max())))


@pytest.mark.parametrize("method, bits, extra", [
    ("awq", 4, {"version": "gemm", "zero_point": True}),
    ("gptq", 4, {"desc_act": False, "sym": False}),
    ("gptq", 8, {"desc_act": False, "sym": False}),
    ("gptq", 2, {"desc_act": False, "sym": False}),
    ("gptq", 4, {"desc_act": False, "sym": False, "checkpoint_format": "gptq_v2"}),
])
@pytest.mark.parametrize("backend", runnable_backends())
def test_checkpoints_match_transformers_on_their_dequantized_weights(float_model, tmp_path, method, bits, extra,
                                                                     backend):
    dequantized = _write(tmp_path / method, float_model, method, bits, **extra)
    ref = _reference_logits(float_model, dequantized, tmp_path)
    llm = ferrum.load(tmp_path / method, backend=backend, dtype="float32")
    assert llm.model.config.quantization == QuantConfig(bits, GROUP, {}, extra.get("checkpoint_format", method))
    assert scaled_error(llm.model.forward_verify("s", TOKENS), ref) <= 1e-4


@pytest.fixture(scope="module")
def float_moe(tmp_path_factory):
    """A tiny Qwen3-MoE in the Hugging Face per-expert layout AWQ and GPTQ releases keep."""
    return write_tiny_qwen3_moe(tmp_path_factory.mktemp("awq_gptq_moe") / "float")


@pytest.mark.parametrize("method, extra", [("awq", {"version": "gemm", "zero_point": True}),
                                           ("gptq", {"desc_act": False, "sym": False})])
@pytest.mark.parametrize("backend", runnable_backends())
def test_experts_match_transformers_on_their_dequantized_weights(float_moe, tmp_path, method, extra, backend):
    dequantized = _write(tmp_path / method, float_moe, method, **extra)
    assert any(".experts.3.down_proj." in name for name in dequantized)
    ref = _reference_logits(float_moe, dequantized, tmp_path)
    got = ferrum.load(tmp_path / method, backend=backend, dtype="float32").model.forward_verify("s", TOKENS)
    assert scaled_error(got, ref) <= 1e-4


def test_awq_matches_mlx_lm_reading_the_same_file(float_model, tmp_path):
    mx = pytest.importorskip("mlx.core")
    mlx_lm = pytest.importorskip("mlx_lm")
    _write(tmp_path / "awq", float_model, "awq", version="gemm", zero_point=True)
    model, _ = mlx_lm.load(str(tmp_path / "awq"))
    ref = np.array(model(mx.array([TOKENS]))[0].astype(mx.float32))
    got = ferrum.load(tmp_path / "awq", backend="cpu", dtype="float32").model.forward_verify("s", TOKENS)
    assert scaled_error(got, ref) <= 1e-2  # mlx-lm runs it in float16, its scales' dtype (a misread nibble: ~1)


def test_symmetric_gptq_stores_its_zeros_as_real_checkpoints_do(float_model, tmp_path):
    """A symmetric 4-bit GPTQ (v1) layer's zero words read 0x77777777 (2004318071) in published checkpoints:
    this file is written the same way, and loads."""
    dequantized = _write(tmp_path / "sym", float_model, "gptq", 4, symmetric=True, sym=True)
    zeros = load_file(str(tmp_path / "sym" / "model.safetensors"))["model.layers.0.mlp.up_proj.qzeros"]
    assert (zeros == 2004318071).all()
    ref = _reference_logits(float_model, dequantized, tmp_path)
    got = ferrum.load(tmp_path / "sym", backend="cpu", dtype="float32").model.forward_verify("s", TOKENS)
    assert scaled_error(got, ref) <= 1e-4


@pytest.mark.parametrize("method, sidecar, spelled, left", [
    ("awq", "quant_config.json", {"zero_point": True, "q_group_size": GROUP, "w_bit": 4, "version": "GEMM"}, False),
    ("gptq", "quantize_config.json", {"bits": 4, "group_size": GROUP, "desc_act": False, "sym": False}, False),
    ("gptq", "quantize_config.json", {"bits": 4, "group_size": GROUP, "desc_act": False, "sym": False}, True),
])
def test_older_releases_describe_their_quantization_beside_config_json(float_model, tmp_path, method, sidecar,
                                                                      spelled, left):
    """AutoAWQ's quant_config.json and AutoGPTQ's quantize_config.json, where config.json says nothing (or
    ``"quantization_config": null``)."""
    folder = tmp_path / method
    dequantized = _write(folder, float_model, method)
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    if left:
        config["quantization_config"] = None
    (folder / "config.json").write_text(json.dumps(config))
    (folder / sidecar).write_text(json.dumps(spelled))
    llm = ferrum.load(folder, backend="cpu", dtype="float32")
    assert llm.model.config.quantization == QuantConfig(4, GROUP, {}, method)
    ref = _reference_logits(float_model, dequantized, tmp_path)
    assert scaled_error(llm.model.forward_verify("s", TOKENS), ref) <= 1e-4


def test_act_order_and_other_layouts_are_refused_by_name(float_model, tmp_path):
    _write(tmp_path / "act", float_model, "gptq", desc_act=True)
    tensors = load_file(str(tmp_path / "act" / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.g_idx"] = tensors["model.layers.0.mlp.up_proj.g_idx"][::-1].copy()
    save_file(tensors, str(tmp_path / "act" / "model.safetensors"))
    with pytest.raises(UnsupportedFeatureError, match="up_proj.g_idx orders its inputs by activation"):
        ferrum.load(tmp_path / "act", backend="cpu")
    for section, words in [
        ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}, "AWQ version 'gemv'"),
        ({"quant_method": "gptq", "bits": 3, "group_size": 32}, "at 3 bits"),
        ({"quant_method": "gptq", "bits": 4, "group_size": -1}, "group_size -1"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes'"),
        ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "'bitsandbytes'"),  # transformers' older spelling
        ({"quant_method": "gptq", "bits": 4, "group_size": 32, "dynamic": {"+:.*down_proj.*": {"bits": 8}}},
         "dynamic per-module settings"),
    ]:
        with pytest.raises(UnsupportedFeatureError, match=words):
            QuantConfig.from_config({"quantization_config": section})
    excluded = {"quant_method": "gptq", "bits": 4, "group_size": 32, "dynamic": {"-:.*o_proj.*": {}}}
    assert QuantConfig.from_config({"quantization_config": excluded}).mode == "gptq"  # those modules stay float
    (tmp_path / "modelopt").mkdir()
    (tmp_path / "modelopt" / "config.json").write_text((float_model / "config.json").read_text())
    (tmp_path / "modelopt" / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "NVFP4", "group_size": 16}}))
    with pytest.raises(UnsupportedFeatureError, match="'modelopt'"):
        ModelConfig.from_file(tmp_path / "modelopt")
