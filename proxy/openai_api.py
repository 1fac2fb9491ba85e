"""The OpenAI API's shapes: request bodies of /v1/chat/completions and /v1/completions parsed
and validated into one engine request (anything the engine cannot honour is refused with a 400
naming the parameter, never ignored), and the response bodies and stream chunks built back."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from .errors import invalid, unsupported
from .tool_api import Structured, parse_structured

CHAT = "chat"
COMPLETION = "completion"
MAX_STOP = 16  # the engine's limit
COMPLETION_DEFAULT_MAX_TOKENS = 16  # as OpenAI's legacy completions; chat leaves it to the engine
_MAX_INT = 2**31 - 1
_SEED_RANGE = (-(2**63), 2**64 - 1)  # the engine takes 64-bit seeds, signed or unsigned
_CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
_MESSAGE_KEYS = frozenset({"role", "content", "name", "refusal", "tool_calls", "tool_call_id"})
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode  # one encoder: json.dumps makes one per call

# Parameters read by both endpoints; each endpoint adds its own.
_COMMON = frozenset({
    "model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
    "presence_penalty", "frequency_penalty", "logprobs", "logit_bias", "user",
    "top_k", "repetition_penalty", "ignore_eos",  # engine extensions (as vLLM names them)
})
_CHAT_FIELDS = _COMMON | {
    "messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
    "functions", "function_call", "response_format", "store", "metadata", "modalities", "service_tier",
}
_COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "best_of", "suffix"}


@dataclass(slots=True)
class GenRequest:
    """One validated request, in the engine's terms."""

    kind: str  # CHAT or COMPLETION
    model: str  # the name the client asked for
    prompt_field: str  # the request field holding the prompt: "messages" or "prompt"
    prompt: dict[str, Any]  # the engine's prompt argument: {"messages": ...}, {"prompt": ...} or {"prompt_ids": ...}
    params: dict[str, Any]  # the engine's sampling params
    stream: bool
    include_usage: bool
    logprobs: bool
    structured: Structured = Structured()  # the engine's tools and grammar

    @property
    def deterministic(self) -> bool:
        """Same request, same answer: greedy, or sampled from a fixed seed."""
        return self.params.get("temperature") == 0.0 or self.params.get("seed") is not None

    def cache_fields(self) -> dict[str, Any]:
        return {**self.prompt, "params": self.params, **self.structured.engine_fields()}


# ---------------------------------------------------------------------------------------------- requests


def parse_chat(body: dict[str, Any], max_messages: int, max_prompt_chars: int) -> GenRequest:
    _check_fields(body, _CHAT_FIELDS)
    model = _model(body)
    messages = _messages(body.get("messages"), max_messages, max_prompt_chars)
    functions = body.get("functions")
    if functions is not None and not isinstance(functions, list):
        raise invalid("functions", "functions must be an array")
    if functions:
        raise unsupported("functions", "functions (the legacy form) are not supported; use tools")
    if body.get("function_call") not in (None, "none"):
        raise unsupported("function_call", "function_call (the legacy form) is not supported; use tool_choice")
    structured = parse_structured(body)
    if _optional_bool(body, "store"):
        raise unsupported("store", "stored completions are not supported")
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise invalid("metadata", "metadata must be an object")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise unsupported("modalities", "only the 'text' modality is supported")
    if body.get("service_tier") not in (None, "auto", "default"):
        raise unsupported("service_tier", "service_tier must be 'auto' or 'default'")
    max_tokens = _max_tokens(body, "max_completion_tokens", None)
    if max_tokens is None:
        max_tokens = _max_tokens(body, "max_tokens", None)
    logprobs = bool(_optional_bool(body, "logprobs"))
    top_logprobs = _int(body, "top_logprobs", 0, 20)
    if top_logprobs:
        raise unsupported("top_logprobs", "top_logprobs is not supported (only the chosen token's logprob)")
    params = _sampling(body, max_tokens, logprobs)
    stream, include_usage = _stream(body)
    if structured.grammar is not None and params.get("ignore_eos"):
        raise invalid("ignore_eos", "ignore_eos cannot be combined with tools or response_format (the grammar ends the answer)")
    return GenRequest(CHAT, model, "messages", {"messages": messages}, params, stream, include_usage, logprobs, structured)


