"""The OpenAI API's shapes: request bodies of /v1/chat/completions and /v1/completions parsed
and validated into one engine request (anything the engine cannot honour is refused with a 400
naming the parameter, never ignored), and the response bodies and stream chunks built back."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from .errors import invalid, unsupported

CHAT = "chat"
COMPLETION = "completion"
MAX_STOP = 16  # the engine's limit
COMPLETION_DEFAULT_MAX_TOKENS = 16  # as OpenAI's legacy completions; chat leaves it to the engine
_MAX_INT = 2**31 - 1
_SEED_RANGE = (-(2**63), 2**64 - 1)  # the engine takes 64-bit seeds, signed or unsigned
_CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_MESSAGE_KEYS = frozenset({"role", "content", "name", "refusal"})
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

    @property
    def deterministic(self) -> bool:
        """Same request, same answer: greedy, or sampled from a fixed seed."""
        return self.params.get("temperature") == 0.0 or self.params.get("seed") is not None

    def cache_fields(self) -> dict[str, Any]:
        return {**self.prompt, "params": self.params}


# ---------------------------------------------------------------------------------------------- requests


def parse_chat(body: dict[str, Any], max_messages: int, max_prompt_chars: int) -> GenRequest:
    _check_fields(body, _CHAT_FIELDS)
    model = _model(body)
    messages = _messages(body.get("messages"), max_messages, max_prompt_chars)
    for name in ("tools", "functions"):
        value = body.get(name)
        if value is not None and not isinstance(value, list):
            raise invalid(name, f"{name} must be an array")
        if value:
            raise unsupported(name, f"{name} are not supported yet")
    if body.get("tool_choice") not in (None, "none"):
        raise unsupported("tool_choice", "tool_choice is not supported yet (only 'none')")
    if body.get("function_call") not in (None, "none"):
        raise unsupported("function_call", "function_call is not supported yet (only 'none')")
    _optional_bool(body, "parallel_tool_calls")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str) or fmt["type"] == "text":
            raise invalid("response_format", "response_format must be {'type': 'text'}")
        raise unsupported("response_format", f"response_format {fmt['type']!r} is not supported yet (only 'text')")
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
    return GenRequest(CHAT, model, "messages", {"messages": messages}, params, stream, include_usage, logprobs)


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
            if key in ("tool_calls", "function_call", "tool_call_id", "audio"):
                raise unsupported(f"{where}.{key}", f"{where}.{key}: tool calls and audio are not supported yet")
            if key not in _MESSAGE_KEYS:
                raise invalid(f"{where}.{key}", f"{where}: unrecognized field {key!r}", code="unknown_parameter")
        role = message.get("role")
        if role in ("tool", "function"):
            raise unsupported(f"{where}.role", f"{where}.role: {role!r} messages are not supported yet")
        if role not in _CHAT_ROLES:
            raise invalid(f"{where}.role", f"{where}.role must be one of system, developer, user, assistant; got {role!r}")
        content = _content(message.get("content"), f"{where}.content")
        if message.get("refusal") is not None:
            raise unsupported(f"{where}.refusal", f"{where}.refusal is not supported")
        chars += len(content)
        entry = {"role": _CHAT_ROLES[role], "content": content}
        name = message.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise invalid(f"{where}.name", f"{where}.name must be a string")
            entry["name"] = name  # the chat template may use it
        out.append(entry)
    if chars > max_chars:
        raise invalid("messages", f"messages are {chars} characters long (at most {max_chars})", code="prompt_too_long")
    return out


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
                  usage: dict[str, int], logprobs: tuple[tuple[str, float], ...] | None) -> bytes:
    if req.kind == CHAT:
        choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
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
