"""Tool calls over the OpenAI API: tools rendered by the model's chat template, calls parsed out of its reply.

The parsers run on replies written the way each template family asks for them; the server runs a tiny model
whose vocabulary holds one token spelling a whole Hermes-style call, which a logit bias makes it write.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import openai
import pytest

from ferrum.serve.tools import FORMATS, ToolReplies, format_of, releasable
from support import write_scripted_checkpoint, write_text_checkpoint

HERMES, MISTRAL, GRANITE, LLAMA3, HARMONY, GLM, QWEN3_CODER, DEEPSEEK, DEEPSEEK_V31, KIMI = (
    next(f for f in FORMATS if f.name == name)
    for name in ("hermes", "mistral", "granite", "llama3_json", "harmony", "glm45", "qwen3_coder", "deepseek_v3",
                 "deepseek_v31", "kimi_k2"))

# A Qwen 2.5-style template (its tool parts as Qwen writes them) over the test tokenizer's role tags.
TOOL_TEMPLATE = (
    "{%- if tools %}<|system|>You may call these functions:\n<tools>"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>\n"
    'Reply with <tool_call>{"name": ..., "arguments": ...}</tool_call>.</s>{%- endif %}'
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|assistant|>{{ m.content }}"
    "{%- for call in m.tool_calls %}\n<tool_call>\n"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}\n</tool_call>'
    "{%- endfor %}</s>"
    "{%- elif m.role == 'tool' %}<|user|><tool_response>{{ m.content }}</tool_response></s>"
    "{%- else %}<|{{ m.role }}|>{{ m.content }}</s>{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|assistant|>{%- endif %}"
)
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>'
#: Ends the reply right after the call (a stop string), so the choice finishes as a model's would.
END = "<end>"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}


# DeepSeek-V3's call format, as vLLM's examples/tool_chat_template_deepseekv3.jinja writes it (DeepSeek-V3-0324's
# own template writes calls the same way but lists no tools and joins arguments as text), over the test tags.
DS_CALLS, DS_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL, DS_SEP, DS_CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"
DEEPSEEK_TEMPLATE = (
    "{%- if tools %}<|system|>\n\n# Tools\n\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}"
    "\n</tools>\n\nFor function call returns, you should first print <｜tool▁calls▁begin｜>For each function call, "
    "you should return object like:\n<｜tool▁call▁begin｜>function<｜tool▁sep｜><function_name>\n```json\n"
    "<function_arguments_in_json_format>\n```<｜tool▁call▁end｜>At the end of function call returns, you should "
    "print <｜tool▁calls▁end｜></s>{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}<|assistant|>{{ m.content }}"
    "{%- if m.tool_calls %}<｜tool▁calls▁begin｜>{%- for tool in m.tool_calls %}{%- if not loop.first %}\n{% endif %}"
    "{{ '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + "
    "'\\n' + tool['function']['arguments']|tojson + '\\n' + '```' + '<｜tool▁call▁end｜>' }}{%- endfor %}"
    "<｜tool▁calls▁end｜>{%- endif %}</s>"
    "{%- else %}<|{{ m.role }}|>{{ m.content }}</s>{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|assistant|>{%- endif %}"
)
DEEPSEEK_MARKERS = (DS_CALLS, DS_CALLS_END, DS_CALL, DS_SEP, DS_CALL_END)


def _ds(*calls: tuple[str, str]) -> str:
    """Calls as DeepSeek-V3 writes them: (name, arguments' JSON) each."""
    return DS_CALLS + "\n".join(f"{DS_CALL}function{DS_SEP}{name}\n```json\n{arguments}\n```{DS_CALL_END}"
                                for name, arguments in calls) + DS_CALLS_END


# DeepSeek-V3.1's tool parts (deepseek-ai/DeepSeek-V3.1 tokenizer_config.json, as vLLM's
# examples/tool_chat_template_deepseekv31.jinja writes them: the tools in the system prompt, the format shown
# without a fence, and a call's name and arguments joined as text) over the test tokenizer's tags.
DEEPSEEK_V31_TEMPLATE = (
    "{%- if tools %}<|system|>## Tools\nYou have access to the following tools:\n{% for tool in tools %}"
    "{{ tool | tojson }}\n{% endfor %}IMPORTANT: ALWAYS adhere to this exact format for tool use:\n"
    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>tool_call_name<｜tool▁sep｜>tool_call_arguments<｜tool▁call▁end｜>"
    "<｜tool▁calls▁end｜>\n\nWhere:\n\n- `tool_call_name` must be an exact match to one of the available tools\n"
    "- `tool_call_arguments` must be valid JSON that strictly follows the tool's Parameters Schema\n"
    "- For multiple tool calls, chain them directly without separators or spaces\n</s>{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|assistant|>{{ m.content }}<｜tool▁calls▁begin｜>"
    "{%- for tool in m.tool_calls %}{{ '<｜tool▁call▁begin｜>' + tool['function']['name'] + '<｜tool▁sep｜>' + "
    "tool['function']['arguments'] + '<｜tool▁call▁end｜>' }}{%- endfor %}<｜tool▁calls▁end｜></s>"
    "{%- elif m.role == 'tool' %}<|user|><｜tool▁output▁begin｜>{{ m.content }}<｜tool▁output▁end｜></s>"
    "{%- else %}<|{{ m.role }}|>{{ m.content }}</s>{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|assistant|>{%- endif %}"
)


def _ds31(*calls: tuple[str, str]) -> str:
    """Calls as DeepSeek-V3.1 writes them: (name, arguments' JSON) each, one right after another."""
    return DS_CALLS + "".join(f"{DS_CALL}{name}{DS_SEP}{arguments}{DS_CALL_END}" for name, arguments in calls) + (
        DS_CALLS_END)


# Kimi K2's tool parts (moonshotai/Kimi-K2-Instruct chat_template.jinja: the tools declared as JSON, a call's id
# functions.NAME:IDX written back, its arguments as JSON) over the test tokenizer's tags.
KIMI_CALLS, KIMI_CALLS_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
KIMI_CALL, KIMI_ARGS, KIMI_CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
KIMI_TEMPLATE = (
    "{%- if tools %}<|system|>tool_declare\n{{ tools | tojson }}</s>{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|assistant|>{{ m.content }}<|tool_calls_section_begin|>"
    "{%- for tool_call in m.tool_calls %}{%- set formatted_id = tool_call['id'] %}"
    "<|tool_call_begin|>{{ formatted_id }}<|tool_call_argument_begin|>{% if tool_call['function']['arguments'] is "
    "string %}{{ tool_call['function']['arguments'] }}{% else %}{{ tool_call['function']['arguments'] | tojson }}"
    "{% endif %}<|tool_call_end|>{%- endfor %}<|tool_calls_section_end|></s>"
    "{%- elif m.role == 'tool' %}<|user|>## Return of {{ m.tool_call_id }}\n{{ m.content }}</s>"
    "{%- else %}<|{{ m.role }}|>{{ m.content }}</s>{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|assistant|>{%- endif %}"
)
KIMI_MARKERS = (KIMI_CALLS, KIMI_CALLS_END, KIMI_CALL, KIMI_ARGS, KIMI_CALL_END)


def _kimi(*calls: tuple[str, str], start: int = 0) -> str:
    """Calls as Kimi K2 writes them: (name, arguments' JSON) each, numbered from ``start``."""
    return KIMI_CALLS + "".join(f"{KIMI_CALL}functions.{name}:{start + i}{KIMI_ARGS}{arguments}{KIMI_CALL_END}"
                                for i, (name, arguments) in enumerate(calls)) + KIMI_CALLS_END


# ----------------------------------------------------------------- parsing
def test_hermes_calls_and_the_text_around_them():
    reply = HERMES.parse("Let me check.\n" + CALL + "\n" + CALL.replace("Paris", "Oslo"))
    assert reply.content == "Let me check."
    assert [json.loads(c["function"]["arguments"])["city"] for c in reply.calls] == ["Paris", "Oslo"]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in reply.calls)
    assert len({c["id"] for c in reply.calls}) == 2
    unterminated = HERMES.parse('<tool_call>\n{"name": "f", "arguments": {}}')  # stopped before the closing tag
    assert unterminated.calls[0]["function"] == {"name": "f", "arguments": "{}"} and unterminated.content is None