def parse_completion(body: dict[str, Any], max_prompt_chars: int) -> GenRequest:
    _check_fields(body, _COMPLETION_FIELDS)
    model = _model(body)
    prompt = _prompt(body.get("prompt"), max_prompt_chars)
    if _optional_bool(body, "echo"):
        raise unsupported("echo", "echo is not supported")
    if _int(body, "best_of", 1, _MAX_INT) not in (None, 1):
        raise unsupported("best_of", "best_of > 1 is not supported")
    suffix = body.get("suffix")
    if suffix not in (None, ""):
        raise unsupported("suffix", "suffix (insertion) is not supported")
    logprobs = _int(body, "logprobs", 0, 5)
    if logprobs:
        raise unsupported("logprobs", "logprobs > 0 (top alternatives) is not supported; use logprobs=0")
    max_tokens = _max_tokens(body, "max_tokens", COMPLETION_DEFAULT_MAX_TOKENS)
    params = _sampling(body, max_tokens, logprobs == 0)
    stream, include_usage = _stream(body)
    return GenRequest(COMPLETION, model, "prompt", prompt, params, stream, include_usage, logprobs == 0)


def _check_fields(body: dict[str, Any], known: frozenset[str]) -> None:
    for key in body:
        if key not in known:
            raise invalid(key, f"unrecognized request argument: {key}", code="unknown_parameter")


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model", "model is required (a string; see /v1/models)", code="missing_required_parameter")
    return model


def _messages(value: Any, max_messages: int, max_chars: int) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise invalid("messages", "messages must be a non-empty array", code="missing_required_parameter" if value is None else "invalid_value")
    if len(value) > max_messages:
        raise invalid("messages", f"too many messages: {len(value)} (at most {max_messages})", code="too_many_messages")
    out = []
    chars = 0
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(where, f"{where} must be an object")
        for key in message:
            if key in ("function_call", "audio"):
                raise unsupported(f"{where}.{key}", f"{where}.{key}: legacy function calls and audio are not supported")
            if key not in _MESSAGE_KEYS:
                raise invalid(f"{where}.{key}", f"{where}: unrecognized field {key!r}", code="unknown_parameter")
        role = message.get("role")
        if role == "function":
            raise unsupported(f"{where}.role", f"{where}.role: 'function' messages (the legacy form) are not supported; use 'tool'")
        if role not in _CHAT_ROLES:
            raise invalid(f"{where}.role", f"{where}.role must be one of system, developer, user, assistant, tool; got {role!r}")
        calls = _message_tool_calls(message, role, where)
        content = "" if calls and message.get("content") is None else _content(message.get("content"), f"{where}.content")
        if message.get("refusal") is not None:
            raise unsupported(f"{where}.refusal", f"{where}.refusal is not supported")
        chars += len(content)
        entry = {"role": _CHAT_ROLES[role], "content": content}
        if calls:
            entry["tool_calls"] = calls
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise invalid(f"{where}.tool_call_id", f"{where}.tool_call_id is required for tool messages (a string)")
            entry["tool_call_id"] = call_id
        elif message.get("tool_call_id") is not None:
            raise invalid(f"{where}.tool_call_id", f"{where}.tool_call_id is only for tool messages")
        name = message.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise invalid(f"{where}.name", f"{where}.name must be a string")
            entry["name"] = name  # the chat template may use it
        out.append(entry)
    if chars > max_chars:
        raise invalid("messages", f"messages are {chars} characters long (at most {max_chars})", code="prompt_too_long")
    return out


def _message_tool_calls(message: dict[str, Any], role: str, where: str) -> list[dict[str, Any]]:
    """An assistant message's tool_calls, checked, in the shape the engine takes."""
    value = message.get("tool_calls")
    if value is None:
        return []
    if role != "assistant":
        raise invalid(f"{where}.tool_calls", f"{where}.tool_calls is only for assistant messages")
    if not isinstance(value, list):
        raise invalid(f"{where}.tool_calls", f"{where}.tool_calls must be an array")
    calls = []
    for j, call in enumerate(value):
        at = f"{where}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(call, dict) or call.get("type", "function") != "function" or not isinstance(function, dict):
            raise invalid(at, f"{at} must be {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}")
        name, arguments = function.get("name"), function.get("arguments", "{}")
        if not isinstance(name, str) or not name or not isinstance(arguments, str):
            raise invalid(f"{at}.function", f"{at}.function needs a name and arguments (a JSON string)")
        calls.append({"id": str(call.get("id", "")), "type": "function", "function": {"name": name, "arguments": arguments}})
    return calls


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise invalid(where, f"{where} must be a string or an array of text parts")
    parts = []
    for j, part in enumerate(value):
        if not isinstance(part, dict):
            raise invalid(f"{where}[{j}]", f"{where}[{j}] must be an object")
        kind = part.get("type")
        if kind != "text":
            if isinstance(kind, str):
                raise unsupported(f"{where}[{j}].type", f"{where}[{j}]: {kind!r} parts are not supported (only 'text')")
            raise invalid(f"{where}[{j}].type", f"{where}[{j}].type must be 'text'")
        text = part.get("text")
        if not isinstance(text, str) or set(part) - {"type", "text"}:
            raise invalid(f"{where}[{j}]", f"{where}[{j}] must be {{'type': 'text', 'text': string}}")
        parts.append(text)
    return "".join(parts)


