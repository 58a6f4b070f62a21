"""FP8 checkpoints (quant_method "fp8" as Qwen3-*-FP8 and Mistral's releases store them; compressed-tensors'
"float-quantized" as RedHatAI's *-FP8-dynamic do): written here in numpy from a float model, loaded on every
backend, and compared with transformers running the float model whose weights are the FP8 values times their
scales (and, where transformers' own FP8 loader can read the file on this machine, with that too)."""

from __future__ import annotations

import json
import math
import shutil
import warnings

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import ferrum
from ferrum.errors import CheckpointError, ConfigError, UnsupportedFeatureError
from ferrum.quant import QuantConfig

from support import runnable_backends, write_arch_checkpoint, write_tiny_qwen3_moe

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOKENS = [0, 5, 9, 33, 77, 90, 21, 7]
TYPES = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}


def _grid_scales(w: np.ndarray, rows: int, cols: int, fmt: str) -> np.ndarray:
    """float32 scales of ``w`` ``[out, in]``, one per ``rows x cols`` block (edge blocks partial): each block's
    largest magnitude over the format's largest value, as the quantizers take it."""
    out, k = w.shape
    top = float(ml_dtypes.finfo(TYPES[fmt]).max)
    scales = np.empty((math.ceil(out / rows), math.ceil(k / cols)), np.float32)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            block = w[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols]
            scales[i, j] = max(float(np.abs(block).max()), 1e-12) / top
    return scales


def _expand(scales: np.ndarray, rows: int, cols: int, shape: tuple[int, int]) -> np.ndarray:
    """Each element's scale: ``scales`` ``[row blocks, column blocks]`` spread over its blocks (Kronecker)."""
    return np.kron(scales, np.ones((rows, cols), np.float32))[: shape[0], : shape[1]]


def _quantize(w: np.ndarray, strategy: str, block: tuple[int, int] | None, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """``w`` as FP8 codes and the float32 scales laid out as the checkpoints store them."""
    out, k = w.shape
    rows, cols = {"tensor": (out, k), "channel": (1, k), "block": block}[strategy]
    grid = _grid_scales(w, rows, cols, fmt)
    top = float(ml_dtypes.finfo(TYPES[fmt]).max)
    codes = np.clip(w / _expand(grid, rows, cols, w.shape), -top, top).astype(TYPES[fmt])
    return codes, grid.reshape(()) if strategy == "tensor" else grid  # per channel: [out, 1]


def _dequantized(codes: np.ndarray, stored: np.ndarray, strategy: str, block: tuple[int, int] | None) -> np.ndarray:
    out, k = codes.shape
    rows, cols = {"tensor": (out, k), "channel": (1, k), "block": block}[strategy]
    grid = np.asarray(stored, np.float32).reshape(math.ceil(out / rows), math.ceil(k / cols))
    return codes.astype(np.float32) * _expand(grid, rows, cols, codes.shape)


def _quantized_names(tensors: dict[str, np.ndarray]) -> list[str]:
    """The linear layers FP8 releases quantize: every projection of the decoder layers (not norms, not a MoE
    router, not the embedding or LM head, which they keep in float)."""
    return [n for n, a in tensors.items() if n.startswith("model.layers.") and n.endswith(".weight")
            and a.ndim == 2 and not n.endswith(".mlp.gate.weight")]


def write_fp8(folder, src, section: dict, strategy: str, block=None, fmt: str = "e4m3",
              scale_name: str = "weight_scale_inv", extra=None, change=None,
              scale_dtype=np.float32) -> dict[str, np.ndarray]:
    """``src``'s linear layers as FP8 into ``folder`` with ``section`` as config.json's quantization_config;
    ``extra(module)``: more tensors a layer stores (activation scales); ``change(tensors)``: damage done before
    writing; ``scale_dtype``: the stored scales'. Returns the dequantized weights."""
    shutil.copytree(src, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    dequantized = {}
    for name in _quantized_names(tensors):
        module = name.removesuffix(".weight")
        codes, stored = _quantize(tensors[name].astype(np.float32), strategy, block, fmt)
        stored = stored.astype(scale_dtype)
        tensors[name], tensors[f"{module}.{scale_name}"] = codes, stored
        tensors.update(extra(module) if extra else {})
        dequantized[name] = _dequantized(codes, stored, strategy, block)
    if change is not None:
        change(tensors)
    save_file(tensors, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = section
    (folder / "config.json").write_text(json.dumps(config))
    return dequantized


def reference_logits(src, dequantized, folder) -> np.ndarray:
    """transformers on the float model whose quantized layers hold their dequantized weights."""
    shutil.copytree(src, folder)
    save_file({**load_file(str(src / "model.safetensors")), **dequantized}, str(folder / "model.safetensors"))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].numpy()


def scaled_error(got, ref) -> float:
    return float(np.abs(got - ref).max() / max(1.0, float(np.abs(ref).max())))


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """A tiny Qwen3 (q_proj 336 x 96: three 128-row blocks, the last partial; o_proj 96 x 336) in float32."""
    folder = tmp_path_factory.mktemp("fp8") / "qwen3"
    write_arch_checkpoint(folder, "qwen3")
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama with tied embeddings (hidden 96, intermediate 80)."""
    folder = tmp_path_factory.mktemp("fp8") / "llama"
    write_arch_checkpoint(folder, "llama")
    return folder


FP8_BLOCK = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
MISTRAL = {"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": None, "dequantize": False,
           "modules_to_not_convert": ["lm_head", "model.vision_tower", "model.multi_modal_projector"]}


def compressed_tensors(strategy: str, **weights) -> dict:
    """RedHatAI's *-FP8-dynamic quantization_config, weights by ``strategy``."""
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
                            "strategy": strategy, **weights},
                "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True,
                                      "strategy": "token"}}},
            "ignore": ["lm_head"], "kv_cache_scheme": None}


