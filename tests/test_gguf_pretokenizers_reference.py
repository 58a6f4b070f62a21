"""GGUF pre-tokenizers against a reference written here: llama.cpp's own regexes (src/llama-vocab.cpp at
unslothai/llama.cpp d32676d7, as it spells them for its engine) applied with Python's ``regex`` module, each splitting
the pieces the one before left, then BPE by the merges' ranks, lowest first, as llama.cpp merges; on a vocabulary
trained here whose merges cross every boundary a split draws, so a wrong split changes the ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import regex
from hypothesis import assume, given, settings
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

from ferrum.bpe_vocab import bytes_to_unicode  # noqa: E402
from ferrum.gguf_import import convert_gguf  # noqa: E402
from ferrum.gguf_import.tokenizer import _PRE_TOKENIZERS  # noqa: E402
from ferrum.tokenizer import Tokenizer  # noqa: E402
from test_gguf_import import write_tiny_gguf  # noqa: E402

_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
#: o200k's as llama.cpp quotes it from tokenizer.json: its own rewrite ((?=[\p{L}])([^a-z]))* leaves combining marks
#: out of words (a mark after "cafe" starts a piece), which neither the models' tokenizer.json nor Ferrum does.
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTIONS
          + r"?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CONTRACTIONS
          + r"?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
#: tokenizer.ggml.pre -> (llama.cpp's regex_exprs for its group, its ignore_merges).
LLAMA_CPP = {
    **dict.fromkeys(("bailingmoe", "bailingmoe2", "llada-moe"), ((
        r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]|\s+(?!\S)|\s+",), False)),
    **dict.fromkeys(("grok-2", "kormo", "f2llmv2"), ((_QWEN2,), False)),
    "laguna": (("[^\\n]+|[\\n]+", _QWEN2), False),
    "exaone-moe": ((_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
                    r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+",), False),
    "minicpm5": ((r"\p{N}{1,3}", _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+"), True),
    "superbpe": ((r"\p{N}+", r"(?=(\d{3})+(?!\d))"), False),
    # its letter and punctuation classes as Ferrum's table quotes them (test_gguf_tokenizer_pretokenizers holds
    # them to probes); llama.cpp's \s+$ here, which Ferrum writes anchored at a whitespace run's start
    "deepseek-llm": (("[\r\n]", *_PRE_TOKENIZERS["deepseek-llm"].regexes[1:3], r"\s+$", "[一-龥ࠀ-一가-퟿]+",
                      r"\p{N}+"), False),
    "mellum2": ((r"\p{N}", _GPT2), False),
    **dict.fromkeys(("kanana2", "talkie"), ((_GPT4O,), False)),
    "cohere2moe": ((r"\d{1,3}(?=(?:\d{3})*\b)", _GPT4O), False),
    "joyai-llm": ((r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+",
                   "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
                   "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"), False),
}
CORPUS = [
    "Hello world, it's 12345 and 3.14159; they'll we've I'M DONE CamelCaseWords.\n\n  indented\tline\r\n",
    "Ünïcödé wörds, cafe\u0301s 日本語のテキスト 中文文本 한국어 텍스트!! x.com/a?b=1 1234567 99 000",
    "   spaces   and\ttabs\nnewlines  \n\n\n  end. 'S 'LL \"quoted\" (paren) [br] {cu} <a|b> ~^$+=",
]
TEXTS = [*CORPUS, "HelloWorld I'm DONE 12345 a/b", "a      b 1234567", "a!\n\nb 12 x.com", "中文abc 12345!! x.com",
         "e\u0301 \u212b ﬁ 🙂 ١٢٣٤٥ 1,234,567", "  \n \n\n \t\r\n x", "", "x y  z   w",
         "a  1 b   22 c\t\t333", "a  \t中文 b   "]
TEXT = st.text(st.one_of(st.sampled_from(list("abcXYZ '\t\n\r0123456789.,!/中文日本語é\u0301🙂")),
                         st.characters(codec="utf-8", exclude_categories=("Cs",))), max_size=40)


def trained_bpe(space: str | None) -> tuple[list[str], list[str]]:
    """A BPE trained on the corpus with no split at all (its merges join words, numbers, newlines...): byte-level
    (GPT-2's alphabet), or with ``space`` for a space and the raw characters. Its tokens by id and its merges."""
    from tokenizers import Tokenizer as HF, models, normalizers, pre_tokenizers, trainers

    tok = HF(models.BPE())
    if space is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.normalizer = normalizers.Replace(" ", space)
        alphabet = []
    tok.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=700, show_progress=False,
                                                             initial_alphabet=alphabet))
    data = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(data["vocab"].items(), key=lambda item: item[1])]
    return tokens, [" ".join(m) if isinstance(m, list) else m for m in data["merges"]]


@pytest.fixture(scope="module")
def byte_level():
    return trained_bpe(None)


