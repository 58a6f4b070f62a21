"""Tool-call formats of the families whose templates write neither JSON objects nor Hermes / GLM / Qwen3-Coder /
DeepSeek / Kimi calls: MiniMax-M2's ``<invoke>`` blocks, Seed-OSS's ``<seed:tool_call>`` and the pythonic list of
Llama 3.2's and Llama 4's pythonic templates. Each is recognised from the release's template (its tool-describing
part over the test tokenizer's role tags), read whole and streamed, and sampled under its forced-call grammar.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import pytest

from ferrum.serve.tools import FORMATS, ToolReplies, format_of
from support import write_text_checkpoint
from test_serve_tools import (CLOCK, DEEPSEEK_TEMPLATE, DEEPSEEK_V31_TEMPLATE, GLM_TEMPLATE, KIMI_TEMPLATE,
                              NESTED, PING, QWEN3_CODER_TEMPLATE, TOOL_TEMPLATE, WEATHER, _calls, _forced_matcher,
                              _stream, _takes, check_calls_over_the_api)

MINIMAX, SEED, PYTHONIC, INTERNLM = (next(f for f in FORMATS if f.name == name)
                                     for name in ("minimax_m2", "seed_oss", "pythonic", "internlm"))

# MiniMax-M2's tool parts (MiniMaxAI/MiniMax-M2 chat_template.jinja: each tool's function as JSON in <tool>, the
# format shown, and a call's <invoke> with a <parameter> per argument, a string bare and anything else as JSON)
# over the test tokenizer's tags.
MINIMAX_TEMPLATE = (
    "{%- if tools %}<|system|>\n\n# Tools\nYou may call one or more tools to assist with the user query.\n"
    "Here are the tools available in JSONSchema format:\n\n<tools>\n"
    "{% for tool in tools %}<tool>{{ tool.function | tojson(ensure_ascii=False) }}</tool>\n{% endfor %}</tools>\n\n"
    "When making tool calls, use XML format to invoke tools and pass parameters:\n\n<minimax:tool_call>\n"
    '<invoke name="tool-name-1">\n<parameter name="param-key-1">param-value-1</parameter>\n'
    '<parameter name="param-key-2">param-value-2</parameter>\n...\n</invoke>\n</minimax:tool_call></s>{%- endif %}'
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}<|assistant|>{{ m.content }}"
    "{%- if m.tool_calls %}{{- '\\n' ~ '<minimax:tool_call>' ~ '\\n' }}"
    "{%- for tool_call in m.tool_calls %}{%- if tool_call.function %}{%- set tool_call = tool_call.function %}"
    "{%- endif %}{{- '<invoke name=\"' + tool_call.name + '\">' }}\n{% set _args = tool_call.arguments %}"
    "{%- for k, v in _args.items() %}{{- '<parameter name=\"' + k + '\">' }}"
    "{{- v | tojson(ensure_ascii=False) if v is not string else v }}{{- '</parameter>' }}\n{% endfor %}"
    "{{- '</invoke>' ~ '\\n' }}{%- endfor %}{{- '</minimax:tool_call>' }}{%- endif %}</s>"
    "{%- elif m.role == 'tool' %}<|user|><response>{{ m.content }}</response></s>"
    "{%- else %}<|{{ m.role }}|>{{ m.content }}</s>{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|assistant|>{%- endif %}"
)

# Seed-OSS's tool parts (ByteDance-Seed/Seed-OSS-36B-Instruct chat_template.jinja: the format shown to the model,
# and a call's <function=...> with a <parameter=...> per argument, anything but a string as Python writes it; the
# release lists each tool as a Python signature and docstring, here as JSON) over the test tokenizer's tags.
SEED_OSS_TEMPLATE = (
    "{%- if tools %}<|system|>You are Doubao, a helpful AI assistant. You may call one or more functions to assist "
    "with the user query.{% for tool in tools %}\n\n\nFunction:\n{{ tool.function | tojson }}{% endfor %}\n\n"
    "工具调用请遵循如下格式:\n<seed:tool_call>\n<function=example_function_name>\n"
    "<parameter=example_parameter_1>value_1</parameter>\n<parameter=example_parameter_2>This is the value for the "
    "second parameter\nthat can span\nmultiple lines</parameter>\n</function>\n</seed:tool_call>\n</s>{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}<|assistant|>{{ m.content }}"
    "{%- for tool_call in m.tool_calls or [] %}"
    "{%- if tool_call.function is defined %}{% set tool_call = tool_call.function %}{% endif %}"
    "{{ '\\n' + '<seed:tool_call>' + '\\n<function=' + tool_call.name + '>\\n' }}"
    "{%- if tool_call.arguments is defined %}{%- for arg_name, arg_value in tool_call.arguments | items %}"
    "{{ '<parameter=' + arg_name + '>' }}"
    "{%- set arg_value = arg_value if arg_value is string else arg_value | string %}"
    "{{ arg_value + '</parameter>\\n' }}{%- endfor %}{%- endif %}{{ '</function>\\n' + '</seed:tool_call>' }}"
    "{%- endfor %}</s>"
    "{%- else %}<|{{ m.role }}|>{{ m.content }}</s>{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|assistant|>{%- endif %}"
)

# vLLM's examples/tool_chat_template_llama4_pythonic.jinja (its tool parts: the rules and format shown to the model,
# the tools as JSON, and a call's arguments each written "%s"-formatted between quotes) over the test tokenizer's
# tags; Llama 3.2's pythonic template shows the same list ([func_name1(params_name1=params_value1, ...)]).
PYTHONIC_TEMPLATE = (
    "{%- if tools %}<|system|>You are a helpful assistant and an expert in function composition. [...]\n"
    "- Use exact format: [func_name1(param1=value1, param2=value2), func_name2(...)]\nExamples:\n"
    'CORRECT: [get_weather(location="Vancouver"), calculate_route(start="Boston", end="New York")] <- Only if '
    "get_weather and calculate_route are in function list\n[...]\n"
    "Here is a list of functions in JSON format that you can invoke:\n{{ tools | tojson(indent=4) }}\n</s>"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|assistant|>{{ m.content }}{{- '[' }}"
    "{%- for tool_call in m.tool_calls %}{%- if tool_call.function is defined %}"
    "{%- set tool_call = tool_call.function %}{%- endif %}{{- tool_call.name + '(' -}}"
    "{%- for param in tool_call.arguments %}{{- param + '=\"' -}}{{- '%s' | format(tool_call.arguments[param]) -}}"
    "{{- '\"' -}}{% if not loop.last %}, {% endif %}{%- endfor %}{{- ')' -}}{% if not loop.last %}, {% endif %}"
    "{%- endfor %}{{- ']</s>' }}"
    "{%- elif m.role == 'tool' %}<|user|>{{ m.content | tojson }}</s>"
    "{%- else %}<|{{ m.role }}|>{{ m.content }}</s>{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|assistant|>{%- endif %}"
)

# vLLM's examples/tool_chat_template_internlm2_tool.jinja (InternLM's own releases leave tools to lagent's
# meta-template, which this follows: the functions listed under a <|plugin|> system turn, each call written back
# after <|action_start|><|plugin|>) over the test tokenizer's tags.
INTERNLM_TEMPLATE = (
    "{%- if tools %}<|system|>name=<|plugin|>\n[{%- for tool in tools %}{{- tool.function | tojson }}"
    "{%- if not loop.last %}{{- ', ' }}{%- else %}{{- ']' }}{%- endif %}{%- endfor %}</s>{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.tool_calls is defined and m.tool_calls is not none %}<|assistant|>{{ m.content or '' }}"
    "{%- for tool_call in m.tool_calls %}{%- set function = tool_call.function %}"
    "{{- '<|action_start|><|plugin|>\\n' }}{{- '{\"name\": \"' + function.name + '\", ' }}"
    "{{- '\"arguments\": ' + function.arguments | string + '}' }}{{- '<|action_end|>' }}{%- endfor %}</s>"
    "{%- elif m.role == 'tool' %}<|user|>environment name=<|plugin|>\n{{ m.content | string }}</s>"
    "{%- else %}<|{{ m.role }}|>{{ m.content }}</s>{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|assistant|>{%- endif %}"
)

Calls = list[tuple[str, dict[str, Any]]]


def _bare(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _minimax(calls: Calls, block: bool = True) -> str:
    """Calls as MiniMax-M2 writes them, in one block: (name, arguments) each."""
    invokes = "".join(f'<invoke name="{name}">\n' + "".join(f'<parameter name="{k}">{_bare(v)}</parameter>\n'
                                                          for k, v in arguments.items()) + "</invoke>\n"
                      for name, arguments in calls)
    return f"<minimax:tool_call>\n{invokes}</minimax:tool_call>"


def _seed(calls: Calls) -> str:
    """Calls as Seed-OSS writes them, a block each, a newline apart."""
    return "\n".join(f"<seed:tool_call>\n<function={name}>\n" + "".join(
        f"<parameter={k}>{_bare(v)}</parameter>\n" for k, v in arguments.items()) + "</function>\n</seed:tool_call>"
                     for name, arguments in calls)


def _py(calls: Calls) -> str:
    """Calls as a pythonic list, each value as JSON (as the forced grammar writes it)."""
    return "[" + ", ".join(f"{name}(" + ", ".join(f"{k}={json.dumps(v)}" for k, v in arguments.items()) + ")"
                           for name, arguments in calls) + "]"


def _internlm(calls: Calls) -> str:
    """Calls as InternLM writes them, one right after another."""
    return "".join(f"<|action_start|><|plugin|>\n{json.dumps({'name': name, 'parameters': arguments})}<|action_end|>"
                   for name, arguments in calls)


MINIMAX_MARKERS = ("<minimax:tool_call>", "</minimax:tool_call>")
SEED_MARKERS = ("<seed:tool_call>", "</seed:tool_call>")
#: (format, template, how it writes calls, its special tokens)
ROWS: list[tuple[Any, str, Callable[[Calls], str], tuple[str, ...]]] = [
    (MINIMAX, MINIMAX_TEMPLATE, _minimax, MINIMAX_MARKERS),
    (SEED, SEED_OSS_TEMPLATE, _seed, SEED_MARKERS),
    (PYTHONIC, PYTHONIC_TEMPLATE, _py, ()),
    (INTERNLM, INTERNLM_TEMPLATE, _internlm, ("<|action_start|>", "<|plugin|>", "<|action_end|>")),
]
IDS = ["minimax_m2", "seed_oss", "pythonic", "internlm"]


def _read(fmt, text: str, tools: list | None = None) -> list[tuple[str, Any]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in fmt.read(text, tools).calls]


def _tool(name: str, properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object",
                                                                          "properties": properties}}}


# ----------------------------------------------------------------- detection
def test_the_new_templates_are_told_apart_from_the_others():
    """Each release's template gives its own format; Seed-OSS's also holds ``<parameter=`` (Qwen3-Coder's sign) and
    is still Seed-OSS; the templates that had a format keep it."""
    assert [format_of(t) for _, t, _, _ in ROWS] == [MINIMAX, SEED, PYTHONIC, INTERNLM]
    assert [format_of(t).name for t in (TOOL_TEMPLATE, GLM_TEMPLATE, QWEN3_CODER_TEMPLATE, DEEPSEEK_TEMPLATE,
                                        DEEPSEEK_V31_TEMPLATE, KIMI_TEMPLATE)] == [
        "hermes", "glm45", "qwen3_coder", "deepseek_v3", "deepseek_v31", "kimi_k2"]
    llama32 = ("{% if tools %}Respond in the format [func_name1(params_name1=params_value1, params_name2=params_value2"
               "...), func_name2(params)] {{ tools }}{% endif %}")  # vLLM's tool_chat_template_llama3.2_pythonic
    assert format_of(llama32) is PYTHONIC


# ----------------------------------------------------------------- reading
def test_minimax_m2_calls_are_typed_by_the_tools_schema_as_vllm_reads_them():
    """Integers, numbers, booleans, objects and arrays by the types the schema admits (type lists and anyOf too),
    a declared string as written ("42" stays "42"), an undeclared parameter as text; several invokes in a block,
    several blocks, the text around them kept."""
    find = _tool("find", {"days": {"type": "integer"}, "ratio": {"type": "number"}, "exact": {"type": "boolean"},
                          "where": {"type": "object"}, "tags": {"anyOf": [{"type": "array"}, {"type": "null"}]},
                          "code": {"type": "string"}, "maybe": {"type": ["integer", "null"]}})
    text = "On it.\n" + _minimax([("find", {"days": "2", "ratio": "2.5", "exact": "true", "where": '{"city": "Oslo"}',
                                            "tags": "[1, 2]", "code": "42", "maybe": "null", "extra": "7"}),
                                  ("get_time", {})]) + "\nthen\n" + _minimax([("find", {"days": "3"})]) + " done"
    reply = MINIMAX.read(text, [find])
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in reply.calls] == [
        ("find", {"days": 2, "ratio": 2.5, "exact": True, "where": {"city": "Oslo"}, "tags": [1, 2], "code": "42",
                  "maybe": None, "extra": "7"}), ("get_time", {}), ("find", {"days": 3})]
    assert reply.content == "On it.\n\nthen\n done"
    spaced = '<minimax:tool_call>\n<invoke name="find">\n<parameter name="days">\n4\n</parameter>\n</invoke>\n' \
             "</minimax:tool_call>"
    assert _read(MINIMAX, spaced, [find]) == [("find", {"days": 4})]
    one = _minimax([("find", {"days": "2"})])
    for bad in (one[:-len("</minimax:tool_call>")], one.replace("<parameter", "stray <parameter"),
                one.replace('name="find"', 'name=""'), one.replace("</invoke>", "")):  # cut, stray, no name, unclosed
        assert MINIMAX.read(bad, [find]).calls == [] and MINIMAX.read(bad, [find]).content == bad, bad


def test_seed_oss_calls_read_as_vllms_seed_oss_parser_does():
    """Qwen3-Coder's typing inside ``<seed:tool_call>``; the values its template writes as Python writes them (an
    object's ``{'lat': 59.9}``, ``True``) read back as those values."""
    find = _tool("find", {"days": {"type": "integer"}, "where": {"type": "object"}, "ok": {"type": "boolean"},
                          "city": {"type": "string"}})
    text = "Sure.\n" + _seed([("find", {"days": "2", "where": "{'lat': 59.9}", "ok": "True", "city": "42"}),
                              ("get_time", {})]) + "\ndone"
    reply = SEED.read(text, [find])
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in reply.calls] == [
        ("find", {"days": 2, "where": {"lat": 59.9}, "ok": True, "city": "42"}), ("get_time", {})]
    assert reply.content == "Sure.\n\n\ndone"  # the text between the blocks (a newline) kept, as Qwen3-Coder's
    one = _seed([("find", {"days": "2"})])
    for bad in (one[:-len("</function>\n</seed:tool_call>")], one.replace("<parameter", "stray <parameter"),
                "<seed:tool_call>\n</seed:tool_call>"):  # cut, not parameters, no function
        assert SEED.read(bad, [find]).calls == [] and SEED.read(bad, [find]).content == bad, bad


