"""ferrum.load -> LLM.generate / stream, tokenizer, chat template, detokenizer, stop strings."""

from __future__ import annotations

import codecs
import json
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ferrum
from ferrum.errors import ConfigError, InvalidRequestError
from ferrum.model import DecoderOnlyLLM
from ferrum.stop import StopStringFilter
from ferrum.tokenizer import IncrementalDetokenizer, Tokenizer

from support import write_text_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_text_checkpoint(tmp_path_factory.mktemp("api_ckpt"))


@pytest.fixture(scope="module")
def llm(checkpoint):
    return ferrum.load(checkpoint, backend="cpu")


def greedy_reference(checkpoint, prompt_ids, steps):
    """Greedy decoding written directly against the model, independent of LLM/sampler."""
    model = DecoderOnlyLLM.from_pretrained(checkpoint, backend="cpu")
    logits = model.prefill("ref", prompt_ids)
    out = []
    for i in range(steps):
        token = int(np.argmax(logits))
        if token == 1:  # eos of the test checkpoint
            break
        out.append(token)
        logits = model.decode("ref", token, len(prompt_ids) + i)
    return out


def test_generate_greedy_matches_direct_model_loop(llm, checkpoint):
    prompt = "hello world"
    ids = llm.tokenizer.encode(prompt)
    assert ids[0] == 0  # the tokenizer adds BOS
    expected = greedy_reference(checkpoint, ids, 12)
    assert list(llm.run([ids], ferrum.sampling.SamplingParams(max_tokens=12))[0].token_ids) == expected
    assert llm.generate(prompt, max_tokens=12) == llm.tokenizer.decode(expected)


def test_stream_pieces_join_to_generate(llm):
    pieces = list(llm.stream("the quick brown", max_tokens=20, temperature=0.8, seed=3))
    assert "".join(pieces) == llm.generate("the quick brown", max_tokens=20, temperature=0.8, seed=3)
    assert len(pieces) > 1


def test_seed_makes_sampling_repeatable(llm):
    kwargs = dict(max_tokens=16, temperature=1.0, top_k=50, top_p=0.95)
    assert llm.generate("fox", seed=7, **kwargs) == llm.generate("fox", seed=7, **kwargs)
    outputs = {llm.generate("fox", seed=s, **kwargs) for s in range(5)}
    assert len(outputs) > 1


def test_generation_releases_kv_even_when_stopped_early(llm):
    stream = llm.stream("hello", max_tokens=50)
    next(stream)
    stream.close()
    assert llm.executor.status().active_sequences == 0
    assert llm.executor.status().kv_blocks_used == 0


def test_chat_messages_use_the_template(llm):
    messages = [{"role": "user", "content": "hello"}]
    text = llm.tokenizer.apply_chat_template(messages)
    assert text == "<s><|user|>hello</s><|assistant|>"
    assert llm.encode_prompt(messages) == llm.tokenizer.encode(text, add_special_tokens=False)
    assert llm.encode_prompt("hello", chat=True) == llm.encode_prompt(messages)
    with pytest.raises(InvalidRequestError):
        llm.encode_prompt([{"content": "no role"}])


#: Jinja that Hugging Face's template environment accepts beyond plain Jinja: loop controls, training-mask
#: ``generation`` blocks, ``tojson`` with json.dumps' options, an assistant's tool-call turn without content.
_HF_JINJA = (
    "{%- for m in messages %}{%- if m.role == 'system' %}{% continue %}{% endif %}"
    "{%- if m.role == 'assistant' %}<|assistant|>{% generation %}{{ m.content }}"
    "{%- for c in m.tool_calls or [] %}{{ c.function | tojson(ensure_ascii=True, sort_keys=True) }}{% endfor %}"
    "{% endgeneration %}</s>{%- else %}<|{{ m.role }}|>{{ m.content }}</s>{%- endif %}"
    "{%- if loop.index >= 4 %}{% break %}{% endif %}{%- endfor %}"
    "{%- if tools %}{{ tools | tojson(indent=2, separators=(',', ': ')) }}{% endif %}<|assistant|>"
)


