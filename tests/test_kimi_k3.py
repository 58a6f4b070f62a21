"""Kimi K3 (``kimi_k3``: Moonshot's release ships remote code; mlx-lm's kimi_k3 runs it, transformers has no class):
Kimi Linear's Kimi Delta Attention and latent-attention layers with SiTU in every MLP and expert, the latent
attention's output gated, a full-rank or bounded KDA gate, routed with the dropped groups' experts masked with 0;
against mlx-lm's own model of a random checkpoint written under the release's names, on every runnable backend,
flat and wrapped (its text_config says "kimi_linear")."""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import replace

import numpy as np
import pytest

from ferrum.config import ModelConfig
from ferrum.errors import UnsupportedFeatureError
from ferrum.model import ForwardItem
from ferrum.moe.activation import Situ
from ferrum.recurrent.snapshots import DEFAULT_BUDGET
from mlx_lm_release import (
    MlxLmReference, assert_dropping_moves_mlx_lm_logits, model_logits, random_mlx_lm_model, write_release,
)
from support import (
    assert_a_failed_pass_leaves_every_state_as_it_was, assert_a_mixed_batch_gives_each_sequence_its_own_logits,
    assert_engine_keeps_greedy_tokens, assert_every_backend_runs_it_as_mlx_lm, assert_forward_and_decode_match,
    float32_model, mlx_lm_converted, runnable_backends, scaled_error, small_pool_engine, staggered_greedy_workload,
)

pytest.importorskip("mlx_lm.models.kimi_k3")

BACKENDS = runnable_backends()
VOCAB = 256
#: Longer than a chunk of the batched delta rule: its chunked form runs too.
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=21)]


def text_config(**extra) -> dict:
    """Three KDA layers (3 heads of 8) around one latent-attention layer (4 heads, q/k of 16 + 8 dims, values of 12,
    a query latent), SiTU capped on both sides, 8 experts in 2 groups (one kept), a shared expert, a dense first
    layer."""
    config = dict(model_type="kimi_linear", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4, intermediate_size=96, rms_norm_eps=1e-5,
                  max_position_embeddings=256,
                  linear_attn_config=dict(num_heads=3, head_dim=8, short_conv_kernel_size=4, kda_layers=[1, 3, 4]),
                  hidden_act="situ", activation_situ_beta=2.0, activation_situ_linear_beta=3.0, q_lora_rank=24,
                  kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, mla_use_nope=True,
                  mla_use_output_gate=True, num_experts=8, num_experts_per_token=2, num_shared_experts=1,
                  moe_intermediate_size=24, routed_scaling_factor=1.5, first_k_dense_replace=1, num_expert_group=2,
                  topk_group=1, tie_word_embeddings=False)
    return {**config, **extra}


