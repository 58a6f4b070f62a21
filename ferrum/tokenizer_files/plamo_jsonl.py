"""PLaMo 2 / 3's ``tokenizer.jsonl`` (one JSON row a line: [piece, score, type, ...], the line its id) as a
``tokenizers`` Unigram model. The release's Plamo2Tokenizer runs a Viterbi over the raw text (no normalizer, no
pre-split, spaces as they are) maximizing the summed scores, each rounded to 1e-4 first; a character no piece
covers costs UNKNOWN_SCORE and falls back to its UTF-8 byte pieces (rows typed BYTE, ``<0xHH>``, never matched as
text). Unigram takes the same lattice given those integer scores (exact in float64), the unknown piece scored so
that its per-character cost (the lowest score less 10) is UNKNOWN_SCORE, and the byte pieces that lowest score: a
byte piece's spelling in the text ("<0x41>") then costs more than its six characters, which the vocabulary must hold
cheaply enough (a real one does), so it is never taken where Plamo2Tokenizer never matches it. Where two
segmentations cost exactly the same, Plamo2Tokenizer takes the longest first piece and Unigram the longest last one:
both are optimal, the ids differ."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from ferrum.errors import ConfigError

PLAMO_VOCABULARY = "tokenizer.jsonl"
#: Plamo2Tokenizer's cost of a character no piece covers, in its units of 1e-4.
UNKNOWN_SCORE = -10_000_000
_UNK_PENALTY = 10  # tokenizers' Unigram scores an unknown character as its lowest score less this
#: Plamo2Tokenizer's own special tokens, where tokenizer_config.json names none.
PLAMO_DEFAULTS = {"unk_token": "<|plamo:unk|>", "bos_token": "<|plamo:bos|>", "eos_token": "<|plamo:eos|>",
                  "pad_token": "<|plamo:pad|>"}


#: The largest score magnitude read: rounded to 1e-4 units, a segmentation's summed scores stay exact in float64.
MAX_SCORE = 1e6


def _rows(path: Path) -> list[tuple[str, float, str]]:
    """The file's (piece, score, type) rows, checked: a distinct non-empty UTF-8 string and a finite number within
    ±:data:`MAX_SCORE` each; anything else refused naming the line."""
    rows, seen = [], {}
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read: {exc}") from None
    for number, line in enumerate(lines, start=1):
        row = _row(line)
        if row is None:
            raise ConfigError(f"{path}, line {number}: not a PLaMo vocabulary row ([piece, score, type, ...] with a "
                              f"UTF-8 piece and a score within ±{MAX_SCORE:g}): {line[:80]!r}; re-download the "
                              "checkpoint")
        if row[0] in seen:
            raise ConfigError(f"{path}, line {number}: the piece {row[0]!r} is that of line {seen[row[0]]} too; a "
                              "vocabulary holds each piece once: re-download the checkpoint")
        seen[row[0]] = number
        rows.append(row)
    return rows


def _row(line: bytes) -> tuple[str, float, str] | None:
    """One line's (piece, score, type), None where it is not such a row."""
    try:
        row = json.loads(line.decode("utf-8"))
        piece, score = row[0], float(row[1])
        piece.encode("utf-8")  # no lone surrogate
    except (ValueError, RecursionError, OverflowError, TypeError, KeyError, IndexError, AttributeError):
        return None  # invalid UTF-8 or JSON, a number past Python's own limits, no [piece, score, ...]
    if not (isinstance(row, list) and isinstance(piece, str) and piece and isinstance(row[1], (int, float))
            and not isinstance(row[1], bool) and math.isfinite(score) and abs(score) <= MAX_SCORE):
        return None
    return piece, score, row[2] if len(row) > 2 and isinstance(row[2], str) else "NORMAL"


def _check_byte_spellings(path: Path, scores: Mapping[str, float], low: float) -> None:
    """Refuse a vocabulary where "<0xHH>" in the text, spelt one piece per character, could cost more than the byte
    piece it spells, which Unigram (unlike Plamo2Tokenizer) matches as text."""
    for char in "<>x0123456789ABCDEF":
        if not scores.get(char, low) * 6 > low:
            raise ConfigError(f"{path}: the character {char!r} is not a piece scoring above {low / 6e4:.1f}, so "
                              "Ferrum's Unigram could read a byte piece's spelling in the text as that byte; add "
                              "the model's tokenizer.json")


def plamo_tokenizer(path: Path, config: Mapping[str, Any]) -> tuple[Any, dict[str, str], list[Any]]:
    """The Unigram tokenizer of ``tokenizer.jsonl``, Plamo2Tokenizer's special tokens (tokenizer_config.json's
    names first) and those tokens, which it matches whole before the Viterbi as transformers does."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    rows = _rows(path)
    named = {key: config[key] if isinstance(config.get(key), str) else value
             for key, value in PLAMO_DEFAULTS.items()}
    ids = {piece: i for i, (piece, _, _) in enumerate(rows)}
    unknown = ids.get(named["unk_token"])
    if unknown is None:
        raise ConfigError(f"{path}: the unknown token {named['unk_token']!r} is not in the vocabulary; name it "
                          "(unk_token) in tokenizer_config.json")
    bytes_present = {piece for piece, _, kind in rows if kind == "BYTE"}
    missing = [b for b in range(256) if f"<0x{b:02X}>" not in bytes_present]
    if missing or len(bytes_present) != 256:
        raise ConfigError(f"{path}: Plamo2Tokenizer needs the 256 byte pieces <0x00>..<0xFF> typed BYTE (missing "
                          f"or misspelt: <0x{(missing or [0])[0]:02X}>...); re-download the checkpoint")
    low = UNKNOWN_SCORE + _UNK_PENALTY
    pieces = []
    for i, (piece, score, kind) in enumerate(rows):
        scaled = round(score * 1e4)
        if kind != "BYTE" and i != unknown and scaled <= low:
            raise ConfigError(f"{path}: piece {piece!r} scores {score}, at or below Plamo2Tokenizer's unknown "
                              f"character ({UNKNOWN_SCORE / 1e4}), where its lattice differs; re-download the "
                              "checkpoint")
        pieces.append((piece, float(low if kind == "BYTE" or i == unknown else scaled)))
    _check_byte_spellings(path, dict(pieces), low)
    tok = Tokenizer(models.Unigram(pieces, unknown, byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    specials = dict.fromkeys(value for value in named.values() if value in ids)
    return tok, named, [AddedToken(text, special=True, normalized=False) for text in specials]
