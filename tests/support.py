"""A tiny text-capable checkpoint: random Llama weights plus a trained byte-level BPE tokenizer."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "hello world the quick brown fox jumps over the lazy dog " * 3,
    "héllo wörld 你好 🙂 ünïcödé text spans several byte-level tokens",
    "<|user|> <|assistant|> <|system|>",
]


def write_tokenizer(folder: Path, vocab_size: int = 300) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE})
    )


def write_text_checkpoint(folder: Path, seed: int = 0) -> Path:
    """Save a 2-layer Llama with vocab 300 and its tokenizer into ``folder``."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=0, eos_token_id=1,
    )
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(folder)
    write_tokenizer(folder)
    return folder


def write_tiny_qwen3_moe(folder: Path) -> Path:
    """A random 2-layer Qwen3-MoE (4 experts of 32, hidden 64) in the Hugging Face per-expert layout, with a
    tokenizer: sizes every quantization format's groups divide."""
    from ferrum.random_checkpoint import write_random_checkpoint

    config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 300,
              "hidden_size": 64, "intermediate_size": 64, "moe_intermediate_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_experts": 4,
              "num_experts_per_tok": 2, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
              "max_position_embeddings": 128, "rope_theta": 10000.0, "tie_word_embeddings": False}
    write_random_checkpoint(folder, config, dtype="float32", std=0.3)
    write_tokenizer(folder)
    return folder


def add_tokens(folder: Path, texts: list[str], special: bool = False, context: int | None = None) -> list[int]:
    """Add ``texts`` to the checkpoint's tokenizer as whole tokens (special ones if ``special``) and grow its
    embeddings to match; their ids. ``context``: a longer max_position_embeddings."""
    import transformers
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_tokens([AddedToken(text, special=special, normalized=False) for text in texts])
    tok.save(str(folder / "tokenizer.json"))
    ids = [tok.token_to_id(text) for text in texts]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    model.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
    if context is not None:
        model.config.max_position_embeddings = context
    model.save_pretrained(folder)
    return ids


def write_scripted_checkpoint(folder: Path, reply: str, template: str, special: bool = False,
                              context: int | None = None) -> tuple[Path, int]:
    """:func:`write_text_checkpoint` with ``template`` as its chat template and one more token spelling all of
    ``reply`` (a special one if ``special``), which a logit bias makes the model write; the folder and the
    token's id. ``context``: a longer max_position_embeddings (room for tool definitions)."""
    write_text_checkpoint(folder, seed=3)
    (token,) = add_tokens(folder, [reply], special, context)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return folder, token


def runnable_backends() -> list[str]:
    """The built-in backends that can run on this machine."""
    from ferrum import backends

    return [e.name for e in backends.available() if e.available and e.name in ("cpu", "mlx", "cuda")]


def grouped_routing_backends() -> list[str]:
    """The backends here whose own ``moe_route`` runs grouped sigmoid routing (GLM-4.5, DeepSeek-V3): the torch
    and MLX built-ins, and the JAX plugin where it is installed."""
    from ferrum import backends

    return [e.name for e in backends.available() if e.available and e.name in ("cuda", "mlx", "jax")]


ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "llama_mha_untied", "qwen2_mqa")


