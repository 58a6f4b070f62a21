"""``tokenizers`` BPE models rebuilt from vocabularies that keep no merge list: sentencepiece's scored pieces (merged
highest score first) and tiktoken's ranked byte strings (merged lowest rank first). Shared by the GGUF import and
checkpoints that ship a ``tokenizer.model`` or tiktoken file instead of ``tokenizer.json``."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping, Sequence


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE vocabularies)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def merges_by_score(pieces: Sequence[str], scores: Sequence[float], vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """Every way to join two pieces of ``vocab`` into one of ``pieces``, the highest-scored result first: the order
    sentencepiece (and llama.cpp) merge in, which merge any two neighbours that spell a piece. Ties keep the pieces'
    order, a longer left part first."""
    candidates = []
    for piece, score in zip(pieces, scores):
        cuts = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        cuts.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        candidates += [(-float(score), -len(left), -len(right), left, right) for left, right in cuts]
    candidates.sort(key=lambda c: c[:3])  # stable: ties keep the file's order
    return [(c[3], c[4]) for c in candidates]


def merges_by_rank(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The pair each token of two or more bytes is merged from, in rank order. tiktoken merges the neighbours whose
    join has the lowest rank; run on a token's own bytes with only the ranks below its own, that stops at the two
    parts it is made of (a token that merging cannot reach stops at more, and is left out: tiktoken never makes
    it either)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            joins = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, at = min(joins)
            if best >= rank:
                break
            parts[at:at + 2] = [parts[at] + parts[at + 1]]
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


#: One split step: a regex whose matches are isolated, or (regex, a ``tokenizers`` Split behavior) where the matches
#: only mark where to cut (``merged_with_previous`` / ``merged_with_next``).
SplitStep = str | tuple[str, str]


def byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], regexes: Sequence[SplitStep],
                   ignore_merges: bool) -> Any:
    """A byte-level BPE tokenizer: text split by each of ``regexes`` in turn, every piece's bytes spelled in GPT-2's
    alphabet and merged by ``merges``; with ``ignore_merges`` a piece the vocabulary holds whole is one token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False, byte_fallback=False,
                               ignore_merges=ignore_merges))
    steps = [pre_tokenizers.Split(Regex(regex), behavior=behavior, invert=False)
             for regex, behavior in ((s, "isolated") if isinstance(s, str) else s for s in regexes)]
    tok.pre_tokenizer = pre_tokenizers.Sequence([*steps, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                 use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def bos_eos_processor(tok: Any, bos: str | None, eos: str | None, add_bos: bool, add_eos: bool) -> Any | None:
    """The post-processor that puts BOS before and EOS after each sequence, as far as asked; None for neither. The
    template names them "bos" / "eos", as it cannot spell a token holding ':' (PLaMo's <|plamo:bos|>)."""
    from tokenizers import processors

    if not (add_bos or add_eos):
        return None
    first, last = (["bos"] if add_bos else []), (["eos"] if add_eos else [])
    one = [f"{t}:0" for t in first] + ["$A:0"] + [f"{t}:0" for t in last]
    two = [f"{t}:1" for t in first] + ["$B:1"] + [f"{t}:1" for t in last]
    specials = [{"id": key, "ids": [tok.token_to_id(token)], "tokens": [token]}
                for key, token in (("bos", bos), ("eos", eos)) if key in first + last]
    return processors.TemplateProcessing(single=one, pair=one + two, special_tokens=specials)
