"""What the sync and async clients share about the OpenAI-compatible HTTP API: request bodies and
headers, Retry-After, the server-sent-event stream format, and turning answers into types."""

from __future__ import annotations

import email.utils
import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import APIError, from_body
from .types import ChatCompletion, ChatCompletionChunk, Completion, CompletionChunk, Meta

USER_AGENT = "edge-client/0.1"
HEALTH_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Endpoint:
    path: str
    parse: Callable[..., Any]  # the answer's type
    parse_chunk: Callable[[Mapping[str, Any]], Any]  # a stream chunk's type


CHAT = Endpoint("/v1/chat/completions", ChatCompletion.parse, ChatCompletionChunk.parse)
COMPLETIONS = Endpoint("/v1/completions", Completion.parse, CompletionChunk.parse)
MODELS_PATH = "/v1/models"


def chat_body(messages: list[Mapping[str, Any]], model: str, params: Mapping[str, Any], stream: bool) -> dict[str, Any]:
    return _body({"model": model, "messages": list(messages)}, params, stream)


def completion_body(prompt: str | list[int], model: str, params: Mapping[str, Any], stream: bool) -> dict[str, Any]:
    return _body({"model": model, "prompt": prompt}, params, stream)


def _body(body: dict[str, Any], params: Mapping[str, Any], stream: bool) -> dict[str, Any]:
    body.update((k, v) for k, v in params.items() if v is not None)
    if stream:
        body["stream"] = True
    return body


def headers(api_key: str | None, extra: Mapping[str, str] | None, request_id: str, has_body: bool) -> dict[str, str]:
    """One request's headers. The request id stays the same on every try, so the gateways' logs
    and traces tie the tries together; the caller's current trace context (if its app uses
    OpenTelemetry) goes along as traceparent."""
    out = {"User-Agent": USER_AGENT, "Accept": "application/json, text/event-stream", "x-request-id": request_id}
    if has_body:
        out["Content-Type"] = "application/json"
    if api_key:
        out["Authorization"] = f"Bearer {api_key}"
    out.update(trace_headers())
    if extra:
        out.update(extra)
    return out


def new_request_id() -> str:
    return "ec-" + secrets.token_hex(12)


_inject: Any = None  # opentelemetry.propagate.inject, or False when OpenTelemetry is absent


def trace_headers() -> dict[str, str]:
    """traceparent/tracestate of the caller's current span, when it uses OpenTelemetry."""
    global _inject
    if _inject is None:
        try:
            from opentelemetry.propagate import inject
        except ImportError:
            inject = False
        _inject = inject
    carrier: dict[str, str] = {}
    if _inject:
        _inject(carrier)
    return carrier


def retry_after(value: str | None) -> float | None:
    """Retry-After in seconds: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def meta(gateway: str, header: Callable[[str], str | None]) -> Meta:
    return Meta(gateway, header("x-request-id"), header("x-served-by"))


def error_of(status: int, raw: bytes, gateway: str, header: Callable[[str], str | None]) -> APIError:
    """The typed error of an error answer (its body need not be JSON: a proxy in between may
    answer with HTML)."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = {"error": {"message": raw.decode("utf-8", "replace")[:500] or f"HTTP {status}"}}
    return from_body(status, body, request_id=header("x-request-id"), gateway=gateway,
                     retry_after=retry_after(header("Retry-After")))


class SSEDecoder:
    """Server-sent events, line by line: `feed` returns the data of each event completed by a
    blank line (several `data:` lines joined by newlines)."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        line = line.rstrip("\r\n")
        if not line:
            data, self._data = self._data, []
            return "\n".join(data) if data else None
        if line.startswith("data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None  # comments, event:, id:, retry: are not used by this API


DONE = object()  # the stream's last event, [DONE]


def stream_event(data: str, endpoint: Endpoint, gateway: str, request_id: str | None) -> Any:
    """A chunk, DONE, or (for an error event mid-stream) the typed error raised."""
    if data == "[DONE]":
        return DONE
    event = json.loads(data)
    if isinstance(event, Mapping) and "error" in event:
        raise from_body(None, event, request_id=request_id, gateway=gateway)
    return endpoint.parse_chunk(event)
