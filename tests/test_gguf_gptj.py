"""GGUF import of GPT-J (``gptj``), which llama.cpp names and maps but neither converts nor runs: tiny random
transformers GPT-Js written with the GGUF spec's gptj keys under gguf's tensor map (q/k rows as the checkpoint has
them, rope over rope.dimension_count of each head), imported, and run against transformers (float32 files) or the
same file imported in float32 (Q8_0); a control shows the row order counts, and what transformers' GPT-J has no
setting for is refused by name."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from ferrum.errors import UnsupportedFeatureError  # noqa: E402
from ferrum.gguf_import import architectures, convert_gguf  # noqa: E402
from gguf_writer import (  # noqa: E402
    add_sentencepiece_vocab, add_tensors, assert_logits_match, finish, imported, sentencepiece_vocab,
)
from test_gguf_dense_families2 import _mapped, _spread  # noqa: E402

Q = gguf.GGMLQuantizationType


def _tiny_gptj(n_inner: int | None) -> Any:
    """A random float32 GPT-J over the test vocabulary: 64 wide, 4 heads of 16, rope on the first 8 dims of each."""
    config = transformers.GPTJConfig(vocab_size=len(sentencepiece_vocab()[0]), n_embd=64, n_head=4, n_layer=2,
                                     n_inner=n_inner, rotary_dim=8, n_positions=128, bos_token_id=1, eos_token_id=2,
                                     pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    _spread(hf)
    return hf


def _gptj_gguf(tmp_path, hf, qtype, more: Callable[[Any], None] = lambda w: None) -> None:
    """``hf`` in a gptj file: the spec's keys (the MLP's width only where the config sets n_inner), gguf's tensor
    names, matrices as ``qtype``; ``more`` adds metadata."""
    config = hf.config
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "gptj")
    w.add_context_length(config.n_positions)
    w.add_embedding_length(config.n_embd)
    w.add_block_count(config.n_layer)
    w.add_head_count(config.n_head)
    w.add_rope_dimension_count(config.rotary_dim)
    w.add_layer_norm_eps(config.layer_norm_epsilon)
    if config.n_inner is not None:
        w.add_feed_forward_length(config.n_inner)
    more(w)
    add_sentencepiece_vocab(w)
    add_tensors(w, _mapped(hf, config, "gptj"), qtype)
    finish(w)


@pytest.mark.parametrize(("qtype", "n_inner"), [(Q.F32, None), (Q.F32, 96), (Q.Q8_0, None)],
                         ids=["F32", "F32-n_inner", "Q8_0"])
def test_gptj_gguf_matches_the_model_it_was_written_from(tmp_path, qtype, n_inner):
    hf = _tiny_gptj(n_inner)
    _gptj_gguf(tmp_path, hf, qtype)
    ours = imported(tmp_path, hf, qtype)
    rope = ours.arch.layers[0].rope
    assert ours.model_type == "gptj" and ours.intermediate_size == (n_inner or 256)
    assert (rope.rotary_dim, rope.interleaved, rope.theta) == (8, True, 10000.0) and ours.arch.lm_head_bias


def test_gptj_gguf_read_with_llamas_rows_misses_transformers(tmp_path, monkeypatch):
    """Control: the same file with its q/k rows un-permuted as Llama's (which llama.cpp's converter permutes; GPT-J
    rotates adjacent pairs as stored) misses transformers' logits."""
    hf = _tiny_gptj(None)
    _gptj_gguf(tmp_path, hf, Q.F32)
    monkeypatch.setitem(architectures.ARCHITECTURES, "gptj",
                        replace(architectures.ARCHITECTURES["gptj"], permuted_qk=True))
    with pytest.raises(AssertionError):
        assert_logits_match(hf, convert_gguf(tmp_path / "m.gguf", tmp_path / "out"))


@pytest.mark.parametrize(("more", "words"), [
    (lambda w: w.add_rope_freq_base(500000.0), "gptj.rope.freq_base 500000.0 is not supported"),
    (lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR), w.add_rope_scaling_factor(2.0)),
     "linear rope scaling in a gptj file"),
    (lambda w: w.add_head_count_kv(2), "2 key/value heads for 4 query heads"),
], ids=["base", "scaling", "kv-heads"])
def test_a_gptj_gguf_transformers_cannot_run_is_refused(tmp_path, more, words):
    _gptj_gguf(tmp_path, _tiny_gptj(None), Q.F32, more)
    with pytest.raises(UnsupportedFeatureError, match=words):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
