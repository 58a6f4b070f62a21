"""Dots 3 (``dots3_note_text``, and the ``dots3_note`` wrapper's text model): DeepSeek-V3.2's latent attention sized
per layer kind (the sliding layers' fewer, wider heads padded to the KV pool's at load, ``LayerSpec.mla``), its
normed latents scaled, its shared rope key RMS-normed, each head gated by ``g_proj``, each kind's own rope, sliding
windows, DSA run as the dense attention it is up to ``index_topk`` keys, and sigmoid-routed experts beside shared
experts of their own width; against transformers' Dots3NoteForCausalLM and Dots3NoteForConditionalGeneration (which
saves the release's layout) on every runnable backend. The MoE checks every family shares are
tests/test_moe_families.py's."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import transformers

from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, ContextLengthExceededError, UnsupportedFeatureError
from support import (
    assert_engine_keeps_greedy_tokens, assert_forward_and_decode_match, float32_model, randomized_reference,
    reference_logits, runnable_backends, scaled_error, small_pool_engine, staggered_greedy_workload,
)

BACKENDS = runnable_backends()
VOCAB = 97
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=11)]
TOPK, WINDOW = 8, 6  # the capped variant's index_topk; the sliding layers' window, which 11 tokens pass
LONG = [int(t) for t in np.random.RandomState(1).randint(0, VOCAB, size=2 * TOPK)]
#: The sliding layers' sizes as the release spells them: half the heads, wider q/k heads (24 + 8 dims against the
#: indexed layers' 16 + 8), narrower values, other latent ranks.
SWA = dict(swa_num_attention_heads=2, swa_num_key_value_heads=2, swa_q_lora_rank=20, swa_kv_lora_rank=40,
           swa_head_dim=32, swa_qk_nope_head_dim=24, swa_v_head_dim=12)


def text_config(**extra) -> dict:
    """Four layers (indexed, indexed, sliding, sliding by Dots3NoteTextConfig's pattern), the first MLP dense; eight
    experts of 16, two a token, a shared expert of 24."""
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, moe_intermediate_size=16,
                    shared_experts_intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                    v_head_dim=16, head_dim=32, n_routed_experts=8, num_experts_per_tok=2, index_topk=64,
                    index_head_dim=16, index_n_heads=2, sliding_window=WINDOW, max_position_embeddings=256,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2, **SWA)
    return {**settings, **extra}


def _wrapper_config() -> transformers.Dots3NoteConfig:
    vision = dict(hidden_size=16, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=1,
                  num_attention_heads=2, patch_size=2, adapter_in_dim=16, adapter_out_dim=64, pyramid_num_routed=[-1])
    audio = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 adapter_input_size=16, adapter_out_dim=64, downsample_hidden_size=8, feature_size=16)
    text = transformers.Dots3NoteTextConfig(**text_config()).to_dict()
    return transformers.Dots3NoteConfig(text_config=text, vision_config=vision, audio_config=audio)


def build_checkpoints(tmp_path_factory) -> dict:
    """"note": the text model as transformers saves it; "capped": index_topk 8; "wrapper": the multimodal model,
    which transformers saves in the release's layout (model.layers.*, vision_encoder.*, audio_encoder.*)."""
    out = {}
    for name, make in (("note", lambda: randomized_reference(transformers.Dots3NoteTextConfig(**text_config()))),
                       ("capped", lambda: randomized_reference(transformers.Dots3NoteTextConfig(**text_config(
                           index_topk=TOPK)))),
                       ("wrapper", lambda: randomized_reference(_wrapper_config(),
                                                                transformers.Dots3NoteForConditionalGeneration))):
        folder = tmp_path_factory.mktemp(name)
        model = make()
        model.save_pretrained(folder)
        out[name] = folder, model
    return out


def test_reads_each_kind_sizes_padded_to_the_pool(checkpoints):
    config = float32_model(checkpoints["note"][0]).config
    arch = config.arch
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.max_seq_len) == (4, 4, 32, 64)
    indexed, sliding = arch.latent(0), arch.latent(2)
    assert (indexed.heads, indexed.width_heads, indexed.qk_head_dim, indexed.head_dim, indexed.kv_lora_rank) == (
        4, 4, 24, 32, 32)
    assert (sliding.heads, sliding.width_heads, sliding.qk_head_dim, sliding.head_dim, sliding.v_head_dim) == (
        2, 4, 32, 32, 12)
    assert (indexed.q_scale, sliding.kv_scale, indexed.eps, sliding.rope_norm) == (
        pytest.approx((64 / 24) ** 0.5), pytest.approx((64 / 40) ** 0.5), 1e-5, True)
    assert [(s.window, s.rope.theta, s.rope.rotary_dim, s.attn_scale) for s in arch.layers] == [
        (None, 80e6, 8, 1 / math.sqrt(24)), (None, 80e6, 8, 1 / math.sqrt(24)), (WINDOW, 5e4, 8, 1 / math.sqrt(32)),
        (WINDOW, 5e4, 8, 1 / math.sqrt(32))]
    assert (arch.indexer.layers, [s.mlp for s in arch.layers], arch.moe.shared_expert_size) == (
        (True, True, False, False), ["dense", "moe", "moe", "moe"], 24)


