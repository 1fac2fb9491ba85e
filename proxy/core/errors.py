"""Errors in the OpenAI error body (`{"error": {"message", "type", "param", "code"}}`) with the
HTTP status each deserves, and the mapping of the engine's error frames onto them."""

from __future__ import annotations

import json
import math

from aiohttp import web

from edge_runtime.client import CONNECTION_LOST, EngineError
from edge_wire.frames import BUSY, CONTEXT_LENGTH_EXCEEDED, FRAME_TOO_LARGE, INVALID_REQUEST, SHUTTING_DOWN

INVALID = "invalid_request_error"
SERVER = "server_error"
JSON_CONTENT = "application/json"

# Error types of the statuses the sidecar answers by itself (aiohttp's own 404/405/413 included).
_STATUS_TYPES = {
    401: ("authentication_error", "invalid_api_key"),
    404: (INVALID, "not_found"),
    405: (INVALID, "method_not_allowed"),
    408: (INVALID, "request_timeout"),
    413: (INVALID, "request_too_large"),
    415: (INVALID, "unsupported_media_type"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}


class ApiError(Exception):
    """An error answer: status, OpenAI error fields and extra headers (Retry-After, Allow, ...)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def payload(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.Response(
            status=self.status, body=json.dumps(self.payload()).encode(), content_type=JSON_CONTENT, headers=self.headers
        )


def invalid(param: str | None, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def unsupported(param: str, message: str) -> ApiError:
    """A parameter the sidecar cannot honour: refused, never silently ignored."""
    return ApiError(400, message, param=param, code="unsupported_parameter")


def unavailable(message: str, retry_after_s: float, code: str = "engine_unavailable") -> ApiError:
    return ApiError(503, message, type=SERVER, code=code, headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))})


def from_http(exc: web.HTTPException) -> ApiError:
    """aiohttp's own answers (no route, wrong method, body over client_max_size) in OpenAI form."""
    type_, code = _STATUS_TYPES.get(exc.status, (INVALID if exc.status < 500 else SERVER, None))
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    return ApiError(exc.status, exc.reason if exc.status != 404 else "no such route", type=type_, code=code, headers=headers)


def status_error(status: int, message: str, *, param: str | None = None, headers: dict[str, str] | None = None) -> ApiError:
    type_, code = _STATUS_TYPES[status]
    return ApiError(status, message, type=type_, param=param, code=code, headers=headers)


def from_engine(exc: EngineError, prompt_param: str) -> ApiError:
    """The engine's error frame as the client should see it; `prompt_param` is the request field
    that carried the prompt (`messages` or `prompt`)."""
    if exc.code == INVALID_REQUEST:
        param = _client_param(exc.param, prompt_param)
        message = exc.message
        if exc.param and param and message.startswith(f"{exc.param}: "):  # say the client's name for it
            message = f"{param}: {message[len(exc.param) + 2:]}"
        return invalid(param, message)
    if exc.code == CONTEXT_LENGTH_EXCEEDED:
        return ApiError(400, exc.message, param=prompt_param, code=CONTEXT_LENGTH_EXCEEDED)
    if exc.code == BUSY:
        return unavailable(f"the engine is busy: {exc.message}", exc.estimated_wait_s or 1.0, code="engine_busy")
    if exc.code == SHUTTING_DOWN:
        return unavailable("the engine is restarting", 2.0, code="engine_unavailable")
    if exc.code == CONNECTION_LOST:
        return unavailable("the engine is unreachable", 1.0)
    if exc.code == FRAME_TOO_LARGE:
        return ApiError(413, "request too large for the engine", param=prompt_param, code="request_too_large")
    return ApiError(500, "the engine failed to answer this request", type=SERVER, code="internal_error")


def _client_param(param: str | None, prompt_param: str) -> str | None:
    """The engine names fields of its own frame (`params.top_p`, `prompt_ids`); the client sent
    `top_p` and `prompt`."""
    if param is None:
        return None
    if param.startswith("params."):
        return param[len("params."):]
    if param in ("prompt", "prompt_ids"):
        return prompt_param
    if param.startswith("grammar"):  # the engine's constraint came from response_format or the tools
        return "response_format" if param == "grammar.schema" else "tools"
    return param
