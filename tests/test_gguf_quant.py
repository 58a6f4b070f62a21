"""GGUF blocks repacked into the packed affine form: bitwise equal to gguf's own dequantization.

Reference: ``gguf.quants.dequantize`` (llama.cpp's Python reader) on the same
bytes; ``dequantize`` of the repacked weight must equal it exactly, evaluated in
float32, including after the q/k un-permutation and through ``convert_gguf``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from test_gguf_import import (  # noqa: E402
    HAVE_SMOLLM2,
    Q,
    dense_weights,
    gguf_blocks,
    needs_smollm2,
    random_blocks,
    write_tiny_gguf,
)

import ferrum  # noqa: E402
from ferrum import default_model  # noqa: E402
from ferrum.bench.runners import open_llama_cpp  # noqa: E402
from ferrum.config import ModelConfig  # noqa: E402
from ferrum.errors import CheckpointError, UnsupportedFeatureError  # noqa: E402
from ferrum.gguf_import import convert_gguf, unpermute_qk  # noqa: E402
from ferrum.quant.affine import QuantizedWeight, dequantize  # noqa: E402
from ferrum.quant.gguf import SUPPORTED_TYPES, describe, repack  # noqa: E402

#: type -> (bits, group size, scale dtype) of the repacked form.
FORMS = {
    Q.Q4_0: (4, 32, "float16"),
    Q.Q4_1: (4, 32, "float16"),
    Q.Q5_0: (5, 32, "float16"),
    Q.Q5_1: (5, 32, "float16"),
    Q.Q8_0: (8, 32, "float16"),
    Q.Q2_K: (2, 16, "float32"),
    Q.Q3_K: (3, 16, "float32"),
    Q.Q4_K: (4, 32, "float32"),
    Q.Q5_K: (5, 32, "float32"),
    Q.Q6_K: (6, 16, "float32"),
    Q.IQ4_NL: (8, 32, "float16"),
    Q.IQ4_XS: (8, 32, "float32"),
}
UNSUPPORTED = [Q.IQ2_XXS, Q.IQ3_S, Q.IQ1_M, Q.TQ1_0]


def reread(tmp_path: Path, tensors: dict[str, tuple[np.ndarray, object]]) -> dict:
    """Write ``name -> (data, type)`` with GGUFWriter and read the tensors back, as convert_gguf sees them."""
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def numpy_shape(t) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(list(t.shape)))


def reference(t) -> np.ndarray:
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(numpy_shape(t))


def test_supported_types_are_exactly_these():
    assert SUPPORTED_TYPES == {**{q.name: fmt[:2] for q, fmt in FORMS.items()}, "MXFP4": (4, 32)}


def test_mxfp4_keeps_its_codes_and_equals_gguf_dequantize(tmp_path):
    """gpt-oss's MXFP4 experts: the E2M1 codes and E8M0 exponents reordered into MLX's mxfp4 layout, whose
    decoding (``ferrum.quant.float_modes``) equals gguf's own dequantizer bit for bit, for gguf's quantization
    and for random blocks (every code and every finite exponent)."""
    from ferrum.quant.affine import FloatCodes
    from ferrum.quant.float_modes import decode

    rng = np.random.default_rng(39)
    shape = (24, 512)
    weights = (rng.standard_normal(shape) * rng.uniform(0.01, 3, (shape[0], 1))).astype(np.float32)
    random = random_blocks(shape, Q.MXFP4, rng)
    blocks = random.reshape(-1, 17)  # a uint8 exponent, then 16 bytes of codes
    blocks[:, 0] = rng.integers(100, 150, len(blocks), dtype=np.uint8)  # around 2 ** 0, none 0xFF (NaN)
    tensors = reread(tmp_path, {"quantized": (gguf_blocks(weights, Q.MXFP4, rng), Q.MXFP4),
                                "random": (random, Q.MXFP4)})
    for name, t in tensors.items():
        codes = repack(t.data, "MXFP4", shape, name)
        assert isinstance(codes, FloatCodes) and codes.mode == "mxfp4" and codes.scales.dtype == np.uint8
        assert codes.packed.shape == (24, 64) and codes.scales.shape == (24, 16)
        np.testing.assert_array_equal(dequantize(decode(codes.packed, codes.scales, "mxfp4", shape, name)),
                                      reference(t), err_msg=name)
    blocks[3, 0] = 0xFF
    with pytest.raises(CheckpointError, match=r"tensor blk\.0\.x \(MXFP4\) holds NaN block scales"):
        describe(random, "MXFP4", shape, "blk.0.x")


@pytest.mark.parametrize("qtype", list(FORMS), ids=lambda q: q.name)
def test_repack_equals_gguf_dequantize(tmp_path, qtype):
    """gguf's own quantization (where it has one) and random blocks (every bit pattern), both exact."""
    rng = np.random.default_rng(int(qtype))
    shape = (24, 512)
    weights = (rng.standard_normal(shape) * rng.uniform(0.01, 3, (shape[0], 1))).astype(np.float32)
    tensors = reread(tmp_path, {
        "quantized": (gguf_blocks(weights, qtype, rng), qtype),
        "random": (random_blocks(shape, qtype, rng), qtype),
    })
    bits, group_size, scale_dtype = FORMS[qtype]
    for name, t in tensors.items():
        assert numpy_shape(t) == shape
        packed = repack(t.data, t.tensor_type.name, shape, name)
        assert isinstance(packed, QuantizedWeight)
        assert (packed.bits, packed.group_size, packed.scale_dtype) == (bits, group_size, scale_dtype)
        assert packed.shape == shape
        np.testing.assert_array_equal(dequantize(packed), reference(t), err_msg=f"{qtype.name} {name}")


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q5_0], ids=lambda q: q.name)
def test_bias_overflowing_float16_falls_back_to_float32(qtype):
    """``-128 d`` (Q8_0), ``-8 d`` (Q4_0), ``-16 d`` (Q5_0) pass float16's 65504 for large ``d``: float32, exact."""
    rng = np.random.default_rng(3)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (4 * 2, size), dtype=np.uint8)
    d = np.full(len(raw), 0.01, dtype=np.float16)
    assert describe(_with_d(raw, d), qtype.name, (4, 2 * block), "t").dtype == "float16"
    d[5] = 60000.0  # finite in float16, but not once multiplied by 8/16/128
    raw = _with_d(raw, d)
    packed = repack(raw, qtype.name, (4, 2 * block), "t")
    assert packed.scale_dtype == "float32"
    np.testing.assert_array_equal(dequantize(packed), gguf.quants.dequantize(raw, qtype).reshape(4, 2 * block))


