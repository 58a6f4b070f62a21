"""Tiny GGUF files as llama.cpp's converters write them, and the checks every GGUF import test makes of them.

One copy for tests/test_gguf_*.py: a writer with a config's sizes and a small sentencepiece vocabulary, tensors
added float32 or blocked by gguf, the converter's q/k permutation, a tiny random transformers model to write, the
token ids logits are compared on, Ferrum's logits of an imported folder, and the checks that an import gives the
model's logits and that a quantized file runs as its float import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from ferrum.gguf_import import convert_gguf  # noqa: E402
from support import scaled_error  # noqa: E402

Q = gguf.GGMLQuantizationType

#: Token ids a tiny model's logits are compared on (past a 4- or 6-token window).
TINY_TOKENS = [5, 77, 100, 42, 9, 200, 13, 60, 7, 261, 33, 90]


def sentencepiece_vocab() -> tuple[list[str], list[int], list[float]]:
    """A small Llama-2-style sentencepiece vocabulary: <unk> <s> </s>, the 256 byte pieces, then pieces scored
    by rank (the way sentencepiece writes them), with a control token inside."""
    pieces = ["\u2581", "h", "e", "l", "o", "w", "r", "d", "1", "2", "\u2581h", "he", "ll", "\u2581he", "llo",
              "\u2581hello", "\u2581w", "or", "ld", "\u2581wor", "\u2581world", "\u2581\u2581", "\u25811", "12",
              "\u2581lo", "[INST]"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [3 if p == "[INST]" else 1 for p in pieces]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tokens, types, scores


#: 120 seeded token ids over :func:`sentencepiece_vocab`: long enough for a llama3 rope's low frequencies and
#: sliding windows to matter.
LONG_TOKENS = [int(t) for t in np.random.RandomState(3).randint(0, len(sentencepiece_vocab()[0]), size=120)]


def config_writer(path: Path, arch: str, config, extra_blocks: int = 0, kv_heads: int | None = None) -> Any:
    """A GGUF writer of ``arch`` with what every llama.cpp conversion writes of ``config`` (sizes, rope base,
    norm epsilon) and the sentencepiece vocabulary of :func:`sentencepiece_vocab`; tensors are the caller's
    (``extra_blocks``: blocks the converter appends after the decoder's, GLM-4.5's next-token prediction;
    ``kv_heads``: the key/value head count written where it is not the config's)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config.num_hidden_layers + extra_blocks)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads if kv_heads is None else kv_heads)
    w.add_rope_freq_base(config.rope_parameters.get("full_attention", config.rope_parameters)["rope_theta"])
    if hasattr(config, "rms_norm_eps"):
        w.add_layer_norm_rms_eps(config.rms_norm_eps)
    else:  # a LayerNorm family (OLMo's fixes 1e-5, which its converter writes)
        w.add_layer_norm_eps(next((getattr(config, key) for key in ("layer_norm_eps", "norm_epsilon", "norm_eps")
                                   if getattr(config, key, None)), 1e-5))
    add_sentencepiece_vocab(w)
    return w


def add_sentencepiece_vocab(w: Any) -> None:
    """:func:`sentencepiece_vocab` as llama.cpp's conversions write a sentencepiece vocabulary, BOS 1 and EOS 2."""
    tokens, token_types, scores = sentencepiece_vocab()
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


def finish(w: Any) -> None:
    """The header, metadata and tensors written, the file closed."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def add_metadata(w: Any, meta: dict[str, Any]) -> None:
    """Each of ``meta``'s keys through the writer's ``add_<key>``; a None value is not written (a file without it)."""
    for key, value in meta.items():
        if value is not None:
            getattr(w, f"add_{key}")(value)


def add_tensor(w: Any, name: str, array: np.ndarray, qtype, kept_float: tuple[str, ...] = ()) -> None:
    """``array`` added to ``w`` as GGUF tensor ``name``: a matrix (or stack) whose rows gguf blocks as ``qtype``,
    anything else, or a name holding one of ``kept_float`` (what llama.cpp's converter keeps float), float32."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    if qtype == Q.F32 or array.ndim < 2 or array.shape[-1] % 32 or any(part in name for part in kept_float):
        w.add_tensor(name, array)
    else:
        flat = gguf.quants.quantize(array.reshape(-1, array.shape[-1]), qtype)
        w.add_tensor(name, flat.reshape(*array.shape[:-1], -1), raw_dtype=qtype)


def add_tensors(w: Any, tensors: dict[str, np.ndarray], qtype) -> None:
    """``tensors`` (GGUF names) added to ``w`` by :func:`add_tensor`."""
    for name, array in tensors.items():
        add_tensor(w, name, array, qtype)


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter permutation (convert_hf_to_gguf.py LlamaModel.permute)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def ferrum_logits(folder: Path, tokens: list[int]) -> np.ndarray:
    """The numpy backend's logits of the checkpoint at ``folder`` over ``tokens`` in one pass."""
    import ferrum

    return ferrum.load(folder, backend="cpu").model.forward_verify("s", tokens)


def assert_runs_as_its_float_import(gguf: Path, packed: Path, floats: Path) -> np.ndarray:
    """A quantized file's import (kept packed, ``packed``) gives the logits its float32 import (into ``floats``)
    gives, within Q8_0's and the packed kernels' rounding; returns the packed import's logits."""
    convert_gguf(gguf, floats, dequantize_to="float32")
    got, ref = (ferrum_logits(f, TINY_TOKENS) for f in (packed, floats))
    assert float(np.abs(got - ref).max()) <= 1e-4 * max(1.0, float(np.abs(ref).max()))
    return got


def assert_imports_as(tmp_path: Path, out: Path, quantized: bool, want: np.ndarray, packed: float = 5e-2) -> None:
    """The import ``out`` of ``tmp_path / "m.gguf"`` gives ``want`` (the reference's logits over :data:`TINY_TOKENS`):
    a float32 file's within 1e-4; a quantized one's as its own float import does, and within ``packed`` of ``want``
    (Q8_0's rounding of random weights)."""
    if not quantized:
        assert scaled_error(ferrum_logits(out, TINY_TOKENS), want) <= 1e-4
        return
    got = assert_runs_as_its_float_import(tmp_path / "m.gguf", out, tmp_path / "float")
    assert scaled_error(got, want) <= packed


def tiny_model(config_class: Any, **settings: Any) -> tuple[Any, Any]:
    """A random float32 transformers model of ``config_class`` over :func:`sentencepiece_vocab` (64 wide, 4 heads,
    2 KV heads unless ``settings`` say otherwise), and its config."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = config_class(**{
        "vocab_size": len(sentencepiece_vocab()[0]), "hidden_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 128, "pad_token_id": 0, "bos_token_id": 1,
        "eos_token_id": 2, **settings})
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval(), config


def assert_logits_match(hf: Any, folder: Path, tokens: list[int] = TINY_TOKENS) -> None:
    """The numpy backend's logits for ``folder`` (imported from ``hf``'s GGUF) equal transformers' own."""
    import torch

    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0].numpy()
    got = ferrum_logits(folder, tokens)
    assert float(np.abs(got - ref).max()) <= 1e-4 * max(1.0, float(np.abs(ref).max()))


def imported(tmp_path: Path, hf: Any, qtype) -> Any:
    """The file at ``tmp_path / m.gguf`` imported, its ModelConfig returned: transformers' logits (float32), or its
    float import's (a quantized file)."""
    from ferrum.config import ModelConfig

    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    if qtype == Q.F32:
        assert_logits_match(hf, out)
    else:
        assert_runs_as_its_float_import(tmp_path / "m.gguf", out, tmp_path / "float")
    return ModelConfig.from_file(out)
