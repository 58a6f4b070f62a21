"""Tool-call formats beyond Hermes / Mistral / Granite / Llama 3 / GLM / Qwen3-Coder / DeepSeek / Kimi: MiniMax-M2's
``<invoke>`` blocks, Seed-OSS's ``<seed:tool_call>``, the pythonic list of Llama 3.2's and Llama 4's pythonic
templates, InternLM's actions, Hunyuan-A13B's and Jamba's ``<tool_calls>`` list, Phi-4-mini's ``functools`` list,
OLMo 3's ``<function_calls>`` lines, Gemma 4's and FunctionGemma's ``call:NAME{...}`` blocks and the JSON calls of
Llama 4's official template. Each is recognised from the release's template (its tool-describing
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

MINIMAX, SEED, PYTHONIC, INTERNLM, HUNYUAN, JAMBA, PHI4_MINI, OLMO3, GEMMA4, FUNCTIONGEMMA, LLAMA4 = (
    next(f for f in FORMATS if f.name == name)
    for name in ("minimax_m2", "seed_oss", "pythonic", "internlm", "hunyuan_a13b", "jamba", "phi4_mini", "olmo3",
                 "gemma4", "functiongemma", "llama4_json"))

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

# vLLM's examples/tool_chat_template_hunyuan_a13b.jinja (its tool parts: the format asked for in the first turn,
# plain answers opening with 助手：, and a call's list written back between <tool_calls> tags, arguments as JSON)
# over the test tokenizer's tags.
HUNYUAN_TEMPLATE = (
    "{%- if tools %}<|system|>你是一位函数组合专家。[...]\n"
    "如果没有一个函数可以使用，请直接使用自然语言回复用户，以助手：开头。\n"
    "[...]如果你决定调用任何函数，你必须将其格式化为<tool_calls>[{\"name\": \"func_name1\", \"arguments\": "
    "{\"argument1\": \"value1\", \"argument2\": \"value2\"}},...]</tool_calls>。你不应该在回复中包含任何其他文本。"
    "以下是你可以调用的函数列表，格式为JSON。\n\n{{ tools | tojson }}\n</s>{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|assistant|>{{ m.content or '' }}"
    "{%- set ns = namespace(tool_calls='[') %}{%- for tool_call in m.tool_calls %}"
    "{%- set function = tool_call['function'] %}"
    "{%- set ns.tool_calls = ns.tool_calls + '{\"name\": \"' + function['name'] + '\", ' %}"
    "{%- set arguments = function['arguments'] %}{%- if arguments is not string %}"
    "{%- set arguments = arguments | tojson %}{%- endif %}"
    "{%- set ns.tool_calls = ns.tool_calls + '\"arguments\": ' + arguments + '}' %}"
    "{%- if not loop.last %}{%- set ns.tool_calls = ns.tool_calls + ', ' %}{%- endif %}{%- endfor %}"
    "{{- '<tool_calls>' + ns.tool_calls + ']' + '</tool_calls>' }}</s>"
    "{%- elif m.role == 'tool' %}<|user|><tool_response>{{ m.content }}</tool_response></s>"
    "{%- else %}<|{{ m.role }}|>{{ m.content }}</s>{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|assistant|>{%- endif %}"
)

# Jamba's calls as vLLM's jamba parser reads them (a JSON list between the <tool_calls> and </tool_calls> special
# tokens); the release's own template is not among the sources read here, so its tool parts are written after that
# parser: the tools as JSON, a call's list written back between the tags.
JAMBA_TEMPLATE = (
    "{%- if tools %}<|system|><tool_definitions>{{ tools | map(attribute='function') | list | tojson }}"
    "</tool_definitions></s>{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|assistant|>{{ m.content or '' }}<tool_calls>"
    "{{- m.tool_calls | map(attribute='function') | list | tojson }}</tool_calls></s>"
    "{%- elif m.role == 'tool' %}<|user|>{{ m.content }}</s>"
    "{%- else %}<|{{ m.role }}|>{{ m.content }}</s>{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|assistant|>{%- endif %}"
)

# vLLM's examples/tool_chat_template_phi4_mini.jinja (its tool parts: the rules shown to the model, each tool as
# JSON, an earlier call written back as {"name": ..., "arguments": ...} without the functools marker) over the test
# tokenizer's tags.
PHI4_MINI_TEMPLATE = (
    "{%- if tools %}<|system|>You are a helpful assistant.\nIn addition to plain text responses, you can choose to "
    "call one or more of the provided functions.\n[...]\nIf you decide to call functions:\n  * prefix function "
    "calls with functools marker (no closing marker required)\n  * all function calls should be generated in a "
    "single JSON list formatted as functools[{\"name\": [function name], \"arguments\": [function arguments as "
    "JSON]}, ...]\n[...]\n{%- for t in tools %}{{- t | tojson(indent=4) }}{{- '\\n\\n' }}{%- endfor %}</s>"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|assistant|>"
    "{%- for call in m.tool_calls %}{\"name\": \"{{ call.function.name }}\", \"arguments\": "
    "{{ call.function.arguments }}}{%- if not loop.last %},{% endif %}{%- endfor %}</s>"
    "{%- else %}<|{{ m.role }}|>{{ m.content }}</s>{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|assistant|>{%- endif %}"
)

# vLLM's examples/tool_chat_template_olmo3.jinja (its tool parts: the format shown to the model, the functions as
# JSON, and calls written back a line each in <function_calls>, strings between single quotes, null / true / false
# as JSON's, anything else as JSON) over the test tokenizer's tags. OLMo 3's release asks for the same block.
OLMO3_TEMPLATE = (
    "{%- if tools %}<|system|>You are a helpful function-calling AI assistant.\n\nYou have access to the "
    "following functions. To call functions, respond with a pythonic function call wrapped in "
    "<function_calls></function_calls> XML tags.\n[...]\n<function_calls>\nfunction1(param1='value1')\n"
    "function2(param2='value2')\n</function_calls>\n\nHere are the available functions:\n<functions>\n"
    "{%- for tool in tools %}{{- tool.function | tojson }}{%- if not loop.last %}{{- '\\n' }}{%- endif %}"
    "{%- endfor %}\n</functions></s>{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|assistant|><function_calls>\n"
    "{%- for tool_call in m.tool_calls %}{%- set tool_call = tool_call.function %}{{- tool_call.name + '(' }}"
    "{%- set args = tool_call.arguments %}{%- for key, value in args.items() %}{{- key + '=' }}"
    "{%- if value is string %}{{- \"'\" + value + \"'\" }}{%- elif value is none %}{{- 'null' }}"
    "{%- elif value is sameas true %}{{- 'true' }}{%- elif value is sameas false %}{{- 'false' }}"
    "{%- else %}{{- value | tojson }}{%- endif %}{%- if not loop.last %}{{- ', ' }}{%- endif %}{%- endfor %}"
    "{{- ')' }}{%- if not loop.last %}{{- '\\n' }}{%- endif %}{%- endfor %}\n</function_calls></s>"
    "{%- elif m.role == 'tool' %}<|user|>{{ m.content }}</s>"
    "{%- else %}<|{{ m.role }}|>{{ m.content }}</s>{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|assistant|>{%- endif %}"
)

# Gemma 4's tool parts (google/gemma-4 chat_template.jinja: its format_argument macro, strings between the <|"|> quote
# token, objects' keys sorted and bare in calls; each tool declared as <|tool>declaration:NAME{...}<tool|>, whose
# parameters the release writes with its format_parameters macro, types upper-cased, here with format_argument; a
# call written back as <|tool_call>call:NAME{key:value,...}<tool_call|>, a result as <|tool_response>) over the test
# tokenizer's tags.
GEMMA4_TEMPLATE = (
    "{%- macro format_argument(argument, escape_keys=True) -%}"
    "{%- if argument is string -%}{{- '<|\"|>' + argument + '<|\"|>' -}}"
    "{%- elif argument is boolean -%}{{- 'true' if argument else 'false' -}}"
    "{%- elif argument is mapping -%}{{- '{' -}}{%- set ns = namespace(found_first=false) -%}"
    "{%- for key, value in argument | dictsort -%}{%- if ns.found_first %},{% endif -%}"
    "{%- set ns.found_first = true -%}"
    "{%- if escape_keys -%}{{- '<|\"|>' + key + '<|\"|>' -}}{%- else -%}{{- key -}}{%- endif -%}"
    ":{{- format_argument(value, escape_keys=escape_keys) -}}{%- endfor -%}{{- '}' -}}"
    "{%- elif argument is sequence -%}{{- '[' -}}{%- for item in argument -%}"
    "{{- format_argument(item, escape_keys=escape_keys) -}}{%- if not loop.last %},{% endif -%}{%- endfor -%}"
    "{{- ']' -}}{%- else -%}{{- argument -}}{%- endif -%}{%- endmacro -%}"
    "{%- if tools %}<|system|>{%- for tool in tools %}{{- '<|tool>declaration:' + tool.function.name + '{' -}}"
    "{{- 'description:<|\"|>' + (tool.function.description or '') + '<|\"|>' -}}"
    "{{- ',parameters:' + format_argument(tool.function.parameters or {}, escape_keys=False) -}}"
    "{{- '}<tool|>' -}}{%- endfor %}</s>{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|assistant|>{{ m.content or '' }}"
    "{%- for tool_call in m.tool_calls %}{%- set function = tool_call.function %}"
    "{{- '<|tool_call>call:' + function.name + '{' -}}{%- set ns = namespace(found_first=false) -%}"
    "{%- for key, value in function.arguments | dictsort -%}{%- if ns.found_first %},{% endif -%}"
    "{%- set ns.found_first = true -%}{{- key -}}:{{- format_argument(value, escape_keys=False) -}}{%- endfor -%}"
    "{{- '}<tool_call|>' -}}{%- endfor %}</s>"
    "{%- elif m.role == 'tool' %}<|user|><|tool_response>response:{{ m.name or 'tool' }}"
    "{value:<|\"|>{{ m.content }}<|\"|>}<tool_response|></s>"
    "{%- else %}<|{{ m.role }}|>{{ m.content }}</s>{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|assistant|>{%- endif %}"
)

# meta-llama/Llama-4-Scout-17B-16E-Instruct's chat_template.json (its tool parts: the format asked for and each tool
# as indented JSON, which the release writes into the first user turn, here a turn of their own; an earlier call
# written back as <|python_start|>, the message's text, <|python_end|>, then {"name": ..., "parameters": ...} per
# call with nothing between them; a result as an ipython turn) over the test tokenizer's tags.
LLAMA4_TEMPLATE = (
    "{%- if tools %}<|user|>Given the following functions, please respond with a JSON for a function call with its "
    "proper arguments that best answers the given prompt.\n\nRespond in the format {\"name\": function name, "
    "\"parameters\": dictionary of argument name and its value}.Do not use variables.\n\n"
    "{%- for t in tools %}{{- t | tojson(indent=4) }}{{- '\\n\\n' }}{%- endfor %}</s>{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|assistant|>{{- '<|python_start|>' }}{{- m.content or '' }}"
    "{{- '<|python_end|>' }}{%- for tool_call in m.tool_calls %}"
    "{{- '{\"name\": \"' + tool_call.function.name + '\", ' }}{{- '\"parameters\": ' }}"
    "{{- tool_call.function.arguments | tojson }}{{- '}' }}{%- endfor %}</s>"
    "{%- elif m.role == 'tool' %}<|ipython|>{{ m.content }}</s>"
    "{%- else %}<|{{ m.role }}|>{{ m.content }}</s>{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|assistant|>{%- endif %}"
)

#: Gemma 4's tokens as FunctionGemma (Gemma 3's vocabulary) spells them: the one-to-one map Google's own gemma
#: library converts between the two with.
AS_FUNCTIONGEMMA = {'<|"|>': "<escape>", "<|tool>": "<start_function_declaration>",
                    "<tool|>": "<end_function_declaration>", "<|tool_call>": "<start_function_call>",
                    "<tool_call|>": "<end_function_call>", "<|tool_response>": "<start_function_response>",
                    "<tool_response|>": "<end_function_response>"}


def _as_functiongemma(text: str) -> str:
    for gemma4, functiongemma in AS_FUNCTIONGEMMA.items():
        text = text.replace(gemma4, functiongemma)
    return text


# FunctionGemma's tool parts (google/functiongemma-270m-it: each tool as <start_function_declaration>declaration:NAME
# {description:<escape>...<escape>,parameters:{...}}<end_function_declaration>, strings between <escape>, a call
# written back as <start_function_call>call:NAME{key:value,...}<end_function_call>, then <start_function_response>
# where the tool's answer goes) over the test tokenizer's tags. Reconstructed: Gemma 4's above under FunctionGemma's
# tokens (its template is the one Gemma 4's grew from), the calls then followed by <start_function_response>; the
# release's own file was not among the sources read here, so its key order (dictsort) is Gemma 4's.
FUNCTIONGEMMA_TEMPLATE = _as_functiongemma(GEMMA4_TEMPLATE).replace(
    "'}<end_function_call>' -}}{%- endfor %}</s>",
    "'}<end_function_call>' -}}{%- endfor %}<start_function_response></s>")
assert FUNCTIONGEMMA_TEMPLATE.count("<start_function_response>") == 2  # the answer's, and the one after calls

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


def _tool_calls_list(calls: Calls) -> str:
    """Calls as Hunyuan-A13B and Jamba write them: one JSON list between <tool_calls> tags."""
    return f"<tool_calls>{json.dumps([{'name': name, 'arguments': arguments} for name, arguments in calls])}" \
           "</tool_calls>"


def _phi4(calls: Calls) -> str:
    """Calls as Phi-4-mini writes them: functools then one JSON list."""
    return "functools" + json.dumps([{"name": name, "arguments": arguments} for name, arguments in calls])


def _olmo3(calls: Calls) -> str:
    """Calls as OLMo 3 writes them, a line each in one block, each value as JSON (as the forced grammar writes it)."""
    return "<function_calls>\n" + "\n".join(_py([call])[1:-1] for call in calls) + "\n</function_calls>"


def _gemma_value(value: Any) -> str:
    """A value as Gemma 4's template writes it (its format_argument macro, keys bare)."""
    if isinstance(value, str):
        return f'<|"|>{value}<|"|>'
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_gemma_value(v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_gemma_value(v) for v in value) + "]"
    return json.dumps(value)


