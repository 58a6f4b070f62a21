"""BitNet b1.58 (``bitnet``): Llama's blocks with sub-norms and a gated squared-ReLU MLP, as a float checkpoint,
as the ``-bf16`` release stores it (master weights, ``quantization_mode`` "online") and as the main release does
(packed ternary weights and their scales, "offline"); each compared with transformers loading the same folder,
which quantizes every converted layer's input per token (the core's ``quantize_activations``)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ferrum.errors import ConfigError, UnsupportedFeatureError
from ferrum.quant import QuantConfig, bitnet
from ferrum.reference_ops import quantized_rows

from support import (assert_engine_keeps_greedy_tokens, assert_forward_and_decode_match, build_transformers_model,
                     float32_model, runnable_backends, scaled_error, small_pool_engine, staggered_greedy_workload)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
integration = pytest.importorskip("transformers.integrations.bitnet")

VOCAB = 97
TOKENS = [0, 5, 9, 33, 77, 90, 21, 7, 64, 12]
CONVERTED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _original(fn):
    """transformers' function itself, not the torch.compile wrapper it is decorated with (no compiler here)."""
    return getattr(fn, "_torchdynamo_orig_callable", fn)


def _config(**extra):
    return transformers.BitNetConfig(vocab_size=VOCAB, hidden_size=96, intermediate_size=80, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                     eos_token_id=None, bos_token_id=None, **extra)


