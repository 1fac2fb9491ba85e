"""Typed responses: dataclasses for the OpenAI API's completion, chunk and model objects. Each
keeps the JSON it was read from in `raw` (fields this version does not know stay reachable),
and answers carry where they came from: `gateway`, `request_id`, `served_by` (local, cache or
cloud)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def parse(cls, data: Any) -> Usage | None:
        if not isinstance(data, Mapping):
            return None
        return cls(_int(data.get("prompt_tokens")), _int(data.get("completion_tokens")), _int(data.get("total_tokens")))


@dataclass
class Meta:
    """Where an answer came from (from the response headers, not the body)."""

    gateway: str | None = None  # the base URL that answered
    request_id: str | None = None  # x-request-id
    served_by: str | None = None  # x-served-by: local, cache or cloud


# ---------------------------------------------------------------------------------------------- chat


@dataclass
class ChatMessage:
    role: str
    content: str | None
    tool_calls: list[dict[str, Any]] | None = None


@dataclass
class ChatChoice:
    index: int
    message: ChatMessage
    finish_reason: str | None
    logprobs: Mapping[str, Any] | None = None


@dataclass
class ChatCompletion:
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None
    meta: Meta = field(default_factory=Meta)
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def text(self) -> str:
        """The first choice's content ("" when there is none)."""
        return (self.choices[0].message.content or "") if self.choices else ""

    @classmethod
    def parse(cls, data: Mapping[str, Any], meta: Meta | None = None) -> ChatCompletion:
        choices = []
        for c in _list(data.get("choices")):
            c = _map(c)
            m = _map(c.get("message"))
            message = ChatMessage(_str(m.get("role")) or "assistant", _str(m.get("content")), m.get("tool_calls"))
            choices.append(ChatChoice(_int(c.get("index")), message, _str(c.get("finish_reason")), c.get("logprobs")))
        return cls(_str(data.get("id")) or "", _int(data.get("created")), _str(data.get("model")) or "", choices,
                   Usage.parse(data.get("usage")), meta or Meta(), data)


@dataclass
class Delta:
    role: str | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


@dataclass
class ChatChunkChoice:
    index: int
    delta: Delta
    finish_reason: str | None
    logprobs: Mapping[str, Any] | None = None


@dataclass
class ChatCompletionChunk:
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None  # only on the last chunk, when include_usage was asked for
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def text(self) -> str:
        """The first choice's new content ("" for role, finish and usage chunks)."""
        return (self.choices[0].delta.content or "") if self.choices else ""

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> ChatCompletionChunk:
        choices = []
        for c in _list(data.get("choices")):
            c = _map(c)
            d = _map(c.get("delta"))
            delta = Delta(_str(d.get("role")), _str(d.get("content")), d.get("tool_calls"))
            choices.append(ChatChunkChoice(_int(c.get("index")), delta, _str(c.get("finish_reason")), c.get("logprobs")))
        return cls(_str(data.get("id")) or "", _int(data.get("created")), _str(data.get("model")) or "", choices,
                   Usage.parse(data.get("usage")), data)


# ---------------------------------------------------------------------------------------------- completions


@dataclass
class CompletionChoice:
    index: int
    text: str
    finish_reason: str | None
    logprobs: Mapping[str, Any] | None = None


def _completion_choices(data: Mapping[str, Any]) -> list[CompletionChoice]:
    out = []
    for c in _list(data.get("choices")):
        c = _map(c)
        out.append(CompletionChoice(_int(c.get("index")), _str(c.get("text")) or "", _str(c.get("finish_reason")), c.get("logprobs")))
    return out


@dataclass
class Completion:
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None
    meta: Meta = field(default_factory=Meta)
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def text(self) -> str:
        return self.choices[0].text if self.choices else ""

    @classmethod
    def parse(cls, data: Mapping[str, Any], meta: Meta | None = None) -> Completion:
        return cls(_str(data.get("id")) or "", _int(data.get("created")), _str(data.get("model")) or "",
                   _completion_choices(data), Usage.parse(data.get("usage")), meta or Meta(), data)


@dataclass
class CompletionChunk:
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def text(self) -> str:
        return self.choices[0].text if self.choices else ""

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> CompletionChunk:
        return cls(_str(data.get("id")) or "", _int(data.get("created")), _str(data.get("model")) or "",
                   _completion_choices(data), Usage.parse(data.get("usage")), data)


# ---------------------------------------------------------------------------------------------- models


@dataclass
class Model:
    id: str
    created: int = 0
    owned_by: str | None = None

    @classmethod
    def parse(cls, data: Any) -> Model:
        data = _map(data)
        return cls(_str(data.get("id")) or "", _int(data.get("created")), _str(data.get("owned_by")))
