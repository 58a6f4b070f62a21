"""LongCat-Flash (``longcat_flash``): layers of two latent-attention sub-blocks, each with its own KV cache, and a
shortcut MoE read from the first sub-block's MLP input and added after the second, whose router may choose identity
("zero-computation") experts; against transformers' own model on every runnable backend."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
import transformers

from ferrum.config import ModelConfig
from ferrum.errors import AdapterError, ConfigError, MissingTensorError, UnsupportedFeatureError
from ferrum.model import DecoderOnlyLLM
from support import (
    assert_engine_keeps_greedy_tokens, assert_every_backend_runs_it_as_mlx_lm, assert_forward_and_decode_match,
    assert_names_the_tensors_transformers_saves, assert_random_checkpoint_is_what_transformers_reads,
    mlx_lm_converted, randomized_reference, reference_logits, runnable_backends, saved_references, scaled_error,
    small_pool_engine, staggered_greedy_workload, write_tokenizer,
)

BACKENDS = runnable_backends()
VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 0.707, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0}


def longcat_config(**extra) -> transformers.LongcatFlashConfig:
    settings = dict(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=80,
                    q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, head_dim=8,
                    v_head_dim=12, n_routed_experts=4, zero_expert_num=3, moe_topk=3, expert_ffn_hidden_size=24,
                    routed_scaling_factor=2.0, max_position_embeddings=128, rms_norm_eps=1e-5)
    return transformers.LongcatFlashConfig(**{**settings, **extra})


#: Zero experts beside the routed ones; none of them (every choice a routed expert, routed natively) under YaRN.
VARIANTS = {"zero_experts": {}, "yarn": dict(zero_expert_num=0, moe_topk=2, rope_parameters=YARN)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """variant -> (folder, transformers model): random weights and correction biases."""
    return saved_references(tmp_path_factory, VARIANTS, longcat_config)


def zero_expert_choices(hf, tokens) -> int:
    """How many of transformers' routing choices over ``tokens`` went to zero experts."""
    chosen = []
    hooks = [layer.mlp.router.register_forward_hook(lambda m, i, out: chosen.append(out[2]))
             for layer in hf.model.layers]
    reference_logits(hf, tokens)
    for hook in hooks:
        hook.remove()
    return int(sum((ids >= hf.config.n_routed_experts).sum() for ids in chosen))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_transformers(checkpoints, backend, variant):
    """A full forward and token-by-token decode, against transformers' logits; four layers of Ferrum's, two pool
    layers a stored layer."""
    folder, hf = checkpoints[variant]
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32")
    assert [(spec.mlp, spec.shortcut) for spec in model.config.arch.layers] == [
        ("dense+shortcut", "give"), ("dense", "take")] * 2
    assert model.config.arch.kv_pool_layers == 4
    assert_forward_and_decode_match(model, TOKENS, reference_logits(hf, TOKENS))


def test_lora_adapters_are_refused_by_name(checkpoints, tmp_path):
    """Its latent attention's projections are numbered per sub-block (self_attn.1.q_a_proj), which LoRA does not
    adapt: refused before the folder is read."""
    model = DecoderOnlyLLM.from_pretrained(checkpoints["yarn"][0], backend="cpu", dtype="float32")
    with pytest.raises(AdapterError, match="each hold several attention blocks"):
        model.adapters.load("a", tmp_path)


def test_the_routers_choose_zero_experts(checkpoints):
    """The parity above covers identity experts: transformers' routers choose some here, and weighing them by 0
    instead moves its logits."""
    folder, hf = checkpoints["zero_experts"]
    assert zero_expert_choices(hf, TOKENS) > 0
    other = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()
    for layer in other.model.layers:
        layer.mlp.experts.identity_expert.register_forward_hook(lambda module, args, out: torch.zeros_like(out))
    assert scaled_error(reference_logits(other, TOKENS), reference_logits(hf, TOKENS)) > 1e-3


def test_the_parity_is_sensitive_to_each_setting(checkpoints, monkeypatch):
    """Controls: the latent scalings left out, or the shortcut MoE dropped, each misses transformers' logits."""
    folder, hf = checkpoints["zero_experts"]
    want = reference_logits(hf, TOKENS)
    read = ModelConfig.from_file
    arch = read(folder).arch
    unscaled = replace(arch, scales={})
    unshortcut = replace(arch, layers=tuple(replace(spec, mlp="dense", shortcut=None) for spec in arch.layers))
    for changed in (unscaled, unshortcut):
        monkeypatch.setattr(ModelConfig, "from_file", classmethod(lambda cls, path: replace(read(path), arch=changed)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the dropped MoE's tensors, unread
            model = DecoderOnlyLLM.from_pretrained(folder, backend="cpu", dtype="float32")
        assert scaled_error(model.forward_verify("s", TOKENS), want) > 1e-3


def test_engine_keeps_greedy_tokens(checkpoints):
    """Alone, staggered with chunked prefills, and under preemption: transformers' greedy tokens."""
    folder, hf = checkpoints["zero_experts"]
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, **config), hf,
                                      staggered_greedy_workload(VOCAB, count=6))


