"""The checkpoint's tokenizer as a ``tokenizers`` object, from the files it ships: ``tokenizer.json``, else a
sentencepiece ``tokenizer.model``, else PLaMo's ``tokenizer.jsonl``, else tiktoken ranks read as the tokenizer class
its config names says (else an RWKV world vocabulary, which :mod:`~ferrum.tokenizer_files.rwkv_world` reads for
:mod:`ferrum.world_tokenizer`). Files
other than tokenizer.json take tokenizer_config.json's added tokens, bos/eos and ``add_bos_token`` /
``add_eos_token`` here, as transformers applies them when it converts such a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ferrum.bpe_vocab import bos_eos_processor
from ferrum.checkpoint import require_regular_file
from ferrum.errors import ConfigError
from ferrum.tokenizer_files.plamo_jsonl import PLAMO_VOCABULARY
from ferrum.tokenizer_files.rwkv_world import world_vocab_file
from ferrum.tokenizer_files.tiktoken_ranks import TIKTOKEN_FILES, tiktoken_file

FAST_TOKENIZER, SENTENCEPIECE_MODEL = "tokenizer.json", "tokenizer.model"
#: The files of one fixed name a ``tokenizers.Tokenizer`` is built from, in the order they are preferred.
_NAMED_FILES = (FAST_TOKENIZER, SENTENCEPIECE_MODEL, PLAMO_VOCABULARY)
#: The files a checkpoint's tokenizer may be read from (with ``*.tiktoken``), in the order they are preferred.
TOKENIZER_FILES = (*_NAMED_FILES, *TIKTOKEN_FILES)


def _has_tokenizers_file(folder: Path) -> bool:
    """Whether ``folder`` ships a file a ``tokenizers.Tokenizer`` is built from (preferred to a world vocabulary)."""
    return any((folder / name).exists() for name in _NAMED_FILES) or tiktoken_file(folder) is not None


def has_tokenizer(folder: Path) -> bool:
    """Whether ``folder`` ships a file Ferrum reads a tokenizer from."""
    return _has_tokenizers_file(folder) or world_vocab_file(folder) is not None


def reads_world_vocab(folder: Path) -> bool:
    """Whether the folder's tokenizer is an RWKV world vocabulary: it ships one and none of the files preferred."""
    return not _has_tokenizers_file(folder) and world_vocab_file(folder) is not None


def load_tokenizer(folder: Path, config: Mapping[str, Any]) -> tuple[Any, dict[str, str]]:
    """The ``tokenizers.Tokenizer`` and the special tokens (bos/eos/unk/pad_token) its files name, which stand where
    tokenizer_config.json (``config``) names none."""
    from tokenizers import Tokenizer

    path = folder / FAST_TOKENIZER
    if path.exists():
        require_regular_file(path, ConfigError)
        try:
            return Tokenizer.from_file(str(path)), {}
        except Exception as exc:  # the tokenizers library raises its own exception type
            raise ConfigError(f"{path} is not a valid tokenizer.json ({exc}); re-download the checkpoint") from None
    named = added_tokens(config, folder)
    if (folder / SENTENCEPIECE_MODEL).exists():
        from ferrum.tokenizer_files.sentencepiece_model import bos_eos_flags, sentencepiece_tokenizer

        require_regular_file(folder / SENTENCEPIECE_MODEL, ConfigError)
        tok, defaults, whole = sentencepiece_tokenizer(folder / SENTENCEPIECE_MODEL)
        # added tokens are matched in the normalized text, as sentencepiece matches its own, so none brings a
        # dummy prefix after it
        (add_bos, add_eos), normalized = bos_eos_flags(config, folder), True
    elif (folder / PLAMO_VOCABULARY).exists():
        from ferrum.tokenizer_files.plamo_jsonl import plamo_tokenizer

        require_regular_file(folder / PLAMO_VOCABULARY, ConfigError)
        tok, defaults, whole = plamo_tokenizer(folder / PLAMO_VOCABULARY, config)
        # Plamo2Tokenizer adds nothing by default
        add_bos, add_eos = (config_flag(config, key, folder) for key in ("add_bos_token", "add_eos_token"))
        normalized = False
    elif tiktoken_file(folder) is not None:
        from ferrum.tokenizer_files.tiktoken_ranks import tiktoken_tokenizer

        tok, defaults, whole = tiktoken_tokenizer(folder, config, {i: t["content"] for i, t in named.items()})
        # Kimi's and Qwen's classes add nothing by default
        add_bos, add_eos = (config_flag(config, key, folder) for key in ("add_bos_token", "add_eos_token"))
        normalized = False
    else:
        raise ConfigError(
            f"no tokenizer in {folder}: Ferrum reads tokenizer.json, a sentencepiece tokenizer.model, PLaMo's "
            f"tokenizer.jsonl, tiktoken ranks ({', '.join(TIKTOKEN_FILES)}, *.tiktoken) or an RWKV world vocabulary "
            "(rwkv_vocab_v*.txt) to turn text into tokens (pass token ids to the executor to run without one)")
    tok.add_special_tokens([t for t in whole if t.special])
    tok.add_tokens([t for t in whole if not t.special])
    _add_config_tokens(tok, named, normalized, folder)
    bos, eos = (config.get(key, defaults.get(key)) for key in ("bos_token", "eos_token"))
    bos, eos = (t.get("content") if isinstance(t, dict) else t for t in (bos, eos))
    unknown = defaults.get("unk_token")
    for token, adds, key in ((bos, add_bos, "add_bos_token"), (eos, add_eos, "add_eos_token")):
        what = key.split("_")[1].upper()
        if adds and (not isinstance(token, str) or tok.token_to_id(token) is None):
            raise ConfigError(f"{folder}: the tokenizer is to add {what} ({key}) but its token {token!r} is not in "
                              f"the vocabulary; name it ({what.lower()}_token) in tokenizer_config.json, or set "
                              f"{key} false")
        if adds and token == unknown:
            raise ConfigError(f"{folder}: the tokenizer is to add {what} ({key}) but its token {token!r} is the "
                              f"unknown piece; fix {what.lower()}_token in tokenizer_config.json")
    processor = bos_eos_processor(tok, bos, eos, add_bos, add_eos)
    if processor is not None:
        tok.post_processor = processor
    return tok, defaults


