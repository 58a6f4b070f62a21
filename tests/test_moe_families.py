"""The checks every MoE family's tests make alike, run from one table: the correction bias moves transformers' logits
(the parity's control), the engine's greedy tokens are transformers', the router and correction bias keep
transformers' dtypes in bfloat16, Ferrum names every tensor transformers saves, random checkpoints are what
transformers reads, and mlx-lm's conversions run as mlx-lm runs them. Each family's own module keeps what is its own
(its math, its config refusals) and builds the checkpoints, once a session for both (conftest's ``built_once``)."""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from types import ModuleType
from typing import Callable

import numpy as np
import pytest
import transformers

import test_afmoe
import test_aria
import test_axk2
import test_cohere2_moe
import test_dbrx
import test_deepseek
import test_deepseek_v2
import test_deepseek_v3
import test_dots1
import test_dots3_note
import test_ernie4_5_moe
import test_exaone_moe
import test_flex_olmo
import test_flint
import test_glm4_moe
import test_glm4_moe_lite
import test_granitemoe_swa
import test_hunyuan_v1_moe
import test_hy_v3
import test_klear
import test_kolibri1
import test_laguna
import test_lara_mini
import test_lfm2_moe
import test_llama4
import test_mellum
import test_mimo_v2_flash
import test_minimax_m2
import test_mistral4
import test_sarvam
import test_solar_open
from ferrum.backends import load_backend
from ferrum.engine import Engine, EngineConfig
from ferrum.executor import LlmExecutor
from ferrum.model import DecoderOnlyLLM
from support import (
    assert_engine_keeps_greedy_tokens, assert_generates_greedily_as_transformers,
    assert_names_the_tensors_transformers_saves, assert_random_checkpoint_is_what_transformers_reads,
    assert_router_computes_in_float32, mlx_lm_logits, reference_logits, runnable_backends, scaled_error,
    staggered_greedy_workload, without_correction_biases, write_tokenizer,
)

BACKENDS = tuple(runnable_backends())
BFLOAT16 = [b for b in BACKENDS if "bfloat16" in load_backend(b).info.dtypes]


@dataclass(frozen=True)
class Router:
    """Where transformers keeps a family's correction bias and router weight, in its first sparse MLP
    (``model.layers[1].mlp``)."""

    variant: str
    #: read flattened (ERNIE's is ``[1, E]``)
    bias: str
    #: None: transformers' router runs in the compute dtype, and so does Ferrum's.
    weight: str | None


@dataclass(frozen=True)
class MlxLm:
    """A family's checkpoint as mlx-lm's port reads it, and what mlx-lm's conversions of it store."""

    variant: str
    #: config.json as mlx-lm reads it, from transformers'.
    config: Callable[[dict], dict] = dict
    #: (checkpoint, destination) -> the checkpoint as mlx-lm reads it, for a family that rewrites more than
    #: config.json (Llama 4's wrapper); in place of ``config``
    prepare: Callable[[Path, Path], Path] | None = None
    bits: tuple = (None, 4, 8)
    #: the conversions' group size (and ``ferrum quantize``'s)
    group: int = 32
    stored: tuple[str, ...] = ()
    #: parts of names no conversion stores
    not_stored: tuple[str, ...] = ()
    #: names stored exactly where the conversion packs
    packed: tuple[str, ...] = ()
    float32: tuple[str, ...] = ()
    #: whether the MLX backend is checked against mlx-lm on the unconverted checkpoint too
    backend: bool = True
    #: the warning ``ferrum quantize`` must give on the checkpoint
    quantize_warns: str | None = None
    #: whether ``ferrum quantize`` writes the names mlx-lm's conversion does (Laguna's: the checkpoint's own, which
    #: mlx-lm's sanitize renames on load)
    quantize: bool = True
    slow: bool = False


@dataclass(frozen=True)
class Family:
    """What applies to a family (variants of its module's ``build_checkpoints``)."""

    module: ModuleType
    bias_control: tuple[str, ...] = ()
    greedy: tuple[str, ...] = ()
    greedy_backends: tuple[str, ...] = BACKENDS
    #: how many of the module's TOKENS the greedy run prompts with (all where None)
    greedy_prompt: int | None = None
    #: the variant the engine batches, chunks and preempts (assert_engine_keeps_greedy_tokens)
    engine: str | None = None
    router: Router | None = None
    names: tuple[str, ...] = ()
    #: name -> the config ferrum.random_checkpoint writes
    random: dict[str, Callable[[], dict]] = field(default_factory=dict)
    #: transformers' class where its auto classes map the family to no causal LM
    model_class: type | None = None
    mlx: MlxLm | None = None


