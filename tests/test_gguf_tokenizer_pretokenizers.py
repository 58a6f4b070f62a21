"""GGUF byte-level pre-tokenizers: every ``tokenizer.ggml.pre`` Ferrum knows splits text with the regexes llama.cpp
(src/llama-vocab.cpp) gives its group.

The expected pieces are written by hand from each regex's meaning; each probe is one whose split differs between
the groups, so choosing another group's regexes fails it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from ferrum.errors import UnsupportedFeatureError  # noqa: E402
from ferrum.gguf_import import convert_gguf  # noqa: E402
from ferrum.gguf_import.tokenizer import _PRE_TOKENIZERS  # noqa: E402
from test_gguf_import import write_tiny_gguf  # noqa: E402

#: Newlines, a CJK run, digits, punctuation runs and a dotted word: the DeepSeek groups' probe.
_DEEPSEEK_PROBE = "Hello World\n\n中文abc 12345!! x.com"

#: (pre, text, pieces): the text's pieces after the pre-tokenizer, spaces as themselves.
CASES = [
    # BLOOM: a piece runs up to whitespace, . , ! ? or ( | ): a space before it included, the rest cut off alone
    ("bloom", "Hello, world! 12345 (a|b) don't-x",
     ["Hello", ",", " world", "!", " 12345", " (", "a", "|", "b", ")", " don't-x"]),
    # Viking: BLOOM's, then every digit alone
    ("viking", "Hello, world! 12345 (a|b) don't-x",
     ["Hello", ",", " world", "!", " ", "1", "2", "3", "4", "5", " (", "a", "|", "b", ")", " don't-x"]),
    # DeepSeek LLM: newlines alone; cased-letter words; ASCII punctuation runs; CJK; whole numbers
    ("deepseek-llm", _DEEPSEEK_PROBE,
     ["Hello", " World", "\n", "\n", "中文", "abc", " ", "12345", "!!", " x", ".", "com"]),
    # DeepSeek Coder: the same, but \p{L} words (CJK cut out after) and every digit alone
    ("deepseek-coder", _DEEPSEEK_PROBE,
     ["Hello", " World", "\n", "\n", "中文", "abc", " ", "1", "2", "3", "4", "5", "!!", " x", ".", "com"]),
    # DeepSeek-V3: numbers in threes first, Han / kana runs, newline runs whole, punctuation taking its ASCII word
    ("deepseek-v3", _DEEPSEEK_PROBE, ["Hello", " World", "\n\n", "中文", "abc", " ", "123", "45", "!!", " x", ".com"]),
    # Qwen3.5: a combining mark stays in its word (Qwen2 cuts it off with what follows), single digits
    ("qwen35", "HelloWorld cafe\u0301s 12! don't",
     ["HelloWorld", " cafe\u0301s", " ", "1", "2", "!", " don", "'t"]),
    # Jais 2: Llama 3's, whitespace runs cut into 4, then 1 (Llama 3 keeps 5 together)
    ("jais-2", "a      b 12345", ["a", "    ", " ", " b", " ", "123", "45"]),
    # Seed-Coder: punctuation does not take the newlines after it (Qwen2's does), single digits
    ("seed-coder", "a!\r\n\nb 12", ["a", "!", "\r\n\n", "b", " ", "1", "2"]),
    # Laguna: lines apart first, so punctuation takes a carriage return but not the newlines after it
    ("laguna", "a!\r\n\nb c 12", ["a", "!\r", "\n\n", "b", " c", " ", "1", "2"]),
    # EXAONE MoE: a word runs on over single spaces between letters
    ("exaone-moe", "hello world foo 12 don't", ["hello world foo", " ", "1", "2", " don", "'t"]),
    # MiniCPM 5: numbers cut out first, so the spaces before one stay together (Llama 3 cuts off the last)
    ("minicpm5", "a  1 b 1234567 中文abc", ["a", "  ", "1", " b", " ", "123", "456", "7", " 中文abc"]),
    # SuperBPE: numbers apart, cut in threes from the right; the rest whole
    ("superbpe", "1234567 ab 12", ["1", "234", "567", " ab ", "12"]),
    # Youtu: CJK runs first; words cut at case changes keeping a contraction; single digits
    ("youtu", "中文HelloWorld 12 don't", ["中文", "Hello", "World", " ", "1", "2", " don't"]),
    # Tiny Aya: digit runs cut in threes from the right, then o200k's words
    ("tiny_aya", "1234567 HelloWorld", ["1", "234", "567", " Hello", "World"]),
    # MiniMax-M2: o200k's
    ("minimax-m2", "HelloWorld I'm DONE 12345 a/b", ["Hello", "World", " I'm", " DONE", " ", "123", "45", " a", "/b"]),
]
#: The groups the new ones differ from, on the same probes.
CONTROLS = [
    ("qwen2", "HelloWorld cafe\u0301s 12! don't",
     ["HelloWorld", " cafe", "\u0301s", " ", "1", "2", "!", " don", "'t"]),
    ("llama-bpe", "a      b 12345", ["a", "     ", " b", " ", "123", "45"]),
    ("qwen2", "a!\r\n\nb 12", ["a", "!\r\n\n", "b", " ", "1", "2"]),
    ("llama-bpe", "a  1 b 1234567", ["a", " ", " ", "1", " b", " ", "123", "456", "7"]),
    ("gpt-4o", "1234567 HelloWorld", ["123", "456", "7", " Hello", "World"]),
]


def _converted(tmp_path: Path, pre: str) -> Path:
    write_tiny_gguf(tmp_path / "t.gguf", pre=pre, types={})
    return convert_gguf(tmp_path / "t.gguf", tmp_path / "out")


def _split(out: Path, text: str) -> list[str]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    return [bytes(_BYTE_OF[c] for c in word).decode("utf-8") for word, _ in tok.pre_tokenizer.pre_tokenize_str(text)]


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's printable character -> the byte it stands for (the pieces come out in that alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    chars.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in chars)})
    return {c: b for b, c in chars.items()}


_BYTE_OF = _byte_alphabet()


@pytest.mark.parametrize(("pre", "text", "pieces"), CASES + CONTROLS)
def test_each_pre_tokenizer_splits_as_llama_cpps_regexes(tmp_path, pre, text, pieces):
    assert _split(_converted(tmp_path, pre), text) == pieces


def test_each_probe_tells_its_group_from_the_others():
    """A probe's pieces are its group's alone: no other group's regexes give them (run through the tokenizers
    library on the same text), so the test above fails wherever a name is given another group."""
    from tokenizers import Regex, pre_tokenizers

    def split(regexes: tuple[str | tuple[str, str], ...], text: str) -> list[str]:
        steps = [pre_tokenizers.Split(Regex(r), behavior=b, invert=False)
                 for r, b in ((r, "isolated") if isinstance(r, str) else r for r in regexes)]
        return [word for word, _ in pre_tokenizers.Sequence(steps).pre_tokenize_str(text)]

    groups = {split.regexes for split in _PRE_TOKENIZERS.values()}
    for pre, text, pieces in CASES:
        own = _PRE_TOKENIZERS[pre].regexes
        assert split(own, text) == pieces, pre
        assert [regexes for regexes in groups - {own} if split(regexes, text) == pieces] == [], pre


@pytest.mark.parametrize("pre", sorted(_PRE_TOKENIZERS))
def test_every_known_name_builds_a_tokenizer(tmp_path, pre):
    """Each name converts, its tokenizer.json carrying its group's regexes and ignore_merges, and encodes text back
    to itself."""
    from ferrum.tokenizer import Tokenizer

    out = _converted(tmp_path, pre)
    data = json.loads((out / "tokenizer.json").read_text())
    steps = data["pre_tokenizer"]["pretokenizers"]
    assert [step["pattern"]["Regex"] if step["behavior"] == "Isolated" else (step["pattern"]["Regex"], step["behavior"])
            for step in steps[:-1]] == [r if isinstance(r, str) else (r[0], r[1].title().replace("_", ""))
                                        for r in _PRE_TOKENIZERS[pre].regexes]
    assert data["model"]["ignore_merges"] == _PRE_TOKENIZERS[pre].ignore_merges
    text = "hello 12345 wörld's\n\n中文 x.com"
    tok = Tokenizer(out)
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize("pre", ["youtu", "falcon-h1", "midm-2.0"])
def test_ignore_merges_where_llama_cpp_sets_it(tmp_path, pre):
    """Youtu and Llama 3's kin take a word the vocabulary holds whole as one token (llama.cpp's ignore_merges)."""
    assert json.loads((_converted(tmp_path, pre) / "tokenizer.json").read_text())["model"]["ignore_merges"] is True


@pytest.mark.parametrize("pre", ["kimi-k2", "afmoe"])
def test_a_split_llama_cpp_runs_as_code_is_refused_by_name(tmp_path, pre):
    write_tiny_gguf(tmp_path / "x.gguf", pre=pre)
    with pytest.raises(UnsupportedFeatureError, match=rf"pre-tokenizer '{pre}' is .* Hugging Face checkpoint"):
        convert_gguf(tmp_path / "x.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