def transformers_config(arch: str):
    """Tiny configs with the odd sizes that catch layout bugs."""
    import transformers

    common = dict(vocab_size=97, hidden_size=96, intermediate_size=80, num_hidden_layers=2,
                  max_position_embeddings=128, rms_norm_eps=1e-5)
    if arch == "llama":  # GQA, llama3 rope scaling, tied
        return transformers.LlamaConfig(
            **common, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        )
    if arch == "llama_mha_untied":
        return transformers.LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=4,
                                        tie_word_embeddings=False, rope_theta=500.0)
    if arch == "mistral":  # a window shorter than the test sequences
        return transformers.MistralConfig(**common, num_attention_heads=4, num_key_value_heads=2, sliding_window=5)
    if arch == "qwen2":  # qkv bias, tied
        return transformers.Qwen2Config(**common, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    if arch == "qwen2_mqa":
        return transformers.Qwen2Config(**common, num_attention_heads=6, num_key_value_heads=1, tie_word_embeddings=False)
    if arch == "qwen3":  # q/k norm, head_dim 48 != hidden/heads, 7 q heads per kv head
        return transformers.Qwen3Config(**common, num_attention_heads=7, num_key_value_heads=1, head_dim=48)
    raise ValueError(arch)


def write_arch_checkpoint(folder: Path, arch: str, seed: int = 0, max_shard_size: str | None = None):
    """Save a random-weight transformers model; returns it (float32, eval mode)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(transformers_config(arch)).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # larger than the default init so logits are far from uniform
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return model


def randomized_reference(config, model_class=None):
    """A float32 transformers model of ``config`` in eval mode (``model_class``'s where given: a multimodal wrapper
    no auto class maps to a causal LM), every parameter drawn from N(0, 0.2) (logits far from uniform) and each
    router's correction bias (DeepSeek-V3's, GLM-4.5's) from N(0, 0.5), large enough to change which experts the
    routers choose."""
    import torch
    import transformers

    torch.manual_seed(0)
    made = transformers.AutoModelForCausalLM.from_config(config) if model_class is None else model_class(config)
    model = made.float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0, 0.5)
    return model


def saved_references(tmp_path_factory, variants: dict, make_config, make_model=None) -> dict:
    """variant -> (folder, transformers model): ``make_model`` (:func:`randomized_reference` unless given) of
    ``make_config(**extra)`` for each variant's ``extra`` settings, saved with ``save_pretrained``."""
    out = {}
    for variant, extra in variants.items():
        folder = tmp_path_factory.mktemp(variant)
        model = (make_model or randomized_reference)(make_config(**extra))
        model.save_pretrained(folder)
        out[variant] = folder, model
    return out


def with_layer_scalars(model, step: float):
    """``model`` (a Gemma 4) with each layer's layer_scalar, a buffer :func:`randomized_reference` leaves at 1, set
    apart (``0.6 + step * layer``), so that each visibly matters."""
    import torch

    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.layer_scalar.fill_(0.6 + step * i)
    return model


def assert_random_checkpoint_is_what_transformers_reads(folder: Path, raw: dict, tokens, model_class=None) -> None:
    """``ferrum.random_checkpoint`` (benchmarks, the conformance kit) writes, for config ``raw``, the tensors
    transformers expects, none missing and none unexpected, and Ferrum's logits on them are transformers' (a family
    with expert layouts of its own written in transformers', as benchmarks against transformers write it).
    ``model_class``: transformers' class for a family its auto classes map to no causal LM."""
    import transformers

    from ferrum.model import DecoderOnlyLLM
    from ferrum.random_checkpoint import write_random_checkpoint

    folder = write_random_checkpoint(folder, raw, dtype="float32", std=0.2, expert_layout="transformers")
    hf, info = (model_class or transformers.AutoModelForCausalLM).from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    got = DecoderOnlyLLM.from_pretrained(folder, backend="cpu", dtype="float32").forward_verify("x", tokens)
    assert scaled_error(got, reference_logits(hf.float().eval(), tokens)) <= 1e-4


def assert_generates_greedily_as_transformers(folder: Path, hf, backend: str, tokens, max_tokens: int = 12) -> None:
    """Through the engine, ``tokens`` batched with a shorter prompt and run again from the prefix cache give the
    greedy tokens transformers' ``generate`` gives."""
    import torch

    import ferrum

    with torch.no_grad():
        want = hf.generate(torch.tensor([list(tokens)]), max_new_tokens=max_tokens, do_sample=False)[0, len(tokens):]
    llm = ferrum.load(folder, backend=backend, dtype="float32")
    first, _, again = llm.run([tokens, tokens[:5], tokens], max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    assert list(first.token_ids) == want.tolist() and list(again.token_ids) == want.tolist()


def assert_router_computes_in_float32(mlp, ops, weight: np.ndarray) -> None:
    """A bfloat16 model's router (``mlp``, a MoeMLP) takes its input cast to float32 and its float32 ``weight``:
    its logits are the float32 product, where a bfloat16 one errs by ~1e-2."""
    x = ops.from_numpy(np.random.default_rng(0).standard_normal((5, weight.shape[1])).astype(np.float32), "bfloat16")
    got = np.asarray(ops.to_numpy(mlp.router(ops.cast(x, mlp.router_dtype))), dtype=np.float64)
    assert mlp.router_dtype == "float32"
    assert scaled_error(got, ops.to_numpy(x).astype(np.float64) @ weight.astype(np.float64).T) < 1e-5


def assert_names_the_tensors_transformers_saves(folder: Path) -> None:
    """``weight_shapes`` lists every tensor transformers saved in ``folder``, with its shape, and no other (experts
    under the stacked names the loader assembles from transformers' per-expert ones; in the layout the saved names
    are in, e.g. Nemotron-H's ``backbone.``)."""
    from safetensors import safe_open

    from ferrum.arch.tensors import resolve_layout
    from ferrum.config import ModelConfig
    from ferrum.model import weight_shapes

    with safe_open(str(folder / "model.safetensors"), framework="numpy") as f:
        saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    shapes = weight_shapes(resolve_layout(ModelConfig.from_file(folder), saved))
    # the experts' own matrices (not a correction bias kept beside them: Laguna's experts.e_score_correction_bias)
    assert {n: s for n, s in shapes.items() if ".switch_mlp." not in n} == {
        n: s for n, s in saved.items() if ".experts." not in n or n.endswith(".e_score_correction_bias")}


def without_correction_biases(folder: Path):
    """transformers' model of checkpoint ``folder`` in float32 with its MoE correction biases zeroed (buffers or
    parameters named ``e_score_correction_bias``): a parity test's control that the biases matter."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()
    with torch.no_grad():
        for name, tensor in [*model.named_buffers(), *model.named_parameters()]:
            if name.endswith("e_score_correction_bias"):
                tensor.zero_()
    return model


def mlx_lm_logits(folder: Path, tokens) -> np.ndarray:
    """mlx-lm's own model's logits over ``tokens`` for checkpoint ``folder``, float32 ``[len(tokens), vocab]``."""
    import mlx.core as mx
    from mlx_lm.utils import load_model

    loaded = load_model(folder)
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    return np.array(model(mx.array([tokens])).astype(mx.float32))[0]


def mlx_lm_converted(folder: Path, dest: Path, tokens, bits: int | None = None,
                     group: int = 64) -> tuple[dict, np.ndarray]:
    """mlx-lm's conversion of checkpoint ``folder`` (packed at ``bits`` in groups of ``group`` where given) written to
    ``dest``: its stored tensors and mlx-lm's own logits over ``tokens``."""
    from mlx_lm.convert import convert
    from safetensors.numpy import load_file

    convert(str(folder), str(dest), **({} if bits is None else dict(quantize=True, q_bits=bits, q_group_size=group)))
    return load_file(dest / "model.safetensors"), mlx_lm_logits(dest, tokens)


def assert_every_backend_runs_it_as_mlx_lm(folder: Path, tokens, want: np.ndarray, packed: bool) -> None:
    """Each runnable backend's float32 logits of mlx-lm's conversion ``folder`` are mlx-lm's, ``want`` (within 1e-4,
    or 2e-3 where ``packed``)."""
    from ferrum.model import DecoderOnlyLLM

    for backend in runnable_backends():
        model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, dtype="float32")
        assert scaled_error(model.forward_verify("m", tokens), want) <= (2e-3 if packed else 1e-4), backend


def reference_logits(model, tokens) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([list(tokens)])).logits[0].numpy().astype(np.float32)


