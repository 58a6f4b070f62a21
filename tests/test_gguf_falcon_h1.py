"""GGUF imports of Falcon-H1 (``falcon-h1``): tiny random transformers FalconH1 models written as llama.cpp's
FalconH1Model writes them (every muP multiplier folded into the weights and none written, Mamba-2's A_log as
-exp(A_log) and D as columns, the convolution squeezed, the gated norm cut into its groups, q/k as they are),
imported, and run against transformers (float32 files) or the same file imported in float32 (Q8_0)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from ferrum.gguf_import import convert_gguf  # noqa: E402
from gguf_writer import (  # noqa: E402
    TINY_TOKENS, add_sentencepiece_vocab, add_tensor, assert_logits_match, assert_runs_as_its_float_import,
    ferrum_logits, finish, sentencepiece_vocab,
)
from test_gguf_import import _mamba2_as_converted  # noqa: E402

Q = gguf.GGMLQuantizationType
_COMMON = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, mamba_d_ssm=96, mamba_n_heads=6, mamba_d_state=8, mamba_d_conv=4,
               max_position_embeddings=256, embedding_multiplier=2.0, lm_head_multiplier=0.5,
               attention_in_multiplier=0.7, attention_out_multiplier=0.9, key_multiplier=0.4, ssm_in_multiplier=1.25,
               ssm_out_multiplier=0.3, mlp_multipliers=[0.8, 0.6], ssm_multipliers=[0.35, 0.25, 0.4, 0.5, 0.3],
               pad_token_id=0, bos_token_id=1, eos_token_id=2)
#: 1.5B-Deep's layout (the gated norm, two B/C groups, an untied head) and 0.5B's (no norm in the mixer, tied).
_VARIANTS = {"untied": dict(mamba_rms_norm=True, mamba_norm_before_gate=False, mamba_n_groups=2,
                            tie_word_embeddings=False),
             "tied": dict(mamba_rms_norm=False, mamba_n_groups=1, tie_word_embeddings=True)}


def _tiny(variant: str):
    """A random float32 Falcon-H1 over the test vocabulary: A_log, D and dt_bias spread, norms around 1."""
    config = transformers.FalconH1Config(**_COMMON, **_VARIANTS[variant], vocab_size=len(sentencepiece_vocab()[0]))
    torch.manual_seed(0)
    hf = transformers.FalconH1ForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(1, 0.3)
            elif name.endswith(("A_log", "dt_bias", ".D")):
                param.uniform_(-1.0, 1.0)
            else:
                param.normal_(0, 0.2)
    return hf, config


def _folded(name: str, a: np.ndarray, config) -> np.ndarray:
    """The converter's folding of the multipliers (FalconH1Model.modify_tensors, in its order)."""
    ssm, inner, groups = config.ssm_multipliers, config.mamba_d_ssm, config.mamba_n_groups * config.mamba_d_state
    if "down_proj" in name:
        return a * config.mlp_multipliers[1]
    if "gate_proj" in name:
        return a * config.mlp_multipliers[0]
    if "k_proj" in name:
        return a * config.key_multiplier * config.attention_in_multiplier
    if "q_proj" in name or "v_proj" in name:
        return a * config.attention_in_multiplier
    if "o_proj" in name:
        return a * config.attention_out_multiplier
    if "out_proj" in name:
        return a * config.ssm_out_multiplier
    if "in_proj" in name:
        rows = np.concatenate([np.full(n, m) for n, m in zip((inner, inner, groups, groups, config.mamba_n_heads),
                                                             ssm)])
        return a * config.ssm_in_multiplier * rows[:, None]
    if "lm_head" in name:
        return a * config.lm_head_multiplier
    if "embed_tokens" in name:
        return a * config.embedding_multiplier
    return a


def _converted(name: str, a: np.ndarray, config) -> tuple[str, np.ndarray]:
    """One transformers tensor as llama.cpp's converter writes it, under the name its tensor map reads."""
    a = _folded(name, a, config)
    return _mamba2_as_converted(name, a, config.mamba_n_groups, "mamba.norm.weight") or (name, a)


def _falcon_h1_gguf(path: Path, hf, config, qtype) -> None:
    """``hf`` as llama.cpp's FalconH1Model writes it; matrices as ``qtype``, the norms, convolutions and vectors
    float."""
    w = gguf.GGUFWriter(str(path), "falcon-h1")
    w.add_vocab_size(config.vocab_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_ssm_conv_kernel(config.mamba_d_conv)
    w.add_ssm_inner_size(config.mamba_d_ssm)
    w.add_ssm_state_size(config.mamba_d_state)
    w.add_ssm_time_step_rank(config.mamba_n_heads)
    w.add_ssm_group_count(config.mamba_n_groups)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_parameters["rope_theta"])
    add_sentencepiece_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.FALCON_H1, config.num_hidden_layers)
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        hf_name, array = _converted(name, tensor.float().numpy(), config)
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if not gguf_name.endswith((".weight", ".bias")) and hf_name.endswith(".weight"):
            gguf_name += ".weight"  # gguf-py maps pre_ff_layernorm by its full name; llama.cpp reads ffn_norm.weight
        add_tensor(w, gguf_name, array, qtype, ("ssm_conv1d", "ssm_norm", "ssm_a", "ssm_d"))
    finish(w)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("variant", list(_VARIANTS))
def test_falcon_h1_gguf_matches_the_model_it_was_written_from(tmp_path, variant, qtype):
    """Each layout imports as transformers' FalconH1 with every multiplier 1 (the weights hold them); a float32 file
    with its own head gives transformers' logits; a tied one, whose head reads the scaled embeddings and no
    lm_head_multiplier as llama.cpp's does, transformers' times embedding_multiplier / lm_head_multiplier. Q8_0
    files (packed) give what the same file imported in float32 gives."""
    from ferrum.config import ModelConfig

    hf, config = _tiny(variant)
    _falcon_h1_gguf(tmp_path / "m.gguf", hf, config, qtype)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    ours = ModelConfig.from_file(out)
    assert ours.model_type == "falcon_h1" and not ours.arch.scales and ours.arch.embed_scale is None
    mamba = ours.arch.mamba2
    assert (mamba.inner, mamba.num_heads, mamba.num_groups, mamba.state_size) == (96, 6, config.mamba_n_groups, 8)
    assert mamba.gate == ("before_norm" if config.mamba_rms_norm else "no_norm")
    if qtype != Q.F32:
        assert ours.quantization is not None
        assert_runs_as_its_float_import(tmp_path / "m.gguf", out, tmp_path / "float")
    elif not config.tie_word_embeddings:
        assert_logits_match(hf, out)
    else:
        with torch.no_grad():
            want = hf(torch.tensor([TINY_TOKENS])).logits[0].numpy() * (2.0 / 0.5)
        got = ferrum_logits(out, TINY_TOKENS)
        assert float(np.abs(got - want).max()) <= 1e-4 * float(np.abs(want).max())