@pytest.mark.parametrize("variant", ["note", "wrapper"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_transformers(checkpoints, backend, variant):
    """A full forward and token-by-token decode against transformers' logits, past the sliding window."""
    folder, hf = checkpoints[variant]
    with torch.no_grad():
        want = hf(torch.tensor([TOKENS])).logits[0].float().numpy()
    assert_forward_and_decode_match(float32_model(folder, backend, block_size=4), TOKENS, want)


class _ForwardGreedy:
    """transformers' greedy tokens from its full forward at each step: its ``generate`` (cache and attention mask)
    departs from its own forward for this model within a few tokens, though one cached step matches it."""

    def __init__(self, hf):
        self.hf = hf

    def generate(self, input_ids, max_new_tokens: int, do_sample: bool = False):
        ids = input_ids[0].tolist()
        for _ in range(max_new_tokens):
            ids.append(int(self.hf(torch.tensor([ids])).logits[0, -1].argmax()))
        return torch.tensor([ids])


def test_engine_keeps_transformers_greedy_tokens(checkpoints):
    folder, hf = checkpoints["note"]
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, **config), _ForwardGreedy(hf),
                                      staggered_greedy_workload(VOCAB))


def _without_rope_key_norm(model):
    for layer in model.model.layers:
        layer.self_attn.k_rope_only_layernorm = torch.nn.Identity()


def _unscaled_latents(model):
    for layer in model.model.layers:
        layer.self_attn.q_lora_scale = layer.self_attn.kv_lora_scale = 1.0


def _ungated(model):
    for layer in model.model.layers:
        layer.self_attn.g_proj.weight.zero_()  # every head times sigmoid(0)


def _sliding_as_indexed_rope(model):
    rope = model.model.rotary_emb
    rope.sliding_attention_inv_freq.copy_(rope.indexed_attention_inv_freq)


@pytest.mark.parametrize("edit", [_without_rope_key_norm, _unscaled_latents, _ungated, _sliding_as_indexed_rope])
def test_each_new_part_moves_transformers_logits(edit):
    """The controls: transformers' logits move (ten times past the parity's tolerance) without the rope key's norm,
    the latents' scales, the heads' gates or the sliding layers' own rope, so the parity above checks each."""
    hf = randomized_reference(transformers.Dots3NoteTextConfig(**text_config()))
    want = reference_logits(hf, TOKENS)
    with torch.no_grad():
        edit(hf)
    assert scaled_error(reference_logits(hf, TOKENS), want) > 1e-3


def test_the_window_bites(checkpoints):
    """The control of the sliding layers' window: transformers' logits past it move where the window is wider."""
    folder, hf = checkpoints["note"]
    wide = transformers.AutoModelForCausalLM.from_pretrained(folder, sliding_window=64).float().eval()
    want, moved = reference_logits(hf, TOKENS), reference_logits(wide, TOKENS)
    assert scaled_error(want[:WINDOW], moved[:WINDOW]) < 1e-5
    assert scaled_error(want[WINDOW:], moved[WINDOW:]) > 1e-3


def test_past_the_cap_the_indexer_selects_and_ferrum_refuses(checkpoints):
    """Past index_topk keys transformers' indexers drop keys (its logits leave those of the same weights with every
    key kept), so Ferrum, which runs dense attention, refuses such a context."""
    folder, hf = checkpoints["capped"]
    dense = transformers.AutoModelForCausalLM.from_pretrained(folder, index_topk=len(LONG)).float().eval()
    sparse, full = reference_logits(hf, LONG), reference_logits(dense, LONG)
    assert scaled_error(sparse[:TOPK], full[:TOPK]) < 1e-5
    assert scaled_error(sparse[TOPK:], full[TOPK:]) > 1e-3
    model = float32_model(folder)
    assert model.config.max_seq_len == TOPK
    assert scaled_error(model.forward_verify("below", LONG[:TOPK]), sparse[:TOPK]) <= 1e-4
    with pytest.raises(ContextLengthExceededError):
        model.forward_verify("past", LONG)


