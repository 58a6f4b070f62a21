"""gpt-oss: attention sinks, biased experts with the clamped SwiGLU, YaRN and alternating sliding layers, read
from the layouts it ships in (transformers' float one, OpenAI's MXFP4 release, mlx-lm's conversion) and compared
with transformers and mlx-lm running the same weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ferrum.errors import CheckpointError, UnsupportedFeatureError
from ferrum.model import DecoderOnlyLLM

from support import (
    assert_generates_greedily_as_transformers, cpu_like_plugin, runnable_backends, write_tokenizer,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOKENS = [0, 5, 9, 33, 77, 120, 201, 7, 64, 3, 250, 18]
#: Small enough that the clamps bite: a quarter of the gate and up outputs lie beyond it with these weights.
LIMIT = 1.5


def _config(**extra):
    return transformers.GptOssConfig(**{
        "vocab_size": 300, "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4,
        "num_experts_per_tok": 2, "sliding_window": 4, "max_position_embeddings": 131072, "swiglu_limit": LIMIT,
        "bos_token_id": 0, "eos_token_id": 1, **extra})


def _random_model(seed: int = 0, **extra):
    torch.manual_seed(seed)
    config = _config(**extra)
    config._attn_implementation = "eager"
    model = transformers.GptOssForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 1.0 if "sinks" in name else 0.2)
    for module in model.modules():  # transformers 5.17 fixed the clamp at 7.0 whatever the config said (5.24 reads it)
        if type(module).__name__ == "GptOssExperts":
            module.limit = config.swiglu_limit
    return model


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt_oss")
    model = _random_model()
    model.save_pretrained(folder)
    write_tokenizer(folder)
    return folder, model


def _reference(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def _assert_close(got, want, tol=1e-4):
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(got - want).max() <= tol * scale, np.abs(got - want).max()


@pytest.mark.parametrize("backend", runnable_backends())
def test_matches_transformers_in_prefill_and_decode(float_checkpoint, backend):
    folder, hf = float_checkpoint
    want = _reference(hf, TOKENS)
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, dtype="float32")
    _assert_close(model.forward_verify("whole", TOKENS), want)
    # Decoding token by token past the window: the sliding layers drop keys, the sinks stay.
    model.prefill("steps", TOKENS[:3])
    for pos in range(3, len(TOKENS)):
        _assert_close(model.decode("steps", TOKENS[pos], pos), want[pos])
    # Several sequences in one decode batch (the mirrored paths), each at its own length.
    for i in range(3):
        model.prefill(f"b{i}", TOKENS[: 5 + i])
    logits = model.decode_batch([(f"b{i}", TOKENS[5 + i], 5 + i) for i in range(3)])
    for i in range(3):
        _assert_close(logits[i], want[5 + i])


def test_the_model_depends_on_what_sets_it_apart(float_checkpoint, tmp_path):
    """Zeroing the sinks, the expert biases or raising the clamp limit each moves the logits, so the parity
    above checks every one of them."""
    folder, hf = float_checkpoint
    base = DecoderOnlyLLM.from_pretrained(folder, backend="cpu").forward_verify("x", TOKENS)
    tensors = load_file(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    variants = {
        "sinks": ({k: np.zeros_like(v) if k.endswith("sinks") else v for k, v in tensors.items()}, config),
        "biases": ({k: np.zeros_like(v) if "experts" in k and k.endswith("_bias") else v
                    for k, v in tensors.items()}, config),
        "limit": (tensors, {**config, "swiglu_limit": 100.0}),
    }
    for name, (weights, cfg) in variants.items():
        dest = tmp_path / name
        dest.mkdir()
        save_file(weights, dest / "model.safetensors")
        (dest / "config.json").write_text(json.dumps(cfg))
        changed = DecoderOnlyLLM.from_pretrained(dest, backend="cpu").forward_verify("x", TOKENS)
        assert np.abs(changed - base).max() > 1e-2, name


@pytest.mark.parametrize("backend", runnable_backends())
def test_generates_greedily_as_transformers(float_checkpoint, backend):
    """Through the engine: batched with another request, the second copy of the prompt from the prefix cache."""
    folder, hf = float_checkpoint
    assert_generates_greedily_as_transformers(folder, hf, backend, TOKENS, max_tokens=16)


# ------------------------------------------------------------------ MXFP4


def _mxfp4_release(folder, model, seed: int = 1) -> None:
    """Rewrite ``folder``'s experts as OpenAI's release stores them (random E2M1 codes and E8M0 scales), and
    put the same experts, decoded by transformers' own converter, into ``model``."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    rng = np.random.default_rng(seed)
    tensors = load_file(folder / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        e, inputs, outputs = tensors.pop(name).shape  # transformers' float layout: [E, in, out]
        blocks = rng.integers(0, 256, (e, outputs, inputs // 32, 16), dtype=np.uint8)
        scales = rng.integers(123, 128, (e, outputs, inputs // 32), dtype=np.uint8)
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
        dense = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
        layer, module = name.removeprefix("model.").split(".mlp.")
        with torch.no_grad():
            getattr(model.get_submodule(f"model.{layer}.mlp.experts"), module.split(".")[1]).copy_(dense)
    save_file(tensors, folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def mxfp4_checkpoint(tmp_path_factory):
    """The release's layout, with the config keys mlx-lm reads too: its gpt-oss model clamps at 7 whatever
    ``swiglu_limit`` says and reads the rope from ``rope_scaling`` (transformers 5 writes ``rope_parameters``)."""
    folder = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    model = _random_model(seed=2, swiglu_limit=7.0)
    model.save_pretrained(folder)
    _mxfp4_release(folder, model)
    config = json.loads((folder / "config.json").read_text())
    config["rope_scaling"] = config["rope_parameters"]
    config["rope_theta"] = config["rope_parameters"]["rope_theta"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder, model


@pytest.mark.parametrize("backend", runnable_backends())
def test_mxfp4_release_matches_transformers(mxfp4_checkpoint, backend, monkeypatch):
    from ferrum.quant import float_modes

    converted = []  # matrices of codes turned into the affine form, which a backend without mxfp4 kernels runs
    convert = float_modes._fp4_as_affine
    monkeypatch.setattr(float_modes, "_fp4_as_affine", lambda packed: converted.append(1) or convert(packed))
    folder, hf = mxfp4_checkpoint
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, dtype="float32")
    _assert_close(model.forward_verify("x", TOKENS), _reference(hf, TOKENS))
    if backend == "mlx":  # the file's codes run as they are, through MLX's mxfp4 kernels, never converted
        experts = model.layers[0].mlp.experts
        assert {experts.gate.mode, experts.up.mode, experts.down.mode} == {"mxfp4"}
        assert not converted
    else:
        assert converted


def _mlx_lm_model(folder):
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    model, config = mlx_lm_utils.load_model(folder)
    return model, config


def test_mxfp4_release_matches_mlx_lm(mxfp4_checkpoint):
    """mlx-lm reads the release with its own sanitizer and runs it with its own gpt-oss model."""
    mx = pytest.importorskip("mlx.core")

    folder, _ = mxfp4_checkpoint
    reference, _ = _mlx_lm_model(folder)
    want = np.array(reference(mx.array([TOKENS]))[0].astype(mx.float32))
    got = DecoderOnlyLLM.from_pretrained(folder, backend="cpu").forward_verify("x", TOKENS)
    _assert_close(got, want, 1e-3)


def test_mlx_lm_conversion_loads(mxfp4_checkpoint, tmp_path):
    """What mlx-lm saves after reading the release (mlx-community's layout: ``experts.gate_proj`` stacks with
    mxfp4 codes, ``.bias`` beside them) gives the release's logits."""
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    folder, hf = mxfp4_checkpoint
    model, config = _mlx_lm_model(folder)
    mlx_lm_utils.save_model(tmp_path, model)
    mlx_lm_utils.save_config(config, tmp_path / "config.json")
    names = set(load_file(next(tmp_path.glob("*.safetensors"))))
    assert "model.layers.0.mlp.experts.gate_proj.scales" in names and "model.layers.0.mlp.experts.up_proj.bias" in names
    got = DecoderOnlyLLM.from_pretrained(tmp_path, backend="cpu").forward_verify("x", TOKENS)
    _assert_close(got, _reference(hf, TOKENS))


def test_mixed_mlx_community_quantization_loads(mxfp4_checkpoint, tmp_path):
    """mlx-community's "MXFP4-Q8" recipe: the experts keep the release's mxfp4 codes, every other linear (router,
    attention, embedding, head) is quantized to 8-bit affine, named per module in config.json. Every backend
    gives mlx-lm's logits for the saved model."""
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")  # before mlx itself: a GPU machine may have neither
    import mlx.core as mx
    import mlx.nn as nn

    model, config = _mlx_lm_model(mxfp4_checkpoint[0])
    eight_bit = {}

    def affine_8(path, module):
        if hasattr(module, "to_quantized") and not hasattr(module, "scales") and module.weight.shape[-1] % 64 == 0:
            eight_bit[path] = {"group_size": 64, "bits": 8, "mode": "affine"}
            return True
        return False

    nn.quantize(model, group_size=64, bits=8, class_predicate=affine_8)
    assert "model.layers.0.mlp.router" in eight_bit and "model.layers.0.self_attn.q_proj" in eight_bit
    config["quantization"] = config["quantization_config"] = {"group_size": 32, "bits": 4, "mode": "mxfp4",
                                                              **eight_bit}
    mlx_lm_utils.save_model(tmp_path, model)
    mlx_lm_utils.save_config(config, tmp_path / "config.json")
    want = np.array(model(mx.array([TOKENS]))[0].astype(mx.float32))
    for backend in runnable_backends():
        got = DecoderOnlyLLM.from_pretrained(tmp_path, backend=backend, dtype="float32").forward_verify("x", TOKENS)
        _assert_close(got, want, 1e-3)


@pytest.mark.parametrize("bits", [4, 8])
def test_ferrum_quantize_writes_what_mlx_lm_runs(tmp_path, bits):
    """``ferrum quantize`` reads transformers' float layout (which mlx-lm's own converter misreads) and writes
    mlx-lm's, the experts packed like every projection: mlx-lm and every backend run it to the same logits."""
    from ferrum.quant.convert import quantize_checkpoint

    mx = pytest.importorskip("mlx.core")
    model = _random_model(seed=4, swiglu_limit=7.0)  # mlx-lm clamps at 7 whatever the config says
    model.save_pretrained(tmp_path / "float")
    write_tokenizer(tmp_path / "float")
    config = json.loads((tmp_path / "float" / "config.json").read_text())
    config["rope_scaling"], config["rope_theta"] = config["rope_parameters"], config["rope_parameters"]["rope_theta"]
    (tmp_path / "float" / "config.json").write_text(json.dumps(config))

    folder = quantize_checkpoint(tmp_path / "float", tmp_path / "packed", bits=bits, group_size=32)
    stored = load_file(folder / "model.safetensors")
    experts = "model.layers.0.mlp.experts"
    assert stored[f"{experts}.gate_proj.weight"].dtype == np.uint32 and f"{experts}.down_proj.scales" in stored
    assert stored[f"{experts}.up_proj.bias"].shape == (4, 64)
    reference, _ = _mlx_lm_model(folder)
    want = np.array(reference(mx.array([TOKENS]))[0].astype(mx.float32))
    for backend in runnable_backends():
        got = DecoderOnlyLLM.from_pretrained(folder, backend=backend, dtype="float32").forward_verify("x", TOKENS)
        _assert_close(got, want, 1e-3)
    if bits == 8:  # and close to the float model
        _assert_close(want, _reference(model, TOKENS), 3e-2)


def test_malformed_blocks_are_named(mxfp4_checkpoint, tmp_path):
    folder, _ = mxfp4_checkpoint
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.1.mlp.experts.down_proj_blocks"
    tensors[name] = tensors[name][:, :, :1]  # half the inputs
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match="down_proj_blocks"):
        DecoderOnlyLLM.from_pretrained(tmp_path, backend="cpu")


def test_a_backend_without_sinks_refuses_the_model(float_checkpoint, registered):
    import ferrum_cpu.ops as cpu_ops
    from ferrum.hookspec import hookimpl

    @hookimpl
    def attention(q, k, v, scale, sliding_window, softcap=None):
        return cpu_ops.attention(q, k, v, scale, sliding_window, softcap)

    registered("nosinks", cpu_like_plugin("nosinks", omit=("paged_attention",), extra={"attention": attention}))
    with pytest.raises(UnsupportedFeatureError, match="attention sinks"):
        DecoderOnlyLLM.from_pretrained(float_checkpoint[0], backend="nosinks")


def test_experts_fall_back_where_moe_experts_lacks_the_features(float_checkpoint, registered):
    """A plugin whose moe_experts predates biases and the clamped activation runs gpt-oss's experts through
    the core's reference, and still matches transformers."""
    import ferrum_cpu.ops as cpu_ops
    from ferrum.hookspec import hookimpl
    from ferrum.moe import reference

    @hookimpl
    def moe_experts(x, expert_ids, expert_weights, gate, up, down, shared):
        raise AssertionError("called without the biases it cannot take")

    plugin = cpu_like_plugin("oldmoe", extra={
        "moe_experts": moe_experts,
        "upload_experts": hookimpl(lambda name, weight, dtype: reference.ReferenceStack(cpu_ops, name, weight, dtype))})
    registered("oldmoe", plugin)
    folder, hf = float_checkpoint
    model = DecoderOnlyLLM.from_pretrained(folder, backend="oldmoe")
    _assert_close(model.forward_verify("x", TOKENS), _reference(hf, TOKENS))


def test_random_checkpoints_load_alike_on_every_backend(tmp_path):
    """``write_random_checkpoint`` (benchmarks, the conformance kit) writes gpt-oss in mlx-lm's layout; every
    backend reads it to the numpy backend's logits."""
    from ferrum.random_checkpoint import write_random_checkpoint

    config = _config(swiglu_limit=7.0).to_dict()
    folder = write_random_checkpoint(tmp_path / "random", config, dtype="float32", std=0.2)
    want = DecoderOnlyLLM.from_pretrained(folder, backend="cpu").forward_verify("x", TOKENS)
    assert np.abs(want).max() > 0.5
    for backend in runnable_backends():
        _assert_close(DecoderOnlyLLM.from_pretrained(folder, backend=backend, dtype="float32").forward_verify(
            "x", TOKENS), want)


def test_random_checkpoint_in_transformers_layout_is_what_transformers_runs(tmp_path):
    """Benchmarks against transformers write gpt-oss in its layout (it reads no other): transformers loads every
    weight, and runs them to Ferrum's logits, which match those of the same weights in mlx-lm's layout."""
    from ferrum.bench.runners import TransformersRunner
    from ferrum.random_checkpoint import write_random_checkpoint

    config = _config(swiglu_limit=7.0).to_dict()
    mlx_lm = write_random_checkpoint(tmp_path / "mlx-lm", config, dtype="float32", std=0.2)
    folder = write_random_checkpoint(tmp_path / "hf", config, dtype="float32", std=0.2, expert_layout="transformers")
    assert any(name.endswith("experts.gate_up_proj") for name in load_file(folder / "model.safetensors"))
    got = DecoderOnlyLLM.from_pretrained(folder, backend="cpu").forward_verify("x", TOKENS)
    _assert_close(got, DecoderOnlyLLM.from_pretrained(mlx_lm, backend="cpu").forward_verify("x", TOKENS), 1e-6)
    hf, loading = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]
    hf.config._attn_implementation = "eager"
    _assert_close(got, _reference(hf.float().eval(), TOKENS))
    # The bench's peer refuses the layout it cannot read rather than run freshly initialized experts.
    with pytest.raises(CheckpointError, match="does not read this checkpoint's layout"):
        TransformersRunner(mlx_lm, "float32", "cpu")


# ------------------------------------------------------------------ GGUF


def _tiny_gguf_model():
    from gguf_writer import tiny_model

    hf, config = tiny_model(transformers.GptOssConfig, intermediate_size=64, num_hidden_layers=2, head_dim=16,
                             num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                             max_position_embeddings=131072, tie_word_embeddings=False)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0, 1.0 if "sinks" in name else 0.2)
    return hf, config


def _gpt_oss_gguf(path, hf, config, expert_type, matrix_type=None) -> None:
    """``hf``'s weights as llama.cpp's converter writes gpt-oss: gate and up split out of their interleaved
    stack, every expert stack ``[E, out, in]`` stored as ``expert_type``; ``hf``'s experts then take the
    values the file holds (gguf's own dequantizer), so both sides run the same weights. ``matrix_type``: the
    attention and router matrices' type (float32 when None)."""
    import gguf
    from gguf_writer import config_writer, finish

    w = config_writer(path, "gpt-oss", config)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_expert_count(config.num_local_experts)
    w.add_expert_used_count(config.num_experts_per_tok)
    w.add_expert_feed_forward_length(config.intermediate_size)
    w.add_sliding_window(config.sliding_window)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(config.rope_parameters["factor"])
    w.add_rope_scaling_orig_ctx_len(config.rope_parameters["original_max_position_embeddings"])
    names = {"input_layernorm.weight": "attn_norm.weight", "self_attn.sinks": "attn_sinks.weight",
             "post_attention_layernorm.weight": "post_attention_norm.weight",
             "mlp.router.weight": "ffn_gate_inp.weight", "mlp.router.bias": "ffn_gate_inp.bias",
             **{f"self_attn.{p}_proj.{k}": f"attn_{p}.{k}" for p in "qkv" for k in ("weight", "bias")},
             **{f"self_attn.o_proj.{k}": f"attn_output.{k}" for k in ("weight", "bias")}}
    globals_ = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
    for name, tensor in hf.state_dict().items():
        array = tensor.float().numpy()
        if name in globals_:
            w.add_tensor(globals_[name], array)
            continue
        block, rest = name.removeprefix("model.layers.").split(".", 1)
        if rest in names and matrix_type is not None and array.ndim == 2:
            w.add_tensor(f"blk.{block}.{names[rest]}", gguf.quants.quantize(array, matrix_type),
                         raw_dtype=matrix_type)
        elif rest in names:
            w.add_tensor(f"blk.{block}.{names[rest]}", array)
        elif rest == "mlp.experts.gate_up_proj_bias":
            w.add_tensor(f"blk.{block}.ffn_gate_exps.bias", np.ascontiguousarray(array[:, ::2]))
            w.add_tensor(f"blk.{block}.ffn_up_exps.bias", np.ascontiguousarray(array[:, 1::2]))
        elif rest == "mlp.experts.down_proj_bias":
            w.add_tensor(f"blk.{block}.ffn_down_exps.bias", array)
        else:  # the stacks, inputs first in transformers: [E, in, out]
            held = []
            parts = {"ffn_down_exps": np.s_[:]} if rest == "mlp.experts.down_proj" else {
                "ffn_gate_exps": np.s_[0::2], "ffn_up_exps": np.s_[1::2]}
            for gguf_name, outputs in parts.items():
                stack = np.ascontiguousarray(array[:, :, outputs].transpose(0, 2, 1))
                if expert_type == gguf.GGMLQuantizationType.F32:
                    w.add_tensor(f"blk.{block}.{gguf_name}.weight", stack)
                    held.append((outputs, stack))
                else:
                    packed = gguf.quants.quantize(stack, expert_type)
                    w.add_tensor(f"blk.{block}.{gguf_name}.weight", packed, raw_dtype=expert_type)
                    held.append((outputs, gguf.quants.dequantize(packed, expert_type)))
            with torch.no_grad():
                for outputs, values in held:
                    tensor[:, :, outputs] = torch.from_numpy(values.transpose(0, 2, 1))
    finish(w)


@pytest.mark.parametrize("expert_type", ["F32", "MXFP4"])
def test_gguf_imports_and_matches_transformers(tmp_path, expert_type):
    """llama.cpp's gpt-oss layout: sinks, the split expert stacks and their biases, the router's bias, the
    sliding window and YaRN from the metadata; MXFP4 experts kept as mxfp4 codes (MLX runs them as they are)."""
    import gguf

    from ferrum.config import ModelConfig
    from ferrum.gguf_import import convert_gguf

    hf, config = _tiny_gguf_model()
    _gpt_oss_gguf(tmp_path / "gpt-oss.gguf", hf, config, getattr(gguf.GGMLQuantizationType, expert_type))
    folder = convert_gguf(tmp_path / "gpt-oss.gguf", tmp_path / "out")
    ours = ModelConfig.from_file(folder)
    assert ours.arch.sinks and ours.arch.windows == (4, None) and ours.arch.moe.biased
    if expert_type == "MXFP4":
        assert ours.quantization.mode_for("model.layers.0.mlp.switch_mlp.up_proj") == "mxfp4"
    tokens = [5, 77, 100, 42, 9, 200, 13, 60, 7, 33, 90]
    want = _reference(hf, tokens)
    for backend in runnable_backends():
        model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, dtype="float32")
        _assert_close(model.forward_verify("x", tokens), want)
        if backend == "mlx" and expert_type == "MXFP4":
            assert model.layers[0].mlp.experts.down.mode == "mxfp4"


def test_bench_preset_has_gpt_oss_20b_design():
    from ferrum.bench.presets import PRESETS
    from ferrum.config import ModelConfig

    arch = ModelConfig.from_dict(PRESETS["gpt-oss-small"]).arch
    assert arch.sinks and arch.qkv_bias and arch.o_bias and arch.windows == (128, None) * 4
    assert (arch.moe.num_experts, arch.moe.top_k, arch.moe.biased) == (32, 4, True)
    assert arch.moe.activation.limit == 7.0 and arch.layers[0].rope.kind == "yarn" and not arch.layers[0].rope.truncate


def test_gguf_with_q8_0_attention_and_mxfp4_experts(tmp_path):
    """llama.cpp's usual gpt-oss mix: 8-bit affine attention and router beside mxfp4 experts, each module's
    mode in the quantization section; every backend gives what the same file imported in float32 gives."""
    import gguf

    from ferrum.config import ModelConfig
    from ferrum.gguf_import import convert_gguf

    hf, config = _tiny_gguf_model()
    q = gguf.GGMLQuantizationType
    _gpt_oss_gguf(tmp_path / "mix.gguf", hf, config, q.MXFP4, matrix_type=q.Q8_0)
    packed = convert_gguf(tmp_path / "mix.gguf", tmp_path / "packed")
    quant = ModelConfig.from_file(packed).quantization
    assert quant.mode_for("model.layers.1.self_attn.q_proj") == "affine" and quant.bits == 8
    assert quant.mode_for("model.layers.1.mlp.switch_mlp.down_proj") == "mxfp4"
    floats = convert_gguf(tmp_path / "mix.gguf", tmp_path / "float", dequantize_to="float32")
    tokens = [5, 77, 100, 42, 9, 200, 13, 60, 7, 33, 90]
    want = DecoderOnlyLLM.from_pretrained(floats, backend="cpu").forward_verify("x", tokens)
    for backend in runnable_backends():
        got = DecoderOnlyLLM.from_pretrained(packed, backend=backend, dtype="float32").forward_verify("x", tokens)
        _assert_close(got, want)
