"""Qwen3.5 (``qwen3_5_text``, its wrapper ``qwen3_5``): Gated DeltaNet layers carrying a state per sequence between
gated full-attention layers, against transformers (and mlx-lm's conversion against mlx-lm) on every runnable
backend; and what the engine does with a model whose cache cannot be cut back (its prefix cache:
tests/test_hybrid_prefix_cache.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

import ferrum
from ferrum.errors import AdapterError, UnsupportedFeatureError
from ferrum.recurrent.state import RecurrentStates
from ferrum.sampling import SamplingParams
from support import (
    float32_model, small_pool_engine,
    assert_a_failed_pass_leaves_every_state_as_it_was, assert_a_mixed_batch_gives_each_sequence_its_own_logits,
    assert_engine_keeps_greedy_tokens, assert_forward_and_decode_match, build_transformers_model, mlx_lm_logits,
    reference_logits, runnable_backends, scaled_error, staggered_greedy_workload, write_tokenizer,
)

BACKENDS = runnable_backends()
VOCAB = 300
TOKENS = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, size=13)]


def text_config(**extra) -> transformers.Qwen3_5TextConfig:
    """Two value heads per key head, head dims unlike the attention's, the last layer a Gated DeltaNet one."""
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=80, num_hidden_layers=5, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=8,
                    linear_value_head_dim=12, linear_num_key_heads=2, linear_num_value_heads=4,
                    max_position_embeddings=512, tie_word_embeddings=False, full_attention_interval=2)
    return transformers.Qwen3_5TextConfig(**{**settings, **extra})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3_5")
    hf = build_transformers_model(folder, text_config())
    write_tokenizer(folder, VOCAB)
    return folder, hf


def test_reads_layer_kinds_partial_rope_and_zero_centred_norms(checkpoint):
    model = float32_model(checkpoint[0])
    arch = model.config.arch
    assert [spec.mixer for spec in arch.layers] == ["gated_delta", "attention"] * 2 + ["gated_delta"]
    assert arch.layers[1].rope.rotary_dim == 4 and arch.norm_offset == 1.0 and arch.attn_output_gate
    assert sorted(model.states.layers) == [0, 2, 4]


def test_the_kv_pool_holds_the_attention_layers_alone(checkpoint):
    """Three of the five layers are recurrent and attend nothing: the KV pool has two layers, not five."""
    model = float32_model(checkpoint[0])
    assert len(model.pool.k) == len(model.pool.v) == 2
    assert model.config.arch.kv_layers == (None, 0, None, 1, None)
    per_layer = 2 * model.config.num_kv_heads * model.config.head_dim * 4 * model.kv_capacity()
    assert model.kv_bytes() == 2 * per_layer


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_and_decode_steps_match_transformers(checkpoint, backend):
    folder, hf = checkpoint
    assert_forward_and_decode_match(float32_model(folder, backend), TOKENS, reference_logits(hf, TOKENS))


def test_a_state_commit_that_keeps_stale_states_is_caught(checkpoint, monkeypatch):
    """The decode check above fails where the states are not carried from one pass to the next (a commit that
    keeps each sequence's first states), and a commit that keeps none is refused by name."""
    folder, hf = checkpoint

    def first_only(self):
        for seq_id, layers in self._pending.items():
            self._rows.setdefault(seq_id, layers)
        self._pending.clear()

    monkeypatch.setattr(RecurrentStates, "commit", first_only)
    with pytest.raises(AssertionError):
        assert_forward_and_decode_match(float32_model(folder), TOKENS, reference_logits(hf, TOKENS))
    monkeypatch.setattr(RecurrentStates, "commit", RecurrentStates.discard)
    with pytest.raises(UnsupportedFeatureError, match="recurrent layers have no state"):
        assert_forward_and_decode_match(float32_model(folder), TOKENS, reference_logits(hf, TOKENS))


def test_a_failed_pass_leaves_every_state_as_it_was(checkpoint, monkeypatch):
    """A batch that fails in its last recurrent layer, after the first ones made new states, changes nothing: both
    sequences then decode as if it never ran."""
    folder, hf = checkpoint
    assert_a_failed_pass_leaves_every_state_as_it_was(float32_model(folder), hf, TOKENS, "gated_delta_rule",
                                                      monkeypatch)


def test_a_mixed_batch_gives_each_sequence_its_own_logits(checkpoint):
    folder, hf = checkpoint
    assert_a_mixed_batch_gives_each_sequence_its_own_logits(float32_model(folder), hf, VOCAB)


def test_a_released_sequence_id_starts_from_a_fresh_state(checkpoint):
    folder, hf = checkpoint
    model = float32_model(folder)
    model.prefill("s", TOKENS[::-1])
    model.release("s")
    assert scaled_error(model.prefill("s", TOKENS), reference_logits(hf, TOKENS)[-1]) <= 1e-4
    model.kv.release("s")  # as the engine's scheduler releases a finished or preempted request: KV only
    assert scaled_error(model.prefill("s", TOKENS[:7]), reference_logits(hf, TOKENS[:7])[-1]) <= 1e-4


