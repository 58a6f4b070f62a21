"""GGUF imports of the remote-code dense families (``exaone``, ``internlm2``, ``minicpm``, ``minicpm3``): tiny random
models written as llama.cpp's converter writes them (EXAONE 3.5's llama3 rope as rope_freqs, InternLM2's wqkv cut
into permuted q/k and v, MiniCPM's scalings in the metadata and its q/k permuted, MiniCPM3's latent attention with
none of its scalings written), imported, and run against transformers (float32 files) or the same file imported in
float32 (Q8_0)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from ferrum.gguf_import import convert_gguf  # noqa: E402
from gguf_writer import add_tensors, config_writer, finish, imported, permute, tiny_model  # noqa: E402

Q = gguf.GGMLQuantizationType
_COMMON = dict(intermediate_size=96, num_hidden_layers=2, tie_word_embeddings=False)


def _for_model(model_type: str) -> Callable[..., Any]:
    return lambda **settings: transformers.AutoConfig.for_model(model_type, **settings)


def _spread(hf) -> None:
    """Norms around 1 and q/k large enough that the rope's angles (and a wrong row order) move the logits."""
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(1, 0.3)
            else:
                param.normal_(0, 0.3)


def _write(path: Path, arch: str, config, tensors: dict[str, np.ndarray], qtype, metadata: Callable[[Any], None],
           **writer: Any) -> None:
    """``tensors`` (GGUF names) in a file of ``arch``: what every conversion writes of ``config`` and ``metadata``'s
    keys; matrices as ``qtype``, vectors float."""
    w = config_writer(path, arch, config, **writer)
    metadata(w)
    add_tensors(w, tensors, qtype)
    finish(w)


def _mapped(hf, config, arch: str, change: Callable[[str, np.ndarray], np.ndarray] = lambda n, a: a,
            skip: str | None = None) -> dict[str, np.ndarray]:
    """``hf``'s tensors under the names gguf's map gives ``arch``, each through ``change``; a tied head left out, and
    those whose names hold ``skip`` (what the converter writes elsewhere)."""
    kind = next(k for k, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names = gguf.get_tensor_name_map(kind, config.num_hidden_layers)
    out = {}
    for name, tensor in hf.state_dict().items():
        if (name == "lm_head.weight" and config.tie_word_embeddings) or (skip and skip in name):
            continue
        out[names.get_name(name, try_suffixes=(".weight", ".bias"))] = change(name, tensor.float().numpy())
    return out


def _llama3_divisors(head_dim: int, theta: float, rope: dict[str, Any]) -> np.ndarray:
    """llama3 rope scaling as llama.cpp's converter writes it: one divisor per rotary pair (``rope_freqs``)."""
    factor, low, high, old = (rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                "original_max_position_embeddings"))
    divisors = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * math.pi / freq
        smooth = (old / wavelen - low) / (high - low)
        divisors.append(1.0 if wavelen < old / high else factor if wavelen > old / low else
                        1 / ((1 - smooth) / factor + smooth))
    return np.array(divisors, dtype=np.float32)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
