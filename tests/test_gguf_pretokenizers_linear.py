"""GGUF pre-tokenizers whose llama.cpp regex looks to the end of a digit or whitespace run from each of its
characters, quadratic in the run (40,000 digits took seconds): Ferrum writes forms that look once a run. They must
cut exactly where llama.cpp's own regexes cut, run by the same engine (the tokenizers library) on random text, and
on long runs, where the pieces are written here from the rule."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

from ferrum.gguf_import import convert_gguf  # noqa: E402
from ferrum.gguf_import.tokenizer import _PRE_TOKENIZERS  # noqa: E402
from test_gguf_import import write_tiny_gguf  # noqa: E402

#: llama.cpp's quadratic steps (src/llama-vocab.cpp), by pre-tokenizer.
SUPERBPE_CUT, TINY_AYA_CHUNK, DEEPSEEK_TRAILING = r"(?=(\d{3})+(?!\d))", r"\d{1,3}(?=(?:\d{3})*\b)", r"\s+$"
_OWN = {pre: _PRE_TOKENIZERS[pre].regexes for pre in ("superbpe", "tiny_aya", "deepseek-llm")}
#: Each group's regexes as llama.cpp has them: Ferrum's with the quadratic step put back.
LLAMA_CPP = {
    "superbpe": (_OWN["superbpe"][0], SUPERBPE_CUT),
    "tiny_aya": (TINY_AYA_CHUNK, _OWN["tiny_aya"][1]),
    "deepseek-llm": (*_OWN["deepseek-llm"][:3], DEEPSEEK_TRAILING, *_OWN["deepseek-llm"][4:]),
}
#: Digits of several scripts, numbers that are not digits, word and non-word neighbours, whitespace of every kind.
ALPHABET = list("0123456789١٢٣۴৫²½Ⅻ_aZé\u0301 \t\n\r\u3000\u0085\u2028.,!中가")
TEXT = st.text(st.one_of(st.sampled_from(ALPHABET), st.characters(codec="utf-8", exclude_categories=("Cs",))),
               max_size=60)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, object]:
    """pre -> the pre-tokenizer of Ferrum's tokenizer.json converted from a GGUF file naming it."""
    out = {}
    for pre in LLAMA_CPP:
        d: Path = tmp_path_factory.mktemp(pre)
        write_tiny_gguf(d / "t.gguf", pre=pre, types={})
        tok = tokenizers.Tokenizer.from_file(str(convert_gguf(d / "t.gguf", d / "out") / "tokenizer.json"))
        out[pre] = tok.pre_tokenizer
    return out


def cuts(pre_tokenizer, text: str) -> list[tuple[int, int]]:
    return [offsets for _, offsets in pre_tokenizer.pre_tokenize_str(text)]


def llama_cpp(pre: str):
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False)
                                    for r in LLAMA_CPP[pre]])


def test_no_group_keeps_a_quadratic_step():
    steps = {r if isinstance(r, str) else r[0] for split in _PRE_TOKENIZERS.values() for r in split.regexes}
    assert steps.isdisjoint({SUPERBPE_CUT, TINY_AYA_CHUNK, DEEPSEEK_TRAILING})


@pytest.mark.parametrize("pre", sorted(LLAMA_CPP))
def test_linear_forms_cut_where_llama_cpps_regexes_cut(converted, pre):
    reference = llama_cpp(pre)
    for text in ["1234567 ab 12", "½1234²5678", "345²12", "12345abc 1234567 x1234_", "١٢٣٤x5678 ١٢٣٤٥.",
                 "a  \t中文 b   ", "x\u3000 \u3000", "  \n \n\n \t\r\n x"]:
        assert cuts(converted[pre], text) == cuts(reference, text), text

    @settings(max_examples=300, deadline=None)
    @given(TEXT)
    def check(text):
        assert cuts(converted[pre], text) == cuts(reference, text)

    check()


def from_the_right(start: int, n: int) -> list[tuple[int, int]]:
    """A run of n digits at ``start`` cut in threes from its end."""
    first = n % 3
    return ([(start, start + first)] if first else []) + [(at, at + 3) for at in range(start + first, start + n, 3)]


@pytest.mark.parametrize("n", [20000, 40000])
def test_long_runs(converted, n):
    """Runs the quadratic forms take seconds over (pieces from the rule, not from the regexes)."""
    digits = "1" * n + "1" * (n % 3 == 0)  # a run whose first piece is short
    m = len(digits)
    assert cuts(converted["superbpe"], digits + " x") == from_the_right(0, m) + [(m, m + 2)]
    # Tiny Aya: cut from the right before a non-word character; before a letter o200k's threes from the left
    assert cuts(converted["tiny_aya"], digits + " x") == from_the_right(0, m) + [(m, m + 2)]
    left = [(at, min(at + 3, m)) for at in range(0, m, 3)]
    assert cuts(converted["tiny_aya"], digits + "x") == left + [(m, m + 1)]
    # DeepSeek LLM: a whitespace run before a Han character stays whole, one that ends the text too
    assert cuts(converted["deepseek-llm"], " " * n + "中") == [(0, n), (n, n + 1)]
    assert cuts(converted["deepseek-llm"], "a" + "\t" * n) == [(0, 1), (1, n + 1)]
