"""``ferrum quantize`` against mlx-lm, both ways.

* Ferrum's output loads in mlx-lm, and mlx-lm's ``convert`` output (uniform
  2-8 bits and the mixed recipes) loads in Ferrum, with the same logits:
  max |diff| <= 1e-4 * max(1, max |logit|), float32 checkpoints (measured:
  about 1e-6 on the MLX backend and on the cpu backend's reference path).
* Ferrum's tensors are those of ``mlx_lm.convert``, bit for bit, for float32
  sources; for float16 / bfloat16 ones see ``test_tensors_equal_mlx_lm_convert``.
  Ferrum's config.json also lists modules kept in float (input size not a
  multiple of the group size) as ``false``; mlx-lm leaves them out and relies
  on their missing ``.scales``. Both loaders read either.
* Bad input fails before anything is written, with a ``ferrum.errors`` error.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import ferrum
import ferrum.quant.convert as convert_module
from ferrum.checkpoint import INDEX_FILE
from ferrum.cli import main
from ferrum.errors import CheckpointError, InvalidRequestError
from ferrum.quant import QuantizedWeight, dequantize, unpack
from ferrum.quant.convert import quantize_checkpoint
from ferrum.random_checkpoint import write_random_checkpoint

from support import runnable_backends, write_tokenizer

try:
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.convert import convert as mlx_convert
except ImportError:
    mlx_lm = None
needs_mlx = pytest.mark.skipif(
    mlx_lm is None or "mlx" not in runnable_backends(), reason="mlx-lm or the MLX backend cannot run here"
)

TOKENS = [0, 5, 17, 44, 99, 250, 3, 120, 7, 299, 64]
#: Odd sizes on purpose: intermediate 96 / 160 are not multiples of 64 or 128, so those
#: down_proj layers stay in float at the larger group sizes.
SOURCES = {
    "tied": dict(model_type="llama", hidden_size=128, intermediate_size=96, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "untied": dict(model_type="qwen2", hidden_size=64, intermediate_size=160, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=False),  # q/k/v biases too
}


def write_source(folder: Path, kind: str, dtype: str = "float32") -> Path:
    # rope_theta spelled out: mlx-lm's Qwen2 default (1e6) is not Hugging Face's (1e4).
    config = dict(vocab_size=300, num_hidden_layers=2, max_position_embeddings=256, rope_theta=10000.0,
                  **SOURCES[kind])
    write_random_checkpoint(folder, config, dtype=dtype, std=0.2)
    write_tokenizer(folder)
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {kind: write_source(root / kind, kind) for kind in SOURCES}


def assert_close(got: np.ndarray, ref: np.ndarray) -> None:
    scaled = float(np.abs(got - ref).max()) / max(1.0, float(np.abs(ref).max()))
    assert scaled <= 1e-4, f"scaled max |diff| {scaled:.3g}"


def mlx_lm_logits(folder: Path) -> np.ndarray:
    model, tokenizer = mlx_lm.load(str(folder))
    assert tokenizer is not None
    return np.array(model(mx.array([TOKENS]))[0].astype(mx.float32))


def ferrum_logits(folder: Path, backend: str) -> np.ndarray:
    return ferrum.load(folder, backend=backend).model.forward_verify("q", TOKENS)


def tensors(folder: Path) -> dict[str, np.ndarray]:
    files = sorted(folder.glob("*.safetensors"))
    out = {}
    for path in files:
        with safe_open(str(path), framework="numpy") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})
    return out


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


# ------------------------------------------------------------------ Ferrum writes, mlx-lm reads


@needs_mlx
@pytest.mark.parametrize("kind", SOURCES)
@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32)])
def test_ferrum_quantize_loads_in_mlx_lm_with_the_same_logits(sources, tmp_path, capsys, kind, bits, group_size):
    dst = tmp_path / "q"
    assert main(["quantize", str(sources[kind]), str(dst), "--bits", str(bits), "--group-size", str(group_size)]) == 0
    captured = capsys.readouterr()
    assert "bits per weight" in captured.out
    assert "[##############################]" in captured.err
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= {p.name for p in dst.iterdir()}
    config = config_of(dst)
    assert config["quantization"] == config["quantization_config"]
    assert config["quantization"]["bits"] == bits and config["quantization"]["group_size"] == group_size
    ref = mlx_lm_logits(dst)
    assert_close(ferrum_logits(dst, "mlx"), ref)
    assert_close(ferrum_logits(dst, "cpu"), ref)


@needs_mlx
def test_sharded_output_and_sharded_source(sources, tmp_path, monkeypatch):
    """Shards follow the size limit and get an index; a sharded source reads the same."""
    src = tmp_path / "sharded-src"
    src.mkdir()
    whole = tensors(sources["untied"])
    names = sorted(whole)
    save_file({n: whole[n] for n in names[:10]}, str(src / "model-00001-of-00002.safetensors"))
    save_file({n: whole[n] for n in names[10:]}, str(src / "model-00002-of-00002.safetensors"))
    weight_map = {n: f"model-0000{1 + (i >= 10)}-of-00002.safetensors" for i, n in enumerate(names)}
    (src / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (src / name).write_bytes((sources["untied"] / name).read_bytes())

    single = quantize_checkpoint(sources["untied"], tmp_path / "single")
    assert not (single / INDEX_FILE).exists()
    monkeypatch.setattr(convert_module, "MAX_SHARD_BYTES", 20_000)
    dst = quantize_checkpoint(src, tmp_path / "q")
    shards = sorted(dst.glob("*.safetensors"))
    index = json.loads((dst / INDEX_FILE).read_text())
    assert len(shards) > 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    expected, got = tensors(single), tensors(dst)
    for shard in shards:  # within the limit, unless one module alone exceeds it
        held = [n for n, f in index["weight_map"].items() if f == shard.name]
        modules = {n.rsplit(".", 1)[0] for n in held}
        assert sum(got[n].nbytes for n in held) <= 20_000 or len(modules) == 1, held
    assert expected.keys() == got.keys() and index["metadata"]["total_size"] == sum(a.nbytes for a in got.values())
    assert all(np.array_equal(expected[n], got[n]) for n in expected)
    assert_close(ferrum_logits(dst, "mlx"), mlx_lm_logits(dst))


# ------------------------------------------------------------------ mlx-lm writes, Ferrum reads


@needs_mlx
@pytest.mark.parametrize("kind,bits,group_size", [
    ("tied", 2, 32), ("untied", 3, 64), ("tied", 4, 128), ("untied", 5, 32), ("tied", 6, 64), ("untied", 8, 64),
    ("tied", 8, 128),
])
def test_mlx_lm_convert_output_runs_in_ferrum(sources, tmp_path, kind, bits, group_size):
    dst = tmp_path / "mlx"
    mlx_convert(hf_path=str(sources[kind]), mlx_path=str(dst), quantize=True, q_group_size=group_size, q_bits=bits)
    ref = mlx_lm_logits(dst)
    assert_close(ferrum_logits(dst, "mlx"), ref)
    assert_close(ferrum_logits(dst, "cpu"), ref)


@needs_mlx
@pytest.mark.parametrize("kind,recipe", [("untied", "mixed_3_6"), ("tied", "mixed_2_6")])
def test_mlx_lm_mixed_recipes_run_in_ferrum(sources, tmp_path, kind, recipe):
    dst = tmp_path / "mixed"
    mlx_convert(hf_path=str(sources[kind]), mlx_path=str(dst), quantize=True, q_group_size=32, quant_predicate=recipe)
    quant = config_of(dst)["quantization"]
    assert {entry["bits"] for key, entry in quant.items() if isinstance(entry, dict)} == {
        int(recipe[-3]), int(recipe[-1])}
    ref = mlx_lm_logits(dst)
    assert_close(ferrum_logits(dst, "mlx"), ref)
    assert_close(ferrum_logits(dst, "cpu"), ref)


# ------------------------------------------------------------------ the same bytes as mlx-lm


@needs_mlx
@pytest.mark.parametrize("kind,dtype,bits,group_size", [
    ("tied", "float32", 4, 64), ("untied", "float32", 3, 32), ("untied", "float32", 2, 64),
    ("tied", "float32", 8, 128), ("tied", "bfloat16", 4, 64), ("untied", "bfloat16", 8, 32),
    ("tied", "float16", 6, 128), ("untied", "float16", 5, 64),
])
def test_tensors_equal_mlx_lm_convert(tmp_path, kind, dtype, bits, group_size):
    """Bit for bit from float32 sources. From float16 / bfloat16 ones, scales, biases and float tensors are
    identical, but ``ferrum.quant.quantize`` rounds ``q`` against the scales as stored (rounded to the
    half dtype) where ``mx.quantize`` uses them unrounded, in float32: some ``q`` differ by one step, and
    Ferrum's are the closer fit."""
    src = write_source(tmp_path / "src", kind, dtype)
    ours = quantize_checkpoint(src, tmp_path / "ferrum", bits=bits, group_size=group_size)
    theirs = tmp_path / "mlx"
    mlx_convert(hf_path=str(src), mlx_path=str(theirs), quantize=True, q_group_size=group_size, q_bits=bits)
    got, expected, source = tensors(ours), tensors(theirs), tensors(src)
    assert got.keys() == expected.keys()
    for name, array in expected.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape, name
        if dtype == "float32" or array.dtype != np.uint32:
            assert np.array_equal(got[name], array), name
            continue
        module = name.removesuffix(".weight")
        mine, theirs_q = (QuantizedWeight(t[name], t[f"{module}.scales"], t[f"{module}.biases"], bits, group_size)
                          for t in (got, expected))
        assert np.abs(unpack(mine.packed, bits).astype(int) - unpack(theirs_q.packed, bits)).max() <= 1, name
        dense = source[name].astype(np.float32)
        assert np.square(dequantize(mine) - dense).sum() <= np.square(dequantize(theirs_q) - dense).sum() * (1 + 1e-6)
    scales = [a for n, a in got.items() if n.endswith(".scales")]
    assert scales and all(a.dtype.name == dtype for a in scales)
    ours_quant, their_quant = config_of(ours)["quantization"], config_of(theirs)["quantization"]
    kept_float = {k for k, v in ours_quant.items() if v is False}
    assert {k: v for k, v in ours_quant.items() if k not in kept_float} == their_quant
    assert kept_float == (set() if group_size == 32 else {f"model.layers.{i}.mlp.down_proj" for i in range(2)})


