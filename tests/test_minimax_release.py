"""MiniMax-Text-01 / MiniMax-M1 as released (model_type ``minimax_text_01`` / ``minimax_m1``, read as the releases'
own code reads them): rope on the first ``rotary_dim`` dims of each head and that code's lightning decay rates.

transformers 5.24 rotates whole heads and spaces its decay slopes evenly, so the reference is its MiniMax with those
two parts as the release code has them (``modeling_minimax_text_01.py`` of MiniMaxAI/MiniMax-Text-01, read in the
code index as zzp1012/nanoGPT's copy; MiniMax-M1's ``modeling_minimax_m1.py`` is the same renamed):

* ``MiniMaxText01Attention`` builds ``MiniMaxText01RotaryEmbedding(config.rotary_dim, base=rope_theta)``, whose
  ``inv_freq = 1 / base ** (arange(0, rotary_dim, 2) / rotary_dim)``, and ``apply_rotary_pos_emb`` rotates
  ``q[..., :rot_dim]`` with ``rotate_half`` and passes ``q[..., rot_dim:]`` through (vLLM's port: rotary_dim,
  ``is_neox_style=True``);
* ``MiniMaxText01Model`` gives layer ``idx`` the rates ``_build_slope_tensor(heads) * (1 - idx / (len(layers) - 1)
  + 1e-5)``, ALiBi's slopes with the interleaving for head counts not a power of two.

Six heads here, so the second part shows; controls show both parts count. The checkpoint is the release's: its
config.json spelled as MiniMax-Text-01's (reconstructed from transformers' MiniMax-VL-01 migration test, which
copies that text config, and vLLM's loader), the tensors under the release's names without transformers' buffers.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

from ferrum.errors import ConfigError, UnsupportedFeatureError
from support import (
    assert_engine_keeps_greedy_tokens, assert_forward_and_decode_match, build_transformers_model, float32_model,
    reference_logits, runnable_backends, scaled_error, small_pool_engine, staggered_greedy_workload, write_tokenizer,
)
from test_minimax import assert_a_kept_state_starts_a_sequence

BACKENDS = runnable_backends()
VOCAB, HEADS, HEAD_DIM, ROTARY, THETA = 300, 6, 16, 8, 10_000.0
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=21)]
KINDS = [0, 1, 0, 0]  # attn_type_list: 0 lightning, 1 softmax attention
#: The residual factors under the release's names, unlike one another and unlike 1.
FACTORS = dict(layernorm_linear_attention_alpha=2.2, layernorm_linear_attention_beta=0.8,
               layernorm_full_attention_alpha=1.7, layernorm_full_attention_beta=0.6, layernorm_mlp_alpha=1.3,
               layernorm_mlp_beta=0.7)
RELEASES = {"minimax_text_01": "MiniMaxText01ForCausalLM", "minimax_m1": "MiniMaxM1ForCausalLM"}


def release_config(model_type: str) -> dict:
    """config.json as MiniMax-Text-01's is written (sizes shrunk): its code's own keys, no layer_types, no
    rope_parameters, bos / eos null, shared_intermediate_size a list ([0], as transformers' copy has it)."""
    model = RELEASES[model_type]
    return {
        "architectures": [model], "model_type": model_type,
        "auto_map": {"AutoConfig": f"configuration_{model_type}.{model.removesuffix('ForCausalLM')}Config",
                     "AutoModelForCausalLM": f"modeling_{model_type}.{model}"},
        "attn_type_list": KINDS, "attention_dropout": 0.0, "bos_token_id": None, "eos_token_id": None,
        "head_dim": HEAD_DIM, "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02,
        "intermediate_size": 48, **FACTORS, "max_position_embeddings": 256, "num_attention_heads": HEADS,
        "num_experts_per_tok": 2, "num_hidden_layers": 4, "num_key_value_heads": 2, "num_local_experts": 4,
        "output_router_logits": False, "postnorm": True, "rms_norm_eps": 1e-5, "rope_theta": THETA,
        "rotary_dim": ROTARY, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0,
        "shared_intermediate_size": [0], "shared_moe_mode": "sigmoid", "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": VOCAB,
    }


def hf_config() -> transformers.MiniMaxConfig:
    """The same model in transformers' spelling."""
    names = {"layernorm_linear_attention_": "linear_attn_", "layernorm_full_attention_": "full_attn_",
             "layernorm_mlp_": "mlp_"}
    factors = {next(new + k.removeprefix(old) + "_factor" for old, new in names.items() if k.startswith(old)): v
               for k, v in FACTORS.items()}
    return transformers.MiniMaxConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=4, num_attention_heads=HEADS,
        num_key_value_heads=2, head_dim=HEAD_DIM, num_local_experts=4, num_experts_per_tok=2, block_size=4,
        max_position_embeddings=256, layer_types=["full_attention" if k else "linear_attention" for k in KINDS],
        rope_parameters={"rope_type": "default", "rope_theta": THETA}, pad_token_id=None, bos_token_id=0,
        eos_token_id=1, **factors)