def _draw(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray | None:
    """Decays of 1-16 a step, correction biases that change which experts (and groups) are chosen, gates and ups
    large enough that SiTU's caps bend them. (Biases that leave fewer than top-k kept experts above 0 would have a
    dropped group's experts chosen, all tied at 0, which mlx-lm's argpartition breaks as it happens to.)"""
    if name.endswith("A_log"):
        return np.log(rng.uniform(1, 16, shape))
    if name.endswith("dt_bias") or name.endswith("e_score_correction_bias"):
        return rng.normal(0.0, 0.5, shape)
    if name.endswith(("gate_proj.weight", "up_proj.weight")):
        return rng.standard_normal(shape) * 3.0 / np.sqrt(shape[-1])
    return None


def as_released(config: dict):
    """mlx-lm's sanitize inverted: q/k/v and their taps ([C, 1, K]) apart, A_log [1, 1, H, 1], kv_b_proj joined
    from embed_q / unembed_out, the sparse MLPs under block_sparse_moe with their experts one by one (w1 gate, w3
    up, w2 down) and the correction bias under the router."""
    text = config.get("text_config", config)
    width = text["linear_attn_config"]["num_heads"] * text["linear_attn_config"]["head_dim"]
    experts = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}

    def convert(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for name, value in tensors.items():
            name = name.removeprefix("language_model.")
            if ".qkv_proj." in name:
                for part, rows in zip("qkv", np.split(value, 3)):
                    out[name.replace("qkv_proj", f"{part}_proj")] = rows
            elif ".qkv_conv.conv." in name:
                for part, rows in zip("qkv", np.split(value, 3)):
                    out[name.replace("qkv_conv.conv", f"{part}_conv1d")] = np.swapaxes(rows, 1, 2)
            elif name.endswith("A_log"):
                out[name] = value.reshape(1, 1, -1, 1)
            elif name.endswith("embed_q.weight"):
                unembed = tensors["language_model." + name.replace("embed_q", "unembed_out")]
                kv_b = np.concatenate([np.swapaxes(value, 1, 2), unembed], axis=1).reshape(-1, value.shape[1])
                out[name.replace("embed_q", "kv_b_proj")] = kv_b
            elif name.endswith("unembed_out.weight"):
                continue
            elif ".mlp.switch_mlp." in name:
                stem, proj = name.split(".mlp.switch_mlp.")
                proj = proj.removesuffix(".weight")
                out.update({f"{stem}.block_sparse_moe.experts.{e}.{experts[proj]}.weight": value[e]
                            for e in range(value.shape[0])})
            elif ".mlp.e_score_correction_bias" in name:
                out[name.replace(".mlp.", ".block_sparse_moe.gate.")] = value
            elif any(f".mlp.{module}" in name for module in ("gate.", "shared_experts.", "routed_expert_")):
                out[name.replace(".mlp.", ".block_sparse_moe.")] = value
            elif "_res_" in name:  # attention residuals: <mix>_proj.weight -> <mix>.proj_weight
                out[re.sub(r"_res_(proj|norm)\.weight$", r"_res.\1_weight", name)] = value
            else:
                out[name] = value
        assert all(v.shape[0] == width for n, v in out.items() if n.endswith("q_conv1d.weight"))
        return out

    return convert


def build(folder, config: dict, seed: int = 0, prefix: str = "", extra: dict | None = None):
    """The release under ``prefix`` (with ``extra`` tensors beside) and mlx-lm's model of it."""
    model = random_mlx_lm_model(config, seed=seed, draw=_draw)
    convert = as_released(config)
    write_release(folder, model, config, TOKENS, lambda t: {prefix + n: v for n, v in convert(t).items()},
                  extra=extra, vocab=VOCAB, tolerance=1e-6)
    return folder, MlxLmReference(model)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The flat release (model_type kimi_k3, its text keys at the top) and mlx-lm's model of it."""
    return build(tmp_path_factory.mktemp("kimi_k3"), {**text_config(), "model_type": "kimi_k3"})


def test_reads_layer_kinds_situ_and_the_gates(release):
    arch = float32_model(release[0]).config.arch
    assert [s.mixer for s in arch.layers] == ["kimi_delta", "attention", "kimi_delta", "kimi_delta"]
    assert [s.mlp for s in arch.layers] == ["dense", "moe", "moe", "moe"]
    assert arch.activation == arch.moe.activation == arch.moe.shared_activation == Situ(2.0, 3.0)
    assert arch.mla.value_gate and arch.moe.routing == "sigmoid_grouped_zero_masked"


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_and_decode_steps_match_mlx_lm(release, backend):
    folder, reference = release
    assert_forward_and_decode_match(float32_model(folder, backend), TOKENS, model_logits(reference.model, TOKENS))


def test_a_wrapped_release_runs_its_text_model(tmp_path):
    """The wrapper (text_config of model_type "kimi_linear", weights under language_model., a vision tower beside)
    with a full-rank KDA gate and a bounded decay."""
    section = dict(num_heads=3, head_dim=8, short_conv_kernel_size=4, kda_layers=[1, 3, 4], use_full_rank_gate=True,
                   gate_lower_bound=-5.0)
    config = {"model_type": "kimi_k3", "text_config": text_config(linear_attn_config=section,
                                                                  activation_situ_linear_beta=None)}
    vision = {"vision_tower.patch_embed.proj.weight": np.ones((4, 3), dtype=np.float32)}
    folder, reference = build(tmp_path, config, seed=1, prefix="language_model.", extra=vision)
    arch = float32_model(folder).config.arch
    assert arch.kimi_delta.gate == ("gate_proj",) and arch.kimi_delta.lower_bound == -5.0
    assert_forward_and_decode_match(float32_model(folder), TOKENS, model_logits(reference.model, TOKENS))


#: What Kimi K3 adds to Kimi Linear, each dropped: SiTU's caps, SiTU itself, the attention's output gate.
DROPPED = {
    "situ caps": lambda arch: dict(activation=Situ(), moe=replace(arch.moe, activation=Situ(),
                                                                  shared_activation=Situ())),
    "situ": lambda arch: dict(activation="silu", moe=replace(arch.moe, activation=None, shared_activation=None)),
    "output gate": lambda arch: dict(attn_output_gate=False),
}


@pytest.mark.parametrize("dropped", DROPPED)
def test_each_feature_counts(release, dropped, monkeypatch):
    folder, reference = release
    assert_dropping_moves_mlx_lm_logits(folder, reference.model, TOKENS, DROPPED[dropped], monkeypatch, 1e-3)


def test_a_mixed_batch_gives_each_sequence_its_own_logits(release):
    folder, reference = release
    assert_a_mixed_batch_gives_each_sequence_its_own_logits(float32_model(folder), reference, VOCAB)


def test_a_failed_pass_leaves_every_state_as_it_was(release, monkeypatch):
    folder, reference = release
    assert_a_failed_pass_leaves_every_state_as_it_was(float32_model(folder), reference, TOKENS, "gated_delta_rule",
                                                      monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_batching_chunking_and_preemption_give_each_requests_greedy_tokens(release, backend):
    folder, reference = release
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, backend, **config), reference,
                                      staggered_greedy_workload(VOCAB))