@pytest.mark.parametrize("text", [
    "no call here", "<tool_call>{not json}</tool_call>", '<tool_call>{"arguments": {}}</tool_call>',
    '<tool_call>{"name": "f", "arguments": [1]}</tool_call>', "<tool_call>" + "[" * 100_000 + "</tool_call>",
])
def test_what_is_not_a_call_stays_content(text):
    reply = HERMES.parse(text)
    assert reply.calls == [] and reply.content == text


def test_mistral_and_llama3_replies():
    for text in ('[TOOL_CALLS][{"name": "f", "arguments": {"x": 1}}]', '[{"name": "f", "arguments": {"x": 1}}]'):
        reply = MISTRAL.parse(text)  # the marker is a special token, which decoding may have dropped
        assert [c["function"] for c in reply.calls] == [{"name": "f", "arguments": '{"x": 1}'}], text
    reply = GRANITE.parse('Sure.<|tool_call|>[{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {}}]')
    assert [c["function"]["name"] for c in reply.calls] == ["f", "g"] and reply.content == "Sure."
    for text in ('<|python_tag|>{"name": "f", "parameters": {"x": 1}}', ' {"name": "f", "parameters": {"x": 1}}'):
        assert [c["function"] for c in LLAMA3.parse(text).calls] == [{"name": "f", "arguments": '{"x": 1}'}], text
    assert LLAMA3.parse("The answer is {x}.").calls == []
    two = LLAMA3.parse('{"name": "run", "parameters": {"cmd": "a; b"}}; {"name": "f", "parameters": {}}')
    assert [json.loads(c["function"]["arguments"]) for c in two.calls] == [{"cmd": "a; b"}, {}]  # ";" in a string


@pytest.mark.parametrize("fmt, text", [
    (HERMES, '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
             '<tool_call>\n{"name": "g", "arguments": {"y'),
    (MISTRAL, '[TOOL_CALLS][{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {"y'),
    (MISTRAL, '[TOOL_CALLS]f[ARGS]{"x": 1}[TOOL_CALLS]g[ARGS]{"y'),
    (GRANITE, '<|tool_call|>[{"name": "f", "arguments": {"x": {"name": "h", "arguments": 2}}}, '
              '{"name": "g", "arguments'),
    (LLAMA3, '{"name": "f", "parameters": {"x": 1}}; {"name": "g", "parameters": {"y'),
    (HARMONY, '<|start|>assistant to=functions.f<|channel|>commentary json<|message|>{"x": 1}'
              '<|start|>assistant to=functions.g<|channel|>commentary json<|message|>{"y'),
    (DEEPSEEK, _ds(("f", '{"x": 1}'))[:-len(DS_CALLS_END)] + f"\n{DS_CALL}function{DS_SEP}g\n```json\n{{\"y"),
    (DEEPSEEK_V31, _ds31(("f", '{"x": 1}'))[:-len(DS_CALLS_END)] + f"{DS_CALL}g{DS_SEP}{{\"y"),
    (KIMI, _kimi(("f", '{"x": 1}'))[:-len(KIMI_CALLS_END)] + f"{KIMI_CALL}functions.g:1{KIMI_ARGS}{{\"y"),
])
def test_a_cut_forced_reply_reads_as_its_calls_so_far(fmt, text):
    """Under a forced call's grammar a reply that does not parse was cut: its calls, the last as far as it got
    (an object inside the arguments that looks like a call is arguments)."""
    tools = [{"type": "function", "function": {"name": name}} for name in "fgh"]
    replies = ToolReplies(tools, fmt)
    assert replies.message(text, "length")[0]["content"] == text  # not forced: the text stays content
    replies.grammar = "forced"
    message, reason = replies.message(text, "length")
    calls = [call["function"] for call in message["tool_calls"]]
    assert message["content"] is None and reason == "length"
    assert [c["name"] for c in calls] == ["f", "g"]
    assert json.loads(calls[0]["arguments"])["x"] in (1, {"name": "h", "arguments": 2})
    assert calls[1]["arguments"] in ('{"y', "")


def test_mistral_v11_calls_each_after_their_own_marker():
    """From the v11 tokenizers on: ``[TOOL_CALLS]name[ARGS]{...}`` per call, ``[CALL_ID]id`` maybe before ``[ARGS]``."""
    reply = MISTRAL.parse('Checking.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}')
    assert reply.content == "Checking." and [c["function"] for c in reply.calls] == [
        {"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    two = MISTRAL.parse('[TOOL_CALLS]f[ARGS]{"x": [1, 2]}[TOOL_CALLS]g[CALL_ID]a1b2c3d4e[ARGS]{} done')
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in two.calls] == [
        ("f", {"x": [1, 2]}), ("g", {})]
    assert two.content == "done"
    for text in ('[TOOL_CALLS]f[ARGS]{"x": ', "[TOOL_CALLS]f[ARGS][1]", '[TOOL_CALLS]{"x": 1}',
                 '[TOOL_CALLS]f[ARGS]{}[TOOL_CALLS]'):  # cut short, odd arguments, no name, an empty second call
        assert MISTRAL.parse(text).calls == [] and MISTRAL.parse(text).content == text, text


def test_formats_are_read_from_the_template():
    assert format_of(TOOL_TEMPLATE) is HERMES
    assert format_of(DEEPSEEK_TEMPLATE) is DEEPSEEK
    assert format_of("{% for m in messages %}{{ m.content }}{% endfor %}") is None  # no tools in it
    assert format_of("{% if tools %}[AVAILABLE_TOOLS]{{ tools }}{% endif %}[TOOL_CALLS]") is MISTRAL
    assert format_of("{% if tools %}{{ tools }}{% endif %}<|python_tag|>") is LLAMA3
    assert format_of("{%- if tools %}available_tools{%- endif %}<|tool_call|>") is GRANITE


# GLM-4.5's tool parts (zai-org/GLM-4.5 chat_template.jinja: the tools listed in <tools>, a call's name then an
# <arg_key>/<arg_value> line per argument, a string bare and anything else as JSON) over the test tokenizer's tags.
GLM_TEMPLATE = (
    "{%- if tools %}<|system|>\n# Tools\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>\n"
    "For each function call, output the function name and arguments within the following XML format:\n"
    "<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n<arg_value>{arg-value-1}</arg_value>\n"
    "...\n</tool_call></s>{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}<|assistant|>{{ m.content }}"
    "{%- for tc in m.tool_calls or [] %}{%- if tc.function %}{%- set tc = tc.function %}{%- endif %}"
    "{{ '\\n<tool_call>' + tc.name }}\n"
    "{%- for k, v in tc.arguments.items() %}<arg_key>{{ k }}</arg_key>\n"
    "<arg_value>{{ v | tojson if v is not string else v }}</arg_value>\n{% endfor %}</tool_call>{% endfor %}</s>"
    "{%- else %}<|{{ m.role }}|>{{ m.content }}</s>{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|assistant|>{%- endif %}"
)
GLM_MARKERS = ("<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>")


def _glm(name: str, **arguments: str) -> str:
    return f"<tool_call>{name}\n" + "".join(f"<arg_key>{k}</arg_key>\n<arg_value>{v}</arg_value>\n"
                                             for k, v in arguments.items()) + "</tool_call>"


def test_glm_calls_type_their_values_as_vllm_does():
    """GLM-4.5 writes each argument bare: JSON where it parses, else text; a parameter the tool declares a string
    stays text even where it would parse ("42")."""
    text = "Let me look.\n" + _glm("find", where='{"city": "Oslo"}', days="2", code="42", note="it is {not json}")
    schemas = {"find": {"type": "object", "properties": {"code": {"type": "string"}, "days": {"type": "integer"}}}}
    reply = GLM.parse(text, schemas)
    assert reply.content == "Let me look."
    assert [json.loads(c["function"]["arguments"]) for c in reply.calls] == [
        {"where": {"city": "Oslo"}, "days": 2, "code": "42", "note": "it is {not json}"}]
    assert json.loads(GLM.parse(text).calls[0]["function"]["arguments"])["code"] == 42  # no schema: JSON
    two = GLM.parse(_glm("f") + "\n" + _glm("g", x="1") + " done")
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in two.calls] == [
        ("f", {}), ("g", {"x": 1})] and two.content == "done"
    compact = GLM.parse("<tool_call>g<arg_key>x</arg_key><arg_value>[1]</arg_value></tool_call>")  # GLM-4.7's form
    assert [json.loads(c["function"]["arguments"]) for c in compact.calls] == [{"x": [1]}]
    tools = [{"type": "function", "function": {"name": "find", "parameters": schemas["find"]}}]
    sent, deltas, reason = _stream(ToolReplies(tools, GLM), [text[:9], text[9:20], text[20:40], text[40:]])
    assert sent == "Let me look." and reason == "tool_calls"
    assert json.loads(deltas[0]["tool_calls"][0]["function"]["arguments"])["code"] == "42"  # typed by the request
    for text in ("<tool_call>f\n<arg_key>x</arg_key>\n<arg_value>1", "<tool_call>\n<arg_key>x</arg_key></tool_call>",
                 "<tool_call>f\nstray words</tool_call>"):  # cut inside a pair, no name, not pairs
        assert GLM.parse(text).calls == [] and GLM.parse(text).content == text, text