def _granite(folder: Path) -> Path:
    config = dict(model_type="granite", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0,
                  tie_word_embeddings=False, embedding_multiplier=12.0, residual_multiplier=0.22,
                  attention_multiplier=0.0078125, logits_scaling=8.0, attention_bias=False, mlp_bias=False)
    write_random_checkpoint(folder, config, dtype="float32", std=0.2)
    write_tokenizer(folder)
    return folder


def _grouped_moe(folder: Path, family: str) -> Path:
    """A tiny GLM-4.5 or DeepSeek-V3 (grouped sigmoid routing) with the top-level rope keys of their released
    configs, which mlx-lm's model arguments read."""
    import torch
    import transformers

    common = dict(vocab_size=300, hidden_size=128, intermediate_size=128, moe_intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                  topk_group=1, n_shared_experts=1, first_k_dense_replace=1, max_position_embeddings=256,
                  tie_word_embeddings=False)
    config = (transformers.Glm4MoeConfig(**common, num_key_value_heads=2, head_dim=32, partial_rotary_factor=0.5)
              if family == "glm4_moe" else
              transformers.DeepseekV3Config(**common, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=64,
                                            qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32))
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    raw = config_of(folder)
    rope = raw.pop("rope_parameters")
    raw.update(rope_theta=rope["rope_theta"], rope_scaling=None,
               partial_rotary_factor=rope.get("partial_rotary_factor", 1.0))
    (folder / "config.json").write_text(json.dumps(raw))
    write_tokenizer(folder)
    return folder