def test_pythonic_calls_are_the_whole_reply_as_a_list_of_calls():
    """A list of calls with literal keyword arguments (negative numbers, nested lists and dicts, Python's and JSON's
    True / None), maybe between Llama 4's <|python_start|> and <|python_end|>; anything else is text."""
    text = '[get_weather(city="Paris", days=-2, tags=["a", {"b": None}], ok=True), get_time(tz=\'UTC\', x=null)]'
    assert _read(PYTHONIC, text) == [("get_weather", {"city": "Paris", "days": -2, "tags": ["a", {"b": None}],
                                                      "ok": True}), ("get_time", {"tz": "UTC", "x": None})]
    assert PYTHONIC.read(text, None).content is None
    assert _read(PYTHONIC, f"<|python_start|>{text}<|python_end|>") == _read(PYTHONIC, text)
    for bad in ("Let me check: " + text, "[get_weather('Paris')]", "[get_weather(city=x)]", "[os.system(c='ls')]",
                "[1, 2]", "[]", "[f(**k)]", "[f(x={1, 2})]", "[get_weather(city=", "[f(x=1e999)]"):
        assert PYTHONIC.read(bad, None).calls == [] and PYTHONIC.read(bad, None).content == bad, bad


@pytest.mark.parametrize("fmt, template, write, markers", ROWS, ids=IDS)
def test_a_stream_holds_back_the_calls_and_sends_them_at_the_end(fmt, template, write, markers):
    """Fed a character at a time, the content sent is the text before the calls (none for a pythonic reply, which
    is calls alone) and the calls come whole at the end; text that only began like a call is sent at the end."""
    before = "" if fmt is PYTHONIC else "Checking."
    text = before + write([("get_weather", {"city": "Oslo"}), ("get_time", {"tz": "UTC"})])
    sent, deltas, reason = _stream(ToolReplies([WEATHER, CLOCK], fmt), list(text))
    assert sent == before and reason == "tool_calls"
    assert [(d["tool_calls"][0]["function"]["name"], json.loads(d["tool_calls"][0]["function"]["arguments"]))
            for d in deltas] == [("get_weather", {"city": "Oslo"}), ("get_time", {"tz": "UTC"})]
    almost = text[:len(text) // 2]
    assert _stream(ToolReplies([WEATHER, CLOCK], fmt), list(almost)) == (almost, [], "stop")


def test_internlm_calls_and_the_text_around_them():
    """Each call its own action, its arguments under "parameters" (or "arguments", which the template writes back);
    text before, between and after kept; an action that is no call leaves the reply text."""
    text = "Checking.\n" + _internlm([("f", {"x": [1, 2]})]) + " and " + _internlm([("g", {})]).replace(
        "parameters", "arguments") + " done"
    reply = INTERNLM.read(text, None)
    assert _read(INTERNLM, text) == [("f", {"x": [1, 2]}), ("g", {})] and reply.content == "Checking.\n and  done"
    one = _internlm([("f", {"x": 1})])
    for bad in (one[:-len("<|action_end|>") - 2], one.replace('"x": 1', "x"), one.replace('"f"', '""'),
                one.replace("{", "[", 1)):  # cut, not JSON, no name, not an object
        assert INTERNLM.read(bad, None).calls == [] and INTERNLM.read(bad, None).content == bad, bad


@pytest.mark.parametrize("fmt, template, write, markers", ROWS[:3], ids=IDS[:3])  # InternLM's: see below
def test_earlier_calls_render_through_the_template_as_the_format_reads_them(tmp_path, fmt, template, write,
                                                                           markers):
    """An earlier call sent back renders through the release's template into text its format reads as that call
    (Llama 4's pythonic template writes every value as a string between quotes, so strings round-trip there)."""
    from ferrum.serve.tools import template_tool_calls
    from ferrum.tokenizer import Tokenizer

    arguments = {"city": "Oslo", "note": "it's 5 > 4"}
    types = {"city": "string", "note": "string"}
    if fmt is not PYTHONIC:
        arguments, types = {**arguments, "days": 2, "where": {"lat": 59.9}, "ok": True}, {
            **types, "days": "integer", "where": "object", "ok": "boolean"}
    find = _tool("find", {key: {"type": kind} for key, kind in types.items()})
    sent = [{"id": "c1", "type": "function", "function": {"name": "find", "arguments": json.dumps(arguments)}}]
    folder = write_text_checkpoint(tmp_path / fmt.name, seed=3)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "", "tool_calls": template_tool_calls(sent, "tool_calls")}]
    prompt = Tokenizer(folder).apply_chat_template(messages, tools=[find], add_generation_prompt=False)
    reply = prompt[prompt.rindex("<|assistant|>") + len("<|assistant|>"):].removesuffix("</s>")
    assert _read(fmt, reply, [find]) == [("find", arguments)], reply
    # vLLM's InternLM template writes ``arguments | string``: an object's Python text, as vLLM hands it the
    # arguments, which is no JSON (its parser, and this one, read JSON); that template is left as it renders.