def release_slopes(heads: int, idx: int, layers: int):
    """The release code's decay rates of layer ``idx`` (``_build_slope_tensor`` and the model's depth factor)."""
    import torch

    def get_slopes(n):
        def get_slopes_power_of_2(n):
            start = 2 ** (-(2 ** -(math.log2(n) - 3)))
            return [start * start ** i for i in range(n)]

        if math.log2(n).is_integer():
            return get_slopes_power_of_2(n)
        closest = 2 ** math.floor(math.log2(n))
        return get_slopes_power_of_2(closest) + get_slopes(2 * closest)[0::2][:n - closest]

    slopes = torch.tensor(get_slopes(heads), dtype=torch.float32).reshape(heads, 1, 1)
    return slopes * (1 - idx / (layers - 1) + 1e-5)


def release_rope(q, k, cos, sin, unsqueeze_dim=1):
    """The release code's ``apply_rotary_pos_emb``: the first ``cos.shape[-1]`` dims rotated, the rest passed."""
    import torch
    from transformers.models.minimax.modeling_minimax import rotate_half

    rot = cos.shape[-1]
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    (q_, q_pass), (k_, k_pass) = (q[..., :rot], q[..., rot:]), (k[..., :rot], k[..., rot:])
    return (torch.cat((q_ * cos + rotate_half(q_) * sin, q_pass), dim=-1),
            torch.cat((k_ * cos + rotate_half(k_) * sin, k_pass), dim=-1))


def set_rope_dims(hf, dims: int) -> None:
    """``hf``'s rotary table spaced over ``dims`` dims (the release code's ``MiniMaxText01RotaryEmbedding``)."""
    import torch

    inv_freq = 1.0 / (THETA ** (torch.arange(0, dims, 2, dtype=torch.int64).float() / dims))
    hf.model.rotary_emb.inv_freq = inv_freq
    hf.model.rotary_emb.original_inv_freq = inv_freq.clone()


def set_slopes(hf, rates) -> None:
    """Every lightning layer of ``hf`` decaying at ``rates(layer attention)``, its block decays recomputed."""
    for layer in hf.model.layers:
        attn = layer.self_attn
        if isinstance(attn, transformers.models.minimax.modeling_minimax.MiniMaxLightningAttention):
            slope = rates(attn)
            attn.slope_rate = slope
            attn.query_decay, attn.key_decay, attn.diagonal_decay = attn.decay_factors(slope)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(the release-format folder, transformers' MiniMax run as the release code runs it)."""
    from transformers.models.minimax import modeling_minimax

    folder = tmp_path_factory.mktemp("minimax_text_01")
    hf = build_transformers_model(folder, hf_config())
    write_tokenizer(folder, VOCAB)
    (folder / "config.json").write_text(json.dumps(release_config("minimax_text_01")))
    tensors = load_file(folder / "model.safetensors")  # the release holds no decay buffers
    save_file({k: v for k, v in tensors.items() if not k.endswith(("_rate", "_decay"))},
              folder / "model.safetensors", metadata={"format": "pt"})
    set_rope_dims(hf, ROTARY)
    set_slopes(hf, lambda attn: release_slopes(HEADS, attn.layer_idx, 4))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(modeling_minimax, "apply_rotary_pos_emb", release_rope)
        yield folder, hf


def test_reads_the_release_config(checkpoint):
    arch = float32_model(checkpoint[0]).config.arch
    assert [s.mixer for s in arch.layers] == ["lightning", "attention", "lightning", "lightning"]
    rope = arch.layers[1].rope
    assert (rope.rotary_dim, rope.head_dim, rope.theta, rope.interleaved) == (ROTARY, HEAD_DIM, THETA, False)
    assert arch.layers[0].residual_scales == (2.2, 0.8, 1.3, 0.7)
    assert arch.layers[1].residual_scales == (1.7, 0.6, 1.3, 0.7)
    for i in (0, 2, 3):
        np.testing.assert_allclose(np.exp(arch.computed[f"layers.{i}.self_attn.a_log"]),
                                   release_slopes(HEADS, i, 4).reshape(-1).numpy(), rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_and_decode_steps_match_the_release_code(checkpoint, backend):
    folder, hf = checkpoint
    assert_forward_and_decode_match(float32_model(folder, backend), TOKENS, reference_logits(hf, TOKENS))


def test_minimax_m1_reads_the_same(checkpoint, tmp_path):
    folder, hf = checkpoint
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(release_config("minimax_m1")))
    got = float32_model(tmp_path).forward_verify("m", TOKENS)
    assert scaled_error(got, reference_logits(hf, TOKENS)) <= 1e-4


def test_minimax_vl_01_runs_its_text_model(checkpoint, tmp_path):
    """MiniMax-VL-01 (LLaVA-NeXT's wrapper): MiniMax-Text-01 under text_config and language_model.*, beside a
    vision tower and projector that text never reads."""
    folder, hf = checkpoint
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    tensors = {f"language_model.{k}": v for k, v in load_file(folder / "model.safetensors").items()}
    tensors["vision_tower.vision_model.embeddings.patch_embedding.weight"] = np.zeros((8, 3, 2, 2), np.float32)
    tensors["multi_modal_projector.linear_1.weight"] = np.zeros((64, 8), np.float32)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "minimax_vl_01", "architectures": ["MiniMaxVL01ForConditionalGeneration"],
        "text_config": release_config("minimax_text_01"), "vision_config": {"model_type": "clip_vision_model"},
        "image_token_index": VOCAB - 1, "tie_word_embeddings": False}))
    got = float32_model(tmp_path).forward_verify("vl", TOKENS)
    assert scaled_error(got, reference_logits(hf, TOKENS)) <= 1e-4