@needs_mlx
@pytest.mark.parametrize("family", ["glm4_moe", "deepseek_v3"])
def test_a_router_mlx_lm_holds_as_a_parameter_stays_float(tmp_path, family):
    """GLM-4.5's and DeepSeek-V3's routers are plain parameters in mlx-lm (its MoEGate), which its conversion
    leaves in float and its loader refuses packed ("parameters not in model: ...mlp.gate.scales")."""
    src = _grouped_moe(tmp_path / "src", family)
    ours = quantize_checkpoint(src, tmp_path / "ferrum", bits=4, group_size=32)
    got = tensors(ours)
    assert got["model.layers.1.mlp.gate.weight"].dtype == np.float32 and "model.layers.1.mlp.gate.scales" not in got
    assert config_of(ours)["quantization"]["model.layers.1.mlp.gate"] is False
    mlx_convert(hf_path=str(src), mlx_path=str(tmp_path / "mlx"), quantize=True, q_group_size=32, q_bits=4)
    assert tensors(tmp_path / "mlx")["model.layers.1.mlp.gate.weight"].dtype == np.float32  # as mlx-lm writes it
    theirs = mlx_lm_logits(ours)  # mlx-lm loads Ferrum's output
    if family == "glm4_moe":  # (mlx-lm re-quantizes DeepSeek-V3's kv_b_proj as it loads it: not comparable)
        assert_close(ferrum_logits(ours, "cpu"), theirs)


