"""LoRA adapters on every backend that runs here, against independent references.

* PEFT: adapters made with the ``peft`` package on a random transformers
  Llama; a request with adapter A must give the logits of PEFT's merged model
  (``merge_and_unload``) within the float32 bound of test_parity.py.
* mlx-lm: adapters made with mlx-lm's own ``linear_to_lora_layers`` and
  loaded back with its ``load_adapters`` (what ``mlx_lm.load(adapter_path=)``
  runs); compared on the MLX backend.
* Batching: requests with adapters A, B and none in one forward pass equal
  each run alone (logits and greedy tokens); the prefix cache never shares a
  block across adapters.
* Every refusal names what it refuses.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest

from ferrum.engine import Engine, EngineConfig
from ferrum.errors import AdapterError, InvalidRequestError
from ferrum.executor import LlmExecutor
from ferrum.model import DecoderOnlyLLM, ForwardItem
from ferrum.paged_kv import PagedKVManager
from ferrum.sampling import SamplingParams

from support import build_transformers_model, reference_logits, runnable_backends, with_v4_rope_keys, write_arch_checkpoint

RUNNABLE = runnable_backends()
SAME_BACKEND_TOL = 2e-5
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, 97, size=13)]
peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")


def assert_parity(got: np.ndarray, ref: np.ndarray) -> None:
    bound = 1e-4 * max(1.0, float(np.abs(ref).max()))
    diff = float(np.abs(got - ref).max())
    assert diff <= bound, f"max |diff| {diff:.3g} > {bound:.3g}"


def make_peft(hf, folder, seed: int, **config):
    """A random PEFT LoRA adapter of ``hf`` saved in ``folder``; returns PEFT's merged model."""
    torch.manual_seed(seed)
    options = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(**{**options, **config}))
    model.save_pretrained(folder)
    return model.merge_and_unload().eval()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The base checkpoint, and adapters A (all linear layers), B (rsLoRA, rank and alpha patterns)."""
    root = tmp_path_factory.mktemp("lora")
    folder = root / "base"
    hf = write_arch_checkpoint(folder, "llama")
    merged = {
        "A": make_peft(hf, root / "A", 1),
        "B": make_peft(hf, root / "B", 2, r=6, lora_alpha=5, use_rslora=True,
                       target_modules=["q_proj", "v_proj", "down_proj", "up_proj"],
                       rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 3.0}),
    }
    return folder, hf, root, merged


def load(base, backend, names=("A", "B"), **kw) -> DecoderOnlyLLM:
    folder, _, root, _ = base
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, block_size=4, **kw)
    for name in names:
        model.adapters.load(name, root / name)
    return model


def logits_alone(model, seq_id, tokens, adapter):
    out = model.forward([ForwardItem(seq_id, tokens, 0, adapter=adapter)], all_logits=True)
    return model.ops.to_numpy(out.logits)


@pytest.mark.parametrize("backend", RUNNABLE)
def test_adapter_logits_match_peft_merged_model(base, backend):
    _, hf, _, merged = base
    model = load(base, backend)
    for name in ("A", "B"):
        ref = reference_logits(merged[name], TOKENS)
        assert np.abs(ref - reference_logits(hf, TOKENS)).max() > 0.1  # the adapter matters
        assert_parity(logits_alone(model, name, TOKENS, name), ref)
    assert_parity(logits_alone(model, "none", TOKENS, None), reference_logits(hf, TOKENS))


@pytest.mark.parametrize("backend", RUNNABLE)
def test_mixed_batch_equals_each_request_alone(base, backend):
    """Prefill chunks and decodes of A, B, none and A again in every pass; 6 greedy steps."""
    model = load(base, backend)
    plan = [("a1", "A", TOKENS[:7]), ("b", "B", TOKENS[2:11]), ("n", None, TOKENS[:5]), ("a2", "A", TOKENS[4:13])]
    alone: dict[str, tuple[list[int], np.ndarray]] = {}
    for seq_id, adapter, prompt in plan:
        tokens, rows = list(prompt), []
        for _ in range(6):
            out = model.forward([ForwardItem(("solo", seq_id), tokens[-1:] if rows else tokens,
                                             len(tokens) - 1 if rows else 0, adapter=adapter)])
            rows.append(model.ops.to_numpy(out.logits)[0])
            tokens.append(int(np.argmax(rows[-1])))
        alone[seq_id] = (tokens, np.stack(rows))
    state = {seq_id: list(prompt) for seq_id, _, prompt in plan}
    got: dict[str, list[np.ndarray]] = {seq_id: [] for seq_id, _, _ in plan}
    for step in range(6):
        items = []
        for seq_id, adapter, prompt in plan:
            tokens = state[seq_id]
            fresh = not got[seq_id]
            items.append(ForwardItem(seq_id, tokens if fresh else tokens[-1:], 0 if fresh else len(tokens) - 1,
                                     adapter=adapter))
        out = model.forward(items)
        host = model.ops.to_numpy(out.logits)
        for seq_id, _, _ in plan:
            row = host[out.rows[seq_id][0]]
            got[seq_id].append(row)
            state[seq_id].append(int(np.argmax(row)))
    for seq_id, _, _ in plan:
        assert state[seq_id] == alone[seq_id][0], seq_id
        np.testing.assert_allclose(np.stack(got[seq_id]), alone[seq_id][1], atol=SAME_BACKEND_TOL)


@pytest.mark.parametrize("backend", RUNNABLE)
def test_engine_mixes_adapters_and_keys_prefix_cache_by_adapter(base, backend):
    """Through the engine (the ``lora=`` path): outputs equal solo runs; cached blocks only serve the same adapter."""
    model = load(base, backend, num_kv_blocks=64)
    engine = Engine(LlmExecutor(model), None, EngineConfig())
    params = SamplingParams(max_tokens=5, ignore_eos=True, logprobs=1)
    prompt = TOKENS + TOKENS[:5]

    def run(requests):
        ids = {engine.add_request(prompt, params, lora=lora): i for i, lora in enumerate(requests)}
        done = {ids[o.request_id]: o for o in engine.run_until_done() if o.finished}
        return [done[i] for i in range(len(requests))]

    solo = {lora: run([lora])[0] for lora in ("A", "B", None)}  # each leaves its prompt's blocks cached
    assert solo["A"].metrics.num_cached_tokens == 0 and solo["B"].metrics.num_cached_tokens == 0
    assert solo[None].metrics.num_cached_tokens == 0
    first = {lora: out.logprobs[0].logprob for lora, out in solo.items()}
    assert abs(first["A"] - first[None]) > 1e-3 and abs(first["B"] - first[None]) > 1e-3  # adapters matter
    mixed = run(["A", None, "B", "A"])
    for out, lora in zip(mixed, ["A", None, "B", "A"]):
        assert out.token_ids == solo[lora].token_ids, lora
        np.testing.assert_allclose([p.logprob for p in out.logprobs], [p.logprob for p in solo[lora].logprobs],
                                   atol=SAME_BACKEND_TOL)
        assert out.metrics.num_cached_tokens > 0  # its own adapter's blocks, from the solo run
    model.adapters.unload("B")
    model.adapters.load("B", base[2] / "A")  # same name, other weights: the old blocks must not match
    again = run(["B"])[0]
    assert again.metrics.num_cached_tokens > 0  # A's blocks: same factors, same KV
    np.testing.assert_allclose([p.logprob for p in again.logprobs], [p.logprob for p in solo["A"].logprobs],
                               atol=SAME_BACKEND_TOL)
    assert all(info.in_use == 0 for info in model.adapters.list())


def test_prefix_blocks_are_keyed_by_salt():
    kv = PagedKVManager(16, 4)
    tokens = list(range(9))
    kv.commit(kv.reserve([("a", tokens)], {"a": b"A" * 16}))
    assert kv.salt("a") == b"A" * 16
    assert kv.match_prefix(tokens, b"A" * 16).num_tokens == 8
    assert kv.match_prefix(tokens).num_tokens == 0
    assert kv.match_prefix(tokens, b"B" * 16).num_tokens == 0


@pytest.mark.skipif("mlx" not in RUNNABLE, reason="the MLX backend cannot run here")
def test_mlx_lm_adapter_matches_mlx_lm(base, tmp_path):
    mx = pytest.importorskip("mlx.core")
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters
    from mlx_lm.utils import load_model

    folder = with_v4_rope_keys(base[0], tmp_path / "base")
    settings = {"fine_tune_type": "lora", "num_layers": 1,
                "lora_parameters": {"rank": 4, "scale": 3.0, "dropout": 0.0}}
    model = load_model(folder)[0]
    linear_to_lora_layers(model, settings["num_layers"], settings["lora_parameters"])
    rng = np.random.default_rng(3)
    factors = {k: mx.array(rng.standard_normal(v.shape).astype(np.float32) * 0.2)
               for k, v in tree_flatten(model.parameters()) if k.endswith((".lora_a", ".lora_b"))}
    assert len(factors) == 14  # every projection of the last layer
    adapter = tmp_path / "mlx_adapter"
    adapter.mkdir()
    mx.save_safetensors(str(adapter / "adapters.safetensors"), factors)
    (adapter / "adapter_config.json").write_text(json.dumps(settings))
    reference = load_adapters(load_model(folder)[0], str(adapter))
    ref = np.array(reference(mx.array([TOKENS])).astype(mx.float32))[0]
    ours = DecoderOnlyLLM.from_pretrained(folder, backend="mlx", block_size=4)
    ours.adapters.load("m", adapter)
    assert ours.adapters.info("m").format == "mlx-lm"
    assert_parity(logits_alone(ours, "m", TOKENS, "m"), ref)


# ------------------------------------------- fused projections and MoE bases


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    """A Phi-3 base (fused qkv_proj and gate_up_proj in the checkpoint) with PEFT adapters on its fused targets."""
    import transformers

    root = tmp_path_factory.mktemp("phi3")
    hf = build_transformers_model(root / "base", transformers.Phi3Config(
        vocab_size=97, hidden_size=96, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    merged = {"all": make_peft(hf, root / "all", 1),  # qkv_proj, o_proj, gate_up_proj, down_proj
              "qkv": make_peft(hf, root / "qkv", 2, r=3, target_modules=["qkv_proj"])}
    return root, hf, merged


#: The sizes of the small bases below.
COMMON = dict(vocab_size=97, hidden_size=96, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def with_adapter(tmp_path_factory, name: str, config, seed: int):
    """A random base of ``config`` and a PEFT adapter on every linear layer: ``(root, base, PEFT's merged model)``."""
    root = tmp_path_factory.mktemp(name)
    hf = build_transformers_model(root / "base", config)
    return root, hf, make_peft(hf, root / "all", seed)


@pytest.fixture(scope="module", params=["phi4_mini_like", "qwen2_yarn", "granite"])
def moved_rows(request, tmp_path_factory):
    """Bases whose rows the load moves (partial rotary) or scales (longrope's and YaRN's attention factor on
    q/k, Granite's residual multiplier on o_proj/down_proj), with a PEFT adapter on every linear layer."""
    import transformers

    if request.param == "phi4_mini_like":
        half = 6  # rotary dims / 2: head_dim 24 x 0.5
        config = transformers.Phi3Config(**COMMON, partial_rotary_factor=0.5, original_max_position_embeddings=64,
                                         rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * half,
                                                       "long_factor": [2.0] * half})
    elif request.param == "qwen2_yarn":
        config = transformers.Qwen2Config(**COMMON, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                                  "original_max_position_embeddings": 32})
    else:
        config = transformers.GraniteConfig(**COMMON, residual_multiplier=0.3, logits_scaling=2.0)
    return with_adapter(tmp_path_factory, request.param, config, 3)