def _with_d(raw: np.ndarray, d: np.ndarray) -> np.ndarray:
    raw = raw.copy()
    raw[:, 0:2] = d.view(np.uint8).reshape(-1, 2)
    return raw


def test_q4_1_keeps_float16_for_any_finite_d():
    raw = np.random.default_rng(4).integers(0, 256, (4, 20), dtype=np.uint8)
    raw[:, 0:4] = np.array([[60000.0, -60000.0]] * 4, dtype=np.float16).view(np.uint8)
    packed = repack(raw, "Q4_1", (2, 64), "t")
    assert packed.scale_dtype == "float16"
    np.testing.assert_array_equal(dequantize(packed), gguf.quants.dequantize(raw, Q.Q4_1).reshape(2, 64))


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_non_finite_scales_are_refused(qtype):
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.zeros((2, size), dtype=np.uint8)
    at = 208 if qtype == Q.Q6_K else 0
    raw[1, at : at + 2] = np.array([np.inf], dtype=np.float16).view(np.uint8)
    with pytest.raises(CheckpointError, match=rf"tensor blk\.0\.x \({qtype.name}\) holds NaN or infinite"):
        describe(raw, qtype.name, (2, block), "blk.0.x")


@pytest.mark.parametrize("qtype", UNSUPPORTED, ids=lambda q: q.name)
def test_unsupported_types_are_refused_by_name(qtype):
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    message = rf"tensor blk\.3\.ffn_down\.weight is stored as GGUF {qtype.name}"
    with pytest.raises(UnsupportedFeatureError, match=message) as err:
        describe(np.zeros((4, size), dtype=np.uint8), qtype.name, (4, block), "blk.3.ffn_down.weight")
    assert "Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K" in str(err.value)
    assert "dequantize_to='float32'" in str(err.value)


@pytest.mark.parametrize(("qtype", "shape"), [(Q.Q4_0, (2, 48)), (Q.Q4_K, (2, 128)), (Q.Q8_0, (64,))])
def test_rows_must_be_whole_blocks(qtype, shape):
    with pytest.raises(CheckpointError, match=rf"not a matrix of whole {gguf.GGML_QUANT_SIZES[qtype][0]}-value"):
        describe(np.zeros(64, dtype=np.uint8), qtype.name, shape, "t")