@needs_mlx
@pytest.mark.parametrize("family", ["qwen3_moe", "granite"])
def test_modules_mlx_lm_keeps_at_8_bits_are_written_so(tmp_path, family):
    """mlx-lm's model classes keep some modules at 8 bits, group size 64 (a MoE's router; Granite's o_proj,
    down_proj and LM head): the same tensors and config.json entries, bit for bit (they were packed at 3 bits)."""
    from support import write_tiny_qwen3_moe

    src = (write_tiny_qwen3_moe if family == "qwen3_moe" else _granite)(tmp_path / "src")
    ours = quantize_checkpoint(src, tmp_path / "ferrum", bits=3, group_size=32)
    mlx_convert(hf_path=str(src), mlx_path=str(tmp_path / "mlx"), quantize=True, q_group_size=32, q_bits=3)
    got, expected = tensors(ours), tensors(tmp_path / "mlx")
    assert got.keys() == expected.keys()
    for name, array in expected.items():
        assert got[name].dtype == array.dtype and np.array_equal(got[name], array), name
    ours_quant, their_quant = config_of(ours)["quantization"], config_of(tmp_path / "mlx")["quantization"]
    eight_bit = {k for k, v in their_quant.items() if isinstance(v, dict) and v.get("bits") == 8}
    assert eight_bit and {k: v["bits"] for k, v in ours_quant.items() if k in eight_bit} == dict.fromkeys(eight_bit, 8)
    assert_close(ferrum_logits(ours, "cpu"), mlx_lm_logits(tmp_path / "mlx"))


@needs_mlx
def test_per_head_norm_tensors_are_copied_as_mlx_lm_keeps_them(tmp_path):
    """StableLM 2 12B keeps a q/k LayerNorm a head, one tensor each (``q_layernorm.norms.<h>.weight``): quantize
    copies them as they are (it looked for one stacked tensor), and both runtimes agree on the output."""
    config = dict(model_type="stablelm", vocab_size=300, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0,
                  partial_rotary_factor=0.25, qk_layernorm=True, use_parallel_residual=True, use_qkv_bias=False,
                  layer_norm_eps=1e-5, tie_word_embeddings=False)
    src = write_random_checkpoint(tmp_path / "src", config, dtype="float32", std=0.2)
    write_tokenizer(src)
    assert "model.layers.0.self_attn.q_layernorm.norms.3.weight" in tensors(src)
    dst = quantize_checkpoint(src, tmp_path / "q", bits=8, group_size=32)
    assert {n for n in tensors(dst) if ".norms." in n} == {n for n in tensors(src) if ".norms." in n}
    assert_close(ferrum_logits(dst, "cpu"), mlx_lm_logits(dst))


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("section", [{"quant_method": "gptq", "bits": 4, "group_size": 32},
                                     {"quant_method": "fp8", "activation_scheme": "dynamic"}],
                         ids=["gptq", "fp8"])
def test_mlx_packed_weights_under_another_quantization_section_are_named(sources, tmp_path, section):
    """MLX's weight/scales/biases with a GPTQ or FP8 section copied over config.json: the disagreement is named
    (a bare KeyError had come out of the float-mode tables)."""
    dst = quantize_checkpoint(sources["tied"], tmp_path / "q", bits=4, group_size=32)
    config = json.loads((dst / "config.json").read_text())
    config["quantization"] = config["quantization_config"] = section
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"MLX's packed layout, but config.json's quantization section says "
                                              f"'{section['quant_method']}'"):
        ferrum.load(dst, backend="cpu")


