"""The tool-call formats: how a model's chat template asks for calls, and how each format's are read back.

A chat template that describes tools to the model also fixes how the model writes a call; the format is
recognised from the template itself, as vLLM's ``--tool-call-parser`` choices are named after them:

* ``hermes`` (Qwen 2.5 / 3, Hermes, and most templates with ``<tool_call>``): each call is
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``;
* ``mistral`` (templates with ``[TOOL_CALLS]``): ``[TOOL_CALLS]`` then a JSON list of such objects, or, from
  the v11 tokenizers on (Mistral Small 3.1+, Devstral, Magistral), ``[TOOL_CALLS]name[ARGS]{...}`` per call;
* ``granite`` (IBM Granite 3, templates with ``<|tool_call|>``): the same list after ``<|tool_call|>``;
* ``llama3_json`` (Llama 3.1-3.3, whose templates carry ``<|python_tag|>``): the whole reply is one JSON object
  ``{"name": ..., "parameters": {...}}``;
* ``llama4_json`` (Llama 4's official template, with ``<|python_start|>`` and ``"parameters"``): the whole reply is
  such objects, one right after another, maybe between ``<|python_start|>`` and ``<|python_end|>``, or after an empty
  such block as the template writes a call back;
* ``harmony`` (gpt-oss, templates with ``<|call|>``): a message to ``functions.NAME`` whose text is the
  arguments (read by :mod:`ferrum.serve.harmony`, which hands the calls on in one canonical form);
* ``glm45`` (GLM-4.5 / 4.6 / 4.7, templates with ``<arg_key>``): ``<tool_call>NAME`` then per argument
  ``<arg_key>K</arg_key><arg_value>V</arg_value>``, then ``</tool_call>``: a value is read as JSON where it parses
  and the tool does not declare it a string, else kept as text (vLLM's ``glm45`` parser);
* ``qwen3_coder`` (Qwen3-Coder, Qwen3.5; templates with ``<parameter=``): ``<tool_call>\\n<function=NAME>``, then
  per argument ``<parameter=K>\\nV\\n</parameter>``, then ``</function>\\n</tool_call>``: values read by the type
  the tool's schema gives them, and ``<function=...>`` blocks without ``<tool_call>`` or a ``</parameter>`` left
  out read as calls (vLLM's ``qwen3_coder`` parser);
* ``deepseek_v3`` (DeepSeek-V3 and R1, templates with ``<｜tool▁calls▁begin｜>`` and ```json): inside
  ``<｜tool▁calls▁begin｜>...<｜tool▁calls▁end｜>``, per call
  ``<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{...}\\n```<｜tool▁call▁end｜>``;
* ``deepseek_v31`` (DeepSeek-V3.1 and V3.2-Exp, templates with ``<｜tool▁calls▁begin｜>`` but no ```json fence):
  inside the same markers, per call ``<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>``, one right
  after another;
* ``kimi_k2`` (Kimi K2, templates with ``<|tool_calls_section_begin|>``): inside
  ``<|tool_calls_section_begin|>...<|tool_calls_section_end|>``, per call
  ``<|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{...}<|tool_call_end|>``; the
  ``functions.NAME:IDX`` the model wrote is the call's id, which the template writes back;
* ``minimax_m2`` (MiniMax-M2, templates with ``<minimax:tool_call>``): inside ``<minimax:tool_call>...
  </minimax:tool_call>``, per call ``<invoke name="NAME">`` then per argument ``<parameter name="K">V</parameter>``,
  then ``</invoke>``: values read by the types the tool's schema gives them (vLLM's ``minimax_m2`` parser);
* ``seed_oss`` (Seed-OSS, templates with ``<seed:tool_call>``): Qwen3-Coder's ``<function=NAME>`` blocks inside
  ``<seed:tool_call>...</seed:tool_call>``, each value right inside its ``<parameter=K>`` tags;
* ``pythonic`` (Llama 3.2's and Llama 4's pythonic templates, which show the model
  ``[func_name1(param1=value1, ...), ...]``): the whole reply is a Python list of calls with keyword arguments,
  ``[get_weather(city="Paris"), ...]`` (vLLM's ``pythonic`` / ``llama4_pythonic`` parsers);
* ``internlm`` (InternLM 2 / 2.5 / 3, templates with ``<|action_start|><|plugin|>``): per call
  ``<|action_start|><|plugin|>\n{"name": ..., "parameters": {...}}<|action_end|>`` (or ``"arguments"``);
* ``hunyuan_a13b`` (Hunyuan-A13B, templates with ``<tool_calls>`` that ask for replies opening with ``助手：``)
  and ``jamba`` (Jamba 1.5 / 1.6 / 1.7, the other templates with ``<tool_calls>``): one JSON list of
  ``{"name": ..., "arguments": {...}}`` objects in ``<tool_calls>...</tool_calls>``;
* ``phi4_mini`` (Phi-4-mini with vLLM's template, which holds ``functools[``): ``functools`` then such a list;
* ``olmo3`` (OLMo 3, templates with ``<function_calls>``): inside ``<function_calls>...</function_calls>``, one
  Python call a line, ``get_weather(city='Paris')`` (vLLM's ``olmo3`` parser);
* ``gemma4`` (Gemma 4, templates with ``<|tool_call>`` and the ``<|"|>`` quote token): per call
  ``<|tool_call>call:NAME{key:value,...}<tool_call|>``, keys bare, strings between ``<|"|>``, numbers, booleans,
  nested objects and lists as written (vLLM's ``gemma4`` parser);
* ``functiongemma`` (FunctionGemma, templates with ``<start_function_call>``): Gemma 4's syntax under Gemma 3's
  tokens, ``<start_function_call>call:NAME{key:value,...}<end_function_call>`` with strings between ``<escape>``,
  the calls ended by ``<start_function_response>`` (vLLM's and llama.cpp's ``functiongemma``).

Markers such as ``[TOOL_CALLS]`` are special tokens, which decoding leaves out by default, so a request with
tools decodes its reply with special tokens kept (unless it sets ``skip_special_tokens``).
Text that does not parse as calls stays the reply's content: nothing is dropped but the whitespace that lays
out the calls (``ParsedReply.around``); content is null where a reply is calls alone. A stream holds back only
what may turn out to be a call (from its opening marker on, and the whitespace before it) and sends the calls
when the choice ends, so the content it sends adds up to the whole message's.
A forced call (``tool_choice`` required or named) is sampled under a grammar of calls in the format: one or
more for "required" (unless ``parallel_tool_calls`` is false), one for a named function
(``forced_call_grammar``, :mod:`ferrum.structured`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable

from ferrum.serve import harmony
from ferrum.serve.tools.bare import (glm_grammar, qwen3_coder_grammar, read_glm, read_qwen3_coder, read_seed_oss,
                                     seed_oss_grammar)
from ferrum.serve.tools.deepseek import (DEEPSEEK_HEAD, DEEPSEEK_V31_CALL, DS_CALLS, deepseek_v3_grammar,
                                         deepseek_v31_grammar, read_deepseek_v3, read_deepseek_v31)
from ferrum.serve.tools.gemma4 import FUNCTIONGEMMA, GEMMA4
from ferrum.serve.tools.harmony_calls import HARMONY_HEAD, harmony_grammar, read_harmony
from ferrum.serve.tools.kimi import KIMI_CALL_HEAD, KIMI_CALLS, kimi_k2_grammar, read_kimi_k2
from ferrum.serve.tools.json_formats import (INTERNLM_CALL, LLAMA4_CALLS, MISTRAL_CALLS, MISTRAL_HEAD, PHI4_CALLS,
                                             TOOL_CALLS, granite_grammar, hermes_grammar, internlm_grammar,
                                             json_list_reader, llama3_grammar, llama4_grammar, mistral_grammar,
                                             phi4_mini_grammar, read_hermes, read_internlm, read_llama3_json,
                                             read_llama4_json, read_mistral, read_phi4_mini, read_tool_calls_list,
                                             tool_calls_list_grammar)
from ferrum.serve.tools.minimax import MINIMAX_CALLS, minimax_m2_grammar, read_minimax_m2
from ferrum.serve.tools.pythonic import OLMO3_CALLS, olmo3_grammar, pythonic_grammar, read_olmo3, read_pythonic
from ferrum.serve.errors import APIError
from ferrum.serve.tools.grammars import call_or_answer
from ferrum.serve.tools.reading import JSON_HEAD, ParsedReply, Schemas, calls_so_far, parameters_of
from ferrum.structured import compiled_schema
from ferrum.stop import cut_marker


@dataclass(frozen=True)
class ToolCallFormat:
    """How one family of chat templates has the model write calls."""

    name: str
    detect: tuple[str, ...]  # a template holding all of these uses the format
    markers: tuple[str, ...]  # open a call anywhere in the reply
    openers: tuple[str, ...]  # open a call at the start of the reply
    parse: Callable[..., ParsedReply]  # (text), or (text, schemas) where ``typed``
    #: A Lark grammar (llguidance's dialect) of one call to one of ``tools`` written this way, or one or more, for a
    #: forced call: ``(tools, mark, template, many)``, ``mark`` spelling a marker as its special token or as text.
    forced: Callable[[list[dict[str, Any]], Callable[[str], str], str, bool], str]
    #: Where a call names its function, up to its arguments (``calls_so_far``); group ``name``. Empty: the
    #: arguments are written bare, and ``parse`` reads a cut forced reply itself (its ``cut`` argument).
    heads: tuple[re.Pattern[str], ...] = (JSON_HEAD,)
    #: Whether ``parse`` also takes the tools' parameter schemas (:data:`Schemas`), to type arguments written bare.
    typed: bool = False
    #: Whether a reply that calls nothing is its answer's bare text, which ``response_format`` can shape beside the
    #: calls (:func:`call_or_answer_grammar`); gpt-oss's answer is a message of its own channel.
    bare_answer: bool = True
    #: What the model writes after its calls where the tool's turn begins (FunctionGemma's
    #: ``<start_function_response>``, a stop sequence in Google's guide): generation stops there, so a reply of
    #: calls ends as calls rather than running on through an imagined answer to ``max_tokens``.
    ends: tuple[str, ...] = ()

    def read(self, text: str, tools: list[dict[str, Any]] | None) -> ParsedReply:
        """``text`` parsed as this format writes calls to ``tools``."""
        if not self.typed:
            return self.parse(text)
        return self.parse(text, self._schemas(tools))

    def read_cut(self, text: str, tools: list[dict[str, Any]] | None) -> ParsedReply:
        """A forced reply that does not parse, read as cut short: its calls so far (where arguments are JSON, the
        last as far as it got; where they are written bare, the whole calls before the cut one)."""
        if self.heads:
            return calls_so_far(self.heads, text)
        return self.parse(text, self._schemas(tools), cut=True)

    @staticmethod
    def _schemas(tools: list[dict[str, Any]] | None) -> Schemas:
        return {t["function"]["name"]: parameters_of(t["function"]) for t in tools or ()}


FORMATS = (  # the first whose ``detect`` a template holds: GLM's and Qwen3-Coder's also write <tool_call>, Seed-OSS's
    # <parameter= as Qwen3-Coder's does, DeepSeek-V3's and V3.1's both <｜tool▁calls▁begin｜> (V3's fencing the
    # arguments in ```json), and Hunyuan-A13B's and Jamba's both <tool_calls> (Hunyuan's asking for 助手： replies)
    # Gemma 4's <|tool_call> and <tool_call|> and FunctionGemma's <start_function_call> hold no Hermes
    # <tool_call>; they go first all the same
    ToolCallFormat("gemma4", (GEMMA4.opening, GEMMA4.quote), (GEMMA4.opening,), (), GEMMA4.read, GEMMA4.grammar, ()),
    ToolCallFormat("functiongemma", (FUNCTIONGEMMA.opening,), (FUNCTIONGEMMA.opening,), (), FUNCTIONGEMMA.read,
                   FUNCTIONGEMMA.grammar, (), ends=(FUNCTIONGEMMA.ending,)),
    ToolCallFormat("minimax_m2", (MINIMAX_CALLS,), (MINIMAX_CALLS,), (), read_minimax_m2, minimax_m2_grammar, (),
                   typed=True),
    ToolCallFormat("seed_oss", ("<seed:tool_call>",), ("<seed:tool_call>", "<function="), (), read_seed_oss,
                   seed_oss_grammar, (), typed=True),
    ToolCallFormat("glm45", ("<arg_key>",), ("<tool_call>",), (), read_glm, glm_grammar, (), typed=True),
    ToolCallFormat("qwen3_coder", ("<parameter=",), ("<tool_call>", "<function="), (), read_qwen3_coder,
                   qwen3_coder_grammar, (), typed=True),
    ToolCallFormat("hermes", ("<tool_call>",), ("<tool_call>",), (), read_hermes, hermes_grammar),
    ToolCallFormat("mistral", (MISTRAL_CALLS,), (MISTRAL_CALLS,), ("[{",), read_mistral, mistral_grammar,
                   (MISTRAL_HEAD, JSON_HEAD)),
    ToolCallFormat("granite", ("<|tool_call|>",), ("<|tool_call|>",), ("[{",), json_list_reader("<|tool_call|>"),
                   granite_grammar),
    ToolCallFormat("hunyuan_a13b", (TOOL_CALLS, "助手："), (TOOL_CALLS,), ("[{",), read_tool_calls_list,
                   tool_calls_list_grammar),
    ToolCallFormat("jamba", (TOOL_CALLS,), (TOOL_CALLS,), ("[{",), read_tool_calls_list, tool_calls_list_grammar),
    ToolCallFormat("phi4_mini", (PHI4_CALLS + "[",), (PHI4_CALLS + "[",), (), read_phi4_mini, phi4_mini_grammar),
    ToolCallFormat("olmo3", (OLMO3_CALLS,), (OLMO3_CALLS,), (), read_olmo3, olmo3_grammar, (), typed=True),
    ToolCallFormat("pythonic", ("[func_name1(",), (), ("[", "<|python_start|>"), read_pythonic, pythonic_grammar, (),
                   typed=True),
    ToolCallFormat("llama4_json", (LLAMA4_CALLS, '"parameters"'), (), ("{", LLAMA4_CALLS), read_llama4_json,
                   llama4_grammar),
    ToolCallFormat("llama3_json", ("<|python_tag|>",), (), ("{", "<|python_tag|>"), read_llama3_json, llama3_grammar),
    ToolCallFormat("harmony", ("<|call|>",), (harmony.CALL_OPEN,), (), read_harmony, harmony_grammar, (HARMONY_HEAD,),
                   bare_answer=False),
    ToolCallFormat("deepseek_v3", (DS_CALLS, "```json"), (DS_CALLS,), (), read_deepseek_v3, deepseek_v3_grammar,
                   (DEEPSEEK_HEAD,)),
    ToolCallFormat("deepseek_v31", (DS_CALLS,), (DS_CALLS,), (), read_deepseek_v31, deepseek_v31_grammar,
                   (DEEPSEEK_V31_CALL,)),
    ToolCallFormat("internlm", (INTERNLM_CALL,), (INTERNLM_CALL,), (), read_internlm, internlm_grammar),
    ToolCallFormat("kimi_k2", (KIMI_CALLS,), (KIMI_CALLS,), (), read_kimi_k2, kimi_k2_grammar, (KIMI_CALL_HEAD,)),
)


def format_of(template: str | None) -> ToolCallFormat | None:
    """The tool-call format a chat template asks for; None for templates that do not describe tools."""
    if not template or "tools" not in template:
        return None
    return next((f for f in FORMATS if all(text in template for text in f.detect)), None)


def releasable(fmt: ToolCallFormat, text: str) -> int:
    """How much of an unfinished reply a stream can send as content: up to where a call starts or may start."""
    head = text.lstrip()
    if any(head.startswith(opener) or opener.startswith(head) for opener in fmt.openers):
        return 0
    starts = [start for start in (text.find(marker) for marker in fmt.markers) if start >= 0]
    if starts:
        return min(starts)
    return len(text) - max((cut_marker(text, marker) for marker in fmt.markers), default=0)


def forced_call_grammar(fmt: ToolCallFormat, tools: list[dict[str, Any]], tokenizer: Any, template: str,
                        many: bool = False) -> str:
    """The grammar a forced call (``tool_choice`` required or named) is sampled under: one call to one of
    ``tools`` as ``fmt`` writes it (or, ``many``, one or more), each marker its added token where the tokenizer
    has one (special or not)."""
    def mark(text: str) -> str:
        token = tokenizer.added_token_id(text)
        return json.dumps(text) if token is None else f"<[{token}]>"

    return fmt.forced(tools, mark, template, many)


def call_or_answer_grammar(fmt: ToolCallFormat, tools: list[dict[str, Any]], tokenizer: Any, template: str,
                           schema: bool | dict[str, Any], many: bool) -> str:
    """The grammar of a reply with ``tools`` the model may call (``tool_choice`` auto) and a ``response_format``
    (``schema``): calls as :func:`forced_call_grammar` takes them, or an answer in the schema. OpenAI lets the model
    call until it answers so (the OpenAI Agents SDK asks for an agent's output type this way); the schema alone
    over the whole reply left no way to call."""
    if not fmt.bare_answer:
        raise APIError(400, f"response_format beside tools is not supported for this model's replies ({fmt.name}: "
                       "its answer is a message of its own); send one of them, or tool_choice none",
                       param="response_format")
    return call_or_answer(forced_call_grammar(fmt, tools, tokenizer, template, many), compiled_schema(schema))