def _with_section(folder, dest, mode: str, **extra):
    shutil.copytree(folder, dest)
    raw = json.loads((dest / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                  "quantization_mode": mode, **extra}
    (dest / "config.json").write_text(json.dumps(raw))
    return dest


def _packed(folder, dest):
    """``folder``'s converted layers made ternary, packed with transformers' ``pack_weights``, each with a scale."""
    _with_section(folder, dest, "offline")
    tensors = load_file(dest / "model.safetensors")
    rng = np.random.RandomState(1)
    for name in [n for n in tensors if n.endswith(".weight") and n.rsplit(".", 2)[-2] in CONVERTED]:
        ternary = torch.tensor(rng.randint(-1, 2, size=tensors[name].shape), dtype=torch.int8)
        tensors[name] = integration.pack_weights(ternary).numpy()
        tensors[name.replace(".weight", ".weight_scale")] = np.array([rng.uniform(0.05, 0.2)], np.float32)
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def _reference(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def _logits(model, tokens=TOKENS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def _op_backends() -> list[str]:
    """The built-in backends here, and the JAX plugin where it is installed."""
    from ferrum import backends

    return runnable_backends() + [e.name for e in backends.available() if e.available and e.name == "jax"]


def _ops(backend: str):
    """``backend``'s ops; an installed JAX plugin older than the op is skipped (reinstall plugins/ferrum-jax)."""
    from ferrum.backends import declared_version, load_backend

    ops = load_backend(backend).ops
    if backend == "jax" and declared_version(ops.info) < (1, 22):
        pytest.skip(f"the installed JAX plugin declares API {ops.info.api_version}, before quantize_activations")
    return ops


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (folder, transformers model reading it): the float model, tied and not, and its two releases; and
    both releases of a model with q/k/v/o biases (``*_bias``)."""
    torch._dynamo.config.disable = True  # transformers compiles its BitNet helpers; run them eagerly
    root = tmp_path_factory.mktemp("bitnet")
    out = {}
    for name, tie in (("float", False), ("tied", True)):
        out[name] = root / name, build_transformers_model(root / name, _config(tie_word_embeddings=tie))
    build_transformers_model(root / "biased", _config(attention_bias=True))
    out["online"] = _with_section(root / "tied", root / "online", "online"), None
    out["offline"] = _packed(root / "float", root / "offline"), None
    out["online_bias"] = _with_section(root / "biased", root / "online_bias", "online"), None
    out["offline_bias"] = _packed(root / "biased", root / "offline_bias"), None
    return {name: (folder, model or _reference(folder)) for name, (folder, model) in out.items()}


@pytest.mark.parametrize("name", ["float", "tied"])
def test_float_blocks_match_transformers(checkpoints, name):
    folder, hf = checkpoints[name]
    assert_forward_and_decode_match(float32_model(folder), TOKENS, _logits(hf))


@pytest.mark.parametrize("backend", [pytest.param(b, marks=pytest.mark.slow) if b == "jax" else b
                                     for b in _op_backends()])
@pytest.mark.parametrize("name", ["online", "offline", "online_bias", "offline_bias"])
def test_releases_match_transformers(checkpoints, name, backend):
    """Biased layers too: offline, transformers scales ``x W + b`` as a whole by ``weight_scale``; online (no
    scale), the bias is added as it is."""
    folder, hf = checkpoints[name]
    assert isinstance(hf.model.layers[0].mlp.down_proj, integration.AutoBitLinear)
    assert name.endswith("_bias") == (hf.model.layers[0].self_attn.o_proj.bias is not None)
    assert_forward_and_decode_match(float32_model(folder, backend), TOKENS, _logits(hf), tolerance=1e-3)


def test_inputs_unquantized_miss_transformers(checkpoints, monkeypatch):
    """Control: the same weights with each layer reading its input as it is."""
    folder, hf = checkpoints["offline"]
    monkeypatch.setattr(bitnet, "quantized_inputs", lambda ops, placed: placed)
    assert scaled_error(float32_model(folder).forward_verify("all", TOKENS), _logits(hf)) > 1e-2


def test_engine_keeps_greedy_tokens(checkpoints):
    folder, hf = checkpoints["offline"]
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, **config), hf,
                                      staggered_greedy_workload(VOCAB))


def test_unpack_is_transformers():
    packed = np.random.RandomState(0).randint(0, 256, size=(12, 7)).astype(np.uint8)
    want = _original(integration.unpack_weights)(torch.tensor(packed), dtype=torch.float32).numpy()
    assert np.array_equal(bitnet.unpack(packed), want)


def test_ternarize_is_transformers():
    w = np.random.RandomState(0).normal(0, 0.3, size=(16, 24)).astype(np.float32)
    want = _original(integration.WeightQuant.forward)(None, torch.tensor(w)).numpy()
    assert np.array_equal(bitnet.ternarize(w), want)


@pytest.mark.parametrize("backend", _op_backends())
def test_quantize_activations_is_transformers(backend):
    """Rows of random values, one holding exact halves of its grid (rounded to even), and one of zeros."""
    rng = np.random.RandomState(0)
    x = rng.normal(0, 2, size=(5, 33)).astype(np.float32)
    x[1] = np.arange(33, dtype=np.float32) - 16.5
    x[1, 0] = 127  # the grid's step is 1: every other value ends in .5
    x[2] = 0
    want = _original(integration.ActQuant.forward)(None, torch.tensor(x)).numpy()
    assert np.array_equal(quantized_rows(x, 127), want)
    ops = _ops(backend)
    assert "quantize_activations" in ops.native
    for fn in (ops.quantize_activations, ops.fallback["quantize_activations"]):
        got = np.asarray(ops.to_numpy(fn(ops.from_numpy(x, "float32"), 127)), dtype=np.float32)
        assert np.array_equal(got, want)


@pytest.mark.parametrize("backend", [b for b in _op_backends() if b != "cpu"])
def test_quantize_activations_in_bfloat16_is_transformers(backend):
    """bfloat16 in and out, computed in float32 between, as transformers' ActQuant does."""
    x = torch.tensor(np.random.RandomState(1).normal(0, 3, size=(6, 40)), dtype=torch.bfloat16)
    want = _original(integration.ActQuant.forward)(None, x).float().numpy()
    ops = _ops(backend)
    got = ops.quantize_activations(ops.from_numpy(x.float().numpy(), "bfloat16"), 127)
    assert np.array_equal(np.asarray(ops.to_numpy(ops.cast(got, "float32")), dtype=np.float32), want)


@pytest.mark.parametrize("name", ["online", "offline"])
def test_quantize_refuses_a_bitnet_checkpoint_by_name(checkpoints, tmp_path, capsys, name):
    """An mlx-community copy would drop the ternary weights' activation quantization (online: it packed the master
    weights as they are, a model 0.99 off transformers'; offline: it said only that uint8 is not a float)."""
    from ferrum.cli import main
    from ferrum.errors import InvalidRequestError
    from ferrum.quant.convert import quantize_checkpoint

    folder, _ = checkpoints[name]
    with pytest.raises(InvalidRequestError, match=f"BitNet b1.58 checkpoint .*{name}.*already ternary"):
        quantize_checkpoint(folder, tmp_path / "q", bits=4, group_size=32)
    assert main(["quantize", str(folder), str(tmp_path / "q"), "--group-size", "32"]) == 2
    assert "per token to int8" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


@pytest.fixture(scope="module")
def adapters(checkpoints, tmp_path_factory):
    """name -> (adapter folder, peft's logits, peft's logits with every LoRA reading its input quantized): a random
    LoRA on every linear layer but the head, which peft wraps around transformers' ``AutoBitLinear``. peft adds
    ``B A x`` of the layer's input as it comes, beside the layer's own quantized product."""
    import copy

    peft = pytest.importorskip("peft")
    out = {}
    for name in ("online", "offline"):
        _, hf = checkpoints[name]
        torch.manual_seed(1)
        wrapped = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)).eval()
        assert isinstance(wrapped.base_model.model.model.layers[0].mlp.down_proj.base_layer, integration.AutoBitLinear)
        folder = tmp_path_factory.mktemp(f"lora-{name}")
        wrapped.save_pretrained(folder)
        ref = _logits(wrapped)
        quantize = _original(integration.ActQuant.forward)
        hooks = [module.lora_A["default"].register_forward_pre_hook(lambda _, args: (quantize(None, args[0]),))
                 for module in wrapped.modules() if hasattr(module, "lora_A")]
        control = _logits(wrapped)
        for hook in hooks:
            hook.remove()
        out[name] = folder, ref, control
    return out


@pytest.mark.parametrize("backend", runnable_backends())
@pytest.mark.parametrize("name", ["online", "offline"])
def test_lora_matches_peft(checkpoints, adapters, name, backend):
    """Ferrum's adapters add ``B A x`` of the projection's input as the model has it, before the layer quantizes
    it: peft's sum. Controls: the adapter moves the logits, and LoRA reading the quantized input misses them."""
    from ferrum.model import ForwardItem

    folder, hf = checkpoints[name]
    lora, ref, control = adapters[name]
    assert scaled_error(ref, _logits(hf)) > 0.1 and scaled_error(control, ref) > 1e-2
    model = float32_model(folder, backend, block_size=4)
    model.adapters.load("a", lora)
    got = model.forward([ForwardItem("s", TOKENS, 0, adapter="a")], all_logits=True).logits
    assert scaled_error(np.asarray(model.ops.to_numpy(got), dtype=np.float32), ref) < 1e-4


@pytest.mark.parametrize("section, words", [
    ({"linear_class": "bitlinear"}, "'bitlinear'"),
    ({"linear_class": "autobitlinear", "use_rms_norm": True}, "use_rms_norm"),
    ({"linear_class": "autobitlinear", "quantization_mode": "later"}, "'later'"),
    ({"linear_class": "autobitlinear", "modules_to_not_convert": ["model.layers.0.mlp"]}, "add 'lm_head'"),
])
def test_unsupported_sections_refused_by_name(section, words):
    with pytest.raises(UnsupportedFeatureError, match=words):
        QuantConfig.from_config({"quantization_config": {"quant_method": "bitnet", **section}})


@pytest.mark.parametrize("skip, words", [
    (5, "a list of module names or patterns"),
    ("lm_head", "a list of module names or patterns"),  # a bare string: before, split into its letters
    ({"lm_head": True}, "a list of module names or patterns"),
    (["lm_head", None], "entry None is not a string"),
    (["lm_head", 3], "entry 3 is not a string"),
    (["lm_head", "model.layers.(0"], "'model.layers.\\(0' is not a regular expression"),  # before: re.error at load
])
def test_modules_to_not_convert_checked_when_parsed(skip, words):
    """Each entry a string transformers can match as a regex, checked when config.json is read; before, a TypeError
    or re.error, and an invalid pattern after a matching one passed parsing."""
    with pytest.raises(ConfigError, match=f"modules_to_not_convert.*{words}.*write"):
        QuantConfig.from_config({"quantization_config": {
            "quant_method": "bitnet", "linear_class": "autobitlinear", "modules_to_not_convert": skip}})


def test_skipped_modules_stay_float():
    scheme = QuantConfig.from_config({"quantization_config": {
        "quant_method": "bitnet", "linear_class": "autobitlinear",
        "modules_to_not_convert": ["lm_head", "model.layers.1"]}}).bitnet
    assert bitnet.quantizes_input(scheme, "model.layers.0.mlp.down_proj.weight", "model.layers.")
    assert bitnet.quantizes_input(scheme, "model.layers.10.mlp.down_proj.weight", "model.layers.")
    assert not bitnet.quantizes_input(scheme, "model.layers.1.mlp.down_proj.weight", "model.layers.")
    assert not bitnet.quantizes_input(scheme, "lm_head.weight", "model.layers.")


def test_skipped_layer_of_a_packed_checkpoint_reads_float(checkpoints, tmp_path):
    """A layer modules_to_not_convert names stays a float linear, as transformers' is, though a weight_scale sits
    beside it (unread, and said so; before, the layer was read as MLX's packed layout and failed on a KeyError)."""
    skipped = "model.layers.1.mlp.down_proj"
    folder = _packed(checkpoints["float"][0], tmp_path / "skip")
    raw = json.loads((folder / "config.json").read_text())
    raw["quantization_config"]["modules_to_not_convert"] = ["lm_head", skipped]
    (folder / "config.json").write_text(json.dumps(raw))
    tensors = load_file(folder / "model.safetensors")
    tensors[f"{skipped}.weight"] = load_file(checkpoints["float"][0] / "model.safetensors")[f"{skipped}.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    hf = _reference(folder)
    assert type(hf.model.layers[1].mlp.down_proj) is torch.nn.Linear
    with pytest.warns(UserWarning, match=f"not loaded: {skipped}.weight_scale"):
        model = float32_model(folder)
    assert_forward_and_decode_match(model, TOKENS, _logits(hf), tolerance=1e-3)


@pytest.mark.parametrize("patterns", [["lm_head", "model.layers.1"], ["lm_head", r"model\.layers\.(0|1)\.mlp"],
                                      ["lm_head", "layers.*"], ["lm_head", "mlp.gate"], ["lm_head", "j"],
                                      ["lm_head", "down_proj"], ["lm_head", ".*self_attn"]])
def test_skip_patterns_match_as_transformers_does(patterns):
    """Prefix to a module boundary, regex, or suffix: transformers' should_convert_module over the same names."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    scheme = QuantConfig.from_config({"quantization_config": {
        "quant_method": "bitnet", "linear_class": "autobitlinear", "modules_to_not_convert": patterns}}).bitnet
    modules = [f"model.layers.{i}.{m}" for i in (0, 1, 11) for m in
               ("mlp.gate_proj", "mlp.down_proj", "self_attn.q_proj", "self_attn.o_proj")]
    got = [bitnet.quantizes_input(scheme, f"{m}.weight", "model.layers.") for m in modules]
    assert got == [should_convert_module(m, patterns) for m in modules]


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_release_config_reads_as_transformers_does(mode):
    """microsoft/bitnet-b1.58-2B-4T's config.json (and -bf16's, "online"), remote-code keys and all."""
    import warnings

    from ferrum.config import ModelConfig

    raw = {"architectures": ["BitNetForCausalLM"], "auto_map": {
        "AutoConfig": "configuration_bitnet.BitNetConfig", "AutoModelForCausalLM": "modeling_bitnet.BitNetForCausalLM"},
        "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "relu2", "hidden_size": 2560,
        "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 4096, "model_type": "bitnet",
        "rms_norm_eps": 1e-05, "num_attention_heads": 20, "num_hidden_layers": 30, "num_key_value_heads": 5,
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 128256, "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                                      "quantization_mode": mode}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = ModelConfig.from_dict(raw)
    hf = transformers.BitNetConfig(**{k: v for k, v in raw.items() if k not in ("auto_map", "quantization_config")})
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (20, 5, 128)
    assert config.tie_word_embeddings and config.rms_norm_eps == hf.rms_norm_eps
    assert config.arch.layers[0].rope.theta == hf.rope_parameters["rope_theta"]
    assert config.arch.sub_norms and config.quantization.bitnet.online == (mode == "online")
