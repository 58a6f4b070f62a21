"""RWKV's world vocabulary behind Ferrum's :class:`~ferrum.tokenizer.Tokenizer`: greedy longest match over the
text's bytes (:class:`~ferrum.tokenizer_files.rwkv_world.ByteTrie`) between the added tokens, matched whole, as
fla-hub's RwkvTokenizer (hf_rwkv_tokenizer.py) runs it; chat templates and streaming decode as for any checkpoint.

Id 0, which the vocabulary file leaves out, is the end of text (the class's BOS, EOS and unknown token), named by
tokenizer_config's ``added_tokens_decoder`` or ``bos_token``. An ``eos_token`` spelling a vocabulary token (the
releases' ``"\\n\\n"``) ends generation at that token: transformers instead appends it to the vocabulary as a new
special token the model never saw, which ``"\\n\\n"`` in a prompt then becomes."""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate
from pathlib import Path
from typing import Any, Sequence

from ferrum.errors import ConfigError, UnsupportedFeatureError
from ferrum.tokenizer import Tokenizer, not_unicode
from ferrum.tokenizer_files import added_tokens, config_flag
from ferrum.tokenizer_files.rwkv_world import END_OF_TEXT, ByteTrie, read_world_vocab, world_vocab_file


@dataclass(frozen=True)
class WorldVocab:
    """The vocabulary file's tokens by id, its trie, and the added tokens (id -> text, and which are special)."""

    tokens: dict[int, bytes]
    trie: ByteTrie
    added: dict[int, str]
    special: frozenset[int]
    add_bos: bool