def _gemma4(calls: Calls) -> str:
    """Calls as Gemma 4 writes them, a block each, one right after another."""
    return "".join(f"<|tool_call>call:{name}{_gemma_value(arguments)}<tool_call|>" for name, arguments in calls)


def _llama4(calls: Calls) -> str:
    """Calls as Llama 4's template writes them: JSON objects right after one another."""
    return "".join(json.dumps({"name": name, "parameters": arguments}) for name, arguments in calls)


def _functiongemma(calls: Calls) -> str:
    """Calls as FunctionGemma writes them: Gemma 4's under its tokens (strings' text holding none of them)."""
    return _as_functiongemma(_gemma4(calls))


MINIMAX_MARKERS = ("<minimax:tool_call>", "</minimax:tool_call>")
TOOL_CALLS_MARKERS = ("<tool_calls>", "</tool_calls>")
SEED_MARKERS = ("<seed:tool_call>", "</seed:tool_call>")
#: (format, template, how it writes calls, its special tokens)
ROWS: list[tuple[Any, str, Callable[[Calls], str], tuple[str, ...]]] = [
    (MINIMAX, MINIMAX_TEMPLATE, _minimax, MINIMAX_MARKERS),
    (SEED, SEED_OSS_TEMPLATE, _seed, SEED_MARKERS),
    (PYTHONIC, PYTHONIC_TEMPLATE, _py, ()),
    (INTERNLM, INTERNLM_TEMPLATE, _internlm, ("<|action_start|>", "<|plugin|>", "<|action_end|>")),
    (HUNYUAN, HUNYUAN_TEMPLATE, _tool_calls_list, ()),
    (JAMBA, JAMBA_TEMPLATE, _tool_calls_list, TOOL_CALLS_MARKERS),
    (PHI4_MINI, PHI4_MINI_TEMPLATE, _phi4, ()),
    (OLMO3, OLMO3_TEMPLATE, _olmo3, ("<function_calls>", "</function_calls>")),
    (GEMMA4, GEMMA4_TEMPLATE, _gemma4, ("<|tool_call>", "<tool_call|>", '<|"|>')),
    (FUNCTIONGEMMA, FUNCTIONGEMMA_TEMPLATE, _functiongemma,
     ("<start_function_call>", "<end_function_call>", "<escape>")),
    (LLAMA4, LLAMA4_TEMPLATE, _llama4, ("<|python_start|>", "<|python_end|>")),
]
IDS = ["minimax_m2", "seed_oss", "pythonic", "internlm", "hunyuan_a13b", "jamba", "phi4_mini", "olmo3", "gemma4",
       "functiongemma", "llama4_json"]


