"""GGUF imports of Mamba-1 (``mamba``: Mamba and Falcon Mamba) and Jamba (``jamba``): tiny random transformers models
written as llama.cpp's MambaModel and JambaModel write them (A_log as -exp(A_log), the convolution squeezed, a tied
head left out, Falcon Mamba flagged by ssm.dt_b_c_rms, Jamba's attention layers by their key/value heads and its
experts stacked), imported, and run against transformers (float32 files) or the same file imported in float32
(Q8_0)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from ferrum.errors import UnsupportedFeatureError  # noqa: E402
from ferrum.gguf_import import convert_gguf  # noqa: E402
from gguf_writer import (  # noqa: E402
    add_sentencepiece_vocab, add_tensor, assert_logits_match, assert_runs_as_its_float_import, finish,
    sentencepiece_vocab,
)

Q = gguf.GGMLQuantizationType
_MAMBA = dict(hidden_size=64, num_hidden_layers=3, state_size=8, conv_kernel=4, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)
_JAMBA = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
              mamba_d_state=8, mamba_d_conv=4, rms_norm_eps=1e-5, max_position_embeddings=256,
              tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_VARIANTS = {
    # mamba-*-hf's layout: tied, a biased convolution, a step of rank 6
    "mamba": lambda: transformers.MambaConfig(**_MAMBA, time_step_rank=6, layer_norm_epsilon=1e-4),
    # Falcon Mamba's (the step / B / C norms; llama.cpp runs them with the layers' epsilon, large here to show),
    # untied, biased projections, an unbiased convolution
    "falcon_mamba": lambda: transformers.FalconMambaConfig(**_MAMBA, layer_norm_epsilon=0.3, mixer_rms_eps=0.3,
                                                           use_bias=True, use_conv_bias=False,
                                                           tie_word_embeddings=False),
    # the releases' Jamba, shrunk: attention on every third layer from the second, experts on every second from the
    # second (4, top 2)
    "jamba": lambda: transformers.JambaConfig(**_JAMBA, attn_layer_period=3, attn_layer_offset=1,
                                              expert_layer_period=2, expert_layer_offset=1, num_experts=4,
                                              num_experts_per_tok=2),
    # a dense Jamba (one expert), attention first, biased projections, an unbiased convolution, a rank of its own
    "jamba_dense": lambda: transformers.JambaConfig(**_JAMBA, attn_layer_period=2, attn_layer_offset=0, num_experts=1,
                                                    mamba_proj_bias=True, mamba_conv_bias=False, mamba_dt_rank=6),
}


def _tiny(variant: str):
    """A random float32 model over the test vocabulary: A_log, D and the step's bias spread, norms around 1."""
    config = _VARIANTS[variant]()
    config.vocab_size = len(sentencepiece_vocab()[0])
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                param.normal_(1, 0.3)
            elif name.endswith(("A_log", "dt_proj.bias", ".D")):
                param.uniform_(-1.0, 1.0)
            else:
                param.normal_(0, 0.2)
    return hf, config


def _converted(hf, config):
    """Each transformers tensor as llama.cpp's converter writes it: A_log as -exp(A_log), the convolution squeezed,
    Jamba's expert stacks as gate, up and down under the merged names (``mlp.experts.{w}``), Mamba's tied head left
    out."""
    for name, tensor in hf.state_dict().items():
        array = tensor.float().numpy()
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.endswith(".A_log"):
            yield name, -np.exp(array)
        elif ".conv1d.weight" in name:
            yield name, array.squeeze(1)
        elif name.endswith("experts.gate_up_proj"):
            gate, up = np.split(array, 2, axis=-2)
            yield name.replace("feed_forward.experts.gate_up_proj", "mlp.experts.gate_proj.weight"), gate
            yield name.replace("feed_forward.experts.gate_up_proj", "mlp.experts.up_proj.weight"), up
        elif name.endswith("experts.down_proj"):
            yield name.replace("feed_forward.experts.down_proj", "mlp.experts.down_proj.weight"), array
        else:
            yield name, array


def _write_keys(w, config) -> None:
    """MambaModel's keys (no heads, no MLP, dt_b_c_rms for Falcon Mamba) or JambaModel's (key/value heads per layer,
    the expert counts)."""
    w.add_block_count(config.num_hidden_layers)
    w.add_embedding_length(config.hidden_size)
    if config.model_type == "jamba":
        w.add_ssm_conv_kernel(config.mamba_d_conv)
        w.add_context_length(config.max_position_embeddings)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_head_count(config.num_attention_heads)
        kinds = config.layers_block_type
        w.add_head_count_kv([config.num_key_value_heads if kind == "attention" else 0 for kind in kinds])
        w.add_ssm_inner_size(config.mamba_expand * config.hidden_size)
        w.add_ssm_state_size(config.mamba_d_state)
        w.add_ssm_time_step_rank(config.mamba_dt_rank)
        w.add_layer_norm_rms_eps(config.rms_norm_eps)
        w.add_expert_count(config.num_experts)
        w.add_expert_used_count(config.num_experts_per_tok)
        return
    w.add_context_length(2 ** 20)
    w.add_feed_forward_length(0)
    w.add_head_count(0)
    w.add_ssm_conv_kernel(config.conv_kernel)
    w.add_ssm_inner_size(config.intermediate_size)
    w.add_ssm_state_size(config.state_size)
    w.add_ssm_time_step_rank(config.time_step_rank)
    w.add_layer_norm_rms_eps(config.layer_norm_epsilon)
    w.add_ssm_dt_b_c_rms(config.model_type == "falcon_mamba")


