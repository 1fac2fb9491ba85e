"""A validated generate request turned into what the scheduler runs: the prompt's token ids
(chat template, tools) and the output's grammar constraint with its tool-call parser. Runs on
worker threads: templates, tokenizing and grammar compiles take milliseconds."""

from __future__ import annotations

import dataclasses

from .grammar import Constraint, GrammarCompiler, json_grammar
from .protocol import Generation
from .tokenizer import Tokenizer
from .tools import ToolCallParser, tool_format, uses_tools


class RequestPreparer:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.tool_format = tool_format(tokenizer.chat_template)
        self.grammars = GrammarCompiler(tokenizer, vocab_size)

    def prompt_ids(self, gen: Generation) -> list[int]:
        """A text prompt is encoded as is (with BOS where the model wants one); messages are
        rendered with the model's chat template, which writes BOS itself; tools and tool turns
        through the model's tool format."""
        op = gen.op
        if op.prompt_ids is not None:
            return op.prompt_ids
        if gen.messages is None:
            return self.tokenizer.encode(op.prompt or "", add_special_tokens=True)
        # Control tokens come from the template alone: special-token text in the caller's
        # messages and tools is held aside while rendering and encoded as plain text.
        literals: list[str] = []
        messages = self.tokenizer.shield(gen.messages, literals)
        if gen.tools or uses_tools(gen.messages):
            tools = [dataclasses.replace(t, description=self.tokenizer.shield(t.description, literals),
                                         parameters=self.tokenizer.shield(dict(t.parameters), literals)) for t in gen.tools or []]
            text = self.tool_format.render(self.tokenizer, messages, tools)
        else:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode_rendered(text, literals)

    def constraint(self, gen: Generation) -> tuple[Constraint | None, ToolCallParser | None]:
        """The grammar state of a new sequence (None without a grammar) and, for tool calls, the
        parser of its output. Raises InvalidRequest naming the schema that cannot be compiled."""
        spec = gen.grammar
        if spec is None:
            return None, None
        if spec.type == "json_object":
            return self.grammars.constraint(json_grammar({"type": "object"}, "grammar"), "grammar"), None
        if spec.type == "json_schema":
            return self.grammars.constraint(json_grammar(spec.schema or {}, "grammar.schema"), "grammar.schema"), None
        tools = gen.tools or []
        for i, tool in enumerate(tools):  # checked one by one, so that the error names the tool
            param = f"tools[{i}].function.parameters"
            self.grammars.check(json_grammar(tool.parameters, param), param)
        grammar = self.tool_format.grammar(tools, spec)
        return self.grammars.constraint(grammar, "grammar"), self.tool_format.parser()
