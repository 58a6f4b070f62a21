"""tiktoken BPE files (Kimi's ``tiktoken.model``, Qwen's ``qwen.tiktoken``, Hunyuan's ``hy.tiktoken``: lines
"base64-bytes rank") as byte-level BPE: the ranks are the ids, the merges follow from them, and the split regex and
special tokens, which the models' remote tokenizer code defines, come from a table keyed by the tokenizer class the
config names."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ferrum.bpe_vocab import byte_level_bpe, bytes_to_unicode, merges_by_rank
from ferrum.errors import ConfigError, UnsupportedFeatureError

_CONTRACTIONS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
#: Kimi K2 / K2.5 / Moonlight's (tokenization_kimi.py): Han runs apart, words that leave Han out, numbers in threes.
_KIMI_PATTERN = "|".join((
    r"[\p{Han}]+",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
    + _CONTRACTIONS + "?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
    + _CONTRACTIONS + "?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
))
#: Qwen (1)'s (tokenization_qwen.py), Hunyuan's too (tokenization_hy.py): Llama 3's with every digit on its own.
_QWEN_PATTERN = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def _kimi_specials(ranks: int, named: Mapping[int, str]) -> dict[int, str]:
    """256 slots after the ranks, named by tokenizer_config's added_tokens_decoder, the rest reserved."""
    return {i: named.get(i, f"<|reserved_token_{i}|>") for i in range(ranks, ranks + 256)}


_QWEN_FIRST_SPECIAL = 151643


def _qwen_specials(ranks: int, named: Mapping[int, str]) -> dict[int, str]:
    """End of text, the chat markers and 205 extras, numbered from 151643 whatever the file holds."""
    names = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(205)))
    if ranks != _QWEN_FIRST_SPECIAL:
        raise ConfigError(f"QWenTokenizer numbers its special tokens from {_QWEN_FIRST_SPECIAL}, right after its "
                          f"{_QWEN_FIRST_SPECIAL} ranks, but the ranks file holds {ranks}; it is not Qwen's")
    return dict(enumerate(names, start=_QWEN_FIRST_SPECIAL))


def _hunyuan_specials(ranks: int, named: Mapping[int, str]) -> dict[int, str]:
    """HYTokenizer's: end and start of text, BOS, EOS, pad and 205 extras, numbered from the last rank on."""
    names = ("<|endoftext|>", "<|startoftext|>", "<|bos|>", "<|eos|>", "<|pad|>",
             *(f"<|extra_{i}|>" for i in range(205)))
    return dict(enumerate(names, start=ranks))


@dataclass(frozen=True)
class TiktokenClass:
    """What a remote tokenizer class hardcodes around its ranks file."""

    file: str
    pattern: str
    #: (ranks in the file, added_tokens_decoder's id -> text) -> special tokens by id.
    specials: Callable[[int, Mapping[int, str]], dict[int, str]]
    #: Whether text is NFC-normalized before it is split (Qwen's does).
    nfc: bool = False
    #: The class's own bos/eos_token where tokenizer_config.json names none.
    defaults: Mapping[str, str] = field(default_factory=dict)
    #: Whether the ranks are the lines' order, a repeated token skipped and the rank column ignored (Hunyuan's
    #: loader), not the file's rank column.
    by_line: bool = False


#: tokenizer_config.json's tokenizer class -> how its tiktoken file reads.
TIKTOKEN_CLASSES = {
    "TikTokenTokenizer": TiktokenClass("tiktoken.model", _KIMI_PATTERN, _kimi_specials,
                                       defaults={"bos_token": "[BOS]", "eos_token": "[EOS]"}),
    "QWenTokenizer": TiktokenClass("qwen.tiktoken", _QWEN_PATTERN, _qwen_specials, nfc=True),
    # Hunyuan-A13B's tokenization_hy.py: its base models' start and end of text
    "HYTokenizer": TiktokenClass("hy.tiktoken", _QWEN_PATTERN, _hunyuan_specials, nfc=True, by_line=True,
                                 defaults={"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>"}),
}
#: Files that hold tiktoken ranks: each known class's, and any ``*.tiktoken``.
TIKTOKEN_FILES = tuple(sorted({spec.file for spec in TIKTOKEN_CLASSES.values()}))


def tokenizer_class(config: Mapping[str, Any]) -> str | None:
    """The class tokenizer_config.json names: ``tokenizer_class``, else the one ``auto_map`` loads."""
    name = config.get("tokenizer_class")
    if isinstance(name, str):
        return name
    auto = (config.get("auto_map") or {}).get("AutoTokenizer") if isinstance(config.get("auto_map"), dict) else None
    entries = auto if isinstance(auto, list) else [auto]
    path = next((entry for entry in entries if isinstance(entry, str)), None)
    return None if path is None else path.rsplit(".", 1)[-1]