@pytest.mark.parametrize("seeded", [True, False])
def test_decode_after_a_prefix_cache_hit_matches_mlx_lm(release, seeded, monkeypatch):
    """A sequence adopting another's cached blocks (16 tokens: the KDA layers' states kept at the boundary) runs
    the rest of its prompt and decodes a token as mlx-lm's full passes do. Control: its KDA layers not seeded with
    the kept states (starting from zeros), it misses."""
    folder, reference = release
    model = float32_model(folder, num_kv_blocks=64, block_size=4)
    model.snapshots.budget = DEFAULT_BUDGET  # the engine's (a model alone keeps no states)
    if not seeded:  # each kept array replaced by zeros
        states, seed = model.snapshots.states, model.snapshots.states.seed
        monkeypatch.setattr(states, "seed", lambda seq_id, snapshot: seed(seq_id, {
            layer: tuple(model.ops.from_numpy(np.zeros_like(model.ops.to_numpy(a)), None) for a in arrays)
            for layer, arrays in snapshot.items()}))
    model.prefill("first", TOKENS[:16])
    match = model.kv.match_prefix(TOKENS)
    assert match.num_tokens == 16 and model.snapshots.count == 1
    model.kv.adopt("hit", TOKENS, match)
    out = model.forward([ForwardItem("hit", TOKENS[16:20], 16)], all_logits=True)
    errors = (scaled_error(model.ops.to_numpy(out.logits), model_logits(reference.model, TOKENS[:20])[16:]),
              scaled_error(model.decode("hit", TOKENS[20], 20), model_logits(reference.model, TOKENS)[20]))
    assert max(errors) <= 1e-4 if seeded else min(errors) > 1e-3


@pytest.mark.parametrize("key, value", [("hidden_act", "silu"), ("mla_use_nope", False)])
def test_what_ferrum_does_not_run_is_refused_by_name(tmp_path, key, value):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "kimi_k3",
                                                      "text_config": text_config(**{key: value})}))
    with pytest.raises(UnsupportedFeatureError, match=key):
        ModelConfig.from_file(tmp_path / "config.json")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("cuda", "mlx")])
def test_torch_and_mlx_run_situ_experts_natively(release, backend, monkeypatch):
    """Plugin API 1.33: the built-in torch and MLX backends' moe_experts take SiTU, so the host form (the core's
    experts, which the numpy backend runs) is never called; logits still mlx-lm's."""
    folder, reference = release
    host_calls, host = [], Situ.host
    monkeypatch.setattr(Situ, "host", lambda self, gate, up: host_calls.append(1) or host(self, gate, up))
    logits = float32_model(folder, backend).forward_verify("c", TOKENS)
    assert not host_calls
    assert scaled_error(logits, model_logits(reference.model, TOKENS)) < 1e-4
    float32_model(folder, "cpu").forward_verify("c", TOKENS[:4])
    assert host_calls  # the control: the numpy backend's layers do call it


