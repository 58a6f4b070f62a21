"""RWKV's "world" vocabulary, which fla-hub's RWKV-7 releases ship (``rwkv_vocab_v20230424.txt``, read by remote
tokenizer code; no tokenizer.json): one token a line, ``<id> <Python str or bytes literal> <its byte length>``.
Text is cut by greedy longest match over its UTF-8 bytes (RWKV's TRIE_TOKENIZER, llama.cpp's llm_tokenizer_rwkv),
which no model of the tokenizers library reproduces, so a byte trie does it here: O(bytes x longest token)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterable, Mapping

from ferrum.checkpoint import require_regular_file
from ferrum.errors import ConfigError, InvalidRequestError

#: The release's file name (hf_rwkv_tokenizer.py's VOCAB_FILES_NAMES); other ``rwkv_vocab_v*.txt`` versions are read
#: where a folder holds exactly one.
WORLD_VOCAB = "rwkv_vocab_v20230424.txt"
_OTHER_VERSIONS = "rwkv_vocab_v*.txt"
#: What fla-hub's RwkvTokenizer calls id 0, the end of text (its default BOS, EOS and unknown token); the vocabulary
#: file starts at id 1.
END_OF_TEXT = "<|rwkv_tokenizer_end_of_text|>"
#: The longest token read, in bytes: the release's (128 spaces). The greedy match looks this far ahead of each
#: token it takes, so a longer one would make encoding that much slower per byte.
MAX_TOKEN_BYTES = 128


def world_vocab_file(folder: Path) -> Path | None:
    """The folder's world vocabulary: the release's name, else the one ``rwkv_vocab_v*.txt``; several of those
    without the release's name are refused (which one the model was trained on cannot be told)."""
    if (folder / WORLD_VOCAB).exists():
        return folder / WORLD_VOCAB
    found = sorted(folder.glob(_OTHER_VERSIONS))
    if len(found) > 1:
        raise ConfigError(f"{folder} holds several RWKV world vocabularies ({', '.join(p.name for p in found)}); "
                          "keep the one the model was trained on")
    return found[0] if found else None


def read_world_vocab(path: Path) -> dict[int, bytes]:
    """The file's tokens by id, each line checked: its id at most the file's line count (the release's is its line
    number), its literal a str (stored as UTF-8) or bytes of the byte length the line gives, at most
    :data:`MAX_TOKEN_BYTES`. A zero-length token (a public copy of the release's file ends with two, ``65530 '' 0``)
    is kept: its id never matches and decodes to nothing, as in the release's tokenizer. Literals are read with
    ``ast.literal_eval``, never evaluated as code."""
    require_regular_file(path, ConfigError)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text ({exc}); re-download the vocabulary") from None
    tokens: dict[int, bytes] = {}
    lines = text.split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        head, _, rest = line.partition(" ")
        literal, _, length = rest.rpartition(" ")
        try:
            token_id, value, size = int(head), ast.literal_eval(literal.strip()), int(length)
            token = value.encode("utf-8") if isinstance(value, str) else value  # a lone surrogate: ValueError
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            token = None
        if not isinstance(token, bytes) or not 0 <= token_id <= len(lines) or len(token) != size:
            raise ConfigError(f"{path}, line {number}: {line[:80]!r} is not '<id> <str or bytes literal> <byte "
                              f"length>' with an id of at most the file's {len(lines)} lines and a UTF-8 token of "
                              "that length; re-download the vocabulary")
        if size > MAX_TOKEN_BYTES:
            raise ConfigError(f"{path}, line {number}: a token of {size} bytes; Ferrum reads tokens of at most "
                              f"{MAX_TOKEN_BYTES} (the release's longest), which keep its greedy match fast")
        tokens[token_id] = token
    if not any(tokens.values()):
        raise ConfigError(f"{path} holds no tokens; re-download the vocabulary")
    return tokens


def write_world_vocab(path: Path, tokens: Mapping[int, bytes]) -> None:
    """``tokens`` in the release's form: a str literal where the token is UTF-8 text, else a bytes literal; lines
    end in CRLF, as the release's do (its readers take any line end)."""
    lines = []
    for token_id, token in sorted(tokens.items()):
        try:
            literal = repr(token.decode("utf-8"))
        except UnicodeDecodeError:
            literal = repr(token)
        lines.append(f"{token_id} {literal} {len(token)}\r\n")
    path.write_bytes("".join(lines).encode("utf-8"))


class ByteTrie:
    """Greedy longest match of byte strings: at each position the longest token the bytes there start with (the
    last id listed, of tokens spelled alike, as the release's token-to-id table keeps it); a zero-length token is
    never matched."""

    def __init__(self, tokens: Iterable[tuple[int, bytes]]):
        #: node * 256 + byte -> child node; node 0 is the root.
        self._edges: dict[int, int] = {}
        #: node -> the id of the token ending there, -1 for none.
        self._ids: list[int] = [-1]
        for token_id, token in tokens:
            if not token:
                continue
            node = 0
            for byte in token:
                key = node << 8 | byte
                child = self._edges.get(key)
                if child is None:
                    child = self._edges[key] = len(self._ids)
                    self._ids.append(-1)
                node = child
            self._ids[node] = token_id

    def split(self, data: bytes, ids: list[int], starts: list[int], offset: int = 0) -> None:
        """Append the ids of ``data``'s tokens to ``ids`` and where each starts (byte, plus ``offset``) to
        ``starts``. A byte no token starts with is refused, as the release's tokenizer fails there (a world
        vocabulary holds all 256 single bytes; one that does not cannot spell every text)."""
        edges, found, i, end = self._edges, self._ids, 0, len(data)
        while i < end:
            node, j, best, best_end = 0, i, -1, i
            while j < end:
                node = edges.get(node << 8 | data[j], 0)
                if not node:
                    break
                j += 1
                if found[node] >= 0:
                    best, best_end = found[node], j
            if best < 0:
                raise InvalidRequestError(f"byte 0x{data[i]:02x} at byte {offset + i} of the text starts no token "
                                          "of this model's RWKV world vocabulary, so the text cannot be tokenized; "
                                          "the vocabulary lacks its single bytes (the release's has all 256)")
            ids.append(best)
            starts.append(offset + i)
            i = best_end