def _read(fmt, text: str, tools: list | None = None) -> list[tuple[str, Any]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in fmt.read(text, tools).calls]


def _tool(name: str, properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object",
                                                                          "properties": properties}}}


# ----------------------------------------------------------------- detection
def test_the_new_templates_are_told_apart_from_the_others():
    """Each release's template gives its own format; Seed-OSS's also holds ``<parameter=`` (Qwen3-Coder's sign) and
    is still Seed-OSS; the templates that had a format keep it."""
    assert [format_of(t) for _, t, _, _ in ROWS] == [MINIMAX, SEED, PYTHONIC, INTERNLM, HUNYUAN, JAMBA, PHI4_MINI,
                                                     OLMO3, GEMMA4, FUNCTIONGEMMA, LLAMA4]
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


def test_gemma4_calls_are_typed_as_written_and_the_text_around_them_kept():
    """Numbers, booleans, null, nested objects and lists, strings between <|"|> (commas and braces in them kept, a
    number in quotes a string), a key between quotes; several blocks, the text before, between and after kept; a
    block that does not read as one call (or is not closed) leaves the reply text."""
    text = ('On it.\n<|tool_call>call:find{days:2,ratio:-2.5,big:1e3,ok:true,no:false,none:null,code:<|"|>42<|"|>,'
            'where:{city:<|"|>Oslo, {north}<|"|>,tags:[1,<|"|>a<|"|>,{b:None}]},<|"|>q k<|"|>:[]}<tool_call|>'
            "<|tool_call>call:get_time{}<tool_call|>\nthen <|tool_call>call:f{ x : 1 }<tool_call|> done")
    reply = GEMMA4.read(text, None)
    assert _read(GEMMA4, text) == [
        ("find", {"days": 2, "ratio": -2.5, "big": 1000.0, "ok": True, "no": False, "none": None, "code": "42",
                  "where": {"city": "Oslo, {north}", "tags": [1, "a", {"b": None}]}, "q k": []}),
        ("get_time", {}), ("f", {"x": 1})]
    assert reply.content == "On it.\n\nthen  done"
    assert json.loads(reply.calls[0]["function"]["arguments"])["days"] == 2  # an int, not 2.0
    one = _gemma4([("f", {"x": 1, "s": "y"})])
    for bad in (one[:-len("<tool_call|>")], one.replace("call:", ""), one.replace("x:1", "x:1,,"),
                one.replace("x:1", "x"), one.replace('y<|"|>', "y"), one.replace("}<tool", "} more<tool"),
                one.replace("{", "{[", 1), one.replace("call:f", "call:")):
        # unclosed, no call:, empty item, no value, string left open, text after, a list left open, no name
        assert GEMMA4.read(bad, None).calls == [] and GEMMA4.read(bad, None).content == bad, bad


