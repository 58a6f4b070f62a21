"""GGUF imports of Granite 4.0-H (``granitehybrid``): tiny random transformers GraniteMoeHybrid models (the shared
MLP alone, and experts beside it) written as llama.cpp's converter writes them (A_log as -exp(A_log) and D as
columns, the convolution squeezed, the gated norm cut into its groups, q/k permuted, the shared MLP's gate and up
split, the Mamba-2 layers told by 0 key/value heads), imported, and run against transformers (float32 files) or
the same file imported in float32 (Q8_0)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from ferrum.gguf_import import convert_gguf  # noqa: E402
from gguf_writer import (  # noqa: E402
    add_sentencepiece_vocab, add_tensor, assert_logits_match, assert_runs_as_its_float_import, finish, permute,
    sentencepiece_vocab,
)
from test_gguf_import import _mamba2_as_converted  # noqa: E402

Q = gguf.GGMLQuantizationType
_COMMON = dict(hidden_size=64, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, layer_types=["mamba", "attention", "mamba", "mamba"], mamba_n_heads=8,
               mamba_d_state=16, mamba_d_head=16, mamba_d_conv=4, mamba_expand=2, shared_intermediate_size=64,
               embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=2.5,
               max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
               eos_token_id=2)
#: H-Micro's layout (the shared MLP alone, two B/C groups, NoPE) and H-Tiny's (experts beside it, rope).
_VARIANTS = {"dense": dict(num_local_experts=0, mamba_n_groups=2, position_embedding_type="nope"),
             "moe": dict(num_local_experts=4, num_experts_per_tok=2, mamba_n_groups=1, position_embedding_type="rope")}


def _tiny(variant: str) -> tuple[Any, Any]:
    """A random float32 Granite 4.0-H over the test vocabulary: A_log, D and dt_bias spread, norms around 1."""
    config = transformers.GraniteMoeHybridConfig(**_COMMON, **_VARIANTS[variant],
                                                 vocab_size=len(sentencepiece_vocab()[0]))
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(1, 0.3)
            elif name.endswith(("A_log", "dt_bias", ".D")):
                param.uniform_(-1.0, 1.0)
            else:
                param.normal_(0, 0.2)
    return hf, config


def _converted(name: str, a: np.ndarray, config) -> dict[str, np.ndarray]:
    """One transformers tensor as llama.cpp's converter writes it, under transformers' module names."""
    experts = bool(config.num_local_experts)
    ssm = _mamba2_as_converted(name, a, config.mamba_n_groups, "mamba.norm.weight")
    if ssm is not None:
        return dict([ssm])
    if name.endswith(("q_proj.weight", "k_proj.weight")):  # Llama's adjacent-pair rope layout
        heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
        return {name: permute(a, heads)}
    if name.endswith("block_sparse_moe.experts.gate_up_proj"):  # the checkpoint's input_linear [E, 2I, H]
        gate, up = np.split(a, 2, axis=-2)
        return {name.replace("experts.gate_up_proj", "gate"): gate, name.replace("experts.gate_up_proj", "up"): up}
    if name.endswith("shared_mlp.input_linear.weight"):
        gate, up = np.split(a, 2, axis=0)
        stem = name.removesuffix("shared_mlp.input_linear.weight")
        return {stem + ("shexp_gate" if experts else "mlp.gate_proj.weight"): gate,
                stem + ("shexp_up" if experts else "mlp.up_proj.weight"): up}
    if name.endswith("shared_mlp.output_linear.weight") and not experts:
        return {name.replace("shared_mlp.output_linear", "mlp.down_proj"): a}
    return {name: a}


def _gguf_name(name: str, names: Any) -> str:
    layer = name.split(".")[2] if name.startswith("model.layers.") else None
    own = {"block_sparse_moe.gate": "ffn_gate_exps.weight", "block_sparse_moe.up": "ffn_up_exps.weight",
           "experts.down_proj": "ffn_down_exps.weight", "router.weight": "ffn_gate_inp.weight",
           "shexp_gate": "ffn_gate_shexp.weight", "shexp_up": "ffn_up_shexp.weight"}
    for suffix, gguf_name in own.items():
        if name.endswith(suffix):
            return f"blk.{layer}.{gguf_name}"
    module, suffix = name.rsplit(".", 1) if name.endswith((".weight", ".bias")) else (name, None)
    return names.get_name(module) + ("" if suffix is None else f".{suffix}")


def _granite_hybrid_gguf(path: Path, hf, config, qtype) -> None:
    """``hf`` as llama.cpp's converter writes a Granite 4.0-H; matrices whose rows are whole blocks as ``qtype``,
    the routers, norms, convolutions and vectors float."""
    layers = config.num_hidden_layers
    w = gguf.GGUFWriter(str(path), "granitehybrid")
    w.add_block_count(layers)
    rope = config.position_embedding_type == "rope"
    w.add_context_length(config.max_position_embeddings if rope else 2 ** 20)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv([config.num_key_value_heads if t == "full_attention" else 0 for t in config.layer_types])
    w.add_rope_freq_base(config.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_attention_scale(config.attention_multiplier)
    w.add_embedding_scale(config.embedding_multiplier)
    w.add_residual_scale(config.residual_multiplier)
    w.add_logit_scale(config.logits_scaling)
    if config.num_local_experts:
        w.add_expert_count(config.num_local_experts)
        w.add_expert_used_count(config.num_experts_per_tok)
    w.add_expert_shared_feed_forward_length(config.shared_intermediate_size)
    w.add_ssm_conv_kernel(config.mamba_d_conv)
    w.add_ssm_state_size(config.mamba_d_state)
    w.add_ssm_group_count(config.mamba_n_groups)
    w.add_ssm_inner_size(config.mamba_expand * config.hidden_size)
    w.add_ssm_time_step_rank(config.mamba_n_heads)
    w.add_rope_scaling_finetuned(rope)  # llama.cpp's switch for rope (False for every Granite 4.0-H release)
    add_sentencepiece_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GRANITE_HYBRID, layers)
    for name, tensor in hf.state_dict().items():
        for hf_name, array in _converted(name, tensor.float().numpy(), config).items():
            add_tensor(w, _gguf_name(hf_name, names), array, qtype,
                        ("ssm_conv1d", "ssm_norm", "ssm_a", "ssm_d", "gate_inp"))
    finish(w)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("variant", list(_VARIANTS))
def test_granite_hybrid_gguf_matches_the_model_it_was_written_from(tmp_path, variant, qtype):
    """Each layout imports as transformers' GraniteMoeHybrid (Mamba-2 layers where the file has no key/value heads,
    the Mamba-2 sizes, rope on or off, the multipliers, the shared MLP and experts); float32 files give transformers'
    logits, Q8_0 ones (packed) what the same file imported in float32 gives."""
    from ferrum.config import ModelConfig

    hf, config = _tiny(variant)
    _granite_hybrid_gguf(tmp_path / "m.gguf", hf, config, qtype)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    ours = ModelConfig.from_file(out)
    assert ours.model_type == "granitemoehybrid"
    assert [s.mixer for s in ours.arch.layers] == ["mamba2", "attention", "mamba2", "mamba2"]
    mamba = ours.arch.mamba2
    assert (mamba.num_heads, mamba.head_dim, mamba.num_groups, mamba.state_size) == (8, 16, config.mamba_n_groups, 16)
    assert (ours.arch.moe is not None) == (variant == "moe")
    if qtype == Q.F32:
        assert_logits_match(hf, out)
    else:
        assert ours.quantization is not None
        assert_runs_as_its_float_import(tmp_path / "m.gguf", out, tmp_path / "float")