# ----------------------------------------------------------------- forced calls
@pytest.mark.parametrize("fmt, template, write, markers", ROWS, ids=IDS)
@pytest.mark.parametrize("special", [True, False, None], ids=["special-markers", "added-markers", "text-markers"])
def test_a_forced_call_is_one_the_parser_reads(tmp_path, fmt, template, write, markers, special):
    """The grammar takes, token by token, a call as the template writes it (markers special tokens, added ones or
    plain text), which parses as that call; a named call (one) refuses a second; "required" takes two and may end
    after one."""
    one, two = write([("get_time", {"tz": "UTC"})]), write([("get_time", {"tz": "UTC"}),
                                                          ("get_weather", {"city": "Oslo"})])
    tok, matcher = _forced_matcher(tmp_path / "one", fmt, template, markers, special, many=False)
    assert _takes(tok, matcher, one) and matcher.complete
    assert _calls(fmt, one) == [("get_time", {"tz": "UTC"})]
    tok, matcher = _forced_matcher(tmp_path / "single", fmt, template, markers, special, many=False)
    assert not _takes(tok, matcher, two)
    tok, matcher = _forced_matcher(tmp_path / "two", fmt, template, markers, special, many=True)
    assert _takes(tok, matcher, two) and 1 not in matcher.forbidden().tolist()
    assert _calls(fmt, two) == [("get_time", {"tz": "UTC"}), ("get_weather", {"city": "Oslo"})]
    tok, matcher = _forced_matcher(tmp_path / "many-one", fmt, template, markers, special, many=True)
    assert _takes(tok, matcher, one) and 1 not in matcher.forbidden().tolist()