def _v4_rope_theta(config: dict) -> dict:
    """The transformers-4 rope_theta mlx-lm reads, in place of rope_parameters."""
    return {**{k: v for k, v in config.items() if k != "rope_parameters"},
            "rope_theta": config["rope_parameters"]["rope_theta"]}


def _solar_open_for_mlx_lm(config: dict) -> dict:
    """The keys mlx-lm's solar_open requires: the transformers-4 rope_theta and partial_rotary_factor,
    first_k_dense_replace, intermediate_size."""
    rope = config["rope_parameters"]
    return {**_v4_rope_theta(config), "partial_rotary_factor": rope.get("partial_rotary_factor", 1.0),
            "first_k_dense_replace": 0, "intermediate_size": 48}


FAMILIES = {
    "mistral4": Family(
        test_mistral4, greedy=("small4",), names=("small4", "plain_q"), model_class=transformers.Mistral4ForCausalLM,
        # the experts in transformers' fused layout
        random={"mistral4": lambda: {**test_mistral4.m4_config().to_dict(), "architectures": ["Mistral4ForCausalLM"]}}),
    "axk2": Family(
        test_axk2, bias_control=("light",), greedy=("light", "grouped"), engine="light", names=("light", "yarn"),
        # the router and correction bias in float32, as transformers' AXK2TopkRouter runs them
        router=Router("light", "gate.e_score_correction_bias", "gate.weight"),
        # the gated norms' W_down / W_up, q_b_proj with its gate rows, the experts one by one (the release's names)
        random={"axk2": lambda: {**test_axk2.axk2_config().to_dict(), "architectures": ["AXK2ForCausalLM"]}}),
    "deepseek_v3": Family(test_deepseek_v3, random={"deepseek_v3": lambda: {
        **test_deepseek_v3.dsv3_config().to_dict(), "architectures": ["DeepseekV3ForCausalLM"],
        "rope_parameters": test_deepseek_v3.YARN}}),
    "hy_v3": Family(
        test_hy_v3, bias_control=("release",), greedy=("release",),
        # Hy3's own names (mlp.router.gate, mlp.expert_bias, mlp.shared_mlp, experts one by one), which
        # transformers' loader renames and fuses
        names=("release", "biased"),
        router=Router("release", "e_score_correction_bias", "gate.weight"),
        random={"hy_v3": lambda: {**test_hy_v3.hy_config().to_dict(), "architectures": ["HYV3ForCausalLM"]}}),
    "solar_open": Family(
        test_solar_open, bias_control=("release",), greedy=("grouped",), names=("release", "grouped"),
        router=Router("release", "gate.e_score_correction_bias", "gate.weight"),
        random={"solar_open": lambda: {**test_solar_open.solar_config(n_group=2, topk_group=1).to_dict(),
                                       "architectures": ["SolarOpenForCausalLM"]}},
        # one group: mlx-lm's glm4_moe (which runs solar_open) zeroes the groups it drops where transformers sets
        # them to -inf; the router (a plain parameter of its MoEGate) and the correction bias left in float
        mlx=MlxLm("release", _solar_open_for_mlx_lm, not_stored=("model.layers.1.mlp.gate.scales",), stored=(
            "model.layers.1.mlp.switch_mlp.gate_proj.weight", "model.layers.1.mlp.gate.weight",
            "model.layers.1.mlp.gate.e_score_correction_bias"))),
    "mellum": Family(
        test_mellum, greedy=("dense",),  # the prompt's second copy from the prefix cache past the sliding window
        names=("release", "dense"),
        random={"mellum": lambda: {**test_mellum.mellum_config(mlp_layer_types=["dense", "sparse", "sparse"]).to_dict(),
                                   "architectures": ["MellumForCausalLM"]}},
        # mlx-lm's mellum: every layer sparse, no attention biases, num_experts (transformers saves
        # num_local_experts); the router packed at 8 bits
        mlx=MlxLm("release", lambda config: {**config, "num_experts": config["num_local_experts"]},
                  stored=("model.layers.1.mlp.switch_mlp.gate_proj.weight",))),
    "minimax_m2": Family(
        test_minimax_m2, bias_control=("release",), greedy=("release",),
        names=("release", "factor"),  # block_sparse_moe.e_score_correction_bias beside the router, not in it
        # the correction bias stored float32 in the release (and by mlx-lm); the router in the compute dtype, as
        # transformers' MiniMaxM2TopKRouter runs it
        router=Router("release", "e_score_correction_bias", None),
        random={"minimax_m2": lambda: {**test_minimax_m2.minimax_config().to_dict(),
                                       "architectures": ["MiniMaxM2ForCausalLM"]}},
        # the router packed at 8 bits, the correction bias in float32
        mlx=MlxLm("release", _v4_rope_theta, stored=("model.layers.1.block_sparse_moe.switch_mlp.gate_proj.weight",
                                                      "model.layers.1.block_sparse_moe.e_score_correction_bias"))),
    "dots1": Family(
        test_dots1, bias_control=("grouped",), greedy=("grouped",), names=("grouped", "release"),
        router=Router("grouped", "gate.e_score_correction_bias", "gate.weight"),
        random={"dots1": lambda: {**test_dots1.dots_config().to_dict(), "architectures": ["Dots1ForCausalLM"]}},
        # the release's layout (mlx-lm's Dots1 has no window and no attention biases); the experts under
        # mlp.experts, not switch_mlp; the router in float
        mlx=MlxLm("release", _v4_rope_theta, stored=("model.layers.1.mlp.experts.gate_proj.weight",),
                  not_stored=("switch_mlp",))),
    "afmoe": Family(
        test_afmoe, engine="trinity",
        names=("trinity", "plain"),  # the attention's gate_proj, the sparse MLP's expert_bias beside the router
        random={"afmoe": lambda: test_afmoe.afmoe_config().to_dict()},
        # the experts under mlp.experts, the expert bias in float32, the router packed at 8 bits
        mlx=MlxLm("trinity", lambda config: {**config, "rope_theta": config["rope_parameters"]["rope_theta"]},
                  bits=(None, 4), stored=("model.layers.1.mlp.experts.gate_proj.weight",),
                  packed=("model.layers.1.mlp.router.gate.scales",), float32=("model.layers.1.mlp.expert_bias",),
                  backend=False, slow=True)),
    "sarvam": Family(
        test_sarvam, bias_control=("sarvam_moe", "sarvam_mla"), greedy=("sarvam_moe", "sarvam_mla"),
        greedy_backends=("cpu",), names=("sarvam_moe", "sarvam_mla"),
        # Sarvam-30B's in its release's names, q/k/v fused
        random={name: (lambda make=make: make().to_dict()) for name, make in test_sarvam.MAKERS.items()}),
    "mimo_v2_flash": Family(
        test_mimo_v2_flash, bias_control=("release",), engine="release",
        # the sinks under the release's attention_sink_bias on the sliding layers only; the full layers' fewer
        # key/value heads
        names=("release", "wide"), random={"mimo_v2_flash": lambda: test_mimo_v2_flash.mimo_config().to_dict()},
        # mlx-lm reads the release's own keys; the router and the sinks in float; packed, the full layers' keys and
        # values repeated and every value head padded in whole groups
        mlx=MlxLm("wide", bits=(None, 4), stored=("model.layers.1.mlp.switch_mlp.gate_proj.weight",
                                                  "model.layers.1.self_attn.attention_sink_bias"),
                  not_stored=("model.layers.1.mlp.gate.scales",), packed=("model.layers.0.self_attn.v_proj.scales",),
                  backend=False, slow=True)),
    "cohere2_moe": Family(
        test_cohere2_moe, greedy=("average",), greedy_backends=("cpu",), names=("average", "sum", "patterned"),
        random={"cohere2_moe": lambda: test_cohere2_moe.cohere2_moe_config(num_shared_experts=1).to_dict()}),
    "ernie4_5_moe": Family(
        test_ernie4_5_moe, bias_control=("biased",), greedy=("biased",), names=("biased", "release"),
        # both kept in float32 (_keep_in_fp32_modules_strict), routing in float32
        router=Router("biased", "gate.moe_statics.e_score_correction_bias", "gate.weight"),
        random={"ernie4_5_moe": lambda: {**test_ernie4_5_moe.ernie_config().to_dict(),
                                         "architectures": ["Ernie4_5_MoeForCausalLM"]}}),
    "exaone_moe": Family(
        test_exaone_moe, bias_control=("grouped",), greedy=("grouped",), names=("grouped", "release"),
        router=Router("grouped", "gate.e_score_correction_bias", "gate.weight"),
        random={"exaone_moe": lambda: {**test_exaone_moe.exaone_config().to_dict(),
                                       "architectures": ["ExaoneMoeForCausalLM"]}}),
    "kolibri1": Family(
        # the window shorter than the prompt and the replies, the second copy of the prompt from the prefix cache
        test_kolibri1, bias_control=("release",), greedy=("release",), engine="release",
        names=("release", "normalized"),  # the post-norms and the correction bias under the release's names
        # the correction bias float32 (_keep_in_fp32_modules_strict); the router computes in float32
        router=Router("release", "gate.e_score_correction_bias", "gate.weight"),
        random={"kolibri1": lambda: {**test_kolibri1.kolibri_config().to_dict(),
                                     "architectures": ["Kolibri1ForCausalLM"]}}),
    "hunyuan_v1_moe": Family(
        test_hunyuan_v1_moe, greedy=("alpha",), names=("alpha", "release"),
        random={"hunyuan_v1_moe": lambda: {**test_hunyuan_v1_moe.hunyuan_config().to_dict(),
                                           "architectures": ["HunYuanMoEV1ForCausalLM"]}}),
    "dbrx": Family(
        test_dbrx, greedy=("release",), names=("release", "unnormalized"),
        # written as transformers stores DBRX's experts (as for gpt-oss)
        random={"dbrx": lambda: {**test_dbrx.dbrx_config().to_dict(), "architectures": ["DbrxForCausalLM"]}}),
    "flex_olmo": Family(
        test_flex_olmo, greedy=("renormalized",), names=("renormalized", "release"),
        random={"flex_olmo": lambda: {**test_flex_olmo.flex_config().to_dict(),
                                      "architectures": ["FlexOlmoForCausalLM"]}}),
    "llama4": Family(
        # blocks of 16, chunks of 16: the replies run past the first chunk
        test_llama4, greedy=("chunk16",), greedy_prompt=13, names=tuple(test_llama4.VARIANTS),
        # the fused experts inputs first (gate_up_proj [E, hidden, 2 * inter]), as Llama 4's are stored; chunks
        # that Ferrum's default blocks of 16 divide
        random={f"llama4_{variant}": (lambda variant=variant: {
            **test_llama4.llama4_config(**test_llama4.VARIANTS[variant], attention_chunk_size=16,
                                        floor_scale=8).to_dict(),
            "architectures": ["Llama4ForCausalLM"]}) for variant in ("scout", "maverick")},
        # the experts where mlx-lm's conversion stores them (feed_forward.experts.*, not the fused stacks); the
        # experts' down_proj 48 wide; its conversions and their oracle are test_llama4.py's
        mlx=MlxLm("mlx_lm", prepare=test_llama4.as_mlx_lm_reads_it, bits=(), backend=False,
                  quantize_warns="not a multiple of --group-size 32")),
    "glm4_moe": Family(
        test_glm4_moe, bias_control=("grouped",), greedy=("grouped",),
        router=Router("grouped", "gate.e_score_correction_bias", "gate.weight")),
    "glm4_moe_lite": Family(
        test_glm4_moe_lite, greedy=("flash",), router=Router("flash", "gate.e_score_correction_bias", "gate.weight"),
        random={"glm4_moe_lite": lambda: {
            **test_glm4_moe_lite.lite_config(mlp_layer_types=["sparse", "dense", "sparse"]).to_dict(),
            "architectures": ["Glm4MoeLiteForCausalLM"]}}),
    "deepseek_v2": Family(
        test_deepseek_v2, greedy=("limited",), names=("limited", "lite", "greedy_scaled"),
        random={"deepseek_v2": lambda: {**test_deepseek_v2.dsv2_config().to_dict(),
                                        "architectures": ["DeepseekV2ForCausalLM"],
                                        "rope_parameters": test_deepseek_v2.YARN}}),
    "lfm2_moe": Family(
        test_lfm2_moe, greedy=("biased",), greedy_backends=("cpu",),
        random={"lfm2_moe": lambda: test_lfm2_moe.moe_config().to_dict()}),
    "flint": Family(
        # the prompt's second copy from the prefix cache past the sliding window
        test_flint, greedy=("release",), engine="release",
        names=("release", "plain"),  # the sinks under softmax_offset, the experts one by one
        random={"flint": lambda: test_flint.flint_config().to_dict()}),
    "laguna": Family(
        test_laguna, bias_control=("release",), greedy=("release",), engine="release",
        # g_proj one row per head, fewer query heads on some layers, the correction bias under experts
        names=("release", "element"),
        # the correction bias in float32, the router in the compute dtype, as transformers' LagunaTopKRouter runs it
        router=Router("release", "gate.e_score_correction_bias", None),
        random={"laguna": lambda: test_laguna.laguna_config().to_dict()},
        # mlx-lm's port has no attention biases; its conversions store the router as gate.proj (packed) with the
        # correction bias beside it; groups of 64 (32 cut the sliding layers' padded query heads: refused by name)
        mlx=MlxLm("release", bits=(None, 4), group=64, stored=(
            "model.layers.1.mlp.switch_mlp.gate_proj.weight", "model.layers.1.mlp.gate.e_score_correction_bias"),
                  not_stored=("mlp.experts.",), packed=("model.layers.1.mlp.gate.proj.scales",),
                  float32=("model.layers.1.mlp.gate.e_score_correction_bias",), quantize=False)),
    "granitemoe_swa": Family(
        test_granitemoe_swa, greedy=("shared",), engine="shared",
        # the experts fused under block_sparse_moe.experts, the router under block_sparse_moe.router, the shared MLP's
        # input_linear / output_linear
        names=("shared", "unshared"), random={"granitemoe_swa": lambda: test_granitemoe_swa.swa_config().to_dict()}),
    "aria_text": Family(
        # the experts fused inputs first under experts.fc1 / fc2, the router under mlp.router, shared_experts
        test_aria, greedy=("release",), engine="release", names=("release", "biased"),
        random={"aria_text": lambda: {**test_aria.aria_config().to_dict(), "architectures": ["AriaTextForCausalLM"]}}),
    "dots3_note_text": Family(
        # greedy and engine tokens are test_dots3_note's (against transformers' forward: its generate departs from it)
        test_dots3_note, bias_control=("note",), names=("note", "capped"),
        router=Router("note", "gate.e_score_correction_bias", "gate.weight"),
        # the sliding layers' own latent sizes, the rope key's norm, g_proj, the indexers, the experts one by one
        random={"dots3_note_text": lambda: {
            **transformers.Dots3NoteTextConfig(**test_dots3_note.text_config()).to_dict(),
            "architectures": ["Dots3NoteForCausalLM"]}}),
    # no transformers class: the release's names (experts one by one), dense layers by first_k_dense_replace and
    # moe_layer_freq; its checks against mlx-lm are test_deepseek's
    "deepseek": Family(test_deepseek, names=("release", "every_other")),
    # no transformers class: the release's names (experts one by one, the expert bias and coefficient beside them);
    # its checks against mlx-lm are test_klear's
    "Klear": Family(test_klear, names=("release", "dense_first")),
    "lara_mini": Family(
        # Gated DeltaNet's one in_proj and out_norm, the experts fused
        test_lara_mini, greedy=("release",), names=("release", "plain"),
        random={"lara_mini": lambda: test_lara_mini.lara_config().to_dict()}),
}


