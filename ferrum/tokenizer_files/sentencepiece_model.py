"""A sentencepiece ``tokenizer.model`` (BPE or unigram) as the equal ``tokenizers`` tokenizer: pieces, scores and the
normalizer spec read from its model proto with sentencepiece's own bindings."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ferrum.bpe_vocab import merges_by_score
from ferrum.errors import ConfigError, UnsupportedFeatureError
from ferrum.tokenizer_files.tiktoken_ranks import tokenizer_class

# sentencepiece's ModelProto enums.
_UNIGRAM, _BPE = 1, 2
_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"
_EVERY = 1 << 30  # as many as there are


@dataclass(frozen=True)
class SentencePieceClass:
    """Whether a tokenizer class puts BOS before and EOS after the text where tokenizer_config.json does not say."""

    add_bos: bool
    add_eos: bool
    #: Whether add_bos_token / add_eos_token change that (T5's appends EOS whatever they say).
    follows_flags: bool = True


_LLAMA = SentencePieceClass(add_bos=True, add_eos=False)
#: The classes that read a tokenizer.model (a ``...Fast`` name is its class's), by what they add: transformers'
#: own (4.x's slow classes and 5.x's documented defaults), and the remote code of Baichuan's and InternLM2's.
SENTENCEPIECE_CLASSES = {
    "LlamaTokenizer": _LLAMA, "CodeLlamaTokenizer": _LLAMA, "GemmaTokenizer": _LLAMA,
    "BaichuanTokenizer": _LLAMA, "InternLM2Tokenizer": _LLAMA,
    "T5Tokenizer": SentencePieceClass(add_bos=False, add_eos=True, follows_flags=False),
}
#: The class taken where the config names none: the one transformers gives Llama-like model types.
_DEFAULT_CLASS = "LlamaTokenizer"


def bos_eos_flags(config: Mapping[str, Any], folder: Path) -> tuple[bool, bool]:
    """Whether BOS goes before the text and EOS after it: tokenizer_config.json's add_bos_token / add_eos_token
    where given, else the default of the tokenizer class it names; a class not known here is refused only where
    its default is needed."""
    name = tokenizer_class(config) or _DEFAULT_CLASS
    known = SENTENCEPIECE_CLASSES.get(name.removesuffix("Fast"))
    if known is not None and not known.follows_flags:
        return known.add_bos, known.add_eos
    flags = []
    for key, default in (("add_bos_token", None if known is None else known.add_bos),
                         ("add_eos_token", None if known is None else known.add_eos)):
        value = config[key] if config.get(key) is not None else default
        if value is None:
            raise UnsupportedFeatureError(
                f"{folder / 'tokenizer_config.json'} names tokenizer class {name!r}, whose default for {key} (whether "
                f"it adds {key.split('_')[1].upper()}) lives in its own code; Ferrum knows "
                f"{', '.join(SENTENCEPIECE_CLASSES)}: set add_bos_token and add_eos_token there, or add the model's "
                "tokenizer.json")
        if not isinstance(value, bool):
            raise ConfigError(f"{folder / 'tokenizer_config.json'}: {key} must be true or false, got {value!r}")
        flags.append(value)
    return flags[0], flags[1]


def _read_proto(path: Path) -> Any:
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as exc:  # protobuf missing, or sentencepiece itself
        raise UnsupportedFeatureError(
            f"{path} is a sentencepiece model, and reading it needs the sentencepiece and protobuf packages "
            f"({exc}); pip install sentencepiece protobuf, or add the model's tokenizer.json"
        ) from None
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as exc:  # protobuf's DecodeError, or a proto that is not sentencepiece's
        raise ConfigError(f"{path} is not a sentencepiece model ({exc}); re-download the checkpoint") from None
    if not proto.pieces:
        raise ConfigError(f"{path} holds no sentencepiece pieces; re-download the checkpoint")
    return proto


def _check(proto: Any, path: Path) -> None:
    """Refuse by name what sentencepiece can do that this conversion does not."""
    kind = proto.trainer_spec.model_type
    if kind not in (_UNIGRAM, _BPE):
        raise UnsupportedFeatureError(f"{path}: sentencepiece model type {_MODEL_TYPES.get(kind, kind)!r} is not "
                                      "supported (Ferrum reads 'bpe' and 'unigram'); add the model's tokenizer.json")
    spec = proto.normalizer_spec
    if proto.trainer_spec.treat_whitespace_as_suffix or not spec.escape_whitespaces:
        raise UnsupportedFeatureError(f"{path}: a sentencepiece model that writes spaces after words or leaves them "
                                      "unescaped is not supported; add the model's tokenizer.json")
    if proto.denormalizer_spec.precompiled_charsmap:
        raise UnsupportedFeatureError(f"{path}: a sentencepiece model with denormalization rules is not supported; "
                                      "add the model's tokenizer.json")
    for i, piece in enumerate(proto.pieces):
        if not piece.piece or not math.isfinite(piece.score):
            what = "is empty" if not piece.piece else f"scores {piece.score}, not a finite number"
            raise ConfigError(f"{path}: piece {i} ({piece.piece!r}) {what}; re-download the checkpoint")


def _unknown(proto: Any, path: Path) -> int:
    """The id of the unknown piece: the one piece typed UNKNOWN, as sentencepiece takes it (whatever
    trainer_spec.unk_id says), which refuses a model with none or several."""
    unknown = [i for i, piece in enumerate(proto.pieces) if piece.type == _UNKNOWN]
    if len(unknown) != 1:
        raise ConfigError(f"{path} types {len(unknown)} pieces as the unknown piece {unknown[:4]}, where sentencepiece "
                          "needs exactly one (it refuses to load the model otherwise); re-download the checkpoint")
    return unknown[0]


def _control(proto: Any, text: str) -> str | None:
    """``text`` if a control piece spells it, else None: sentencepiece finds BOS, EOS and padding by the piece's
    text (trainer_spec.bos_piece...), not by trainer_spec.bos_id, and takes none where that piece is missing or
    not a control piece (the unknown piece, a normal one)."""
    return text if any(p.piece == text and p.type == _CONTROL for p in proto.pieces) else None


def _character_map(charsmap: bytes, path: Path) -> Any:
    """The normalizer spec's compiled character map (NFKC and the like) as a ``tokenizers`` normalizer."""
    from tokenizers import normalizers

    try:
        return normalizers.Precompiled(charsmap)
    except Exception as exc:  # the tokenizers library raises a bare Exception
        raise ConfigError(f"{path}: the normalizer's precompiled_charsmap is not one ({exc}); re-download the "
                          "checkpoint") from None