def test_chat_templates_render_hugging_face_jinja_as_transformers_does(tmp_path):
    transformers_templates = pytest.importorskip("transformers.utils.chat_template_utils")
    folder = write_text_checkpoint(tmp_path / "jinja", seed=3)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": _HF_JINJA}))
    tokenizer = Tokenizer(folder)
    call = {"type": "function", "function": {"name": "wetter", "arguments": '{"ort": "Zürich"}'}}
    messages = [{"role": "system", "content": "skipped"}, {"role": "user", "content": "hello"},
                {"role": "assistant", "tool_calls": [call]}, {"role": "tool", "content": "sonnig"},
                {"role": "user", "content": "after the break"}]
    tools = [{"type": "function", "function": {"name": "wetter", "parameters": {"type": "object"}}}]
    ours = tokenizer.apply_chat_template(messages, tools=tools)
    theirs = transformers_templates.render_jinja_template(
        [messages], tools=tools, chat_template=_HF_JINJA, add_generation_prompt=True)[0][0]
    assert ours == theirs
    assert "after the break" not in ours and "Z\\u00fcrich" in ours and '"wetter",\n' in ours


def test_a_template_reads_every_special_token_as_transformers_passes_them(tmp_path):
    """pad_token, unk_token and the rest came to a template empty (only bos_token and eos_token were passed)."""
    transformers = pytest.importorskip("transformers")
    folder = write_text_checkpoint(tmp_path / "specials", seed=3)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    template = "{{ messages[0].content }}|{{ pad_token }}|{{ unk_token }}|{{ sep_token | default('none') }}"
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**config, "chat_template": template, "pad_token": "</s>", "unk_token": "<s>",
         "sep_token": None}))
    messages = [{"role": "user", "content": "hi"}]
    theirs = transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=False)
    assert Tokenizer(folder).apply_chat_template(messages) == theirs == "hi|</s>|<s>|none"


def test_messages_reach_a_template_as_transformers_hands_them(tmp_path):
    """Keys set to None are left out (OpenAI's ``content: None`` beside tool calls printed "None"), and a message's
    thinking comes under each name templates read it by (``reasoning`` reached a Qwen 3 template as nothing);
    ``documents`` is defined, None where not given, as transformers defines it."""
    transformers = pytest.importorskip("transformers")
    folder = write_text_checkpoint(tmp_path / "normalized", seed=3)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    template = ("{%- for m in messages %}[{{ m.role }}|{{ m.content }}|{{ m.tool_calls | length if m.tool_calls is "
                "defined else '-' }}|{{ m.reasoning_content }}|{{ m.thinking }}|{{ m.reasoning }}]{%- endfor %}"
                "{{ 'documents' if documents is defined }}")
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [{"role": "user", "content": "hi", "name": None},
                {"role": "assistant", "content": None, "tool_calls": [call], "reasoning": "so I call f"},
                {"role": "tool", "content": "done"},
                {"role": "assistant", "content": "ok", "tool_calls": None, "thinking": "said ok"},
                {"role": "user", "content": "again", "reasoning_content": None}]
    theirs = transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=False)
    ours = Tokenizer(folder).apply_chat_template(messages, add_generation_prompt=False)
    assert ours == theirs
    assert "None" not in ours and "|so I call f|so I call f|so I call f]" in ours and "|said ok|said ok|]" in ours


def test_named_templates_without_a_default_leave_plain_chats_without_one(tmp_path):
    """As transformers: several named templates and none "default" is no template for a plain chat (the first,
    a "rag" one say, was used); a request with tools still takes "tool_use"."""
    folder = write_text_checkpoint(tmp_path / "named", seed=3)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "rag", "template": "rag {{ messages[0].content }}"},
                               {"name": "tool_use", "template": "tools {{ messages[0].content }}"}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer, messages = Tokenizer(folder), [{"role": "user", "content": "hi"}]
    with pytest.raises(ConfigError, match="named rag, tool_use and none named 'default'"):
        tokenizer.apply_chat_template(messages)
    assert tokenizer.apply_chat_template(messages, tools=[{"type": "function", "function": {"name": "f"}}]) == \
        "tools hi"


