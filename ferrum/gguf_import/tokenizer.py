"""``tokenizer.json`` rebuilt from ``tokenizer.ggml.*``: byte-level BPE, sentencepiece or Gemma 4's BPE, as llama.cpp
runs them; an RWKV world vocabulary ('rwkv') written back as the release's vocabulary file."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ferrum.bpe_vocab import SplitStep, bos_eos_processor, byte_level_bpe, bytes_to_unicode, merges_by_score
from ferrum.errors import CheckpointError, UnsupportedFeatureError
from ferrum.gguf_import.files import Metadata
from ferrum.tokenizer_files.rwkv_world import WORLD_VOCAB, write_world_vocab


#: Tokens llama.cpp ends generation at wherever the vocabulary has them, whatever the file names as EOS: chat
#: models' end-of-turn markers, which many conversions (Gemma's, older Llama 3 ones) do not name.
_END_OF_GENERATION = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>",
    "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
))
#: The fill-in-the-middle tokens that end generation too (a code model's padding, next repository, next file), by
#: the file's key or, as llama.cpp finds them without one, by their spellings: the first of them the vocabulary has.
_FIM_STOPS = {
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
#: OpenAI's harmony format ends every message with ``<|end|>``, the reply itself with ``<|return|>`` or
#: ``<|call|>``: in a vocabulary with all three, ``<|end|>`` does not end generation (as llama.cpp decides it).
_HARMONY_ENDS = ("<|return|>", "<|call|>")
#: Pre-tokenizers whose vocabularies take a BOS token unless the file says otherwise (llama.cpp's defaults).
_ADDS_BOS = frozenset(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                       "tekken", "chameleon"))
#: Phi-3's special tokens eat the whitespace after them, except these; llama.cpp knows a Phi-3 vocabulary only by
#: the model's name, so it is recognised the same way.
_PHI3_NAMES, _PHI3_KEEPS_WHITESPACE = ("phi-3", "phi3"), frozenset(("<unk>", "<s>", "<|endoftext|>"))

# GGUF token types (llama.cpp's llama_token_type).
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 2, 3, 4
#: Token types llama.cpp matches whole in raw text before tokenizing the rest (its special-token partition).
_MATCHED_WHOLE = (_TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED)
#: llama.cpp's ids for a sentencepiece vocabulary's BOS, EOS and unknown token where the file names none (or an
#: id outside the vocabulary).
_SPM_DEFAULT_IDS = {"bos": 1, "eos": 2, "unknown": 0}


@dataclass(frozen=True)
class _Split:
    """How one group of ``tokenizer.ggml.pre`` values splits text before byte-level BPE: llama.cpp's
    ``regex_exprs``, each splitting the pieces the one before it left, written as the model's own tokenizer.json
    has them where llama.cpp quotes that (its own rewrites are for its regex engine), else as llama.cpp has them;
    one that scans a digit or whitespace run from each of its characters (quadratic in the run) is rewritten to
    cut the same places scanning it once (tests/test_gguf_pretokenizers_reference.py holds them to llama.cpp's)."""

    regexes: tuple[SplitStep, ...]
    #: A word the vocabulary holds whole is one token, whatever the merges say (llama.cpp's ``ignore_merges``).
    ignore_merges: bool = False


_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
#: Words split at case changes (Mistral's Tekken, OpenAI's o200k): an upper-case run, then lower-case letters.
_CASED_WORDS = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+{suffix}"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*{suffix}")
_CASED_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_GPT4O_REGEX = _CASED_WORDS.replace("{suffix}", r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?") + r"|\p{N}{1,3}" + _CASED_REST
#: BLOOM's: a word is everything up to whitespace or sentence punctuation, a space before it included.
_BLOOM_REGEX = r" ?[^(\s|.,!?…。，、।۔،)]+"
#: Han, kana and hangul runs on their own (DeepSeek's).
_DEEPSEEK_CJK = "[一-龥ࠀ-一가-퟿]+"
_DEEPSEEK3_CJK = "[一-龥぀-ゟ゠-ヿ]+"
_GPT2 = _Split((_GPT2_REGEX,))
_QWEN2 = _Split((_QWEN2_REGEX,))
_STARCODER = _Split((r"\p{N}", _GPT2_REGEX))
#: llama.cpp's \d{1,3}(?=(?:\d{3})*\b), which looks to the end of a digit run from each digit: here only its
#: first chunk looks (at the run's start), each next three digits follow on where the last match ended (\G)
_TINY_AYA = _Split((r"(?<!\d)\d{1,3}(?=(?:\d{3})*\b)|\G(?<=\d)\d{3}", _GPT4O_REGEX))
_BLOOM = _Split((_BLOOM_REGEX,))
#: llama.cpp's split for a byte-level vocabulary whose file names no pre-tokenizer (converted before May 2024).
_DEFAULT = _Split((r"[\p{P}\$\+<=>\^~\|]+", _GPT2_REGEX, r"\p{N}+", "[0-9][0-9][0-9]"))
_LLAMA3 = _Split((_LLAMA3_REGEX,), ignore_merges=True)
#: ``tokenizer.ggml.pre`` -> how its text is split, for the values llama.cpp knows (src/llama-vocab.cpp) and
#: Ferrum's architectures use; a name is grouped with those llama.cpp gives the same regexes.
_PRE_TOKENIZERS = {
    "default": _DEFAULT,
    # GPT-2's; A.X 4.0, GigaChat, Mellum, Trillion and Granite-Docling convert with it too
    **dict.fromkeys(("gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "a.x-4.0", "gigachat", "mellum",
                     "trillion", "granite-docling"), _GPT2),
    # SmolLM, StarCoder and relatives: every digit on its own, then GPT-2's regex
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"),
                    _STARCODER),
    # Falcon: runs of punctuation, GPT-2's regex, then numbers cut in threes
    "falcon": _Split((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_REGEX, "[0-9][0-9][0-9]")),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
                    _LLAMA3),
    **dict.fromkeys(("smaug-bpe", "dbrx", "glm4", "chatglm-bpe"), _Split((_LLAMA3_REGEX,))),
    # Jais 2: Llama 3's, whitespace runs cut into powers of two
    "jais-2": _Split((_LLAMA3_REGEX.replace(
        r"\s+(?!\S)|\s+", "|".join(rf"\s{{{n}}}(?!\S)" for n in (512, 256, 128, 64, 32, 16, 8, 4, "1,2")) + r"|\s{1}"),
    )),
    # Qwen2's (and StableLM 2's, Hunyuan-A13B's, Solar Open's, Grok 2's, KORMo's, F2LLM-v2's): Llama 3's with every
    # digit on its own; Ling / Ring's (v1, 2.0) and LLaDA-MoE's, which llama.cpp spells otherwise, split the same
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan", "solar-open", "grok-2", "kormo",
                     "f2llmv2", "bailingmoe", "bailingmoe2", "llada-moe"), _QWEN2),
    # Laguna's: lines and newline runs apart, then Qwen2's
    "laguna": _Split(("[^\n]+|[\n]+", _QWEN2_REGEX)),
    # EXAONE MoE (K-EXAONE): a word runs on over single spaces between letters and keeps its combining marks
    "exaone-moe": _Split((r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
                          r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+",)),
    # MiniCPM 5: numbers in threes, then Llama 3's with whole numbers
    "minicpm5": _Split((r"\p{N}{1,3}", _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}+")), ignore_merges=True),
    # SuperBPE: numbers apart, cut in threes from the right. llama.cpp cuts at each empty match of
    # (?=(\d{3})+(?!\d)), looking to the run's end from every digit; here a cut after a run's first one or two
    # digits where three-digit groups fill the rest (looked for at the run's start only), then before each group
    "superbpe": _Split((r"\p{N}+", (r"(?<!\d)\d{1,2}(?=(?:\d{3})+(?!\d))", "merged_with_previous"),
                        (r"\d{3}", "merged_with_next"))),
    # Qwen3.5's: Qwen2's with combining marks kept in their word
    "qwen35": _Split((r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                      r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",)),
    # Seed-Coder's: Qwen2's, a punctuation run not taking the newlines after it
    "seed-coder": _Split((r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}"
                          r"| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+",)),
    "tekken": _Split((_CASED_WORDS.replace("{suffix}", "") + r"|\p{N}" + _CASED_REST,), ignore_merges=True),
    # o200k's (GPT-4o, gpt-oss, Llama 4, MiniMax-M2, Kanana 2, talkie)
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2", "kanana2", "talkie"), _Split((_GPT4O_REGEX,))),
    # Tiny Aya (and Cohere 2 MoE): numbers cut in threes from the right, then o200k's
    **dict.fromkeys(("tiny_aya", "cohere2moe"), _TINY_AYA),
    # Youtu-LLM: CJK runs and CJK punctuation first, then Tekken's words with o200k's contractions, single digits
    "youtu": _Split((
        "[가-힣ㄱ-ㆎ]+|[！…“”‘’—：；，、-〿︰-﹏]+|[ㄅ-ㄯ]+|[一-龥぀-ゟ゠-ヿ]+",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
        r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
        r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
        r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}" + _CASED_REST,
    ), ignore_merges=True),
    # BLOOM (and Poro, GPT-3 Finnish): words up to whitespace or punctuation; Viking's then every digit alone
    **dict.fromkeys(("bloom", "poro-chat", "gpt3-finnish"), _BLOOM),
    "viking": _Split((_BLOOM_REGEX, r"\p{N}")),
    # DeepSeek LLM (7B / 67B): newlines, cased Latin / Greek / Cyrillic... words, ASCII and full-width
    # punctuation, trailing whitespace, CJK runs, numbers
    "deepseek-llm": _Split((
        "[\r\n]",
        # six letters written escaped: Unicode normalization would turn them into others
        "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌῐ-\u1fd3ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
        r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
        # llama.cpp's \s+$, tried from the start of a whitespace run only (it cannot start inside one)
        r"(?<!\s)\s+$",
        _DEEPSEEK_CJK,
        r"\p{N}+",
    )),
    # DeepSeek Coder: newlines, letter runs, punctuation runs, CJK runs, every digit alone
    "deepseek-coder": _Split(("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _DEEPSEEK_CJK, r"\p{N}")),
    # DeepSeek-V3 / R1 (and Hunyuan's dense models, JoyAI's): numbers in threes, Han and kana runs, then punctuation
    # taking the ASCII word after it
    **dict.fromkeys(("deepseek-v3", "hunyuan-dense", "joyai-llm"), _Split((
        r"\p{N}{1,3}",
        _DEEPSEEK3_CJK,
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
        "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
    ))),
}
#: Names whose split llama.cpp does in code of its own (unicode.cpp), not by regex: refused by name.
_CUSTOM_SPLITS = {
    "kimi-k2": "Kimi K2's split (words that leave Han characters out; files converted without merges)",
    "afmoe": "Arcee Trinity's split (its digit grouping)",
}


def _added_token(meta: Metadata, token: str, token_type: int) -> Any:
    """A control or user-defined token, matched whole in raw text (Phi-3's taking the whitespace after it)."""
    from tokenizers import AddedToken

    name = (meta.get("general.name") or "").lower()
    rstrip = any(n in name for n in _PHI3_NAMES) and token not in _PHI3_KEEPS_WHITESPACE
    return AddedToken(token, special=token_type != _TOKEN_USER_DEFINED, normalized=False, rstrip=rstrip)


def _byte_level_model(meta: Metadata, tokens: list[str], types: list[int]) -> tuple[Any, list[Any]]:
    """Byte-level BPE ('gpt2'): the file's merges, its pre-tokenizer regex, tokens in GPT-2's byte alphabet."""
    where = meta.where
    pre = meta.get("tokenizer.ggml.pre")
    if pre is None:
        warnings.warn(f"{where} names no pre-tokenizer (tokenizer.ggml.pre, written since May 2024); its text is "
                      "split by llama.cpp's default rule, which may not be the model's own: re-convert the file "
                      "for the tokens it was trained on", stacklevel=2)
        pre = "default"
    if pre in _CUSTOM_SPLITS:
        raise UnsupportedFeatureError(
            f"{where}: GGUF pre-tokenizer {pre!r} is {_CUSTOM_SPLITS[pre]}, which llama.cpp runs as code of its own "
            "rather than a regex; load the model from its Hugging Face checkpoint (its tokenizer.json) instead "
            "of the GGUF file"
        )
    split = _PRE_TOKENIZERS.get(pre)
    if split is None:
        raise UnsupportedFeatureError(
            f"{where}: GGUF pre-tokenizer {pre!r} is not supported; Ferrum knows "
            f"{', '.join(sorted({*_PRE_TOKENIZERS, *_SPACE_ESCAPING}))}"
        )
    merges_raw = meta.get("tokenizer.ggml.merges")
    if not merges_raw:
        raise UnsupportedFeatureError(f"{where}: the GGUF byte-level BPE tokenizer lists no merges")
    merges: list[tuple[str, str]] = []
    for m in merges_raw:
        parts = m.split(" ")
        if len(parts) != 2:
            raise CheckpointError(f"{where}: malformed BPE merge {m!r} in tokenizer.ggml.merges")
        merges.append((parts[0], parts[1]))

    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    added: list[Any] = []
    for index, (token, token_type) in enumerate(zip(tokens, types)):
        if token_type in _MATCHED_WHOLE:
            # Matched whole in the raw text, written as is.
            added.append(_added_token(meta, token, token_type))
        elif not set(token) <= alphabet:
            # A plain token spelled in raw text: write it in the byte alphabet like the rest.
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, index)
    # A merge only ranks a pair (llama.cpp merges a pair whose join is a token): one whose parts or join the
    # vocabulary lacks (a whitespace run taken over by an added token, GPT-NeoX's) never applies, and the
    # tokenizers library refuses it
    merges = [(left, right) for left, right in merges if left in vocab and right in vocab and left + right in vocab]
    tok = byte_level_bpe(vocab, merges, split.regexes, split.ignore_merges)
    return tok, added


def _sentencepiece_model(meta: Metadata, tokens: list[str], types: list[int]) -> tuple[Any, list[Any]]:
    """SentencePiece BPE ('llama': Llama 2, Mistral, TinyLlama...) as llama.cpp runs it: pieces spelled with
    ``\u2581`` for a space, unknown characters as ``<0xNN>`` byte pieces, a space put before the text
    (``add_space_prefix``).

    The file keeps scores, not merges: a piece is merged from any two pieces that spell it, the highest-scored
    piece first, which is the order llama.cpp merges in."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    where = meta.where
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise CheckpointError(f"{where}: a sentencepiece GGUF tokenizer needs one score per token "
                              f"(tokenizer.ggml.scores), got {None if scores is None else len(scores)}")
    vocab: dict[str, int] = {}
    added: list[Any] = []
    for index, (token, token_type) in enumerate(zip(tokens, types)):
        if token_type in _MATCHED_WHOLE:
            added.append(_added_token(meta, token, token_type))
        vocab.setdefault(token, index)
    unknown = _token_id(meta, tokens, "unknown", _SPM_DEFAULT_IDS["unknown"])
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    # a character no piece spells becomes its <0xNN> byte pieces, or, in a vocabulary without them (OpenLLaMA's),
    # the unknown token, as sentencepiece writes it; it was dropped, and the text lost with it
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges_by_score(tokens, scores, vocab), dropout=None,
                               unk_token=None if unknown is None else tokens[unknown], fuse_unk=True,
                               byte_fallback=True))
    # llama.cpp puts the space before every run of text that starts the prompt or follows an added token, even
    # one that starts with a space; the normalizer runs on exactly those runs
    spaces = normalizers.Replace(" ", "\u2581")
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), spaces]) if prefix else spaces
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok, added


def _split_merge(merge: str, where: str) -> tuple[str, str]:
    """A merge ``"left right"`` cut at its first space after the first character, as llama.cpp cuts it (a piece
    that is itself a space stays whole)."""
    cut = merge.find(" ", 1)
    if cut < 0:
        raise CheckpointError(f"{where}: malformed BPE merge {merge!r} in tokenizer.ggml.merges")
    return merge[:cut], merge[cut + 1:]


def _escaped_space_bpe(meta: Metadata, tokens: list[str], types: list[int], name: str,
                       newline_runs_whole: bool) -> tuple[Any, list[Any]]:
    """BPE over raw characters with the file's merges, each space written ``\u2581`` (no space put before the text),
    ``<0xNN>`` byte pieces for what no piece spells (llama.cpp's ``escape_whitespaces`` without ``byte_encode``).
    With ``newline_runs_whole``, runs of newlines that are tokens are matched whole (added tokens, which the
    converter writes as plain ones)."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    where = meta.where
    merges_raw = meta.get("tokenizer.ggml.merges")
    if not merges_raw:
        raise CheckpointError(f"{where}: a {name} GGUF tokenizer needs its merges (tokenizer.ggml.merges); the file "
                              "lists none")
    vocab: dict[str, int] = {}
    added: list[Any] = []
    for index, (token, token_type) in enumerate(zip(tokens, types)):
        if token_type in _MATCHED_WHOLE:
            added.append(_added_token(meta, token, token_type))
        elif newline_runs_whole and token and not token.strip("\n"):
            added.append(_added_token(meta, token, _TOKEN_USER_DEFINED))
        vocab.setdefault(token, index)
    merges = [_split_merge(m, where) for m in merges_raw]
    merges = [(left, right) for left, right in merges if left in vocab and right in vocab and left + right in vocab]
    unknown = _token_id(meta, tokens, "unknown", None)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=True, byte_fallback=True,
                               unk_token=None if unknown is None else tokens[unknown]))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok, added


def _gemma4_model(meta: Metadata, tokens: list[str], types: list[int]) -> tuple[Any, list[Any]]:
    """Gemma 4's ('gemma4'), as transformers' GemmaTokenizer runs it. Runs of newlines that are tokens are matched
    whole, as llama.cpp matches them (its Gemma 4 fix) and Gemma's tokenizer.json holds them."""
    return _escaped_space_bpe(meta, tokens, types, "Gemma 4 ('gemma4')", newline_runs_whole=True)


def _space_escaping_model(meta: Metadata, tokens: list[str], types: list[int]) -> tuple[Any, list[Any]]:
    """A 'gpt2' file whose pre-tokenizer (Sarvam-MoE's) runs BPE as Gemma 4's does, the text cut into lines and
    newline runs first (llama.cpp's split for it)."""
    from tokenizers import Regex, pre_tokenizers

    tok, added = _escaped_space_bpe(meta, tokens, types, f"{meta.get('tokenizer.ggml.pre')!r}",
                                    newline_runs_whole=False)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[^\n]+|[\n]+"), behavior="isolated", invert=False)
    return tok, added


#: Byte-level ('gpt2') pre-tokenizers llama.cpp runs on raw UTF-8 with spaces escaped instead (``byte_encode``
#: off, ``escape_whitespaces`` on).
_SPACE_ESCAPING = frozenset(("sarvam-moe",))


_TOKENIZER_MODELS = {"gpt2": _byte_level_model, "llama": _sentencepiece_model, "gemma4": _gemma4_model}


#: A file of the converted folder, written by a call given its path.
FileWriter = Callable[[Path], None]


def build_tokenizer(meta: Metadata, tokens: list[str]) -> tuple[dict[str, FileWriter], dict[str, Any]]:
    """The tokenizer files equal to the tokenizer the GGUF describes (a ``tokenizer.json``, or an RWKV world
    vocabulary), and its tokenizer_config entries."""
    where = meta.where
    kind = meta.get("tokenizer.ggml.model")
    if kind not in (*_TOKENIZER_MODELS, "rwkv"):
        raise UnsupportedFeatureError(
            f"{where}: GGUF tokenizer model {kind!r} is not supported; Ferrum's GGUF import rebuilds "
            "byte-level BPE ('gpt2'), sentencepiece BPE ('llama'), Gemma 4's ('gemma4') and RWKV world ('rwkv') "
            "tokenizers"
        )
    types = meta.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise CheckpointError(f"{where}: {len(tokens)} tokens but {len(types)} token types")
    if kind == "rwkv":
        vocab, added = _world_vocab(meta, tokens, types)
        config = _tokenizer_config(meta, tokens, kind, add_bos=False, add_eos=False)
        config.update(tokenizer_class="RwkvTokenizer", added_tokens_decoder=added)
        return {WORLD_VOCAB: lambda path: write_world_vocab(path, vocab)}, config
    tok, config = _tokenizers_model(meta, tokens, types, kind)
    return {"tokenizer.json": lambda path: tok.save(str(path))}, config


#: What llama.cpp's converter writes for the ids past an RWKV world vocabulary, up to the embedding's rows.
_TOKEN_UNUSED = 5


def _world_vocab(meta: Metadata, tokens: list[str], types: list[int]) -> tuple[dict[int, bytes], dict[str, Any]]:
    """The vocabulary file's tokens (llama.cpp's converter writes each as its bytes literal, quotes dropped:
    ``\\n``, ``\\xe4``...) and tokenizer_config's added tokens (id 0, the end of text, named ``<s>``). llama.cpp's
    RWKV tokenizer adds no BOS."""
    vocab: dict[int, bytes] = {}
    added: dict[str, Any] = {}
    for token_id, (token, token_type) in enumerate(zip(tokens, types)):
        if token_type in _MATCHED_WHOLE:
            added[str(token_id)] = {"content": token, "special": token_type != _TOKEN_USER_DEFINED}
        elif token_type != _TOKEN_UNUSED:
            vocab[token_id] = _unescaped(token, meta.where)
    return vocab, added


_ESCAPES = {ord("t"): 9, ord("n"): 10, ord("r"): 13}
_HEX_DIGITS = frozenset(b"0123456789abcdef")  # lower case, as repr writes them and llama.cpp reads them


def _unescaped(token: str, where: str) -> bytes:
    """A token as llama.cpp's ``llama_unescape_rwkv_token`` reads it: ``\\t \\n \\r``, ``\\xHH`` a byte, a backslash
    before anything else that character; the release's zero-length tokens (its last ids) stay empty."""
    text, out, i = token.encode("utf-8"), bytearray(), 0
    while i < len(text):
        if text[i] != ord("\\"):
            out.append(text[i])
            i += 1
            continue
        escaped, digits = text[i + 1:i + 2], text[i + 2:i + 4]
        if not escaped or (escaped == b"x" and not (len(digits) == 2 and set(digits) <= _HEX_DIGITS)):
            raise CheckpointError(f"{where}: RWKV token {token!r} holds a broken escape at character {i}")
        out.append(int(digits, 16) if escaped == b"x" else _ESCAPES.get(escaped[0], escaped[0]))
        i += 4 if escaped == b"x" else 2
    return bytes(out)  # empty for the release's zero-length tokens, which never match


def _tokenizers_model(meta: Metadata, tokens: list[str], types: list[int], kind: str) -> tuple[Any, dict[str, Any]]:
    """The ``tokenizers.Tokenizer`` of a BPE or sentencepiece GGUF, and its tokenizer_config entries."""
    from tokenizers import processors

    where = meta.where
    space_escaping = kind == "gpt2" and meta.get("tokenizer.ggml.pre") in _SPACE_ESCAPING
    tok, added = (_space_escaping_model if space_escaping else _TOKENIZER_MODELS[kind])(meta, tokens, types)
    special = [t for t in added if t.special]
    plain = [t for t in added if not t.special]
    if special:
        tok.add_special_tokens(special)
    if plain:
        tok.add_tokens(plain)

    bos, eos = _token_of(meta, tokens, kind, "bos"), _token_of(meta, tokens, kind, "eos")
    # llama.cpp adds BOS to a sentencepiece vocabulary, Gemma 4's, and Llama 3's and its kin's, unless the file says
    # otherwise
    adds_bos = kind in ("llama", "gemma4") or meta.get("tokenizer.ggml.pre") in _ADDS_BOS
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", adds_bos))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if (add_bos and bos is None) or (add_eos and eos is None):
        raise CheckpointError(f"{where}: the tokenizer adds BOS/EOS but names no such token")
    processor = bos_eos_processor(tok, bos, eos, add_bos, add_eos)
    if processor is not None:
        tok.post_processor = processor
    elif kind == "gpt2" and not space_escaping:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok, _tokenizer_config(meta, tokens, kind, add_bos, add_eos)


def _token_of(meta: Metadata, tokens: list[str], kind: str, key: str) -> str | None:
    """The text of the file's ``key`` token (bos, eos, unknown, padding)."""
    token_id = _token_id(meta, tokens, key, _SPM_DEFAULT_IDS.get(key) if kind == "llama" else None)
    return None if token_id is None else tokens[token_id]


def _tokenizer_config(meta: Metadata, tokens: list[str], kind: str, add_bos: bool, add_eos: bool) -> dict[str, Any]:
    """tokenizer_config.json: the special tokens the file names, whether BOS/EOS are added, its chat templates."""
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
    }
    for key, name in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"), ("padding", "pad_token")):
        text = _token_of(meta, tokens, kind, key)
        if text is not None:
            tokenizer_config[name] = text
    templates = {"default": meta.get("tokenizer.chat_template")}  # and llama.cpp's named ones (tool_use, rag...)
    templates.update({key.removeprefix("tokenizer.chat_template."): meta.get(key)
                      for key in meta.keys("tokenizer.chat_template.")})
    templates = {name: text for name, text in templates.items() if isinstance(text, str) and text}
    if list(templates) == ["default"]:
        tokenizer_config["chat_template"] = templates["default"]
    elif templates:
        tokenizer_config["chat_template"] = [{"name": name, "template": text} for name, text in templates.items()]
    return tokenizer_config


def _token_id(meta: Metadata, tokens: list[str], key: str, default: int | None) -> int | None:
    """The id of the file's ``key`` token (bos, eos, unknown...), else ``default``, as llama.cpp takes them: an
    id outside the vocabulary is one not given."""
    for token_id in (meta.get(f"tokenizer.ggml.{key}_token_id"), default):
        if token_id is not None and 0 <= token_id < len(tokens):
            return int(token_id)
    return None


def stop_token_ids(meta: Metadata, tokens: list[str]) -> list[int]:
    """The ids generation ends at, as llama.cpp gathers them: the file's EOS / EOT / EOM, every end-of-turn token
    it knows, and the fill-in-the-middle tokens that end a completion; not harmony's ``<|end|>``."""
    ids = {token: i for i, token in enumerate(tokens)}
    named = [meta.get(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
    for key, spellings in _FIM_STOPS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        found = next((ids[s] for s in spellings if s in ids), None)
        named.append(token_id if token_id is not None and 0 <= token_id < len(tokens) else found)
    stops = [int(token_id) for token_id in named if token_id is not None]
    stops += [i for i, token in enumerate(tokens) if token in _END_OF_GENERATION]
    if all(end in ids for end in _HARMONY_ENDS) and "<|end|>" in ids:
        stops = [i for i in stops if tokens[i] != "<|end|>"]
    return list(dict.fromkeys(stops))
