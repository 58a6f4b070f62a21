"""The packed affine form, quantized checkpoints in mlx-lm's layout, and running them on every backend."""

from __future__ import annotations

import gc
import json
import shutil

import numpy as np
import pytest

import ferrum
from ferrum.config import ModelConfig
from ferrum.errors import CheckpointError, ConfigError, MissingTensorError, UnsupportedFeatureError
from ferrum.quant import QuantConfig, QuantizedWeight, dequantize, float_modes, pack, quantize, unpack
from ferrum.quant.affine import SUPPORTED_BITS
from ferrum.quant.config import FLOAT_MODES
from ferrum.sampling import SamplingParams
from ferrum.weights import runs_natively

from support import runnable_backends, write_text_checkpoint, write_tiny_qwen3_moe, write_tokenizer

mx = pytest.importorskip("mlx.core")


def scaled_error(got, ref) -> float:
    return float(np.abs(got - ref).max() / max(1.0, float(np.abs(ref).max())))


# ------------------------------------------------------------------ the packed form


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("group_size", (32, 64, 128))
def test_quantize_is_bit_identical_to_mlx(bits, group_size):
    w = np.random.default_rng(bits * group_size).standard_normal((17, 3 * group_size)).astype(np.float32)
    q, scales, biases = (np.array(a) for a in mx.quantize(mx.array(w), group_size=group_size, bits=bits))
    ours = quantize(w, bits, group_size)
    assert np.array_equal(ours.packed, q) and np.array_equal(ours.scales, scales)
    assert np.array_equal(ours.biases, biases)
    mlx_dense = mx.dequantize(mx.array(q), mx.array(scales), mx.array(biases), group_size=group_size, bits=bits)
    assert np.array_equal(dequantize(ours), np.array(mlx_dense))


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_unpack_inverts_pack_and_orders_bits_lsb_first(bits):
    q = np.random.default_rng(bits).integers(0, 1 << bits, size=(5, 96), dtype=np.uint8)
    packed = pack(q, bits)
    assert packed.dtype == np.uint32 and packed.shape == (5, 96 * bits // 32)
    assert np.array_equal(unpack(packed, bits), q)
    # element 0 sits in the lowest bits of word 0, element 1 right above it
    assert int(packed[0, 0]) & ((1 << bits) - 1) == q[0, 0]
    assert (int(packed[0, 0]) >> bits) & ((1 << bits) - 1) == q[0, 1]


def test_quantized_weight_refuses_inconsistent_parts():
    good = quantize(np.ones((4, 64), np.float32), 4, 32)
    with pytest.raises(CheckpointError, match="describe"):
        QuantizedWeight(good.packed, good.scales[:, :1], good.biases[:, :1], 4, 32)
    with pytest.raises(CheckpointError, match="uint32"):
        QuantizedWeight(good.packed.astype(np.int64), good.scales, good.biases, 4, 32)
    with pytest.raises(ferrum.errors.InvalidRequestError, match="7-bit"):
        QuantizedWeight(good.packed, good.scales, good.biases, 7, 32)


# ------------------------------------------------------------------ config.json


def test_quant_config_reads_mlx_lm_sections_with_overrides():
    raw = {"quantization": {"group_size": 64, "bits": 4, "mode": "affine",
                            "model.layers.0.mlp.down_proj": {"group_size": 32, "bits": 6},
                            "lm_head": False}}
    quant = QuantConfig.from_config(raw)
    assert quant.for_module("model.layers.1.mlp.down_proj") == (4, 64)
    assert quant.for_module("model.layers.0.mlp.down_proj") == (6, 32)
    assert quant.for_module("lm_head") is None
    assert QuantConfig.from_config({"quantization_config": quant.to_json()}) == quant
    assert QuantConfig.from_config({}) is None


@pytest.mark.parametrize(
    "section, error, words",
    [
        ({"bits": 6, "group_size": 32, "mode": "fp6"}, UnsupportedFeatureError, "mode 'fp6'"),
        ({"bits": 4, "group_size": 64, "mode": "mxfp4"}, ConfigError, "mode 'mxfp4' is 4 bits in groups of 32"),
        ({"quant_method": "torchao", "quant_type": {}}, UnsupportedFeatureError, "quant_method 'torchao'"),
        ({"bits": 7, "group_size": 64}, UnsupportedFeatureError, "7-bit"),
        ({"bits": 4, "group_size": 48}, UnsupportedFeatureError, "group size 48"),
        ({"bits": "4", "group_size": 64}, ConfigError, "integer 'bits'"),
        ({"bits": 4, "group_size": 64, "model.layers.0.mlp": 3}, ConfigError, "false or an object"),
        ([4, 64], ConfigError, "must be an object"),
    ],
)
def test_quant_config_refuses_what_it_cannot_run_by_name(section, error, words):
    with pytest.raises(error, match=words):
        QuantConfig.from_config({"quantization": section})


def test_quant_config_reads_float_modes_per_module():
    raw = {"quantization": {"group_size": 32, "bits": 4, "mode": "mxfp4",
                            "lm_head": {"group_size": 64, "bits": 8, "mode": "affine"},
                            "model.layers.0.mlp.down_proj": {"mode": "mxfp8"}}}
    quant = QuantConfig.from_config(raw)
    assert (quant.mode_for("model.layers.1.mlp.up_proj"), quant.for_module("model.layers.1.mlp.up_proj")) == (
        "mxfp4", (4, 32))
    assert (quant.mode_for("lm_head"), quant.for_module("lm_head")) == ("affine", (8, 64))
    assert (quant.mode_for("model.layers.0.mlp.down_proj"),
            quant.for_module("model.layers.0.mlp.down_proj")) == ("mxfp8", (8, 32))
    assert QuantConfig.from_config({"quantization": quant.to_json()}) == quant


@pytest.mark.parametrize("raw", [{"quantization": {"bits": 4, "group_size": 64, "mode": ["affine"]}},
                                 {"quantization": {"bits": 4, "group_size": 64, "lm_head": {"mode": {}}}}])
def test_a_mode_that_is_not_a_name_is_a_config_error(raw):
    with pytest.raises(ConfigError, match="mode must be a name"):
        QuantConfig.from_config(raw)


@pytest.mark.parametrize("mode", FLOAT_MODES)
def test_float_modes_decode_bit_for_bit_as_mlx(mode):
    """Every code and scale byte (NaN codes and scales aside) gives MLX's own dequantized value exactly."""
    bits, group_size = FLOAT_MODES[mode]
    rng = np.random.default_rng(7)
    packed = rng.integers(0, 2**32, size=(24, 256 * bits // 32), dtype=np.uint64).astype(np.uint32)
    if mode == "mxfp8":  # E4M3's two NaN codes
        codes = packed.view(np.uint8)
        codes[(codes & 0x7F) == 0x7F] = 0x7E
    low, high = (1, 127) if mode == "nvfp4" else (90, 160)  # nvfp4: positive E4M3 scales short of NaN
    scales = rng.integers(low, high, size=(24, 256 // group_size)).astype(np.uint8)
    ref = np.array(mx.dequantize(mx.array(packed), mx.array(scales), mode=mode, dtype=mx.float32))
    got = float_modes.decode(packed, scales, mode, (24, 256), "test")
    if mode == "mxfp8":
        assert isinstance(got, np.ndarray)
    else:
        assert (got.bits, got.group_size) == (5, group_size)
        got = dequantize(got)
    np.testing.assert_array_equal(got, ref)


def test_nvfp4_rows_of_16_not_32_decode_dense_as_mlx():
    """An nvfp4 input size that 16 divides but 32 does not (80): five-bit codes would not fill whole words, so
    the matrix is dense float32 (a numpy error stopped the load), MLX's own values exactly."""
    rng = np.random.default_rng(3)
    packed = rng.integers(0, 2**32, size=(8, 80 * 4 // 32), dtype=np.uint64).astype(np.uint32)
    scales = rng.integers(1, 127, size=(8, 80 // 16)).astype(np.uint8)
    got = float_modes.decode(packed, scales, "nvfp4", (8, 80), "test")
    ref = np.array(mx.dequantize(mx.array(packed), mx.array(scales), mode="nvfp4", dtype=mx.float32))
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("backend", runnable_backends())
def test_nvfp4_checkpoint_with_inputs_of_16_not_32_matches_mlx_lm(backend, tmp_path):
    """mlx-lm packs a dense down_proj of 80 inputs and experts' of 48 in nvfp4 (groups of 16) and runs them."""
    from mlx_lm import convert, load

    from ferrum.random_checkpoint import write_random_checkpoint

    config = json.loads((write_tiny_qwen3_moe(tmp_path / "base") / "config.json").read_text())
    write_random_checkpoint(tmp_path / "float", {**config, "intermediate_size": 80, "moe_intermediate_size": 48,
                                                 "mlp_only_layers": [0]}, dtype="float32", std=0.3)
    write_tokenizer(tmp_path / "float")
    convert(str(tmp_path / "float"), mlx_path=str(tmp_path / "q"), quantize=True, q_mode="nvfp4")
    ref = np.array(load(str(tmp_path / "q"))[0](mx.array([FLOAT_MODE_TOKENS]))[0].astype(mx.float32))
    model = ferrum.load(tmp_path / "q", backend=backend, dtype="float32").model
    assert scaled_error(model.forward_verify("s", FLOAT_MODE_TOKENS), ref) <= 1e-4


def test_float_mode_nan_scales_and_shapes_are_refused():
    packed = np.zeros((4, 8), np.uint32)
    with pytest.raises(CheckpointError, match="mxfp4 scale is NaN"):
        float_modes.decode(packed, np.full((4, 2), 255, np.uint8), "mxfp4", (4, 64), "test")
    with pytest.raises(CheckpointError, match=r"uint8 scales \[4, 2\]"):
        float_modes.decode(packed, np.zeros((4, 2), np.float32), "mxfp4", (4, 64), "test")


# ------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def mlx_lm_4bit(tmp_path_factory):
    """A tiny text model quantized by mlx-lm itself (4 bits, group 32), and mlx-lm's logits for it."""
    from mlx_lm import convert, load

    root = tmp_path_factory.mktemp("quant")
    write_text_checkpoint(root / "float")
    convert(str(root / "float"), mlx_path=str(root / "q4"), quantize=True, q_group_size=32, q_bits=4)
    model, _ = load(str(root / "q4"))
    tokens = [0, 5, 9, 33, 77, 120, 201, 7]
    logits = np.array(model(mx.array([tokens]))[0].astype(mx.float32))
    return root / "q4", tokens, logits


@pytest.mark.parametrize("backend", runnable_backends())
def test_mlx_lm_checkpoint_matches_mlx_lm_on_every_backend(backend, mlx_lm_4bit):
    folder, tokens, ref = mlx_lm_4bit
    llm = ferrum.load(folder, backend=backend, dtype="float32")
    assert llm.model.config.quantization == QuantConfig(4, 32)
    assert scaled_error(llm.model.forward_verify("s", tokens), ref) <= 1e-4


def test_greedy_tokens_equal_across_backends(mlx_lm_4bit):
    folder, tokens, _ = mlx_lm_4bit
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    outputs = {b: ferrum.load(folder, backend=b, dtype="float32").run([tokens], params)[0].token_ids
               for b in runnable_backends()}
    first = next(iter(outputs.values()))
    assert all(out == first for out in outputs.values()), outputs


FLOAT_MODE_TOKENS = [0, 5, 9, 33, 77, 120, 201, 7]


def _mlx_lm_in_each_float_mode(float_folder) -> dict:
    """``float_folder`` quantized by mlx-lm in each float mode beside it: mode -> (folder, mlx-lm's logits)."""
    from mlx_lm import convert, load

    made = {}
    for mode in FLOAT_MODES:
        folder = float_folder.parent / mode
        convert(str(float_folder), mlx_path=str(folder), quantize=True, q_mode=mode)
        model, _ = load(str(folder))
        made[mode] = folder, np.array(model(mx.array([FLOAT_MODE_TOKENS]))[0].astype(mx.float32))
    return made


@pytest.fixture(scope="module")
def mlx_lm_float_modes(tmp_path_factory):
    """The tiny Llama in each float mode."""
    return _mlx_lm_in_each_float_mode(write_text_checkpoint(tmp_path_factory.mktemp("float_modes") / "float"))


@pytest.fixture(scope="module")
def mlx_lm_float_mode_moe(tmp_path_factory):
    """A tiny Qwen3-MoE in each float mode (experts stacked; mlx-lm keeps the router affine)."""
    return _mlx_lm_in_each_float_mode(write_tiny_qwen3_moe(tmp_path_factory.mktemp("float_mode_moe") / "float"))


@pytest.mark.parametrize("backend", runnable_backends())
def test_experts_packed_but_for_one_stack_match_mlx_lm_on_every_backend(backend, tmp_path):
    """An mlx-lm predicate may leave one expert stack float (here gate) and pack the others: the float stacks no
    longer take the grouped GEMM alone (CUDA sent the packed ones there and failed)."""
    from mlx_lm import convert, load

    float_folder = write_tiny_qwen3_moe(tmp_path / "float")
    convert(str(float_folder), mlx_path=str(tmp_path / "q"), quantize=True, q_bits=4, q_group_size=32,
            quant_predicate=lambda path, module: not path.endswith("switch_mlp.gate_proj"))
    ref = np.array(load(str(tmp_path / "q"))[0](mx.array([FLOAT_MODE_TOKENS]))[0].astype(mx.float32))
    model = ferrum.load(tmp_path / "q", backend=backend, dtype="float32").model
    assert scaled_error(model.forward_verify("s", FLOAT_MODE_TOKENS), ref) <= 1e-4


@pytest.mark.parametrize("models", ["mlx_lm_float_modes", "mlx_lm_float_mode_moe"])
@pytest.mark.parametrize("mode", FLOAT_MODES)
@pytest.mark.parametrize("backend", runnable_backends())
def test_float_mode_checkpoints_match_mlx_lm_on_every_backend(backend, mode, models, request):
    folder, ref = request.getfixturevalue(models)[mode]
    llm = ferrum.load(folder, backend=backend, dtype="float32")
    assert llm.model.config.quantization.mode == mode
    assert scaled_error(llm.model.forward_verify("s", FLOAT_MODE_TOKENS), ref) <= 1e-4


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4"])
def test_mlx_runs_fp4_modes_on_the_files_codes(mode, mlx_lm_float_modes, mlx_lm_float_mode_moe):
    """MLX keeps the file's codes and scales and runs its own kernels for the mode: every projection (q/k/v and
    gate/up fused) and every stack of experts in that mode, and the resident weights no larger than the file (the
    affine form is 6 bits a weight for mxfp4, 9 for nvfp4, against the file's 4.25 / 4.5)."""
    folder, _ = mlx_lm_float_modes[mode]
    model = ferrum.load(folder, backend="mlx", dtype="float32").model
    assert {getattr(p.weight, "mode", None) for p in model.projections()} == {mode}
    assert model.weight_bytes <= (folder / "model.safetensors").stat().st_size
    # the embedding's rows come in the compute dtype (the mode's own dequantize gives bfloat16, which ran
    # Gemma's embedding scale in bfloat16, and turned a float16 model's residual stream into float32)
    for dtype in ("float32", "float16"):
        model = ferrum.load(folder, backend="mlx", dtype=dtype).model
        rows = model.embed_lookup(model.embed, model.ops.from_numpy(np.array([1, 5], np.int32), None))
        assert str(rows.dtype) == f"mlx.core.{dtype}"
    moe = ferrum.load(mlx_lm_float_mode_moe[mode][0], backend="mlx", dtype="float32").model
    stacks = [getattr(layer.mlp.experts, p) for layer in moe.layers for p in ("gate", "up", "down")]
    assert {getattr(stack, "mode", None) for stack in stacks} == {mode}


def test_float_codes_follow_row_moves_and_not_scaling():
    from ferrum.arch import tensors

    w = mx.random.normal((64, 64))
    packed, scales = (np.array(a) for a in mx.quantize(w, mode="mxfp4")[:2])
    weight = float_modes.decode(packed, scales, "mxfp4", (64, 64), "test")
    other = float_modes.decode(packed[:32], scales[:32], "mxfp4", (32, 64), "test")
    fused = tensors.stack_rows([weight, other])
    np.testing.assert_array_equal(fused.float_codes.packed, np.concatenate([packed, packed[:32]]))
    np.testing.assert_array_equal(tensors.rows(fused, 64, 96).float_codes.scales, scales[:32])
    assert tensors.stack_rows([weight, quantize(np.array(w), 5, 32)]).float_codes is None  # not all have codes
    assert tensors.scaled(weight, 2.0).float_codes is None
    assert tensors._scale_rows(weight, np.full(64, 2.0)).float_codes is None


def test_nvfp4_experts_with_a_tensor_scale_are_refused_by_name(mlx_lm_float_mode_moe, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "nvfp4"
    shutil.copytree(mlx_lm_float_mode_moe["nvfp4"][0], folder)
    tensors = load_file(str(folder / "model.safetensors"))
    name = "model.layers.0.mlp.switch_mlp.up_proj.global_scale"
    tensors[name] = np.ones(4, np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"][name] = "model.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UnsupportedFeatureError, match=r"up_proj\.global_scale: nvfp4 experts with a tensor scale"):
        ferrum.load(folder, backend="cpu")


def test_packed_weights_stay_packed(mlx_lm_4bit):
    folder, _, _ = mlx_lm_4bit
    llm = ferrum.load(folder, backend="mlx")
    files = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert llm.model.weight_bytes <= files  # packed size, not the float size
    config = ModelConfig.from_file(folder)
    dense = sum(np.prod(s) for s in ferrum.model.weight_shapes(config).values()) * 4
    assert llm.model.weight_bytes < dense / 3
    [qkv] = llm.model.layers[0].qkv.linears  # q/k/v fused into one packed matrix
    assert qkv.weight.q.dtype == mx.uint32


def test_automatic_backend_runs_the_format_natively(mlx_lm_4bit):
    folder, _, _ = mlx_lm_4bit
    llm = ferrum.load(folder)
    assert runs_natively(llm.model.ops, 4, 32)


@pytest.fixture
def dense_budget(monkeypatch):
    """``budget(n)``: the core's reference may hold ``n`` bytes of dequantized matrices on the host, counted
    afresh for this test (models other tests keep alive do not count)."""
    from ferrum.backends import load_backend
    from ferrum.quant import reference

    memory = load_backend("cpu").info.memory_bytes
    monkeypatch.setattr(reference, "_budget", reference._DenseBudget())
    return lambda nbytes: monkeypatch.setattr(reference, "DENSE_SHARE", nbytes / memory)


def test_a_matrix_freed_while_the_budget_is_claimed_returns_its_bytes(monkeypatch):
    """A dequantized matrix's finalizer runs wherever the garbage collector does, inside a claim too: its bytes
    come back at the next claim, without waiting on the lock that claim holds (a load once deadlocked so)."""
    import threading

    from ferrum.quant import reference

    budget = reference._DenseBudget()
    assert budget.claim("cpu", 200, 60)  # of the 100 bytes allowed (half the memory)
    share = reference._dense_share

    def collected_meanwhile() -> float:  # as if collecting garbage freed the first matrix right here
        budget.release("cpu", 60)
        return share()

    monkeypatch.setattr(reference, "_dense_share", collected_meanwhile)
    claimed = []
    worker = threading.Thread(target=lambda: claimed.append(budget.claim("cpu", 200, 50)), daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert claimed == [True]  # finished, and with the 60 bytes back, 50 more fit in the 100 allowed


def test_without_quantized_ops_the_matrices_that_fit_are_dequantized_at_load(mlx_lm_4bit, dense_budget):
    """numpy has no low-bit kernels: within the budget each matrix is dequantized once at load (float
    memory, dense speed), past it kept packed and dequantized per use. Every mix computes the same numbers."""
    folder, tokens, ref = mlx_lm_4bit

    def load():
        model = ferrum.load(folder, backend="cpu").model
        return model.weight_bytes, model.forward_verify("s", tokens)

    dense_budget(0)
    packed_bytes, packed = load()
    dense_budget(1 << 40)
    dense_bytes, dense = load()
    assert packed_bytes <= sum(f.stat().st_size for f in folder.glob("*.safetensors")) < dense_bytes / 3
    assert np.array_equal(dense, packed) and scaled_error(dense, ref) <= 1e-4
    gc.collect()  # the dense model's matrices return their bytes
    dense_budget(dense_bytes // 2)
    mixed_bytes, mixed = load()
    assert packed_bytes < mixed_bytes < dense_bytes
    assert np.array_equal(mixed, packed)


def test_the_environment_sets_the_dense_share(mlx_lm_4bit, dense_budget, monkeypatch):
    folder, _, _ = mlx_lm_4bit
    dense_budget(1 << 40)
    monkeypatch.setenv("FERRUM_DEQUANTIZED_SHARE", "0")
    files = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert ferrum.load(folder, backend="cpu").model.weight_bytes <= files  # kept packed
    for bad in ("half", "1.5", "-0.1", "nan"):
        monkeypatch.setenv("FERRUM_DEQUANTIZED_SHARE", bad)
        with pytest.raises(ConfigError, match="FERRUM_DEQUANTIZED_SHARE"):
            ferrum.load(folder, backend="cpu")


def test_the_dense_budget_is_shared_by_live_models_and_freed_with_them(mlx_lm_4bit, dense_budget):
    folder, _, _ = mlx_lm_4bit
    dense_budget(0)
    packed_bytes = ferrum.load(folder, backend="cpu").model.weight_bytes
    dense_budget(1 << 40)
    dense_bytes = ferrum.load(folder, backend="cpu").model.weight_bytes
    gc.collect()
    dense_budget(dense_bytes)
    first = ferrum.load(folder, backend="cpu")
    assert first.model.weight_bytes == dense_bytes
    assert ferrum.load(folder, backend="cpu").model.weight_bytes == packed_bytes  # the first holds the budget
    del first
    gc.collect()
    assert ferrum.load(folder, backend="cpu").model.weight_bytes == dense_bytes


def _edit(folder, tmp_path, config_edit=None, drop=()):
    from safetensors.numpy import load_file, save_file

    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    config = json.loads((out / "config.json").read_text())
    if config_edit:
        config_edit(config)
    (out / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(out / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if k not in drop}, str(out / "model.safetensors"))
    return out


def test_a_top_level_format_the_tensors_do_not_follow_is_read_from_the_tensors(mlx_lm_4bit, tmp_path):
    """mlx-lm reads the format of every module config.json does not name from its tensors ("the top-level default
    can be wrong"), and so does Ferrum; a module's own entry that its tensors contradict is still refused."""
    folder, tokens, ref = mlx_lm_4bit

    def say_8_bits(config):
        config["quantization"]["bits"] = config["quantization_config"]["bits"] = 8

    llm = ferrum.load(_edit(folder, tmp_path / "top", say_8_bits), backend="cpu", dtype="float32")
    assert scaled_error(llm.model.forward_verify("s", tokens), ref) <= 1e-4

    def name_up_proj_8_bits(config):
        for section in ("quantization", "quantization_config"):
            config[section]["model.layers.1.mlp.up_proj"] = {"bits": 8, "group_size": 32}

    folder = _edit(folder, tmp_path / "entry", name_up_proj_8_bits)
    with pytest.raises(CheckpointError, match="up_proj is stored at 4 bits, group size 32, but config.json says 8"):
        ferrum.load(folder, backend="cpu")


def test_missing_biases_are_named(mlx_lm_4bit, tmp_path):
    folder = _edit(mlx_lm_4bit[0], tmp_path, drop=("model.layers.1.mlp.up_proj.biases",))
    with pytest.raises(CheckpointError, match=r"up_proj is packed without model.layers.1.mlp.up_proj.biases, its "
                       r"scales float32 \[.*is model.layers.1.mlp.up_proj.biases missing\?"):
        ferrum.load(folder, backend="cpu")


def test_a_missing_lm_head_of_an_untied_config_names_tie_word_embeddings(mlx_lm_4bit, tmp_path):
    """mlx-lm's models read a config without tie_word_embeddings as tied, transformers (and Ferrum) as untied: a
    conversion that lost the key and has no head gets advice about the key, not about missing shards."""
    def forget_the_tie(config):
        config.pop("tie_word_embeddings", None)

    head = ("lm_head.weight", "lm_head.scales", "lm_head.biases")
    with pytest.raises(MissingTensorError, match=r"lm_head.weight. Only the LM head is missing.*set "
                       r"\"tie_word_embeddings\": true in config.json"):
        ferrum.load(_edit(mlx_lm_4bit[0], tmp_path / "head", forget_the_tie, drop=head), backend="cpu")
    with pytest.raises(MissingTensorError, match="Check that the folder holds every shard"):  # more than the head
        ferrum.load(_edit(mlx_lm_4bit[0], tmp_path / "more", forget_the_tie,
                          drop=head + ("model.norm.weight",)), backend="cpu")


def _drop_entries(config):
    """A section left with its top level alone (the per-module entries of a mixed recipe dropped)."""
    for section in ("quantization", "quantization_config"):
        config[section] = {k: v for k, v in config[section].items() if k in ("bits", "group_size", "mode")}


@pytest.mark.parametrize("backend", runnable_backends())
def test_mixed_precision_without_its_entries_and_entries_without_bits_run_as_mlx_lm_runs_them(backend, tmp_path):
    """A mixed conversion (3- and 6-bit modules; nvfp4 experts beside affine ones) whose config.json names none of
    them, and entries mlx-lm hands MLX as a predicate wrote them, {"bits": 8} or {"group_size": 32}, which MLX fills
    with its defaults (group size 64, 4 bits): mlx-lm's logits."""
    from mlx_lm import convert, load

    dense, moe = write_text_checkpoint(tmp_path / "dense"), write_tiny_qwen3_moe(tmp_path / "moe")
    cases = {
        "mixed_3_6": (dense, dict(quant_predicate="mixed_3_6", q_group_size=32), _drop_entries),
        "modes_per_stack": (moe, dict(quant_predicate=lambda path, module: {"mode": "nvfp4", "group_size": 16,
                                                                            "bits": 4} if "gate_proj" in path else True,
                                      q_group_size=32), _drop_entries),
        "bits_alone": (dense, dict(quant_predicate=lambda path, module: {"bits": 8} if "q_proj" in path else True,
                                   q_group_size=32), None),
        "group_alone": (moe, dict(quant_predicate=lambda path, module: {"group_size": 32} if "switch_mlp" in path
                                  else {"bits": 8, "group_size": 32}, q_bits=6, q_group_size=64), None),
    }
    for case, (source, settings, edit) in cases.items():
        folder = tmp_path / case
        convert(str(source), mlx_path=str(folder), quantize=True, **settings)
        if edit is not None:
            folder = _edit(folder, tmp_path / f"{case}_edited", edit)
        ref = np.array(load(str(folder))[0](mx.array([FLOAT_MODE_TOKENS]))[0].astype(mx.float32))
        got = ferrum.load(folder, backend=backend, dtype="float32").model.forward_verify("s", FLOAT_MODE_TOKENS)
        assert scaled_error(got, ref) <= 1e-4, case


def test_packed_tensors_without_quantization_section_are_refused(mlx_lm_4bit, tmp_path):
    def drop_section(config):
        del config["quantization"], config["quantization_config"]

    folder = _edit(mlx_lm_4bit[0], tmp_path, drop_section)
    with pytest.raises(CheckpointError, match="no 'quantization' section"):
        ferrum.load(folder, backend="cpu")


def test_module_kept_float_by_config_but_packed_on_disk_is_refused(mlx_lm_4bit, tmp_path):
    def keep_head_float(config):
        config["quantization"]["lm_head"] = config["quantization_config"]["lm_head"] = False

    folder = _edit(mlx_lm_4bit[0], tmp_path, keep_head_float)
    with pytest.raises(CheckpointError, match="keeps lm_head in float"):
        ferrum.load(folder, backend="cpu")


def test_capabilities_report_native_formats():
    from ferrum.backends import load_backend
    from ferrum.capabilities import ExecutorCapabilities

    mlx_caps = ExecutorCapabilities.from_backend(load_backend("mlx"))
    assert (4, 64) in mlx_caps.quant_formats and (6, 16) in mlx_caps.quant_formats
    assert mlx_caps.quantization_summary() == "2,3,4,5,6,8-bit g16,32,64,128"
    cpu_caps = ExecutorCapabilities.from_backend(load_backend("cpu"))
    assert cpu_caps.quant_formats == () and cpu_caps.quantization_summary() == "fallback"


def test_group_size_16_runs_on_mlx_as_padded_groups_of_32():
    """GGUF's Q6_K sub-blocks: exact on MLX's kernels, at twice the packed memory."""
    from ferrum.backends import load_backend
    from ferrum.weights import place

    ops = load_backend("mlx").ops
    weight = quantize(np.random.default_rng(3).standard_normal((40, 96)).astype(np.float32), 6, 16)
    placed = place(ops, "w", weight, "float32", role="tied")
    assert placed.weight.padded and placed.nbytes == 2 * weight.packed.nbytes + weight.scales.nbytes * 2
    x = np.random.default_rng(4).standard_normal((5, 96)).astype(np.float32)
    got = ops.to_numpy(placed.linear(ops.from_numpy(x, "float32"), placed.weight, None))
    assert scaled_error(got, x @ dequantize(weight).T) <= 2e-5
    rows = ops.to_numpy(placed.embedding(placed.weight, ops.from_numpy(np.array([39, 0, 7], np.int32), None)))
    assert np.array_equal(rows, dequantize(weight)[[39, 0, 7]])


def test_automatic_choice_for_quantized_checkpoints_follows_native_formats(registered):
    """The first backend, in quantized order, whose kernels take the format."""
    from ferrum.backends import BackendInfo, BackendProbe, backend_for_format
    from ferrum.hookspec import hookimpl

    from support import cpu_like_plugin

    def plugin(priority, quantized_priority, formats):
        ns = cpu_like_plugin("x")

        @hookimpl
        def backend_probe():
            return BackendProbe(True, "cpu", priority=priority, quantized_priority=quantized_priority)

        @hookimpl
        def backend_info():
            return BackendInfo("x", "cpu", ("float32",), "float32", quant_formats=formats)

        ns.backend_probe, ns.backend_info = backend_probe, backend_info
        return ns

    registered("aa_fast_float", plugin(-20, None, ()))
    registered("ab_slow_quant", plugin(-10, 5, ((4, 32),)))
    registered("ac_best_quant", plugin(-5, -30, ((4, 32), (8, 32))))
    assert backend_for_format(4, 32).name == "ac_best_quant"  # quantized order beats priority
    assert backend_for_format(8, 32).name == "ac_best_quant"
    registered("a0_first_quant", plugin(-1, -40, ((4, 32),)))
    assert backend_for_format(4, 32).name == "a0_first_quant"
    assert backend_for_format(8, 32).name == "ac_best_quant"  # the first does not run 8 bits