@pytest.mark.parametrize("fmt, template, write, markers", ROWS, ids=IDS)
def test_a_forced_call_follows_the_schema_its_arguments_and_their_definitions(tmp_path, fmt, template, write,
                                                                            markers):
    """A nested model's refs resolve and hold it to its schema; optional arguments may be left out (the pythonic
    list's separators with them); a function without parameters takes none."""
    good, bad = (write([("find", {"where": {key: "Oslo"}, "days": 2})]) for key in ("city", "town"))
    tok, matcher = _forced_matcher(tmp_path / "good", fmt, template, markers, True, many=False, tools=[NESTED])
    assert _takes(tok, matcher, good) and matcher.complete
    assert _calls(fmt, good) == [("find", {"where": {"city": "Oslo"}, "days": 2})]
    tok, matcher = _forced_matcher(tmp_path / "bad", fmt, template, markers, True, many=False, tools=[NESTED])
    assert not _takes(tok, matcher, bad)
    optional = _tool("opt", {"a": {"type": "integer"}, "b": {"type": "string"}, "c": {"type": "integer"}})
    for arguments in ({}, {"b": "x"}, {"a": 1, "c": 3}, {"a": 1, "b": "x", "c": 3}):
        text = write([("opt", arguments)])
        tok, matcher = _forced_matcher(tmp_path / f"opt{len(arguments)}{list(arguments)}", fmt, template, markers,
                                       True, many=False, tools=[optional])
        assert _takes(tok, matcher, text) and matcher.complete, text
        assert _read(fmt, text, [optional]) == [("opt", arguments)]
    for arguments, takes in (({}, True), ({"tz": "UTC"}, False)):
        tok, matcher = _forced_matcher(tmp_path / f"ping{takes}", fmt, template, markers, True, many=False,
                                       tools=[PING])
        assert _takes(tok, matcher, write([("ping", arguments)])) is takes


