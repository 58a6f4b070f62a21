"""Kimi K3's attention residuals (``attn_res_block_size``, :mod:`ferrum.arch.attn_res`): each sub-layer reads a
softmax mix of the stored blocks' outputs and the running sum, as mlx-lm's kimi_k3 runs them; against mlx-lm's own
model of a random release (``<mix>.proj_weight`` / ``.norm_weight``, which mlx-lm's sanitize renames) and of
mlx-lm's conversions. The last layer is latent attention, so without the blocks carried a pass would be narrowed to
its logit rows there."""

from __future__ import annotations

from dataclasses import replace

import pytest
from safetensors.numpy import load_file

from ferrum.config import ModelConfig
from ferrum.model import ForwardItem
from ferrum.recurrent.snapshots import DEFAULT_BUDGET
from mlx_lm_release import model_logits
from support import (
    assert_engine_keeps_greedy_tokens, assert_every_backend_runs_it_as_mlx_lm, assert_forward_and_decode_match,
    float32_model, mlx_lm_converted, runnable_backends, scaled_error, small_pool_engine, staggered_greedy_workload,
)
from test_kimi_k3 import TOKENS, VOCAB, build, text_config

pytest.importorskip("mlx_lm.models.kimi_k3")

BACKENDS = runnable_backends()


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Blocks of 2 layers (3 stored by the output's mix: the embeddings and two blocks' sums), KDA then latent
    attention twice, latent experts."""
    section = dict(num_heads=3, head_dim=8, short_conv_kernel_size=4, kda_layers=[1, 3])
    config = {**text_config(attn_res_block_size=2, linear_attn_config=section, routed_expert_hidden_size=32),
              "model_type": "kimi_k3"}
    return build(tmp_path_factory.mktemp("kimi_k3_attn_res"), config, seed=5)


def test_the_release_names_are_read(release):
    folder, _ = release
    stored = load_file(folder / "model.safetensors")
    assert stored["model.layers.1.self_attention_res.proj_weight"].shape == (1, 64)
    assert {"model.output_attn_res.norm_weight", "model.layers.3.mlp_res.norm_weight"} <= set(stored)
    arch = float32_model(folder).config.arch
    assert arch.attn_res.block_size == 2 and [s.mixer for s in arch.layers][-1] == "attention"


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_and_decode_steps_match_mlx_lm(release, backend):
    folder, reference = release
    assert_forward_and_decode_match(float32_model(folder, backend), TOKENS, model_logits(reference.model, TOKENS))


def test_a_plain_residual_in_place_of_the_mixes_misses(release, monkeypatch):
    """Control: attention residuals dropped (each layer's outputs summed into one stream) misses mlx-lm."""
    folder, reference = release
    read = ModelConfig.from_file
    monkeypatch.setattr(ModelConfig, "from_file", staticmethod(
        lambda path: replace(read(path), arch=replace(read(path).arch, attn_res=None))))
    with pytest.warns(UserWarning):  # their tensors unread
        model = float32_model(folder)
    assert scaled_error(model.forward_verify("c", TOKENS), model_logits(reference.model, TOKENS)) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_batching_chunking_and_preemption_give_each_requests_greedy_tokens(release, backend):
    folder, reference = release
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, backend, **config), reference,
                                      staggered_greedy_workload(VOCAB, count=6))


def test_decode_after_a_prefix_cache_hit_matches_mlx_lm(release):
    """A sequence adopting another's 16 cached tokens runs 4 more prompt tokens and decodes one as mlx-lm's full
    passes do (the mixes are each token's own: nothing of them is cached)."""
    folder, reference = release
    model = float32_model(folder, num_kv_blocks=64, block_size=4)
    model.snapshots.budget = DEFAULT_BUDGET
    model.prefill("first", TOKENS[:16])
    match = model.kv.match_prefix(TOKENS)
    assert match.num_tokens == 16
    model.kv.adopt("hit", TOKENS, match)
    out = model.forward([ForwardItem("hit", TOKENS[16:20], 16)], all_logits=True)
    assert scaled_error(model.ops.to_numpy(out.logits), model_logits(reference.model, TOKENS[:20])[16:]) <= 1e-4
    assert scaled_error(model.decode("hit", TOKENS[20], 20), model_logits(reference.model, TOKENS)[20]) <= 1e-4


@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_s_conversions_run_as_mlx_lm_runs_them(release, tmp_path, bits):
    """mlx_lm.convert's output: the mixes under mlx-lm's names (<mix>_proj.weight, kept float when packed: its
    quant_predicate); float within 1e-4 of mlx-lm's logits of it, packed at 4 bits within 2e-3."""
    stored, want = mlx_lm_converted(release[0], tmp_path / "converted", TOKENS, bits=bits, group=32)
    assert stored["language_model.model.layers.0.mlp_res_proj.weight"].shape == (1, 64)
    assert "language_model.model.output_attn_res_norm.weight" in stored
    assert_every_backend_runs_it_as_mlx_lm(tmp_path / "converted", TOKENS, want, packed=bits is not None)





def test_ferrum_quantize_keeps_the_mixes_float_as_mlx_lm_does(release, tmp_path):
    """``ferrum quantize`` of the release (the mixes' ``proj_weight`` 64 wide, a multiple of the group size) leaves
    each mix's projection float, as mlx-lm's quant_predicate does (its load and Ferrum's refuse one packed), and
    packs the rest: mlx-lm loads the output, and every backend runs it as mlx-lm does."""
    from ferrum.quant.convert import quantize_checkpoint
    from support import mlx_lm_logits

    ours = quantize_checkpoint(release[0], tmp_path / "ferrum", bits=4, group_size=32)
    stored = load_file(ours / "model.safetensors")
    mixes = [name for name in stored if name.endswith("_res.proj_weight")]
    assert len(mixes) == 2 * 4 + 1 and all(stored[name].shape == (1, 64) for name in mixes)
    assert stored[mixes[0]].dtype == "float32" and not any("_res.proj" in n and "scales" in n for n in stored)
    assert stored["model.layers.1.self_attn.q_a_proj.weight"].dtype == "uint32"  # the rest packed
    assert_every_backend_runs_it_as_mlx_lm(ours, TOKENS, mlx_lm_logits(ours, TOKENS), packed=True)
