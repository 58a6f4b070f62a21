"""Tencent's Hy4 (``hy_v4``): latent attention with DSA's indexers (run densely up to index_topk, the context capped
there), gpt-oss's sinks, sigmoid-gated heads, hyper-connections (ferrum.arch.hyper) and GLM-4.7-Flash's routing over
SwiGLU experts clamped at swiglu_limit; against transformers' HYV4ForCausalLM in float32."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import transformers

from transformers.models.hy_v4.modeling_hy_v4 import HYV4HyperConnection

from ferrum.arch.hyper import HyperSpec, HyperStream, _Mix
from ferrum.backends import load_backend
from ferrum.config import ModelConfig
from ferrum.errors import ConfigError, UnsupportedFeatureError
from ferrum.model import DecoderOnlyLLM
from ferrum.reference_ops import dtype_name
from ferrum.weights import Linear, place
from support import (
    assert_engine_keeps_greedy_tokens, assert_forward_and_decode_match, assert_logits_move, float32_model,
    randomized_reference, reference_logits, runnable_backends, saved_references, scaled_error, small_pool_engine,
    staggered_greedy_workload, with_edited_tensors,
)

BACKENDS = runnable_backends()
BFLOAT16 = [b for b in BACKENDS if "bfloat16" in load_backend(b).ops.info.dtypes]
TOPK, VOCAB = 48, 97
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=20)]
LONG = [int(t) for t in np.random.RandomState(1).randint(0, VOCAB, size=TOPK + 8)]


def hy_config(**extra):
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=80, moe_intermediate_size=24,
                    num_hidden_layers=3, num_attention_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
                    qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, hc_mult=3,
                    max_position_embeddings=256, index_topk=TOPK, index_head_dim=16, index_n_heads=2,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.HYV4Config(**{**settings, **extra})


#: The release's clamp (10, which these random experts never reach), and one that clamps (0.05); the default
#: indexer kinds make layer 2 share layer 1's selection.
VARIANTS = {"hy_v4": {}, "clamped": dict(swiglu_limit=0.05)}


def build_checkpoints(tmp_path_factory) -> dict:
    return saved_references(tmp_path_factory, VARIANTS, hy_config)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_transformers(checkpoints, backend, variant):
    """A full forward and token-by-token decode, against transformers' logits."""
    folder, hf = checkpoints[variant]
    model = float32_model(folder, backend, block_size=4)
    assert model.config.max_seq_len == TOPK
    assert_forward_and_decode_match(model, TOKENS, reference_logits(hf, TOKENS))


def _changed(folder, **settings):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, **settings).float().eval()


def test_the_parts_count(checkpoints):
    """The controls: transformers' logits move without the streams' mixes (every fn zero: each stream read and
    written alike), with another write magnitude, and without the experts' clamp, so matching them tests each."""
    folder, hf = checkpoints["clamped"]
    unmixed = _changed(folder)
    with torch.no_grad():
        for name, p in unmixed.named_parameters():
            if name.endswith((".fn", "hc_fn")):
                p.zero_()
    assert_logits_move(unmixed, hf, TOKENS)
    assert_logits_move(_changed(folder, hc_magnitude=1.0), hf, TOKENS)
    assert_logits_move(_changed(folder, swiglu_limit=10.0), hf, TOKENS)


def test_the_indexer_selects_past_index_topk(checkpoints):
    """Past index_topk keys transformers' attention is no longer dense, which is why Ferrum caps the context."""
    folder, hf = checkpoints["hy_v4"]
    sparse, full = reference_logits(hf, LONG), reference_logits(_changed(folder, index_topk=len(LONG)), LONG)
    assert scaled_error(sparse[:TOPK], full[:TOPK]) < 1e-5
    assert scaled_error(sparse[TOPK:], full[TOPK:]) > 1e-3


@pytest.mark.slow
def test_the_engine_keeps_transformers_greedy_tokens(checkpoints):
    folder, hf = checkpoints["clamped"]
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, **config), hf,
                                      staggered_greedy_workload(VOCAB))