# Qwen3-Coder's tool parts (Qwen/Qwen3-Coder-30B-A3B-Instruct chat_template.jinja: the format shown to the model,
# and a call's <function=...> with a <parameter=...> block per argument, objects and lists as JSON, anything else
# as its string) over the test tokenizer's tags.
QWEN3_CODER_TEMPLATE = (
    "{%- if tools %}<|system|>\n# Tools\n\nYou have access to the following functions:\n\n<tools>"
    "{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>\n\n"
    "If you choose to call a function ONLY reply in the following format with NO suffix:\n\n<tool_call>\n"
    "<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n</function>\n"
    "</tool_call></s>{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}<|assistant|>{{ m.content }}"
    "{%- for tool_call in m.tool_calls or [] %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n<function=' + tool_call.name + '>\\n' }}"
    "{%- for args_name, args_value in tool_call.arguments|items %}{{- '<parameter=' + args_name + '>\\n' }}"
    "{%- set args_value = args_value | tojson | safe if args_value is mapping or (args_value is sequence and "
    "args_value is not string) else args_value | string %}{{- args_value }}{{- '\\n</parameter>\\n' }}"
    "{%- endfor %}{{- '</function>\\n</tool_call>' }}{%- endfor %}</s>"
    "{%- else %}<|{{ m.role }}|>{{ m.content }}</s>{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|assistant|>{%- endif %}"
)


def _qwen(name: str, **arguments: str) -> str:
    return f"<tool_call>\n<function={name}>\n" + "".join(f"<parameter={k}>\n{v}\n</parameter>\n"
                                                          for k, v in arguments.items()) + "</function>\n</tool_call>"


def test_qwen3_coder_calls_type_their_values_by_the_tools_schema():
    """Qwen3-Coder writes each argument bare; vLLM reads it by the type the tool declares: integers, numbers
    (whole ones as integers), booleans as Python writes them, objects as JSON, strings as they are, null as
    None; a parameter the tool does not declare, or a value that does not convert, stays text."""
    text = "On it.\n" + _qwen("find", days="2", ratio="2.0", exact="True", where='{"city": "Oslo"}', code="42",
                              tag="null", extra="7", bad="two", note="line one\nline two")
    schemas = {"find": {"type": "object", "properties": {
        "days": {"type": "integer"}, "ratio": {"type": "number"}, "exact": {"type": "boolean"},
        "where": {"type": "object"}, "code": {"type": "string"}, "tag": {"type": "string"},
        "bad": {"type": "integer"}, "note": {"type": "string"}}}}
    reply = QWEN3_CODER.parse(text, schemas)
    assert reply.content == "On it."
    assert [json.loads(c["function"]["arguments"]) for c in reply.calls] == [
        {"days": 2, "ratio": 2, "exact": True, "where": {"city": "Oslo"}, "code": "42", "tag": None, "extra": "7",
         "bad": "two", "note": "line one\nline two"}]
    assert json.loads(QWEN3_CODER.parse(text).calls[0]["function"]["arguments"])["days"] == "2"  # no schema: text
    two = QWEN3_CODER.parse(_qwen("f") + "\n" + _qwen("g", x="1") + "\n")
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in two.calls] == [
        ("f", {}), ("g", {"x": "1"})] and two.content is None
    tools = [{"type": "function", "function": {"name": "find", "parameters": schemas["find"]}}]
    sent, deltas, reason = _stream(ToolReplies(tools, QWEN3_CODER), [text[:5], text[5:12], text[12:30], text[30:]])
    assert sent == "On it." and reason == "tool_calls"
    assert json.loads(deltas[0]["tool_calls"][0]["function"]["arguments"])["days"] == 2  # typed by the request
    for text in (_qwen("f", x="1")[:-len("</function>\n</tool_call>")], "<tool_call>\n<parameter=x>\n1\n</parameter>",
                 "<tool_call>\n<function=f>\nstray</function>\n</tool_call>"):  # cut, no function, not parameters
        assert QWEN3_CODER.parse(text).calls == [] and QWEN3_CODER.parse(text).content == text, text


@pytest.mark.parametrize("nullable", [{"anyOf": [{"type": "string", "maxLength": 9}, {"type": "null"}]},
                                      {"type": ["string", "null"]}], ids=["anyOf", "type_list"])
def test_a_string_or_null_parameter_keeps_its_text_in_the_bare_formats(tmp_path, nullable):
    """pydantic's Optional[str] (an anyOf of a string and null) and a type list of both: the formats that write
    arguments bare (GLM-4.5, Qwen3-Coder) write such a value as it is, so it reads back as that text ("12345" a
    string, not a number), null as None; a forced call writes it bare too, which the parser reads back."""
    args = {"zip": "12345", "flag": "true", "items": "[1, 2]", "gone": "null"}
    schemas = {"f": {"type": "object", "properties": {key: nullable for key in args}}}
    for fmt, text in ((QWEN3_CODER, _qwen("f", **args)), (GLM, _glm("f", **args))):
        assert [json.loads(c["function"]["arguments"]) for c in fmt.parse(text, schemas).calls] == [
            {**args, "gone": None}], fmt.name
    tools = [{"type": "function", "function": {"name": "f", "parameters": schemas["f"]}}]
    tok, matcher = _forced_matcher(tmp_path, QWEN3_CODER, QWEN3_CODER_TEMPLATE, (), None, False, tools)
    assert _takes(tok, matcher, _qwen("f", zip="12345"))  # bare, where JSON would have needed quotes


