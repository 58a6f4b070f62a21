"""Tool calls: the formats chat templates ask models to write them in, parsed back out of replies."""

from ferrum.serve.tools.formats import FORMATS, forced_call_grammar, format_of, releasable
from ferrum.serve.tools.replies import ToolReplies
from ferrum.serve.tools.requests import check_tools, template_tool_calls

__all__ = ["FORMATS", "ToolReplies", "check_tools", "forced_call_grammar", "format_of", "releasable",
           "template_tool_calls"]