@pytest.mark.parametrize("backend", RUNNABLE)
def test_adapters_on_rows_the_load_moves_or_scales_match_peft(moved_rows, backend):
    root, hf, merged = moved_rows
    model = DecoderOnlyLLM.from_pretrained(root / "base", backend=backend, block_size=4, dtype="float32")
    model.adapters.load("all", root / "all")
    assert_parity(logits_alone(model, "all", TOKENS, "all"), reference_logits(merged, TOKENS))


def _without_split(registered):
    from support import cpu_like_plugin

    registered("nosplit", cpu_like_plugin("nosplit", omit=("split",)))
    return "nosplit"


@pytest.mark.parametrize("backend", [*RUNNABLE, "nosplit"])
def test_fused_phi3_targets_match_peft(phi3, backend, registered):
    """Phi-3's qkv_proj / gate_up_proj adapters, on the model's fused matrices, and (a plugin without ``split``)
    on the unfused ones, each target's B split by output columns."""
    root, hf, merged = phi3
    if backend == "nosplit":
        backend = _without_split(registered)
    model = DecoderOnlyLLM.from_pretrained(root / "base", backend=backend, block_size=4, dtype="float32")
    assert len(model.layers[0].qkv.linears) == (3 if backend == "nosplit" else 1)
    for name in merged:
        model.adapters.load(name, root / name)
    for name in merged:
        ref = reference_logits(merged[name], TOKENS)
        assert np.abs(ref - reference_logits(hf, TOKENS)).max() > 0.1
        assert_parity(logits_alone(model, name, TOKENS, name), ref)