def _normalizer(spec: Any, path: Path) -> Any:
    """sentencepiece's normalizer: its character map (NFKC and the like), then, with remove_extra_whitespaces, runs
    of spaces cut to one and none at the ends.

    The dummy prefix is the pre-tokenizer's, which puts it before the text's first run only (not after an added
    token), and only where that run starts the text and does not start with U+2581. The rest is written here:
    spaces that started the text stand for it, and a text starting with U+2581 (or, without
    remove_extra_whitespaces, a space) gets its own. (A text starting with a user-defined piece gets none, where
    sentencepiece writes one: the added token's own text is normalized too, so it cannot be told from the text.)"""
    from tokenizers import Regex, normalizers

    steps = [_character_map(spec.precompiled_charsmap, path)] if spec.precompiled_charsmap else []
    prefix, strip = spec.add_dummy_prefix, spec.remove_extra_whitespaces
    if strip:
        ends = r" \z" if prefix else r"\A | \z"  # with a prefix, spaces that start the text become it, below
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex(ends), "")]
    if prefix:
        steps.append(normalizers.Replace(Regex(f"\\A(?={SPACE})" if strip else f"\\A(?=[ {SPACE}])"), SPACE))
    if prefix and strip:
        steps.append(normalizers.Replace(Regex(r"\A "), SPACE))
    return normalizers.Sequence(steps)


def sentencepiece_tokenizer(path: Path) -> tuple[Any, dict[str, str], list[Any]]:
    """The tokenizer, the special tokens it names (bos/eos/unk/pad_token), and its pieces matched whole in text:
    control and unknown pieces as special tokens, user-defined ones as plain added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    proto = _read_proto(path)
    _check(proto, path)
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise ConfigError(f"{path} spells a piece twice; re-download the checkpoint")
    trainer, unk_id = proto.trainer_spec, _unknown(proto, path)
    if proto.trainer_spec.model_type == _BPE:
        normal = [(piece, score) for piece, score, kind in pieces if kind == _NORMAL]
        halves = {piece: vocab[piece] for piece, _ in normal}
        merges = merges_by_score([p for p, _ in normal], [s for _, s in normal], halves)
        model = models.BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=True, byte_fallback=trainer.byte_fallback,
                           unk_token=pieces[unk_id][0])
    else:
        model = models.Unigram([(piece, score) for piece, score, _ in pieces], unk_id, trainer.byte_fallback)
    tok = Tokenizer(model)
    spec = proto.normalizer_spec
    tok.normalizer = _normalizer(spec, path)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(SPACE, prepend_scheme="first" if spec.add_dummy_prefix else "never",
                                                 split=False)
    # sentencepiece drops the dummy prefix when it decodes, and with remove_extra_whitespaces every space before the
    # first word
    leading = _EVERY if spec.remove_extra_whitespaces else int(spec.add_dummy_prefix)
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", leading, 0)] if leading else []))
    # matched in the normalized text, as sentencepiece matches user-defined pieces: the dummy prefix goes before
    # the text's start only, not after each of them
    whole = [AddedToken(piece, special=kind != _USER_DEFINED, normalized=True)
             for piece, _, kind in pieces if kind in (_UNKNOWN, _CONTROL, _USER_DEFINED)]
    named = {"bos_token": _control(proto, trainer.bos_piece), "eos_token": _control(proto, trainer.eos_piece),
             "unk_token": pieces[unk_id][0], "pad_token": _control(proto, trainer.pad_piece)}
    return tok, {name: text for name, text in named.items() if text is not None}, whole