def test_chat_template_variables_come_with_the_chat_flag(tmp_path):
    """``chat={"enable_thinking": False}`` applies the template with that variable (Qwen 3's switch); a variable
    the call itself sets is refused by name."""
    folder = write_text_checkpoint(tmp_path / "thinking", seed=3)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{%- for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>{%- endfor %}<|assistant|>"
                               "{%- if enable_thinking is defined and not enable_thinking %}<think></think>{%- endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    llm = ferrum.load(folder, backend="cpu")
    messages = [{"role": "user", "content": "hello"}]
    plain, quiet = llm.encode_prompt("hello", chat=True), llm.encode_prompt("hello", chat={"enable_thinking": False})
    assert llm.tokenizer.decode(quiet, skip_special_tokens=False).endswith("<|assistant|><think></think>")
    assert quiet[: len(plain)] == plain and len(quiet) > len(plain)
    assert llm.encode_prompt(messages, chat={"enable_thinking": False}) == quiet
    assert llm.encode_prompt(messages, chat_template_kwargs={"enable_thinking": False}) == quiet
    assert llm.generate("hello", chat={"enable_thinking": False}, max_tokens=3) == llm.generate(quiet, max_tokens=3)
    with pytest.raises(InvalidRequestError, match="'messages' is set from the request itself"):
        llm.encode_prompt("hello", chat={"messages": []})


def test_bad_requests_are_rejected(llm):
    with pytest.raises(InvalidRequestError):
        llm.generate("hello", max_tokens=0)
    with pytest.raises(InvalidRequestError):
        llm.generate("hello", top_p=0.0)
    with pytest.raises(InvalidRequestError):
        llm.generate([], max_tokens=3)
    with pytest.raises(InvalidRequestError):
        llm.generate([1, "x"], max_tokens=3)
    # ``chat`` is a switch or template variables: "no" and 2.5 applied the template, a list of pairs dropped them
    for chat in ("no", 2.5, [("enable_thinking", False)]):
        with pytest.raises(InvalidRequestError, match="chat must be None, True, False or a mapping"):
            llm.generate("hello", max_tokens=2, chat=chat)
    with pytest.raises(InvalidRequestError, match="token ids are run as they are"):  # was silently ignored
        llm.generate([5, 6], max_tokens=2, chat=True)


@pytest.mark.parametrize("prompt", [b"hello", bytearray(b"hello")])
def test_bytes_are_not_read_as_token_ids(llm, prompt):
    with pytest.raises(InvalidRequestError, match="bytes"):
        llm.generate(prompt, max_tokens=2)


@pytest.mark.parametrize("prompt", ["bad \udcff text", [{"role": "user", "content": "bad \ud800"}]])
def test_text_that_is_not_unicode_is_a_request_error(llm, prompt):
    with pytest.raises(InvalidRequestError, match="lone surrogate"):
        llm.generate(prompt, max_tokens=2)
    assert llm.generate("hello", max_tokens=2) is not None


def test_token_prompts_work_without_a_tokenizer(checkpoint, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes((checkpoint / f).read_bytes())
    llm = ferrum.load(bare, backend="cpu")
    assert llm.tokenizer is None
    tokens = llm.run([[0, 5, 6]], max_tokens=4)[0].token_ids
    assert 1 <= len(tokens) <= 4
    with pytest.raises(InvalidRequestError, match="tokenizer.json"):
        llm.generate("text needs a tokenizer")
    with pytest.raises(ConfigError):
        Tokenizer(bare)


def test_incremental_detokenizer_never_splits_characters(checkpoint):
    tok = Tokenizer(checkpoint)
    text = "héllo 你好 🙂 wörld"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # characters span several tokens
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_a_replacement_character_no_byte_completes_streams_at_once(checkpoint):
    """A real U+FFFD in the text, or a byte that is not UTF-8, goes out as it arrives (it was held until a token
    without one came, re-decoding the whole run at every push: 4,000 of them took seconds)."""
    tok = Tokenizer(checkpoint)
    real = tok.encode("a\ufffd", add_special_tokens=False)  # the character's three bytes
    invalid = [t for t in range(tok.vocab_size) if tok.token_bytes(t) == b"\xff"]
    for ids, expected in ((real, "a\ufffd"), (tok.encode("a", add_special_tokens=False) + invalid, "a\ufffd")):
        detok = IncrementalDetokenizer(tok)
        assert "".join(detok.push(t) for t in ids) == expected
        assert detok.flush() == ""
    detok = IncrementalDetokenizer(tok)  # a character still missing bytes is held, as before
    ids = tok.encode("é", add_special_tokens=False)
    assert [detok.push(t) for t in ids] == [""] * (len(ids) - 1) + ["é"]


def test_stop_strings_spanning_pieces():
    f = StopStringFilter(["STOP", "xyz"])
    shown = [f.feed(p) for p in ["abc S", "T", "OP tail"]]
    assert "".join(shown) == "abc " and f.stopped
    assert f.feed("more") == ""
    g = StopStringFilter(["STOP"])
    assert "".join([g.feed("ST"), g.feed("ay"), g.flush()]) == "STay"


def shown_so_far(fed: str, stops: list[str]) -> str:
    """What a stream may have shown of ``fed``, written from the definition: up to the first stop string, else
    all but the longest ending that begins a stop string."""
    hits = [i for s in stops if (i := fed.find(s)) >= 0]
    if hits:
        return fed[:min(hits)]
    held = max((k for s in stops for k in range(1, len(s)) if fed.endswith(s[:k])), default=0)
    return fed[:len(fed) - held]


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(st.text("abST", max_size=4), max_size=12),
       stops=st.lists(st.text("abST", min_size=1, max_size=6), min_size=1, max_size=4),
       indexed=st.booleans())
def test_a_stream_holds_back_only_what_may_begin_a_stop_string(pieces, stops, indexed):
    import ferrum.stop

    limit = ferrum.stop.PREFIX_INDEX_LIMIT
    ferrum.stop.PREFIX_INDEX_LIMIT = limit if indexed else 0  # unindexed: it holds the longest stop's length - 1
    try:
        f = StopStringFilter(stops)
    finally:
        ferrum.stop.PREFIX_INDEX_LIMIT = limit
    shown, fed = "", ""
    for piece in pieces:
        shown += f.feed(piece)
        fed += piece
        expected = shown_so_far(fed, stops)
        if indexed or f.stopped:
            assert shown == expected
        else:
            assert expected.startswith(shown) and len(fed) - len(shown) <= max(map(len, stops)) - 1
    assert shown + f.flush() == (shown_so_far(fed, stops) if f.stopped else fed)


def test_each_output_holds_the_tokens_of_its_step_when_read_later(llm):
    """An output reads its ``token_ids`` and ``logprobs`` from the request's lists only when asked (a stream
    that takes ``new_token_ids`` never copies the whole output each step), and still holds its own step's."""
    outputs = list(llm.stream_outputs([5, 9, 12], max_tokens=6, ignore_eos=True, logprobs=2))
    assert len(outputs) == 6
    so_far: tuple[int, ...] = ()
    for out in outputs:  # read after the request has finished
        so_far += out.new_token_ids
        assert out.token_ids == so_far and len(out.logprobs) == len(so_far)
        assert [p.token for p in out.logprobs] == list(so_far)
    assert outputs[-1].token_ids == tuple(llm.run([[5, 9, 12]], max_tokens=6, ignore_eos=True)[0].token_ids)


def test_run_takes_a_lone_string_as_one_prompt(tmp_path):
    llm = ferrum.load(write_text_checkpoint(tmp_path / "m", seed=3), backend="cpu")
    outs = llm.run("hello there", max_tokens=3)
    assert len(outs) == 1 and outs[0].text == llm.generate("hello there", max_tokens=3)


def test_options_as_a_mapping_and_prompts_as_numpy_arrays(tmp_path):
    llm = ferrum.load(write_text_checkpoint(tmp_path / "m", seed=3), backend="cpu")
    assert llm.generate("hello", {"max_tokens": 3}) == llm.generate("hello", max_tokens=3)
    with pytest.raises(InvalidRequestError, match="SamplingParams"):
        llm.generate("hello", 3)
    texts = llm.generate([np.array([5, 6]), np.array([7, 8])], max_tokens=2)
    assert texts == [llm.generate([5, 6], max_tokens=2), llm.generate([7, 8], max_tokens=2)]


def test_a_model_named_by_something_else_is_refused():
    with pytest.raises(InvalidRequestError, match="folder, a .gguf file or a repo id"):
        ferrum.load(5)


def test_model_safetensors_is_read_alone_beside_other_files(tmp_path):
    """As transformers reads it: another *.safetensors beside it (an adapter, Mistral's consolidated file) is not
    part of the model, even where its names overlap."""
    from safetensors.numpy import save_file

    folder = write_text_checkpoint(tmp_path / "m", seed=3)
    before = ferrum.load(folder, backend="cpu").generate("hello", max_tokens=4)
    save_file({"model.norm.weight": np.zeros(64, np.float32)}, str(folder / "zz-old.safetensors"))
    assert ferrum.load(folder, backend="cpu").generate("hello", max_tokens=4) == before


def test_an_eos_id_outside_the_vocabulary_is_left_out_with_a_warning(tmp_path):
    """A multimodal wrapper's default eos over a smaller text model: transformers warns, and so does Ferrum, ending
    generation at the ids that are tokens."""
    folder = write_text_checkpoint(tmp_path / "m", seed=3)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "eos_token_id": [2, 10**6]}))
    with pytest.warns(UserWarning, match="outside the vocabulary"):
        assert ferrum.load(folder, backend="cpu").model.config.eos_token_ids == (2,)