def test_whole_head_rope_misses(checkpoint):
    """transformers' reading (every dim of the head rotated, frequencies spaced over it) gives other logits: the
    check above can fail on the rope."""
    folder, hf = checkpoint
    got = float32_model(folder).forward_verify("w", TOKENS)
    try:
        set_rope_dims(hf, HEAD_DIM)
        whole = reference_logits(hf, TOKENS)
    finally:
        set_rope_dims(hf, ROTARY)
    assert scaled_error(got, whole) > 1e-3
    assert scaled_error(got, reference_logits(hf, TOKENS)) <= 1e-4


def test_transformers_slopes_miss(checkpoint):
    """transformers' evenly spaced slopes (six heads: not ALiBi's) give other logits: the rates count."""
    folder, hf = checkpoint
    got = float32_model(folder).forward_verify("s", TOKENS)
    try:
        set_slopes(hf, lambda attn: attn.get_slope_rate())
        theirs = reference_logits(hf, TOKENS)
    finally:
        set_slopes(hf, lambda attn: release_slopes(HEADS, attn.layer_idx, 4))
    assert scaled_error(got, theirs) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_batching_chunking_and_preemption_give_each_requests_greedy_tokens(checkpoint, backend):
    folder, hf = checkpoint
    assert_engine_keeps_greedy_tokens(lambda **settings: small_pool_engine(folder, backend, **settings), hf,
                                      staggered_greedy_workload(VOCAB))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sequence_started_from_a_kept_state_computes_the_release_codes_logits(checkpoint, backend):
    assert_a_kept_state_starts_a_sequence(*checkpoint, backend)


@pytest.mark.parametrize("change, error, named", [
    (dict(postnorm=False), UnsupportedFeatureError, "postnorm"),
    (dict(postnorm=None), UnsupportedFeatureError, "postnorm"),  # left out: the release code's pre-norm blocks
    (dict(shared_intermediate_size=[0, 32, 0, 0]), UnsupportedFeatureError, "shared_intermediate_size"),
    (dict(rotary_dim=2 * HEAD_DIM), ConfigError, "rotary_dim"),
    (dict(rotary_dim=ROTARY - 1), ConfigError, "rotary_dim"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), UnsupportedFeatureError, "rope_scaling"),  # read by none
])
def test_what_the_release_code_runs_otherwise_is_refused_by_name(checkpoint, tmp_path, change, error, named):
    """Each change (None: the key left out) is refused by name."""
    folder, _ = checkpoint
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    config = {**release_config("minimax_text_01"), **change}
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in change or
                                                      v is not None}))
    with pytest.raises(error, match=named):
        float32_model(tmp_path)