def test_qwen3_coder_calls_as_leniently_as_vllm_reads_them():
    """vLLM's qwen3_coder parser reads ``<function=...>`` blocks a reply writes without ``<tool_call>`` around them
    (held back from ``<function=`` when streamed), a value whose ``</parameter>`` the model left out as ending
    where the next parameter or ``</function>`` begins, several functions in one ``<tool_call>``, and a closed
    ``<tool_call>`` whose ``</function>`` was left out."""
    schemas = {"f": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "string"}}}}
    unwrapped = "Sure.\n" + _qwen("f", x="1").removeprefix("<tool_call>\n").removesuffix("\n</tool_call>")
    reply = QWEN3_CODER.parse(unwrapped, schemas)
    assert reply.content == "Sure." and [json.loads(c["function"]["arguments"]) for c in reply.calls] == [{"x": 1}]
    unclosed = "<tool_call>\n<function=f>\n<parameter=x>\n1\n<parameter=y>\nhi\n</function>\n</tool_call>"
    assert [json.loads(c["function"]["arguments"]) for c in QWEN3_CODER.parse(unclosed, schemas).calls] == [
        {"x": 1, "y": "hi"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": schemas["f"]}}]
    sent, deltas, reason = _stream(ToolReplies(tools, QWEN3_CODER), [unwrapped[:8], unwrapped[8:12], unwrapped[12:]])
    assert sent == "Sure." and reason == "tool_calls" and deltas[0]["tool_calls"][0]["function"]["name"] == "f"
    for text in (unwrapped[:-len("</function>")], "<function=f>\nstray</function>"):  # cut, not parameters
        assert QWEN3_CODER.parse(text).calls == [] and QWEN3_CODER.parse(text).content == text, text
    two = ("<tool_call>\n<function=f>\n<parameter=x>\n1\n</parameter>\n</function>\n<function=g>\n</function>\n"
           "</tool_call>")
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in QWEN3_CODER.parse(two, schemas).calls] == [("f", {"x": 1}), ("g", {})]
    unended = "<tool_call>\n<function=f>\n<parameter=x>\n1\n</parameter>\n</tool_call>"  # no </function>
    assert [json.loads(c["function"]["arguments"]) for c in QWEN3_CODER.parse(unended, schemas).calls] == [{"x": 1}]
    cut = unended.removesuffix("</tool_call>")  # a block cut before its end stays text
    assert QWEN3_CODER.parse(cut).calls == [] and QWEN3_CODER.parse(cut).content == cut


def test_deepseek_v3_calls():
    reply = DEEPSEEK.parse("Checking." + _ds(("f", '{"x": [1, 2]}'), ("g", "{}")))
    assert reply.content == "Checking." and [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                                             for c in reply.calls] == [("f", {"x": [1, 2]}), ("g", {})]
    sent, deltas, reason = _stream(ToolReplies([{"type": "function", "function": {"name": "f"}}], DEEPSEEK),
                                   ["Checking.<｜tool", "▁calls▁begin｜>" + _ds(("f", "{}"))[len(DS_CALLS):]])
    assert sent == "Checking." and reason == "tool_calls" and deltas[0]["tool_calls"][0]["function"]["name"] == "f"
    whole = _ds(("f", '{"x": 1}'))
    for text in (whole[:-len(DS_CALL_END + DS_CALLS_END)], whole.replace('{"x": 1}', "[1]"),
                 whole.replace('{"x": 1}', "{x}"), DS_CALLS + "f"):  # cut, not an object, not JSON, no call
        assert DEEPSEEK.parse(text).calls == [] and DEEPSEEK.parse(text).content == text, text


@pytest.mark.parametrize("fmt, write", [(DEEPSEEK_V31, _ds31), (KIMI, _kimi)], ids=["deepseek_v31", "kimi_k2"])
def test_deepseek_v31_and_kimi_k2_calls(fmt, write):
    """DeepSeek-V3.1 writes a call's name and its arguments' JSON as they are (no type, no fence), one call right
    after another; Kimi K2 names a call ``functions.NAME:IDX``, which stays its id (its template writes the id back
    and the tool's reply names it). Read whole and streamed (held back from the section's marker on); what does not
    read as calls stays text."""
    reply = fmt.parse("Checking." + write(("f", '{"x": [1, 2]}'), ("g", "{}")) + " done")
    assert reply.content == "Checking. done" and [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                                                  for c in reply.calls] == [("f", {"x": [1, 2]}), ("g", {})]
    if fmt is KIMI:
        assert [c["id"] for c in reply.calls] == ["functions.f:0", "functions.g:1"]
        loose = f"{KIMI_CALLS}\n{KIMI_CALL} get_time:3 {KIMI_ARGS} {{}} {KIMI_CALL_END}\n{KIMI_CALLS_END}"
        assert [(c["id"], c["function"]["name"]) for c in fmt.parse(loose).calls] == [("get_time:3", "get_time")]
    marker, end = (DS_CALLS, DS_CALL_END + DS_CALLS_END) if fmt is DEEPSEEK_V31 else (KIMI_CALLS,
                                                                                      KIMI_CALL_END + KIMI_CALLS_END)
    whole = write(("f", "{}"))
    sent, deltas, reason = _stream(ToolReplies([{"type": "function", "function": {"name": "f"}}], fmt),
                                   ["Checking." + marker[:5], whole[5:-4], whole[-4:]])
    assert sent == "Checking." and reason == "tool_calls" and deltas[0]["tool_calls"][0]["function"]["name"] == "f"
    one = write(("f", '{"x": 1}'))
    for text in (one[:-len(end)], one.replace('{"x": 1}', "[1]"), one.replace('{"x": 1}', "{x}"), marker + "f",
                 write(("", '{"x": 1}'))):  # cut, not an object, not JSON, no call, no name
        assert fmt.parse(text).calls == [] and fmt.parse(text).content == text, text


def test_deepseek_v3_and_v31_templates_and_replies_are_told_apart():
    """Both write <｜tool▁calls▁begin｜>: V3's template fences the arguments in ```json (and types the call), V3.1's
    does not. Each format reads only its own calls."""
    assert format_of(DEEPSEEK_TEMPLATE) is DEEPSEEK
    assert format_of(DEEPSEEK_V31_TEMPLATE) is DEEPSEEK_V31
    assert format_of(KIMI_TEMPLATE) is KIMI
    assert DEEPSEEK.parse(_ds31(("f", "{}"))).calls == [] and DEEPSEEK_V31.parse(_ds(("f", "{}"))).calls == []


def test_templates_that_also_write_tool_call_are_not_taken_for_hermes():
    """GLM's and Qwen3-Coder's templates also write <tool_call>; <arg_key> and <parameter= say which they are."""
    assert format_of(GLM_TEMPLATE) is GLM
    assert format_of(QWEN3_CODER_TEMPLATE) is QWEN3_CODER
    assert format_of(TOOL_TEMPLATE) is HERMES


def test_earlier_calls_render_as_the_format_reads_them(tmp_path):
    """An assistant's earlier call, sent back with its arguments as JSON text, renders through each template
    (arguments as an object) into text the format's parser reads as that call."""
    from ferrum.serve.tools import template_tool_calls
    from ferrum.tokenizer import Tokenizer

    arguments = {"city": "Oslo", "days": 2, "where": {"lat": 59.9}, "ok": True}
    types = {"city": "string", "days": "integer", "where": "object", "ok": "boolean"}
    find = {"type": "function", "function": {"name": "find", "parameters": {
        "type": "object", "properties": {key: {"type": kind} for key, kind in types.items()}}}}
    for fmt, template in [(HERMES, TOOL_TEMPLATE), (GLM, GLM_TEMPLATE), (QWEN3_CODER, QWEN3_CODER_TEMPLATE),
                          (DEEPSEEK, DEEPSEEK_TEMPLATE), (DEEPSEEK_V31, DEEPSEEK_V31_TEMPLATE), (KIMI, KIMI_TEMPLATE)]:
        call_id = "functions.find:0" if fmt is KIMI else "c1"  # the id Kimi's calls get, which its template writes
        sent = [{"id": call_id, "type": "function",
                 "function": {"name": "find", "arguments": json.dumps(arguments)}}]
        folder = write_text_checkpoint(tmp_path / fmt.name, seed=3)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
        messages = [{"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "", "tool_calls": template_tool_calls(sent, "tool_calls")}]
        prompt = Tokenizer(folder).apply_chat_template(messages, tools=[WEATHER], add_generation_prompt=False)
        reply = prompt[prompt.rindex("<|assistant|>") + len("<|assistant|>"):]
        calls = fmt.read(reply, [find]).calls
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
            ("find", arguments)], (fmt.name, reply)
        assert fmt is not KIMI or calls[0]["id"] == call_id


_TIME = '{"name": "get_time", "arguments": {"tz": "UTC"}}'
_WEATHER = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
FORCED_ROWS = [  # (format, template, one call as the template writes it, two calls, markers)
    (HERMES, TOOL_TEMPLATE, f"<tool_call>\n{_TIME}\n</tool_call>",
     f"<tool_call>\n{_TIME}\n</tool_call>\n<tool_call>\n{_WEATHER}\n</tool_call>", ("<tool_call>", "</tool_call>")),
    (MISTRAL, "[TOOL_CALLS]", f"[TOOL_CALLS][{_TIME}]", f"[TOOL_CALLS][{_TIME}, {_WEATHER}]", ("[TOOL_CALLS]",)),
    (MISTRAL, "[TOOL_CALLS][ARGS]", '[TOOL_CALLS]get_time[ARGS]{"tz": "UTC"}',
     '[TOOL_CALLS]get_time[ARGS]{"tz": "UTC"}[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}',
     ("[TOOL_CALLS]", "[ARGS]")),
    (GRANITE, "<|tool_call|>", f"<|tool_call|>[{_TIME}]", f"<|tool_call|>[{_TIME}, {_WEATHER}]", ("<|tool_call|>",)),
    (LLAMA3, "<|python_tag|>", _TIME.replace("arguments", "parameters"),
     _TIME.replace("arguments", "parameters") + "; " + _WEATHER.replace("arguments", "parameters"), ()),
    (GLM, GLM_TEMPLATE, _glm("get_time", tz="UTC"),
     _glm("get_time", tz="UTC") + "\n" + _glm("get_weather", city="Oslo"), GLM_MARKERS),
    (QWEN3_CODER, QWEN3_CODER_TEMPLATE, _qwen("get_time", tz="UTC"),
     _qwen("get_time", tz="UTC") + "\n" + _qwen("get_weather", city="Oslo"), ("<tool_call>", "</tool_call>")),
    (DEEPSEEK, DEEPSEEK_TEMPLATE, _ds(("get_time", '{"tz": "UTC"}')),
     _ds(("get_time", '{"tz": "UTC"}'), ("get_weather", '{"city": "Oslo"}')), DEEPSEEK_MARKERS),
    (DEEPSEEK_V31, DEEPSEEK_V31_TEMPLATE, _ds31(("get_time", '{"tz": "UTC"}')),
     _ds31(("get_time", '{"tz": "UTC"}'), ("get_weather", '{"city": "Oslo"}')), DEEPSEEK_MARKERS),
    (KIMI, KIMI_TEMPLATE, _kimi(("get_time", '{"tz": "UTC"}')),
     _kimi(("get_time", '{"tz": "UTC"}'), ("get_weather", '{"city": "Oslo"}'), start=4), KIMI_MARKERS),
]
FORCED_IDS = ["hermes", "mistral-list", "mistral-v11", "granite", "llama3_json", "glm45", "qwen3_coder", "deepseek_v3",
              "deepseek_v31", "kimi_k2"]
#: How the formats that name a function ahead of its arguments write calls: (name, arguments' JSON) each.
WRITE_NAMED = {DEEPSEEK: _ds, DEEPSEEK_V31: _ds31, KIMI: _kimi}


def _forced_matcher(tmp_path, fmt, template, markers, special, many, tools=None):
    from tokenizers import AddedToken, Tokenizer as HFTokenizer

    from ferrum.sampling import SamplingParams
    from ferrum.serve.tools import forced_call_grammar
    from ferrum.structured import matcher_for
    from ferrum.tokenizer import Tokenizer
    from support import write_tokenizer

    pytest.importorskip("llguidance")
    tmp_path.mkdir(parents=True, exist_ok=True)
    write_tokenizer(tmp_path)
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    if special is not None and markers:  # added tokens: special ones, or plain added ones (Qwen's <tool_call>)
        hf.add_tokens([AddedToken(m, special=special, normalized=False) for m in markers])
        hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer(tmp_path)
    grammar = forced_call_grammar(fmt, tools or [CITY, CLOCK], tok, template, many)
    return tok, matcher_for(SamplingParams(grammar=grammar), tok, hf.get_vocab_size(), frozenset({1}))


def _takes(tok, matcher, text: str) -> bool:
    """Whether the grammar allows ``text`` token by token."""
    for token in tok.encode(text, add_special_tokens=False):
        if token in set(matcher.forbidden().tolist()):
            return False
        matcher.consume(token)
    return True


def _calls(fmt, text: str) -> list:
    """The calls ``fmt`` reads in ``text``, typed by the tools these tests offer (formats that write values bare)."""
    tools = [CITY, CLOCK, NESTED, PING]
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in fmt.read(text, tools).calls]


@pytest.mark.parametrize("fmt, template, one, two, markers", FORCED_ROWS, ids=FORCED_IDS)
def test_required_calls_grammar_takes_one_or_more_calls_and_a_single_ones_stops_after_one(tmp_path, fmt, template,
                                                                                          one, two, markers):
    """``tool_choice`` required with parallel calls: one or more calls in the format, which its parser reads;
    a named function (or parallel_tool_calls false): exactly one."""
    tok, matcher = _forced_matcher(tmp_path / "many", fmt, template, markers, True, many=True)
    assert _takes(tok, matcher, two) and 1 not in matcher.forbidden().tolist()  # may end after them
    assert _calls(fmt, two) == [("get_time", {"tz": "UTC"}), ("get_weather", {"city": "Oslo"})]
    tok, matcher = _forced_matcher(tmp_path / "many-one", fmt, template, markers, True, many=True)
    assert _takes(tok, matcher, one) and 1 not in matcher.forbidden().tolist()  # one call may end the reply
    tok, single = _forced_matcher(tmp_path / "single", fmt, template, markers, True, many=False)
    assert not _takes(tok, single, two)


@pytest.mark.parametrize("fmt, template, text, two, markers", FORCED_ROWS, ids=FORCED_IDS)
@pytest.mark.parametrize("special", [True, False, None], ids=["special-markers", "added-markers", "text-markers"])
def test_a_forced_calls_grammar_takes_the_call_its_parser_reads(tmp_path, fmt, template, text, two, markers, special):
    """Each format's grammar, compiled against a tokenizer whose markers are special tokens, added tokens that are
    not special (Qwen 2.5's and 3's <tool_call>), or plain text, accepts token by token the call as the template
    writes it, and that text parses as that call."""
    tok, matcher = _forced_matcher(tmp_path, fmt, template, markers, special, many=False)
    assert _takes(tok, matcher, text) and matcher.complete
    assert _calls(fmt, text) == [("get_time", {"tz": "UTC"})]


#: A tool as ``openai.pydantic_function_tool`` writes one with a nested model: refs into the schema's ``$defs``.
NESTED = {"type": "function", "function": {"name": "find", "parameters": {
    "$defs": {"Loc": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                      "additionalProperties": False}},
    "type": "object", "properties": {"where": {"$ref": "#/$defs/Loc"}, "days": {"type": "integer"}},
    "required": ["where", "days"], "additionalProperties": False}}}