def _prompt(value: Any, max_chars: int) -> dict[str, Any]:
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
        if not all(0 <= t <= _MAX_INT for t in value):
            raise invalid("prompt", "token ids must be non-negative integers in the vocabulary")
        return {"prompt_ids": value}
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, (str, list)) for p in value):
        raise unsupported("prompt", "several prompts in one request are not supported (send one at a time)")
    raise invalid("prompt", "prompt must be a string, an array of token ids, or an array of one of those",
                  code="missing_required_parameter" if value is None else "invalid_value")


def _sampling(body: dict[str, Any], max_tokens: int | None, logprobs: bool) -> dict[str, Any]:
    if _int(body, "n", 1, 128) not in (None, 1):
        raise unsupported("n", "n > 1 is not supported (ask once per completion)")
    logit_bias = body.get("logit_bias")
    if logit_bias is not None and not isinstance(logit_bias, dict):
        raise invalid("logit_bias", "logit_bias must be an object")
    if logit_bias:
        raise unsupported("logit_bias", "logit_bias is not supported")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("user", "user must be a string")
    params: dict[str, Any] = {
        "temperature": _float(body, "temperature", 0.0, 2.0, 1.0),
        "top_p": _float(body, "top_p", 0.0, 1.0, 1.0, open_low=True),
        "presence_penalty": _float(body, "presence_penalty", -2.0, 2.0, 0.0),
        "frequency_penalty": _float(body, "frequency_penalty", -2.0, 2.0, 0.0),
        "repetition_penalty": _float(body, "repetition_penalty", 0.0, 100.0, 1.0, open_low=True),
        "top_k": _int(body, "top_k", 0, _MAX_INT) or 0,
        "ignore_eos": bool(_optional_bool(body, "ignore_eos")),
        "logprobs": logprobs,
    }
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    seed = _int(body, "seed", *_SEED_RANGE)
    if seed is not None:
        params["seed"] = seed
    stop = _stop(body.get("stop"))
    if stop:
        params["stop"] = stop
    return params


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = bool(_optional_bool(body, "stream"))
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise invalid("stream_options", "stream_options is only allowed when stream is true")
    if not isinstance(options, dict):
        raise invalid("stream_options", "stream_options must be an object")
    for key in options:
        if key != "include_usage":
            raise invalid(f"stream_options.{key}", f"stream_options: unrecognized field {key!r}", code="unknown_parameter")
    return True, bool(_optional_bool(options, "include_usage", "stream_options."))


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("stop", "stop must be a string or an array of strings")
    if len(stops) > MAX_STOP:
        raise invalid("stop", f"at most {MAX_STOP} stop sequences")
    if not all(0 < len(s) <= 256 for s in stops):
        raise invalid("stop", "stop sequences must be 1 to 256 characters long")
    return stops


def _max_tokens(body: dict[str, Any], name: str, default: int | None) -> int | None:
    value = _int(body, name, 1, _MAX_INT)
    return default if value is None else value


def _optional_bool(body: dict[str, Any], name: str, prefix: str = "") -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise invalid(prefix + name, f"{prefix}{name} must be a boolean")
    return value


