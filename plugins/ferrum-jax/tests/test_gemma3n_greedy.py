"""Gemma 3n through the JAX backend: the numpy backend's greedy tokens."""

from __future__ import annotations

import ferrum
from ferrum.random_checkpoint import write_random_checkpoint

#: Gemma 3n E2B's layout: AltUp's four copies, Laurel, per-layer inputs (a table of fewer rows than the vocabulary),
#: the last three layers reading layers 2, 4 and 2's keys and values, a width per layer, sparse first gates.
GEMMA3N = dict(
    architectures=["Gemma3nForCausalLM"], model_type="gemma3n_text", hidden_size=64,
    intermediate_size=[80] * 4 + [96] * 4, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=101, vocab_size_per_layer_input=96, hidden_size_per_layer_input=16,
    num_kv_shared_layers=3, sliding_window=6, laurel_rank=8,
    activation_sparsity_pattern=[0.95, 0.9, 0.0, 0.95, 0.0, 0.0, 0.0, 0.0],
    layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2 + ["sliding_attention",
                                                                                   "full_attention"],
    max_position_embeddings=256, tie_word_embeddings=True, rms_norm_eps=1e-6,
)
PROMPTS = [[5, 17, 42, 8, 99, 3, 61], [7], [12, 30, 30, 4, 88, 2, 19, 45, 70, 11, 6, 23, 50]]


def _greedy(folder, backend: str) -> list[tuple[int, ...]]:
    llm = ferrum.load(folder, backend=backend, dtype="float32")
    return [out.token_ids for out in llm.run(PROMPTS, max_tokens=16, temperature=0.0, ignore_eos=True)]


def test_gemma3n_greedy_tokens_equal_the_cpu_backends(tmp_path):
    folder = write_random_checkpoint(tmp_path / "gemma3n", GEMMA3N, dtype="float32", std=0.2, seed=3)
    assert _greedy(folder, "jax") == _greedy(folder, "cpu")