def _activation_scale(module: str) -> dict[str, np.ndarray]:  # Mistral's static activation scales
    return {f"{module}.activation_scale": np.array(0.02, np.float32)}


CASES = {
    # Qwen3-8B-FP8's layout: 128 x 128 blocks, edge blocks partial
    "fp8-block": ("qwen3", FP8_BLOCK, "block", (128, 128), "e4m3", "weight_scale_inv", None),
    # small non-square blocks: several blocks a matrix, partial ones on both edges
    "fp8-block-32x48": ("llama", {**FP8_BLOCK, "weight_block_size": [32, 48]}, "block", (32, 48), "e4m3",
                        "weight_scale_inv", None),
    "fp8-e5m2": ("qwen3", {**FP8_BLOCK, "fmt": "e5m2"}, "block", (128, 128), "e5m2", "weight_scale_inv", None),
    # Mistral's FP8 releases: one scale a tensor, static activation scales
    "fp8-tensor-mistral": ("llama", MISTRAL, "tensor", None, "e4m3", "weight_scale_inv", _activation_scale),
    # AutoFP8 (neuralmagic's first FP8 releases): no weight_block_size, weight_scale and input_scale per tensor
    "fp8-tensor-autofp8": ("qwen3", {"quant_method": "fp8", "activation_scheme": "static"}, "tensor", None, "e4m3",
                           "weight_scale", lambda m: {f"{m}.input_scale": np.array([0.01], np.float32)}),
    "ct-channel": ("qwen3", compressed_tensors("channel"), "channel", None, "e4m3", "weight_scale", None),
    # RedHatAI's releases store the scales in the model's dtype
    "ct-channel-bf16": ("qwen3", compressed_tensors("channel"), "channel", None, "e4m3", "weight_scale", None,
                        ml_dtypes.bfloat16),
    "ct-tensor": ("llama", compressed_tensors("tensor"), "tensor", None, "e4m3", "weight_scale", None),
    "ct-block": ("qwen3", compressed_tensors("block", block_structure=[128, 128]), "block", (128, 128), "e4m3",
                 "weight_scale", None),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", runnable_backends())
def test_fp8_checkpoints_match_transformers_on_their_dequantized_weights(request, tmp_path, case, backend):
    arch, section, strategy, block, fmt, scale_name, extra, *scale_dtype = CASES[case]
    src = request.getfixturevalue(arch)
    dequantized = write_fp8(tmp_path / "fp8", src, section, strategy, block, fmt, scale_name, extra,
                            scale_dtype=scale_dtype[0] if scale_dtype else np.float32)
    ref = reference_logits(src, dequantized, tmp_path / "dequantized")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # activation scales are not reported as unread tensors
        llm = ferrum.load(tmp_path / "fp8", backend=backend, dtype="float32")
    assert llm.model.config.quantization.mode == "fp8"
    assert scaled_error(llm.model.forward_verify("s", TOKENS), ref) <= 1e-4
    float_logits = reference_logits(src, {}, tmp_path / "float")
    assert scaled_error(ref, float_logits) > 1e-4  # the FP8 rounding is visible: the test would see a misread


def test_fp8_loads_as_a_float_checkpoint_does(qwen3, tmp_path):
    """The automatic backend and dtype are a float checkpoint's (the weights are float once read)."""
    write_fp8(tmp_path / "fp8", qwen3, FP8_BLOCK, "block", (128, 128))
    config = QuantConfig.from_config({"quantization_config": FP8_BLOCK})
    assert config.runs_as_float and config.fp8.blocks == ((128, 128), (None, None))
    fp8_llm, float_llm = ferrum.load(tmp_path / "fp8"), ferrum.load(qwen3)
    assert (fp8_llm.model.backend.name, fp8_llm.model.dtype) == (float_llm.model.backend.name, float_llm.model.dtype)


def test_transformers_own_fp8_loader_agrees_where_it_runs(qwen3, tmp_path):
    """transformers 5 reads quant_method "fp8" on CPU by dequantizing (FineGrainedFP8Config(dequantize=True), which
    it also picks on its own where there is no GPU). Its dequantizer takes a block to be the matrix over the scale
    grid, not weight_block_size: with partial edge blocks that is wrong (a 336-row q_proj's three 128-row blocks
    read as 112-row ones, 3% off in the logits here) or refused (80 rows in one... two blocks), so it is compared
    on a block size that divides every matrix here."""
    section = {**FP8_BLOCK, "weight_block_size": [16, 16]}  # 336, 96, 80, 48 rows; 96, 336, 80 columns: whole
    write_fp8(tmp_path / "fp8", qwen3, section, "block", (16, 16))
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "fp8", dtype=torch.float32,
            quantization_config=transformers.FineGrainedFP8Config(weight_block_size=(16, 16), dequantize=True)).eval()
    except Exception as exc:  # pragma: no cover - depends on the installed transformers
        pytest.skip(f"transformers cannot load this FP8 checkpoint on CPU: {type(exc).__name__}: {exc}")
    with torch.no_grad():
        ref = model(torch.tensor([TOKENS])).logits[0].float().numpy()
    got = ferrum.load(tmp_path / "fp8", backend="cpu", dtype="float32").model.forward_verify("s", TOKENS)
    assert scaled_error(got, ref) <= 1e-4


