"""Mixture of experts: routing, the expert ops on every backend, and loading, against transformers."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers

from ferrum.arch.mlp import MLP_KINDS
from ferrum.backends import load_backend
from ferrum.config import ModelConfig
from ferrum.moe.block import MoeMLP
from ferrum.moe.experts import PlacedExperts, StackedQuantized
from ferrum.moe.loading import SWITCH
from ferrum.moe.routing import route
from ferrum.quant import dequantize, quantize
from ferrum.weights import Linear, place
from support import run_staggered, runnable_backends

BACKENDS = runnable_backends()
HIDDEN = 64


def moe_config(family: str, **extra):
    common = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=97, num_experts_per_tok=2)
    if family == "mixtral":
        return transformers.MixtralConfig(**common, intermediate_size=48, num_local_experts=6, **extra)
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(**common, intermediate_size=80, moe_intermediate_size=40, num_experts=6,
                                           shared_expert_intermediate_size=56, norm_topk_prob=False, **extra)
    if family == "granitemoe":  # Granite's four multipliers; experts stacked as input_linear / output_linear
        return transformers.GraniteMoeConfig(**common, intermediate_size=48, num_local_experts=6,
                                             embedding_multiplier=3.0, residual_multiplier=0.5,
                                             attention_multiplier=0.09, logits_scaling=4.0, **extra)
    if family == "olmoe":  # q and k normed over their whole projections; softmax routing, not renormalized
        return transformers.OlmoeConfig(**common, intermediate_size=48, num_experts=6, norm_topk_prob=False,
                                        **extra)
    return transformers.Qwen3MoeConfig(**{**common, "intermediate_size": 80, "moe_intermediate_size": 40,
                                          "num_experts": 6, "norm_topk_prob": True, "head_dim": 16, **extra})


SPARSE_BLOCKS = {
    "mixtral": transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock,
    "qwen2_moe": transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock,
    "qwen3_moe": transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock,
    "olmoe": transformers.models.olmoe.modeling_olmoe.OlmoeSparseMoeBlock,
    "granitemoe": transformers.models.granitemoe.modeling_granitemoe.GraniteMoeMoE,
}


def random_block(family: str, seed: int = 0):
    config = moe_config(family)
    torch.manual_seed(seed)
    block = SPARSE_BLOCKS[family](config).float().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    return config, block


def ferrum_block(ops, config, block, dtype: str = "float32"):
    """The block's weights placed on ``ops`` and built by the "moe" MLP kind (names as in a checkpoint layer)."""
    arch = ModelConfig.from_dict(config.to_dict()).arch
    m, inter = arch.moe.module, arch.moe.expert_size
    state = {k: v.detach().numpy() for k, v in block.state_dict().items()}
    if "experts.gate_up_proj" in state:  # transformers 5 in memory: fused, gate rows then up rows
        gate_up = state.pop("experts.gate_up_proj")
        state |= {"experts.gate_proj": gate_up[:, :inter], "experts.up_proj": gate_up[:, inter:]}
    else:  # transformers 4: one module per expert
        for proj, name in zip(SWITCH, arch.moe.expert_names):
            state[f"experts.{proj}"] = np.stack([state.pop(f"experts.{e}.{name}.weight")
                                                 for e in range(arch.moe.num_experts)])
    router = f"{m}.{arch.moe.router}.weight"  # transformers 5 names it "gate" or (GraniteMoE) "router"
    names = {"gate.weight": router, "router.weight": router,
             **{f"experts.{p}": f"{m}.switch_mlp.{p}.weight" for p in SWITCH},
             **{f"shared_expert.{p}.weight": f"{m}.shared_expert.{p}.weight" for p in SWITCH},
             "shared_expert_gate.weight": f"{m}.shared_expert_gate.weight"}
    placed = {names[k]: place(ops, names[k], v, dtype) for k, v in state.items()}
    return MLP_KINDS["moe"].build(ops, None, lambda module: Linear(placed[f"{module}.weight"]),
                                  SimpleNamespace(arch=arch), 0)


def run_block(ops, moe: MoeMLP, x: np.ndarray) -> np.ndarray:
    return ops.to_numpy(moe(ops.from_numpy(x, "float32")))