def cpu_like_plugin(name: str, omit: tuple[str, ...] = (), extra: dict | None = None):
    """A plugin object that delegates to the numpy ops, minus ``omit``, plus ``extra``."""
    import types

    import ferrum_cpu.ops as cpu_ops
    from ferrum import hookspec
    from ferrum.backends import BackendProbe
    from ferrum.hookspec import hookimpl

    ns = types.SimpleNamespace()

    @hookimpl
    def backend_probe():
        return BackendProbe(available=True, device="cpu", priority=99, api_version=ns.backend_info().api_version)

    @hookimpl
    def backend_load():
        return ns

    ns.backend_probe, ns.backend_load = backend_probe, backend_load
    for op in hookspec.REQUIRED_OPS + hookspec.OPTIONAL_OPS:
        fn = getattr(cpu_ops, op, None)
        if fn is not None and op not in omit:
            setattr(ns, op, fn)
    for key, value in (extra or {}).items():
        setattr(ns, key, value)
    return ns


def run_staggered(engine, workload) -> dict[int, tuple[int, ...]]:
    """Add each request at its arrival step; returns index -> output tokens."""
    ids: dict[str, int] = {}
    results: dict[int, tuple[int, ...]] = {}
    step = 0
    while len(results) < len(workload):
        for index, (prompt, arrival, params) in enumerate(workload):
            if arrival == step:
                ids[engine.add_request(prompt, params)] = index
        for out in engine.step():
            if out.finished:
                results[ids[out.request_id]] = out.token_ids
        step += 1
    return results


