"""Projections fused at load (q/k/v and gate/up as one matrix, then ``split``) give the logits of the unfused model,
and blocks compiled by the backend (``compile_fn``: MLX, CUDA graphs) those of the plain ones.

The unfused model is the same checkpoint on a plugin without ``split`` (the numpy ops minus that one op), so
the two differ only in how the projections are stored and applied. Checkpoints cover separate projections
with biases (Qwen2) and q/k norms (Qwen3), Phi-3's fused layout with partial rotary and longrope (whose row
permutation and scaling apply per member before fusing), and packed weights, including a group whose members
are packed at different bit widths, which stays unfused.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from ferrum.arch.tensors import Fuser
from ferrum.config import ModelConfig
from ferrum.model import DecoderOnlyLLM, ForwardItem, weight_shapes
from ferrum.quant import QuantizedWeight

from support import cpu_like_plugin, runnable_backends, write_arch_checkpoint

TOKENS = [int(t) for t in np.random.RandomState(2).randint(0, 97, size=11)]


def logits(folder, backend: str) -> tuple[DecoderOnlyLLM, np.ndarray]:
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    return model, model.forward_verify("x", TOKENS)


@pytest.fixture
def nosplit(registered):
    registered("nosplit", cpu_like_plugin("nosplit", omit=("split",)))
    return "nosplit"


def assert_same(fused: np.ndarray, unfused: np.ndarray) -> None:
    bound = 1e-5 * max(1.0, float(np.abs(unfused).max()))
    assert float(np.abs(fused - unfused).max()) <= bound


def phi3_checkpoint(folder):
    from ferrum.random_checkpoint import write_random_checkpoint
    from ferrum.testing.family_checks import FAMILY_MODELS

    return write_random_checkpoint(folder, FAMILY_MODELS["phi3"], dtype="float32", std=0.2)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "phi3"])
def test_fused_projections_give_the_unfused_logits(arch, nosplit, tmp_path):
    folder = tmp_path / arch
    if arch == "phi3":
        phi3_checkpoint(folder)
    else:
        write_arch_checkpoint(folder, arch)
    fused_model, fused = logits(folder, "cpu")
    unfused_model, unfused = logits(folder, nosplit)
    for layer in fused_model.layers:
        assert len(layer.qkv.linears) == 1 and len(layer.mlp.gate_up.linears) == 1
    for layer in unfused_model.layers:
        assert len(layer.qkv.linears) == 3 and len(layer.mlp.gate_up.linears) == 2
    assert (fused_model.layers[0].qkv.linears[0].bias is not None) == (arch == "qwen2")
    assert_same(fused, unfused)


def test_packed_members_fuse_when_their_formats_agree(nosplit, tmp_path):
    """8-bit everywhere except layer 0's v_proj at 4 bits: that layer's q/k/v stay three matrices."""
    from safetensors.numpy import load_file, save_file

    from ferrum.quant.convert import quantize_checkpoint

    write_arch_checkpoint(tmp_path / "base", "llama")
    packed = quantize_checkpoint(tmp_path / "base", tmp_path / "q8", bits=8, group_size=32)
    four = load_file(quantize_checkpoint(tmp_path / "base", tmp_path / "q4", bits=4, group_size=32)
                     / "model.safetensors")
    tensors = load_file(packed / "model.safetensors")
    module = "model.layers.0.self_attn.v_proj"
    tensors.update({f"{module}.{part}": four[f"{module}.{part}"] for part in ("weight", "scales", "biases")})
    save_file(tensors, packed / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((packed / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        if key in config:
            config[key][module] = {"group_size": 32, "bits": 4}
    (packed / "config.json").write_text(json.dumps(config))

    fused_model, fused = logits(packed, "cpu")
    assert [len(layer.qkv.linears) for layer in fused_model.layers] == [3, 1]
    assert [len(layer.mlp.gate_up.linears) for layer in fused_model.layers] == [1, 1]
    assert_same(fused, logits(packed, nosplit)[1])


def test_fuser_holds_members_until_the_group_is_complete(tmp_path):
    write_arch_checkpoint(tmp_path / "base", "qwen2")
    config = ModelConfig.from_file(tmp_path / "base")
    shapes = weight_shapes(config)
    fuser = Fuser(config, shapes)
    rng = np.random.default_rng(0)
    stem = "model.layers.1.self_attn."
    members = {f"{stem}{m}.{p}": rng.standard_normal(shapes[f"{stem}{m}.{p}"]).astype(np.float32)
               for m in ("v_proj", "q_proj", "k_proj") for p in ("bias", "weight")}
    out = [fuser.add(name, tensor) for name, tensor in members.items()]
    assert out[:-1] == [[]] * 5  # nothing leaves before the last member arrives
    fused = dict(out[-1])
    assert set(fused) == {f"{stem}qkv_proj.weight", f"{stem}qkv_proj.bias"}
    for part in ("weight", "bias"):
        expected = np.concatenate([members[f"{stem}{m}.{part}"] for m in ("q_proj", "k_proj", "v_proj")])
        np.testing.assert_array_equal(fused[f"{stem}qkv_proj.{part}"], expected)
    norm = np.ones(config.hidden_size, np.float32)
    assert fuser.add("model.layers.1.input_layernorm.weight", norm)[0][1] is norm  # outside any group: passed on


def test_packed_members_of_different_formats_come_back_as_they_were(tmp_path):
    write_arch_checkpoint(tmp_path / "base", "llama")
    config = ModelConfig.from_file(tmp_path / "base")
    fuser = Fuser(config, weight_shapes(config))
    stem = "model.layers.0.mlp."

    def packed(bits: int) -> QuantizedWeight:
        k, rows = config.hidden_size, config.intermediate_size
        return QuantizedWeight(np.zeros((rows, k * bits // 32), np.uint32), np.ones((rows, k // 32), np.float16),
                               np.zeros((rows, k // 32), np.float16), bits, 32)

    gate, up = packed(4), packed(8)
    assert fuser.add(f"{stem}gate_proj.weight", gate) == []
    assert fuser.add(f"{stem}up_proj.weight", up) == [(f"{stem}gate_proj.weight", gate), (f"{stem}up_proj.weight", up)]


def compiling_backend(name: str):
    """The backend ``name`` if its ``compile_fn`` compiles here (MLX; torch on a GPU: CUDA graphs), else skip."""
    from ferrum.backends import load_backend

    if name not in runnable_backends():
        pytest.skip(f"the {name} backend cannot run here")
    backend = load_backend(name)
    if name == "cuda" and not backend.info.device.startswith("cuda"):
        pytest.skip(f"{name} compiles nothing on {backend.info.device}")
    return backend


@pytest.mark.parametrize("name", ["mlx", "cuda"])
@pytest.mark.parametrize("arch", ["qwen3", "phi3"])
def test_compiled_blocks_give_the_plain_logits(name, arch, tmp_path):
    """MLX compiles each block's work around attention (``compile_fn``) for decode-sized batches and the torch
    backend on a GPU replays it from CUDA graphs; a table whose ``compile_fn`` is the core's (the function
    itself) runs the same ops one by one. Batches of 11, 2, 4, 3 (padded to the size just compiled, whose
    extra row holds the last call's values) and 1 tokens; each pass's logits are read only after the last
    pass, so they must not be a buffer that a later compiled call reuses."""
    compiling_backend(name)
    from ferrum.backends import load_backend

    folder = tmp_path / arch
    if arch == "phi3":
        phi3_checkpoint(folder)
    else:
        write_arch_checkpoint(folder, arch)
    plain_backend = load_backend(name)
    plain_backend.ops.compile_fn = plain_backend.ops.fallback["compile_fn"]
    outputs = []
    for backend in (name, plain_backend):
        model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
        got = [model.forward_verify("a", TOKENS)]  # 11 tokens
        for step, seqs in enumerate(("ab", "abcd", "abc", "c")):
            items = []
            for s in seqs:
                cached = model.kv.length(s) if s in model.kv else 0
                items.append(ForwardItem(s, [7 + step], cached))
            got.append(model.forward(items).logits)
        outputs.append([got[0], *(model.ops.to_numpy(logits) for logits in got[1:])])
    for compiled, plain in zip(*outputs):
        assert_same(compiled, plain)


def test_a_compile_fn_that_reuses_its_outputs_leaves_every_pass_its_own_logits(tmp_path):
    """``compile_fn`` may hand back views of buffers that its next call of the same shape overwrites (CUDA
    graphs do). Emulated on numpy for every backend's sake: the blocks still chain correctly, and a pass's
    logits, read after later passes of the same sizes, are still its own."""
    from ferrum.backends import load_backend

    def reusing(fn):
        buffers: dict = {}

        def call(*args):
            outs = fn(*args)
            kept = buffers.setdefault(tuple(a.shape for a in args), [np.empty_like(o) for o in outs])
            for buffer, out in zip(kept, outs):
                buffer[...] = out
            return tuple(kept)

        return call

    write_arch_checkpoint(tmp_path, "qwen3")
    reused = load_backend("cpu")
    reused.ops.compile_fn = reusing
    outputs = []
    for backend in ("cpu", reused):
        model = DecoderOnlyLLM.from_pretrained(tmp_path, backend=backend, block_size=4)
        model.prefill("a", TOKENS[:5])
        model.prefill("b", TOKENS[2:9])
        passes = [model.forward([ForwardItem(s, [3 + step], model.kv.length(s)) for s in seqs]).logits
                  for step, seqs in enumerate(("ab", "a", "ab", "b"))]
        outputs.append(passes)
    for reused_logits, plain in zip(outputs[1], outputs[0]):
        assert_same(reused_logits, plain)


@pytest.mark.parametrize("name", ["mlx", "cuda"])
def test_a_block_that_reads_the_host_runs_eagerly(name):
    """A core fallback inside a block (e.g. MoE experts in a format MLX declines, or the torch backend's expert
    dispatch, which counts tokens per expert on the host) reads values on the host, which a compiled trace or a
    CUDA graph cannot hold: such a function runs as it is."""
    ops = compiling_backend(name).ops

    def host_round_trip(x):
        return (ops.add(ops.from_numpy(ops.to_numpy(x) * 2, "float32"), x),)

    fn = ops.compile_fn(host_round_trip)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the torch backend says the block runs eagerly
        for scale in (1, 5):  # a graph holding a stale result would return the first call's values
            x = scale * np.arange(6, dtype=np.float32).reshape(2, 3)
            np.testing.assert_array_equal(ops.to_numpy(fn(ops.from_numpy(x, "float32"))[0]), 3 * x)