def split(regexes: tuple[str, ...], text: str) -> list[str]:
    """llama.cpp's regex split: each regex's matches and the text between them, in order, of every piece."""
    pieces = [text]
    for expr in regexes:
        out = []
        for piece in pieces:
            at = 0
            for m in regex.finditer(expr, piece):
                out += [piece[at:m.start()], m.group()]
                at = m.end()
            out.append(piece[at:])
        pieces = [p for p in out if p]
    return pieces


def merge(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """llama.cpp's BPE: the neighbours whose merge ranks lowest are joined (the leftmost of equals), until none is."""
    while len(symbols) > 1:
        rank, at = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:])))
        if rank == len(ranks):
            break
        symbols[at:at + 2] = [symbols[at] + symbols[at + 1]]
    return symbols


def reference_ids(pre: str, text: str, tokens: list[str], merges: list[str]) -> list[int]:
    regexes, ignore_merges = LLAMA_CPP[pre]
    ids, ranks = {t: i for i, t in enumerate(tokens)}, {tuple(m.split(" ")): r for r, m in enumerate(merges)}
    spell = bytes_to_unicode()
    out = []
    for piece in split(regexes, text):
        word = "".join(spell[b] for b in piece.encode())
        out += [ids[word]] if ignore_merges and word in ids else [ids[s] for s in merge(list(word), ranks)]
    return out


def converted(tmp_path: Path, pre: str, tokens: list[str], merges: list[str], types: list[int] | None = None) -> Path:
    write_tiny_gguf(tmp_path / "t.gguf", pre=pre, types={},
                    vocab=(tokens, types or [1] * len(tokens), None, merges))
    return convert_gguf(tmp_path / "t.gguf", tmp_path / "out")


def no_case_folded_contraction(text: str) -> bool:
    """llama.cpp spells the contractions [sS]..., the models' tokenizer.json (which Ferrum keeps) (?i:'s...): they
    differ only where an apostrophe comes before a non-ASCII letter that case-folds to one of them (U+017F)."""
    return not regex.search(r"'[^\x00-\x7f]", text)


@pytest.mark.parametrize("pre", sorted(LLAMA_CPP))
def test_new_pre_tokenizers_split_and_encode_as_llama_cpp(tmp_path, byte_level, pre):
    tokens, merges = byte_level
    tok = Tokenizer(converted(tmp_path, pre, tokens, merges))
    hf = tokenizers.Tokenizer.from_str(tok.to_json())
    assert json.loads(tok.to_json())["model"]["ignore_merges"] == LLAMA_CPP[pre][1]
    back = {c: b for b, c in bytes_to_unicode().items()}
    for text in TEXTS:
        pieces = [bytes(back[c] for c in w).decode() for w, _ in hf.pre_tokenizer.pre_tokenize_str(text)]
        assert pieces == split(LLAMA_CPP[pre][0], text), text
        assert tok.encode(text, add_special_tokens=False) == reference_ids(pre, text, tokens, merges), text

    @settings(max_examples=60, deadline=None)
    @given(TEXT)
    def check(text):
        assume(no_case_folded_contraction(text))
        assert tok.encode(text, add_special_tokens=False) == reference_ids(pre, text, tokens, merges)

    check()


def sarvam_reference(text: str, tokens: list[str], merges: list[str]) -> list[int]:
    """llama.cpp's Sarvam-MoE: control tokens matched whole, each space written U+2581, the text cut into lines and
    newline runs, BPE over its characters, and what no token spells as its <0xNN> byte tokens."""
    ids, ranks = {t: i for i, t in enumerate(tokens)}, {tuple(m.split(" ")): r for r, m in enumerate(merges)}
    out: list[int] = []
    for n, fragment in enumerate(regex.split("(<\\|im_end\\|>)", text)):
        if n % 2:
            out.append(ids[fragment])
            continue
        for piece in split(("[^\\n]+|[\\n]+",), fragment.replace(" ", "\u2581")):
            for symbol in merge(list(piece), ranks):
                out += [ids[symbol]] if symbol in ids else [ids[f"<0x{b:02X}>"] for b in symbol.encode()]
    return out


def test_sarvam_moe_escapes_spaces_and_merges_characters_as_llama_cpp(tmp_path):
    tokens, merges = trained_bpe("\u2581")
    specials = [f"<0x{b:02X}>" for b in range(256)] + ["<|im_end|>"]
    types = [1] * len(tokens) + [6] * 256 + [3]
    tok = Tokenizer(converted(tmp_path, "sarvam-moe", tokens + specials, merges, types))
    tokens += specials
    # merges join across spaces and newlines, so the split shows
    assert any("\u2581" in m for m in merges) and any(regex.search("\n[^\n ]|[^\n ]\n", m) for m in merges)
    assert len(tok.encode("hello world", add_special_tokens=False)) < 11
    for text in [*TEXTS, "x<|im_end|> y\n<|im_end|>"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == sarvam_reference(text, tokens, merges), text
        assert tok.decode(ids, skip_special_tokens=False) == text

    @settings(max_examples=100, deadline=None)
    @given(TEXT)
    def check(text):
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == sarvam_reference(text, tokens, merges)
        assert tok.decode(ids) == text

    check()