@pytest.mark.parametrize("backend", [*RUNNABLE, "nosplit"])
def test_separate_targets_on_fused_matrices_match_peft(base, backend, registered):
    """Adapter B leaves k_proj and gate_proj alone: on the fused q/k/v and gate/up matrices their B columns
    stay zero, and A's ranks (4 for all) and B's (2 for q, 6 for v) stack in one product per matrix."""
    _, _, _, merged = base
    if backend == "nosplit":
        backend = _without_split(registered)
    model = load(base, backend)
    assert len(model.layers[0].qkv.linears) == (3 if backend == "nosplit" else 1)
    assert len(model.layers[0].mlp.gate_up.linears) == (2 if backend == "nosplit" else 1)
    for name in ("A", "B"):
        assert_parity(logits_alone(model, name, TOKENS, name), reference_logits(merged[name], TOKENS))


@pytest.fixture(scope="module", params=["phi", "starcoder2"])
def stored_names(request, tmp_path_factory):
    """Bases whose checkpoints name their projections their own way (Phi-2's dense / fc1 / fc2 in a parallel
    block, StarCoder2's c_fc / c_proj), ungated MLPs, with a PEFT adapter on every linear layer."""
    import transformers

    config = (transformers.PhiConfig(**COMMON, partial_rotary_factor=0.5) if request.param == "phi" else
              transformers.Starcoder2Config(**COMMON))
    return with_adapter(tmp_path_factory, request.param, config, 6)


