"""``--reasoning-parser``: a reasoning model's ``<think> ... </think>`` comes back as ``reasoning_content``, apart
from its answer, whole or streamed; without the option (or without thinking) the reply is all content."""

from __future__ import annotations

import openai
import pytest

from ferrum.serve.reasoning import Thinking, starts_inside
from support import write_scripted_checkpoint


def test_a_reply_splits_at_its_closing_tag():
    qwen = Thinking(inside=False)  # Qwen 3 writes <think> itself
    assert qwen.split("<think>\nplan\n</think>\n\nParis.") == ("\nplan\n", "Paris.")
    assert qwen.split("Paris.") == (None, "Paris.")  # no thinking (enable_thinking off)
    assert qwen.split("<think>still going") == ("still going", "")  # cut by max_tokens
    r1 = Thinking(inside=True)  # DeepSeek-R1's template opened it in the prompt
    assert r1.split("plan</think>Paris.") == ("plan", "Paris.")
    assert r1.split("plan, cut") == ("plan, cut", "")
    assert starts_inside("<|Assistant|><think>\n") and not starts_inside("<|im_start|>assistant\n")
    assert not starts_inside("<think>\n\n</think>\n\n")  # Qwen 3 with thinking off: opened and closed


def _stream(thinking: Thinking, pieces: list[str]) -> tuple[str, str]:
    """Feed a reply piece by piece: (thinking sent, the answer at the end)."""
    sent, text, answer = "", "", ""
    for i, piece in enumerate(pieces):
        text += piece
        thought, answer = thinking.delta(0, text, finished=i == len(pieces) - 1)
        sent += thought
    return sent, answer


@pytest.mark.parametrize("pieces, inside", [
    (["<th", "ink>", "pl", "an</th", "ink>", "\n\nPar", "is."], False),
    (["<think>plan</", "think>Paris."], False),
    (["pl", "an<", "/think>Paris."], True),
    (["plan", "</", "think>", "Paris."], True),
])
def test_a_stream_sends_the_thinking_once_and_never_a_tag(pieces, inside):
    sent, answer = _stream(Thinking(inside), pieces)
    assert sent == "plan" and answer.strip() == "Paris."


def test_a_stream_without_thinking_holds_back_only_a_possible_tag():
    thinking = Thinking(inside=False)
    assert thinking.delta(0, "<th", finished=False) == ("", "")
    assert thinking.delta(0, "<tha", finished=False) == ("", "<tha")
    assert _stream(Thinking(False), ["<b>", "hi"]) == ("", "<b>hi")


def test_whitespace_before_the_opening_tag_is_held_like_a_partial_tag():
    """A reply opening with "\n<think>": the "\n" went out as answer, then the answer became the text after
    </think>, and the stream's count of characters sent cut its first one ("\nello world")."""
    from ferrum.serve.tools import ToolReplies

    thinking, replies = Thinking(inside=False), ToolReplies(None, None)
    assert thinking.delta(0, "\n", finished=False) == ("", "")
    pieces, text, content = ["\n", "<think>", "hmm", "</think>", "Hello", " world"], "", ""
    for i, piece in enumerate(pieces):
        text += piece
        content += replies.delta(0, thinking.delta(0, text, finished=i == len(pieces) - 1)[1], i == len(pieces) - 1)
    assert content == thinking.split(text)[1] == "Hello world"
    assert _stream(Thinking(False), ["\n", "Hi"]) == ("", "\nHi")  # no thinking: the whitespace is kept


# ------------------------------------------------------------------- served
R1_TEMPLATE = (  # DeepSeek-R1's way: the assistant turn opens its thinking in the prompt (unless told not to)
    "{%- for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>{%- endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>{%- if enable_thinking is not defined or enable_thinking %}"
    "<think>\n{%- endif %}{%- endif %}"
)
REPLY, END = "plan it</think>\n\nIt is sunny.", "<end>"


@pytest.fixture(scope="module")
def reasoning_model(tmp_path_factory):
    pytest.importorskip("transformers")
    return write_scripted_checkpoint(tmp_path_factory.mktemp("reasoning") / "tiny", REPLY + END, R1_TEMPLATE)


def _ask(srv, reply_id: int, **extra):
    return srv.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "weather?"}], logit_bias={str(reply_id): 100},
        stop=[END], max_tokens=2, temperature=0, **extra)