def test_functiongemma_calls_read_as_gemma4s_under_its_own_tokens():
    """Values typed as written, strings between <escape> (commas and braces in them kept); several blocks and the
    text around them kept; <start_function_response> after the calls ends the reply (what the model goes on to write
    there is the tool's turn). Gemma 4's quote token is no quote here, and a block that does not read as one call
    leaves the reply text."""
    text = ("On it.\n<start_function_call>call:find{days:2,ratio:-2.5,ok:true,none:null,code:<escape>42<escape>,"
            "where:{city:<escape>Oslo, {north}<escape>,tags:[1,<escape>a<escape>]}}<end_function_call>"
            "<start_function_call>call:get_time{}<end_function_call>\nthen")
    assert _read(FUNCTIONGEMMA, text) == [
        ("find", {"days": 2, "ratio": -2.5, "ok": True, "none": None, "code": "42",
                  "where": {"city": "Oslo, {north}", "tags": [1, "a"]}}), ("get_time", {})]
    assert FUNCTIONGEMMA.read(text, None).content == "On it.\n\nthen"
    ended = text + "<start_function_response>response:find{value:<escape>sunny<escape>}<end_function_response>"
    assert _read(FUNCTIONGEMMA, ended) == _read(FUNCTIONGEMMA, text)
    assert FUNCTIONGEMMA.read(ended, None).content == "On it.\n\nthen"
    one = _functiongemma([("f", {"x": 1, "s": "y"})])
    for bad in (one[:-len("<end_function_call>")], one.replace("call:", ""), one.replace("<escape>y", '<|"|>y'),
                one.replace("y<escape>", "y"), one.replace("}<end", "} more<end"), _gemma4([("f", {"x": 1})]),
                "Done.<start_function_response>"):
        # unclosed, no call:, Gemma 4's quote, string left open, text after, Gemma 4's block, no calls
        assert FUNCTIONGEMMA.read(bad, None).calls == [] and FUNCTIONGEMMA.read(bad, None).content == bad, bad
    assert GEMMA4.read(one, None).calls == []  # nor is FunctionGemma's block Gemma 4's