def test_the_release_names_its_mlps_gate_proj(checkpoints, tmp_path):
    """transformers' save_pretrained renames every gate_proj linear_gate (its mapping's reverse); the release's
    MLPs keep gate_proj (only attention's is linear_gate), and load so."""
    folder, hf = checkpoints["hy_v4"]

    def rename(tensors):
        for name in [n for n in tensors if ".mlp." in n and ".linear_gate." in n]:
            tensors[name.replace(".linear_gate.", ".gate_proj.")] = tensors.pop(name)

    release = with_edited_tensors(folder, tmp_path / "release", rename)
    assert_forward_and_decode_match(float32_model(release, block_size=4), TOKENS, reference_logits(hf, TOKENS))


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_a_save_whose_mlps_are_all_one_kind_loads(tmp_path, kind):
    """transformers' save renames the dense MLPs' gate_proj and the shared experts' alike (linear_gate): a model with
    only one of them holds only that rename."""
    hf = randomized_reference(hy_config(mlp_layer_types=[kind] * 3))
    hf.save_pretrained(tmp_path)
    model = float32_model(tmp_path, block_size=4)
    assert [layer.mlp for layer in model.config.arch.layers] == ["moe" if kind == "sparse" else "dense"] * 3
    assert_forward_and_decode_match(model, TOKENS, reference_logits(hf, TOKENS))


@pytest.mark.parametrize("changes, words", [
    (dict(v_head_dim=12), "'v_head_dim' (12) differs from a query/key head's 16 dims"),
    (dict(indexer_types=["shared", "full", "full"]), "'indexer_types' makes the first layer 'shared'"),
    (dict(layer_types=["sliding_attention"] * 3), "'layer_types' must list 'indexed_attention'"),
    (dict(swiglu_limit=0.0), "'swiglu_limit' is 0.0: HYV4Config's docstring reads a limit <= 0 as no clamp"),
    (dict(swiglu_limit=-1), "'swiglu_limit' is -1: HYV4Config's docstring"),
])
def test_unsupported_variants_are_refused_by_name(tmp_path, changes, words):
    raw = {**hy_config().to_dict(), **changes}
    with pytest.raises((ConfigError, UnsupportedFeatureError), match=re.escape(words)):
        ModelConfig.from_dict(raw)


def test_transformers_clamps_at_a_limit_of_zero():
    """Why a limit <= 0 is refused rather than read as no clamp: transformers' experts clamp with it regardless."""
    from transformers.models.hy_v4.modeling_hy_v4 import HYV4Experts

    experts = HYV4Experts(hy_config(swiglu_limit=0.0))
    assert experts._apply_gate(torch.randn(4, 2 * 24) * 3).abs().max() == 0


def test_defaults_are_transformers_defaults():
    """A config of nothing but the model type reads as HYV4Config's defaults."""
    hf, config = transformers.HYV4Config(), ModelConfig.from_dict({"model_type": "hy_v4"})
    arch = config.arch
    assert (config.hidden_size, config.num_layers, config.head_dim, config.rms_norm_eps, config.max_seq_len) == (
        hf.hidden_size, hf.num_hidden_layers, hf.qk_head_dim, hf.rms_norm_eps, hf.index_topk)
    assert (arch.hyper.copies, arch.hyper.magnitude, arch.hyper.hc_eps) == (hf.hc_mult, hf.hc_magnitude, hf.hc_eps)
    assert arch.indexer.layers == tuple(kind == "full" for kind in hf.indexer_types)
    assert [layer.mlp == "moe" for layer in arch.layers] == [kind == "sparse" for kind in hf.mlp_layer_types]
    moe = arch.moe
    assert (moe.num_experts, moe.top_k, moe.expert_size, moe.routed_scale, moe.activation.limit) == (
        hf.n_routed_experts, hf.num_experts_per_tok, hf.moe_intermediate_size, hf.routed_scaling_factor,
        hf.swiglu_limit)
    assert moe.shared_activation is None  # HYV4MLP: plain SwiGLU, the experts' clamp not shared