def test_names_every_tensor_transformers_saves_and_reads_them_quietly(checkpoints):
    """weight_shapes lists what transformers saves (sub-blocks numbered, the MoE under the first); the zero experts'
    gate/up rows transformers saves too, and a multi-token prediction module, are left unread without a warning."""
    from safetensors.numpy import load_file, save_file

    folder, _ = checkpoints["zero_experts"]
    assert_names_the_tensors_transformers_saves(folder)
    tensors = load_file(folder / "model.safetensors")
    assert "model.layers.0.mlp.experts.4.gate_proj.weight" in tensors
    copy = folder.parent / "with_mtp"
    shutil.copytree(folder, copy, dirs_exist_ok=True)
    save_file({**tensors, "model.mtp.layers.0.eh_proj.weight": np.zeros((64, 128), np.float32)},
              copy / "model.safetensors", metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DecoderOnlyLLM.from_pretrained(copy, backend="cpu", dtype="float32")


def test_release_config_keys_read_as_transformers_reads_them(checkpoints, tmp_path):
    """The release's spellings (no num_hidden_layers, rope_theta at the top level, the keys of Meituan's code that
    transformers' runs as it does) load the same model; variants transformers does not run are refused by name."""
    folder, _ = checkpoints["zero_experts"]
    raw = json.loads((folder / "config.json").read_text())
    release = {**{k: v for k, v in raw.items() if k not in ("rope_parameters", "qk_head_dim", "head_dim")},
               "rope_theta": raw["rope_parameters"]["rope_theta"], "zero_expert_type": "identity",
               "attention_method": "MLA", "mla_scale_q_lora": True, "mla_scale_kv_lora": True,
               "router_bias": False, "norm_topk_prob": False}
    assert ModelConfig.from_dict({**release, "qk_rope_head_dim": 64, "qk_nope_head_dim": 64}).num_layers == 4
    for changes, error, key in (
            ({"norm_topk_prob": True}, UnsupportedFeatureError, "norm_topk_prob"),
            ({"zero_expert_type": "const"}, UnsupportedFeatureError, "zero_expert_type"),
            ({"mla_scale_q_lora": False}, UnsupportedFeatureError, "mla_scale_q_lora"),
            ({"attention_method": "LSA"}, UnsupportedFeatureError, "attention_method"),
            ({"router_bias": True}, UnsupportedFeatureError, "router_bias"),
            ({"num_hidden_layers": 2}, ConfigError, "num_hidden_layers"),
            ({"num_layers": -1}, ConfigError, "'num_layers' must be a positive integer, got -1"),
            ({"num_layers": 2.0}, ConfigError, "'num_layers' must be a positive integer, got 2.0"),
            ({"head_dim": 16}, ConfigError, "head_dim")):
        with pytest.raises(error, match=key):
            ModelConfig.from_dict({**release, **changes})


@pytest.mark.parametrize("stacked", [4, 6])
def test_a_config_with_num_hidden_layers_alone_reads_as_transformers_sets_it(checkpoints, stacked):
    """transformers' num_hidden_layers setter makes num_layers half of it: a config that gives only
    num_hidden_layers runs that many sub-blocks, as transformers' does; an odd count (transformers would drop
    one sub-block) is refused by name."""
    raw = json.loads((checkpoints["zero_experts"][0] / "config.json").read_text())
    raw = {k: v for k, v in raw.items() if k != "num_layers"}
    assert ModelConfig.from_dict({**raw, "num_hidden_layers": stacked}).num_layers == \
        transformers.LongcatFlashConfig(**{**raw, "num_hidden_layers": stacked}).num_hidden_layers == stacked
    with pytest.raises(ConfigError, match="'num_hidden_layers' is 5, odd"):
        ModelConfig.from_dict({**raw, "num_hidden_layers": 5})


def test_model_from_release_spelling_matches(checkpoints, tmp_path):
    """The checkpoint under its release-style config.json gives transformers' logits."""
    folder, hf = checkpoints["zero_experts"]
    copy = tmp_path / "release"
    shutil.copytree(folder, copy)
    raw = json.loads((copy / "config.json").read_text())
    raw = {**{k: v for k, v in raw.items() if k not in ("rope_parameters", "qk_head_dim")},
           "rope_theta": raw["rope_parameters"]["rope_theta"], "zero_expert_type": "identity"}
    (copy / "config.json").write_text(json.dumps(raw))
    model = DecoderOnlyLLM.from_pretrained(copy, backend="cpu", dtype="float32")
    assert scaled_error(model.forward_verify("r", TOKENS), reference_logits(hf, TOKENS)) <= 1e-4


def test_random_reference_is_what_this_module_saves():
    """randomized_reference draws LongCat-Flash's correction biases too (they are buffers named so)."""
    model = randomized_reference(longcat_config())
    assert all(layer.mlp.router.e_score_correction_bias.abs().sum() > 0 for layer in model.model.layers)


@pytest.mark.parametrize("variant", VARIANTS)
def test_random_checkpoints_are_what_transformers_reads(variant, tmp_path):
    """For transformers, the zero experts' gate and up rows its expert stack holds are written too (and not for
    mlx-lm, whose loader would refuse them)."""
    from ferrum.random_checkpoint import has_own_expert_layout

    raw = json.loads(longcat_config(**VARIANTS[variant]).to_json_string())
    assert_random_checkpoint_is_what_transformers_reads(tmp_path / variant, raw, TOKENS)
    assert has_own_expert_layout(raw) == (variant == "zero_experts")


@pytest.mark.parametrize("value, words", [(10**9, "'zero_expert_num' is 1000000000, beyond any real model"),
                                          (-1, "'zero_expert_num' must be a non-negative integer, got -1"),
                                          (True, "'zero_expert_num' must be a non-negative integer, got True")])
def test_an_absurd_zero_expert_count_is_refused_by_name(value, words):
    raw = json.loads(longcat_config().to_json_string())
    with pytest.raises(ConfigError, match=re.escape(words)):
        ModelConfig.from_dict({**raw, "zero_expert_num": value})


@pytest.mark.parametrize("routed, zero", [(4, 3), (4, 60_000), (95, 10), (512, 256)])
def test_the_zero_experts_rows_left_unread_are_theirs_alone(routed, zero):
    """The tensors transformers saves for the zero experts (experts routed ... routed + zero - 1) are left unread,
    matched in a pattern of a few alternatives however many they are; the routed experts' and any past them are not."""
    raw = json.loads(longcat_config(n_routed_experts=routed, zero_expert_num=zero).to_json_string())
    unloaded = re.compile(ModelConfig.from_dict(raw).arch.unloaded)
    assert len(unloaded.pattern) < 300
    left = [e for e in [*range(0, 1200), *range(59_990, 60_020)]
            if unloaded.search(f"model.layers.0.mlp.experts.{e}.gate_proj.weight")]
    assert left == [e for e in [*range(0, 1200), *range(59_990, 60_020)] if routed <= e < routed + zero]


# ------------------------------------------------------------------ mlx-lm's conversions

#: Latent sizes at which mlx-lm packs, in groups of 64, both halves it splits kv_b_proj into (embed_q along
#: qk_nope_head_dim, unembed_out along kv_lora_rank).
PACKED_LATENT = dict(kv_lora_rank=64, qk_nope_head_dim=64)


def mlx_lm_source(hf, folder):
    """``hf`` saved as mlx-lm's LongCat-Flash reads it: the release's config keys its ModelArgs require (rope_theta
    at the top level, YaRN as rope_scaling), without the zero experts' gate/up rows (its loader refuses them)."""
    from safetensors.numpy import load_file, save_file

    hf.save_pretrained(folder)
    write_tokenizer(folder, VOCAB)
    raw = json.loads((folder / "config.json").read_text())
    rope = raw.pop("rope_parameters")
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"} if rope["rope_type"] != "default" else None
    (folder / "config.json").write_text(json.dumps({
        **raw, "rope_theta": rope["rope_theta"], "rope_scaling": scaling, "zero_expert_type": "identity",
        "attention_method": "MLA", "mla_scale_q_lora": True, "mla_scale_kv_lora": True}))
    zero = re.compile(r"\.mlp\.experts\.(\d+)\.")
    tensors = {name: t for name, t in load_file(folder / "model.safetensors").items()
               if not zero.search(name) or int(zero.search(name)[1]) < raw["n_routed_experts"]}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def mlx_lm_conversions(tmp_path_factory):
    """(variant, bits) -> (mlx-lm's conversion, its logits over TOKENS, its stored tensors, transformers' logits),
    float and 4-bit in groups of 64."""
    pytest.importorskip("mlx_lm")
    out = {}
    for variant, extra in VARIANTS.items():
        hf = randomized_reference(longcat_config(**extra, **PACKED_LATENT))
        source = tmp_path_factory.mktemp(f"mlx_source_{variant}")
        mlx_lm_source(hf, source)
        for bits in (None, 4):
            folder = tmp_path_factory.mktemp(f"mlx_{variant}_{bits}") / "out"
            stored, want = mlx_lm_converted(source, folder, TOKENS, bits)
            out[variant, bits] = folder, want, stored, reference_logits(hf, TOKENS)
    return out


@pytest.mark.slow  # mlx-lm converts (and packs) four checkpoints: ~5 s
@pytest.mark.skipif("mlx" not in BACKENDS, reason="mlx-lm needs MLX")
@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mlx_lm_conversions_run_as_mlx_lm_runs_them(mlx_lm_conversions, variant, bits):
    """mlx-lm's conversions split each sub-block's kv_b_proj into embed_q / unembed_out (packed along their own last
    axes, 4-bit) under its numbered self_attn, and stack the routed experts as switch_mlp: joined back, every
    backend runs them as mlx-lm does, the float ones as transformers."""
    folder, want, stored, original = mlx_lm_conversions[variant, bits]
    assert {"model.layers.1.self_attn.1.embed_q.weight", "model.layers.1.self_attn.1.unembed_out.weight",
            "model.layers.1.mlp.switch_mlp.gate_proj.weight"} <= stored.keys()
    assert not any("kv_b_proj" in name for name in stored)
    assert ("model.layers.1.self_attn.0.embed_q.scales" in stored) == (bits is not None)
    assert ("model.layers.1.self_attn.0.unembed_out.scales" in stored) == (bits is not None)
    assert (scaled_error(want, original) <= 1e-4) == (bits is None)  # 4 bits move the logits
    assert_every_backend_runs_it_as_mlx_lm(folder, TOKENS, want, packed=bits is not None)


def _with_sub_blocks_halves_swapped(folder, copy):
    """``folder`` copied to ``copy`` with the two sub-blocks' embed_q / unembed_out traded: what a join reading
    each sub-block's kv_b_proj from the other's halves would run."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(folder, copy)
    halves = re.compile(r"self_attn\.(\d)\.(embed_q|unembed_out)\.")
    traded = {halves.sub(lambda m: f"self_attn.{1 - int(m[1])}.{m[2]}.", name): t
              for name, t in load_file(copy / "model.safetensors").items()}
    save_file(traded, copy / "model.safetensors", metadata={"format": "mlx"})
    return copy


@pytest.mark.slow
@pytest.mark.skipif("mlx" not in BACKENDS, reason="mlx-lm needs MLX")
@pytest.mark.parametrize("wrong", ["skipped", "sub-blocks swapped", "keys untransposed"])
def test_the_mlx_lm_parity_needs_each_sub_blocks_own_join(mlx_lm_conversions, wrong, monkeypatch, tmp_path):
    """Controls: without the join the folder lacks kv_b_proj, named; each sub-block's kv_b_proj joined from the
    other's halves, or embed_q's key rows read untransposed (the same shape here), misses mlx-lm's logits."""
    import ferrum.arch.mla as mla

    folder, want, _, _ = mlx_lm_conversions["zero_experts", None]
    if wrong == "skipped":
        monkeypatch.setattr(mla, "split_kv_b", lambda arch, name, present: None)
        with pytest.raises(MissingTensorError, match=r"model\.layers\.0\.self_attn\.1\.kv_b_proj\.weight"):
            DecoderOnlyLLM.from_pretrained(folder, backend="cpu", dtype="float32")
        return
    if wrong == "sub-blocks swapped":
        folder = _with_sub_blocks_halves_swapped(folder, tmp_path / "swapped")
    else:
        monkeypatch.setattr(mla.MlaSpec, "join_kv_b", lambda self, embed_q, unembed_out, where: np.concatenate(
            [embed_q, unembed_out], axis=1).reshape(-1, self.kv_lora_rank))
    model = DecoderOnlyLLM.from_pretrained(folder, backend="cpu", dtype="float32")
    assert scaled_error(model.forward_verify("w", TOKENS), want) > 1e-2


@pytest.mark.slow
@pytest.mark.skipif("mlx" not in BACKENDS, reason="mlx-lm needs MLX")
def test_ferrum_quantize_refuses_mlx_lms_split_by_name(mlx_lm_conversions, tmp_path):
    """`ferrum quantize` reads kv_b_proj whole: mlx-lm's split of a sub-block's is named, not reported missing."""
    from ferrum.quant.convert import quantize_checkpoint

    with pytest.raises(UnsupportedFeatureError, match=r"self_attn\.0\.kv_b_proj split into embed_q and unembed_out"):
        quantize_checkpoint(mlx_lm_conversions["zero_experts", None][0], tmp_path / "q", bits=4, group_size=64)