def test_llama4_json_calls_are_the_whole_reply_maybe_between_python_tags():
    """JSON objects right after one another (or ``;`` apart, as Llama 3.1's), "arguments" read too; between
    <|python_start|> and <|python_end|>, or after the empty such block Llama 4's template writes a call back with;
    anything else (text before the calls, text in that block, an object that is no call, one cut short) is text."""
    text = '{"name": "f", "parameters": {"x": [1, {"y": null}]}}{"name": "g", "arguments": {"s": "a; b"}}'
    calls = [("f", {"x": [1, {"y": None}]}), ("g", {"s": "a; b"})]
    assert _read(LLAMA4, text) == calls and LLAMA4.read(text, None).content is None
    for form in (text.replace("}}{", "}}; {"), f"<|python_start|>{text}<|python_end|>",
                 f"<|python_start|><|python_end|>{text}", f" \n<|python_start|>{text}"):
        assert _read(LLAMA4, form) == calls, form
    one = _llama4([("f", {"x": 1})])
    for bad in ("Sure: " + one, f"<|python_start|>Sure<|python_end|>{one}", '{"x": 1}', one[:-1], "{x}",
                '{"name": "f", "parameters": [1]}'):
        assert LLAMA4.read(bad, None).calls == [] and LLAMA4.read(bad, None).content == bad, bad


