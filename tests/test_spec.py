"""Speculative decoding on every backend that runs here: exact outputs, the target distribution, KV rollback.

The draft model is a truncated copy of the target (its first layers, same
weights); the target's later layers are damped so the two often agree,
which gives realistic acceptance.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from ferrum.engine import Engine, EngineConfig, FinishReason
from ferrum.executor import LlmExecutor
from ferrum.model import DecoderOnlyLLM
from ferrum.sampling import SamplingParams
from ferrum.spec import SpeculativeConfig

from support import run_staggered, runnable_backends

BACKENDS = runnable_backends()
METHODS = ("lookup", "draft")
RNG = np.random.RandomState(7)


def _prompt(rng: np.random.RandomState) -> list[int]:
    """A text followed by a repeat of part of it, as in 'repeat this text' prompts."""
    text = [int(t) for t in rng.randint(2, 300, size=int(rng.randint(4, 24)))]
    return text + text[: int(rng.randint(1, len(text) + 1))]


#: 32 requests: prompt, arrival step, sampling (greedy and seeded sampling alternate).
WORKLOAD = [
    (
        _prompt(RNG),
        int(RNG.randint(0, 12)),
        SamplingParams(max_tokens=int(RNG.randint(8, 30)), ignore_eos=True)
        if i % 2 == 0
        else SamplingParams(max_tokens=int(RNG.randint(8, 30)), temperature=0.8, top_k=20, top_p=0.9,
                            repetition_penalty=1.1, seed=i, ignore_eos=True),
    )
    for i in range(32)
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    import torch
    import transformers

    folder = tmp_path_factory.mktemp("spec")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=1,
    )
    target = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for p in target.parameters():
            p.normal_(0, 0.3)
        for layer in target.model.layers[2:]:  # small late layers: the truncated copy often agrees
            layer.self_attn.o_proj.weight.mul_(0.1)
            layer.mlp.down_proj.weight.mul_(0.1)
    target.save_pretrained(folder / "target")
    config.num_hidden_layers = 2
    draft = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    draft.load_state_dict({k: v for k, v in target.state_dict().items() if ".layers.2." not in k
                           and ".layers.3." not in k})
    draft.save_pretrained(folder / "draft")
    return folder / "target", folder / "draft"


def make_engine(checkpoints, backend, method=None, num_kv_blocks=256, **config) -> Engine:
    target, draft = checkpoints
    model = DecoderOnlyLLM.from_pretrained(target, backend=backend, num_kv_blocks=num_kv_blocks, block_size=4)
    drafter = None
    if method == "draft":
        drafter = DecoderOnlyLLM.from_pretrained(draft, backend=backend, num_kv_blocks=num_kv_blocks, block_size=4)
    spec = SpeculativeConfig(method=method, num_speculative_tokens=4) if method else None
    config.setdefault("max_num_batched_tokens", 96)
    config.setdefault("max_num_seqs", 32)
    return Engine(LlmExecutor(model), None, EngineConfig(speculative=spec, **config), draft_model=drafter)


def assert_kv_pools_free(engine: Engine) -> None:
    kv = engine.model.kv
    assert kv.num_free_blocks == kv.num_blocks and not kv.sequences()
    drafter = engine._speculator.drafter if engine._speculator else None
    if drafter is not None:
        assert drafter.model.kv.num_free_blocks == drafter.model.kv.num_blocks and not drafter.model.kv.sequences()


@pytest.fixture(scope="module", params=BACKENDS)
def plain_outputs(request, checkpoints):
    engine = make_engine(checkpoints, request.param)
    return request.param, run_staggered(engine, WORKLOAD)


@pytest.mark.parametrize("method", METHODS)
def test_outputs_are_identical_with_and_without_speculation(checkpoints, plain_outputs, method):
    backend, plain = plain_outputs
    engine = make_engine(checkpoints, backend, method)
    assert run_staggered(engine, WORKLOAD) == plain  # greedy and seeded sampled requests alike
    metrics = engine.metrics()
    assert metrics.spec_drafted_tokens > 0 and metrics.spec_acceptance_rate > 0.2
    assert metrics.spec_tokens_per_step > 1.2
    assert metrics.generated_tokens == sum(len(t) for t in plain.values())
    assert_kv_pools_free(engine)


def test_drafts_a_stop_cut_off_are_not_counted_as_accepted(checkpoints):
    """A stop inside an accepted run ends the request there: the drafts after it were never taken, so the
    acceptance counts (and the off-switch fed by them) leave them out. Each step takes its accepted drafts and one
    token more, so a request's accepted drafts lie between its spec-step tokens less its steps and those tokens."""
    plain = make_engine(checkpoints, "cpu")
    prompts = [_prompt(np.random.RandomState(seed)) for seed in range(12)]
    greedy = {}
    for i, prompt in enumerate(prompts):
        plain.add_request(prompt, SamplingParams(max_tokens=16, ignore_eos=True), request_id=str(i))
    for out in plain.run_until_done():
        if out.finished:
            greedy[out.request_id] = out.token_ids
    engine = make_engine(checkpoints, "cpu", "draft")
    for i, prompt in enumerate(prompts):
        stop = greedy[str(i)][2 + i % 5]
        engine.add_request(prompt, SamplingParams(max_tokens=16, ignore_eos=True, stop_token_ids=[stop]),
                           request_id=str(i))
    finals = [out for out in engine.run_until_done() if out.finished]
    for out in finals:
        m = out.metrics
        from_steps = len(out.token_ids) + (out.stop_reason is not None) - 1  # the first token came from the prefill
        assert from_steps - m.num_spec_steps <= m.num_accepted_tokens <= from_steps, (out.token_ids, m)
    assert engine.metrics().spec_accepted_tokens == sum(out.metrics.num_accepted_tokens for out in finals) > 0