@pytest.fixture(scope="module")
def float_moe(tmp_path_factory):
    return write_tiny_qwen3_moe(tmp_path_factory.mktemp("fp8_moe") / "float")


@pytest.mark.parametrize("backend", runnable_backends())
def test_fp8_experts_match_transformers_on_their_dequantized_weights(float_moe, tmp_path, backend):
    """Qwen3-30B-A3B-FP8's layout: each expert's projections FP8 with their block scales, the router in float."""
    section = {**FP8_BLOCK, "weight_block_size": [24, 24]}  # 32- and 64-wide matrices: partial blocks
    dequantized = write_fp8(tmp_path / "fp8", float_moe, section, "block", (24, 24))
    assert any(".experts.3.down_proj." in name for name in dequantized)
    ref = reference_logits(float_moe, dequantized, tmp_path / "dequantized")
    got = ferrum.load(tmp_path / "fp8", backend=backend, dtype="float32").model.forward_verify("s", TOKENS)
    assert scaled_error(got, ref) <= 1e-4


FP8_E4M3 = ml_dtypes.float8_e4m3fn


def test_damaged_fp8_checkpoints_are_refused_clearly(llama, tmp_path):
    module = "model.layers.0.mlp.up_proj"
    cases = {
        "missing scale": (lambda t: t.pop(f"{module}.weight_scale_inv"),
                          f"{module}.weight is FP8 .* no {module}.weight_scale_inv or {module}.weight_scale beside it"),
        "bad scale shape": (lambda t: t.__setitem__(f"{module}.weight_scale_inv", np.ones((2, 3), np.float32)),
                            r"FP8 scale has shape \[2, 3\]; a \[80, 96\] weight with one scale per 32x48 block .* "
                            r"needs \[3, 2\]"),
        "NaN code": (lambda t: t[f"{module}.weight"].view(np.uint8).__setitem__((0, 0), 0x7F),
                     "an FP8 weight is NaN or infinite \\(byte 0x7f\\)"),
        "float weight beside a scale": (lambda t: t.__setitem__(f"{module}.weight", np.zeros((80, 96), np.float32)),
                                        "the weight beside an FP8 scale is float32"),
        # an exponent byte read as a factor scaled the matrix by 120 and loaded
        "integer scale": (lambda t: t.__setitem__(f"{module}.weight_scale_inv", np.full((3, 2), 120, np.uint8)),
                          "the FP8 scale is stored as uint8, not as floats"),
        # a norm with a scale beside it raised a bare ValueError (a crash, not a refusal)
        "scaled vector": (lambda t: t.update({"model.norm.weight": t["model.norm.weight"].astype(FP8_E4M3),
                                              "model.norm.weight_scale_inv": np.ones((1,), np.float32)}),
                          r"an FP8 tensor of shape \[96\] has a scale beside it"),
    }
    for case, (change, words) in cases.items():
        folder = tmp_path / case.replace(" ", "_")
        write_fp8(folder, llama, {**FP8_BLOCK, "weight_block_size": [32, 48]}, "block", (32, 48), change=change)
        with pytest.raises(CheckpointError, match=words):
            ferrum.load(folder, backend="cpu")
    folder = tmp_path / "no_config"  # FP8 tensors, but config.json says nothing of them
    write_fp8(folder, llama, FP8_BLOCK, "block", (128, 128))
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="is FP8 .* config.json has no FP8 quantization_config"), \
            pytest.warns(UserWarning, match="weight_scale_inv"):
        ferrum.load(folder, backend="cpu")