@pytest.mark.parametrize("fmt, template, write, markers", ROWS, ids=IDS)
def test_a_stream_holds_back_the_calls_and_sends_them_at_the_end(fmt, template, write, markers):
    """Fed a character at a time, the content sent is the text before the calls (none for a pythonic or Llama 4
    reply, which is calls alone) and the calls come whole at the end; text that only began like a call is sent at
    the end."""
    before = "" if fmt in (PYTHONIC, LLAMA4) else "Checking."
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


RENDERED = [row for row in ROWS if row[0] not in (INTERNLM, PHI4_MINI)]  # theirs: see below


def test_hunyuan_and_jamba_calls_are_one_list_between_tool_calls_tags():
    """Several calls in the list, the text before and after it kept, the closing tag left out at the end (a reply
    that stopped there); a list that is not all calls, or no JSON, leaves the reply text."""
    for fmt in (HUNYUAN, JAMBA):
        text = "Sure.\n" + _tool_calls_list([("f", {"x": [1, {"y": None}]}), ("g", {})]) + "\nDone."
        reply = fmt.read(text, None)
        assert _read(fmt, text) == [("f", {"x": [1, {"y": None}]}), ("g", {})] and reply.content == "Sure.\n\nDone."
        one = _tool_calls_list([("f", {"x": 1})])
        assert _read(fmt, one.removesuffix("</tool_calls>")) == [("f", {"x": 1})]
        for bad in (one[:-len("}]</tool_calls>")], one.replace('"f"', '""'), one.replace("[{", "[1, {"),
                    one.replace('"x": 1', "x")):  # cut, no name, not all calls, not JSON
            assert fmt.read(bad, None).calls == [] and fmt.read(bad, None).content == bad, bad


