"""GGUF imports of pure Mamba-2 (``mamba2``): tiny random transformers Mamba2 models written as llama.cpp's
Mamba2Model writes them (no attention heads and no MLP in the metadata, A_log as -exp(A_log) and D as columns, the
convolution squeezed, the gated norm cut into its groups, dt_bias as ssm_dt.bias), imported, and run against
transformers (float32 files) or the same file imported in float32 (Q8_0)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from ferrum.gguf_import import convert_gguf  # noqa: E402
from gguf_writer import (  # noqa: E402
    add_sentencepiece_vocab, add_tensor, assert_logits_match, assert_runs_as_its_float_import, finish,
    sentencepiece_vocab,
)
from test_gguf_import import _mamba2_as_converted  # noqa: E402

Q = gguf.GGMLQuantizationType
_COMMON = dict(hidden_size=64, num_hidden_layers=3, num_heads=8, head_dim=16, state_size=16, expand=2, conv_kernel=4,
               layer_norm_epsilon=1e-4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
#: Mamba-Codestral's layout (B/C groups, an untied head) and state-spaces' (one group, tied, biased projections).
_VARIANTS = {"grouped": dict(n_groups=2, tie_word_embeddings=False),
             "tied": dict(n_groups=1, tie_word_embeddings=True, use_bias=True, use_conv_bias=False)}


def _tiny(variant: str):
    """A random float32 Mamba-2 over the test vocabulary: A_log, D and dt_bias spread, norms around 1."""
    config = transformers.Mamba2Config(**_COMMON, **_VARIANTS[variant], vocab_size=len(sentencepiece_vocab()[0]))
    torch.manual_seed(0)
    hf = transformers.Mamba2ForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                param.normal_(1, 0.3)
            elif name.endswith(("A_log", "dt_bias", ".D")):
                param.uniform_(-1.0, 1.0)
            else:
                param.normal_(0, 0.2)
    return hf, config


def _converted(name: str, a: np.ndarray, config) -> tuple[str, np.ndarray]:
    """One transformers tensor as llama.cpp's converter writes it, under the name its tensor map reads."""
    return _mamba2_as_converted(name, a, config.n_groups, "mixer.norm.weight") or (name, a)


def _mamba2_gguf(path: Path, hf, config, qtype) -> None:
    """``hf`` as llama.cpp's Mamba2Model writes it; matrices as ``qtype``, the norms, convolutions and vectors
    float."""
    w = gguf.GGUFWriter(str(path), "mamba2")
    w.add_context_length(2 ** 20)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(0)
    w.add_head_count(0)
    w.add_block_count(config.num_hidden_layers)
    w.add_ssm_conv_kernel(config.conv_kernel)
    w.add_ssm_inner_size(config.num_heads * config.head_dim)
    w.add_ssm_state_size(config.state_size)
    w.add_ssm_time_step_rank(config.num_heads)
    w.add_ssm_group_count(config.n_groups)
    w.add_layer_norm_rms_eps(config.layer_norm_epsilon)
    add_sentencepiece_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MAMBA2, config.num_hidden_layers)
    weights = {name: tensor.float().numpy() for name, tensor in hf.state_dict().items()}
    if config.tie_word_embeddings:
        del weights["lm_head.weight"]
    for name, array in weights.items():
        hf_name, array = _converted(name, array, config)
        module, suffix = hf_name.rsplit(".", 1) if hf_name.endswith((".weight", ".bias")) else (hf_name, None)
        gguf_name = names.get_name(module) + ("" if suffix is None else f".{suffix}")
        add_tensor(w, gguf_name, array, qtype, ("ssm_conv1d", "ssm_norm", "ssm_a", "ssm_d"))
    finish(w)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("variant", list(_VARIANTS))
def test_mamba2_gguf_matches_the_model_it_was_written_from(tmp_path, variant, qtype):
    """Each layout imports as transformers' Mamba2 (the sizes from the ssm keys, the biases, the epsilon, the tied
    head); float32 files give transformers' logits, Q8_0 ones (packed) what the same file imported in float32
    gives."""
    from ferrum.config import ModelConfig

    hf, config = _tiny(variant)
    _mamba2_gguf(tmp_path / "m.gguf", hf, config, qtype)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    ours = ModelConfig.from_file(out)
    assert ours.model_type == "mamba2" and ours.arch.kv_pool_layers == 0 and ours.rms_norm_eps == pytest.approx(1e-4)
    mamba = ours.arch.mamba2
    assert (mamba.num_heads, mamba.head_dim, mamba.num_groups, mamba.state_size) == (8, 16, config.n_groups, 16)
    assert (mamba.conv_bias, mamba.proj_bias, ours.tie_word_embeddings) == (config.use_conv_bias, config.use_bias,
                                                                            config.tie_word_embeddings)
    if qtype == Q.F32:
        assert_logits_match(hf, out)
    else:
        assert ours.quantization is not None
        assert_runs_as_its_float_import(tmp_path / "m.gguf", out, tmp_path / "float")