def _int(body: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if type(value) is float and value.is_integer():
        value = int(value)  # 5.0 is how some JSON encoders write 5
    if type(value) is not int:
        raise invalid(name, f"{name} must be an integer")
    if not lo <= value <= hi:
        raise invalid(name, f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def _float(body: dict[str, Any], name: str, lo: float, hi: float, default: float, *, open_low: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if type(value) not in (int, float):
        raise invalid(name, f"{name} must be a number")
    if type(value) is int and not -(2**53) <= value <= 2**53:
        raise invalid(name, f"{name} must be in {'(' if open_low else '['}{lo:g}, {hi:g}]")
    value = float(value)
    if not math.isfinite(value) or value > hi or value < lo or (open_low and value == lo):
        raise invalid(name, f"{name} must be in {'(' if open_low else '['}{lo:g}, {hi:g}], got {value:g}")
    return value


# ---------------------------------------------------------------------------------------------- responses


def usage_body(usage: dict[str, int]) -> dict[str, int]:
    return {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
            "total_tokens": usage["total_tokens"]}


def chat_logprobs(entries: tuple[tuple[str, float], ...] | list[tuple[str, float]]) -> dict[str, Any]:
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8", "surrogatepass")), "top_logprobs": []}
                        for t, lp in entries]}


def completion_logprobs(entries: tuple[tuple[str, float], ...] | list[tuple[str, float]], offset: int = 0) -> dict[str, Any]:
    offsets = []
    for t, _ in entries:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": [t for t, _ in entries], "token_logprobs": [lp for _, lp in entries], "top_logprobs": None,
            "text_offset": offsets}


def response_body(req: GenRequest, response_id: str, created: int, model: str, text: str, finish_reason: str,
                  usage: dict[str, int], logprobs: tuple[tuple[str, float], ...] | None,
                  tool_calls: list[dict[str, Any]] | None = None) -> bytes:
    if req.kind == CHAT:
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if tool_calls:
            message.update(content=text or None, tool_calls=tool_calls)
        choice = {"index": 0, "message": message,
                  "logprobs": chat_logprobs(logprobs) if logprobs is not None else None, "finish_reason": finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": completion_logprobs(logprobs) if logprobs is not None else None,
                  "finish_reason": finish_reason}
        obj = "text_completion"
    body = {"id": response_id, "object": obj, "created": created, "model": model, "choices": [choice],
            "usage": usage_body(usage), "system_fingerprint": None}
    return _dumps(body).encode("utf-8", "surrogatepass")


class ChunkFormat:
    """Stream chunks of one response as SSE `data:` events. Text chunks, the hot path, are made by
    pasting the JSON-encoded text between a prefix and a suffix prepared once per response."""

    def __init__(self, req: GenRequest, response_id: str, created: int, model: str) -> None:
        self.req = req
        self.chat = req.kind == CHAT
        head = {"id": response_id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": created, "model": model}
        self._head = _dumps(head)[:-1]  # without the closing brace
        self._usage_null = ',"usage":null' if req.include_usage else ""
        if self.chat:
            self._text_prefix = f'data: {self._head},"choices":[{{"index":0,"delta":{{"content":'.encode()
            self._text_suffix = f'}},"logprobs":null,"finish_reason":null}}]{self._usage_null}}}\n\n'.encode()
        else:
            self._text_prefix = f'data: {self._head},"choices":[{{"index":0,"text":'.encode()
            self._text_suffix = f',"logprobs":null,"finish_reason":null}}]{self._usage_null}}}\n\n'.encode()
        self._offset = 0  # characters streamed so far: completion logprobs carry text offsets

    def first(self) -> bytes:
        """Chat streams open with the assistant role; completion streams have no such chunk."""
        if not self.chat:
            return b""
        return self._event({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})

    def text(self, text: str, logprobs: list[tuple[str, float]] | tuple[tuple[str, float], ...] | None = None) -> bytes:
        if logprobs is None:
            self._offset += len(text)
            return self._text_prefix + _dumps(text).encode("utf-8", "surrogatepass") + self._text_suffix
        if self.chat:
            choice = {"index": 0, "delta": {"content": text}, "logprobs": chat_logprobs(logprobs), "finish_reason": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": completion_logprobs(logprobs, self._offset), "finish_reason": None}
        self._offset += len(text)
        return self._event(choice)

    def tool_calls(self, entries: list[dict[str, Any]]) -> bytes:
        """A chunk of tool-call deltas (ToolCalls.add's entries)."""
        return self._event({"index": 0, "delta": {"tool_calls": entries}, "logprobs": None, "finish_reason": None})

    def finish(self, finish_reason: str, usage: dict[str, int]) -> bytes:
        """The chunk with the finish reason, then (when asked for) the usage chunk."""
        if self.chat:
            choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": finish_reason}
        out = self._event(choice)
        if self.req.include_usage:
            out += self._raw(f',"choices":[],"usage":{_dumps(usage_body(usage))}}}')
        return out

    def _event(self, choice: dict[str, Any]) -> bytes:
        return self._raw(f',"choices":[{_dumps(choice)}]{self._usage_null}}}')

    def _raw(self, rest: str) -> bytes:
        return f"data: {self._head}{rest}\n\n".encode("utf-8", "surrogatepass")