def test_bad_input_is_refused_before_writing(sources, tmp_path, capsys):
    src = sources["tied"]
    dst = tmp_path / "out"
    for bits, group_size in ((7, 64), (1, 64), (4, 16), (4, 256)):
        with pytest.raises(InvalidRequestError, match="is not supported; .* must be one of"):
            quantize_checkpoint(src, dst, bits=bits, group_size=group_size)
    with pytest.raises(CheckpointError, match="is not a folder"):
        quantize_checkpoint(tmp_path / "missing", dst)
    quantized = quantize_checkpoint(src, tmp_path / "q4")
    with pytest.raises(InvalidRequestError, match="already quantized"):
        quantize_checkpoint(quantized, dst)
    assert not dst.exists()

    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(InvalidRequestError, match="pass --force"):
        quantize_checkpoint(src, dst)
    assert (dst / "keep.txt").exists()
    with pytest.raises(InvalidRequestError, match="would delete it"):
        quantize_checkpoint(src, src.parent, force=True)
    quantize_checkpoint(src, dst, force=True)
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").exists()

    for argv, message in (
        (["quantize", str(src), str(tmp_path / "x"), "--bits", "7"], "7-bit quantization is not supported"),
        (["quantize", str(tmp_path / "missing"), str(tmp_path / "x")], "no checkpoint folder"),
        (["quantize", str(quantized), str(tmp_path / "x")], "already quantized"),
        (["quantize", str(src), str(dst)], "pass --force"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("ferrum: error: ") and message in err and err.count("\n") == 1, err
        assert "Traceback" not in err
    assert not (tmp_path / "x").exists()


@needs_mlx
def test_config_states_untied_embeddings_for_mlx_lm(tmp_path):
    """Hugging Face reads a missing tie_word_embeddings as false, mlx-lm as true: the output spells it out."""
    src = write_source(tmp_path / "src", "untied")
    config = config_of(src)
    del config["tie_word_embeddings"]
    (src / "config.json").write_text(json.dumps(config))
    dst = quantize_checkpoint(src, tmp_path / "q", bits=8, group_size=32)
    assert config_of(dst)["tie_word_embeddings"] is False and "lm_head.scales" in tensors(dst)
    assert_close(ferrum_logits(dst, "mlx"), mlx_lm_logits(dst))


def test_interrupted_run_leaves_nothing(sources, tmp_path):
    def interrupt(done: int, total: int, name: str) -> None:
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(sources["untied"], tmp_path / "out", progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_matrices_a_group_size_does_not_divide_stay_float_with_a_warning(sources, tmp_path):
    """mlx-lm keeps them in float without a word; a 128-wide group over 64-wide inputs packs almost nothing."""
    widths = {shape[-1] for shape in (tensor.shape for tensor in tensors(sources["untied"]).values())}
    group = 128
    assert any(width % group for width in widths)
    with pytest.warns(UserWarning, match=f"not a multiple of --group-size {group} wide and stay in float"):
        quantize_checkpoint(sources["untied"], tmp_path / "q", bits=4, group_size=group)


def test_the_chat_templates_come_along(tmp_path):
    """chat_template.jinja and the named ones transformers keeps in additional_chat_templates/ (a tool_use one
    rendered requests with tools; the quantized copy lost it)."""
    from ferrum.tokenizer import Tokenizer

    src = write_source(tmp_path / "src", "untied")
    (src / "chat_template.jinja").write_text("plain {{ messages[0].content }}")
    (src / "additional_chat_templates").mkdir()
    (src / "additional_chat_templates" / "tool_use.jinja").write_text("tools {{ messages[0].content }}")
    dst = quantize_checkpoint(src, tmp_path / "q", bits=8, group_size=32)
    tokenizer, messages = Tokenizer(dst), [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages) == "plain hi"
    assert tokenizer.apply_chat_template(messages, tools=[{"type": "function", "function": {"name": "f"}}]) == \
        "tools hi"


def test_the_output_may_be_named_dot_and_dead_runs_leave_nothing(tmp_path, monkeypatch):
    """``ferrum quantize SRC .`` crashed ("PosixPath('.') has an empty name"); the staging folder of a run
    killed outright (a model's size, hidden) is removed by the next run into the same folder, one of a live
    process is not."""
    import subprocess
    import sys

    src = write_source(tmp_path / "src", "untied")
    out = tmp_path / "out"
    out.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".out.partial-{int(gone.stdout)}"
    (dead / "half").mkdir(parents=True)
    alive = tmp_path / f".out.partial-{os.getppid()}"
    alive.mkdir()
    monkeypatch.chdir(out)
    assert quantize_checkpoint(src, ".", bits=8, group_size=32) == out
    assert (out / "config.json").exists() and "lm_head.scales" in tensors(out)
    assert not dead.exists() and alive.exists()


def _hybrid_configs() -> dict:
    """The hybrid families' tiny configs from their own tests: Gated DeltaNet, Mamba-2 (with and without experts),
    short convolutions."""
    import test_granitemoehybrid
    import test_lfm2
    import test_nemotron_h
    import test_qwen3_5

    return {"qwen3_5_text": test_qwen3_5.text_config, "granitemoehybrid": test_granitemoehybrid.VARIANTS["dense"],
            "granitemoehybrid_moe": test_granitemoehybrid.VARIANTS["moe"], "lfm2": test_lfm2.lfm2_config,
            "nemotron_h": test_nemotron_h.VARIANTS["nano2"]}


@pytest.mark.parametrize("family", ["qwen3_5_text", "granitemoehybrid", "granitemoehybrid_moe", "lfm2", "nemotron_h"])
def test_hybrid_checkpoints_quantize_and_run(tmp_path, family):
    """Their convolution taps ([C, 1, K], 3-D) were taken for a fused gate/up stack of experts, and ferrum quantize
    failed on every hybrid but Qwen3-Next's and Qwen3.5-MoE's: now the projections are packed, the taps stay float,
    and the packed model computes what its weights dequantized by MLX compute."""
    mx = pytest.importorskip("mlx.core")
    from safetensors.numpy import load_file

    from ferrum.model import DecoderOnlyLLM
    from support import build_transformers_model, scaled_error

    config = _hybrid_configs()[family]()
    build_transformers_model(tmp_path / "float", config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        packed = quantize_checkpoint(tmp_path / "float", tmp_path / "packed", bits=8, group_size=32)
    # the taps are no matrices a smaller group size would pack: the warning about those leaves them out
    assert not any("conv" in str(w.message) for w in caught), [str(w.message) for w in caught]
    stored = load_file(str(packed / "model.safetensors"))
    assert any(n.endswith(("in_proj.scales", "in_proj_qkv.scales")) for n in stored)  # the mixer's input, packed
    assert not any(("conv" in n.rsplit(".", 2)[-2]) and n.endswith(".scales") for n in stored)  # its taps, float
    floats = {}
    for name, array in stored.items():
        module = name.removesuffix(".weight")
        if name.endswith((".scales", ".biases")) and f"{name.rsplit('.', 1)[0]}.scales" in stored:
            continue
        floats[name] = array if f"{module}.scales" not in stored else np.array(mx.dequantize(
            mx.array(array), mx.array(stored[f"{module}.scales"]), mx.array(stored[f"{module}.biases"]),
            group_size=32, bits=8)).astype(np.float32)
    (tmp_path / "dequantized").mkdir()
    save_file(floats, str(tmp_path / "dequantized" / "model.safetensors"), metadata={"format": "pt"})
    meta = json.loads((packed / "config.json").read_text())
    meta.pop("quantization")
    meta.pop("quantization_config", None)
    (tmp_path / "dequantized" / "config.json").write_text(json.dumps(meta))
    tokens = [int(t) for t in np.random.RandomState(0).randint(0, config.vocab_size, size=13)]
    want = DecoderOnlyLLM.from_pretrained(tmp_path / "dequantized", backend="cpu").forward_verify("f", tokens)
    got = DecoderOnlyLLM.from_pretrained(packed, backend="cpu").forward_verify("p", tokens)
    assert scaled_error(got, want) <= 1e-5