def _connection_and_truth(tokens: int, copies: int, hidden: int):
    """transformers' connection (trained-like: base near -log(N - 1), small scales), bfloat16 streams ``[T, N, H]``
    and a sub-layer's output ``[T, H]``, and its read and write in float64."""
    torch.manual_seed(0)
    config = transformers.HYV4Config(hidden_size=hidden, hc_mult=copies, rms_norm_eps=1e-5)
    hc = HYV4HyperConnection(config).float().eval()
    with torch.no_grad():
        hc.fn.normal_(0, 0.006)
        hc.base.copy_(torch.tensor([-1.1] * copies + [0.3] * copies) + 0.1 * torch.randn(2 * copies))
        hc.scale.copy_(torch.tensor([0.37, 0.11]))
    streams = (torch.randn(tokens, copies, hidden) * 3).to(torch.bfloat16)
    y = torch.randn(tokens, hidden).to(torch.bfloat16)
    fn, base, scale = (p.detach().double() for p in (hc.fn, hc.base, hc.scale))
    flat = streams.double().reshape(tokens, -1)
    mixes = (flat @ fn.T) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + 1e-5)
    pre = torch.sigmoid(mixes[:, :copies] * scale[0] + base[:copies]) + config.hc_eps
    post = config.hc_magnitude * torch.sigmoid(mixes[:, copies:] * scale[1] + base[copies:]) + config.hc_eps
    truth = (pre[..., None] * streams.double()).sum(1), post[..., None] * y.double()[:, None] + streams.double()
    return config, hc, streams, y, truth


@pytest.mark.parametrize("backend", BFLOAT16)
def test_a_connection_mixes_and_writes_in_float32(backend):
    """One connection's read and write on bfloat16 streams, its tensors placed as the model places them: no further
    from a float64 truth than transformers' HYV4HyperConnection, which keeps fn, base and scale in float32, mixes
    and writes in float32 and rounds each once (rounded after each op, the read erred twice as much)."""
    tokens, copies, hidden = 64, 4, 256
    config, hc, streams, y, (read_truth, write_truth) = _connection_and_truth(tokens, copies, hidden)
    with torch.no_grad():
        post, read_hf = hc(streams[None])
        write_hf = (post.unsqueeze(-1) * y.float()[None, :, None] + streams[None].float()).to(torch.bfloat16)
    ops, spec = load_backend(backend).ops, HyperSpec(copies, 1e-5, config.hc_eps, config.hc_magnitude)
    stored = {f"layers.0.attn_hc.{n}": getattr(hc, n).detach().numpy() for n in ("fn", "base", "scale")}
    stored.update({n: np.zeros(shape, np.float32) for n, shape in spec.tensors(hidden).items()})
    placed = {k: place(ops, k, v, "float32" if k.endswith(spec.float32) else "bfloat16",
                       role="bias" if k.endswith("bias") else "linear")
              for name, t in stored.items() for k, v in spec.split(name, t, hidden)}

    def projection(module):
        bias = placed.get(f"{module}.bias")
        return Linear(placed[f"{module}.weight"], None if bias is None else bias.weight)

    mix = _Mix(HyperStream(ops, spec, hidden, "bfloat16", projection), lambda m: projection(f"layers.0.{m}"), "attn_hc")
    s = ops.from_numpy(streams.float().numpy().transpose(0, 2, 1).reshape(tokens, -1).copy(), "bfloat16")
    read, post = mix.read(s)
    written = mix.write(s, post, ops.from_numpy(y.float().numpy(), "bfloat16"))
    read = np.asarray(ops.to_numpy(read), np.float64)
    written = np.asarray(ops.to_numpy(written), np.float64).reshape(tokens, hidden, copies).transpose(0, 2, 1)
    for ours, theirs, truth in ((read, read_hf[0], read_truth), (written, write_hf[0], write_truth)):
        ours_err, their_err = np.abs(ours - truth.numpy()), np.abs(theirs.double().numpy() - truth.numpy())
        assert ours_err.max() <= their_err.max() and ours_err.mean() <= 1.001 * their_err.mean()


@pytest.mark.parametrize("backend", BFLOAT16)
def test_a_bfloat16_model_keeps_the_connections_in_float32(checkpoints, backend):
    model = DecoderOnlyLLM.from_pretrained(checkpoints["hy_v4"][0], backend=backend, dtype="bfloat16")
    mixes = [model.wide.head.pre, model.wide.head.pre_tile]
    mixes += [p for layer in model.layers for p in layer.wide.projections()]
    assert {dtype_name(p.weight) for p in mixes} == {"float32"}