def assert_a_mixed_batch_gives_each_sequence_its_own_logits(model, hf, vocab: int, first_y: int = 3) -> None:
    """Prefill chunks and decode steps of three sequences in one pass of ``model``, in changing orders, each as
    transformers' ``hf`` computes it alone (``first_y``: the tokens of y's first chunk)."""
    from ferrum.model import ForwardItem

    prompts = {s: [int(t) for t in np.random.RandomState(i).randint(0, vocab, size=n)]
               for i, (s, n) in enumerate((("x", 11), ("y", 7), ("z", 9)))}
    want = {s: reference_logits(hf, p) for s, p in prompts.items()}
    model.forward([ForwardItem("x", prompts["x"][:5], 0, False), ForwardItem("y", prompts["y"][:first_y], 0, False)])
    out = model.unified_forward([ForwardItem("y", prompts["y"][first_y:6], first_y),
                                 ForwardItem("z", prompts["z"][:8], 0), ForwardItem("x", prompts["x"][5:9], 5)])
    for s, pos in (("x", 8), ("y", 5), ("z", 7)):
        assert scaled_error(out[s], want[s][pos]) <= 1e-4, s
    out = model.unified_forward([ForwardItem("z", [prompts["z"][8]], 8), ForwardItem("x", [prompts["x"][9]], 9),
                                 ForwardItem("y", [prompts["y"][6]], 6)])
    for s, pos in (("x", 9), ("y", 6), ("z", 8)):
        assert scaled_error(out[s], want[s][pos]) <= 1e-4, s


def assert_a_failed_pass_leaves_every_state_as_it_was(model, hf, tokens, op: str, monkeypatch,
                                                      fail_at: int = 3) -> None:
    """A batch of ``model`` (two sequences, prefilled) that fails in call ``fail_at`` of recurrent op ``op`` (the
    third: after the first two made new states), changes nothing: both sequences then decode as transformers' ``hf``
    says."""
    import pytest

    from ferrum.model import ForwardItem

    want = reference_logits(hf, tokens)
    model.prefill("a", tokens[:6])
    model.prefill("b", tokens[:4])
    real, calls = getattr(model.ops, op), []

    def fails_late(*args):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("device lost")
        return real(*args)

    monkeypatch.setattr(model.ops, op, fails_late)
    with pytest.raises(RuntimeError, match="device lost"):
        model.forward([ForwardItem("a", tokens[6:9], 6), ForwardItem("b", [tokens[4]], 4)])
    monkeypatch.setattr(model.ops, op, real)
    assert scaled_error(model.decode("a", tokens[6], 6), want[6]) <= 1e-4
    assert scaled_error(model.decode("b", tokens[4], 4), want[4]) <= 1e-4


