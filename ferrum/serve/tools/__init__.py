"""Tool calls: the formats chat templates ask models to write them in, parsed back out of replies."""

from ferrum.serve.tools.formats import FORMATS, call_or_answer_grammar, forced_call_grammar, format_of, releasable
from ferrum.serve.tools.replies import ToolReplies
from ferrum.serve.tools.requests import RawArguments, check_tools, raw_arguments_in, template_tool_calls

__all__ = ["FORMATS", "RawArguments", "ToolReplies", "call_or_answer_grammar", "check_tools", "forced_call_grammar",
           "format_of",
           "raw_arguments_in", "releasable", "template_tool_calls"]