@pytest.mark.parametrize("section, error, words", [
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
        "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}, "targets": ["Linear"]}}},
     UnsupportedFeatureError, "compressed-tensors format 'pack-quantized' with 4-bit int weights"),
    ({"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {"group_0": {
        "weights": {"num_bits": 8, "type": "int", "strategy": "channel"}, "targets": ["Linear"]}}},
     UnsupportedFeatureError, "format 'int-quantized' with 8-bit int weights"),
    ({"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "config_groups": {"group_0": {
        "weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group"}, "targets": ["Linear"]}}},
     UnsupportedFeatureError, "'nvfp4-pack-quantized' with 4-bit float weights"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"group_0": {
        "weights": {"num_bits": 8, "type": "float", "strategy": "token"}, "targets": ["Linear"]}}},
     UnsupportedFeatureError, "weight strategy 'token'"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized"}, ConfigError, "needs 'config_groups'"),
    ({**FP8_BLOCK, "fmt": "e3m4"}, UnsupportedFeatureError, "FP8 fmt 'e3m4'"),
    ({**FP8_BLOCK, "scale_fmt": "ue8m0"}, UnsupportedFeatureError, "scale_fmt 'ue8m0'"),
    ({**FP8_BLOCK, "weight_block_size": [128]}, ConfigError, "weight_block_size must be two positive integers"),
])
def test_other_schemes_are_refused_by_name(section, error, words):
    with pytest.raises(error, match=words):
        QuantConfig.from_config({"quantization_config": section})


def _bfloat16_original(src, dequantized, folder) -> None:
    """The float checkpoint an FP8 release compresses, in bfloat16: its quantized layers' dequantized weights."""
    shutil.copytree(src, folder)
    tensors = {**load_file(str(src / "model.safetensors")),
               **{n: w.astype(ml_dtypes.bfloat16) for n, w in dequantized.items()}}
    save_file(tensors, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))


@pytest.mark.parametrize("source, block", [("llama", (32, 48)), ("float_moe", (24, 24))])
def test_quantize_packs_an_fp8_source_as_its_bfloat16_original(request, tmp_path, source, block):
    """DeepSeek-V3's and Kimi K2's releases exist only in FP8: `ferrum quantize` decodes each weight, casts it
    to the model's dtype and packs it, writing byte for byte what quantizing the bfloat16 original writes
    (layers left in float, such as Llama's 80-wide down_proj at group size 32 or 64, in bfloat16 too)."""
    src = request.getfixturevalue(source)
    dequantized = write_fp8(tmp_path / "fp8", src, {**FP8_BLOCK, "weight_block_size": list(block)}, "block", block)
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    (tmp_path / "fp8" / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    _bfloat16_original(src, dequantized, tmp_path / "bf16")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".* stay in float", UserWarning)  # float-kept matrices, both sides
        ours = ferrum.quant.quantize_checkpoint(tmp_path / "fp8", tmp_path / "from_fp8", bits=4, group_size=32)
        ref = ferrum.quant.quantize_checkpoint(tmp_path / "bf16", tmp_path / "from_bf16", bits=4, group_size=32)
    got, want = load_file(str(ours / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert sorted(got) == sorted(want) and not any("scale_inv" in name for name in got)
    assert any(w.dtype.name == "bfloat16" and w.ndim == 2 for n, w in got.items() if not n.endswith(".scales"))
    for name in want:
        assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name]), name
    assert json.loads((ours / "config.json").read_text()) == json.loads((ref / "config.json").read_text())
    assert np.isfinite(ferrum.load(ours, backend="cpu").model.forward_verify("s", TOKENS)).all()


def test_quantize_refuses_an_fp8_weight_without_its_scale(llama, tmp_path):
    module = "model.layers.0.self_attn.q_proj"
    write_fp8(tmp_path / "fp8", llama, FP8_BLOCK, "block", (128, 128),
              change=lambda t: t.pop(f"{module}.weight_scale_inv"))
    with pytest.raises(CheckpointError, match=f"tensor {module}.weight is F8_E4M3; .* FP8 ones with their scales"):
        ferrum.quant.quantize_checkpoint(tmp_path / "fp8", tmp_path / "out")
    assert not (tmp_path / "out").exists()
