"""Tool calling in the engine: a request's tools rendered into the prompt, the grammar a tool
call must follow, and a streaming parser that splits the output into content text and
tool-call deltas. How a call is written is the model family's *tool format*:

- `hermes`: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call.
  Rendered by the chat template when it reads `tools` and knows `<tool_call>` (Qwen2.5, Hermes,
  SmolLM3), else by the fallback of docs/tool-calling.md: a system-prompt section listing the
  functions, assistant calls written as those blocks, tool results as a user turn.
- `glm4`: GLM-4's `<|assistant|>name\\n{arguments}` (one call per turn; a text answer starts
  with a newline), rendered by GLM-4's own template with `observation` turns for results.
"""

from __future__ import annotations

from ..chat_template import template_variables
from .base import (
    MAX_PARALLEL_CALLS,
    MAX_TOOLS,
    Tool,
    ToolCallDelta,
    ToolCallParser,
    ToolFormat,
    call_list,
    chosen,
    parse_tools,
    uses_tools,
)
from .glm4 import Glm4Format, Glm4Parser
from .hermes import HermesFormat, HermesParser

__all__ = ["MAX_PARALLEL_CALLS", "MAX_TOOLS", "Glm4Format", "Glm4Parser", "HermesFormat", "HermesParser", "Tool", "ToolCallDelta",
           "ToolCallParser", "ToolFormat", "call_list", "chosen", "parse_tools", "tool_format", "uses_tools"]


def tool_format(template: str | None) -> ToolFormat:
    """The tool format of a chat template (see the module docstring)."""
    if template and "<|observation|>" in template:
        return Glm4Format(tools_on_message="item['tools']" in template or 'item["tools"]' in template)
    native = template is not None and "tools" in template_variables(template) and "<tool_call>" in template
    return HermesFormat(native)