def test_generation_config_eos_ids_outside_the_vocabulary_are_left_out_as_config_json_ones_are(tmp_path):
    folder = write_text_checkpoint(tmp_path / "m", seed=3)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 10**6]}))
    with pytest.warns(UserWarning, match="generation_config.json.*outside the vocabulary"):
        llm = ferrum.load(folder, backend="cpu")
    assert 5 in llm.tokenizer.eos_token_ids and 10**6 not in llm.tokenizer.eos_token_ids


def _streamed(tok: Tokenizer, prompt: list[int], output: list[int]) -> str:
    detok = IncrementalDetokenizer(tok, prompt)
    return "".join(detok.push(t) for t in output) + detok.flush()


def _sentencepiece_tokenizer(folder: Path) -> Tokenizer:
    """llama.cpp's sentencepiece vocabulary (byte pieces for what it cannot spell) as the GGUF import rebuilds it."""
    from test_gguf_import import convert_gguf, write_tiny_gguf

    folder.mkdir()
    write_tiny_gguf(folder / "spm.gguf", tokenizer_model="llama", types={})
    return Tokenizer(convert_gguf(folder / "spm.gguf", folder / "out"))


def test_a_token_prompt_ending_inside_a_character_streams_the_character_whole(checkpoint, tmp_path):
    """A prompt of token ids cut part way through a character (a continuation of an output that max_tokens cut):
    the output that completes the character emits all of it, and nothing of the text around it is lost, for
    byte-level BPE and for sentencepiece byte pieces (whose decoding turns a run of bytes with a broken character
    in it into U+FFFD, whole characters included)."""
    text = "hi \U0001f642 café 你好 ok"
    for tok in (Tokenizer(checkpoint), _sentencepiece_tokenizer(tmp_path / "spm")):
        ids = tok.encode(text)
        shown = [t for t in ids if not tok.is_special(t)]
        for cut in range(2, len(ids)):
            prompt_bytes = b"".join(tok.token_bytes(t) for t in ids[:cut] if not tok.is_special(t))
            whole = b"".join(tok.token_bytes(t) for t in shown)
            decoder = codecs.getincrementaldecoder("utf-8")()
            decoder.decode(prompt_bytes)
            boundary = len(prompt_bytes) - len(decoder.getstate()[0])  # where the prompt's last character ends
            assert _streamed(tok, ids[:cut], ids[cut:]) == whole[boundary:].decode(), (tok.to_json()[:40], cut)


