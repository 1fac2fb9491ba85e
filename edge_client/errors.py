"""Typed errors: APIError subclasses by HTTP status (with the OpenAI error body's message, type,
code and param), and APIConnectionError when no answer came back at all."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class EdgeClientError(Exception):
    """Every error this package raises."""

    attempts: int = 1  # how many times the request was sent before this error was given up on


class APIConnectionError(EdgeClientError):
    """No answer from the gateway. `may_have_started`: the request reached it before the
    connection broke, so it may have run; such a request is not retried unless it is idempotent."""

    def __init__(self, message: str, *, gateway: str | None = None, may_have_started: bool = False) -> None:
        super().__init__(message)
        self.gateway = gateway
        self.may_have_started = may_have_started


class APITimeoutError(APIConnectionError):
    """The gateway did not answer within the timeout."""


class APIError(EdgeClientError):
    """An error answer: `status`, and the OpenAI error body's fields."""

    def __init__(self, status: int, message: str, *, type: str | None = None, code: str | None = None,
                 param: str | None = None, request_id: str | None = None, gateway: str | None = None,
                 retry_after: float | None = None, body: Any = None) -> None:
        super().__init__(f"{status} {message}" if status else message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.request_id = request_id
        self.gateway = gateway
        self.retry_after = retry_after  # seconds, from Retry-After
        self.body = body


class BadRequestError(APIError):
    """400: an invalid or unsupported parameter (`param` names it)."""


class AuthenticationError(APIError):
    """401: missing or wrong API key, or a refused token (the message says which check failed)."""


class PermissionDeniedError(APIError):
    """403: the token does not allow this model, this max_tokens or its rate-limit tier."""


class NotFoundError(APIError):
    """404: unknown model or route."""


class RequestTooLargeError(APIError):
    """413: the request body is over the gateway's limit."""


class RateLimitError(APIError):
    """429: rate limited; `retry_after` says for how long."""


class InternalServerError(APIError):
    """500 (and other 5xx without a class of their own)."""


class ServiceUnavailableError(APIError):
    """503: the gateway's engine is unreachable, busy or restarting; `retry_after` says when to come back."""


class GatewayTimeoutError(APIError):
    """504: the request did not finish within the gateway's deadline."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
    413: RequestTooLargeError, 429: RateLimitError, 500: InternalServerError, 503: ServiceUnavailableError,
    504: GatewayTimeoutError,
}
# Error events inside a stream have no status of their own: their code says which it would be.
_STATUS_BY_CODE = {"timeout": 504, "engine_unavailable": 503, "engine_busy": 503, "internal_error": 500}


def error_class(status: int) -> type[APIError]:
    return _BY_STATUS.get(status) or (InternalServerError if status >= 500 else APIError)


def from_body(status: int | None, body: Any, *, request_id: str | None = None, gateway: str | None = None,
              retry_after: float | None = None) -> APIError:
    """The typed error of an answer (or of a stream's error event, status None)."""
    error = body.get("error") if isinstance(body, Mapping) else None
    fields: Mapping[str, Any] = error if isinstance(error, Mapping) else {}
    message = fields.get("message") if isinstance(fields.get("message"), str) else None
    code = fields.get("code") if isinstance(fields.get("code"), str) else None
    if status is None:
        status = _STATUS_BY_CODE.get(code or "", 500)
    return error_class(status)(
        status, message or f"HTTP {status}", type=fields.get("type"), code=code, param=fields.get("param"),
        request_id=request_id, gateway=gateway, retry_after=retry_after, body=body,
    )