@pytest.fixture(scope="module")
def latent_release(tmp_path_factory):
    """Latent experts: the routed experts 32 wide between routed_expert_down_proj and _up_proj, their sum normed."""
    config = {**text_config(routed_expert_hidden_size=32, latent_moe_use_norm=True), "model_type": "kimi_k3"}
    return build(tmp_path_factory.mktemp("kimi_k3_latent"), config, seed=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_latent_experts_match_mlx_lm(latent_release, backend):
    folder, reference = latent_release
    model = float32_model(folder, backend)
    assert model.config.arch.moe.latent == ("routed_expert_down_proj", "routed_expert_norm", "routed_expert_up_proj")
    assert_forward_and_decode_match(model, TOKENS, model_logits(reference.model, TOKENS))


def test_latent_experts_without_their_norm_match_mlx_lm(tmp_path):
    config = {**text_config(routed_expert_hidden_size=20), "model_type": "kimi_k3"}
    folder, reference = build(tmp_path, config, seed=3)
    assert float32_model(folder).config.arch.moe.latent[1] is None
    assert_forward_and_decode_match(float32_model(folder), TOKENS, model_logits(reference.model, TOKENS))


def test_the_latent_norm_counts(latent_release, monkeypatch):
    """Control: the latent experts' sum left un-normed misses mlx-lm."""
    folder, reference = latent_release
    read = ModelConfig.from_file

    def without(path):
        config = read(path)
        moe = config.arch.moe
        return replace(config, arch=replace(config.arch, moe=replace(moe, latent=(moe.latent[0], None,
                                                                                   moe.latent[2]))))

    monkeypatch.setattr(ModelConfig, "from_file", staticmethod(without))
    assert scaled_error(float32_model(folder).forward_verify("c", TOKENS), model_logits(reference.model, TOKENS)) > 1e-3


@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_lm_s_conversions_run_as_mlx_lm_runs_them(latent_release, tmp_path, bits):
    """mlx_lm.convert's output (always under its wrapper's language_model.): KDA's q/k/v fused in qkv_proj, their taps
    in qkv_conv.conv [3C, K, 1], A_log [H], the sparse MLPs under mlp, kv_b_proj split into embed_q / unembed_out;
    packed at 4 bits in groups of 32 with the routers at 8 bits in groups of 64 (its quant_predicate), within 2e-3 of
    mlx-lm's own logits of the packed model (float: 1e-4)."""
    stored, want = mlx_lm_converted(latent_release[0], tmp_path / "converted", TOKENS, bits=bits, group=32)
    stem = "language_model.model.layers.0.self_attn."
    assert stored[stem + "qkv_conv.conv.weight"].shape == (72, 4, 1) and stored[stem + "A_log"].shape == (3,)
    assert (stem + "qkv_proj.scales" in stored) == (bits is not None)
    if bits is not None:  # the router at 8 bits: 64 inputs in 16 words
        assert stored["language_model.model.layers.1.mlp.gate.weight"].shape == (8, 16)
    assert_every_backend_runs_it_as_mlx_lm(tmp_path / "converted", TOKENS, want, packed=bits is not None)


def test_release_variants_mlx_lm_reads_load_as_it_reads_them(tmp_path):
    """What releases carry that mlx-lm's sanitize tidies: A_log [1, 1, H + 2, 1] (its first H read), the MTP layers
    as a fifth numbered layer and under mtp. (dropped, and not reported unread); mlx-lm's load_model of the folder is
    the model in memory, and Ferrum's logits are mlx-lm's."""
    config = {**text_config(), "model_type": "kimi_k3"}
    model = random_mlx_lm_model(config, seed=0, draw=_draw)  # the release fixture's: no ties at 0
    convert = as_released(config)

    def with_variants(tensors):
        out = convert(tensors)
        for name in [n for n in out if n.endswith("A_log")]:
            out[name] = np.concatenate([out[name], np.full((1, 1, 2, 1), 9.0, np.float32)], axis=2)
        out.update({n.replace("layers.3.", "layers.4."): v for n, v in list(out.items()) if ".layers.3." in n})
        return {**out, "model.mtp.0.enorm.weight": np.ones(64, np.float32)}

    write_release(tmp_path, model, config, TOKENS, with_variants, vocab=VOCAB, tolerance=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = float32_model(tmp_path)
    assert_forward_and_decode_match(loaded, TOKENS, model_logits(model, TOKENS))


@pytest.mark.parametrize("experts", [None, 0])
def test_a_dense_only_config_runs_as_mlx_lm_runs_it(tmp_path, experts):
    """num_experts null (mlx-lm's default) or 0: every MLP dense, SiTU's."""
    config = {**text_config(num_experts=experts), "model_type": "kimi_k3"}
    folder, reference = build(tmp_path, config, seed=5)
    model = float32_model(folder)
    assert model.config.arch.moe is None and {s.mlp for s in model.config.arch.layers} == {"dense"}
    assert_forward_and_decode_match(model, TOKENS, model_logits(reference.model, TOKENS))


def test_compressed_tensors_int4_is_refused_by_name(release, tmp_path):
    """The int4 releases' experts (weight_packed / weight_scale, which mlx-lm's sanitize views as its own packing):
    refused by their config's quantization_config, and by the tensors where a config lacks it."""
    from safetensors.numpy import load_file, save_file

    folder, _ = release
    config = json.loads((folder / "config.json").read_text())
    tensors = load_file(folder / "model.safetensors")
    stem = "model.layers.1.block_sparse_moe.experts.0.w1."
    tensors[stem + "weight_packed"] = np.zeros((24, 8), np.int32)
    tensors[stem + "weight_scale"] = np.ones((24, 2), np.float32)
    del tensors[stem + "weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedFeatureError, match="weight_packed.*compressed-tensors"):
        float32_model(tmp_path)
    groups = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group",
                                                             "group_size": 32, "symmetric": True}}}
    quantization = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": groups}
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}))
    with pytest.raises(UnsupportedFeatureError, match="compressed-tensors format 'pack-quantized'"):
        ModelConfig.from_file(tmp_path / "config.json")