def config_flag(config: Mapping[str, Any], key: str, folder: Path, default: bool = False) -> bool:
    """tokenizer_config.json's ``key`` (``add_bos_token``...), ``default`` where unset or null; refused unless a
    boolean (bool() of the string "false" is True)."""
    value = default if config.get(key) is None else config[key]
    if not isinstance(value, bool):
        raise ConfigError(f"{folder / 'tokenizer_config.json'}: {key} must be true or false, got {value!r}")
    return value


def added_tokens(config: Mapping[str, Any], folder: Path) -> dict[int, dict[str, Any]]:
    """tokenizer_config.json's ``added_tokens_decoder`` by id, checked."""
    value = config.get("added_tokens_decoder") or {}
    where = folder / "tokenizer_config.json"
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: added_tokens_decoder must map ids to tokens, got {type(value).__name__}")
    tokens = {}
    for key, token in value.items():
        if not (isinstance(key, str) and key.isdigit() and isinstance(token, dict)
                and isinstance(token.get("content"), str) and token["content"]):
            raise ConfigError(f"{where}: added_tokens_decoder entry {key!r}: {token!r:.80} is not an id with a "
                              "token ({\"content\": ..., \"special\": ...})")
        tokens[int(key)] = token
    return dict(sorted(tokens.items()))


def _add_config_tokens(tok: Any, named: Mapping[int, Mapping[str, Any]], normalized: bool, folder: Path) -> None:
    """Add tokenizer_config.json's added tokens at their ids: one the vocabulary holds keeps its id, a new one takes
    the next, so the ids it declares must follow the vocabulary's."""
    from tokenizers import AddedToken

    for token_id, entry in named.items():
        token = AddedToken(entry["content"], special=bool(entry.get("special", False)),
                           lstrip=bool(entry.get("lstrip", False)), rstrip=bool(entry.get("rstrip", False)),
                           single_word=bool(entry.get("single_word", False)),
                           normalized=normalized or bool(entry.get("normalized", False)))
        (tok.add_special_tokens if token.special else tok.add_tokens)([token])
        if tok.token_to_id(token.content) != token_id:
            raise ConfigError(
                f"{folder / 'tokenizer_config.json'}: added token {token.content!r} is declared id {token_id}, but "
                f"the vocabulary numbers it {tok.token_to_id(token.content)} (its ids must follow the "
                f"{tok.get_vocab_size(with_added_tokens=False)} of the tokenizer's own file, in order); fix the "
                "config or add the model's tokenizer.json")