class WorldTokenizer(Tokenizer):
    """A checkpoint whose tokenizer is an RWKV world vocabulary (``rwkv_vocab_v20230424.txt``)."""

    _tok: WorldVocab

    @staticmethod
    def _read_files(folder: Path, config: dict[str, Any]) -> tuple[WorldVocab, dict[str, str]]:
        path = world_vocab_file(folder)
        assert path is not None  # Tokenizer picks this class only for a folder holding one
        tokens = read_world_vocab(path)
        named = added_tokens(config, folder)
        bos = config.get("bos_token", END_OF_TEXT)
        first = named[0]["content"] if 0 in named else bos.get("content") if isinstance(bos, dict) else bos
        if not isinstance(first, str) or not first:
            raise ConfigError(f"{folder / 'tokenizer_config.json'}: bos_token must be the text of id 0, the end of "
                              f"text (RWKV's {END_OF_TEXT!r}), got {bos!r}")
        added = {0: first, **{i: t["content"] for i, t in named.items() if i}}
        _check_added(folder / "tokenizer_config.json", added, max(tokens) + len(added))
        special = frozenset([0, *(i for i, t in named.items() if t.get("special", False))])
        add_bos = config_flag(config, "add_bos_token", folder)  # RwkvTokenizer adds none unless told
        vocab = WorldVocab(tokens, ByteTrie(tokens.items()), added, special, add_bos)
        return vocab, {"bos_token": first, "eos_token": first, "unk_token": first}

    @property
    def vocab_size(self) -> int:
        return max(max(self._tok.tokens), max(self._tok.added)) + 1

    def to_json(self) -> str:
        raise UnsupportedFeatureError("an RWKV world vocabulary has no tokenizer.json form: the tokenizers library "
                                      "cannot run its greedy longest match")

    def for_llguidance(self, n_vocab: int) -> Any:
        """llguidance's TokenizerWrapper over each id's bytes (special tokens marked by a leading 0xFF, as its
        llama.cpp binding marks them), the trie tokenizing the bytes it asks about."""
        from llguidance import TokenizerWrapper

        return TokenizerWrapper(_GuidanceView(self, n_vocab))

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self._split(text, add_special_tokens)[0]

    def _split(self, text: str, add_special_tokens: bool) -> tuple[list[int], list[int]]:
        """The text's ids and where each starts, in UTF-8 bytes of the text (BOS, added here, at 0)."""
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise not_unicode(text, exc) from None
        ids: list[int] = [0] if add_special_tokens and self._tok.add_bos else []
        starts: list[int] = [0] * len(ids)
        done = 0
        for match in self._added_pattern.finditer(data) if self._added_pattern else ():
            self._tok.trie.split(data[done:match.start()], ids, starts, done)
            ids.append(self._added_ids[match.group().decode("utf-8")])
            starts.append(match.start())
            done = match.end()
        self._tok.trie.split(data[done:], ids, starts, done)
        return ids, starts

    @cached_property
    def _added_pattern(self) -> re.Pattern[bytes] | None:
        """The added tokens, longest first: matched whole where they start leftmost, as transformers matches them."""
        texts = sorted(self._tok.added.values(), key=len, reverse=True)
        return re.compile(b"|".join(re.escape(t.encode("utf-8")) for t in texts)) if texts else None

    @cached_property
    def longest_token_chars(self) -> int:
        """A token of n bytes stands for at most n characters."""
        return max(max(map(len, self._tok.tokens.values())), max(map(len, self._tok.added.values())))

    def char_starts(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids, starts = self._split(text, add_special_tokens)
        ends = list(accumulate(len(c.encode("utf-8")) for c in text))  # byte after each character
        return [bisect_right(ends, start) for start in starts]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        special = self._tok.special if skip_special_tokens else frozenset()
        return b"".join(self.token_bytes(i) for i in ids if i not in special).decode("utf-8", "replace")

    @cached_property
    def _added_ids(self) -> dict[str, int]:
        return {text: i for i, text in self._tok.added.items()}

    @cached_property
    def _special_ids(self) -> dict[str, int]:
        return {text: i for i, text in self._tok.added.items() if i in self._tok.special}

    def token_to_id(self, token: str) -> int | None:
        """The added token spelled ``token``, else the vocabulary's token of its UTF-8 bytes."""
        found = self._added_ids.get(token)
        return found if found is not None else self._ids_by_bytes.get(token.encode("utf-8", "surrogatepass"))

    @cached_property
    def _ids_by_bytes(self) -> dict[bytes, int]:
        return {token: i for i, token in self._tok.tokens.items() if token}  # a zero-length token spells nothing

    def token_bytes(self, token_id: int) -> bytes:
        token_id = int(token_id)
        added = self._tok.added.get(token_id)
        return added.encode("utf-8") if added is not None else self._tok.tokens.get(token_id, b"")


def _check_added(where: Path, added: dict[int, str], last: int) -> None:
    """Refuse an added token that is no UTF-8 text (a lone surrogate) or whose id is past ``last``, the vocabulary's
    last id plus one per added token (a larger one would size the logits' vocabulary by it)."""
    for token_id, text in added.items():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(f"{where}: added token {token_id} ({text!r:.40}) is not UTF-8 text (a lone surrogate); "
                              "fix its content") from None
        if token_id > last:
            raise ConfigError(f"{where}: added token {text!r:.40} has id {token_id}, past {last} (the vocabulary's "
                              "last id plus one per added token); fix its id")


class _GuidanceView:
    """What llguidance's TokenizerWrapper reads of a tokenizer: each id's bytes up to the logits' width, the
    special ids, BOS/EOS, and a call tokenizing bytes."""

    def __init__(self, tokenizer: WorldTokenizer, n_vocab: int):
        vocab = tokenizer._tok
        self._trie = vocab.trie
        self.tokens = [(b"\xff" if i in vocab.special else b"") + tokenizer.token_bytes(i)
                       for i in range(max(n_vocab, tokenizer.vocab_size))]
        self.special_token_ids = sorted(vocab.special)
        self.eos_token_id = min(tokenizer.eos_token_ids, default=0)
        self.bos_token_id = 0

    def __call__(self, data: bytes) -> list[int]:
        ids: list[int] = []
        self._trie.split(data, ids, [])
        return ids
