"""PLaMo 2 / 3's tokenizer.jsonl against Plamo2Tokenizer's algorithm written here from its tokenization_plamo.py: a
Viterbi over the raw text from its end, each piece's score rounded to 1e-4 units, ties to the longest piece, a
character no piece covers costing UNKNOWN_SCORE and spelt as its UTF-8 byte pieces."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferrum.errors import ConfigError
from ferrum.tokenizer import IncrementalDetokenizer, Tokenizer

CORPUS = ["Hello world, this is a tiny corpus 123 4567.", "The quick brown fox jumps over the lazy dog's tail.",
          "日本語のテキスト と 中文文本. ", "  spaces   and\ttabs\nnewlines  ", "PLaMo は 言語モデル です。"]
SPECIALS = ["<|plamo:unk|>", "<|plamo:bos|>", "<|plamo:eos|>", "<|plamo:pad|>", "<|plamo:op|>"]
UNKNOWN_SCORE = -10_000_000
TEXTS = ["Hello world", "  the lazy dog's  tail\n", "日本語 テキスト", "zqZQ 🙂 é", "", "<0x41> <|plamo:op|>",
         "PLaMo は 言語モデル", "1234567 4567", "\t\n x"]
TEXT = st.text(st.one_of(st.sampled_from(list("Helo wrdthisaquckbnfxj.,'123日本語のテキスト中文は言モデ \t\n")),
                         st.characters(codec="utf-8", exclude_categories=("Cs",))), max_size=40)


def vocabulary(seed: int = 0) -> list[list]:
    """Rows as a release writes them: the specials (unknown first), the 256 byte pieces, then substrings of the
    corpus up to 4 characters (raw spaces in them) with random log-probability-like scores."""
    rng = np.random.default_rng(seed)
    rows = [[SPECIALS[0], 0.0, "UNKNOWN"], *([t, 0.0, "CONTROL"] for t in SPECIALS[1:])]
    rows += [[f"<0x{b:02X}>", 0.0, "BYTE"] for b in range(256)]
    pieces = sorted({line[i:i + n] for line in CORPUS for n in range(1, 5) for i in range(len(line) - n + 1)}
                    | set("<>x0123456789ABCDEF"))
    rows += [[p, round(float(rng.uniform(-14, -2) * len(p) ** 0.5), 6), "NORMAL"]
             for p in pieces if p not in "zQ🙂é"]
    return rows


def write(folder: Path, rows: list[list], **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["tokenization_plamo.Plamo2Tokenizer", None]},
        "added_tokens_decoder": {str(i): {"content": t, "special": True} for i, t in enumerate(SPECIALS[:4])},
        **config}))
    return folder


def plamo_encode(text: str, rows: list[list]) -> tuple[list[int], int, bool]:
    """Plamo2Tokenizer's ids for text holding no special token, the path's cost, and whether some position on it
    had two equally cheap choices. Scores from the end: at each character every piece starting there (longest
    first, strict improvement only), then the unknown character."""
    ids = {row[0]: i for i, row in enumerate(rows)}
    scores = {row[0]: round(row[1] * 1e4) for row in rows if row[2] != "BYTE"}
    longest = max(map(len, scores))
    n = len(text)
    cost, step, tied = [0] * (n + 1), [None] * (n + 1), [False] * (n + 1)
    for i in range(n - 1, -1, -1):
        choices = [(len(p), scores[p], ids[p]) for p in (text[i:i + k] for k in range(min(longest, n - i), 0, -1))
                   if p in scores]
        options = [(cost[i + length] - score, length, token) for length, score, token in choices]
        options.append((cost[i + 1] - UNKNOWN_SCORE, 1, None))
        best = min(c for c, _, _ in options)
        cost[i], step[i] = best, next((length, token) for c, length, token in options if c == best)
        tied[i] = sum(c == best for c, _, _ in options) > 1
    out, i, tie = [], 0, False
    while i < n:
        length, token = step[i]
        tie |= tied[i]
        out += [token] if token is not None else [ids[f"<0x{b:02X}>"] for b in text[i].encode()]
        i += length
    return out, cost[0], tie


def path_cost(ids: list[int], rows: list[list]) -> int:
    """A segmentation's cost in Plamo2Tokenizer's units: its pieces' rounded scores, each unknown character (its
    byte pieces) UNKNOWN_SCORE."""
    total, pending = 0, b""
    for i in ids:
        if rows[i][2] == "BYTE":
            pending += bytes([int(rows[i][0][3:5], 16)])
            try:
                pending.decode()
            except UnicodeDecodeError:
                continue
            total, pending = total - UNKNOWN_SCORE, b""
        else:
            total -= round(rows[i][1] * 1e4)
    return total


def plamo_decode(ids: list[int], rows: list[list]) -> str:
    """Plamo2Tokenizer.convert_tokens_to_string."""
    pieces = [rows[i][0] for i in ids]
    return b"".join(bytes([int(t[3:5], 16)]) if t.startswith("<0x") else t.encode() for t in pieces).decode(
        "utf-8", errors="replace")


@pytest.fixture(scope="module")
def plamo(tmp_path_factory):
    rows = vocabulary()
    return rows, Tokenizer(write(tmp_path_factory.mktemp("plamo"), rows))


def assert_as_plamo(tok: Tokenizer, rows: list[list], text: str, exact: bool = True) -> list[int]:
    ids = tok.encode(text)
    want, cost, tie = plamo_encode(text, rows)
    assert path_cost(ids, rows) == cost, (text, ids, want)
    if exact or not tie:
        assert ids == want, text
    assert tok.decode(ids) == plamo_decode(ids, rows) == text
    detokenizer = IncrementalDetokenizer(tok)
    assert "".join(detokenizer.push(i) for i in ids) + detokenizer.flush() == text
    return ids


def test_plamo_jsonl_encodes_as_plamo2tokenizer(plamo):
    rows, tok = plamo
    for text in TEXTS:
        assert_as_plamo(tok, rows, text)
    # controls: merges happen, spaces stay raw, uncovered characters fall back to bytes, "<0x41>" is text
    assert len(tok.encode("the lazy dog")) < len("the lazy dog")
    assert tok.encode("🙂") == [5 + b for b in "🙂".encode()]
    assert all(rows[i][2] != "BYTE" for i in tok.encode("<0x41>"))
    assert tok.vocab_size == len(rows) and tok.is_special(0) and tok.token_to_id("<|plamo:unk|>") == 0


@settings(max_examples=200, deadline=None)
@given(TEXT)
def test_plamo_jsonl_matches_on_random_text(plamo, text):
    rows, tok = plamo
    if not any(s in text for s in SPECIALS[:4]):
        assert_as_plamo(tok, rows, text, exact=False)


def test_plamo_specials_and_bos(tmp_path):
    rows = vocabulary()
    tok = Tokenizer(write(tmp_path / "plain", rows))
    # tokenizer_config's special tokens are matched whole; <|plamo:op|>, which it does not name, is text for the
    # Viterbi, where its own row is one piece among the rest
    text = "<|plamo:bos|>hi<|plamo:op|>the<|plamo:eos|>"
    assert tok.encode(text) == [1, *plamo_encode("hi<|plamo:op|>the", rows)[0], 2]
    assert tok.encode("hi") == plamo_encode("hi", rows)[0]  # Plamo2Tokenizer adds no BOS by default
    assert tok.bos_token == "<|plamo:bos|>" and tok.eos_token_ids == {2}
    assert tok.decode([1, *tok.encode("hi"), 2], skip_special_tokens=True) == "hi"
    bos = Tokenizer(write(tmp_path / "bos", rows, add_bos_token=True))
    assert bos.encode("hi") == [1, *plamo_encode("hi", rows)[0]]


def test_scores_are_rounded_and_ties_go_to_an_equally_cheap_path(tmp_path):
    """Rounding to 1e-4 units decides "ab" against "a" + "b"; on an exact tie Plamo2Tokenizer takes the longest
    first piece and tokenizers' Unigram the longest last: the ids differ, the cost does not."""
    head = [row for row in vocabulary() if row[2] != "NORMAL" or row[0] in set("<>x0123456789ABCDEF")]
    n = len(head)
    rows = [*head, ["a", -0.50004, "NORMAL"], ["b", -0.50004, "NORMAL"], ["ab", -1.00006, "NORMAL"],
            ["d", -0.5, "NORMAL"], ["e", -0.5, "NORMAL"], ["f", -0.5, "NORMAL"], ["de", -0.6, "NORMAL"],
            ["ef", -0.60001, "NORMAL"]]
    tok = Tokenizer(write(tmp_path, rows))
    assert tok.encode("ab") == plamo_encode("ab", rows)[0] == [n, n + 1]  # unrounded, "ab" alone would win
    ids, (want, cost, tie) = tok.encode("def"), plamo_encode("def", rows)
    assert tie and want == [n + 6, n + 5] and ids == [n + 3, n + 7] and path_cost(ids, rows) == cost


