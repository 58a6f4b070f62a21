"""The torch backend's native quantized ops (ferrum_cuda.quant) against the packed form's float reference."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import ferrum  # noqa: E402
from ferrum.backends import load_backend  # noqa: E402
from ferrum.errors import BackendError  # noqa: E402
from ferrum.quant import QuantizedWeight, dequantize, quantize  # noqa: E402
from ferrum.quant.affine import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES  # noqa: E402
from ferrum.random_checkpoint import write_random_checkpoint  # noqa: E402
from ferrum.sampling import SamplingParams  # noqa: E402
from ferrum.weights import runs_natively  # noqa: E402

ops = pytest.importorskip("ferrum_cuda.ops")
from ferrum_cuda import quant  # noqa: E402

SCALE_DTYPES = ("float16", "bfloat16", "float32")
TOLERANCE = {"float32": 2e-5, "bfloat16": 4e-2}


def scaled_error(got, ref) -> float:
    return float(np.abs(got - ref).max() / max(1.0, float(np.abs(ref).max())))


def packed(bits: int, gs: int, n: int = 33) -> QuantizedWeight:
    """An awkward matrix: ``n`` outputs (not a multiple of 16), ``K = 3 * max(gs, 32)`` inputs."""
    rng = np.random.default_rng(10 * bits + gs)
    w = rng.standard_normal((n, 3 * max(gs, 32))).astype(np.float32) * 0.1
    return quantize(w, bits, gs, SCALE_DTYPES[(bits + gs) % 3])


def to_numpy(t) -> np.ndarray:
    return t.double().cpu().numpy()


def on_device(array: np.ndarray, dtype: str | None = None):
    t = torch.from_numpy(array)
    return t.to(ops.DEVICE) if dtype is None else t.to(ops.DEVICE, getattr(torch, dtype))


def int4_expected(bits: int, gs: int, dtype: str) -> str:
    """The path the module docstring promises, where the kernels passed their self-test."""
    if dtype != "bfloat16" or gs == 16 or not quant.int4_status(ops.DEVICE)[0]:
        return "dequantize"
    return "int4pack" if bits <= 4 else "int4pack x2"


@pytest.fixture(autouse=True)
def fresh_self_test():
    """Tests that fake a kernel failure must not leak their verdict."""
    yield
    quant.int4_status.cache_clear()


# ------------------------------------------------------------------ ops


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("gs", SUPPORTED_GROUP_SIZES)
def test_dequantize_path_is_bit_exact_in_float32(bits, gs):
    w = packed(bits, gs)
    placed = ops.quantized_upload("w", w, "float32", "linear")
    assert placed.path == "dequantize"
    assert np.array_equal(quant.dense(placed, torch.float32).cpu().numpy(), dequantize(w))


@pytest.mark.parametrize("dtype", ("float32", "bfloat16"))
def test_dequantize_path_in_row_chunks(monkeypatch, dtype):
    monkeypatch.setattr(quant, "_CHUNK_ELEMENTS", 5 * 96)  # 5 rows a chunk, 7 chunks
    w = packed(3, 32)
    placed = ops.quantized_upload("w", w, dtype, "embedding")
    assert torch.equal(quant.dense(placed, getattr(torch, dtype)), on_device(dequantize(w), dtype))


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("gs", SUPPORTED_GROUP_SIZES)
@pytest.mark.parametrize("dtype", ("float32", "bfloat16"))
@pytest.mark.parametrize("n", (33, 40))
def test_linear_matches_the_dequantized_reference(bits, gs, dtype, n):
    w = packed(bits, gs, n)
    placed = ops.quantized_upload("w", w, dtype, "linear")
    assert placed.path == int4_expected(bits, gs, dtype)
    rng = np.random.default_rng(bits)
    x = on_device(rng.standard_normal((5, w.shape[1])).astype(np.float32), dtype)
    bias = on_device(rng.standard_normal(n).astype(np.float32), dtype)
    dense = dequantize(w).astype(np.float64)
    for b in (None, bias):
        got = ops.quantized_linear(x, placed, b)
        assert got.dtype == x.dtype and got.shape == (5, n) and got.is_contiguous()
        ref = to_numpy(x) @ dense.T + (0.0 if b is None else to_numpy(b))
        assert scaled_error(to_numpy(got), ref) <= TOLERANCE[dtype]


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("gs", SUPPORTED_GROUP_SIZES)
def test_embedding_rows(bits, gs):
    w = packed(bits, gs)
    ids = np.array([5, 0, 32, 5, 17], dtype=np.int32)
    ref = dequantize(w)[ids]
    rows = ops.quantized_embedding(ops.quantized_upload("e", w, "float32", "embedding"), on_device(ids))
    assert rows.dtype == torch.float32 and np.array_equal(rows.cpu().numpy(), ref)
    tied = ops.quantized_upload("e", w, "bfloat16", "tied")
    assert torch.equal(ops.quantized_embedding(tied, on_device(ids)), on_device(ref, "bfloat16"))


def test_roles_keep_only_the_forms_they_need():
    if not quant.int4_status(ops.DEVICE)[0]:
        pytest.skip(quant.int4_status(ops.DEVICE)[1])
    w = packed(4, 32, n=48)
    linear = ops.quantized_upload("w", w, "bfloat16", "linear")
    embedding = ops.quantized_upload("w", w, "bfloat16", "embedding")
    tied = ops.quantized_upload("w", w, "bfloat16", "tied")
    assert linear.int4 is not None and linear.rows is None
    assert embedding.int4 is None and embedding.rows is not None
    assert tied.int4 is not None and tied.rows is not None
    assert tied.nbytes == linear.nbytes + embedding.nbytes  # the extra memory of a tied head
    assert linear.nbytes < w.shape[0] * w.shape[1]  # packed: under one byte a weight
    with pytest.raises(BackendError, match="role 'linear'"):
        ops.quantized_embedding(linear, on_device(np.zeros(1, np.int32)))
    with pytest.raises(BackendError, match="cannot run in float32"):
        ops.quantized_linear(on_device(np.zeros((1, w.shape[1]), np.float32)), linear, None)
    with pytest.raises(BackendError, match="unknown quantized weight role"):
        ops.quantized_upload("w", w, "bfloat16", "head")
    # float32 compute: one row form serves both uses.
    f32 = ops.quantized_upload("w", w, "float32", "tied")
    assert f32.int4 is None and f32.nbytes == embedding.nbytes


@pytest.mark.parametrize("bits", (3, 4, 8))
def test_tied_weight_reads_rows_from_the_int4_layout_where_readable(bits):
    """With 64-row blocks (AVX-512) a tied head needs no second, row-gatherable copy."""
    if not quant.int4_status(ops.DEVICE)[0]:
        pytest.skip(quant.int4_status(ops.DEVICE)[1])
    w = packed(bits, 32, n=128)
    tied = ops.quantized_upload("w", w, "bfloat16", "tied")
    readable = quant.int4_layout_readable(ops.DEVICE)
    assert (tied.rows is None) == readable
    ids = np.array([0, 31, 32, 63, 64, 127, 5], np.int32)
    rows = to_numpy(ops.quantized_embedding(tied, on_device(ids)))
    assert scaled_error(rows, dequantize(w)[ids]) <= TOLERANCE["bfloat16"]


@pytest.mark.parametrize("bits", (2, 4, 6, 8))
@pytest.mark.parametrize("n", (128, 40))
def test_long_inputs_take_a_dense_gemm_with_the_same_result(bits, n):
    """Prefill-sized inputs dequantize the int4 weight once (where its layout is readable)."""
    if not quant.int4_status(ops.DEVICE)[0]:
        pytest.skip(quant.int4_status(ops.DEVICE)[1])
    w = packed(bits, 64, n=n)
    weight = ops.quantized_upload("w", w, "bfloat16", "linear")
    x = np.random.default_rng(bits).standard_normal((quant._DENSE_ROWS + 7, w.shape[1])).astype(np.float32)
    bias = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    xb, bb = on_device(x, "bfloat16"), on_device(bias, "bfloat16")
    ref = to_numpy(xb) @ dequantize(w).astype(np.float64).T + to_numpy(bb)
    long = to_numpy(ops.quantized_linear(xb, weight, bb))
    assert long.shape == ref.shape and scaled_error(long, ref) <= TOLERANCE["bfloat16"]
    short = to_numpy(ops.quantized_linear(xb[:3], weight, bb))  # the int4 kernel
    assert scaled_error(long[:3], short) <= TOLERANCE["bfloat16"]


def test_int4pack_conversion_in_row_chunks_equals_the_whole():
    if not quant.int4_status(ops.DEVICE)[0]:
        pytest.skip(quant.int4_status(ops.DEVICE)[1])
    w = packed(8, 64, n=200)
    placed = ops.quantized_upload("w", w, "float32", "embedding")
    whole = quant._int4_form(placed.rows, 8, 64)
    chunked = quant._int4_form(placed.rows, 8, 64, pack_rows=64)
    assert torch.equal(whole.packed, chunked.packed)
    assert torch.equal(whole.scales_and_zeros, chunked.scales_and_zeros)


def test_backend_info_declares_every_format_natively():
    info = ops.backend_info()
    assert set(info.quant_formats) == {(b, g) for b in SUPPORTED_BITS for g in SUPPORTED_GROUP_SIZES}
    if not ops.IS_CUDA:  # the CPU wheel's kernels pass their self-test on x86 and Arm
        assert info.quantized_dtype == "bfloat16" and quant.int4_status(ops.DEVICE) == (True, "")
    backend = load_backend("cuda")
    assert all(runs_natively(backend.ops, b, g) for b, g in info.quant_formats)


@pytest.mark.parametrize(
    "fault, words",
    [("raise", "unusable on {} (RuntimeError: no kernel here)"), ("wrong", "differ from the dequantized")],
)
def test_failed_int4_self_test_falls_back_to_dequantize(monkeypatch, fault, words):
    def broken(x, form, group_size):
        if fault == "raise":
            raise RuntimeError("no kernel here\nsecond line")
        return torch.zeros(x.shape[0], form.scales_and_zeros.shape[1], dtype=x.dtype, device=x.device)

    monkeypatch.setattr(quant, "_int4_mm", broken)
    quant.int4_status.cache_clear()
    info = ops.backend_info()
    assert words.format(ops.DEVICE) in info.note and "dequantized instead" in info.note
    assert info.quantized_dtype is None
    w = packed(4, 32)
    placed = ops.quantized_upload("w", w, "bfloat16", "linear")
    assert placed.path == "dequantize"
    x = on_device(np.ones((2, w.shape[1]), np.float32), "bfloat16")
    ref = to_numpy(x) @ dequantize(w).astype(np.float64).T
    assert scaled_error(to_numpy(ops.quantized_linear(x, placed, None)), ref) <= TOLERANCE["bfloat16"]


def test_a_shape_the_kernel_refuses_takes_the_dequantize_path(monkeypatch):
    monkeypatch.setattr(quant, "_pack_int4", lambda q: None)
    assert "refused" in quant.int4_status(ops.DEVICE)[1]
    monkeypatch.setattr(quant, "int4_status", lambda device: (True, ""))
    w = packed(5, 64)
    placed = ops.quantized_upload("w", w, "bfloat16", "linear")
    assert placed.path == "dequantize" and placed.rows is not None
    x = on_device(np.ones((2, w.shape[1]), np.float32), "bfloat16")
    ref = to_numpy(x) @ dequantize(w).astype(np.float64).T
    assert scaled_error(to_numpy(ops.quantized_linear(x, placed, None)), ref) <= TOLERANCE["bfloat16"]


# ------------------------------------------------------------------ a checkpoint end to end

TINY = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=128, intermediate_size=192,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=200,
    max_position_embeddings=256, rope_theta=10000.0,
)


def write_quantized_checkpoint(folder, bits: int, gs: int, tied: bool, dtype: str):
    """A random checkpoint with every Linear and the embedding packed, in mlx-lm's layout."""
    from safetensors.numpy import load_file, save_file

    write_random_checkpoint(folder, {**TINY, "tie_word_embeddings": tied}, dtype=dtype, std=0.2)
    tensors = load_file(str(folder / "model.safetensors"))
    out = {}
    for name, array in tensors.items():
        if array.ndim == 2:  # projections, the embedding and an untied head
            module = name.removesuffix(".weight")
            q = quantize(array, bits, gs)
            out.update({name: q.packed, f"{module}.scales": q.scales, f"{module}.biases": q.biases})
        else:
            out[name] = array
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization"] = config["quantization_config"] = {"group_size": gs, "bits": bits, "mode": "affine"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "bits, gs, tied, dtype",
    [(4, 32, True, "bfloat16"), (6, 64, False, "float16"), (3, 16, True, "float32"), (8, 32, False, "bfloat16")],
)
def test_quantized_checkpoint_matches_the_core_reference(tmp_path, bits, gs, tied, dtype):
    folder = write_quantized_checkpoint(tmp_path / "q", bits, gs, tied, dtype)
    prompt = [int(t) for t in np.random.default_rng(1).integers(2, 200, size=11)]
    reference = ferrum.load(folder, backend="cpu", dtype="float32")
    ref = reference.model.forward_verify("s", prompt)

    exact = ferrum.load(folder, backend="cuda", dtype="float32")
    assert scaled_error(exact.model.forward_verify("s", prompt), ref) <= 1e-4
    assert exact.model.layers[0].qkv.linears[0].weight.path == "dequantize"

    fast = ferrum.load(folder, backend="cuda")  # the quantized default: bfloat16 where the int4 kernels work
    assert fast.model.dtype == "bfloat16" or not quant.int4_status(ops.DEVICE)[0]
    assert fast.model.layers[0].mlp.down.weight.path == int4_expected(bits, gs, fast.model.dtype)
    assert isinstance(fast.model.embed, quant.TorchQuantized)
    assert scaled_error(fast.model.forward_verify("s", prompt), ref) <= 1.5e-1
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    want = reference.run([prompt], params)[0].token_ids
    assert exact.run([prompt], params)[0].token_ids == want
    if fast.run([prompt], params)[0].token_ids != want:  # a near-tie may flip in bfloat16: then teacher-force
        ref = reference.model.forward_verify("t", prompt + want)
        assert scaled_error(fast.model.forward_verify("t", prompt + want), ref) <= 1.5e-1
