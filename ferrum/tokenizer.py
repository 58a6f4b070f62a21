"""The checkpoint's tokenizer (``tokenizer.json``, ``tokenizer.model``, PLaMo's ``tokenizer.jsonl``, tiktoken ranks or
an RWKV world vocabulary), chat template and streaming decode."""

from __future__ import annotations

import codecs
import json
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

from ferrum.bpe_vocab import bytes_to_unicode
from ferrum.checkpoint import require_regular_file
from ferrum.config import eos_token_ids
from ferrum.errors import ChatTemplateError, ConfigError, ContextLengthExceededError, InvalidRequestError
from ferrum.tokenizer_files import load_tokenizer, reads_world_vocab

Message = dict[str, Any]


def _token_text(value: Any, name: str, path: Path) -> str | None:
    """tokenizer_config stores special tokens as strings or as AddedToken dicts; anything else is refused."""
    text = value.get("content") if isinstance(value, dict) else value
    if text is not None and not isinstance(text, str):
        raise ConfigError(f"{path}: {name} must be the token's text (or an AddedToken with its 'content'), "
                          f"got {value!r}")
    return text


#: Where transformers keeps a checkpoint's chat templates other than the default, one ``<name>.jinja`` each.
NAMED_TEMPLATES = "additional_chat_templates"
#: What :meth:`Tokenizer.apply_chat_template` passes a template itself; template kwargs may not replace them.
_TEMPLATE_VARIABLES = frozenset({"messages", "add_generation_prompt", "bos_token", "eos_token", "tools"})
#: The other special tokens of tokenizer_config.json a template may read (transformers passes them all).
_OTHER_SPECIAL_TOKENS = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    """Encode/decode with the checkpoint's own tokenizer (``tokenizer.json``, or what :mod:`ferrum.tokenizer_files`
    builds from a sentencepiece or tiktoken file). A folder whose tokenizer is an RWKV world vocabulary, which the
    tokenizers library cannot run, gets :class:`ferrum.world_tokenizer.WorldTokenizer`."""

    def __new__(cls, folder: str | Path | None = None) -> "Tokenizer":  # None: copy and pickle make one bare
        if cls is Tokenizer and folder is not None and reads_world_vocab(Path(folder)):
            from ferrum.world_tokenizer import WorldTokenizer

            cls = WorldTokenizer
        return super().__new__(cls)

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json") or {}
        self._tok, named = self._read_files(folder, config)
        #: tokenizer_config.json, with the special tokens a sentencepiece or tiktoken file names where it names none.
        self.config: dict[str, Any] = {**named, **config}
        where = folder / "tokenizer_config.json"
        self.bos_token = _token_text(self.config.get("bos_token"), "bos_token", where)
        self.eos_token = _token_text(self.config.get("eos_token"), "eos_token", where)
        specials = {name: _token_text(self.config.get(name), name, where) for name in _OTHER_SPECIAL_TOKENS}
        self._template_specials = {name: value for name, value in specials.items() if value is not None}
        named = self._named_templates(self.config.get("chat_template"), folder)
        # Several named templates and none "default": transformers refuses to pick one for a plain chat.
        self.chat_template = named.get("default") or (next(iter(named.values())) if len(named) == 1 else None)
        self._template_names = sorted(named)
        #: What a request with tools renders: the "tool_use" template where the checkpoint names one, as
        #: transformers picks it.
        self.tool_chat_template = named.get("tool_use") or self.chat_template
        self.eos_token_ids = self._eos_ids(folder)

    @staticmethod
    def _read_files(folder: Path, config: dict[str, Any]) -> tuple[Any, dict[str, str]]:
        """The tokenizer the folder's files hold, and the special tokens they name (:func:`load_tokenizer`)."""
        return load_tokenizer(folder, config)

    @staticmethod
    def _named_templates(value: Any, folder: Path) -> dict[str, str]:
        """The checkpoint's chat templates by name: ``chat_template.jinja`` and
        ``additional_chat_templates/<name>.jinja`` (which win, as in transformers: a repo fixes its template there
        and leaves the old one in the config), else
        tokenizer_config.json's (one string is "default", or a list of named ones), else ``chat_template.json``'s
        (where the processors of vision-language models keep it)."""
        named = folder / NAMED_TEMPLATES
        files = sorted(named.glob("*.jinja")) if named.is_dir() else []
        if (folder / "chat_template.jinja").exists():
            files.append(folder / "chat_template.jinja")
        for f in files:
            require_regular_file(f, ConfigError)
        if files:
            value = {("default" if f.name == "chat_template.jinja" else f.stem): f.read_text(errors="replace")
                     for f in files}
        elif isinstance(value, list):
            value = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        elif value is not None:
            value = {"default": value}
        else:
            processor = _read_json(folder / "chat_template.json")
            value = {"default": processor["chat_template"]} if processor and "chat_template" in processor else {}
        if not all(isinstance(name, str) and isinstance(text, str) for name, text in value.items()):
            raise ConfigError(f"{folder / 'tokenizer_config.json'}: chat_template must be a string or a list of "
                              "named templates ({\"name\": ..., \"template\": ...})")
        return {name: text for name, text in value.items() if text.strip()}  # an empty one is none, as in transformers

    def _eos_ids(self, folder: Path) -> frozenset[int]:
        ids: set[int] = set()
        if self.eos_token is not None and self.token_to_id(self.eos_token) is not None:
            ids.add(self.token_to_id(self.eos_token))
        gen = _read_json(folder / "generation_config.json")
        if gen is not None:
            ids.update(eos_token_ids(gen.get("eos_token_id"), self.vocab_size, str(folder / "generation_config.json")))
        return frozenset(ids)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def to_json(self) -> str:
        """The tokenizer as ``tokenizer.json`` text (for libraries that build their own view of it)."""
        return self._tok.to_str()

    def for_llguidance(self, n_vocab: int) -> Any:
        """What llguidance's ``LLTokenizer`` is built from for logits ``n_vocab`` wide: the tokenizer.json text."""
        return self.to_json()

    def encode(self, text: str, add_special_tokens: bool = True, max_tokens: int | None = None) -> list[int]:
        """The text's token ids. Through ``encode_batch``, which releases the GIL while it works (``encode`` holds
        it: a server's other threads, the event loop streaming replies among them, stopped for 1.5 s while a
        600,000-token text was encoded in a worker thread). With ``max_tokens`` (a context length), a text too long
        to fit in that many tokens is refused before it is encoded: 50 MB of text took 134 s and 6 GB to encode
        before the engine found it did not fit."""
        if max_tokens is not None and len(text) > max_tokens * self.longest_token_chars:
            raise ContextLengthExceededError(
                f"the text has {len(text)} characters, more than {max_tokens} tokens can hold (this tokenizer's "
                f"longest token has {self.longest_token_chars}), so it cannot fit in the context length of "
                f"{max_tokens}; shorten it", param="prompt")
        return self._encode(text, add_special_tokens)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        try:
            return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        except TypeError:  # tokenizers says "TextInputSequence must be str" for text it cannot read as UTF-8
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise not_unicode(text, exc) from None
            raise

    @cached_property
    def longest_token_chars(self) -> int:
        """The most characters of text one token stands for (a byte-level vocabulary's entries spell one
        character per byte, so they count at least the characters they stand for)."""
        return max(map(len, self._tok.get_vocab(with_added_tokens=True)), default=1)

    def char_starts(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Where each of :meth:`encode`'s tokens of ``text`` starts in it (an added special token at 0): a token
        spelling a special token's text, or normalized text, still points into ``text`` as written."""
        return [start for start, _ in self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].offsets]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def special_token_id(self, text: str) -> int | None:
        """The id of the special token spelled ``text`` (``[TOOL_CALLS]``, ``<|python_tag|>``...), or None."""
        return self._special_ids.get(text)

    @cached_property
    def writes_harmony(self) -> bool:
        """Whether the model's chat replies are OpenAI's harmony messages (gpt-oss): its vocabulary has their
        four markers as special tokens. A reply is read by those markers, so it must decode with them."""
        return all(self.special_token_id(m) is not None for m in ("<|start|>", "<|channel|>", "<|message|>", "<|end|>"))

    def added_token_id(self, text: str) -> int | None:
        """The id of the added token spelled ``text``, special or not (Qwen's ``<tool_call>`` is not), or None:
        the tokenizer matches it whole in text, so a grammar must ask for that id, not for its letters."""
        return self._added_ids.get(text)

    @cached_property
    def _added_ids(self) -> dict[str, int]:
        return {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}

    @cached_property
    def _special_ids(self) -> dict[str, int]:
        return {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` is a special token (which decoding leaves out by default)."""
        return token_id in self._special_id_set

    @cached_property
    def _special_id_set(self) -> frozenset[int]:
        return frozenset(self._special_ids.values())

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token stands for (a part of a UTF-8 character, possibly).

        Decoding a single token cannot say this: a token holding half a
        character decodes to U+FFFD. The pieces are spelled as the tokenizer's
        decoder reads them: byte-level BPE vocabularies (GPT-2, Llama 3, Qwen,
        SmolLM) spell bytes as printable characters; SentencePiece ones write
        spaces as U+2581 (a Replace or Metaspace step) and raw bytes as
        ``<0xHH>`` (ByteFallback); PLaMo's write spaces as themselves, so its
        U+2581 is that character.
        """
        piece = self._tok.id_to_token(int(token_id))
        if piece is None:
            return b""
        byte_level, space, byte_fallback = self._spelling
        if byte_level:
            table = _unicode_to_byte()
            if all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
            return piece.encode()  # an added token spelt as plain text
        if byte_fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return (piece.replace(space, " ") if space else piece).encode()

    @cached_property
    def _spelling(self) -> tuple[bool, str | None, bool]:
        """From the decoder: whether pieces are byte-level, the character written for a space (or None), and
        whether ``<0xHH>`` pieces are bytes."""
        decoder = json.loads(self._tok.to_str()).get("decoder") or {}
        parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
        kinds = {part.get("type") for part in parts}
        space = next((part.get("replacement") if part.get("type") == "Metaspace" else part["pattern"]["String"]
                      for part in parts if part.get("type") == "Metaspace"
                      or (part.get("type") == "Replace" and part.get("content") == " "
                          and "String" in (part.get("pattern") or {}))), None)
        return "ByteLevel" in kinds, space, "ByteFallback" in kinds

    def use_chat_template(self, source: str) -> None:
        """Render every chat with ``source``, a Jinja chat template, instead of the checkpoint's (a base model's
        missing one, a broken one), as ``--chat-template`` does in vLLM, mlx-lm and llama.cpp; a template that
        does not compile is refused now, not at the first chat."""
        if not isinstance(source, str) or not source.strip():
            raise ConfigError("a chat template must be non-empty Jinja text")
        _compile(source)
        self.chat_template = self.tool_chat_template = source
        self._template_names = []

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                            tools: Sequence[dict[str, Any]] | None = None,
                            template_kwargs: Mapping[str, Any] | None = None) -> str:
        """Render ``messages`` with the checkpoint's Jinja chat template (and ``tools``, OpenAI's function
        definitions, for templates that describe them to the model). ``template_kwargs`` are more variables
        the template reads, e.g. Qwen 3's ``enable_thinking``."""
        source = self.tool_chat_template if tools else self.chat_template
        if not source and self._template_names:
            raise ConfigError(
                f"this checkpoint has chat templates named {', '.join(self._template_names)} and none named "
                "'default', so none is the one for a plain chat (transformers refuses too); add a 'default' one"
            )
        if not source:
            raise ConfigError(
                "this checkpoint has no chat template (tokenizer_config.json: chat_template); "
                "pass a plain string prompt instead of chat messages"
            )
        for m in messages:  # an assistant's turn of tool calls may have no content
            if not isinstance(m, dict) or "role" not in m or not ("content" in m or "tool_calls" in m):
                raise InvalidRequestError(f"chat messages need 'role' and 'content', got {m!r}")
        messages = [_as_templates_read(m) for m in messages]
        from jinja2.exceptions import SecurityError, TemplateError

        from ferrum.template_sandbox import rendered

        extra = dict(template_kwargs or {})
        taken = sorted(set(extra) & _TEMPLATE_VARIABLES)
        if taken:
            raise InvalidRequestError(f"chat template variable {taken[0]!r} is set from the request itself; "
                                      "leave it out of the template kwargs", param="chat_template_kwargs")
        template = _compile(source)
        try:
            return rendered(template.generate(
                **{"documents": None, **self._template_specials, **extra},  # defined, as transformers defines it
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                tools=list(tools) if tools else None,
            ))
        except SecurityError as exc:  # a value past ferrum.template_sandbox.LIMIT: the template is broken or hostile
            raise ChatTemplateError(f"the chat template was stopped: {exc}; fix the template") from None
        except TemplateError as exc:  # the template's raise_exception: it refuses these messages
            raise ChatTemplateError(f"the chat template refused these messages: {exc}") from None
        except Exception as exc:
            raise ChatTemplateError(
                f"the chat template failed on these messages ({type(exc).__name__}: {exc})"
            ) from None

    def encode_chat(self, messages: Sequence[Message], tools: Sequence[dict[str, Any]] | None = None,
                    add_generation_prompt: bool = True, template_kwargs: Mapping[str, Any] | None = None,
                    max_tokens: int | None = None) -> list[int]:
        """The chat's token ids (the template writes BOS itself where the model wants one); ``max_tokens`` as
        :meth:`encode` takes it."""
        text = self.apply_chat_template(messages, add_generation_prompt, tools, template_kwargs)
        return self.encode(text, add_special_tokens=False, max_tokens=max_tokens)


#: The names a message's thinking goes by: Qwen 3's templates read the first, gpt-oss's the second.
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _as_templates_read(message: dict[str, Any]) -> dict[str, Any]:
    """A message as transformers hands it to a template: keys set to None left out (OpenAI's ``content: None``
    beside tool calls; templates print "None", or fail, where they handle a missing key), and its thinking under
    the names templates read it by."""
    message = {key: value for key, value in message.items() if value is not None}
    thought = next((message[key] for key in _REASONING_KEYS if key in message), None)
    if thought is not None:
        message = {"thinking": thought, **message, "reasoning_content": thought}
    return message


def not_unicode(text: str, exc: UnicodeEncodeError) -> InvalidRequestError:
    """The refusal of a text that cannot be encoded as UTF-8."""
    return InvalidRequestError(
        f"the text holds {text[exc.start:exc.end]!a} at character {exc.start}, which is not valid Unicode (a lone "
        "surrogate, e.g. from decoding bytes with errors='surrogateescape'); clean the text first")


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, None when absent; anything else is a ConfigError naming the file."""
    if not path.exists():
        return None
    require_regular_file(path, ConfigError)
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ConfigError(f"{path} is not valid UTF-8 JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path} must hold a JSON object, not {type(value).__name__}")
    return value


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-printable-character table that byte-level BPE vocabularies use."""
    return {char: byte for byte, char in bytes_to_unicode().items()}


_templates: dict[str, Any] = {}

def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """Hugging Face's ``tojson``: JSON without Jinja's HTML escaping, with json.dumps' options."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile(source: str) -> Any:
    """Compile like Hugging Face does: sandboxed Jinja (:mod:`ferrum.template_sandbox`: what a template builds is
    bounded too) with ``raise_exception``, ``strftime_now``, its ``tojson``, ``{% break %}`` / ``{% continue %}`` and
    ``{% generation %}`` blocks."""
    if source not in _templates:
        from jinja2.exceptions import TemplateError
        from jinja2.ext import Extension, loopcontrols

        from ferrum.template_sandbox import BoundedSandbox, bounded_filter

        class Generation(Extension):
            """``{% generation %}...{% endgeneration %}`` marks the assistant's text for training masks; it renders
            as its body."""

            tags = {"generation"}

            def parse(self, parser: Any) -> Any:
                next(parser.stream)
                return parser.parse_statements(("name:endgeneration",), drop_needle=True)

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, Generation])
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)  # Llama 3.x templates date the prompt
        env.filters["tojson"] = bounded_filter("tojson", _tojson)
        try:
            _templates[source] = env.from_string(source)
        except TemplateError as exc:
            raise ConfigError(f"the chat template does not compile: {exc}") from None
    return _templates[source]


class IncrementalDetokenizer:
    """Turns a growing token list into text pieces without splitting characters.

    A multi-byte character can span tokens; until its last byte arrives the
    decoded text ends in U+FFFD, so nothing is emitted. A U+FFFD that no byte can
    complete (the character itself, or bytes that are not UTF-8) goes out at once:
    the tokens' bytes tell the two apart. Decoding a short
    window of recent tokens (not the whole output) keeps each step cheap while
    letting the tokenizer handle spaces between tokens correctly. A window that
    starts past the output's start is decoded after an anchor, the last earlier
    window's text before its read point that shows more than spaces (whole
    characters): a decoder that strips the text's leading
    spaces (sentencepiece's, with remove_extra_whitespaces) then strips none of
    the window's, as it strips none in the middle of the whole output.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_tail: Sequence[int] = (), skip_special_tokens: bool = True):
        self._tok, self._skip = tokenizer, skip_special_tokens
        self._ids: list[int] = list(prompt_tail)[-6:]
        held, self._echo = self._unfinished_character()
        self._prefix = 0  # window start
        self._anchor: list[int] = []  # decoded before the window (see the class docstring)
        self._read = len(self._ids) - held  # tokens already turned into emitted text
        self.earlier = 0  # of the last push's text, the characters earlier tokens hold (see push)

    def _unfinished_character(self) -> tuple[int, str]:
        """How many of the prompt's last tokens hold a character it stops part way through, and the text those
        tokens hold before it. They count as unread: the output that completes the character emits it whole
        (decoding stops the prompt's text at a character, not a token), without that text, which is the
        prompt's."""
        pending = self._pending_bytes()
        if not pending:
            return 0, ""
        covered, held = b"", 0
        for token in reversed(self._ids):
            held += 1
            if self._shown(token):
                covered = self._tok.token_bytes(token) + covered
            if len(covered) >= len(pending):
                break
        return held, covered[: len(covered) - len(pending)].decode("utf-8", "replace")

    def push(self, token: int) -> str:
        """Add one token; return the text it completes (maybe empty). :attr:`earlier` says how much of it the tokens
        held before it hold: bytes of a character this token did not complete, each shown as U+FFFD."""
        self._ids.append(token)
        self.earlier = 0
        prefix_text = self._window(self._read)
        full_text = self._window(len(self._ids))
        if (full_text.endswith("\ufffd") and self._ends_inside_a_character()) or len(full_text) <= len(prefix_text):
            return ""
        if self._read < len(self._ids) - 1:  # tokens held for a character: did this one complete it?
            held_text = self._window(len(self._ids) - 1)
            if full_text.startswith(held_text):  # no: their U+FFFD come first, as they were
                self.earlier = len(held_text) - len(prefix_text)
        if self._anchors(self._ids[self._prefix : self._read]):
            self._anchor = self._ids[self._prefix : self._read]
        self._prefix, self._read = self._read, len(self._ids)
        text = full_text[len(prefix_text) :]
        shown = self._without_echo(text)
        self.earlier = max(0, self.earlier - (len(text) - len(shown)))
        return shown

    def _window(self, end: int) -> str:
        return self._tok.decode(self._anchor + self._ids[self._prefix : end], self._skip)

    def _anchors(self, tokens: list[int]) -> bool:
        """Whether ``tokens`` (whole characters: a window's text before the read point) can stand before a later
        window: they show more than spaces."""
        data = b"".join(self._tok.token_bytes(t) for t in tokens if self._shown(t))
        return bool(data.decode("utf-8", "replace").strip(" "))

    def _without_echo(self, text: str) -> str:
        text, self._echo = text.removeprefix(self._echo), ""
        return text

    def _ends_inside_a_character(self) -> bool:
        return bool(self._pending_bytes())

    def _pending_bytes(self) -> bytes:
        """The bytes the last tokens leave of a UTF-8 character they stop part way through (a character spans at
        most four bytes, so four tokens hold its start); special tokens that decoding leaves out are left out."""
        shown = [t for t in self._ids if self._shown(t)]
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        decoder.decode(b"".join(self._tok.token_bytes(t) for t in shown[-4:]))
        return decoder.getstate()[0]

    def _shown(self, token: int) -> bool:
        return not (self._skip and self._tok.is_special(token))

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character shows as U+FFFD)."""
        prefix_text, full_text = self._window(self._read), self._window(len(self._ids))
        self._prefix = self._read = len(self._ids)
        return self._without_echo(full_text[len(prefix_text) :])

    @classmethod
    def text_before(cls, tokenizer: Tokenizer, prompt: Sequence[int], skip_special_tokens: bool = True) -> str:
        """``prompt`` decoded up to a character its last tokens stop part way through: the text an output
        continuing it follows (the detokenizer emits that character with the output, whole or as U+FFFD), so
        the two joined read as ``prompt + output`` decoded."""
        detokenizer = cls(tokenizer, prompt, skip_special_tokens)
        held = len(detokenizer._ids) - detokenizer._read
        if not held:
            return tokenizer.decode(list(prompt), skip_special_tokens)
        return tokenizer.decode(list(prompt[:-held]), skip_special_tokens) + detokenizer._echo
