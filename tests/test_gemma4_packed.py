"""mlx-community's packed Gemma 4 conversions in the release layout (31B's, E2B / E4B's and 26B-A4B's): sliding
layers' heads narrower than the full layers', and (31B, 26B-A4B) full layers with fewer key/value heads that are
their values too, so Ferrum pads each padded layer's packed q/k/v rows and o_proj groups, and repeats its packed
key rows, as they are stored. Against mlx-lm's own model on every runnable backend, at 4 and 8 bits and in mxfp4;
the same conversions dequantized by mlx-lm run by Ferrum's float path; the multimodal wrapper's layout, as
mlx-community's repos hold it; ``ferrum quantize``'s output read by mlx-lm; a group size that would cut a head in two
refused by name."""

from __future__ import annotations

import json
from functools import cache

import numpy as np
import pytest
import torch

from ferrum.errors import UnsupportedFeatureError
from ferrum.model import DecoderOnlyLLM
from support import (
    assert_forward_and_decode_match, mlx_lm_logits, randomized_reference, runnable_backends, scaled_error,
    write_tokenizer,
)
from test_gemma4 import gemma4_config
from test_gemma4_e import e_config
from test_gemma4_moe import moe_config, randomized

convert = pytest.importorskip("mlx_lm.convert")

BACKENDS = runnable_backends()
#: Longer than the window of 6, so sliding layers drop keys inside the prompt.
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, 97, size=16)]
GROUP = 32
#: Sliding heads of 32 dims padded to the full layers' 64: whole groups of 32 inputs in o_proj.
HEADS = dict(head_dim=32, global_head_dim=64)
#: variant -> (its transformers config, the keys releases write in place of transformers 5.24's
#: per_layer_config, which mlx-lm reads).
VARIANTS = {
    "31b": (lambda: gemma4_config(**HEADS), dict(global_head_dim=64, num_global_key_value_heads=1)),
    "e2b": (lambda: e_config(**HEADS), dict(global_head_dim=64)),
    "26b_a4b": (lambda: moe_config(**HEADS, moe_intermediate_size=32, intermediate_size=96),
                dict(global_head_dim=64, num_global_key_value_heads=1)),
}
#: (variant, mlx-lm's quantization mode, bits). Not E2B's in mxfp4: its power-of-two scales round most of these
#: random weights to zero, and the per-layer inputs' norms then amplify float32 rounding (mlx-lm's own logits on the
#: packed and the dequantized weights differ by 3e-4); Ferrum's packed and dequantized runs agree there exactly.
CASES = [(variant, mode, bits) for variant in VARIANTS for mode, bits in (("affine", 4), ("affine", 8), ("mxfp4", 4))
         if (variant, mode) != ("e2b", "mxfp4")]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """variant -> the folder of a random checkpoint as releases store it (transformers' tensors, release keys)."""

    @cache
    def folder(variant: str):
        make, keys = VARIANTS[variant]
        config = make()
        if config.enable_moe_block:
            model = randomized(config)
        else:
            model = randomized_reference(config)
            with torch.no_grad():  # a buffer, so randomized_reference leaves it at 1
                for i, layer in enumerate(model.model.layers):
                    layer.layer_scalar.fill_(0.6 + 0.1 * i)
        out = tmp_path_factory.mktemp(variant)
        model.save_pretrained(out)
        raw = json.loads((out / "config.json").read_text())
        raw.pop("per_layer_config")
        (out / "config.json").write_text(json.dumps({**raw, **keys}))
        write_tokenizer(out, 120)
        return out

    return folder


@pytest.fixture(scope="module")
def conversions(release, tmp_path_factory):
    """(variant, mode, bits, dequantized) -> mlx-lm's conversion (group size 32), and mlx-lm's logits on it."""

    @cache
    def converted(variant: str, mode: str, bits: int, dequantized: bool = False):
        out = tmp_path_factory.mktemp(f"{variant}_{mode}{bits}") / ("float" if dequantized else "packed")
        if dequantized:
            convert.convert(str(converted(variant, mode, bits)[0]), str(out), dequantize=True)
        else:
            convert.convert(str(release(variant)), str(out), quantize=True, q_mode=mode, q_bits=bits,
                            q_group_size=GROUP, dtype="float32")
        return out, mlx_lm_logits(out, TOKENS)

    return converted


