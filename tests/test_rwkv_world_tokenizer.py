"""RWKV's world tokenizer (fla-hub's RWKV-7 releases ship ``rwkv_vocab_v20230424.txt`` and remote code, no
tokenizer.json; llama.cpp's GGUF tokenizer model 'rwkv'): a small vocabulary written here in the release's form (str
and bytes literals, all 256 single bytes, pieces of characters), Ferrum's ids against a greedy longest match written
here over the text's bytes, decode and streaming decode, the end-of-text token, the chat template, a generate and a
JSON-schema output through ``ferrum.load`` on a tiny random RWKV-7 carrying only the vocabulary, and the GGUF
import, which writes the release's file back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ferrum.errors import InvalidRequestError
from ferrum.tokenizer import IncrementalDetokenizer, Tokenizer

END = "<|rwkv_tokenizer_end_of_text|>"
#: Multi-byte tokens after the 256 single bytes (ids 1..256, as the release numbers them): greedy traps ("abcde"
#: beside "bcdef", no "abcd"), whitespace runs, quotes and a backslash, characters whole and in pieces.
PIECES = [b"ab", b"abc", b"abcde", b"bcdef", b"\n\n", b"  ", b"    ", b" \n", b"\t\r", b"'\"\\", b"{\"", b"\":",
          b"\"}", b" the", b"The", "你好".encode(), "你".encode()[:2], "好".encode()[1:], "é".encode(),
          "😀".encode(), "😀".encode()[:3], b"User", b"Assistant", b": "]
VOCAB = {**{i + 1: bytes([i]) for i in range(256)}, **{257 + i: p for i, p in enumerate(PIECES)}}
ROWS = 288  # the model's embedding rows: more than the vocabulary's ids, as the releases' 65536 over 65530
TEMPLATE = ("{{ '" + END + "' }}{% for message in messages %}{% if message['role'] == 'user' %}"
            "{{ 'User: ' + message['content'] + '\\n\\n' }}{% else %}{{ 'Assistant: ' + message['content'] + "
            "'\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
#: fla-hub's tokenizer_config.json, as its releases set it (eos "\n\n", which the vocabulary holds).
CONFIG = {"added_tokens_decoder": {"0": {"content": END, "lstrip": False, "normalized": False, "rstrip": False,
                                         "single_word": False, "special": True}},
          "auto_map": {"AutoTokenizer": ["hf_rwkv_tokenizer.RwkvTokenizer", None]}, "bos_token": END,
          "eos_token": "\n\n", "unk_token": END, "tokenizer_class": "RwkvTokenizer", "chat_template": TEMPLATE}
TEXTS = ["abcdef abcd abc ab a bcdefg", "你好, 你! 好 é e\u0301 😀😀 😃", "  \n\n\t\r    x \n \n\n\n",
         "'\"\\ {\"a\": 1}", "The the  the\tTHE", "", "\x00\x7f\x1b[0m", "User: hi\n\nAssistant: ok"]


def _random_text(seed: int) -> str:
    pool = list("abcdef \n\t'\"\\{}:你好é😀😃\u0301\x00") + [chr(c) for c in (0x80, 0x7ff, 0x800, 0xffff, 0x10000)]
    rng = np.random.RandomState(seed)
    return "".join(pool[i] for i in rng.randint(0, len(pool), size=300))


def greedy(text: str, vocab: dict[int, bytes] = VOCAB) -> list[int]:
    """The reference: at each byte the longest token the bytes there start with (StopIteration where none does)."""
    by_bytes = {token: i for i, token in vocab.items()}
    longest = max(map(len, by_bytes))
    data, ids, i = text.encode("utf-8"), [], 0
    while i < len(data):
        token = next(data[i:i + n] for n in range(longest, 0, -1) if data[i:i + n] in by_bytes)
        ids.append(by_bytes[token])
        i += len(token)
    return ids


def release_lines(vocab: dict[int, bytes]) -> str:
    """The release's file: ``<id> <literal> <byte length>``, a str literal where the token is UTF-8 text, lines
    ending in CRLF (rwkv_vocab_v20230424.txt's as the rwkv package ships it)."""
    def literal(token: bytes) -> str:
        try:
            return repr(token.decode("utf-8"))
        except UnicodeDecodeError:
            return repr(token)
    return "".join(f"{i} {literal(t)} {len(t)}\r\n" for i, t in sorted(vocab.items()))


def write_world(folder: Path, vocab: dict[int, bytes] = VOCAB, config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rwkv_vocab_v20230424.txt").write_bytes(release_lines(vocab).encode("utf-8"))
    (folder / "tokenizer_config.json").write_text(json.dumps(CONFIG if config is None else config))
    return folder


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer(write_world(tmp_path_factory.mktemp("world")))


def test_the_file_holds_both_literal_kinds():
    lines = release_lines(VOCAB).splitlines()
    assert "1 '\\x00' 1" in lines and "256 b'\\xff' 1" in lines and any(" b'\\xe4\\xbd' 2" in x for x in lines)


@pytest.mark.parametrize("text", TEXTS + [_random_text(seed) for seed in range(4)])
def test_ids_are_the_greedy_longest_match_over_the_bytes(tok, text):
    want = greedy(text)
    assert tok.encode(text, add_special_tokens=False) == want
    assert tok.encode(text) == want  # the release's class adds no BOS unless add_bos_token says so
    assert tok.decode(want) == text


def test_greedy_is_not_the_fewest_tokens(tok):
    """"abcdef" is "abcde" + "f", not "a" + "bcdef": the first match is taken whole."""
    ids = tok.encode("abcdef", add_special_tokens=False)
    assert [VOCAB[i] for i in ids] == [b"abcde", b"f"]


def test_the_end_of_text_token_is_id_0_matched_whole(tok):
    text = "hi" + END + "User: a\n\nAssistant:"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == greedy("hi") + [0] + greedy("User: a\n\nAssistant:")
    assert tok.decode(ids) == text.replace(END, "") and tok.decode(ids, skip_special_tokens=False) == text
    assert tok.char_starts(text)[:4] == [0, 1, 2, len(END) + 2]
    assert tok.is_special(0) and tok.token_to_id(END) == 0 and tok.bos_token == END


def test_eos_is_the_vocabulary_s_blank_line_not_a_new_token(tok):
    """transformers' RwkvTokenizer appends its eos_token "\\n\\n" as a new token the model never saw; Ferrum ends at
    the vocabulary's."""
    blank = 257 + PIECES.index(b"\n\n")
    assert tok.eos_token_ids == {blank} and tok.encode("\n\n") == [blank] and not tok.is_special(blank)
    assert tok.vocab_size == max(VOCAB) + 1


def test_add_bos_token_adds_id_0(tmp_path):
    tok = Tokenizer(write_world(tmp_path, config={**CONFIG, "add_bos_token": True}))
    assert tok.encode("ab") == [0] + greedy("ab") and tok.encode("ab", add_special_tokens=False) == greedy("ab")


def test_char_starts_point_into_the_text(tok):
    text = "你好 ab 😀x"  # 😀 is a 3-byte piece and a byte: both start in its character
    ids, starts = tok.encode(text, add_special_tokens=False), tok.char_starts(text, add_special_tokens=False)
    assert len(starts) == len(ids) and starts == sorted(starts)
    spelled = b""
    for i, start in zip(ids, starts):
        assert len(text[:start].encode()) <= len(spelled) < len(text[:start + 1].encode())
        spelled += VOCAB[i]


@pytest.mark.parametrize("seed", range(3))
def test_streaming_decode_equals_one_shot(tok, seed):
    """Ids drawn at random (pieces of characters among them, so bytes that are no UTF-8 too), and a text's own."""
    rng = np.random.RandomState(seed)
    runs = [rng.randint(0, max(VOCAB) + 1, size=60).tolist(), tok.encode("你好 😀 é" + _random_text(seed))]
    for ids in runs:
        detokenizer = IncrementalDetokenizer(tok)
        assert "".join(detokenizer.push(t) for t in ids) + detokenizer.flush() == tok.decode(ids)


def test_a_character_split_across_tokens_is_held_until_it_completes(tok):
    ids = tok.encode("你x", add_special_tokens=False)
    assert [VOCAB[i] for i in ids] == ["你".encode()[:2], "你".encode()[2:], b"x"]
    assert tok.decode(ids[:1]) == "\ufffd" and tok.token_bytes(ids[0]) == "你".encode()[:2]
    detokenizer = IncrementalDetokenizer(tok)
    assert [detokenizer.push(t) for t in ids] == ["", "你", "x"]


def test_a_byte_no_token_starts_with_is_refused_as_the_release_fails(tmp_path):
    vocab = {1: b"ab", 2: b"c", 3: b"abc"}
    tok = Tokenizer(write_world(tmp_path, vocab, config={}))
    assert tok.encode("abcab") == greedy("abcab", vocab) == [3, 1]
    with pytest.raises(StopIteration):
        greedy("abd", vocab)
    with pytest.raises(InvalidRequestError, match="byte 0x64 at byte 2"):
        tok.encode("abd")


def test_the_chat_template_renders_and_encodes(tok):
    ids = tok.encode_chat([{"role": "user", "content": "你好"}])
    assert ids == [0] + greedy("User: 你好\n\nAssistant:")


def test_a_malformed_line_is_refused_by_its_number(tmp_path):
    from ferrum.errors import ConfigError

    write_world(tmp_path)
    path = tmp_path / "rwkv_vocab_v20230424.txt"
    path.write_bytes(path.read_bytes() + b"300 'abc' 4\r\n")
    with pytest.raises(ConfigError, match="line 281"):
        Tokenizer(tmp_path)


@pytest.mark.parametrize("line, words", [
    (b"281 '\\ud800' 3", "line 281: .* a UTF-8 token of that length"),  # a lone surrogate
    (b"1000000000 'zz' 2", "line 281: .* an id of at most the file's 282 lines"),  # the logits' width, by one id
    (b"281 '" + b"a" * 129 + b"' 129", "line 281: a token of 129 bytes; Ferrum reads tokens of at most 128"),
])
def test_a_hostile_line_is_refused_by_its_number(tmp_path, line, words):
    from ferrum.errors import ConfigError

    write_world(tmp_path)
    path = tmp_path / "rwkv_vocab_v20230424.txt"
    path.write_bytes(path.read_bytes() + line + b"\r\n")
    with pytest.raises(ConfigError, match=words):
        Tokenizer(tmp_path)


def test_the_release_s_longest_token_is_read(tmp_path):
    vocab = {**VOCAB, 281: b" " * 128}
    write_world(tmp_path, vocab)
    ids = Tokenizer(tmp_path).encode(" " * 130, add_special_tokens=False)
    assert ids == greedy(" " * 130, vocab) and ids[0] == 281


def test_zero_length_tokens_never_match_and_decode_to_nothing(tmp_path):
    """A public copy of the release's file ends with two zero-length tokens (``65530 '' 0``, ``65531 '' 0``); its
    own tokenizer reads them as ids its trie never reaches, each decoding to nothing: so does Ferrum."""
    vocab = {**VOCAB, 281: b"", 282: b""}
    write_world(tmp_path, vocab)
    assert release_lines(vocab).endswith("281 '' 0\r\n282 '' 0\r\n")
    tok = Tokenizer(tmp_path)
    for text in TEXTS + [_random_text(3)]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == greedy(text, vocab) == greedy(text) and not {281, 282} & set(ids)
    assert tok.vocab_size == 283 and tok.token_bytes(281) == tok.token_bytes(282) == b""
    assert tok.decode([257, 281, 258, 282]) == "ababc" and tok.token_to_id("") is None


@pytest.mark.parametrize("token_id, content, words", [
    ("281", "\ud800", "added token 281 .* is not UTF-8 text"),
    ("1000000000", "<extra>", "has id 1000000000, past 282"),
])
def test_a_hostile_added_token_is_refused(tmp_path, token_id, content, words):
    from ferrum.errors import ConfigError

    added = {**CONFIG["added_tokens_decoder"], token_id: {"content": content, "special": True}}
    write_world(tmp_path, config={**CONFIG, "added_tokens_decoder": added})
    with pytest.raises(ConfigError, match=words):
        Tokenizer(tmp_path)


# --------------------------------------------------------------- a model carrying only the vocabulary

@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(folder, mlx-lm's model): a tiny random RWKV-7 (tests/test_rwkv7.py's) whose tokenizer is the vocabulary."""
    pytest.importorskip("mlx_lm")
    from mlx_lm_release import write_release
    from test_rwkv7 import CONFIG as MODEL, _mlx_lm_model, _release_names

    config = {**MODEL, "vocab_size": ROWS}
    model, folder = _mlx_lm_model(config), tmp_path_factory.mktemp("release")
    write_release(folder, model, config, [1, 2, 3], _release_names)
    for name in ("tokenizer.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    write_world(folder)
    return folder, model


def test_a_release_carrying_only_the_vocabulary_generates(release):
    import ferrum
    from ferrum.world_tokenizer import WorldTokenizer
    from mlx_lm_release import MlxLmReference

    folder, model = release
    llm = ferrum.load(folder, backend="cpu", dtype="float32")
    assert isinstance(llm.tokenizer, WorldTokenizer)
    prompt = "User: 你好 the\n\nAssistant:"
    out = llm.run([prompt], max_tokens=6, ignore_eos=True)[0]
    import torch

    want = MlxLmReference(model).generate(torch.tensor([greedy(prompt)]), max_new_tokens=6)[0].tolist()
    assert list(out.token_ids) == want[-6:]
    assert out.text == b"".join(VOCAB.get(t, b"") for t in want[-6:]).decode("utf-8", "replace")


def test_structured_output_follows_a_json_schema(release):
    import ferrum
    from ferrum.sampling import SamplingParams
    from ferrum.structured import matcher_for

    pytest.importorskip("llguidance")
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "s": {"type": "string", "maxLength": 5}},
              "required": ["n", "s"], "additionalProperties": False, "x-guidance": {"whitespace_flexible": False}}
    llm = ferrum.load(release[0], backend="cpu", dtype="float32")
    out = llm.run(["User: json\n\nAssistant:"], max_tokens=60, json_schema=schema)[0]
    value = json.loads(out.text)
    assert set(value) == {"n", "s"} and 0 <= value["n"] <= 99 and len(value["s"]) <= 5
    replay = matcher_for(SamplingParams(json_schema=schema), llm.tokenizer, ROWS, llm.tokenizer.eos_token_ids)
    # the forced start '{"n":' is allowed only as the tokenizer spells it (llguidance asks the trie), so as '{"'
    allowed = set(range(ROWS)) - set(replay.forbidden().tolist())
    assert allowed == {greedy('{"n":')[0]} == {257 + PIECES.index(b'{"')}
    inside = matcher_for(SamplingParams(json_schema=schema), llm.tokenizer, ROWS, llm.tokenizer.eos_token_ids)
    for token in greedy('{"n":12,"s":"'):
        inside.consume(token)
    allowed = set(range(ROWS)) - set(inside.forbidden().tolist())
    assert {ord("a") + 1, 257 + PIECES.index(b"abc")} <= allowed and max(allowed) <= max(VOCAB)  # none past it
    for token in out.token_ids:
        assert token not in set(replay.forbidden().tolist())
        replay.consume(token)


# --------------------------------------------------------------- llama.cpp's GGUF ('rwkv')

def _add_world_vocab(w, vocab: dict[int, bytes] = VOCAB) -> None:
    """The vocabulary as llama.cpp's converter writes it (_set_vocab_rwkv_world): id 0 "<s>" a control token, each
    token its bytes literal without the quotes, "[PADn]" unused ids up to the rows; BOS = EOS = 0, EOT "\\n\\n"."""
    tokens = ["<s>"] + [repr(vocab[i])[2:-1] for i in range(1, max(vocab) + 1)]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), ROWS)]
    w.add_tokenizer_model("rwkv")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * max(vocab) + [5] * (ROWS - max(vocab) - 1))
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_eot_token_id(257 + PIECES.index(b"\n\n"))


def test_the_gguf_import_writes_the_release_s_vocabulary(tmp_path):
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("mlx_lm")
    from ferrum.gguf_import import convert_gguf
    from mlx_lm_release import parameters
    from test_gguf_rwkv7 import _rwkv7_gguf
    from test_rwkv7 import CONFIG as MODEL, _mlx_lm_model

    config = {**MODEL, "vocab_size": ROWS}
    # the release's last ids are zero-length tokens (65530, 65531 in rwkv_vocab_v20230424.txt): kept, never matched
    vocab = {**VOCAB, max(VOCAB) + 1: b"", max(VOCAB) + 2: b""}
    _rwkv7_gguf(tmp_path / "m.gguf", parameters(_mlx_lm_model(config)), config, gguf.GGMLQuantizationType.F32,
                vocab=lambda w: _add_world_vocab(w, vocab))
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert (out / "rwkv_vocab_v20230424.txt").read_bytes() == release_lines(vocab).encode("utf-8")
    assert not (out / "tokenizer.json").exists()
    tok = Tokenizer(out)
    text = "<s>User: 你好 abcdef\n\nAssistant:"  # llama.cpp matches its control token "<s>" whole
    assert tok.encode(text) == [0] + greedy(text[3:])  # and adds no BOS
    blank = 257 + PIECES.index(b"\n\n")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [0, blank]
    assert tok.eos_token_ids == {0, blank}