def reference(block, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return block(torch.from_numpy(x)[None])[0].numpy()


# ------------------------------------------------------------------ routing


def test_routing_matches_transformers_routers_including_ties():
    rng = np.random.default_rng(0)
    # integer logits in a narrow range: many exact ties, some straddling the top-k boundary
    logits = rng.integers(0, 3, size=(400, 8)).astype(np.float32)
    logits[0] = 0.0  # all experts tie
    for normalize in (True, False):
        for k in (1, 2, 3):
            ids, weights = route(logits, k, normalize)
            probs = torch.softmax(torch.from_numpy(logits), dim=-1)
            ref_w, ref_ids = torch.topk(probs, k, dim=-1)
            if normalize:
                ref_w = ref_w / ref_w.sum(-1, keepdim=True)
            np.testing.assert_array_equal(np.sort(ids, axis=1), np.sort(ref_ids.numpy(), axis=1))
            np.testing.assert_allclose(np.sort(weights, axis=1), np.sort(ref_w.numpy(), axis=1), rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_native_routing_matches_reference(backend):
    ops = load_backend(backend).ops
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((50, 6)).astype(np.float32)
    shared = rng.standard_normal((50, 1)).astype(np.float32)
    ids, weights = ops.moe_route(ops.from_numpy(logits, "float32"), ops.from_numpy(shared, "float32"), 2, True)
    ref_ids, ref_w = route(logits, 2, True)
    order = np.argsort(ops.to_numpy(ids), axis=1)
    np.testing.assert_array_equal(np.take_along_axis(ops.to_numpy(ids), order, 1), np.sort(ref_ids, axis=1))
    got_w = ops.to_numpy(weights)
    np.testing.assert_allclose(np.take_along_axis(got_w[:, :2], order, 1),
                               np.take_along_axis(ref_w, np.argsort(ref_ids, axis=1), 1), rtol=1e-5)
    np.testing.assert_allclose(got_w[:, 2:], 1 / (1 + np.exp(-shared)), rtol=1e-5)


@pytest.mark.parametrize("backend", [
    pytest.param(b, marks=pytest.mark.xfail(strict=True, reason="MLX has no torch.topk tie rule; argsort decides"))
    if b == "mlx" else b for b in BACKENDS])
def test_boundary_ties_pick_the_experts_torch_topk_picks(backend):
    ops = load_backend(backend).ops
    logits = np.zeros((3, 8), dtype=np.float32)  # all 8 tie; torch picks 6, 5, 4 for k=3 (not 0, 1, 2)
    logits[1, [1, 3, 5, 7]] = 1.0  # four tie for three places
    logits[2] = [0, 2, 1, 1, 1, 0, 0, 1]
    ids, _ = ops.moe_route(ops.from_numpy(logits, "float32"), None, 3, True)
    # transformers runs torch.topk where the model runs: on a GPU its ties break the GPU kernel's way.
    device = load_backend(backend).info.device if backend == "cuda" else "cpu"
    ref = torch.topk(torch.softmax(torch.from_numpy(logits).to(device), -1), 3, dim=-1).indices.cpu().numpy()
    np.testing.assert_array_equal(np.sort(ops.to_numpy(ids), axis=1), np.sort(ref, axis=1))


# ------------------------------------------------------------------ module parity


@pytest.mark.parametrize("family", list(SPARSE_BLOCKS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_block_matches_transformers(backend, family):
    ops = load_backend(backend).ops
    config, block = random_block(family)
    moe = ferrum_block(ops, config, block)
    x = np.random.default_rng(2).standard_normal((70, HIDDEN)).astype(np.float32)  # >= 64 slots: MLX sorts
    np.testing.assert_allclose(run_block(ops, moe, x), reference(block, x), atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(run_block(ops, moe, x[:3]), reference(block, x[:3]), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spread", ["one_expert", "even"])
def test_all_tokens_on_one_expert_or_spread_evenly(backend, spread):
    ops = load_backend(backend).ops
    config, block = random_block("qwen3_moe", seed=3)
    experts = config.num_experts
    with torch.no_grad():  # the router reads one input coordinate per expert
        block.gate.weight.zero_()
        block.gate.weight[torch.arange(experts), torch.arange(experts)] = 20.0
    tokens = 48
    x = np.random.default_rng(4).standard_normal((tokens, HIDDEN)).astype(np.float32) * 0.1
    x[:, :experts] = 0.0
    if spread == "one_expert":
        x[:, [2, 4]] = [1.0, 0.5]  # every token: experts 2 then 4
    else:
        for t in range(tokens):  # token t: experts t % E and (t + 1) % E
            x[t, t % experts], x[t, (t + 1) % experts] = 1.0, 0.5
    moe = ferrum_block(ops, config, block)
    ids = ops.to_numpy(ops.moe_route(moe.router(ops.from_numpy(x, "float32")), None, 2, True)[0])
    counts = np.bincount(ids.reshape(-1), minlength=experts)
    expected = [0, 0, tokens, 0, tokens, 0] if spread == "one_expert" else [tokens * 2 // experts] * experts
    assert counts.tolist() == expected
    np.testing.assert_allclose(run_block(ops, moe, x), reference(block, x), atol=2e-4, rtol=1e-4)


# ------------------------------------------------------------------ quantized experts


def quantize_stack(w: np.ndarray, bits: int, group_size: int):
    """Each expert quantized as mlx-lm does, stacked; and the dense weights they stand for."""
    each = [quantize(m, bits, group_size) for m in w]
    stacked = StackedQuantized(*(np.stack([getattr(q, f) for q in each]) for f in ("packed", "scales", "biases")),
                               bits, group_size)
    return stacked, np.stack([dequantize(q) for q in each])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, 64), (3, 32), (4, 16)])
def test_quantized_experts_match_their_dense_weights(backend, bits, group_size):
    ops = load_backend(backend).ops
    rng = np.random.default_rng(5)
    e, inter = 4, 64
    dense = {}
    packed = {}
    for name, shape in (("gate", (e, inter, HIDDEN)), ("up", (e, inter, HIDDEN)), ("down", (e, HIDDEN, inter))):
        w = rng.standard_normal(shape).astype(np.float32) * 0.3
        packed[name], dense[name] = quantize_stack(w, bits, group_size)
    x = rng.standard_normal((70, HIDDEN)).astype(np.float32)
    logits = rng.standard_normal((70, e)).astype(np.float32)
    ids, weights = route(logits, 2, True)
    placed_q = [place(ops, f"q.{n}", packed[n], "float32") for n in ("gate", "up", "down")]
    placed_f = [place(ops, f"f.{n}", dense[n], "float32") for n in ("gate", "up", "down")]
    q = PlacedExperts(placed_q[0].linear, *(p.weight for p in placed_q))
    f = PlacedExperts(placed_f[0].linear, *(p.weight for p in placed_f))
    for rows in (slice(None), slice(0, 1)):
        xs = ops.from_numpy(x[rows], "float32")
        i, w = (ops.from_numpy(a[rows], None) for a in (ids, weights))
        np.testing.assert_allclose(ops.to_numpy(q(xs, i, w)), ops.to_numpy(f(xs, i, w)), atol=1e-3, rtol=1e-4)
    native = "moe_experts" in ops.native and (group_size != 16 or backend in ("cuda", "mlx"))  # MLX pads 16 to 32
    assert (q.apply is not ops.fallback["moe_experts"]) == native


# ------------------------------------------------------------------ config


def test_sparse_layers_and_sizes_follow_the_config():
    raw = moe_config("qwen2_moe").to_dict()
    del raw["layer_types"]
    arch = ModelConfig.from_dict({**raw, "num_hidden_layers": 4, "decoder_sparse_step": 2, "mlp_only_layers": [3],
                                  "num_experts_per_tok": 3}).arch
    assert [layer.mlp for layer in arch.layers] == ["dense", "moe", "dense", "dense"]
    assert (arch.moe.top_k, arch.moe.expert_size, arch.moe.shared_expert_size) == (3, 40, 56)
    assert arch.qkv_bias and not arch.o_bias


@pytest.mark.parametrize("family,change,message", [
    ("qwen3_moe", {"num_experts_per_tok": 9}, "exceeds the 6 experts"),
    ("qwen3_moe", {"hidden_act": "gelu"}, "hidden_act"),
    ("qwen3_moe", {"mlp_only_layers": "all"}, "mlp_only_layers"),
    ("olmoe", {"clip_qkv": -1.0}, "clip_qkv"),
    ("olmoe", {"num_experts_per_tok": 7}, "exceeds the 6 experts"),
])
def test_unsupported_or_invalid_moe_keys_are_refused_by_name(family, change, message):
    from ferrum.errors import ConfigError, UnsupportedFeatureError

    with pytest.raises((ConfigError, UnsupportedFeatureError), match=message):
        ModelConfig.from_dict({**moe_config(family).to_dict(), **change})


# ------------------------------------------------------------------ whole models

TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, 97, size=13)]
#: Layer 0 of Qwen3-MoE keeps the dense MLP (decoder_sparse_step; mlx-lm's Qwen2-MoE has no dense layers).
MODEL_EXTRA = {"mixtral": {}, "qwen2_moe": {}, "qwen3_moe": {"decoder_sparse_step": 2}, "olmoe": {}, "granitemoe": {}}


def write_moe_checkpoint(folder, family: str, **extra):
    """A random transformers MoE model saved as transformers writes it, plus the v4 keys mlx-lm reads."""
    import json

    torch.manual_seed(0)
    config = moe_config(family, max_position_embeddings=256, **{**MODEL_EXTRA[family], **extra})
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(folder)
    raw = json.loads((folder / "config.json").read_text())
    raw.setdefault("rope_theta", (raw.get("rope_parameters") or {}).get("rope_theta"))
    raw.setdefault("num_experts", raw.get("num_local_experts"))
    (folder / "config.json").write_text(json.dumps(raw))
    return model


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    """family -> (folder, transformers model, its logits for TOKENS)."""
    out = {}
    for family in SPARSE_BLOCKS:
        folder = tmp_path_factory.mktemp(family)
        model = write_moe_checkpoint(folder, family)
        with torch.no_grad():
            out[family] = (folder, model, model(torch.tensor([TOKENS])).logits[0].numpy())
    return out


def load_model(folder, backend, **kw):
    from ferrum.model import DecoderOnlyLLM

    return DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, dtype="float32", **kw)


def scaled_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / max(1.0, float(np.abs(ref).max())))