#: Refs relative to the parameters' own root: a recursive tree (``#``) and a pointer into its properties.
TREE = {"type": "function", "function": {"name": "tree", "parameters": {
    "type": "object", "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#"}},
                                     "tag": {"enum": ["a", "b"]}, "also": {"$ref": "#/properties/tag"}},
    "required": ["v"], "additionalProperties": False}}}


def test_a_forced_call_resolves_refs_from_its_parameters_root(tmp_path):
    """``#`` in a tool's parameters is the parameters, not the call's wrapper around them: a recursive tree's kids
    are trees (a kid shaped like a call was taken), and ``#/properties/...`` resolves (it failed to compile)."""
    fmt, template, _, _, markers = FORCED_ROWS[0]
    good = '<tool_call>\n{"name": "tree", "arguments": {"v": 1, "kids": [{"v": 2, "also": "b"}], "tag": "a"}}\n' \
           '</tool_call>'
    wrapper = '<tool_call>\n{"name": "tree", "arguments": {"v": 1, "kids": [{"name": "tree", "arguments": {"v": 2}}]}}'
    tok, matcher = _forced_matcher(tmp_path / "good", fmt, template, markers, True, many=False, tools=[TREE])
    assert _takes(tok, matcher, good) and matcher.complete
    tok, matcher = _forced_matcher(tmp_path / "wrapper", fmt, template, markers, True, many=False, tools=[TREE])
    assert not _takes(tok, matcher, wrapper)
    tok, matcher = _forced_matcher(tmp_path / "enum", fmt, template, markers, True, many=False, tools=[TREE])
    assert not _takes(tok, matcher, good.replace('"also": "b"', '"also": "c"'))


@pytest.mark.parametrize("fmt, template, text, two, markers", FORCED_ROWS, ids=FORCED_IDS)
def test_a_forced_call_follows_a_schema_with_definitions(tmp_path, fmt, template, text, two, markers):
    """The call's wrapper would move the tool's ``#/$defs/...`` refs away from their root: they still resolve, and
    the nested model is held to its schema."""
    nested = '{"name": "find", "arguments": {"where": {"city": "Oslo"}, "days": 2}}'
    wrong = '{"name": "find", "arguments": {"where": {"town": "Oslo"}, "days": 2}}'
    if fmt is LLAMA3:
        nested, wrong = (t.replace("arguments", "parameters") for t in (nested, wrong))
    written = _TIME if _TIME in text else _TIME.replace("arguments", "parameters")  # Llama 3's JSON says parameters
    call, bad = (text.replace(written, t) for t in (nested, wrong))
    if "[ARGS]" in template:  # Mistral v11: the name, then the arguments alone
        call = '[TOOL_CALLS]find[ARGS]{"where": {"city": "Oslo"}, "days": 2}'
        bad = '[TOOL_CALLS]find[ARGS]{"where": {"town": "Oslo"}, "days": 2}'
    if fmt in (GLM, QWEN3_CODER):  # the arguments one by one, each value as JSON (not strings)
        write = _glm if fmt is GLM else _qwen
        call, bad = (write("find", where=f'{{"{key}": "Oslo"}}', days="2") for key in ("city", "town"))
    if fmt in WRITE_NAMED:
        call, bad = (WRITE_NAMED[fmt](("find", f'{{"where": {{"{key}": "Oslo"}}, "days": 2}}'))
                     for key in ("city", "town"))
    tok, matcher = _forced_matcher(tmp_path / "good", fmt, template, markers, True, many=False, tools=[NESTED])
    assert _takes(tok, matcher, call) and matcher.complete
    assert _calls(fmt, call) == [("find", {"where": {"city": "Oslo"}, "days": 2})]
    tok, matcher = _forced_matcher(tmp_path / "bad", fmt, template, markers, True, many=False, tools=[NESTED])
    assert not _takes(tok, matcher, bad)