def _mamba_gguf(path: Path, hf, config, qtype, drop: str | None = None) -> None:
    """``hf`` as llama.cpp's converter writes it; matrices whose rows are whole blocks as ``qtype``, the norms,
    routers, convolutions, A and D float. ``drop``: a key left out (the control's)."""
    arch = gguf.MODEL_ARCH.JAMBA if config.model_type == "jamba" else gguf.MODEL_ARCH.MAMBA
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    _write_keys(w, config)
    add_sentencepiece_vocab(w)
    if drop is not None:
        del w.kv_data[0][drop]
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for name, array in _converted(hf, config):
        module, suffix = name.rsplit(".", 1) if name.endswith((".weight", ".bias")) else (name, None)
        gguf_name = names.get_name(module) + ("" if suffix is None else f".{suffix}")
        add_tensor(w, gguf_name, array, qtype, ("ssm_conv1d", "_norm", "ssm_a", "ssm_d", "gate_inp"))
    finish(w)


#: What each variant imports as: the model type, each layer's (mixer, MLP), the step's rank and the biases.
_EXPECTED = {
    "mamba": ("mamba", [("mamba", "none")] * 3, 6, (True, False)),
    "falcon_mamba": ("falcon_mamba", [("mamba", "none")] * 3, 4, (False, True)),
    "jamba": ("jamba", [("mamba", "dense"), ("attention", "moe"), ("mamba", "dense"), ("mamba", "moe"),
                        ("attention", "dense")], 4, (True, False)),
    "jamba_dense": ("jamba", [("attention", "dense"), ("mamba", "dense")] * 2 + [("attention", "dense")], 6,
                    (False, True)),
}


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("variant", list(_VARIANTS))
def test_mamba_gguf_matches_the_model_it_was_written_from(tmp_path, variant, qtype):
    """Each layout imports as transformers' family (the sizes from the ssm keys, the biases, Falcon Mamba's norms and
    their epsilon, Jamba's layers as periods and offsets, the experts); float32 files give transformers' logits,
    Q8_0 ones (packed) what the same file imported in float32 gives."""
    from ferrum.config import ModelConfig

    hf, config = _tiny(variant)
    _mamba_gguf(tmp_path / "m.gguf", hf, config, qtype)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    ours = ModelConfig.from_file(out)
    model_type, layers, rank, biases = _EXPECTED[variant]
    assert ours.model_type == model_type and [(s.mixer, s.mlp) for s in ours.arch.layers] == layers
    mamba = ours.arch.mamba
    assert (mamba.inner, mamba.state_size, mamba.dt_rank, (mamba.conv_bias, mamba.proj_bias)) == (128, 8, rank, biases)
    assert ours.tie_word_embeddings == config.tie_word_embeddings
    if variant == "falcon_mamba":
        assert (mamba.inner_norms, mamba.norm_eps) == ("weightless", pytest.approx(0.3))
    if variant == "jamba":
        assert (ours.arch.moe.num_experts, ours.arch.moe.top_k, ours.arch.moe.normalize) == (4, 2, False)
    if qtype == Q.F32:
        assert_logits_match(hf, out)
    else:
        assert ours.quantization is not None
        assert_runs_as_its_float_import(tmp_path / "m.gguf", out, tmp_path / "float")


def test_falcon_mambas_flag_and_epsilon_count(tmp_path):
    """Control: the same Falcon Mamba file imported without ssm.dt_b_c_rms (as Mamba), or with the step / B / C
    norms at FalconMambaConfig's own epsilon rather than the layers' (as llama.cpp runs them), misses transformers'
    logits."""
    hf, config = _tiny("falcon_mamba")
    _mamba_gguf(tmp_path / "unflagged.gguf", hf, config, Q.F32, drop="mamba.ssm.dt_b_c_rms")
    _mamba_gguf(tmp_path / "m.gguf", hf, config, Q.F32)
    convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    (tmp_path / "out" / "config.json").write_text(json.dumps({**raw, "mixer_rms_eps": 1e-6}))
    for out in (convert_gguf(tmp_path / "unflagged.gguf", tmp_path / "unflagged"), tmp_path / "out"):
        with pytest.raises(AssertionError):
            assert_logits_match(hf, out)


def test_the_log_of_ssm_a_counts(tmp_path, monkeypatch):
    """Control: a Jamba file whose ssm_a (-exp(A_log)) is read as A_log itself misses transformers' logits."""
    from ferrum.gguf_import import mamba

    hf, config = _tiny("jamba")
    _mamba_gguf(tmp_path / "m.gguf", hf, config, Q.F32)
    monkeypatch.setattr(mamba, "a_log", lambda ssm_a, name: ssm_a)
    with pytest.raises(AssertionError):
        assert_logits_match(hf, convert_gguf(tmp_path / "m.gguf", tmp_path / "out"))


def test_jamba_layers_that_follow_no_period_are_refused_by_name(tmp_path):
    """Attention where transformers' period and offset cannot place it (the second and fourth of five layers, then
    the fifth) is refused before anything is written."""
    config = _VARIANTS["jamba_dense"]()
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "jamba")
    _write_keys(w, config)
    del w.kv_data[0]["jamba.attention.head_count_kv"]
    w.add_head_count_kv([0, 2, 0, 2, 2])
    add_sentencepiece_vocab(w)
    w.add_tensor("token_embd.weight", np.zeros((len(sentencepiece_vocab()[0]), 64), np.float32))
    finish(w)
    with pytest.raises(UnsupportedFeatureError, match=r"attention layers \[1, 3, 4\] are not those of i % period"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