def greedy(model, prompt, steps: int = 8) -> list[int]:
    tokens = [int(np.argmax(model.prefill("g", prompt)))]
    for _ in range(steps - 1):
        tokens.append(int(np.argmax(model.decode("g", tokens[-1], len(prompt) + len(tokens) - 1))))
    model.release("g")
    return tokens


@pytest.mark.parametrize("family", list(SPARSE_BLOCKS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_model_matches_transformers(moe_models, backend, family):
    folder, _, ref = moe_models[family]
    model = load_model(folder, backend)
    assert [layer.mlp for layer in model.config.arch.layers] == (
        ["dense", "moe"] if family == "qwen3_moe" else ["moe", "moe"])
    assert scaled_error(model.forward_verify("all", TOKENS), ref) <= 1e-4
    assert scaled_error(model.prefill("last", TOKENS), ref[-1]) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_olmoe_clip_qkv_matches_transformers(tmp_path, moe_models, backend):
    """OLMoE's clip_qkv: q and k clipped once normed, v once projected; tight enough here to change the logits."""
    model = write_moe_checkpoint(tmp_path, "olmoe", clip_qkv=0.1)
    with torch.no_grad():
        ref = model(torch.tensor([TOKENS])).logits[0].numpy()
    assert scaled_error(ref, moe_models["olmoe"][2]) > 1e-2  # the clipping bites
    assert scaled_error(load_model(tmp_path, backend).forward_verify("all", TOKENS), ref) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_experts_of_sizes_the_grouped_gemm_cannot_stride_match_transformers(tmp_path, backend):
    """37 wide: rows of 148 bytes, not a multiple of 16, which torch's grouped GEMM refuses; CUDA takes the
    per-expert GEMMs for them (it raised a raw RuntimeError)."""
    write_moe_checkpoint(tmp_path, "qwen3_moe", moe_intermediate_size=37)
    model = transformers.AutoModelForCausalLM.from_pretrained(  # transformers' own grouped GEMM refuses them too
        tmp_path, dtype=torch.float32, experts_implementation="eager").eval()
    with torch.no_grad():
        ref = model(torch.tensor([TOKENS])).logits[0].numpy()
    assert scaled_error(load_model(tmp_path, backend).forward_verify("all", TOKENS), ref) <= 1e-4


@pytest.mark.parametrize("change, words", [
    (lambda w: w[:-1], "float32 (39, 64) but"),  # one expert a row short: numpy's raw ValueError before
    (lambda w: (w * 100).astype(np.int32), "int32 (40, 64) but"),  # promoted among floats and run as weights
])
def test_one_expert_tensor_unlike_the_others_is_refused_by_name(moe_models, tmp_path, change, words):
    from safetensors.numpy import load_file, save_file

    from ferrum.errors import CheckpointError

    folder = moe_models["qwen3_moe"][0]
    for path in folder.iterdir():
        if path.is_file():
            (tmp_path / path.name).write_bytes(path.read_bytes())
    name = "model.layers.1.mlp.experts.2.gate_proj.weight"
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors[name] = change(tensors[name])
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"expert tensor {name} is {re.escape(words)}"):
        load_model(tmp_path, "cpu")


@pytest.mark.parametrize("family", list(SPARSE_BLOCKS))
def test_greedy_tokens_equal_across_backends(moe_models, family):
    folder = moe_models[family][0]
    runs = {backend: greedy(load_model(folder, backend), TOKENS) for backend in BACKENDS}
    assert len(set(map(tuple, runs.values()))) == 1, runs


@pytest.mark.skipif("mlx" not in BACKENDS, reason="the MLX backend cannot run here")
@pytest.mark.parametrize("family", list(SPARSE_BLOCKS))
def test_mlx_backend_matches_mlx_lm(moe_models, family):
    import mlx.core as mx
    from mlx_lm.utils import load_model as mlx_lm_load

    folder = moe_models[family][0]
    reference, _ = mlx_lm_load(folder)
    ref = np.array(reference(mx.array([TOKENS])).astype(mx.float32))[0]
    assert scaled_error(load_model(folder, "mlx").forward_verify("m", TOKENS), ref) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_staggered_batch_gives_each_request_its_solo_output(moe_models, backend):
    from ferrum.engine import Engine, EngineConfig
    from ferrum.executor import LlmExecutor
    from ferrum.sampling import SamplingParams

    rng = np.random.RandomState(1)
    workload = [([int(t) for t in rng.randint(0, 97, size=int(rng.randint(2, 30)))], int(rng.randint(0, 6)),
                 SamplingParams(max_tokens=int(rng.randint(3, 8)), ignore_eos=True)) for _ in range(12)]
    engine = Engine(LlmExecutor(load_model(moe_models["qwen2_moe"][0], backend, num_kv_blocks=128)), None,
                    EngineConfig(max_num_batched_tokens=32, max_num_seqs=12))
    solo = []
    for prompt, _, params in workload:
        request_id = engine.add_request(prompt, params)
        solo.append([o for o in engine.run_until_done() if o.request_id == request_id and o.finished][0].token_ids)
    batched = run_staggered(engine, workload)
    assert [batched[i] for i in range(len(workload))] == solo


# ------------------------------------------------------------------ quantized checkpoints


@pytest.fixture(scope="module")
def mlx_lm_quantized(moe_models, tmp_path_factory):
    """family -> (folder, mlx-lm's logits): each tiny model quantized by mlx-lm itself (4 bits, group 32,
    with its per-model overrides such as Qwen3-MoE's 8-bit router), in mlx-lm's stacked switch_mlp layout."""
    mx = pytest.importorskip("mlx.core")
    mlx_utils = pytest.importorskip("mlx_lm.utils")
    out = {}
    for family, (folder, _, _) in moe_models.items():
        model, config = mlx_utils.load_model(folder)
        model, config = mlx_utils.quantize_model(model, config, 32, 4,
                                                 quant_predicate=getattr(model, "quant_predicate", None))
        dest = tmp_path_factory.mktemp(f"{family}_q4")
        mlx_utils.save_model(dest, model)
        mlx_utils.save_config(config, dest / "config.json")
        out[family] = (dest, np.array(model(mx.array([TOKENS])).astype(mx.float32))[0])
    return out


@pytest.mark.parametrize("family", list(SPARSE_BLOCKS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_mlx_lm_quantized_checkpoint_matches_mlx_lm(mlx_lm_quantized, backend, family):
    folder, ref = mlx_lm_quantized[family]
    model = load_model(folder, backend)
    assert model.config.quantization is not None
    assert scaled_error(model.forward_verify("q", TOKENS), ref) <= 1e-4


# ------------------------------------------------------------------ bench


def test_moe_preset_shape_and_the_profile_reports_the_expert_op(tmp_path):
    """The preset's config builds; a tiny random checkpoint of its family profiles with a moe_experts row."""
    import ferrum
    from ferrum.bench.presets import PRESETS
    from ferrum.bench.profile import profile_decode
    from ferrum.model import weight_shapes
    from ferrum.random_checkpoint import write_random_checkpoint

    preset = ModelConfig.from_dict(PRESETS["qwen3-moe-small"])
    assert weight_shapes(preset)["model.layers.7.mlp.switch_mlp.down_proj.weight"] == (32, 512, 256)
    small = {**PRESETS["qwen3-moe-small"], "hidden_size": 64, "moe_intermediate_size": 32, "num_hidden_layers": 2,
             "vocab_size": 300, "head_dim": 16}
    folder = write_random_checkpoint(tmp_path / "moe", small, dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()  # the per-expert layout
    with torch.no_grad():
        ref = hf(torch.tensor([TOKENS])).logits[0].numpy()
    assert scaled_error(load_model(folder, BACKENDS[0]).forward_verify("r", TOKENS), ref) <= 1e-4
    llm = ferrum.load(folder, backend=BACKENDS[-1], dtype="float32")
    report = profile_decode(llm, [[1, 2, 3], [4, 5]], steps=3)
    calls = {name: calls for name, calls, _ in report.ops}
    assert calls["moe_experts"] == 2 and calls["moe_route"] == 2  # one of each per layer and step
    assert "moe_experts" in report.table()


@pytest.mark.skipif("mlx" not in BACKENDS, reason="mlx-lm needs the MLX backend's framework")
@pytest.mark.parametrize("family", ["qwen2_moe", "granitemoe"])  # per expert; gate and up in one stack
def test_ferrum_quantize_stacks_experts_as_mlx_lm_reads_them(moe_models, tmp_path, family):
    import mlx.core as mx
    from mlx_lm.utils import load_model as mlx_lm_load

    from ferrum.quant import quantize_checkpoint

    folder = quantize_checkpoint(moe_models[family][0], tmp_path / "q4", bits=4, group_size=32)
    reference, _ = mlx_lm_load(folder)
    ref = np.array(reference(mx.array([TOKENS])).astype(mx.float32))[0]
    for backend in BACKENDS:
        assert scaled_error(load_model(folder, backend).forward_verify("q", TOKENS), ref) <= 1e-4


def test_capabilities_say_which_backends_run_moe_natively():
    from ferrum.capabilities import ExecutorCapabilities

    for backend in BACKENDS:
        loaded = load_backend(backend)
        assert ExecutorCapabilities.from_backend(loaded).native_moe == (backend != "cpu")


def test_sharded_per_expert_checkpoint_stacks_experts_in_order(moe_models, tmp_path):
    _, hf, ref = moe_models["mixtral"]
    hf.save_pretrained(tmp_path, max_shard_size="40KB")  # experts of one layer land in several files
    (tmp_path / "config.json").write_text((moe_models["mixtral"][0] / "config.json").read_text())
    assert len(list(tmp_path.glob("*.safetensors"))) > 3
    assert scaled_error(load_model(tmp_path, BACKENDS[0]).forward_verify("s", TOKENS), ref) <= 1e-4


def test_quantized_experts_that_disagree_with_config_are_refused(mlx_lm_quantized, tmp_path):
    import json
    import shutil

    from ferrum.errors import CheckpointError

    folder = tmp_path / "q"
    shutil.copytree(mlx_lm_quantized["qwen3_moe"][0], folder)
    raw = json.loads((folder / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        raw[key]["model.layers.1.mlp.switch_mlp.up_proj"] = {"group_size": 32, "bits": 8}
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"switch_mlp.up_proj is stored at 4 bits.*says \(8, 32\)"):
        load_model(folder, BACKENDS[0])