def test_a_call_to_a_function_the_request_did_not_offer_is_text():
    """OpenAI's replies never call a function outside the request's tools; such a reply is content."""
    stray = CALL.replace("get_weather", "no_such_tool")
    message, reason = ToolReplies([WEATHER], HERMES).message(stray, "stop")
    assert (message["content"], message.get("tool_calls"), reason) == (stray, None, "stop")
    message, reason = ToolReplies([WEATHER], HERMES).message(CALL, "stop")
    assert message["tool_calls"][0]["function"]["name"] == "get_weather" and reason == "tool_calls"


def test_a_stream_holds_back_only_what_may_be_a_call():
    assert releasable(HERMES, "Let me check.") == len("Let me check.")
    assert releasable(HERMES, "Let me check.<tool") == len("Let me check.")  # the marker, cut by a token boundary
    assert releasable(HERMES, "Let me check." + CALL) == len("Let me check.")
    assert releasable(LLAMA3, ' {"name"') == 0 and releasable(LLAMA3, "Hi {") == 4
    assert releasable(MISTRAL, "[{") == 0 and releasable(MISTRAL, "ok [TOOL_C") == 3


def _stream(replies: ToolReplies, pieces: list[str], reason: str = "stop") -> tuple[str, list[dict], str]:
    """Feed a reply piece by piece as a stream would: (content sent, last deltas, finish reason)."""
    sent, text = "", ""
    for i, piece in enumerate(pieces):
        text += piece
        sent += replies.delta(0, text, finished=i == len(pieces) - 1)
    deltas, reason = replies.ending(text, reason)
    return sent, deltas, reason


def test_a_stream_sends_the_text_before_a_call_and_the_call_at_the_end():
    pieces = ["Let me ", "check.", "\n<tool", "_call>\n{\"name\": \"get_", 'weather", "arguments": {"city": ',
              '"Paris"}}', "\n</tool_call>"]
    sent, deltas, reason = _stream(ToolReplies([WEATHER], HERMES), pieces)
    assert sent == "Let me check." and reason == "tool_calls"
    (delta,) = deltas
    assert delta["tool_calls"][0]["index"] == 0 and delta["tool_calls"][0]["function"]["name"] == "get_weather"
    # a marker that never became a call is content after all, when the choice ends
    sent, deltas, reason = _stream(ToolReplies([WEATHER], HERMES), ["a <tool", "box> b"])
    assert (sent, deltas, reason) == ("a <toolbox> b", [], "stop")
    # without tools nothing is held back or parsed
    assert _stream(ToolReplies(None, None), ["x", CALL]) == ("x" + CALL, [], "stop")


def test_parallel_tool_calls_false_keeps_the_first_call():
    text = CALL + CALL.replace("Paris", "Oslo")
    message, reason = ToolReplies([WEATHER], HERMES, single=True).message(text, "stop")
    assert len(message["tool_calls"]) == 1 and reason == "tool_calls"
    message, reason = ToolReplies([WEATHER], HERMES).message(text, "length")
    assert len(message["tool_calls"]) == 2 and reason == "length"  # a cut reply says so


def test_a_checkpoints_tool_use_template_renders_requests_with_tools(tmp_path):
    """Named templates (Hermes 2 Pro, Cohere, older Mistral): "default" without tools, "tool_use" with them,
    as transformers picks; the same from the files transformers writes, additional_chat_templates/*.jinja."""
    from ferrum.tokenizer import Tokenizer

    folder = write_text_checkpoint(tmp_path / "named", seed=3)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    plain = config["chat_template"]
    config["chat_template"] = [{"name": "default", "template": plain}, {"name": "tool_use", "template": TOOL_TEMPLATE}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    messages = [{"role": "user", "content": "hi"}]
    tok = Tokenizer(folder)
    assert "<tools>" in tok.apply_chat_template(messages, tools=[WEATHER])
    assert "<tools>" not in tok.apply_chat_template(messages)
    assert format_of(tok.tool_chat_template) is HERMES and format_of(tok.chat_template) is None

    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").write_text(plain)
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "tool_use.jinja").write_text(TOOL_TEMPLATE)
    tok = Tokenizer(folder)
    assert tok.chat_template == plain and tok.tool_chat_template == TOOL_TEMPLATE
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    for tools in (None, [WEATHER]):
        assert tok.apply_chat_template(messages, tools=tools) == reference.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=True)
    config["chat_template"] = "{{ 'stale' }}"  # an older release's, left in the config: the files win (transformers)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer(folder).chat_template == plain
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))

    # a vision-language model's processor keeps its template in chat_template.json
    (folder / "chat_template.jinja").unlink()
    (folder / "additional_chat_templates" / "tool_use.jinja").unlink()
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": plain}))
    assert Tokenizer(folder).chat_template == plain


# ----------------------------------------------------------------- served
@pytest.fixture(scope="module")
def tool_model(tmp_path_factory) -> tuple[Path, int]:
    """The test checkpoint with the tool template and one more token, spelling a whole call, the model can write."""
    pytest.importorskip("transformers")
    return write_scripted_checkpoint(tmp_path_factory.mktemp("tools") / "tiny", CALL + END, TOOL_TEMPLATE,
                                     context=1024)  # room for the tool definitions


@pytest.fixture(scope="module")
def tool_server(tool_model):
    from test_serve import Server

    srv = Server(tool_model[0])
    yield srv
    assert srv.stop(), srv.log.read_text()


def _ask(tool_server, call_id: int, **extra):
    return tool_server.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "weather in Paris?"}], tools=[WEATHER],
        logit_bias={str(call_id): 100}, stop=[END], max_tokens=4, temperature=0, **extra)


def test_a_call_comes_back_as_tool_calls(tool_server, tool_model):
    done = _ask(tool_server, tool_model[1])
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "C"}


def test_a_streamed_call_arrives_whole_after_the_content(tool_server, tool_model):
    chunks = list(_ask(tool_server, tool_model[1], stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not any(d.content for d in deltas)  # the call's text is never sent as content
    calls = [call for d in deltas for call in d.tool_calls or ()]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "unit": "C"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_without_tools_or_with_tool_choice_none_the_text_is_content(tool_server, tool_model):
    client = tool_server.client()
    done = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "weather?"}], logit_bias={str(tool_model[1]): 100},
        stop=[END], max_tokens=4, temperature=0)
    assert done.choices[0].message.content == CALL and not done.choices[0].message.tool_calls
    done = _ask(tool_server, tool_model[1], tool_choice="none")
    assert done.choices[0].message.content == CALL and done.choices[0].finish_reason == "stop"


def test_tools_and_earlier_calls_reach_the_template(tool_server, tool_model):
    """The tool definitions lengthen the prompt; an assistant's earlier call (arguments as JSON text, as
    clients send them back) and the tool's result render."""
    client = tool_server.client()
    plain = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    with_tools = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                tools=[WEATHER], max_tokens=1)
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 20
    follow_up = client.chat.completions.create(model="tiny", max_tokens=1, tools=[WEATHER], messages=[
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    ])
    assert follow_up.usage.prompt_tokens > with_tools.usage.prompt_tokens


# Tools whose every call is short (capped string, enum, no other keys), so even random weights finish one.
CITY = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 6}}, "required": ["city"],
    "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"],
    "additionalProperties": False}}}


def _check_call(call) -> None:
    args = json.loads(call.function.arguments)
    if call.function.name == "get_time":
        assert args["tz"] in ("UTC", "CET") and set(args) == {"tz"}
    else:
        assert call.function.name == "get_weather" and set(args) == {"city"} and len(args["city"]) <= 6


@pytest.mark.parametrize("choice, extra, names, single", [
    ("required", {"parallel_tool_calls": False}, {"get_weather", "get_time"}, True),
    # One or more calls: a bias towards the end of sequence (forbidden inside a call) ends the random model's
    # reply after a call or a few, as a real model's would.
    ("required", {"logit_bias": {"1": 6}}, {"get_weather", "get_time"}, False),
    ({"type": "function", "function": {"name": "get_time"}}, {}, {"get_time"}, True),
])
def test_a_forced_call_is_a_call(tool_server, choice, extra, names, single):
    """``tool_choice`` required or named: the reply is sampled under the template's call format around the
    tools' schemas, so the random model calls (the scripted whole-call token is no longer allowed)."""
    for seed in (0, 1):
        done = tool_server.client().chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "what now?"}], tools=[CITY, CLOCK],
            tool_choice=choice, max_tokens=200, temperature=1.0, seed=seed, **extra)
        choice_out = done.choices[0]
        assert choice_out.finish_reason == "tool_calls", choice_out
        calls = choice_out.message.tool_calls
        assert len(calls) == 1 if single else len(calls) >= 1
        for call in calls:
            assert call.function.name in names
            _check_call(call)