def tiktoken_file(folder: Path) -> Path | None:
    """A tiktoken ranks file in ``folder``, if it has one."""
    found = [folder / name for name in TIKTOKEN_FILES if (folder / name).is_file()]
    return (found or sorted(folder.glob("*.tiktoken")) or [None])[0]


def read_ranks(path: Path, by_line: bool = False) -> dict[bytes, int]:
    """The file's byte strings by rank, checked: every line "base64 rank", ranks 0..n-1 each once (``by_line``: the
    ranks are the order of each token's first line). A bad line is named by its number."""
    ranks: dict[bytes, int] = {}
    first_line: dict[int, int] = {}  # rank -> the line that gave it
    token_line: dict[bytes, int] = {}
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            text, rank_text = line.split()
            token, rank = base64.b64decode(text, validate=True), 0 if by_line else int(rank_text)
        except (ValueError, binascii.Error):
            raise ConfigError(f"{path}, line {number}: not a tiktoken rank (base64 bytes, a space, the rank): "
                              f"{line[:80]!r}") from None
        if by_line:
            ranks.setdefault(token, len(ranks))
            continue
        if token in token_line:
            raise ConfigError(f"{path}, line {number}: token {token[:40]!r} has a rank on line {token_line[token]} "
                              "already; re-download the checkpoint")
        if rank < 0 or rank in first_line:
            why = "is negative" if rank < 0 else f"is line {first_line[rank]}'s too"
            raise ConfigError(f"{path}, line {number}: rank {rank} {why}, so the ranks cannot be the token ids; "
                              "re-download the checkpoint")
        ranks[token], first_line[rank], token_line[token] = rank, number, number
    beyond = [rank for rank in first_line if rank >= len(ranks)]
    if beyond:
        missing = min(set(range(len(ranks))) - set(ranks.values()))
        raise ConfigError(f"{path}, line {first_line[min(beyond)]}: rank {min(beyond)} is past the file's "
                          f"{len(ranks)} tokens (rank {missing} is missing), so the ranks cannot be the token ids; "
                          "re-download the checkpoint")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ConfigError(f"{path}: byte {missing[0]:#04x} has no rank, so text holding it cannot be encoded")
    return ranks


def tiktoken_tokenizer(folder: Path, config: Mapping[str, Any],
                       named: Mapping[int, str]) -> tuple[Any, dict[str, str], list[Any]]:
    """The tokenizer for the tiktoken file of the class the config names, that class's bos/eos_token, and its
    special tokens (``named`` is added_tokens_decoder's id -> text)."""
    from tokenizers import AddedToken, normalizers

    name = tokenizer_class(config)
    spec = TIKTOKEN_CLASSES.get(name) if name is not None else None
    if spec is None:
        known = ", ".join(f"{cls} ({c.file})" for cls, c in TIKTOKEN_CLASSES.items())
        raise UnsupportedFeatureError(
            f"{folder} ships tiktoken ranks ({tiktoken_file(folder).name}) for tokenizer class {name!r}, whose split "
            f"regex and special tokens live in its own code; Ferrum knows {known}: add the model's tokenizer.json")
    path = folder / spec.file
    if not path.is_file():
        raise ConfigError(f"{folder}: tokenizer class {name} reads its ranks from {spec.file}, which is missing")
    ranks = read_ranks(path, spec.by_line)
    spelling = bytes_to_unicode()

    def spelt(token: bytes) -> str:
        return "".join(spelling[b] for b in token)

    vocab = {spelt(token): rank for token, rank in ranks.items()}
    merges = [(spelt(left), spelt(right)) for left, right in merges_by_rank(ranks)]
    try:
        specials = spec.specials(len(ranks), named)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    vocab.update({text: i for i, text in specials.items()})
    if len(vocab) != len(ranks) + len(specials):
        raise ConfigError(f"{path}: a special token of {name} spells a ranked token; re-download the checkpoint")
    # tiktoken takes a split piece the vocabulary holds whole as one token, whatever the merges say
    tok = byte_level_bpe(vocab, merges, (spec.pattern,), ignore_merges=True)
    if spec.nfc:
        tok.normalizer = normalizers.NFC()
    added = [AddedToken(text, special=True, normalized=False) for _, text in sorted(specials.items())]
    return tok, dict(spec.defaults), added