@pytest.mark.parametrize("edit, words", [
    (lambda rows: rows.__setitem__(5, ["<0x00", 0.0, "BYTE"]), "byte pieces"),
    (lambda rows: rows.pop(100), "byte pieces"),
    (lambda rows: rows.append(["x", "high", "NORMAL"]), "line 3"),
    (lambda rows: rows.append(["qq", -2000.0, "NORMAL"]), "unknown character"),
    (lambda rows: rows.remove(next(r for r in rows if r[0] == "<")), "'<' is not a piece"),
])
def test_malformed_plamo_vocabularies_are_refused(tmp_path, edit, words):
    rows = vocabulary()
    edit(rows)
    if words == "line 3":
        rows.insert(2, rows.pop())
    with pytest.raises(ConfigError, match=words):
        Tokenizer(write(tmp_path, rows))


@pytest.mark.parametrize("line, words", [
    (b'["\xff\xfe", -1.0, "NORMAL"]', "not a PLaMo vocabulary row"),  # invalid UTF-8
    (b'["zz", ' + b"9" * 400 + b', "NORMAL"]', "not a PLaMo vocabulary row"),  # past float's range
    (b'["zz", ' + b"9" * 5000 + b', "NORMAL"]', "not a PLaMo vocabulary row"),  # past Python's int digits
    (b'["zz", 1e305, "NORMAL"]', "not a PLaMo vocabulary row"),  # times 1e4 past float's range
    (b"[" * 100_000, "not a PLaMo vocabulary row"),  # past Python's recursion limit
    (b'["\\ud800", -1.0, "NORMAL"]', "not a PLaMo vocabulary row"),  # a lone surrogate
    (b'["H", -1.0, "NORMAL"]', "the piece 'H' is that of line"),  # a piece twice
])
def test_hostile_plamo_rows_are_refused_naming_the_line(tmp_path, line, words):
    rows = vocabulary()
    write(tmp_path, rows)
    with (tmp_path / "tokenizer.jsonl").open("ab") as f:
        f.write(line + b"\n")
    with pytest.raises(ConfigError, match=f"tokenizer.jsonl, line {len(rows) + 1}: {words}"):
        Tokenizer(tmp_path)


@pytest.mark.parametrize("key", ["add_bos_token", "add_eos_token"])
def test_a_flag_that_is_not_a_boolean_is_refused(tmp_path, key):
    """"false" as a string would add the token (bool("false") is True): refused, as the world vocabulary's reader
    refuses it."""
    with pytest.raises(ConfigError, match=f"{key} must be true or false, got 'false'"):
        Tokenizer(write(tmp_path, vocabulary(), **{key: "false"}))


def test_token_bytes_are_plamos_spelling(tmp_path):
    """PLaMo's pieces spell spaces as themselves: a piece holding U+2581 stands for that character (it was given a
    space, as sentencepiece's pieces are), byte pieces for their byte; as Plamo2Tokenizer turns pieces to text."""
    rows = vocabulary() + [["\u2581", -3.0, "NORMAL"], ["a\u2581b", -3.0, "NORMAL"]]
    tok = Tokenizer(write(tmp_path, rows))
    assert tok.encode("a\u2581b", add_special_tokens=False) == [len(rows) - 1]
    for i, (piece, _, _) in enumerate(rows):
        want = bytes([int(piece[3:5], 16)]) if piece.startswith("<0x") else piece.encode()
        assert tok.token_bytes(i) == want, piece