@pytest.mark.parametrize("method", METHODS)
def test_rollback_under_preemption_keeps_outputs_and_frees_every_block(checkpoints, plain_outputs, method):
    backend, plain = plain_outputs
    engine = make_engine(checkpoints, backend, method, num_kv_blocks=40)
    assert run_staggered(engine, WORKLOAD) == plain
    assert engine.metrics().preemptions > 0 and engine.metrics().spec_accepted_tokens > 0
    assert_kv_pools_free(engine)


def test_a_drafter_failing_on_one_request_leaves_it_to_decode_plainly(checkpoints, plain_outputs, monkeypatch):
    """Lookup drafting raising for one request's tokens: that request decodes without drafts, the others go on
    drafting; every output is as without speculation (the step raised, and every request was preempted)."""
    import ferrum.spec.speculator as speculator

    backend, plain = plain_outputs
    victim, real = WORKLOAD[3][0], speculator.propose_lookup

    def failing(tokens, *args):
        if list(tokens[: len(victim)]) == victim:
            raise RuntimeError("drafter bug")
        return real(tokens, *args)

    monkeypatch.setattr(speculator, "propose_lookup", failing)
    engine = make_engine(checkpoints, backend, "lookup")
    with pytest.warns(RuntimeWarning, match="drafting for request .* failed .*drafter bug"):
        assert run_staggered(engine, WORKLOAD) == plain
    assert engine.metrics().preemptions == 0 and engine.metrics().spec_accepted_tokens > 0
    assert_kv_pools_free(engine)