def test_a_skipped_special_token_between_a_characters_bytes_streams_as_decoding_reads_it(checkpoint):
    tok = Tokenizer(checkpoint)
    by_bytes = {tok.token_bytes(t): t for t in range(tok.vocab_size) if not tok.is_special(t)}
    ids = [by_bytes[b"h"], by_bytes[b"\xdd"], tok.token_to_id("<s>"), by_bytes[b"\x81"], by_bytes[b"h"]]
    assert _streamed(tok, [tok.token_to_id("<s>")], ids) == tok.decode(ids) == "h\u0741h"


def _shard_in_two(folder: Path) -> dict[str, str]:
    """The checkpoint's one file split into two shards with an index, as save_pretrained shards; its weight map."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:]), start=1):
        file = f"model-0000{i}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(folder / file))
        weight_map.update(dict.fromkeys(part, file))
    return weight_map


def _write_index(folder: Path, weight_map: dict[str, str]) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_shards_are_read_by_their_own_headers_as_transformers_reads_them(tmp_path):
    """An index entry no shard holds (a stale rotary_emb.inv_freq) is not a tensor, and a tensor a shard holds that
    the index leaves out still is; a needed tensor the index promises and no shard holds is named with the shard."""
    folder = write_text_checkpoint(tmp_path / "m", seed=3)
    before = ferrum.load(folder, backend="cpu").generate("hello", max_tokens=4)
    weight_map = _shard_in_two(folder)
    stale = {**weight_map, "model.layers.0.self_attn.rotary_emb.inv_freq": "model-00001-of-00002.safetensors"}
    _write_index(folder, stale)
    assert ferrum.load(folder, backend="cpu").generate("hello", max_tokens=4) == before
    _write_index(folder, {k: v for k, v in weight_map.items() if k != "model.norm.weight"})
    assert ferrum.load(folder, backend="cpu").generate("hello", max_tokens=4) == before
    from safetensors.numpy import load_file, save_file

    shard = folder / weight_map["model.norm.weight"]
    save_file({k: v for k, v in load_file(str(shard)).items() if k != "model.norm.weight"}, str(shard))
    _write_index(folder, weight_map)
    expected = f"its index lists it in {shard.name}, which does not hold it) lacks 1 tensor(s) the model needs: " \
        "model.norm.weight"
    with pytest.raises(ferrum.errors.MissingTensorError, match=re.escape(expected)):
        ferrum.load(folder, backend="cpu")


def test_model_safetensors_wins_over_an_index_of_other_shards(tmp_path):
    """Both a model.safetensors and an index of other shards (a re-upload that left the old ones): transformers
    reads model.safetensors, and so does Ferrum, saying so."""
    from safetensors.numpy import load_file, save_file

    folder = write_text_checkpoint(tmp_path / "m", seed=3)
    whole = load_file(str(folder / "model.safetensors"))
    before = ferrum.load(folder, backend="cpu").generate("hello", max_tokens=4)
    weight_map = _shard_in_two(folder)
    for file in set(weight_map.values()):  # stale shards: other numbers
        save_file({k: v * 0 for k, v in load_file(str(folder / file)).items()}, str(folder / file))
    _write_index(folder, weight_map)
    save_file(whole, str(folder / "model.safetensors"))
    with pytest.warns(UserWarning, match="reading model.safetensors, as transformers does"):
        assert ferrum.load(folder, backend="cpu").generate("hello", max_tokens=4) == before


def test_encoding_a_long_text_lets_other_threads_run(llm):
    """A server encodes prompts in a worker thread while its event loop streams other replies: the tokenizer must
    release the GIL as it works (``tokenizers``' ``encode`` held it for the whole text)."""
    import threading

    text = "The quick brown fox jumps over the lazy dog. " * 30_000
    ticks, done = [], threading.Event()

    def tick() -> None:
        while not done.is_set():
            ticks.append(1)
            done.wait(0.001)

    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        began = len(ticks)
        ids = llm.tokenizer.encode(text)
        during = len(ticks) - began
    finally:
        done.set()
        ticker.join()
    assert len(ids) > 100_000 and during >= 10, during