def test_a_forced_call_streams_as_a_call(tool_server):
    chunks = list(tool_server.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "what now?"}], tools=[CITY, CLOCK], stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=80, temperature=0))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not any(d.content for d in deltas)
    calls = [call for d in deltas for call in d.tool_calls or ()]
    assert [c.function.name for c in calls] == ["get_weather"]
    _check_call(calls[0])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_forced_call_cut_by_max_tokens_is_a_call_as_far_as_it_got(tool_server):
    """OpenAI and vLLM hand back a call that ``max_tokens`` cut as a call whose arguments stop where the reply
    did (finish reason ``length``); its markup never reaches the content, whole or streamed."""
    ask = dict(model="tiny", messages=[{"role": "user", "content": "what now?"}], tools=[CITY, CLOCK],
               tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0)
    whole = tool_server.client().chat.completions.create(**ask, max_tokens=80)
    arguments = whole.choices[0].message.tool_calls[0].function.arguments
    partial = 0
    for max_tokens in range(whole.usage.completion_tokens - 1, 0, -1):
        cut = tool_server.client().chat.completions.create(**ask, max_tokens=max_tokens)
        message = cut.choices[0].message
        assert cut.choices[0].finish_reason == "length"
        if not message.tool_calls:  # cut before the call named its function: nothing to read yet
            assert '"get_weather"' not in message.content, message
            break
        (call,) = message.tool_calls
        assert message.content is None and call.function.name == "get_weather"
        so_far = call.function.arguments.removesuffix("\ufffd")  # a character cut between its bytes
        assert arguments.startswith(so_far), (arguments, call.function.arguments)
        partial += len(so_far) < len(arguments)
    assert partial >= 2
    chunks = list(tool_server.client().chat.completions.create(**ask, max_tokens=max_tokens + 2, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not any(d.content for d in deltas) and chunks[-1].choices[0].finish_reason == "length"
    (call,) = [call for d in deltas for call in d.tool_calls or ()]
    assert call.function.name == "get_weather" and arguments.startswith(call.function.arguments.rstrip("\ufffd"))


@pytest.mark.parametrize(("extra", "param"), [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "any"}, "tool_choice"),
    ({"tool_choice": {"type": "function"}}, "tool_choice.function.name"),
    ({"tool_choice": {"type": "function", "name": "get_weather"}}, "tool_choice.function.name"),  # the Responses form
    ({"tool_choice": {"type": "allowed_tools", "tools": []}}, "tool_choice.type"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {  # no arguments satisfy it
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 1}}, "required": ["n"]}}}],
      "tool_choice": "required"}, "tools"),
    ({"tool_choice": "required", "tools": None}, "tool_choice"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0"),
    *(({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]}, "messages.0.tool_calls.0")
      for arguments in ([1, 2], 7)),  # text that is no JSON object goes back as it is (test_serve_clients)
])
def test_tool_requests_it_cannot_honour_get_400(tool_server, tool_model, extra, param):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER], **extra}
    body = {k: v for k, v in body.items() if v is not None}
    with pytest.raises(openai.BadRequestError) as err:
        tool_server.client().chat.completions.create(**body)
    assert err.value.body["param"] == param


def test_a_template_without_tools_refuses_them(tmp_path):
    from test_serve import Server

    folder = write_text_checkpoint(tmp_path / "plain", seed=3)  # its template never mentions tools
    srv = Server(folder)
    try:
        with pytest.raises(openai.BadRequestError) as err:
            srv.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 tools=[WEATHER])
        assert err.value.body["param"] == "tools" and "chat template" in err.value.body["message"]
    finally:
        assert srv.stop(), srv.log.read_text()
        shutil.rmtree(folder, ignore_errors=True)


# A Mistral v11-style template; its calls are marked by a special token, which decoding drops by default.
MISTRAL_TEMPLATE = (
    "{%- if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}"
    "{%- for call in m.tool_calls %}[TOOL_CALLS]{{ call.function.name }}[ARGS]{{ call.function.arguments | tojson }}"
    "{%- endfor %}</s>"
    "{%- else %}<|{{ m.role }}|>{{ m.content }}</s>{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|assistant|>{%- endif %}"
)
MISTRAL_CALL = '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}'


def test_calls_marked_by_a_special_token_survive_decoding(tmp_path):
    """The reply is one special token spelling a whole v11 call: a request with tools keeps special tokens in its
    text, so the call is found; ``skip_special_tokens`` set, or no tools, leave it out as decoding does."""
    pytest.importorskip("transformers")
    from test_serve import Server

    folder, call_id = write_scripted_checkpoint(tmp_path / "mistral", MISTRAL_CALL + END, MISTRAL_TEMPLATE,
                                                special=True)
    srv = Server(folder)
    try:
        def ask(**extra):
            return srv.client().chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "weather in Oslo?"}],
                logit_bias={str(call_id): 100},
                stop=[END], max_tokens=2, temperature=0, **extra).choices[0]

        choice = ask(tools=[WEATHER])
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
            ("get_weather", {"city": "Oslo"})]
        choice = ask(tools=[WEATHER], extra_body={"skip_special_tokens": True})
        assert not choice.message.tool_calls and not choice.message.content
        choice = ask()
        assert not choice.message.tool_calls and not choice.message.content
        kept = srv.client().completions.create(model="tiny", prompt="hi", logit_bias={str(call_id): 100}, max_tokens=1,
                                               temperature=0, extra_body={"skip_special_tokens": False})
        assert kept.choices[0].text == MISTRAL_CALL + END
    finally:
        assert srv.stop(), srv.log.read_text()


@pytest.mark.parametrize("template, call", [
    (DEEPSEEK_V31_TEMPLATE, _ds31(("get_weather", '{"city": "Oslo"}'))),
    (KIMI_TEMPLATE, _kimi(("get_weather", '{"city": "Oslo"}'))),
], ids=["deepseek_v31", "kimi_k2"])
def test_deepseek_v31_and_kimi_k2_calls_over_the_api(tmp_path, template, call):
    """V3.1's template joins the arguments to text; Kimi's call keeps the id its model wrote."""
    check_calls_over_the_api(tmp_path, template, call, "functions.get_weather:0" if template is KIMI_TEMPLATE else None)


def check_calls_over_the_api(tmp_path, template: str, call: str, written_id: str | None = None) -> None:
    """Served: the reply (one special token spelling a whole call) comes back as that call, whole and streamed (its
    id ``written_id`` where the model writes one); sent back as an earlier call it renders through the template; a
    named ``tool_choice`` samples a call in the format, which the server reads back as one."""
    pytest.importorskip("transformers")
    from test_serve import Server

    folder, call_id = write_scripted_checkpoint(tmp_path / "model", call + END, template, special=True,
                                                context=2048)  # room for two tools and a call spelt byte by byte
    srv = Server(folder)
    try:
        client = srv.client()
        ask = dict(model="tiny", messages=[{"role": "user", "content": "weather in Oslo?"}], tools=[WEATHER],
                   logit_bias={str(call_id): 100}, stop=[END], max_tokens=2, temperature=0)
        choice = client.chat.completions.create(**ask).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (made,) = choice.message.tool_calls
        assert (made.function.name, json.loads(made.function.arguments)) == ("get_weather", {"city": "Oslo"})
        assert made.id == written_id if written_id else made.id.startswith("call_")
        chunks = list(client.chat.completions.create(**ask, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert not any(d.content for d in deltas) and chunks[-1].choices[0].finish_reason == "tool_calls"
        assert [c.function.name for d in deltas for c in d.tool_calls or ()] == ["get_weather"]
        history = [{"role": "user", "content": "weather in Oslo?"},
                   {"role": "assistant", "content": None, "tool_calls": [made.model_dump()]},
                   {"role": "tool", "tool_call_id": made.id, "content": "sunny"}]
        follow_up = client.chat.completions.create(model="tiny", tools=[WEATHER], messages=history, max_tokens=1)
        first = client.chat.completions.create(model="tiny", tools=[WEATHER], messages=history[:1], max_tokens=1)
        assert follow_up.usage.prompt_tokens > first.usage.prompt_tokens
        forced = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "what now?"}], tools=[CITY, CLOCK],
            tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=400, temperature=0)
        assert forced.choices[0].finish_reason == "tool_calls", forced.choices[0]
        (made,) = forced.choices[0].message.tool_calls
        _check_call(made)
        assert made.function.name == "get_time"
    finally:
        assert srv.stop(), srv.log.read_text()