def test_dense_types_keep_their_dtype(tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    w = np.random.default_rng(5).standard_normal((4, 64)).astype(np.float32)
    tensors = reread(tmp_path, {
        "f32": (w, Q.F32), "f16": (w.astype(np.float16), Q.F16), "bf16": (gguf.quants.quantize(w, Q.BF16), Q.BF16),
    })
    for name, dtype in (("f32", np.float32), ("f16", np.float16), ("bf16", ml_dtypes.bfloat16)):
        t = tensors[name]
        dense = repack(t.data, t.tensor_type.name, (4, 64), name)
        assert isinstance(dense, np.ndarray) and dense.dtype == dtype and dense.shape == (4, 64)
        np.testing.assert_array_equal(dense.astype(np.float32), reference(t))


# ------------------------------------------------------------------ through convert_gguf


@pytest.mark.parametrize("qtype", list(FORMS), ids=lambda q: q.name)
def test_every_type_through_convert_gguf(tmp_path, qtype):
    """Every matrix in one type, q/k un-permuted in packed form: equal to gguf's values and to the float32 import."""
    expected = write_tiny_gguf(tmp_path / "t.gguf", types={"weight": qtype}, hidden=256, inter=256)
    out = convert_gguf(tmp_path / "t.gguf", tmp_path / "packed")
    weights = dense_weights(out)
    as_float = dense_weights(convert_gguf(tmp_path / "t.gguf", tmp_path / "float", dequantize_to="float32"))
    assert set(weights) == set(expected) == set(as_float)
    for name, values in expected.items():
        np.testing.assert_array_equal(weights[name], values, err_msg=name)
        np.testing.assert_array_equal(as_float[name], values, err_msg=name)
    bits, group_size, scale_dtype = FORMS[qtype]
    config = ModelConfig.from_file(out)
    assert (config.quantization.bits, config.quantization.group_size) == (bits, group_size)
    assert not config.quantization.overrides
    assert config.torch_dtype == scale_dtype


def test_unpermuted_packed_rows_equal_unpermuted_reference(tmp_path):
    """The q/k row move applied to packed words, scales and biases equals it applied to the dense values."""
    tensors = reread(tmp_path, {"q": (random_blocks((64, 256), Q.Q6_K, np.random.default_rng(6)), Q.Q6_K)})
    t = tensors["q"]
    packed = repack(t.data, "Q6_K", (64, 256), "q")
    moved = QuantizedWeight(*(unpermute_qk(a, 4) for a in (packed.packed, packed.scales, packed.biases)), 6, 16)
    np.testing.assert_array_equal(dequantize(moved), unpermute_qk(reference(t), 4))


MIXED = {
    "weight": Q.Q4_K,  # the commonest: the default
    "embed_tokens.weight": Q.Q8_0,
    "mlp.down_proj.weight": Q.Q6_K,
    "self_attn.v_proj.weight": Q.Q5_0,
    "lm_head.weight": Q.F16,  # dense matrix: false
}


def test_mixed_file_config_and_logits_match_float32_import(tmp_path):
    expected = write_tiny_gguf(tmp_path / "m.gguf", types=MIXED, hidden=256, inter=256)
    packed = convert_gguf(tmp_path / "m.gguf", tmp_path / "packed")
    as_float = convert_gguf(tmp_path / "m.gguf", tmp_path / "float", dequantize_to="float32")

    raw = json.loads((packed / "config.json").read_text())
    assert raw["quantization"] == raw["quantization_config"] == {
        "group_size": 32, "bits": 4, "mode": "affine",
        "model.embed_tokens": {"group_size": 32, "bits": 8, "mode": "affine"},
        "model.layers.0.self_attn.v_proj": {"group_size": 32, "bits": 5, "mode": "affine"},
        "model.layers.0.mlp.down_proj": {"group_size": 16, "bits": 6, "mode": "affine"},
        "lm_head": False,
    }
    assert raw["torch_dtype"] == "float32"  # float16 and float32 scales mixed
    config = ModelConfig.from_file(packed)
    assert config.quantization.for_module("lm_head") is None
    assert config.quantization.for_module("model.layers.0.mlp.gate_proj") == (4, 32)
    from safetensors.numpy import load_file

    stored = load_file(str(packed / "model.safetensors"))
    assert stored["lm_head.weight"].dtype == np.float16
    assert stored["model.layers.0.self_attn.v_proj.scales"].dtype == np.float16
    assert stored["model.layers.0.self_attn.q_proj.scales"].dtype == np.float32
    weights = dense_weights(packed)
    for name, values in expected.items():
        np.testing.assert_array_equal(weights[name], values, err_msg=name)

    tokens = [1, 262, 70, 259, 5, 100, 42]
    logits = [ferrum.load(folder, backend="cpu").model.forward_verify("s", tokens) for folder in (packed, as_float)]
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-5, atol=1e-5 * np.abs(logits[1]).max())