@pytest.mark.parametrize("fmt, template, write, markers", ROWS, ids=IDS)
def test_a_cut_forced_reply_keeps_its_whole_calls(fmt, template, write, markers):
    """A forced reply cut inside its third call gives the two whole calls before it (and, where arguments are JSON,
    the third as far as it got, as the JSON formats' calls so far are); not forced, it is text."""
    numbers = {"x": {"type": "integer"}, "y": {"type": "integer"}}
    tools = [_tool(name, numbers) for name in "fgh"]
    whole = write([("f", {"x": 1}), ("h", {"y": 2}), ("g", {"x": 12345})])
    text = whole[:whole.rindex("12345") + 2]
    replies = ToolReplies(tools, fmt)
    assert replies.message(text, "length")[0]["content"] == text
    replies.grammar = "forced"
    message, reason = replies.message(text, "length")
    assert message["content"] is None and reason == "length"
    got = [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
    assert [(name, json.loads(arguments)) for name, arguments in got[:2]] == [("f", {"x": 1}), ("h", {"y": 2})]
    assert got[2:] == ([("g", '{"x": 12')] if fmt.heads else [])


# ----------------------------------------------------------------- served
@pytest.mark.parametrize("fmt, template, write, markers", ROWS, ids=IDS)
def test_the_new_formats_over_the_api(tmp_path, fmt, template, write, markers):
    check_calls_over_the_api(tmp_path, template, write([("get_weather", {"city": "Oslo"})]))