@pytest.mark.parametrize("variant,mode,bits", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_conversions_run_as_mlx_lm_runs_them(conversions, backend, variant, mode, bits):
    """The sliding layers' packed q_proj holds heads of 32 dims, padded to 64 at load; Ferrum's logits are mlx-lm's."""
    from safetensors import safe_open

    folder, want = conversions(variant, mode, bits)
    with safe_open(str(folder / "model.safetensors"), framework="numpy") as f:
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight").get_shape() == [4 * 32, 64 * bits // 32]
        assert ("model.layers.2.self_attn.v_proj.weight" in f.keys()) == (variant == "e2b")  # k_eq_v: no v_proj
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    assert model.config.arch.layers[0].heads.head_dim == 32
    assert_forward_and_decode_match(model, TOKENS, want)


@pytest.mark.parametrize("variant,mode,bits", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dequantized_conversions_run_as_the_packed_ones(conversions, backend, variant, mode, bits):
    """mlx-lm's dequantization of each conversion, run by Ferrum's float path, gives the packed model's logits: the
    packed rows and groups are padded exactly as the float ones, and stay packed."""
    packed = DecoderOnlyLLM.from_pretrained(conversions(variant, mode, bits)[0], backend=backend, dtype="float32")
    folder, want = conversions(variant, mode, bits, dequantized=True)
    dense = DecoderOnlyLLM.from_pretrained(folder, backend=backend, dtype="float32")
    floats = dense.forward_verify("d", TOKENS)
    assert scaled_error(floats, want) <= 1e-4  # mlx-lm agrees on the float weights
    assert scaled_error(packed.forward_verify("p", TOKENS), floats) <= 1e-5
    for layer in (packed.layers[0], packed.layers[2]):  # padded heads, repeated key/value heads: still packed
        assert [linear.dense_dtype for linear in (*layer.qkv.linears, layer.o)] == [None] * (len(layer.qkv.linears) + 1)


@pytest.fixture(scope="module")
def wrapped(release, tmp_path_factory):
    """mlx-lm's 4-bit conversion of E2B's layout saved as Google releases it, in the multimodal gemma4 wrapper (the
    decoder under model.language_model.*): what mlx-community's repos hold (language_model.model.*, the
    quantization section beside text_config), and mlx-lm's logits on it."""
    from safetensors.numpy import load_file, save_file

    source, folder = tmp_path_factory.mktemp("wrapper"), release("e2b")
    text = json.loads((folder / "config.json").read_text())
    save_file({name.replace("model.", "model.language_model.", 1): t
               for name, t in load_file(folder / "model.safetensors").items()},
              source / "model.safetensors", metadata={"format": "pt"})
    (source / "config.json").write_text(json.dumps({
        "model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"], "text_config": text,
        "vision_config": {"model_type": "gemma4_vision"}, "vocab_size": text["vocab_size"],
        "tie_word_embeddings": True}))
    write_tokenizer(source, 120)
    out = tmp_path_factory.mktemp("wrapper_mlx") / "out"
    convert.convert(str(source), str(out), quantize=True, q_bits=4, q_group_size=GROUP, dtype="float32")
    return out, mlx_lm_logits(out, TOKENS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_wrapper_layout_of_mlx_community_runs_as_mlx_lm_runs_it(wrapped, backend):
    from safetensors import safe_open

    folder, want = wrapped
    with safe_open(str(folder / "model.safetensors"), framework="numpy") as f:
        assert "language_model.model.layers.0.self_attn.o_proj.scales" in f.keys()
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    assert_forward_and_decode_match(model, TOKENS, want)


@pytest.mark.filterwarnings("ignore:.*stay in float")  # E2B's per-layer projections, 16 wide, as mlx-lm keeps them
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_ferrum_quantize_runs_as_mlx_lm_runs_its_output(release, backend, variant, tmp_path):
    """`ferrum quantize` of a release-layout checkpoint packs its padded layers as mlx-lm does: mlx-lm's logits on
    the folder are Ferrum's."""
    from ferrum.quant.convert import quantize_checkpoint

    out = quantize_checkpoint(release(variant), tmp_path / "q", bits=4, group_size=GROUP)
    got = DecoderOnlyLLM.from_pretrained(out, backend=backend, dtype="float32").forward_verify("q", TOKENS)
    assert scaled_error(got, mlx_lm_logits(out, TOKENS)) <= 1e-5


def test_a_group_size_that_cuts_heads_is_refused_at_load(release, tmp_path):
    """At group size 64 a sliding layer's heads of 32 inputs share groups in o_proj, so padding them would need new
    scales: mlx-lm's conversion is refused by the tensor's name, with the group sizes that would do."""
    convert.convert(str(release("31b")), str(tmp_path / "mlx"), quantize=True, q_bits=4, q_group_size=64)
    with pytest.raises(UnsupportedFeatureError, match=r"model\.layers\.0\.self_attn\.o_proj\.weight: .* group size "
                                                      r"64 .* quantize with group size 32, or"):
        DecoderOnlyLLM.from_pretrained(tmp_path / "mlx", backend="cpu", dtype="float32")


def test_ferrum_quantize_refuses_a_group_size_that_cuts_heads(release, tmp_path):
    """`ferrum quantize` does not write what Ferrum would refuse to load: it refuses before it writes anything."""
    from ferrum.quant.convert import quantize_checkpoint

    with pytest.raises(UnsupportedFeatureError, match=r"model\.layers\.0\.self_attn\.o_proj\.weight: .* group size "
                                                      "64"):
        quantize_checkpoint(release("31b"), tmp_path / "q", bits=4, group_size=64)
    assert not (tmp_path / "q").exists()