def test_the_draft_model_catches_up_within_the_token_budget(checkpoints):
    """A long prompt is prefilled in chunks of ``max_num_batched_tokens``; the draft model's catch-up with it
    was one pass over every token (the memory and latency the budget bounds); outputs stay the plain ones."""
    prompt = [int(t) for t in np.random.RandomState(3).randint(2, 300, size=150)]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    plain = run_alone_tokens(make_engine(checkpoints, BACKENDS[0], max_num_batched_tokens=32, max_num_seqs=8),
                             prompt, params)
    engine = make_engine(checkpoints, BACKENDS[0], "draft", max_num_batched_tokens=32, max_num_seqs=8)
    draft = engine._speculator.drafter.model
    passes, forward = [], draft.forward
    draft.forward = lambda items, *a, **k: passes.append(sum(len(i.q_tokens) for i in items)) or forward(items, *a, **k)
    assert run_alone_tokens(engine, prompt, params) == plain
    assert max(passes) <= 32 and sum(passes) >= len(prompt)
    assert_kv_pools_free(engine)


def run_alone_tokens(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[int, ...]:
    request_id = engine.add_request(prompt, params)
    return next(o for o in engine.run_until_done() if o.request_id == request_id and o.finished).token_ids


def test_preemption_frees_the_draft_models_kv_at_once(checkpoints, plain_outputs):
    """A preempted request holds no draft KV while it waits (the draft pool is as small as the target's)."""
    backend, plain = plain_outputs
    engine = make_engine(checkpoints, backend, "draft", num_kv_blocks=40)
    draft_kv = engine._speculator.drafter.model.kv
    step, held_while_waiting = engine.step, []

    def checked_step():
        outputs = step()
        held_while_waiting.extend(r.request_id for r in engine.scheduler.waiting if r.request_id in draft_kv)
        return outputs

    engine.step = checked_step
    assert run_staggered(engine, WORKLOAD) == plain
    assert engine.metrics().preemptions > 0 and engine.metrics().spec_accepted_tokens > 0
    assert not held_while_waiting
    assert_kv_pools_free(engine)


@pytest.mark.parametrize("method", METHODS)
def test_abort_mid_speculation_frees_every_block(checkpoints, method):
    engine = make_engine(checkpoints, BACKENDS[0], method)
    ids = [engine.add_request(prompt, params) for prompt, _, params in WORKLOAD[:12]]
    for _ in range(6):
        engine.step()
    assert engine.metrics().spec_drafted_tokens > 0
    for request_id in ids:
        engine.abort(request_id)
    assert_kv_pools_free(engine)  # at once
    assert {o.finish_reason for o in engine.step()} == {FinishReason.ABORT}  # the next step reports them
    assert not engine.has_unfinished()


def _target_probs(logits: np.ndarray, history: list[int], temperature: float, top_k: int, presence: float):
    """The sampler's distribution: presence penalty on output tokens, temperature, top-k."""
    x = logits.astype(np.float64).copy()
    for token in set(history):
        x[token] -= presence
    x /= temperature
    keep = np.argsort(-x, kind="stable")[:top_k]
    p = np.zeros_like(x)
    p[keep] = np.exp(x[keep] - x[keep].max())
    return p / p.sum()


@pytest.fixture(scope="module")
def tiny_vocab(tmp_path_factory):
    import torch
    import transformers

    torch.manual_seed(1)
    config = transformers.LlamaConfig(
        vocab_size=16, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    folder = tmp_path_factory.mktemp("tiny_vocab")
    model.save_pretrained(folder)
    return folder, folder  # the model drafts for itself: its argmax, accepted with probability p(argmax)


@pytest.mark.parametrize("backend", BACKENDS[:1])
def test_sampled_tokens_with_speculation_follow_the_target_distribution(tiny_vocab, backend):
    """Chi-square over (2nd, 3rd) output tokens of many seeded requests; the 3rd is often a bonus token."""
    prompt = [3, 4, 5, 6, 7]
    options = dict(temperature=1.0, top_k=3, presence_penalty=0.7)
    engine = make_engine(tiny_vocab, backend, "draft", max_num_seqs=64, max_num_batched_tokens=1024)
    draws = 3000
    for seed in range(draws):
        engine.add_request(prompt, SamplingParams(max_tokens=3, seed=seed, ignore_eos=True, **options))
    outputs = [o.token_ids for o in engine.run_until_done() if o.finished]
    metrics = engine.metrics()
    assert metrics.spec_drafted_tokens == draws and metrics.spec_accepted_tokens > 100

    model = engine.model
    p1 = _target_probs(model.forward_verify("ref", prompt)[-1], [], 1.0, 3, 0.7)
    model.release("ref")
    expected: dict[tuple[int, int], float] = {}
    for t1 in np.flatnonzero(p1):
        logits = model.forward_verify("ref", prompt + [int(t1)])[-1]
        p2 = _target_probs(logits, [t1], 1.0, 3, 0.7)
        for t2 in np.flatnonzero(p2):
            model.truncate_kv("ref", len(prompt) + 1)
            p3 = _target_probs(model.forward_verify("ref", [int(t2)])[-1], [t1, t2], 1.0, 3, 0.7)
            for t3 in np.flatnonzero(p3):
                key = (int(t2), int(t3))
                expected[key] = expected.get(key, 0.0) + p1[t1] * p2[t2] * p3[t3]
        model.release("ref")
    counts: dict[tuple[int, int], int] = {}
    for out in outputs:
        counts[out[1:3]] = counts.get(out[1:3], 0) + 1
    assert set(counts) <= set(expected)
    keys = sorted(expected, key=expected.get, reverse=True)
    big = [k for k in keys if expected[k] * draws >= 5]
    observed = [counts.get(k, 0) for k in big] + [sum(counts.get(k, 0) for k in keys if k not in big)]
    wanted = [expected[k] * draws for k in big] + [sum(expected[k] for k in keys if k not in big) * draws]
    if wanted[-1] == 0:
        observed, wanted = observed[:-1], wanted[:-1]
    assert stats.chisquare(observed, wanted).pvalue > 1e-3


def test_load_turns_speculation_on_and_outputs_stay_the_same(checkpoints):
    import ferrum

    target, draft = checkpoints
    prompts = [prompt for prompt, _, _ in WORKLOAD[:4]]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    plain = [o.token_ids for o in ferrum.load(target, backend=BACKENDS[0]).run(prompts, params)]
    for options in ({"speculative": "lookup"}, {"draft_model": draft}):
        llm = ferrum.load(target, backend=BACKENDS[0], **options)
        assert [o.token_ids for o in llm.run(prompts, params)] == plain
        assert llm.engine.metrics().spec_drafted_tokens > 0
        assert all(o.metrics.num_spec_steps > 0 for o in llm.run(prompts, params))


def test_the_off_switch_pauses_drafting_longer_after_each_bad_window():
    from ferrum.spec.adaptive import DraftGate

    gate = DraftGate(min_acceptance=0.5, window=8, max_pause=16)
    pauses = []
    for _ in range(5):
        assert gate.open()
        gate.record(8, 1)  # a bad window
        pauses.append(gate.pause)
        while not gate.open():
            pass
    assert pauses == [8, 16, 16, 16, 16]
    gate.record(8, 8)  # a good window resets the pause
    gate.record(8, 0)
    assert gate.pause == 8
    short = DraftGate(min_acceptance=0.5, window=8, max_pause=2)  # a cap under the first pause holds from the first
    short.record(8, 1)
    assert short.pause == 2


def test_speculation_settings_are_taken_as_given_or_refused_before_loading(checkpoints, monkeypatch):
    """An engine_config's own SpeculativeConfig is kept beside a draft model (its knobs were replaced by the
    defaults); a draft model for another method, a speculative of another type, a config field of another type
    and the target itself as its own draft are refused by name; those ferrum.load can judge, before any weights
    load (a draft model was loaded to sit unused, a wrong type failed after loading with AttributeError)."""
    import ferrum
    from ferrum.engine import EngineConfig
    from ferrum.errors import InvalidRequestError
    from ferrum.spec import SpeculativeConfig

    target, draft = checkpoints
    own = SpeculativeConfig("draft", num_speculative_tokens=7, min_acceptance=0.1)
    llm = ferrum.load(target, backend=BACKENDS[0], engine_config=EngineConfig(speculative=own), draft_model=draft)
    assert llm.engine.config.speculative == own
    monkeypatch.setattr(DecoderOnlyLLM, "from_pretrained", lambda *a, **k: pytest.fail("weights were loaded"))
    for options, words in (({"speculative": "lookup", "draft_model": draft}, "draft model drafts with .* 'draft'"),
                           ({"speculative": 5}, "speculative must be one of"),
                           ({"speculative": ""}, "method must be one of"),
                           ({"speculative": "draft"}, "method 'draft' needs a draft model"),
                           ({"engine_config": EngineConfig(speculative=own)}, "method 'draft' needs a draft model")):
        with pytest.raises(InvalidRequestError, match=words):
            ferrum.load(target, backend=BACKENDS[0], **options)
    for bad in ({"min_acceptance": "0.5"}, {"min_acceptance": True}, {"prompt_lookup_max": True}):
        with pytest.raises(InvalidRequestError, match=next(iter(bad))):
            SpeculativeConfig(**bad)
    with pytest.raises(InvalidRequestError, match="speculative must be a SpeculativeConfig"):
        EngineConfig(speculative="lookup")
    model = llm.engine.model
    with pytest.raises(InvalidRequestError, match="target model itself"):
        Engine(LlmExecutor(model), None, EngineConfig(speculative=own), draft_model=model)
    with pytest.raises(InvalidRequestError, match="draft model drafts with speculative method 'draft' only, not None"):
        Engine(LlmExecutor(model), None, EngineConfig(), draft_model=llm.engine._speculator.drafter.model)


def test_bench_speculative_reports_both_prompt_sets(checkpoints, tmp_path, monkeypatch):
    import ferrum

    monkeypatch.setenv("FERRUM_CACHE_DIR", str(tmp_path))
    from ferrum.bench.speculative import format_speculative, run_speculative, truncated_copy

    target, _ = checkpoints
    llm = ferrum.load(target, backend=BACKENDS[0], num_kv_blocks=512)
    result = run_speculative(llm, "lookup", None, gen_len=16, concurrency=2, repeat=1, log=lambda line: None)
    assert [(r["prompts"], r["concurrency"]) for r in result["rows"]] == [
        ("repeat", 1), ("repeat", 2), ("free", 1), ("free", 2)]
    assert "speed-up" in format_speculative(result)
    copy = truncated_copy(target, 2)
    assert DecoderOnlyLLM.from_pretrained(copy, backend=BACKENDS[0]).config.num_layers == 2


@pytest.mark.skipif("mlx" not in BACKENDS, reason="the MLX backend cannot run here")
def test_bench_speculative_draft_on_mlx_runs_mlx_lm_with_the_same_draft_model(checkpoints, tmp_path, monkeypatch):
    import ferrum

    monkeypatch.setenv("FERRUM_CACHE_DIR", str(tmp_path))
    from ferrum.bench.speculative import format_speculative, run_speculative

    target, draft = checkpoints
    llm = ferrum.load(target, backend="mlx", num_kv_blocks=256)
    result = run_speculative(llm, "draft", draft, gen_len=12, concurrency=2, repeat=1, log=lambda line: None)
    peers = [(r["prompts"], r["concurrency"]) for r in result["rows"] if "mlx_lm_spec_decode_tok_s" in r]
    assert peers == [("repeat", 1), ("free", 1)]  # batch 1 only: mlx-lm cannot batch speculative requests
    assert all(r["mlx_lm_spec_decode_tok_s"] > 0 for r in result["rows"] if "mlx_lm_spec_decode_tok_s" in r)
    assert "ferrum/mlx-lm" in format_speculative(result)
