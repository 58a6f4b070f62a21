"""GGUF imports of Nemotron-H (``nemotron_h``): tiny random transformers NemotronH models written as llama.cpp's
converter writes them (as Granite 4.0-H: A_log as -exp(A_log) and D as columns, the convolution squeezed, the gated
norm cut into its groups, q/k permuted; each block's kind told by its per-layer key/value heads and MLP width),
imported, and run against transformers (float32 files) or the same file imported in float32 (Q8_0)."""

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
_COMMON = dict(hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
               mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, conv_kernel=4, max_position_embeddings=256,
               tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
#: Nemotron-H / Nano 2's blocks (two B/C groups, convolution biases), a layout with biased projections, and
#: Nemotron 3 Nano's (sigmoid-routed experts beside a shared MLP, scaled and renormalised; a prediction block after).
_VARIANTS = {
    "nano2": dict(layers_block_type=["mamba", "mlp", "attention", "mlp", "mamba", "mamba"], n_groups=2),
    "biased": dict(layers_block_type=["mamba", "attention", "mlp", "mamba"], n_groups=1, use_conv_bias=False,
                   use_bias=True, mlp_bias=True),
    "nano3": dict(layers_block_type=["mamba", "moe", "attention", "moe", "mamba"], n_groups=2, n_routed_experts=4,
                  num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=64,
                  routed_scaling_factor=2.5, norm_topk_prob=True),
}


def _tiny(variant: str) -> tuple[Any, Any]:
    """A random float32 Nemotron-H over the test vocabulary: A_log, D and dt_bias spread, norms around 1."""
    config = transformers.NemotronHConfig(**_COMMON, **_VARIANTS[variant], vocab_size=len(sentencepiece_vocab()[0]))
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(1, 0.3)
            elif name.endswith(("A_log", "dt_bias", ".D", "e_score_correction_bias")):
                param.uniform_(-1.0, 1.0)
            else:
                param.normal_(0, 0.2)
    return hf, config


def _converted(name: str, a: np.ndarray, config) -> tuple[str, np.ndarray]:
    """One transformers tensor as llama.cpp's converter writes it, under the name its tensor map reads."""
    name = name.replace("model.", "backbone.", 1)
    ssm = _mamba2_as_converted(name, a, config.n_groups, "mixer.norm.weight", dt_bias=".dt.bias")
    if ssm is not None:
        return ssm
    if ".mixer.experts." in name:  # the stacks, under the name NemotronHModel gives them
        return name.replace("backbone.", "model.", 1).replace("mixer.experts.", "mlp.experts.") + ".weight", a
    if name.endswith("e_score_correction_bias"):
        return name.replace("_bias", ".bias"), a
    if name.endswith(("q_proj.weight", "k_proj.weight")):  # Llama's adjacent-pair layout (GraniteHybridModel's)
        return name, permute(a, config.num_attention_heads if "q_proj" in name else config.num_key_value_heads)
    return name, a


def _nemotron_h_gguf(path: Path, hf, config, qtype) -> None:
    """``hf`` as llama.cpp's NemotronHModel writes it; matrices whose rows are whole blocks as ``qtype``, the norms,
    convolutions, routers and vectors float."""
    moe = "moe" in config.layers_block_type
    kinds = config.layers_block_type + (["mtp"] if moe else [])  # the prediction block: attention and experts
    layers = len(kinds)
    w = gguf.GGUFWriter(str(path), "nemotron_h_moe" if moe else "nemotron_h")
    w.add_block_count(layers)
    w.add_context_length(2 ** 20)  # GraniteHybridModel's for a NoPE model
    w.add_embedding_length(config.hidden_size)
    ff = config.moe_intermediate_size if moe else config.intermediate_size
    w.add_feed_forward_length([ff if k in ("mlp", "moe", "mtp") else 0 for k in kinds])
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv([config.num_key_value_heads if k in ("full_attention", "mtp") else 0 for k in kinds])
    if moe:
        w.add_expert_used_count(config.num_experts_per_tok)
        w.add_expert_feed_forward_length(config.moe_intermediate_size)
        w.add_expert_shared_feed_forward_length(config.moe_shared_expert_intermediate_size)
        w.add_expert_count(config.n_routed_experts)
        w.add_expert_shared_count(config.n_shared_experts)
        w.add_expert_weights_norm(config.norm_topk_prob)
        w.add_expert_weights_scale(config.routed_scaling_factor)
        w.add_expert_group_count(config.n_group)
        w.add_nextn_predict_layers(1)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_layer_norm_eps(config.layer_norm_epsilon)
    w.add_ssm_conv_kernel(config.conv_kernel)
    w.add_ssm_state_size(config.ssm_state_size)
    w.add_ssm_group_count(config.n_groups)
    w.add_ssm_inner_size(config.mamba_num_heads * config.mamba_head_dim)
    w.add_ssm_time_step_rank(config.mamba_num_heads)
    w.add_rope_scaling_finetuned(False)
    add_sentencepiece_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.NEMOTRON_H_MOE if moe else gguf.MODEL_ARCH.NEMOTRON_H, layers)
    weights = {name: tensor.float().numpy() for name, tensor in hf.state_dict().items()}
    if moe:  # a prediction block, which the import must leave out (random: read, it would change the logits)
        rng = np.random.default_rng(1)
        weights.update({f"model.layers.{layers - 1}.{n}": rng.normal(size=weights[f"model.layers.2.{n}"].shape)
                        for n in ("norm.weight", "mixer.q_proj.weight", "mixer.k_proj.weight")})
    for name, array in weights.items():
        hf_name, array = _converted(name, array, config)
        module, suffix = hf_name.rsplit(".", 1) if hf_name.endswith((".weight", ".bias")) else (hf_name, None)
        gguf_name = names.get_name(module) + ("" if suffix is None else f".{suffix}")
        add_tensor(w, gguf_name, array, qtype, ("ssm_conv1d", "ssm_norm", "ssm_a", "ssm_d", "gate_inp"))
    finish(w)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("variant", list(_VARIANTS))