def _tokens(family: str) -> list[int]:
    return FAMILIES[family].module.TOKENS


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, built_once):
    """family -> its own module's checkpoints (variant -> (folder, transformers model)), built once a session."""
    return lambda family: built_once(FAMILIES[family].module.build_checkpoints, tmp_path_factory)


# ------------------------------------------------------------------ transformers


@pytest.mark.parametrize("family, variant", [
    pytest.param(f, v, id=f"{f}-{v}") for f, spec in FAMILIES.items() for v in spec.bias_control])
def test_the_parity_checks_the_correction_bias(checkpoints, family, variant):
    """Zeroing the correction biases moves transformers' logits: they matter in the family's parity test."""
    folder, hf = checkpoints(family)[variant]
    tokens = _tokens(family)
    assert scaled_error(reference_logits(without_correction_biases(folder), tokens),
                        reference_logits(hf, tokens)) > 1e-2


@pytest.mark.parametrize("family, variant, backend", [
    pytest.param(f, v, b, id=f"{f}-{v}-{b}") for f, spec in FAMILIES.items() for v in spec.greedy
    for b in spec.greedy_backends])
def test_generates_greedily_as_transformers(checkpoints, family, variant, backend):
    """Through the engine: batched with another request, the second copy of the prompt from the prefix cache."""
    folder, hf = checkpoints(family)[variant]
    assert_generates_greedily_as_transformers(folder, hf, backend, _tokens(family)[:FAMILIES[family].greedy_prompt])