def test_ferrum_quantize_keeps_the_padded_o_proj_float_and_its_output_runs(checkpoints, tmp_path):
    """The load pads the sliding layers' o_proj columns to the pool's heads, from float only: `ferrum quantize` leaves
    o_proj in float (false in config.json) and packs the rest, a folder Ferrum runs near transformers' logits."""
    from ferrum.quant.convert import quantize_checkpoint

    folder, hf = checkpoints["note"]
    out = quantize_checkpoint(folder, tmp_path / "q", bits=8, group_size=32)
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    assert quantization["model.layers.2.self_attn.o_proj"] is False
    assert "model.layers.2.self_attn.g_proj" not in quantization  # packed, as the default says
    got = float32_model(out).forward_verify("q", TOKENS)
    assert scaled_error(got, reference_logits(hf, TOKENS)) < 2e-2


def _release(text: dict) -> dict:
    """The release's spelling of a text config (Dots3NoteTextConfig's legacy keys), flat beside the wrapper's."""
    out = {k: v for k, v in text.items() if k not in (
        "layer_types", "per_layer_config", "mlp_layer_types", "sliding_window", "rope_parameters",
        "shared_experts_intermediate_size")}
    return {**out, **SWA, "use_dsa": True, "use_sliding_window": True, "first_k_dense_replace": 1, "moe_layer_freq": 1,
            "sliding_window_size": WINDOW, "rope_theta": 80e6, "swa_rope_theta": 5e4,
            "moe_shared_expert_intermediate_size": 24}


def test_reads_the_release_config_as_transformers_does(checkpoints, tmp_path):
    """The wrapper's release config keeps its text keys at the top level in their legacy spellings (swa_* sizes,
    use_dsa, first_k_dense_replace...): read as transformers reads them, the same model as transformers' save."""
    folder = checkpoints["wrapper"][0]
    saved = json.loads((folder / "config.json").read_text())
    flat = {**_release(saved["text_config"]), "model_type": "dots3_note",
            **{k: saved[k] for k in ("vision_config", "audio_config", "image_token_id")}}
    reread = transformers.Dots3NoteConfig(**{k: v for k, v in flat.items() if k != "model_type"}).text_config
    assert (reread.layer_types, reread.mlp_layer_types, reread.sliding_window, reread.rope_parameters) == (
        saved["text_config"]["layer_types"], saved["text_config"]["mlp_layer_types"], WINDOW,
        saved["text_config"]["rope_parameters"])
    (tmp_path / "config.json").write_text(json.dumps(flat))
    assert ModelConfig.from_file(tmp_path).arch == ModelConfig.from_file(folder).arch


def _edited(folder, tmp_path, edit) -> ModelConfig:
    raw = json.loads((folder / "config.json").read_text())
    edit(raw)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return ModelConfig.from_file(tmp_path)


@pytest.mark.parametrize("edit, words", [
    (lambda t: t["per_layer_config"]["2"].update(sliding_window=4), "per_layer_config"),  # not a latent size
    (lambda t: t["per_layer_config"]["3"].update(num_key_value_heads=1), "per_layer_config"),
    (lambda t: t["per_layer_config"]["3"].update(v_head_dim=8), "sizes two sliding_attention layers"),
    (lambda t: t["rope_parameters"]["sliding_attention"].update(rope_type="linear", factor=2.0), "rope_parameters"),
    (lambda t: t.update(layer_types=["indexed_attention"] * 3 + ["chunked_attention"]), "layer_types"),
])
def test_refuses_what_it_does_not_run_by_name(checkpoints, tmp_path, edit, words):
    with pytest.raises((ConfigError, UnsupportedFeatureError), match=words):
        _edited(checkpoints["note"][0], tmp_path, edit)


def test_without_sliding_or_indexed_layers(checkpoints, tmp_path):
    """Every layer indexed: one latent size, no padding; every layer full (use_dsa false): no indexer, no cap."""
    folder = checkpoints["note"][0]
    indexed = _edited(folder, tmp_path, lambda t: t.update(layer_types=["indexed_attention"] * 4,
                                                           per_layer_config={}))
    rope = {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}
    assert all(s.mla is None for s in indexed.arch.layers) and indexed.arch.mla.dim is None
    assert indexed.head_dim == 24 and indexed.max_seq_len == 64
    full = _edited(folder, tmp_path, lambda t: t.update(layer_types=["full_attention"] * 4, per_layer_config={},
                                                        rope_parameters=rope))
    assert (full.arch.indexer, full.arch.context_limit, full.max_seq_len) == (None, None, 256)