def test_exaone_gguf_matches_the_model_it_was_written_from(tmp_path, qtype):
    """EXAONE 3.5 (transformers runs it as Llama) with its llama3 rope, which the converter writes as rope_freqs:
    imported under the release's names with the rope scaling back; rows as stored (llama.cpp's rotate-half rope)."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hf, config = tiny_model(_for_model("exaone"), **_COMMON, rope_parameters=rope, rms_norm_eps=1e-5)
    _spread(hf)
    tensors = _mapped(hf, config, "exaone")
    tensors["rope_freqs.weight"] = _llama3_divisors(16, rope["rope_theta"], rope)
    assert len(set(np.round(tensors["rope_freqs.weight"], 5))) >= 3  # all three regimes

    _write(tmp_path / "m.gguf", "exaone", config, tensors, qtype, lambda w: w.add_rope_dimension_count(16))
    ours = imported(tmp_path, hf, qtype)
    assert ours.model_type == "exaone" and ours.arch.prefix == "transformer."
    assert ours.rope_scaling["rope_type"] == "llama3" and ours.rope_scaling["factor"] == 8.0


def _internlm2_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int, kv_heads: int) -> dict[str, np.ndarray]:
    """InternLM2's wqkv (each key/value head's queries, then its key, then its value) made from Llama's q/k/v, then cut
    and permuted as llama.cpp's InternLM2Model does: GGUF suffix -> rows."""
    per, d, h = heads // kv_heads, q.shape[0] // heads, q.shape[1]
    wqkv = np.concatenate([q.reshape(kv_heads, per, d, h), k.reshape(kv_heads, 1, d, h), v.reshape(kv_heads, 1, d, h)],
                          axis=1)
    return {"attn_q.weight": permute(wqkv[:, :per].reshape(-1, h), heads),
            "attn_k.weight": permute(wqkv[:, -2].reshape(-1, h), kv_heads),
            "attn_v.weight": wqkv[:, -1].reshape(-1, h)}


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
def test_internlm2_gguf_matches_the_model_it_was_written_from(tmp_path, qtype):
    """InternLM2 (no biases, as every release: Llama's model) written from its grouped wqkv as the converter cuts it:
    imported as InternLM2's own layout (q/k un-permuted, the rows regrouped into wqkv), giving Llama's logits."""
    hf, config = tiny_model(transformers.LlamaConfig, **_COMMON, rms_norm_eps=1e-5)
    _spread(hf)
    tensors = _mapped(hf, config, "internlm2")
    for i in range(config.num_hidden_layers):
        q, k, v = (tensors.pop(f"blk.{i}.attn_{p}.weight") for p in "qkv")
        tensors.update({f"blk.{i}.{name}": a for name, a in _internlm2_qkv(q, k, v, 4, 2).items()})

    _write(tmp_path / "m.gguf", "internlm2", config, tensors, qtype, lambda w: None)
    ours = imported(tmp_path, hf, qtype)
    assert ours.model_type == "internlm2" and ours.arch.fused_qkv and ours.arch.qkv_grouped
    assert not ours.arch.qkv_bias and not ours.arch.o_bias


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_minicpm_gguf_matches_the_model_it_was_written_from(tmp_path, qtype, tied):
    """MiniCPM (scale_emb 12, scale_depth 1.4, dim_model_base 16) written as MiniCPMModel writes it (the three scalings
    as embedding, residual and logit scales; q/k permuted): imported with its scalings back, giving the logits of
    transformers' Granite with the same multipliers (MiniCPM's model: the logits divided, tied or not)."""
    layers, hidden, head_dim = 2, 64, 16
    hf, config = tiny_model(transformers.GraniteConfig, **{**_COMMON, "tie_word_embeddings": tied}, rms_norm_eps=1e-5,
                             embedding_multiplier=12.0, residual_multiplier=1.4 / math.sqrt(layers),
                             logits_scaling=hidden / 16, attention_multiplier=head_dim ** -0.5)
    _spread(hf)
    heads = {"q_proj.weight": 4, "k_proj.weight": 2}
    tensors = _mapped(hf, config, "minicpm", lambda name, a: permute(a, heads[name[-13:]]) if name.endswith(
        tuple(heads)) else a)

    def metadata(w: Any) -> None:
        w.add_embedding_scale(12.0)
        w.add_residual_scale(1.4 / math.sqrt(layers))
        w.add_logit_scale(hidden / 16)
        w.add_rope_dimension_count(head_dim)

    _write(tmp_path / "m.gguf", "minicpm", config, tensors, qtype, metadata)
    ours = imported(tmp_path, hf, qtype)
    assert ours.model_type == "minicpm" and ours.tie_word_embeddings == tied
    assert (ours.arch.embed_scale, ours.arch.logit_scale) == (12.0, 0.25)


def test_a_minicpm_gguf_without_its_scalings_is_refused(tmp_path):
    """Older converters wrote none of the three; llama.cpp's defaults for them are no release's config."""
    from ferrum.errors import UnsupportedFeatureError

    hf, config = tiny_model(transformers.LlamaConfig, **_COMMON)
    _write(tmp_path / "m.gguf", "minicpm", config, _mapped(hf, config, "minicpm"), Q.F32, lambda w: None)
    with pytest.raises(UnsupportedFeatureError, match="minicpm.embedding_scale.*convert the release again"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
def test_minicpm3_gguf_matches_the_model_it_was_written_from(tmp_path, qtype):
    """MiniCPM3 written as MiniCPM3Model writes it (latent sizes, key_length and the rope's width but no value_length,
    no scalings, longrope's factors as tensors and no original context): imported with llama.cpp's fixed scalings
    (the release's), values hidden / heads wide and the training context as longrope's original, giving
    transformers' logits."""
    short = [8.0, 16.0, 32.0, 64.0]  # far from 1, so that reading them matters
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short, "long_factor": [4.0] * 4,
            "original_max_position_embeddings": 128}
    hf, config = tiny_model(_for_model("minicpm3"), **{**_COMMON, "tie_word_embeddings": True}, num_key_value_heads=4,
                             q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                             rope_parameters=rope, rms_norm_eps=1e-5)
    assert (config.scale_emb, config.scale_depth, config.dim_model_base, config.v_head_dim) == (12, 1.4, 256, 16)
    _spread(hf)
    tensors = _mapped(hf, config, "minicpm3")
    tensors.update({"rope_factors_short.weight": np.array(short), "rope_factors_long.weight": np.full(4, 4.0)})

    def metadata(w: Any) -> None:
        w.add_q_lora_rank(24)
        w.add_kv_lora_rank(16)
        w.add_key_length(24)
        w.add_rope_dimension_count(8)

    _write(tmp_path / "m.gguf", "minicpm3", config, tensors, qtype, metadata)
    ours = imported(tmp_path, hf, qtype)
    assert ours.model_type == "minicpm3" and ours.rope_scaling["rope_type"] == "longrope"
    assert ours.arch.mla is not None and ours.arch.logit_scale == 4.0