def test_phi4_mini_calls_follow_functools():
    """The list after ``functools``, its arguments under "arguments" or "parameters"; the text before kept; the word
    elsewhere, a bare list (functools is no special token to drop) or a list that is not all calls are text."""
    text = 'Let me look.\nfunctools[{"name": "f", "arguments": {"x": 1}}, {"name": "g", "parameters": {"y": "z"}}]'
    assert _read(PHI4_MINI, text) == [("f", {"x": 1}), ("g", {"y": "z"})]
    assert PHI4_MINI.read(text, None).content == "Let me look."
    for bad in ("Use functools.partial here.", '[{"name": "f", "arguments": {}}]', 'functools[{"name": "f"}, 1]',
                'functools[{"name": "f", "arguments": {"x": 1}'):
        assert PHI4_MINI.read(bad, None).calls == [] and PHI4_MINI.read(bad, None).content == bad, bad


def test_olmo3_calls_are_python_calls_a_line_in_function_calls():
    """A call a line (single-quoted strings as OLMo 3's template writes them, JSON's null / true, nested values), the
    text before and after the block kept; a block with a line that is no such call (or one cut short) is text."""
    text = ("On it.\n<function_calls>\nget_weather(city='Paris', days=2, ok=true)\n"
            "find(where={'lat': 59.9}, tags=['a', null])\n</function_calls>\nthen")
    reply = OLMO3.read(text, None)
    assert _read(OLMO3, text) == [("get_weather", {"city": "Paris", "days": 2, "ok": True}),
                                  ("find", {"where": {"lat": 59.9}, "tags": ["a", None]})]
    assert reply.content == "On it.\n\nthen"
    one = _olmo3([("f", {"x": 1})])
    for bad in (one.replace("f(x=1)", "f(x=1"), one.replace("f(x=1)", "f(1)"), one.replace("f(x=1)", "x = 1"),
                one.replace("f(x=1)", "f(x=1)\nsome text"), "<function_calls>\n</function_calls>",
                "get_weather(city='Paris')"):  # cut, positional, no call, text, no calls, no block
        assert OLMO3.read(bad, None).calls == [] and OLMO3.read(bad, None).content == bad, bad


@pytest.mark.parametrize("fmt, template, write, markers", RENDERED, ids=[row[0].name for row in RENDERED])
def test_earlier_calls_render_through_the_template_as_the_format_reads_them(tmp_path, fmt, template, write,
                                                                           markers):
    """An earlier call sent back renders through the release's template into text its format reads as that call
    (Llama 4's pythonic template writes every value as a string between quotes, so strings round-trip there;
    OLMo 3's writes a string between single quotes as it is, so one with a quote in it renders as no Python)."""
    from ferrum.serve.tools import template_tool_calls
    from ferrum.tokenizer import Tokenizer

    arguments = {"city": "Oslo", "note": "5 > 4" if fmt is OLMO3 else "it's 5 > 4"}
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
    # arguments, which is no JSON (its parser, and this one, read JSON); that template is left as it renders. vLLM's
    # Phi-4-mini template writes an earlier call without its functools marker, which no parser reads as a call.


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


def test_functiongemma_stops_where_the_tools_turn_begins(tmp_path):
    """FunctionGemma writes ``<start_function_response>`` after its calls, where the tool's answer would begin
    (Google's guide names it a stop sequence): the server stops there, so a reply of calls ends as calls with
    finish reason ``tool_calls``, whole and streamed, rather than running on to ``max_tokens``. The scripted token
    spells a call and the ending; the logit bias would have the model write it again and again."""
    pytest.importorskip("transformers")
    from support import write_scripted_checkpoint
    from test_serve import Server

    reply = _functiongemma([("get_weather", {"city": "Oslo"})]) + "<start_function_response>"
    folder, token = write_scripted_checkpoint(tmp_path / "model", reply, FUNCTIONGEMMA_TEMPLATE, special=True,
                                              context=2048)
    srv = Server(folder)
    try:
        client = srv.client()
        ask = dict(model="tiny", messages=[{"role": "user", "content": "weather in Oslo?"}], tools=[WEATHER],
                   logit_bias={str(token): 100}, max_tokens=4, temperature=0)
        whole = client.chat.completions.create(**ask)
        (choice,) = whole.choices
        assert choice.finish_reason == "tool_calls" and whole.usage.completion_tokens == 1, whole
        assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
            ("get_weather", {"city": "Oslo"})]
        chunks = list(client.chat.completions.create(**ask, stream=True))
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        without_tools = client.chat.completions.create(**{**ask, "tools": None})  # the ending is no stop then
        assert without_tools.choices[0].finish_reason == "length"
    finally:
        assert srv.stop(), srv.log.read_text()