def test_the_cache_cannot_be_cut_back(checkpoint):
    model = float32_model(checkpoint[0])
    model.prefill("s", TOKENS)
    model.truncate_kv("s", len(TOKENS))  # to its own length: nothing to undo
    with pytest.raises(UnsupportedFeatureError, match="cannot be cut back"):
        model.truncate_kv("s", 5)
    assert model.kv.length("s") == len(TOKENS)


def test_speculative_decoding_and_lora_are_refused_up_front(checkpoint, tmp_path):
    folder, _ = checkpoint
    with pytest.raises(UnsupportedFeatureError, match="speculative decoding cannot run 'qwen3_5_text'"):
        ferrum.load(folder, backend="cpu", speculative="lookup")
    with pytest.raises(AdapterError, match=r"recurrent layers are not supported yet \(Ferrum does not adapt the "
                       r"Gated DeltaNet layers' projections nor the gated attention's q_proj"):
        float32_model(folder).adapters.load("x", tmp_path)


def test_a_recurrent_draft_model_is_refused_up_front(checkpoint, tmp_path):
    """A hybrid draft (Qwen3.5-0.8B for a larger target) would fail at its first rejected draft, which its state
    cannot be rolled back past: refused when the engine is built, not mid-request."""
    target = tmp_path / "target"
    build_transformers_model(target, transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128))
    write_tokenizer(target, VOCAB)
    with pytest.raises(UnsupportedFeatureError, match="the draft model .'qwen3_5_text'. has recurrent layers"):
        ferrum.load(target, backend="cpu", speculative="draft", draft_model=checkpoint[0])


def test_prefix_caching_off_keeps_no_states_and_reuses_nothing(checkpoint):
    """The option stays: with it off (or no memory for the states) a repeated prompt is computed in full. (With it on,
    tests/test_hybrid_prefix_cache.py.)"""
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    for engine in (small_pool_engine(checkpoint[0], enable_prefix_caching=False),
                   small_pool_engine(checkpoint[0], prefix_state_bytes=0)):
        outs = []
        for _ in range(2):
            engine.add_request(TOKENS * 2, params)
            outs += [o.token_ids for o in engine.run_until_done() if o.finished]
        assert outs[0] == outs[1] and engine.metrics().prefix_cache_hit_tokens == 0
        assert engine.model.snapshots.count == 0 and not engine.scheduler.stop_at_state_boundaries


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_batching_chunking_and_preemption_give_each_requests_greedy_tokens(checkpoint, backend):
    folder, hf = checkpoint
    assert_engine_keeps_greedy_tokens(lambda **config: small_pool_engine(folder, backend, **config), hf,
                                      staggered_greedy_workload(VOCAB))


def _wrapped(folder, destination):
    """The checkpoint as transformers saves Qwen3.5's multimodal wrapper (no vision weights)."""
    destination.mkdir()
    text = {**json.loads((folder / "config.json").read_text()), "full_attention_interval": 2}  # mlx-lm's key
    raw = transformers.Qwen3_5Config(text_config=text, vision_config=dict(depth=1, hidden_size=32, num_heads=2,
                                                                          intermediate_size=32, out_hidden_size=64))
    (destination / "config.json").write_text(json.dumps(raw.to_dict()))
    tensors = {name.replace("model.", "model.language_model.", 1): array
               for name, array in load_file(folder / "model.safetensors").items()}
    save_file(tensors, destination / "model.safetensors", metadata={"format": "pt"})
    write_tokenizer(destination, VOCAB)
    return destination


def test_the_multimodal_wrapper_runs_its_text_model(checkpoint, tmp_path):
    folder, hf = checkpoint
    model = float32_model(_wrapped(folder, tmp_path / "wrapped"))
    assert model.config.model_type == "qwen3_5_text"
    assert scaled_error(model.forward_verify("w", TOKENS), reference_logits(hf, TOKENS)) <= 1e-4


@pytest.mark.skipif("mlx" not in BACKENDS, reason="the MLX backend cannot run here")
def test_mlx_lm_conversions_load(checkpoint, tmp_path):
    """mlx-lm's conversion stores the convolution [C, K, 1] and the zero-centred norms shifted by one: it runs on
    every backend as mlx-lm runs it."""
    from mlx_lm.convert import convert

    folder, hf = checkpoint
    converted = tmp_path / "mlx"
    convert(str(_wrapped(folder, tmp_path / "hf")), str(converted))
    stored = load_file(converted / "model.safetensors")
    assert stored["language_model.model.layers.0.linear_attn.conv1d.weight"].shape[-1] == 1
    want = mlx_lm_logits(converted, TOKENS)
    assert scaled_error(want, reference_logits(hf, TOKENS)) <= 1e-4
    for backend in BACKENDS:
        assert scaled_error(float32_model(converted, backend).forward_verify("m", TOKENS), want) <= 1e-4, backend
