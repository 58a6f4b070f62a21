"""Prefix caching for hybrid models (Qwen3.5's Gated DeltaNet, Granite 4.0-H's Mamba-2, LFM2's short convolutions):
recurrent states kept at block boundaries (ferrum.recurrent.snapshots), matches cut back to them, and every token
served from them equal to the ones computed from scratch (transformers' logits at the model, an engine without the
cache above it), on every runnable backend."""

from __future__ import annotations

import numpy as np
import pytest
import transformers

from ferrum.engine import Engine, EngineConfig
from ferrum.errors import InvalidRequestError
from ferrum.executor import LlmExecutor
from ferrum.model import DecoderOnlyLLM, ForwardItem
from ferrum.recurrent.snapshots import DEFAULT_BUDGET
from ferrum.sampling import SamplingParams
from support import built_checkpoints, reference_logits, run_staggered, runnable_backends, scaled_error

BACKENDS = runnable_backends()
VOCAB = 300
BS = 4  # KV block size: boundaries every 4 tokens
CONFIGS = {
    "qwen3_5": lambda: transformers.Qwen3_5TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=80, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=12,
        linear_num_key_heads=2, linear_num_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False,
        full_attention_interval=2),
    "granite": lambda: transformers.GraniteMoeHybridConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, layer_types=["mamba", "attention", "mamba", "mamba"], mamba_n_heads=8,
        mamba_d_state=16, mamba_d_head=16, mamba_d_conv=4, mamba_expand=2, shared_intermediate_size=40,
        num_local_experts=0, mamba_n_groups=2, position_embedding_type="nope", max_position_embeddings=256,
        tie_word_embeddings=False),
    "lfm2": lambda: transformers.Lfm2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=100, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, conv_L_cache=3, block_multiple_of=16,
        layer_types=["conv", "full_attention", "conv", "conv"]),
}


def tokens(seed: int, n: int) -> list[int]:
    return [int(t) for t in np.random.RandomState(seed).randint(0, VOCAB, size=n)]


A = tokens(1, 18)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return built_checkpoints(tmp_path_factory, CONFIGS)


def load(folder, backend="cpu", blocks=128) -> DecoderOnlyLLM:
    """The model with the engine's default budget for kept states (alone it keeps none)."""
    model = DecoderOnlyLLM.from_pretrained(folder, backend=backend, dtype="float32", num_kv_blocks=blocks,
                                           block_size=BS)
    model.snapshots.budget = DEFAULT_BUDGET
    return model


def engine(folder, backend="cpu", blocks=128, **config) -> Engine:
    return Engine(LlmExecutor(load(folder, backend, blocks)), None, EngineConfig(**config))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", CONFIGS)
def test_a_sequence_started_from_a_kept_state_computes_transformers_logits(checkpoints, family, backend):
    folder, hf = checkpoints[family]
    model = load(folder, backend)
    model.prefill("a", A[:16])  # a prompt chunk ending on a boundary: its state is kept under block 3's key
    prompt = A[:16] + tokens(2, 6)
    match = model.kv.match_prefix(prompt)
    assert match.num_tokens == 16 and model.snapshots.count == 1
    model.kv.adopt("b", prompt, match)
    out = model.forward([ForwardItem("b", prompt[16:], 16)], all_logits=True)
    want = reference_logits(hf, prompt)
    assert scaled_error(model.ops.to_numpy(out.logits), want[16:]) <= 1e-4
    assert scaled_error(model.decode("b", 7, len(prompt)), reference_logits(hf, prompt + [7])[-1]) <= 1e-4


def test_the_model_alone_keeps_no_state(checkpoints):
    model = DecoderOnlyLLM.from_pretrained(checkpoints["qwen3_5"][0], backend="cpu", num_kv_blocks=16, block_size=BS)
    model.prefill("a", A[:16])
    assert model.snapshots.count == 0 and model.kv.match_prefix(A).num_tokens == 0


def test_a_match_is_cut_back_to_its_last_kept_state(checkpoints):
    """Blocks 0-1 are cached but no state at their ends is: the match is empty, not a start from zeros."""
    model = load(checkpoints["qwen3_5"][0])
    model.prefill("a", A[:10])  # ends inside block 2: nothing kept
    assert model.kv.num_cached_blocks == 2 and model.snapshots.count == 0
    assert model.kv.match_prefix(A[:10] + [5]).num_tokens == 0
    model.prefill("b", A[:12])  # keeps the state after 12 tokens, not after 4 or 8
    assert [model.kv.match_prefix(A[:n] + [5]).num_tokens for n in (7, 11, 12, 16)] == [0, 0, 12, 12]


def test_the_salt_keys_the_states_too(checkpoints):
    """States are kept under block keys, which chain from the salt (a LoRA adapter's digest): another salt
    matches nothing."""
    model = load(checkpoints["qwen3_5"][0])
    model.prefill("a", A[:16])
    assert model.kv.match_prefix(A).num_tokens == 16 and model.kv.match_prefix(A, salt=b"lora").num_tokens == 0


def test_a_kept_state_is_one_row_and_counted(checkpoints):
    """Two sequences in one pass: each keeps its own row, not the batch's arrays; the executor reports them."""
    model = load(checkpoints["qwen3_5"][0])
    model.forward([ForwardItem("a", A[:8], 0), ForwardItem("b", A[8:16], 0)])
    snapshots = model.snapshots
    assert snapshots.count == 2
    for state in snapshots._kept.values():
        arrays = [model.ops.to_numpy(a) for parts in state.values() for a in parts]
        assert all(a.shape[0] == 1 for a in arrays)
        assert sum(a.nbytes for a in arrays) == snapshots.state_bytes
    status = LlmExecutor(model).status()
    assert (status.state_snapshots, status.state_snapshot_bytes) == (2, 2 * snapshots.state_bytes)
    assert status.memory_in_use_bytes >= model.weight_bytes + 2 * snapshots.state_bytes


def test_a_match_whose_state_was_dropped_is_refused(checkpoints):
    model = load(checkpoints["qwen3_5"][0])
    model.prefill("a", A[:16])
    match = model.kv.match_prefix(A)
    model.snapshots.reset()
    with pytest.raises(InvalidRequestError, match="stale prefix match"):
        model.kv.adopt("b", A, match)
    assert "b" not in model.kv


def chat_prompts(reply: list[int]) -> list[tuple[list[int], int]]:
    """(prompt, prompt tokens the cache serves) after A ran: shares ending on a boundary, one token past it, none,
    one whose blocks are cached without a state, the next turn of a chat (A and its reply), A's first 16 again."""
    return [
        (A[:12] + tokens(3, 8), 12),  # a kept chunk end (the boundary before the last)
        (A[:13] + tokens(4, 7), 12),  # one token past it
        (A[:17] + tokens(5, 5), 16),  # the last boundary before A's end
        (tokens(6, 15), 0),  # nothing shared
        (A[:10] + tokens(7, 10), 0),  # blocks 0-1 cached, no state at 4 or 8
        (A + reply + tokens(8, 6), 20),  # the next turn: A's state at the last boundary it decoded past
        (A[:16], 12),  # a prompt ending on a boundary leaves its last token to compute: the block before
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", CONFIGS)
def test_chat_turns_served_from_kept_states_give_the_tokens_computed_from_scratch(checkpoints, family, backend):
    folder, _ = checkpoints[family]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    # overlapping steps where the backend can (the tokens a boundary's key needs reach the host a step late)
    cached, fresh = engine(folder, backend, async_stepping=True), engine(folder, backend, enable_prefix_caching=False)

    def run(eng, prompt):
        eng.add_request(prompt, params)
        return next(o for o in eng.run_until_done() if o.finished)

    first = run(cached, A)
    assert first.token_ids == run(fresh, A).token_ids and first.metrics.num_cached_tokens == 0
    for prompt, hit in chat_prompts(list(first.token_ids)):
        got = run(cached, prompt)
        assert got.token_ids == run(fresh, prompt).token_ids, (len(prompt), hit)
        assert got.metrics.num_cached_tokens == hit, (len(prompt), hit)
    assert fresh.metrics().prefix_cache_hit_tokens == 0


def shared_prefix_workload(n: int = 8) -> list:
    prefix = tokens(9, 14)
    return [(prefix + tokens(10 + i, 3 + i % 5), i // 2, SamplingParams(max_tokens=4 + i % 3, ignore_eos=True))
            for i in range(n)]


def test_states_held_for_decoding_sequences_stay_within_the_budget(checkpoints):
    """Each sequence decoding past a boundary holds a copy of its state until it is released; those copies count
    against the budget with the kept ones (eight concurrent sequences, a budget of two states). They were held for
    every running sequence whatever the budget (50 MB each for Qwen3.5-9B)."""
    folder, _ = checkpoints["qwen3_5"]
    probe = engine(folder, enable_prefix_caching=False)
    budget = 2 * probe.model.snapshots.state_bytes
    eng = engine(folder, prefix_state_bytes=budget, max_num_seqs=8)
    for i in range(8):
        eng.add_request(tokens(40 + i, 5), SamplingParams(max_tokens=3 * BS + 1, ignore_eos=True))
    held = []
    while eng.has_unfinished():
        eng.step()
        held.append(eng.model.snapshots.nbytes + eng.model.snapshots.pending_bytes)
    assert max(held) == budget  # used up to the budget, never past it


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_requests_sharing_a_prefix(checkpoints, backend):
    """Requests arriving while others prefill and decode the same prefix, in small chunks: the later ones start
    from the state the first kept, each with the tokens it gets from scratch."""
    folder, _ = checkpoints["qwen3_5"]
    workload = shared_prefix_workload()
    cached = engine(folder, backend, max_num_batched_tokens=8, max_num_seqs=6)
    got = run_staggered(cached, workload)
    want = run_staggered(engine(folder, backend, enable_prefix_caching=False), workload)
    assert got == want and cached.metrics().prefix_cache_hit_tokens >= 12 * (len(workload) - 2)


@pytest.mark.parametrize("family", CONFIGS)
def test_preemption_and_tight_budgets_keep_the_tokens(checkpoints, family):
    """A KV pool too small for all (preemption, cached blocks overwritten with their states) and a budget of one
    state (the least recently used dropped): the same tokens; no state outlives its block or the budget."""
    folder, _ = checkpoints[family]
    workload = shared_prefix_workload(10)
    want = run_staggered(engine(folder, enable_prefix_caching=False), workload)
    tight_pool = engine(folder, blocks=14, max_num_batched_tokens=16, max_num_seqs=8)
    state = tight_pool.model.snapshots.state_bytes
    one_state = engine(folder, prefix_state_bytes=state, max_num_batched_tokens=8, max_num_seqs=4)
    for eng in (tight_pool, one_state):
        assert run_staggered(eng, workload) == want
        snapshots = eng.model.snapshots
        assert all(eng.model.kv.is_cached(key) for key in snapshots._kept)
        assert snapshots.nbytes <= eng.config.prefix_state_bytes
        assert eng.metrics().prefix_cache_hit_tokens > 0
    assert tight_pool.metrics().preemptions > 0 and one_state.model.snapshots.count == 1