@pytest.mark.parametrize("family, backend", [
    pytest.param(f, b, id=f"{f}-{b}") for f, spec in FAMILIES.items() if spec.engine for b in BACKENDS])
def test_engine_batching_chunking_and_preemption_give_each_request_its_greedy_tokens(checkpoints, family, backend):
    module = FAMILIES[family].module
    folder, hf = checkpoints(family)[FAMILIES[family].engine]

    def engine(**config) -> Engine:
        model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, dtype="float32", num_kv_blocks=64,
                                               block_size=4)
        return Engine(LlmExecutor(model), None, EngineConfig(**config))

    assert_engine_keeps_greedy_tokens(engine, hf, staggered_greedy_workload(module.VOCAB))


@pytest.mark.parametrize("family, backend", [
    pytest.param(f, b, id=f"{f}-{b}") for f, spec in FAMILIES.items() if spec.router for b in BFLOAT16])
def test_router_and_correction_bias_keep_transformers_dtypes_in_bfloat16(checkpoints, family, backend):
    """The correction bias stays float32 (transformers' ``_keep_in_fp32_modules_strict``, or the release's own
    dtype); the router keeps float32 weights and takes its input cast up where transformers' does, else it runs in the
    compute dtype as transformers'."""
    router = FAMILIES[family].router
    folder, hf = checkpoints(family)[router.variant]
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, dtype="bfloat16")
    mlp, ops, theirs = model.layers[1].mlp, model.ops, hf.model.layers[1].mlp
    bias = attrgetter(router.bias)(theirs).detach().numpy().reshape(-1)
    assert not np.array_equal(bias, bias.astype("bfloat16").astype(np.float32))  # bfloat16 would round it
    np.testing.assert_array_equal(ops.to_numpy(mlp.routing.bias), bias)
    if router.weight is None:
        assert mlp.router_dtype is None
    else:
        assert_router_computes_in_float32(mlp, ops, attrgetter(router.weight)(theirs).detach().numpy())