def test_thinking_comes_back_as_reasoning_content(reasoning_model):
    from test_serve import Server

    folder, reply_id = reasoning_model
    srv = Server(folder, "--reasoning-parser", "deepseek_r1")
    try:
        reply = _ask(srv, reply_id)
        message = reply.choices[0].message
        assert message.content == "It is sunny." and message.model_extra["reasoning_content"] == "plan it"
        # the one token spelling the whole reply holds the thinking: counted, within the completion's
        assert reply.usage.completion_tokens_details.reasoning_tokens == 1 == reply.usage.completion_tokens
        chunks = list(_ask(srv, reply_id, stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == 1
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == "plan it"
        assert "".join(d.content or "" for d in deltas) == "It is sunny."
        assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == "stop"
        # chat_template_kwargs reach the template: no <think> opened, so the reply is all answer
        message = _ask(srv, reply_id, extra_body={"chat_template_kwargs": {"enable_thinking": False}}).choices[0].message
        assert message.content == REPLY and message.model_extra["reasoning_content"] is None
        with pytest.raises(openai.BadRequestError, match="'messages' is set from the request itself") as caught:
            _ask(srv, reply_id, extra_body={"chat_template_kwargs": {"messages": []}})
        assert caught.value.param == "chat_template_kwargs"  # the field at fault, not the messages
    finally:
        assert srv.stop(), srv.log.read_text()


def test_thinking_tokens_run_through_the_closing_tag(tmp_path):
    """As OpenAI counts reasoning tokens: the thinking and its tags; a reply that never closed it is all thinking;
    without a one-token tag, the thinking text's tokens."""
    from support import add_tokens, write_text_checkpoint

    from ferrum.serve.reasoning import thinking_tokens
    from ferrum.tokenizer import Tokenizer

    folder = write_text_checkpoint(tmp_path / "tiny", seed=3)
    (close,) = add_tokens(folder, ["</think>"], False, None)
    tok = Tokenizer(folder)
    thought, answer = tok.encode("plan it", add_special_tokens=False), tok.encode("It is", add_special_tokens=False)
    assert thinking_tokens(tok, [*thought, close, *answer], "plan it") == len(thought) + 1
    assert thinking_tokens(tok, thought, "plan it") == len(thought)  # cut before the tag
    assert thinking_tokens(tok, [*thought, close, *answer], None) == 0
    bare = Tokenizer(write_text_checkpoint(tmp_path / "bare", seed=3))
    assert thinking_tokens(bare, [*thought, *answer], "plan it") == len(bare.encode("plan it",
                                                                                    add_special_tokens=False))


def test_the_answers_tokens_start_after_the_tag_and_the_whitespace_the_answer_drops(tmp_path):
    """The Responses API's output-text logprobs cover the tokens of the answer ``split`` returns."""
    from support import add_tokens, write_text_checkpoint

    from ferrum.tokenizer import Tokenizer

    folder = write_text_checkpoint(tmp_path / "tiny", seed=3)
    add_tokens(folder, ["<think>", "</think>"], False, None)
    tok = Tokenizer(folder)
    for reply, inside in [("<think>plan it</think>\n\n It is", False), ("plan it</think> \nIt is", True),
                          ("It is", False)]:
        ids = tok.encode(reply, add_special_tokens=False)
        thinking = Thinking(inside)
        answer = thinking.split(reply)[1]
        assert answer == "It is" and tok.decode(ids[thinking.answer_start(reply, ids, tok):]) == answer, reply
    cut = tok.encode("<think>plan it", add_special_tokens=False)
    assert Thinking(False).answer_start("<think>plan it", cut, tok) == len(cut)


def test_without_the_option_the_reply_is_all_content(reasoning_model):
    from test_serve import Server

    folder, reply_id = reasoning_model
    srv = Server(folder)
    try:
        reply = _ask(srv, reply_id)
        message = reply.choices[0].message
        assert message.content == REPLY and "reasoning_content" not in (message.model_extra or {})
        assert reply.usage.completion_tokens_details is None  # nothing is read as thinking
    finally:
        assert srv.stop(), srv.log.read_text()


def test_an_unknown_parser_is_refused(reasoning_model):
    from ferrum.errors import ConfigError
    from ferrum.serve import ServeOptions, load_for_serving

    with pytest.raises(ConfigError, match="'think' is not one of deepseek_r1, qwen3"):
        load_for_serving(ServeOptions(model=str(reasoning_model[0]), reasoning_parser="think"))