@pytest.mark.parametrize("backend", RUNNABLE)
def test_adapters_on_projections_under_their_own_names_match_peft(stored_names, backend):
    root, hf, merged = stored_names
    model = DecoderOnlyLLM.from_pretrained(root / "base", backend=backend, block_size=4, dtype="float32")
    info = model.adapters.load("all", root / "all")
    assert info.projections == 2 * 6  # q, k, v, o, up, down in each of the two layers
    ref = reference_logits(merged, TOKENS)
    assert np.abs(ref - reference_logits(hf, TOKENS)).max() > 0.1
    assert_parity(logits_alone(model, "all", TOKENS, "all"), ref)
    assert_parity(logits_alone(model, "none", TOKENS, None), reference_logits(hf, TOKENS))


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """A Qwen3-MoE base whose first layer is dense, with a PEFT adapter on q/k/v/o of every layer."""
    import transformers

    root = tmp_path_factory.mktemp("moe")
    hf = build_transformers_model(root / "base", transformers.Qwen3MoeConfig(
        vocab_size=97, hidden_size=64, intermediate_size=80, moe_intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=6, num_experts_per_tok=2,
        norm_topk_prob=True, mlp_only_layers=[0], max_position_embeddings=128))
    merged = make_peft(hf, root / "attn", 3, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return root, hf, merged


@pytest.mark.parametrize("backend", RUNNABLE)
def test_attention_adapter_on_a_moe_base_matches_peft(moe, backend):
    root, hf, merged = moe
    model = DecoderOnlyLLM.from_pretrained(root / "base", backend=backend, block_size=4, dtype="float32")
    assert [layer.mlp for layer in model.config.arch.layers] == ["dense", "moe"]
    model.adapters.load("attn", root / "attn")
    ref = reference_logits(merged, TOKENS)
    assert np.abs(ref - reference_logits(hf, TOKENS)).max() > 0.1
    assert_parity(logits_alone(model, "attn", TOKENS, "attn"), ref)
    assert_parity(logits_alone(model, "none", TOKENS, None), reference_logits(hf, TOKENS))


@pytest.fixture(scope="module")
def diffllama(tmp_path_factory):
    """A DiffLlama base (differential heads, twice the stored width at run time), with PEFT adapters on q/k/v and
    on o_proj, which reads the heads combined at their stored width."""
    import transformers

    root = tmp_path_factory.mktemp("diffllama")
    hf = build_transformers_model(root / "base", transformers.DiffLlamaConfig(**COMMON))
    merged = {"qkv": make_peft(hf, root / "qkv", 7, target_modules=["q_proj", "k_proj", "v_proj"]),
              "o": make_peft(hf, root / "o", 8, target_modules=["o_proj"])}
    return root, hf, merged


@pytest.mark.parametrize("backend", RUNNABLE)
def test_attention_adapters_on_differential_heads_match_peft(diffllama, backend):
    root, hf, merged = diffllama
    model = DecoderOnlyLLM.from_pretrained(root / "base", backend=backend, block_size=4, dtype="float32")
    for name, ref in ((name, reference_logits(merged[name], TOKENS)) for name in merged):
        model.adapters.load(name, root / name)
        assert np.abs(ref - reference_logits(hf, TOKENS)).max() > 0.1
        assert_parity(logits_alone(model, name, TOKENS, name), ref)


def test_expert_and_router_targets_are_refused_by_name(moe, tmp_path):
    root, hf, _ = moe
    make_peft(hf, tmp_path / "router", 4, target_modules=["q_proj", "gate"])  # the router of the MoE layer
    model = DecoderOnlyLLM.from_pretrained(root / "base", backend="cpu", block_size=4)
    with pytest.raises(AdapterError, match="gate .*mixture-of-experts"):
        model.adapters.load("x", tmp_path / "router")
    make_peft(hf, tmp_path / "experts", 5, target_modules=["q_proj", "down_proj"])  # also the experts' stack
    with pytest.raises(AdapterError, match="mlp.experts.*mixture-of-experts"):
        model.adapters.load("x", tmp_path / "experts")
    from safetensors.numpy import save_file

    (tmp_path / "m").mkdir()
    save_file({"model.layers.1.mlp.switch_mlp.up_proj.lora_a": np.zeros((64, 4), np.float32),
               "model.layers.1.mlp.switch_mlp.up_proj.lora_b": np.zeros((4, 40), np.float32)},
              tmp_path / "m" / "adapters.safetensors")
    (tmp_path / "m" / "adapter_config.json").write_text(json.dumps({"num_layers": 2}))
    with pytest.raises(AdapterError, match="switch_mlp.*mixture-of-experts"):
        model.adapters.load("m", tmp_path / "m")
    for shared in ("shared_experts.up_proj", "shared_mlp.input_linear"):  # GLM-4.5's, DeepSeek's; GraniteMoeShared's
        (tmp_path / shared).mkdir()
        save_file({f"model.layers.1.mlp.{shared}.lora_a": np.zeros((64, 4), np.float32),
                   f"model.layers.1.mlp.{shared}.lora_b": np.zeros((4, 40), np.float32)},
                  tmp_path / shared / "adapters.safetensors")
        (tmp_path / shared / "adapter_config.json").write_text(json.dumps({"num_layers": 2}))
        with pytest.raises(AdapterError, match=f"{shared}.*mixture-of-experts"):
            model.adapters.load("m", tmp_path / shared)
    assert len(model.adapters) == 0


def test_a_target_the_base_stores_otherwise_is_refused(phi3, base, tmp_path):
    """q_proj on a base whose checkpoint holds qkv_proj (and the reverse) was trained for another layout."""
    from safetensors.numpy import save_file

    root, _, _ = phi3
    for model_root, proj, outputs, words in ((root / "base", "q_proj", 96, "inside the fused qkv_proj"),
                                             (base[0], "qkv_proj", 192, "stores q_proj, k_proj, v_proj separately")):
        folder = tmp_path / proj
        folder.mkdir()
        save_file({f"model.layers.0.self_attn.{proj}.lora_a": np.zeros((96, 4), np.float32),
                   f"model.layers.0.self_attn.{proj}.lora_b": np.zeros((4, outputs), np.float32)},
                  folder / "adapters.safetensors")
        (folder / "adapter_config.json").write_text(json.dumps({"num_layers": 2}))
        model = DecoderOnlyLLM.from_pretrained(model_root, backend="cpu")
        with pytest.raises(AdapterError, match=words):
            model.adapters.load("x", folder)


# ------------------------------------------------------------------ refusals


def _edit(root, tmp_path, config=None, tensors=None, source="A"):
    """A copy of adapter ``source`` with its config updated and tensors replaced (None drops one)."""
    from safetensors.numpy import load_file, save_file

    dest = tmp_path / "edited"
    shutil.copytree(root / source, dest)
    if config:
        settings = json.loads((dest / "adapter_config.json").read_text())
        (dest / "adapter_config.json").write_text(json.dumps({**settings, **config}))
    if tensors:
        weights = load_file(dest / "adapter_model.safetensors")
        for name, value in tensors(weights).items():
            if value is None:
                del weights[name]
            else:
                weights[name] = value
        save_file(weights, dest / "adapter_model.safetensors")
    return dest


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
ROTARY = "base_model.model.model.layers.0.self_attn.rotary"
LAYER_7 = Q_A.replace("layers.0", "layers.7")
ONES = np.ones((4, 97), np.float32)


def _swap(**tensors):
    return {"tensors": lambda w: {name: value(w) if callable(value) else value for name, value in tensors.items()}}


REFUSALS = {  # case: (edits, words the error must contain)
    "DoRA": ({"config": {"use_dora": True}}, "DoRA"),
    "DoRA magnitude": (_swap(**{Q_A.replace("lora_A.weight", "lora_magnitude_vector"): ONES[0, :96]}), "DoRA"),
    "embedding target": ({"config": {"target_modules": ["q_proj", "embed_tokens"]}}, "embed_tokens"),
    "lm_head target": ({"config": {"target_modules": ["lm_head"]}}, "lm_head"),
    "embedding factors": (_swap(**{"base_model.model.model.embed_tokens.lora_embedding_A": ONES}), "embedding"),
    "bias": ({"config": {"bias": "lora_only"}}, "bias"),
    "bias tensor": (_swap(**{Q_A.replace("lora_A.weight", "lora_A.bias"): ONES[0, :4]}), "bias"),
    "fan_in_fan_out": ({"config": {"fan_in_fan_out": True}}, "fan_in_fan_out"),
    "modules_to_save": ({"config": {"modules_to_save": ["lm_head"]}}, "modules_to_save"),
    "unknown module": ({"config": {"target_modules": ["q_proj", "wqkv"]}}, "'wqkv'"),
    "unknown tensor": ({**_swap(**{f"{ROTARY}.lora_A.weight": lambda w: w[Q_A],
                                   f"{ROTARY}.lora_B.weight": lambda w: w[Q_A].T}),
                        "config": {"target_modules": "model.layers.0.self_attn.rotary"}}, "rotary"),
    "rank mismatch": ({"config": {"r": 8}}, "rank 8"),
    "shape mismatch": (_swap(**{Q_A: ONES[:, :64]}), "64 -> 96"),
    "missing half": (_swap(**{Q_A: None}), "not both"),
    "layer outside": ({**_swap(**{LAYER_7: lambda w: w[Q_A],
                                  LAYER_7.replace("lora_A", "lora_B"): np.zeros((96, 4), np.float32)}),
                       "config": {"target_modules": ["q_proj"]}}, "2 layers"),
    "non-finite": (_swap(**{Q_A: lambda w: np.full_like(w[Q_A], np.nan)}), "non-finite"),
    "not LoRA": ({"config": {"peft_type": "IA3"}}, "IA3"),
    "activated LoRA": ({"config": {"alora_invocation_tokens": [5, 6]}}, "Activated LoRA"),
    "QA-LoRA": ({"config": {"use_qalora": True}}, "QA-LoRA"),
    "arrow": ({"config": {"arrow_config": {"top_k": 2}}}, "Arrow"),
    "int B factor": (_swap(**{Q_A.replace("lora_A", "lora_B"): np.ones((96, 4), np.int8)}), "int8, not floats"),
    "scale overflows": ({"config": {"lora_alpha": 1e300}}, "overflows float32"),
    "rank_pattern not ints": ({"config": {"rank_pattern": {"q_proj": "four"}}}, "rank_pattern must map"),
    "rank_pattern a list": ({"config": {"rank_pattern": ["q_proj"]}}, "rank_pattern must map"),
    "alpha_pattern null": ({"config": {"alpha_pattern": {"q_proj": None}}}, "alpha_pattern must map"),
    "pattern not a regex": ({"config": {"rank_pattern": {"q_proj[": 4}}}, "not a valid regex"),
    "targets not a list": ({"config": {"target_modules": 5}}, "target_modules must be a list"),
    "targets not a regex": ({"config": {"target_modules": "q_proj("}}, "not a valid regex"),
    "no targets": ({"config": {"target_modules": None}}, "no target_modules, for which PEFT takes its default"),
    "layers not indices": ({"config": {"layers_to_transform": ["0"]}}, "layers_to_transform must be"),
    "exclusions not a regex": ({"config": {"exclude_modules": "v_proj("}}, "exclude_modules .* not a valid regex"),
    "two prefixes, one projection": (_swap(**{Q_A.replace("model.model.", "model.other."): lambda w: w[Q_A],
                                              Q_A.replace("model.model.", "model.other.").replace("lora_A", "lora_B"):
                                              lambda w: w[Q_A.replace("lora_A", "lora_B")]}), "both adapt layer 0"),
}


@pytest.mark.parametrize("config, kept", [
    ({"target_modules": ["q_proj", "model.layers.1.mlp.down_proj"]}, 3),
    ({"target_modules": r".*\.(q_proj|down_proj)"}, 4),
    ({"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0]}, 2),
    ({"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["v_proj"]}, 2),
    # a module named whole is adapted whatever layers_to_transform says (PEFT's rule)
    ({"target_modules": ["model.layers.1.self_attn.q_proj", "k_proj"], "layers_to_transform": 0}, 2),
])
def test_factors_outside_target_modules_are_left_out_as_peft_leaves_them(base, tmp_path, config, kept):
    """A folder holding factors its config does not adapt (a hand-edited or merged-by-script adapter): PEFT
    builds LoRA layers only where target_modules, exclude_modules and layers_to_transform say and ignores the
    rest; so does Ferrum, with a warning."""
    _, hf, root, _ = base
    path = _edit(root, tmp_path, config=config)
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(hf), path).merge_and_unload().eval()
    model = load(base, "cpu", names=())
    expected = 14 - kept
    with pytest.warns(UserWarning, match=f"factors of {expected} modules its config does not adapt"):
        model.adapters.load("x", path)
    assert_parity(logits_alone(model, "x", TOKENS, "x"), reference_logits(reference, TOKENS))


@pytest.mark.parametrize("case", list(REFUSALS))
def test_unsupported_peft_adapters_are_refused_by_name(base, tmp_path, case):
    edits, words = REFUSALS[case]
    path = _edit(base[2], tmp_path, **edits)
    model = load(base, "cpu", names=())
    with pytest.raises(AdapterError, match=words):
        model.adapters.load("x", path)
    assert len(model.adapters) == 0


def test_factors_past_float16s_range_are_refused_for_a_float16_model(base, tmp_path):
    """Finite in float32, but past 65504 once stacked (B times the scale): a float16 model would run them as inf,
    the adapted request's logits NaN; refused at load, naming the way out. bfloat16 holds them."""
    if "mlx" not in RUNNABLE:
        pytest.skip("float16 runs on the mlx backend here")
    path = _edit(base[2], tmp_path, config={"lora_alpha": 4e6})  # scale 1e6
    model = load(base, "mlx", names=(), dtype="float16")
    with pytest.raises(AdapterError, match="past float16's largest value .*bfloat16 or float32"):
        model.adapters.load("x", path)
    assert len(model.adapters) == 0
    load(base, "mlx", names=(), dtype="bfloat16").adapters.load("x", path)


@pytest.mark.parametrize("settings, words", [
    ({"fine_tune_type": "dora"}, "DoRA"),
    ({"fine_tune_type": "full"}, "'full'"),
    ({"lora_parameters": {"rank": 4, "scale": 1.0, "keys": ["self_attn.q_proj", "embed_tokens"]}}, "embed_tokens"),
])
def test_unsupported_mlx_lm_adapters_are_refused_by_name(base, tmp_path, settings, words):
    from safetensors.numpy import save_file

    (tmp_path / "m").mkdir()
    save_file({"model.layers.1.self_attn.q_proj.lora_a": np.zeros((96, 4), np.float32),
               "model.layers.1.self_attn.q_proj.lora_b": np.zeros((4, 96), np.float32)},
              tmp_path / "m" / "adapters.safetensors")
    (tmp_path / "m" / "adapter_config.json").write_text(json.dumps({"num_layers": 1, **settings}))
    with pytest.raises(AdapterError, match=words):
        load(base, "cpu", names=()).adapters.load("m", tmp_path / "m")


def test_mlx_lm_num_layers_0_adapts_every_layer_as_mlx_lm_does(base, tmp_path):
    """mlx-lm adapts ``model.layers[-max(num_layers, 0):]``: every layer for 0 (it was refused)."""
    from safetensors.numpy import save_file

    (tmp_path / "m").mkdir()
    factors = {f"model.layers.{i}.self_attn.q_proj.lora_{ab}": np.zeros(shape, np.float32)
               for i in (0, 1) for ab, shape in (("a", (96, 4)), ("b", (4, 96)))}
    save_file(factors, tmp_path / "m" / "adapters.safetensors")
    (tmp_path / "m" / "adapter_config.json").write_text(json.dumps({"num_layers": 0}))
    assert load(base, "cpu", names=()).adapters.load("m", tmp_path / "m").projections == 2


def test_budget_in_use_and_unknown_names(base, tmp_path):
    model = load(base, "cpu", names=("A",))
    engine = Engine(LlmExecutor(model), None, EngineConfig())
    with pytest.raises(InvalidRequestError, match="no LoRA adapter named 'Z'"):
        engine.add_request(TOKENS, lora="Z")
    with pytest.raises(InvalidRequestError, match="no LoRA adapter named 'Z'"):
        model.forward([ForwardItem("z", TOKENS, 0, adapter="Z")])
    request_id = engine.add_request(TOKENS, SamplingParams(max_tokens=2), lora="A")
    with pytest.raises(AdapterError, match="used by 1 unfinished"):
        model.adapters.unload("A")
    engine.abort(request_id)
    model.adapters.unload("A")
    model.adapters.load("A2", base[2] / "A")
    with pytest.raises(AdapterError, match="already loaded"):
        model.adapters.load("A2", base[2] / "A")
    model.adapters.budget_bytes = model.adapters.used_bytes + 1
    with pytest.raises(AdapterError, match="adapter budget"):
        model.adapters.load("B", base[2] / "B")
    # adapters loaded on first use from a path are evicted (least recently used first) to make room
    model.adapters.unload("A2")
    model.adapters.load_path(base[2] / "A")
    model.adapters.budget_bytes = model.adapters.used_bytes
    name_b = model.adapters.load_path(base[2] / "B")
    assert [info.name for info in model.adapters.list()] == [name_b]
    with pytest.raises(AdapterError, match="does not exist"):
        model.adapters.load("nope", tmp_path / "missing")


def test_the_budget_counts_the_stacks_as_built(base, tmp_path):
    """Every slot of a matrix is padded to the largest rank on it: the budget bounds that, not the adapters' own
    factors (twenty rank-1 adapters beside a rank-32 one took 19x what was counted)."""
    hf = base[1]
    make_peft(hf, tmp_path / "wide", 3, r=32, lora_alpha=8)
    make_peft(hf, tmp_path / "thin", 4, r=1, lora_alpha=8)
    model = load(base, "cpu", names=())
    model.adapters.load("wide", tmp_path / "wide")
    for i in range(3):
        model.adapters.load(f"thin{i}", tmp_path / "thin")
    stacked = sum(a.nbytes + b.nbytes for t in model.adapters._targets if t.linear.factors
                  for a, b in [t.linear.factors])
    assert model.adapters.used_bytes == stacked  # float32: the stacks' own bytes
    assert stacked > 3 * sum(info.nbytes for info in model.adapters.list())  # far more than the factors alone
    model.adapters.budget_bytes = stacked
    with pytest.raises(AdapterError, match="padded to the largest rank"):
        model.adapters.load("thin3", tmp_path / "thin")


def test_an_install_that_fails_midway_is_done_again_whole(base, monkeypatch):
    """A failure while the matrices are swapped for adapted ones (raised here at the second layer's attention) keeps
    no targets: the next load adapts every layer, as PEFT's merged model says (it adapted the first layer alone)."""
    _, _, root, merged = base
    model = load(base, "cpu", names=())
    kind, calls = type(model.config.arch.attention), []
    adapt = kind.adapt

    def failing(self, *args):
        calls.append(args)
        if len(calls) == 2:
            raise RuntimeError("failed midway")
        return adapt(self, *args)

    monkeypatch.setattr(kind, "adapt", failing)
    with pytest.raises(RuntimeError, match="failed midway"):
        model.adapters.load("A", root / "A")
    monkeypatch.undo()
    assert "A" not in model.adapters
    model.adapters.load("A", root / "A")
    assert_parity(logits_alone(model, "A", TOKENS, "A"), reference_logits(merged["A"], TOKENS))


@pytest.mark.parametrize("backend", RUNNABLE)
def test_adapter_on_a_packed_base_matches_peft_on_the_dequantized_weights(base, backend, tmp_path):
    """LoRA adds to whatever op applies the base projection: here 8-bit packed weights (native or fallback)."""
    from ferrum.checkpoint import Checkpoint
    from ferrum.quant import QuantizedWeight, dequantize
    from ferrum.quant.convert import quantize_checkpoint

    folder, hf, root, _ = base
    packed = quantize_checkpoint(folder, tmp_path / "q8", bits=8, group_size=32)
    checkpoint = Checkpoint(packed)
    names = checkpoint.names()
    state = {}
    for name in hf.state_dict():
        module = name.removesuffix(".weight")
        if f"{module}.scales" in names:
            parts = [checkpoint.read(f"{module}.{p}") for p in ("weight", "scales", "biases")]
            state[name] = torch.from_numpy(dequantize(QuantizedWeight(*parts, 8, 32)).astype(np.float32))
    assert any("q_proj" in n for n in state)
    dequantized = copy.deepcopy(hf)
    dequantized.load_state_dict(state, strict=False)
    ref = reference_logits(peft.PeftModel.from_pretrained(dequantized, root / "A").merge_and_unload(), TOKENS)
    model = DecoderOnlyLLM.from_pretrained(packed, backend=backend, block_size=4, dtype="float32")
    model.adapters.load("A", root / "A")
    assert_parity(logits_alone(model, "a", TOKENS, "A"), ref)


def test_metadata_names_the_adapter_in_the_engine_and_the_executor(base):
    """``ferrum_lora_adapter`` by name, ``ferrum_lora_path`` loaded on first use (as the seeds' executor does)."""
    from ferrum.executor_api import DecodeInput, PrefillInput

    root = base[2]
    model = load(base, "cpu", names=("A",))
    executor = LlmExecutor(model)
    engine = Engine(executor, None, EngineConfig(enable_prefix_caching=False))
    params = SamplingParams(max_tokens=4, ignore_eos=True)

    def tokens(**kw):
        request_id = engine.add_request(TOKENS, params, **kw)
        return next(o for o in engine.run_until_done() if o.finished and o.request_id == request_id).token_ids

    by_name = tokens(lora="A")
    assert tokens(metadata={"ferrum_lora_adapter": "A"}) == by_name
    assert tokens(metadata={"ferrum_lora_path": str(root / "A")}) == by_name
    assert [info.pinned for info in model.adapters.list()] == [True, False]  # the path-loaded one is a cache entry
    with pytest.raises(InvalidRequestError, match="give one adapter"):
        engine.add_request(TOKENS, params, lora="A", metadata={"ferrum_lora_adapter": "B"})
    with pytest.raises(InvalidRequestError, match="ferrum_lora_adapter"):
        engine.add_request(TOKENS, params, metadata={"ferrum_lora_adapter": ""})

    meta = {"ferrum_lora_path": str(root / "B"), "ferrum_lora_adapter": "b"}
    first = executor.prefill(PrefillInput("s", TOKENS[:6], metadata=meta)).logits
    step = executor.decode(DecodeInput("s", 5, 6, metadata=meta)).logits
    verify = logits_alone(model, "v", TOKENS[:6] + [5], "b")
    np.testing.assert_allclose(np.stack([first, step]), verify[-2:], atol=SAME_BACKEND_TOL)
    with pytest.raises(InvalidRequestError, match="another adapter"):
        executor.decode(DecodeInput("s", 5, 7))


def test_python_api_lora_argument_sync_and_async(base):
    import asyncio

    from ferrum.api import LLM

    folder, _, root, _ = base
    llm = LLM(LlmExecutor(DecoderOnlyLLM.from_pretrained(folder, backend="cpu", block_size=4)), None, folder)
    info = llm.load_adapter("A", root / "A")
    assert [a.name for a in llm.adapters] == ["A"] and info.format == "peft" and info.max_rank == 4
    adapted = llm.run([TOKENS], lora="A", max_tokens=4, ignore_eos=True)[0].token_ids
    streamed = [o for o in llm.stream_outputs(TOKENS, lora="A", max_tokens=4, ignore_eos=True)][-1].token_ids
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    out = asyncio.run(llm.async_engine.generate(TOKENS, params, lora="A"))
    llm.async_engine.shutdown()
    assert adapted == streamed == out.token_ids
    assert llm.adapters[0].in_use == 0
    llm.unload_adapter("A")
    assert llm.adapters == []


def test_truncate_inside_a_shared_block_recomputes_with_the_adapter(base):
    """Speculative rollback: the private copy of a shared block is recomputed with the sequence's adapter."""
    model = load(base, "cpu", names=("A",))
    whole = logits_alone(model, "p", TOKENS, "A")  # leaves p's full blocks keyed under A's salt
    salt = model.adapters.salt("A")
    match = model.kv.match_prefix(TOKENS, salt)
    assert match.num_tokens == 12 and model.kv.match_prefix(TOKENS).num_tokens == 0
    model.kv.adopt("q", TOKENS, match, salt)
    model.truncate_kv("q", 6)  # inside the second block, which p shares
    assert model.kv.length("q") == 6
    out = model.forward([ForwardItem("q", TOKENS[6:], 6, adapter="A")], all_logits=True)
    np.testing.assert_allclose(model.ops.to_numpy(out.logits), whole[6:], atol=SAME_BACKEND_TOL)


@pytest.mark.parametrize("backend", RUNNABLE)
def test_loading_adapters_while_another_thread_generates_leaves_its_requests_whole(base, backend):
    """A load or unload rebuilds every adapted matrix's stacks while a pass on another thread reads them: it
    read one stack's ``a`` with the other's ``b`` (torch: "shapes cannot be multiplied", one in eight requests).
    ``llm.adapters`` listed as another thread unloaded raised."""
    import threading

    import ferrum

    folder, _, root, _ = base
    llm = ferrum.load(folder, backend=backend, dtype="float32")
    llm.load_adapter("A", root / "A")
    def reply() -> tuple[int, ...]:
        return llm.run([[5, 6, 7]], lora="A", max_tokens=12, ignore_eos=True)[0].token_ids

    expected = reply()
    stop, churned = threading.Event(), []

    def churn() -> None:
        while not stop.is_set():
            llm.load_adapter("B", root / "B")
            llm.unload_adapter("B")
            churned.append(len(llm.adapters))

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        replies = [reply() for _ in range(40)]
    finally:
        stop.set()
        thread.join()
    assert churned and replies == [expected] * len(replies)