@pytest.mark.parametrize("family, variant", [
    pytest.param(f, v, id=f"{f}-{v}") for f, spec in FAMILIES.items() for v in spec.names])
def test_ferrum_names_the_tensors_transformers_saves(checkpoints, family, variant):
    """weight_shapes (loading, ferrum quantize, the random checkpoint writer) lists every tensor transformers saves,
    with its shape, and no other (experts under the stacked names the loader assembles)."""
    assert_names_the_tensors_transformers_saves(checkpoints(family)[variant][0])


@pytest.mark.parametrize("family, name", [
    pytest.param(f, name, id=name) for f, spec in FAMILIES.items() for name in spec.random])
def test_random_checkpoints_are_what_transformers_reads(tmp_path, family, name):
    """ferrum.random_checkpoint (benchmarks, the conformance kit) writes the tensors transformers expects."""
    spec = FAMILIES[family]
    assert_random_checkpoint_is_what_transformers_reads(tmp_path / name, spec.random[name](), _tokens(family),
                                                        spec.model_class)


# ------------------------------------------------------------------ mlx-lm


def _mlx_cases(*, bits: bool = False, backend: bool = False, quantize: bool = False) -> list:
    """The families mlx-lm runs (only those checked on the unconverted checkpoint where ``backend``, only those whose
    names ``ferrum quantize`` writes as mlx-lm where ``quantize``), each with its conversions' bits where ``bits``;
    slow where the family's are."""
    marks = [pytest.mark.skipif("mlx" not in BACKENDS, reason="the MLX backend cannot run here")]
    return [pytest.param(f, *([b] if bits else []), id=f"{f}-{b}" if bits else f,
                         marks=marks + ([pytest.mark.slow] if spec.mlx.slow else []))
            for f, spec in FAMILIES.items()
            if spec.mlx and (spec.mlx.backend or not backend) and (spec.mlx.quantize or not quantize)
            for b in (spec.mlx.bits if bits else [None])]


