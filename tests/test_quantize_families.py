"""``ferrum quantize`` on the releases of the mlx-lm-only families that have no quantize test of their own: mlx-lm's
``load_model`` reads the output (names, which modules stay in float, which take 8 bits) and runs it as Ferrum does,
and where mlx-lm's own conversion of the release works, every tensor both write is the same and mlx-lm's logits of
the two are one model's.

Each release is its family module's own (its module-scoped fixture, built once a session: ``built_once``), packed at
8 bits in groups of 32, the fastest format that still checks the 8-bit modules' groups of 64.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest

from support import float32_model, mlx_lm_logits, runnable_backends, scaled_error

pytestmark = pytest.mark.skipif("mlx" not in runnable_backends(), reason="mlx-lm needs MLX")

#: module -> (its release fixture (":variant" where it holds several), whether mlx-lm's conversion of that release
#: runs: Nemotron NAS's release names and Kimi K2's config fail mlx-lm 0.32.2's convert, Gear's and LongCat-Flash-Lite's
#: configs transformers' tokenizer loading in it; then the tensors stored otherwise by design: Baichuan-M1's head,
#: normed in float32 by numpy's sums and MLX's, which round differently in the last place).
FAMILIES = {
    "test_deepseek": ("build_checkpoints", True),  # the router a plain parameter in mlx-lm: float
    "test_klear": ("build_checkpoints", True),  # the router at 8 bits in groups of 64
    "test_kimi_k2": ("kimi", False),  # DeepSeek-V3's float router
    "test_spark2_5": ("release", True),  # g_proj float (mlx-lm's quant_predicate)
    "test_rwkv7": ("built", True),  # the embedding and the LoRAs' up-projections at 8 bits in groups of 64
    "test_nemotron_nas": ("built", False),  # the linear sub-blocks under mlx-lm's names
    "test_qwen1": ("release", True),
    "test_telechat3": ("releases:biased", True),  # plain rope: mlx-lm runs telechat3-yarn as YaRN's own factor
    "test_lille130m": ("release", True),
    "test_talkie": ("release", True),
    "test_nanbeige": ("release", True),
    "test_openelm": ("built", True),
    "test_plamo": ("release", True),
    "test_plamo2": ("release", True),
    "test_plamo3": ("release", True),
    "test_gear": ("release", False),
    "test_iquestloopcoder": ("release", True),
    "test_baichuan_m1": ("release", True, "lm_head"),
    "test_muse_glimmer": ("release", True),
    "test_bailing_moe_linear": ("checkpoints", True),
    # the release's names (the experts stacked under moe.<proj>, which sanitize moves) and zero-centred norms, which
    # sanitize adds 1 to in mlx-lm's conversion
    "test_step3p5": ("release", True, "norm"),
    "test_longcat_flash_ngram": ("releases", False),  # the embedding under mlx-lm's ngram_embeddings.word_embeddings
    "test_kimi_k3": ("release", True),  # the router at 8 bits in groups of 64 (mlx-lm's quant_predicate)
}


def _first_release(built) -> Path | None:
    """The first checkpoint folder in a fixture's value (a folder, or tuples / dicts holding some)."""
    if isinstance(built, Path) and (built / "config.json").exists():
        return built
    for value in built.values() if isinstance(built, dict) else built if isinstance(built, (tuple, list)) else ():
        found = _first_release(value)
        if found is not None:
            return found
    return None


@pytest.fixture
def release(request, tmp_path_factory, built_once):
    """(the family module, its release's folder)."""
    module = importlib.import_module(request.param)
    fixture, _, variant = FAMILIES[request.param][0].partition(":")
    build = getattr(module, fixture)
    built = built_once(getattr(build, "__wrapped__", build), tmp_path_factory)
    return module, _first_release(built[variant] if variant else built)


@pytest.mark.parametrize("release", FAMILIES, indirect=True)
def test_ferrum_quantize_is_what_mlx_lm_loads(release, tmp_path):
    from mlx_lm.convert import convert
    from safetensors.numpy import load_file

    from ferrum.quant.convert import quantize_checkpoint

    module, folder = release
    tokens, (_, converts, *otherwise) = module.TOKENS, FAMILIES[module.__name__]
    ours = quantize_checkpoint(folder, tmp_path / "ferrum", bits=8, group_size=32)
    want = mlx_lm_logits(ours, tokens)  # mlx-lm's load refuses a tensor it lacks and one it has no place for
    if converts:
        # in float32, as Ferrum packs a float32 release (mlx-lm's default casts it to config.json's torch_dtype)
        convert(str(folder), str(tmp_path / "mlx"), quantize=True, q_bits=8, q_group_size=32, dtype="float32")
        got, theirs = load_file(str(ours / "model.safetensors")), load_file(str(tmp_path / "mlx" / "model.safetensors"))
        for name in [n for n in got.keys() & theirs.keys() if not any(part in n for part in otherwise)]:
            assert got[name].dtype == theirs[name].dtype and np.array_equal(
                got[name].reshape(-1), theirs[name].reshape(-1)), name
        assert scaled_error(want, mlx_lm_logits(tmp_path / "mlx", tokens)) <= 1e-5
    assert scaled_error(float32_model(ours).forward_verify("q", tokens), want) <= 2e-3