def staggered_greedy_workload(vocab: int, seed: int = 3, count: int = 10) -> list:
    """``count`` requests for :func:`run_staggered`: 2-29 random tokens each, arriving at steps 0-5, each asking 3-8
    greedy tokens."""
    from ferrum.sampling import SamplingParams

    rng = np.random.RandomState(seed)
    return [([int(t) for t in rng.randint(0, vocab, size=int(rng.randint(2, 30)))], int(rng.randint(0, 6)),
             SamplingParams(max_tokens=int(rng.randint(3, 9)), ignore_eos=True)) for _ in range(count)]


def float32_model(folder, backend: str = "cpu", **kwargs):
    """The checkpoint at ``folder`` loaded in float32 on ``backend``, as the family tests compare it with
    transformers."""
    from ferrum.model import DecoderOnlyLLM

    return DecoderOnlyLLM.from_pretrained(folder, backend=backend, dtype="float32", **kwargs)


def small_pool_engine(folder, backend: str = "cpu", **config):
    """An engine (no tokenizer) of :func:`float32_model` with a pool of 64 blocks of 4 tokens and ``config`` as its
    EngineConfig: the ``make_engine`` of :func:`assert_engine_keeps_greedy_tokens` for a checkpoint."""
    from ferrum.engine import Engine, EngineConfig
    from ferrum.executor import LlmExecutor

    return Engine(LlmExecutor(float32_model(folder, backend, num_kv_blocks=64, block_size=4)), None,
                  EngineConfig(**config))


def assert_engine_keeps_greedy_tokens(make_engine, hf, workload) -> None:
    """Alone, staggered among others with chunked prefills, and under preemption (a KV pool too small for all):
    each request of ``workload`` (:func:`staggered_greedy_workload`) gets the same greedy tokens, which are
    transformers' (``hf``) for the first. ``make_engine(**config)`` builds an engine of the model under test with
    that EngineConfig, its KV in blocks of 4 tokens."""
    import torch

    alone = make_engine()
    solo = []
    for prompt, _, params in workload:
        alone.add_request(prompt, params)
        solo += [o.token_ids for o in alone.run_until_done() if o.finished]
    with torch.no_grad():
        first = hf.generate(torch.tensor([workload[0][0]]), max_new_tokens=workload[0][2].max_tokens,
                            do_sample=False)[0, len(workload[0][0]):]
    assert list(solo[0]) == first.tolist()
    batched = run_staggered(make_engine(max_num_batched_tokens=8, max_num_seqs=6), workload)
    assert [batched[i] for i in range(len(workload))] == solo
    tight = make_engine(max_num_batched_tokens=16, max_num_seqs=8)
    tight.model.kv.__init__(12, 4)  # 48 tokens of KV for requests of up to 38
    preempted = run_staggered(tight, workload)
    assert tight.metrics().preemptions > 0
    assert [preempted[i] for i in range(len(workload))] == solo


def with_v4_rope_keys(folder, dest):
    """Copy a checkpoint, spelling rope settings the transformers-4 way mlx-lm reads."""
    shutil.copytree(folder, dest)
    config = json.loads((dest / "config.json").read_text())
    params = config.pop("rope_parameters", None) or {}
    config["rope_theta"] = params.get("rope_theta", 10000.0)
    if params.get("rope_type", "default") != "default":
        config["rope_scaling"] = params
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def flaky(fn, rng: random.Random, calls: int = 40, faults: int = 5):
    """``fn`` failing at ``faults`` random ones of its first ``calls`` calls, *after* doing its work
    (KV written, random draws spent)."""
    fail_at = set(rng.sample(range(1, calls), faults))

    def call(*args, **kwargs):
        result = fn(*args, **kwargs)
        call.count += 1
        if call.count in fail_at:
            call.faults += 1
            raise RuntimeError("injected fault")
        return result

    call.count = call.faults = 0
    return call


def built_checkpoints(tmp_path_factory, makers: dict, vocab: int | None = None) -> dict:
    """name -> (folder, transformers model): :func:`build_transformers_model` of each ``makers[name]()`` in a folder
    of its own, with :func:`write_tokenizer`'s tokenizer of ``vocab`` ids where given."""
    out = {}
    for name, make in makers.items():
        folder = tmp_path_factory.mktemp(name)
        out[name] = folder, build_transformers_model(folder, make())
        if vocab is not None:
            write_tokenizer(folder, vocab)
    return out