def _as_mlx_lm_reads_it(checkpoints, family: str, destination):
    """The family's checkpoint with config.json as mlx-lm reads it, and a tokenizer for its conversion; with
    transformers' model of it."""
    mlx = FAMILIES[family].mlx
    folder, hf = checkpoints(family)[mlx.variant]
    if mlx.prepare:
        return mlx.prepare(folder, destination), hf
    shutil.copytree(folder, destination)
    config = mlx.config(json.loads((destination / "config.json").read_text()))
    (destination / "config.json").write_text(json.dumps(config))
    write_tokenizer(destination)
    return destination, hf


@pytest.mark.parametrize("family", _mlx_cases(backend=True))
def test_mlx_backend_matches_mlx_lm(checkpoints, family, tmp_path):
    folder, _ = _as_mlx_lm_reads_it(checkpoints, family, tmp_path / "hf")
    tokens = _tokens(family)
    got = DecoderOnlyLLM.from_pretrained(folder, backend="mlx", dtype="float32").forward_verify("m", tokens)
    assert scaled_error(got, mlx_lm_logits(folder, tokens)) <= 1e-4


@pytest.mark.parametrize("family, bits", _mlx_cases(bits=True))
def test_mlx_lm_conversions_load(checkpoints, family, bits, tmp_path):
    """mlx-lm's conversions, float (which mlx-lm runs as transformers does) or packed, store what the family's
    row says and run on every backend as mlx-lm runs them."""
    from mlx_lm.convert import convert
    from safetensors.numpy import load_file

    mlx, tokens = FAMILIES[family].mlx, _tokens(family)
    source, hf = _as_mlx_lm_reads_it(checkpoints, family, tmp_path / "hf")
    converted = tmp_path / "mlx"
    convert(str(source), str(converted), quantize=bits is not None, q_bits=bits or 4, q_group_size=mlx.group)
    stored = load_file(converted / "model.safetensors")
    assert set(mlx.stored) <= stored.keys()
    assert not [name for name in stored if any(part in name for part in mlx.not_stored)]
    assert {name for name in mlx.packed if name in stored} == (set(mlx.packed) if bits else set())
    assert all(stored[name].dtype == np.float32 for name in mlx.float32)
    want = mlx_lm_logits(converted, tokens)
    if bits is None:
        assert scaled_error(want, reference_logits(hf, tokens)) <= 1e-4
    for backend in BACKENDS:
        got = DecoderOnlyLLM.from_pretrained(converted, backend=backend, dtype="float32").forward_verify("m", tokens)
        assert scaled_error(got, want) <= 1e-4, backend