def test_a_tool_without_parameters_renders_through_templates_that_write_them(tmp_path):
    """A function declared without ``parameters`` or ``description`` (OpenAI allows both) reaches the template with
    those keys null, as vLLM hands tools over: vLLM's DeepSeek-V3.1 template writes ``tool.function.parameters |
    tojson`` for every tool (a request with such a tool failed with a 400 on an undefined value)."""
    from ferrum.serve.tools import check_tools
    from ferrum.tokenizer import Tokenizer

    template = ("{% for tool in tools %}{{ tool.function.name }}: {{ tool.function.description }} "
                "{{ tool.function.parameters | tojson }}\n{% endfor %}"
                "{% for m in messages %}{{ m.content }}{% endfor %}")
    folder = write_text_checkpoint(tmp_path / "model", seed=3)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    tools = check_tools([PING, CITY])
    assert tools[0] == {"type": "function", "function": {"name": "ping", "description": None, "parameters": None}}
    assert tools[1] == {"type": "function", "function": {"description": None, **CITY["function"]}}
    prompt = Tokenizer(folder).apply_chat_template([{"role": "user", "content": "hi"}], tools=tools)
    assert prompt.startswith("ping: None null\nget_weather: ")


def test_a_forced_hermes_reply_may_end_after_a_newline(tmp_path):
    """Models write a newline after their last </tool_call> before ending the turn: where several calls may follow,
    the grammar lets them end there (it allowed only another call after that newline, and a required reply
    repeated its call to max_tokens); a single call ends where it closes."""
    fmt, template, one, two, markers = FORCED_ROWS[0]
    for text in (one, two):
        tok, matcher = _forced_matcher(tmp_path / str(len(text)), fmt, template, markers, True, many=True)
        assert _takes(tok, matcher, text + "\n") and 1 not in matcher.forbidden().tolist()


#: A function declared without parameters, as OpenAI allows: it takes none.
PING = {"type": "function", "function": {"name": "ping"}}


@pytest.mark.parametrize("fmt, template, text, two, markers", FORCED_ROWS, ids=FORCED_IDS)
@pytest.mark.parametrize("parameters", ["absent", None, {}])
def test_a_forced_call_to_a_function_without_parameters_takes_no_arguments(tmp_path, fmt, template, text, two,
                                                                           markers, parameters):
    """No ``parameters`` (or null, or {}) is a function of no arguments: its forced call's arguments are ``{}``
    (any object was allowed, and a small model invented keys, nested without end)."""
    tool = PING if parameters == "absent" else {"type": "function",
                                                 "function": {"name": "ping", "parameters": parameters}}
    written = _TIME if _TIME in text else _TIME.replace("arguments", "parameters")
    empty, invented = (text.replace(written, written.replace("get_time", "ping").replace('{"tz": "UTC"}', args))
                       for args in ("{}", '{"tz": "UTC"}'))
    if "[ARGS]" in template:
        empty, invented = "[TOOL_CALLS]ping[ARGS]{}", '[TOOL_CALLS]ping[ARGS]{"tz": "UTC"}'
    if fmt in (GLM, QWEN3_CODER):
        write = _glm if fmt is GLM else _qwen
        empty, invented = write("ping"), write("ping", tz="UTC")
    if fmt in WRITE_NAMED:
        empty, invented = WRITE_NAMED[fmt](("ping", "{}")), WRITE_NAMED[fmt](("ping", '{"tz": "UTC"}'))
    tok, matcher = _forced_matcher(tmp_path / "empty", fmt, template, markers, True, many=False, tools=[tool])
    assert _takes(tok, matcher, empty) and matcher.complete
    tok, matcher = _forced_matcher(tmp_path / "invented", fmt, template, markers, True, many=False, tools=[tool])
    assert not _takes(tok, matcher, invented)


def test_a_forced_glm_call_follows_the_templates_layout(tmp_path):
    """GLM-4.7's template writes a call on one line (``</arg_key><arg_value>``), GLM-4.5's a line per part: the
    forced grammar follows the template it is given, and the parser reads both."""
    compact = GLM_TEMPLATE.replace("</arg_key>\n<arg_value>", "</arg_key><arg_value>")
    one_line = "<tool_call>get_time<arg_key>tz</arg_key><arg_value>UTC</arg_value></tool_call>"
    for template, text, other in [(compact, one_line, _glm("get_time", tz="UTC")),
                                  (GLM_TEMPLATE, _glm("get_time", tz="UTC"), one_line)]:
        tok, matcher = _forced_matcher(tmp_path / str(len(template)), GLM, template, GLM_MARKERS, True, many=False)
        assert _takes(tok, matcher, text) and matcher.complete
        tok, matcher = _forced_matcher(tmp_path / f"other{len(template)}", GLM, template, GLM_MARKERS, True,
                                       many=False)
        assert not _takes(tok, matcher, other)
        assert _calls(GLM, text) == [("get_time", {"tz": "UTC"})]


@pytest.mark.parametrize("fmt, write, cut", [
    (GLM, _glm, "\n<tool_call>g\n<arg_key>s</arg_key>\n<arg_va"),
    (QWEN3_CODER, _qwen, "\n<tool_call>\n<function=g>\n<parameter=s>\nhal"),
], ids=["glm45", "qwen3_coder"])
def test_a_cut_forced_reply_written_bare_keeps_its_whole_calls(fmt, write, cut):
    """Formats that write arguments bare have no calls-so-far reading of a cut argument: a forced reply cut inside
    its third call gives the two whole calls before it (it had given none, the reply as text with its markup);
    not forced, the cut reply stays text, as every format's does."""
    numbers = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}}
    tools = [{"type": "function", "function": {"name": name, "parameters": numbers}} for name in "fgh"]
    text = write("f", x="1") + "\n" + write("h", y="2") + cut
    replies = ToolReplies(tools, fmt)
    assert replies.message(text, "length")[0]["content"] == text
    replies.grammar = "forced"
    message, reason = replies.message(text, "length")
    assert message["content"] is None and reason == "length"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == [
        ("f", {"x": 1}), ("h", {"y": 2})]
    closed_but_wrong = write("f", x="1") + "<tool_call>g\nnot a pair</tool_call>"  # not cut: the reply is text
    assert replies.message(closed_but_wrong, "stop")[0]["content"] == closed_but_wrong


def test_deepseek_v3_calls_in_several_blocks_are_all_read():
    """A reply that opens a second block of calls after the first (or text between): every call is read, as vLLM
    finds them anywhere in the reply (the second block's markup had been streamed as content)."""
    text = "Sure." + _ds(("f", '{"x": 1}')) + "\n" + _ds(("g", '{"y": 2}'), ("h", "{}")) + " done"
    reply = DEEPSEEK.parse(text)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in reply.calls] == [
        ("f", {"x": 1}), ("g", {"y": 2}), ("h", {})]
    assert reply.before == "Sure." and reply.after == "\n done"


@pytest.mark.parametrize("fmt, write", [(GLM, _glm), (QWEN3_CODER, _qwen)], ids=["glm45", "qwen3_coder"])
def test_a_bare_value_json_cannot_hold_stays_its_text(fmt, write):
    """NaN or 1e400 written for a number would serialize as NaN / Infinity, which JSON parsers refuse: the value
    stays the text written, and the arguments are strict JSON."""
    numbers = {"find": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"},
                                                           "c": {"type": "number"}}}}
    reply = fmt.parse(write("find", a="NaN", b="1e400", c="2.5"), numbers)
    strict = json.loads(reply.calls[0]["function"]["arguments"], parse_constant=lambda c: pytest.fail(c))
    assert strict == {"a": "NaN", "b": "1e400", "c": 2.5}


def test_a_glm_value_written_as_a_python_literal_is_read_as_one():
    """GLM-4.5 sometimes writes a list or dict as Python writes it: vLLM's glm45 parser falls back to reading it as a
    Python literal, for a parameter the tool declares; an undeclared one stays text."""
    schemas = {"tag": {"type": "object", "properties": {"names": {"type": "array", "items": {"type": "string"}}}}}
    reply = GLM.parse(_glm("tag", names="['x', 'y']", other="['x']"), schemas)
    assert json.loads(reply.calls[0]["function"]["arguments"]) == {"names": ["x", "y"], "other": "['x']"}
