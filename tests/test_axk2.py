"""SK Telecom's A.X-K2 (``axk2``): DeepSeek-V3.2's latent attention with DSA run densely up to ``index_topk`` keys
(ferrum.arch.dsa), its queries and a sigmoid gate of each head's values from the query latent beside its norm
(ferrum.arch.mla), gated RMSNorms (ferrum.arch.norms.NormGate) and sigmoid routing, ungrouped or grouped with the
dropped groups masked by 0 (ferrum.moe.routing.NOAUX_TC_ZERO_MASKED); against transformers' own model and router on
every runnable backend. The MoE checks every family shares are tests/test_moe_families.py's."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import transformers

from ferrum.config import ModelConfig
from ferrum.errors import CheckpointError, ConfigError, ContextLengthExceededError, UnsupportedFeatureError
from ferrum.moe.routing import GROUPED_RULES, NOAUX_TC, NOAUX_TC_ZERO_MASKED, route_grouped
from ferrum.sampling import SamplingParams
from support import (
    assert_forward_and_decode_match, float32_model, randomized_reference, reference_logits, runnable_backends,
    saved_references, scaled_error, small_pool_engine, with_edited_tensors,
)

BACKENDS = runnable_backends()
VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=11)]
TOPK = 8  # the capped variant's index_topk
LONG = [int(t) for t in np.random.RandomState(1).randint(0, 97, size=2 * TOPK)]
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}


def axk2_config(**extra) -> transformers.AXK2Config:
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=80, moe_intermediate_size=24,
                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24,
                    kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8,
                    num_experts_per_tok=2, n_shared_experts=1, max_position_embeddings=256, index_topk=64,
                    index_head_dim=16, index_n_heads=2, gated_norm_rank=6, bos_token_id=0, eos_token_id=1)
    return transformers.AXK2Config(**{**settings, **extra})


#: A.X-K2-Light's layout (ungrouped, the first layer dense), index_topk above every context the tests run; a dense
#: layer between sparse ones, biased projections, YaRN; the light layout capped at 8 keys; four groups of two
#: experts, three kept, four experts chosen (:func:`grouped_reference`'s corrections).
VARIANTS = {"light": {},
            "yarn": dict(mlp_layer_types=["sparse", "dense", "sparse"], attention_bias=True, rope_parameters=YARN),
            "capped": dict(index_topk=TOPK),
            "grouped": dict(n_group=4, topk_group=3, num_experts_per_tok=4)}
DENSE = {"light": [0], "yarn": [1], "capped": [0], "grouped": [0]}


def grouped_reference(config) -> transformers.PreTrainedModel:
    """:func:`randomized_reference`; grouped, each router's correction bias 0 on the first group's experts and -2 on
    the others': their corrected scores all fall below the 0 masking the dropped group, whose two experts are chosen
    beside the first group's two, each token (one group dropped, so never tied at the top-k boundary, where MLX's
    choice would differ from torch's)."""
    model = randomized_reference(config)
    if (config.n_group or 1) > 1:
        with torch.no_grad():
            for layer in model.model.layers:
                if hasattr(layer.mlp, "gate"):  # a sparse layer
                    bias = layer.mlp.gate.e_score_correction_bias
                    bias.fill_(-2.0)[: len(bias) // config.n_group] = 0.0
    return model


def build_checkpoints(tmp_path_factory) -> dict:
    return saved_references(tmp_path_factory, VARIANTS, axk2_config, grouped_reference)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_transformers(checkpoints, backend, variant):
    """A full forward and token-by-token decode, against transformers' logits (within index_topk keys)."""
    folder, hf = checkpoints[variant]
    tokens = TOKENS[:TOPK] if variant == "capped" else TOKENS
    model = float32_model(folder, backend, block_size=4)
    assert [i for i, spec in enumerate(model.config.arch.layers) if spec.mlp == "dense"] == DENSE[variant]
    assert model.config.max_seq_len == (TOPK if variant == "capped" else 64)
    assert_forward_and_decode_match(model, tokens, reference_logits(hf, tokens))


def _moved(hf, edit) -> np.ndarray:
    """transformers' logits over TOKENS with ``edit(model)`` applied, then undone."""
    saved = {name: p.detach().clone() for name, p in hf.named_parameters()}
    with torch.no_grad():
        edit(hf)
        moved = reference_logits(hf, TOKENS)
        for name, p in hf.named_parameters():
            p.copy_(saved[name])
    return moved


@pytest.mark.parametrize("part", ["attention norm gate", "sparse MLP norm gate", "output gate", "latent queries"])
def test_the_parity_is_sensitive_to_each_new_part(checkpoints, part):
    """The controls: transformers' logits move where the gated norms' gates, the output gate's rows of q_gate_proj,
    or its columns reading the un-normed query latent do."""
    _, hf = checkpoints["light"]
    q, r = 24, 24  # a head's query dims (its gate's 12 follow), the query latent's

    def per_head(model):  # layer 1's q_gate_proj (the release's q_b_proj), [head, query then gate, 2r]
        return model.model.layers[1].self_attn.q_gate_proj.weight.view(4, q + 12, 2 * r)

    edits = {"attention norm gate": lambda m: m.model.layers[0].input_layernorm.mlp.fc2.weight.mul_(4.0),
             "sparse MLP norm gate": lambda m: m.model.layers[2].post_attention_layernorm.mlp.fc2.weight.mul_(4.0),
             "output gate": lambda m: per_head(m)[:, q:].mul_(-1.0),
             "latent queries": lambda m: per_head(m)[:, :q, r:].mul_(-1.0)}
    assert scaled_error(_moved(hf, edits[part]), reference_logits(hf, TOKENS)) > 1e-2


def test_the_indexer_selects_past_index_topk(checkpoints):
    """The control of the cap: past index_topk keys transformers' attention is no longer dense."""
    folder, hf = checkpoints["capped"]
    dense = transformers.AutoModelForCausalLM.from_pretrained(folder, index_topk=len(LONG)).float().eval()
    sparse, full = reference_logits(hf, LONG), reference_logits(dense, LONG)
    assert scaled_error(sparse[:TOPK], full[:TOPK]) < 1e-5
    assert scaled_error(sparse[TOPK:], full[TOPK:]) > 1e-3


def test_a_longer_context_is_refused(checkpoints):
    folder, _ = checkpoints["capped"]
    with pytest.warns(UserWarning, match="index_topk"):
        model = float32_model(folder, block_size=4, max_seq_len=64)
    with pytest.raises(ContextLengthExceededError, match=f"context length of {TOPK}"):
        model.forward_verify("long", LONG[:TOPK + 1])


def test_the_engine_generates_transformers_tokens_up_to_the_cap(checkpoints):
    folder, hf = checkpoints["capped"]
    engine = small_pool_engine(folder)
    engine.add_request(TOKENS[:5], SamplingParams(max_tokens=10, ignore_eos=True))
    (out,) = [o for o in engine.run_until_done() if o.finished]
    with torch.no_grad():
        want = hf.generate(torch.tensor([TOKENS[:5]]), max_new_tokens=TOPK - 5, do_sample=False)[0, 5:]
    assert list(out.token_ids) == want.tolist()


def test_the_gated_norms_and_query_halves_are_checked(checkpoints, tmp_path):
    """The gates' and q_b_proj's shapes are the config's: a checkpoint without the output gate's rows is refused."""
    folder, _ = checkpoints["light"]
    short = with_edited_tensors(folder, tmp_path / "short", lambda t: t.update({
        "model.layers.1.self_attn.q_b_proj.weight": np.zeros((4 * 24, 48), np.float32)}))
    with pytest.raises(CheckpointError, match=re.escape("model.layers.1.self_attn.q_b_proj.weight")):
        float32_model(short)
    gateless = with_edited_tensors(folder, tmp_path / "gateless",
                                   lambda t: t.pop("model.layers.2.post_attention_layernorm.W_up.weight"))
    with pytest.raises(CheckpointError, match="post_attention_layernorm.W_up"):
        float32_model(gateless)


def test_the_grouped_parity_checks_the_zero_masking(checkpoints, monkeypatch):
    """The control of the grouped variant: run by DeepSeek-V3's rule (dropped groups masked with -inf), Ferrum's
    logits leave transformers'."""
    folder, hf = checkpoints["grouped"]
    assert float32_model(folder).config.arch.moe.routing == "sigmoid_grouped_zero_masked"
    monkeypatch.setitem(GROUPED_RULES, "sigmoid_grouped_zero_masked", NOAUX_TC)
    assert scaled_error(float32_model(folder).forward_verify("c", TOKENS), reference_logits(hf, TOKENS)) > 1e-2


def _by_id(ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's experts in id order, and their weights (the order within the chosen k does not matter)."""
    order = np.argsort(ids, axis=1)
    return np.take_along_axis(ids, order, 1), np.take_along_axis(weights, order, 1)


@pytest.mark.parametrize("groups, kept, top_k", [(4, 2, 3), (8, 3, 5), (4, 1, 4), (2, 1, 2)])
def test_grouped_routing_is_transformers_router(groups, kept, top_k):
    """transformers' AXK2TopkRouter over 16 experts on random logits (an identity router weight passes them through)
    and negative corrections: where fewer than top_k kept experts' corrected scores are above the 0 masking the
    dropped groups, dropped experts are chosen, tied at that 0 (broken as torch.topk on the CPU breaks them), and
    weighed by their scores. Ferrum's rule chooses and weighs as it does; DeepSeek-V3's (-inf) does not (the
    control)."""
    hf = axk2_config(hidden_size=16, n_routed_experts=16, n_group=groups, topk_group=kept, num_experts_per_tok=top_k)
    router = transformers.models.axk2.modeling_axk2.AXK2TopkRouter(hf)
    rng = np.random.default_rng(groups * 10 + kept)
    logits = (rng.standard_normal((256, 16)) * 2).astype(np.float32)
    bias = rng.uniform(-1.5, -0.3, 16).astype(np.float32)
    with torch.no_grad():
        router.weight.copy_(torch.eye(16))
        router.e_score_correction_bias.copy_(torch.from_numpy(bias))
        _, weights, ids = router(torch.from_numpy(logits))
    want_ids, want_weights = _by_id(ids.numpy(), weights.numpy())
    args = (logits, bias, top_k, groups, kept, hf.norm_topk_prob, hf.routed_scaling_factor)
    got_ids, got_weights = _by_id(*route_grouped(*args, NOAUX_TC_ZERO_MASKED))
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_weights, want_weights, rtol=1e-6)
    corrected = (1 / (1 + np.exp(-logits)) + bias).reshape(256, groups, -1)
    kept_groups = np.zeros((256, groups), dtype=bool)
    np.put_along_axis(kept_groups, np.argsort(-np.sort(corrected, axis=-1)[..., -2:].sum(-1), axis=1)[:, :kept], True,
                      axis=1)
    dropped = (~np.take_along_axis(kept_groups, want_ids // (16 // groups), axis=1)).sum(1)  # chosen, per row
    assert dropped.any() and (want_weights > 0).all()  # chosen by their 0, each tied with the others, and weighed
    assert not np.array_equal(_by_id(*route_grouped(*args, NOAUX_TC))[0], want_ids)


def test_ferrum_quantize_keeps_q_b_proj_float_and_its_output_runs(tmp_path):
    """The load cuts q_b_proj's columns, from float only: `ferrum quantize` leaves it in float (false in config.json)
    and packs the rest, the gates' W_down too, a folder Ferrum runs near transformers' float logits."""
    import json

    from ferrum.quant.convert import quantize_checkpoint

    hf = randomized_reference(axk2_config(q_lora_rank=32))  # q_b_proj 64 wide: groups of 32 would pack it
    hf.save_pretrained(tmp_path / "float")
    out = quantize_checkpoint(tmp_path / "float", tmp_path / "q", bits=8, group_size=32)
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    assert quantization["model.layers.1.self_attn.q_b_proj"] is False
    assert "model.layers.1.input_layernorm.W_down" not in quantization  # packed, as the default says
    got = float32_model(out).forward_verify("q", TOKENS)
    assert scaled_error(got, reference_logits(hf, TOKENS)) < 2e-2


# ------------------------------------------------------------------ config


#: AXK2Config's defaults as a release's config.json would give them (A.X-K2-Light: no groups, null n_group).
RELEASE = {"architectures": ["AXK2ForCausalLM"], "model_type": "axk2", "n_group": None, "topk_group": None,
           "first_k_dense_replace": 1, "moe_layer_freq": 1, "rope_theta": 10000.0}


def test_release_config_reads_as_transformers_reads_it():
    config = ModelConfig.from_dict(dict(RELEASE))
    hf = transformers.AXK2Config(**{k: v for k, v in RELEASE.items() if k != "model_type"})
    arch = config.arch
    assert [layer.mlp == "moe" for layer in arch.layers] == [kind == "sparse" for kind in hf.mlp_layer_types]
    assert (config.hidden_size, config.num_heads, config.num_layers, config.head_dim) == (2048, 32, 48, 96)
    assert arch.mla.output_gate and (arch.mla.q_lora_rank, arch.mla.kv_lora_rank, arch.mla.v_head_dim) == (
        384, 128, 64)
    assert arch.layers[0].gated_norms == ("pre_attn",) and arch.layers[1].gated_norms == ("pre_attn", "pre_mlp")
    assert arch.norm_gate_rank == 16 and (arch.indexer.topk, arch.indexer.heads) == (2048, 16)
    moe = arch.moe
    assert (moe.num_experts, moe.top_k, moe.n_group, moe.topk_group, moe.routed_scale, moe.routing) == (
        128, 8, 1, 1, 2.5, "sigmoid_grouped")
    assert arch.layers[0].rope.interleaved and config.max_seq_len == 2048


@pytest.mark.parametrize("changes, error, words", [
    ({"n_group": 3, "topk_group": 1}, ConfigError, "'n_group' (3) must divide the 8 routed experts"),
    ({"n_group": None, "topk_group": 2}, ConfigError, "'n_group' is null but topk_group is 2"),
    ({"rope_interleave": False}, UnsupportedFeatureError, "always rotate adjacent pairs"),
    ({"q_lora_rank": None}, ConfigError, "'q_lora_rank' must be a positive integer"),
    ({"gated_norm_rank": 0}, ConfigError, "'gated_norm_rank' must be a positive integer"),
])
def test_bad_keys_are_refused_by_name(changes, error, words):
    with pytest.raises(error, match=re.escape(words)):
        ModelConfig.from_dict({**axk2_config().to_dict(), **changes})


def test_grouped_config_routes_by_the_zero_masked_rule():
    """Grouped, A.X-K2 routes by its own rule, which plugins learn at API 1.28; ungrouped (A.X-K2-Light) by
    DeepSeek-V3's, which it equals there and every plugin runs."""
    grouped = ModelConfig.from_dict({**axk2_config(n_group=4, topk_group=2).to_dict()}).arch.moe
    assert (grouped.routing, grouped.n_group, grouped.topk_group) == ("sigmoid_grouped_zero_masked", 4, 2)
    ungrouped = ModelConfig.from_dict(axk2_config().to_dict()).arch.moe
    assert NOAUX_TC_ZERO_MASKED.since == (1, 28) and ungrouped.routing == "sigmoid_grouped"