def test_nemotron_h_gguf_matches_the_model_it_was_written_from(tmp_path, variant, qtype):
    """Each layout imports as transformers' NemotronH (each block's kind from its key/value heads and MLP width, the
    Mamba-2 sizes, the biases); float32 files give transformers' logits, Q8_0 ones (packed) what the same file
    imported in float32 gives."""
    from ferrum.config import ModelConfig

    hf, config = _tiny(variant)
    _nemotron_h_gguf(tmp_path / "m.gguf", hf, config, qtype)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    ours = ModelConfig.from_file(out)
    assert ours.model_type == "nemotron_h"
    want = {"linear_attention": ("mamba2", "none"), "full_attention": ("attention", "none"), "mlp": ("none", "plain"),
            "moe": ("none", "moe")}
    assert [(s.mixer, s.mlp) for s in ours.arch.layers] == [want[k] for k in config.layers_block_type]
    experts = ours.arch.moe
    assert (experts is not None) == (variant == "nano3")
    if experts is not None:
        assert (experts.num_experts, experts.top_k, experts.routed_scale, experts.n_group) == (4, 2, 2.5, 1)
    mamba = ours.arch.mamba2
    assert (mamba.num_heads, mamba.head_dim, mamba.num_groups, mamba.state_size) == (8, 16, config.n_groups, 16)
    assert (mamba.conv_bias, mamba.proj_bias, ours.arch.mlp_bias) == (config.use_conv_bias, config.use_bias,
                                                                      config.mlp_bias)
    if qtype == Q.F32:  # q/k rows as the checkpoint has them (NoPE logits would not tell a permutation)
        from safetensors.numpy import load_file

        stored, layer = load_file(out / "model.safetensors"), config.layers_block_type.index("full_attention")
        for proj in ("q_proj", "k_proj"):
            name = f"model.layers.{layer}.mixer.{proj}.weight"
            np.testing.assert_array_equal(stored[name], hf.state_dict()[name].numpy())
        assert_logits_match(hf, out)
    else:
        assert ours.quantization is not None
        assert_runs_as_its_float_import(tmp_path / "m.gguf", out, tmp_path / "float")