def build_transformers_model(folder, config, seed: int = 0, model_class=None):
    """Save a random-weight transformers model of ``config`` (as ``model_class``, else the causal LM its config
    maps to); returns it (float32, eval, eager attention)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    if model_class is None:
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    else:
        config._attn_implementation = "eager"
        model = model_class(config)
    model = model.float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(folder)
    return model


def attention_batch(items, block_size: int):
    """The ``AttentionBatch`` of ``items``, each ``(block table, kv length after the step, query length)``: the
    queries are each item's last positions, written to the slots its table gives them."""
    from ferrum.attention import AttentionBatch

    q_lens = np.array([q for _, _, q in items])
    seq_lens = np.array([n for _, n, _ in items], dtype=np.int32)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    table = np.zeros((len(items), max(len(t) for t, _, _ in items)), dtype=np.int32)
    for row, (blocks, _, _) in enumerate(items):
        table[row, : len(blocks)] = blocks
    positions = np.concatenate([np.arange(n - q, n) for _, n, q in items]).astype(np.int32)
    slots = np.concatenate([np.asarray(t)[positions[cu[i] : cu[i + 1]] // block_size] * block_size
                            + positions[cu[i] : cu[i + 1]] % block_size for i, (t, _, _) in enumerate(items)])
    return AttentionBatch(positions, slots.astype(np.int32), cu, seq_lens, table, block_size)


def paged_reference(q, k_pool, v_pool, cu, seq_lens, tables, block_size: int, scale: float, window: int | None,
                    softcap: float | None = None, sinks: np.ndarray | None = None) -> np.ndarray:
    """Paged attention item by item in float64: keys through the block table, end-aligned causal mask,
    optional window, ``softcap * tanh(scores / softcap)`` and ``sinks [heads]`` (a logit per head that joins
    each row's softmax without a value). ``q [tokens, heads, d]``, ``k_pool, v_pool [slots, kv_heads, d]``."""
    out = []
    for item, n in enumerate(np.asarray(seq_lens).tolist()):
        pos = np.arange(n)
        slots = np.asarray(tables[item])[pos // block_size] * block_size + pos % block_size
        k, v = k_pool[slots].astype(np.float64), v_pool[slots].astype(np.float64)  # [n, kvh, d]
        qi = q[cu[item] : cu[item + 1]].astype(np.float64)  # [q, heads, d]
        group = q.shape[1] // k_pool.shape[1]
        kh, vh = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        scores = np.einsum("qhd,khd->hqk", qi, kh) * scale
        if softcap is not None:
            scores = softcap * np.tanh(scores / softcap)
        qpos = np.arange(n - len(qi), n)[:, None]
        hidden = pos[None, :] > qpos
        if window is not None:
            hidden |= pos[None, :] <= qpos - window
        scores[:, hidden] = -np.inf
        top = scores.max(-1, keepdims=True)
        weights = np.exp(scores - top)
        total = weights.sum(-1, keepdims=True)
        if sinks is not None:
            total = total + np.exp(np.asarray(sinks, np.float64)[:, None, None] - top)
        out.append(np.einsum("hqk,khd->qhd", weights / total, vh))
    return np.concatenate(out)


def assert_stray_tensors_quiet_only_where_transformers_skips_them(folder: Path, dest: Path, skipped: list[str],
                                                                   hf, tokens: list[int]) -> None:
    """A copy of checkpoint ``folder`` holding tensors ``skipped`` (which the family's transformers class ignores on
    load: a release's multi-token prediction heads) loads without a warning and runs as ``hf``; one holding any
    other stray tensor is still reported unread."""
    import warnings

    import pytest
    from safetensors.numpy import load_file, save_file

    from ferrum.model import DecoderOnlyLLM

    def with_extra(names: list[str], copy: Path) -> Path:
        shutil.copytree(folder, copy)
        tensors = {**load_file(copy / "model.safetensors"), **{n: np.ones(8, np.float32) for n in names}}
        save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
        return copy

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = DecoderOnlyLLM.from_pretrained(with_extra(skipped, dest / "skipped"), backend="cpu", dtype="float32")
    assert scaled_error(model.forward_verify("s", tokens), reference_logits(hf, tokens)) < 1e-4
    with pytest.warns(UserWarning, match=r"1 tensor\(s\) in the checkpoint are not used .*: model.stray.weight"):
        DecoderOnlyLLM.from_pretrained(with_extra(["model.stray.weight"], dest / "stray"), backend="cpu")


def with_prediction_layer(folder: Path, dest: Path, nextn: int) -> Path:
    """A copy of checkpoint ``folder`` holding one multi-token prediction layer after the decoder's, as GLM-4.5's
    and DeepSeek-V3's releases store it, with config.json's ``num_nextn_predict_layers`` set to ``nextn``."""
    import shutil

    from safetensors.numpy import load_file, save_file

    copy = shutil.copytree(folder, dest)
    config = json.loads((copy / "config.json").read_text())
    layer, hidden = config["num_hidden_layers"], config["hidden_size"]
    tensors = load_file(copy / "model.safetensors")
    tensors[f"model.layers.{layer}.eh_proj.weight"] = np.zeros((hidden, 2 * hidden), np.float32)
    tensors[f"model.layers.{layer}.enorm.weight"] = np.ones(hidden, np.float32)
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    (copy / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": nextn}))
    return copy


def with_edited_tensors(folder: Path, dest: Path, edit) -> Path:
    """A copy of checkpoint ``folder`` at ``dest`` whose tensors (name -> array) ``edit`` changed in place, as a
    release stores what a random checkpoint does not (or lacks what it has)."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(folder, dest)
    tensors = load_file(dest / "model.safetensors")
    edit(tensors)
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def assert_forward_and_decode_match(model, tokens: list[int], want: np.ndarray, tolerance: float = 1e-4) -> None:
    """``model``'s logits over ``tokens`` (one forward pass, then a prefill of five and token-by-token decode)
    within ``tolerance`` of ``want``, scaled by the largest reference logit."""
    assert scaled_error(model.forward_verify("all", tokens), want) <= tolerance
    model.prefill("steps", tokens[:5])
    for pos in range(5, len(tokens)):
        assert scaled_error(model.decode("steps", tokens[pos], pos), want[pos]) <= tolerance


def scaled_error(got: np.ndarray, want: np.ndarray) -> float:
    """The largest difference, scaled by the largest reference value (at least 1)."""
    return float(np.abs(got - want).max() / max(1.0, float(np.abs(want).max())))


def assert_matches_transformers(folder: Path, hf, backend: str, tokens: list[int]) -> None:
    """The checkpoint at ``folder``, float32 on ``backend`` in 4-token blocks, gives ``hf``'s logits over ``tokens``
    in one pass and decoding them (:func:`assert_forward_and_decode_match`)."""
    assert_forward_and_decode_match(float32_model(folder, backend, block_size=4), tokens, reference_logits(hf, tokens))


def assert_logits_move(changed, hf, tokens: list[int], least: float = 1e-2) -> None:
    """``changed`` (``hf`` with one part altered) gives logits over ``tokens`` more than ``least`` (scaled) from
    ``hf``'s: the part counts in the parity check."""
    assert scaled_error(reference_logits(changed, tokens), reference_logits(hf, tokens)) > least


def edited_checkpoint(folder: Path, dest: Path, config: dict | None = None, tensors=None) -> Path:
    """A copy of checkpoint ``folder`` at ``dest`` with ``config`` merged into its config.json and its tensors
    (name -> array) changed in place by ``tensors``, where given."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(folder, dest)
    if config:
        raw = json.loads((dest / "config.json").read_text())
        (dest / "config.json").write_text(json.dumps({**raw, **config}))
    if tensors:
        stored = load_file(dest / "model.safetensors")
        tensors(stored)
        save_file(stored, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest
