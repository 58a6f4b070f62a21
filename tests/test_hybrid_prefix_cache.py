"""Prefix caching for hybrid models (Qwen3.5's Gated DeltaNet, Granite 4.0-H's Mamba-2): recurrent states kept at
block boundaries (ferrum.recurrent.snapshots), matches cut back to them, and every token served from them equal to
the ones computed from scratch (transformers' logits at the model, an engine without the cache above it), on every
runnable backend."""

from __future__ import annotations

import numpy as np
import pytest
import transformers

from ferrum.errors import InvalidRequestError
from ferrum.executor import LlmExecutor
from ferrum.model import DecoderOnlyLLM, ForwardItem
from support import build_transformers_model, reference_logits, runnable_backends, scaled_error

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
}


def tokens(seed: int, n: int) -> list[int]:
    return [int(t) for t in np.random.RandomState(seed).randint(0, VOCAB, size=n)]


A = tokens(1, 18)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name, make in CONFIGS.items():
        folder = tmp_path_factory.mktemp(name)
        out[name] = folder, build_transformers_model(folder, make())
    return out


def load(folder, backend="cpu", blocks=128) -> DecoderOnlyLLM:
    return DecoderOnlyLLM.from_pretrained(folder, backend=backend, dtype="float32", num_kv_blocks=blocks,
                                          block_size=BS)


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
