"""Chat templates, rendered the way transformers' `apply_chat_template(tokenize=False)` renders them.

Chat templates are Jinja code shipped with a checkpoint. They run in an immutable sandbox with the
same options, filters and globals transformers gives them, so a prompt is byte-for-byte the one the
model was trained on.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edge_runtime.errors import CheckpointError, InvalidRequest

# transformers copies a message's reasoning under each of these names, since templates read different ones.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; here it only renders
    its body. Without it, templates that use the tag would not compile."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: jinja2.runtime.Macro) -> str:
        return caller()


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters and cannot indent; templates expect plain json.dumps.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _environment()


@functools.lru_cache(maxsize=32)
def compile_chat_template(template: str) -> jinja2.Template:
    """The compiled template, cached; raises `jinja2.TemplateSyntaxError` when it does not parse."""
    return _ENV.from_string(template)


@functools.lru_cache(maxsize=32)
def template_variables(template: str) -> frozenset[str]:
    """The variables a template reads from its context (`messages`, `tools`, ...); empty when it
    does not parse."""
    try:
        return frozenset(jinja2.meta.find_undeclared_variables(_ENV.parse(template)))
    except jinja2.TemplateSyntaxError:
        return frozenset()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _normalize_message(index: int, message: Any) -> dict[str, Any]:
    """Drop None-valued keys (OpenAI clients send `content: null`) and alias reasoning, as transformers does."""
    if not isinstance(message, dict):
        raise InvalidRequest("messages", f"message {index} is not an object")
    message = {key: value for key, value in message.items() if value is not None}
    reasoning = next((message[key] for key in _REASONING_FIELDS if key in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def render_chat_template(
    template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool,
    bos_token: str | None,
    eos_token: str | None,
    tools: list[dict] | None = None,
    **extra: Any,
) -> str:
    """The prompt text for `messages`. `extra` reaches the template as variables (e.g. `enable_thinking`,
    `documents`, the other special tokens). A token given as None stays undefined, as in transformers."""
    if not messages:
        raise InvalidRequest("messages", "must contain at least one message")
    chat = [_normalize_message(index, message) for index, message in enumerate(messages)]
    specials = {"bos_token": bos_token, "eos_token": eos_token}
    context = {**{name: value for name, value in specials.items() if value is not None}, **extra}
    documents = context.pop("documents", None)
    try:
        compiled = compile_chat_template(template)
    except jinja2.TemplateSyntaxError as exc:
        raise CheckpointError(f"chat template does not compile: {_one_line(exc)}") from exc
    try:
        return compiled.render(
            messages=chat,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **context,
        )
    except Exception as exc:  # a template is arbitrary code: whatever it raises comes from the request it got
        raise InvalidRequest("messages", f"chat template failed: {_one_line(exc)}") from exc
