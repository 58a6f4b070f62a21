"""End to end through Ferrum's public API: the JAX backend generates the numpy backend's tokens."""

from __future__ import annotations

import ferrum
from ferrum.random_checkpoint import write_random_checkpoint

#: Llama-like with GQA 4:2, odd sizes, tied embeddings.
CONFIG = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=96, intermediate_size=80,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
    max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
)
PROMPTS = [[5, 17, 42, 8, 99, 3, 61], [7], [12, 30, 30, 4, 88, 2, 19, 45, 70, 11, 6, 23, 50]]


def _greedy(folder, backend: str) -> list[tuple[int, ...]]:
    llm = ferrum.load(folder, backend=backend, dtype="float32")
    outputs = llm.run(PROMPTS, max_tokens=24, temperature=0.0, ignore_eos=True)
    return [out.token_ids for out in outputs]


def test_greedy_tokens_equal_the_cpu_backends(tmp_path):
    folder = write_random_checkpoint(tmp_path / "tiny", CONFIG, dtype="float32", std=0.2, seed=3)
    got, want = _greedy(folder, "jax"), _greedy(folder, "cpu")
    assert [len(t) for t in got] == [24, 24, 24]
    assert got == want
