"""Request pieces every front parses the same way, from one typed definition (msgspec): chat
messages (OpenAI's shape, also the device protocol's), the sampling fields with the engine's
ranges (edge_wire.sampling), a prompt, and the translation of a schema problem into the 400 the
client sees. What the types cannot say is checked after decoding, naming the field at fault."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

import msgspec
from msgspec import Meta

from edge_wire.sampling import (
    MAX_INT,
    FrequencyPenalty,
    MaxTokens,
    PresencePenalty,
    RepetitionPenalty,
    RequestedSampling,
    Seed,
    StopList,
    StopString,
    Temperature,
    TopK,
    TopP,
)
from edge_wire.validation import MISSING_FIELD, UNKNOWN_FIELD, Problem, explain

from .errors import ApiError, invalid, unsupported

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def only(**json_schema: Any) -> Meta:
    """The one value the engine honours, for the document; the parser refuses others by name."""
    return Meta(extra_json_schema=json_schema)


def unsupported_past(message: str) -> Meta:
    """A bound (in the Meta beside it) that the engine's limits set, not the API's: a value past
    it is refused as unsupported, a value of the wrong type as invalid."""
    return Meta(extra={"unsupported": message})


Model = Annotated[str, Meta(min_length=1, description="the engine's model id or an alias (see /v1/models)")]


class TextPart(msgspec.Struct, forbid_unknown_fields=True):
    type: Annotated[str, only(const="text")]
    text: Optional[str] = None
    image_url: Optional[Any] = None  # the other part kinds OpenAI defines: refused by type, by name
    input_audio: Optional[Any] = None
    file: Optional[Any] = None


class CallFunction(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, Meta(min_length=1)]
    arguments: str = "{}"


class MessageToolCall(msgspec.Struct, forbid_unknown_fields=True):
    function: CallFunction
    id: str = ""
    type: Literal["function"] = "function"


class Message(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    role: Annotated[str, Meta(extra_json_schema={"enum": list(ROLES)})]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None
    refusal: Optional[Annotated[str, only(type="null")]] = None
    tool_calls: Optional[list[MessageToolCall]] = None
    tool_call_id: Optional[str] = None
    function_call: Optional[Annotated[Any, only(type="null")]] = None
    audio: Optional[Annotated[Any, only(type="null")]] = None


class SamplingFields(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Sampling parameters as both fronts take them (None: the default)."""

    max_tokens: Optional[MaxTokens] = None
    temperature: Optional[Temperature] = None
    top_p: Optional[TopP] = None
    top_k: Optional[TopK] = None  # engine extensions, as vLLM names them
    repetition_penalty: Optional[RepetitionPenalty] = None
    presence_penalty: Optional[PresencePenalty] = None
    frequency_penalty: Optional[FrequencyPenalty] = None
    seed: Optional[Seed] = None
    stop: Union[StopString, StopList, None] = None