@pytest.mark.parametrize("family", _mlx_cases(quantize=True))
def test_ferrum_quantize_writes_what_mlx_lm_writes(checkpoints, family, tmp_path):
    """``ferrum quantize`` packs or leaves in float what mlx-lm's conversion does, bit for bit from a float32
    source, and mlx-lm runs the result as Ferrum does."""
    from mlx_lm.convert import convert
    from safetensors.numpy import load_file

    from ferrum.quant.convert import quantize_checkpoint

    source, _ = _as_mlx_lm_reads_it(checkpoints, family, tmp_path / "hf")
    mlx = FAMILIES[family].mlx
    with pytest.warns(UserWarning, match=mlx.quantize_warns) if mlx.quantize_warns else contextlib.nullcontext():
        ours = quantize_checkpoint(source, tmp_path / "ferrum", bits=4, group_size=mlx.group)
    convert(str(source), str(tmp_path / "mlx"), quantize=True, q_bits=4, q_group_size=mlx.group)
    got, expected = load_file(str(ours / "model.safetensors")), load_file(str(tmp_path / "mlx" / "model.safetensors"))
    assert got.keys() == expected.keys()
    for name, array in expected.items():
        assert got[name].dtype == array.dtype and np.array_equal(got[name], array), name
    tokens = _tokens(family)
    want = mlx_lm_logits(ours, tokens)
    got = DecoderOnlyLLM.from_pretrained(ours, backend="cpu", dtype="float32").forward_verify("m", tokens)
    assert scaled_error(got, want) <= 1e-4
