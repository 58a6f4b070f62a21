"""ferrum.random_checkpoint (benchmarks, the plugin conformance kit) on the families added since its last check: each
family test's tiny config written with random weights loads and runs (Phixtral's expert biases written per expert,
as its loader reads them; AFM's one-number steps written as arrays)."""

from __future__ import annotations

import numpy as np
import pytest

import test_afm7
import test_hunyuan
import test_iquestloopcoder
import test_kimi_k3
import test_longcat_flash_ngram
import test_phixtral
from ferrum.model import DecoderOnlyLLM
from ferrum.random_checkpoint import write_random_checkpoint

CONFIGS = {
    "kimi_k3": lambda: {**test_kimi_k3.text_config(), "model_type": "kimi_k3"},
    "hunyuan": test_hunyuan.hunyuan_config,
    "phixtral": test_phixtral.phixtral_config,
    "afm7": lambda: test_afm7.CONFIG,
    "iquestloopcoder": lambda: test_iquestloopcoder.CONFIG,
    "longcat_flash_ngram": lambda: test_longcat_flash_ngram.RELEASE,
}


@pytest.mark.parametrize("family", list(CONFIGS))
def test_a_random_checkpoint_of_the_family_loads_and_runs(family, tmp_path):
    folder = write_random_checkpoint(tmp_path / family, CONFIGS[family](), dtype="float32", std=0.1)
    model = DecoderOnlyLLM.from_pretrained(folder, backend="cpu", dtype="float32")
    logits = np.asarray(model.forward_verify("x", [1, 2, 3, 4]))
    assert logits.shape[0] == 4 and np.isfinite(logits).all() and logits.std() > 0


@pytest.mark.parametrize("std", [0.02, 1.0])
def test_afm_steps_are_positive_and_near_mlx_lms_one(std, tmp_path):
    """AFM's key and value steps (mlx-lm initialises each to 1.0) are drawn near 1 and positive whatever the
    weights' std: a step near zero or below it would make the int8 grid degenerate."""
    from safetensors.numpy import load_file

    folder = write_random_checkpoint(tmp_path / "afm", test_afm7.CONFIG, dtype="float32", std=std)
    steps = [v for name, v in load_file(folder / "model.safetensors").items() if name.endswith("_scale")]
    config = test_afm7.CONFIG
    assert len(steps) == 2 * (config["num_layers"] - config["num_kv_reuse_layers"])  # the layers keeping K/V
    assert all(v.shape == () for v in steps) and len({float(v) for v in steps}) == len(steps)
    assert all(0.5 < float(v) < 2.0 for v in steps)