_SAMPLED = ("temperature", "top_p", "top_k", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed")


def sampling(request: SamplingFields, max_tokens: int | None, logprobs: bool, **defaults: Any) -> RequestedSampling:
    """The engine's sampling parameters of a request; `defaults` for what it left out."""
    given = {name: getattr(request, name) for name in _SAMPLED if getattr(request, name) is not None}
    # Converted, not built: the engine's own checks (a seed past int64) run and name the field.
    return decode({**defaults, **given, "max_tokens": max_tokens, "logprobs": logprobs, "stop": request.stop or []},
                  RequestedSampling)


def decode(body: dict[str, Any], schema: type[msgspec.Struct]) -> Any:
    try:
        return msgspec.convert(body, schema)
    except msgspec.ValidationError as exc:
        raise api_error(explain(exc, schema, body)) from None


def api_error(problem: Problem) -> ApiError:
    """A schema problem as the OpenAI error the client sees (400, naming the parameter)."""
    if problem.kind == UNKNOWN_FIELD:
        return invalid(problem.path, f"unrecognized request argument: {problem.path}", code="unknown_parameter")
    if problem.kind == MISSING_FIELD:
        return invalid(problem.path, f"{problem.path} is required", code="missing_required_parameter")
    if problem.out_of_bounds and "unsupported" in problem.extra:
        return unsupported(problem.path, problem.extra["unsupported"])
    return invalid(problem.path or None, problem.message())


def messages(value: list[Message], max_messages: int, max_chars: int) -> list[dict[str, Any]]:
    if len(value) > max_messages:
        raise invalid("messages", f"too many messages: {len(value)} (at most {max_messages})", code="too_many_messages")
    out = []
    chars = 0
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        role = message.role
        if role == "function":
            raise unsupported(f"{where}.role", f"{where}.role: 'function' messages (the legacy form) are not supported; use 'tool'")
        if role not in ROLES:
            raise invalid(f"{where}.role", f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}")
        for name in ("function_call", "audio", "refusal"):  # legacy function calls, audio, refusals
            if getattr(message, name) is not None:
                raise unsupported(f"{where}.{name}", f"{where}.{name} is not supported")
        calls = _tool_calls(message, where)
        content = "" if calls and message.content is None else _content(message.content, f"{where}.content")
        chars += len(content)
        entry: dict[str, Any] = {"role": ROLES[role], "content": content}
        if calls:
            entry["tool_calls"] = calls
        if role == "tool":
            if not message.tool_call_id:
                raise invalid(f"{where}.tool_call_id", f"{where}.tool_call_id is required for tool messages (a string)")
            entry["tool_call_id"] = message.tool_call_id
        elif message.tool_call_id is not None:
            raise invalid(f"{where}.tool_call_id", f"{where}.tool_call_id is only for tool messages")
        if message.name is not None:
            entry["name"] = message.name  # the chat template may use it
        out.append(entry)
    if chars > max_chars:
        raise invalid("messages", f"messages are {chars} characters long (at most {max_chars})", code="prompt_too_long")
    return out


def _tool_calls(message: Message, where: str) -> list[dict[str, Any]]:
    """An assistant message's tool_calls, in the shape the engine takes."""
    if message.tool_calls is None:
        return []
    if message.role != "assistant":
        raise invalid(f"{where}.tool_calls", f"{where}.tool_calls is only for assistant messages")
    return [{"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}
            for call in message.tool_calls]


def _content(value: str | list[TextPart] | None, where: str) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        raise invalid(where, f"{where} must be a string or an array of text parts")
    parts = []
    for j, part in enumerate(value):
        if part.type != "text":
            raise unsupported(f"{where}[{j}].type", f"{where}[{j}]: {part.type!r} parts are not supported (only 'text')")
        if part.text is None or any(getattr(part, k) is not None for k in ("image_url", "input_audio", "file")):
            raise invalid(f"{where}[{j}]", f"{where}[{j}] must be {{'type': 'text', 'text': string}}")
        parts.append(part.text)
    return "".join(parts)


def prompt(value: str | list[Any], max_chars: int) -> dict[str, Any]:
    """A string, one string in an array, or token ids (an array of ints, or one such array)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        if len(value) > max_chars:
            raise invalid("prompt", f"prompt is {len(value)} characters long (at most {max_chars})", code="prompt_too_long")
        return {"prompt": value}
    if isinstance(value, list) and value and all(type(t) is int for t in value):
        if len(value) > max_chars:
            raise invalid("prompt", f"prompt is {len(value)} tokens long (at most {max_chars})", code="prompt_too_long")
        if not all(0 <= t <= MAX_INT for t in value):
            raise invalid("prompt", "token ids must be non-negative integers in the vocabulary")
        return {"prompt_ids": value}
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, (str, list)) for p in value):
        raise unsupported("prompt", "several prompts in one request are not supported (send one at a time)")
    raise invalid("prompt", "prompt must be a string, an array of token ids, or an array of one of those")