@pytest.mark.parametrize("qtype", [Q.IQ2_XXS, Q.IQ3_S], ids=lambda q: q.name)
def test_unsupported_type_refused_before_writing(tmp_path, qtype):
    write_tiny_gguf(tmp_path / "x.gguf", types={"weight": Q.Q4_0, "mlp.down_proj.weight": qtype}, hidden=256, inter=256)
    message = rf"tensor blk\.0\.ffn_down\.weight is stored as GGUF {qtype.name}"
    with pytest.raises(UnsupportedFeatureError, match=message):
        convert_gguf(tmp_path / "x.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # The float route still reads it (gguf can dequantize these types).
    convert_gguf(tmp_path / "x.gguf", tmp_path / "float", dequantize_to="float32")


# ------------------------------------------------------------------ the default model


@needs_smollm2
def test_default_model_tensors_repack_bitwise():
    reader = gguf.GGUFReader(str(default_model.default_gguf_path()))
    chosen = [t for t in reader.tensors if t.name.startswith("blk.0.") or t.name == "token_embd.weight"]
    assert len(chosen) == 10
    for t in chosen:
        stored = repack(t.data, t.tensor_type.name, numpy_shape(t), t.name)
        if t.tensor_type in (Q.F32, Q.F16):
            assert isinstance(stored, np.ndarray) and t.name.endswith("norm.weight")
            np.testing.assert_array_equal(stored, reference(t), err_msg=t.name)
            continue
        assert stored.scale_dtype == "float16"
        np.testing.assert_array_equal(dequantize(stored), reference(t), err_msg=t.name)


#: How far below Ferrum's best token llama.cpp's greedy choice may lie. llama.cpp rounds activations to
#: 8 bits for its quantized dot products (Ferrum computes in float32, equal to transformers'), which moves
#: logits by up to ~1 and flips near-ties: measured gaps at such flips 0.08-0.22 on SmolLM2 prompts.
NEAR_TIE = 0.5


@pytest.mark.slow  # the default model through llama.cpp and Ferrum: ~10 s
@pytest.mark.skipif(not HAVE_SMOLLM2, reason=f"default model not installed ({default_model.INSTALL_COMMAND})")
def test_greedy_tokens_match_llama_cpp(tmp_path, monkeypatch):
    """Ferrum's greedy tokens are llama.cpp's on the same GGUF and ids, up to a near-tie llama.cpp's rounding flips."""
    pytest.importorskip("llama_cpp")

    monkeypatch.setenv("FERRUM_CACHE_DIR", str(tmp_path))
    llm = ferrum.load(default_model.default_model_path(), backend="cpu")
    prompt = llm.tokenizer.encode_chat([{"role": "user", "content": "What is 2+2?"}])
    assert_greedy_tokens_match_llama_cpp(llm, default_model.default_gguf_path(), prompt, 16)


@pytest.mark.parametrize("ftype", ["Q2_K", "Q3_K_S", "Q3_K_M"])
def test_llama_cpp_k_quant_mixes_match_llama_cpp(tmp_path, monkeypatch, ftype):
    """A float32 GGUF quantized by llama.cpp itself into its Q2_K / Q3_K mixes (every matrix a multiple of
    256 wide, so none falls back to Q4_0/Q5_0): Ferrum runs the packed file with the values of gguf's own
    dequantization, and picks llama.cpp's greedy tokens up to its near-ties."""
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp")
    monkeypatch.setenv("FERRUM_CACHE_DIR", str(tmp_path / "cache"))
    write_tiny_gguf(tmp_path / "f32.gguf", types={}, hidden=256, inter=512, std=0.1)  # activations of a real scale
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    packed = tmp_path / f"{ftype}.gguf"
    assert llama_cpp.llama_model_quantize(str(tmp_path / "f32.gguf").encode(), str(packed).encode(),
                                          ctypes.byref(params)) == 0
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(packed)).tensors}
    assert {"Q2_K", "Q3_K"} & types, types
    llm = ferrum.load(packed, backend="cpu")
    prompt = [5, 77, 100, 42, 9, 260, 13]
    floats = ferrum.load(convert_gguf(packed, tmp_path / "float", dequantize_to="float32"), backend="cpu")
    np.testing.assert_array_equal(llm.model.forward_verify("p", prompt), floats.model.forward_verify("f", prompt))
    assert_greedy_tokens_match_llama_cpp(llm, packed, prompt, 12)


def assert_greedy_tokens_match_llama_cpp(llm, gguf_path: Path, prompt: list[int], count: int) -> None:
    from ferrum.sampling import SamplingParams

    ours = list(llm.run([prompt], SamplingParams(max_tokens=count, ignore_eos=True))[0].token_ids)
    ref = open_llama_cpp(gguf_path, context=256, threads=2)
    theirs = []
    for token in ref.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
        theirs.append(token)
        if len(theirs) == count:
            break
    if ours != theirs:
        i = next(j for j, (a, b) in enumerate(zip(ours, theirs)) if a != b)
        logits = llm.model.forward_verify("check", prompt + ours[:i])[-1]
        gap = float(logits[ours[i]] - logits[theirs[i]])
        assert gap < NEAR_TIE, (
            f"token {i}: llama.cpp chose {theirs[i]}, {gap:.3f} logits below Ferrum's {ours[i]}\n"
            f"ours   {ours}\ntheirs {theirs}"
        )
