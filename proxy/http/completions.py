"""Answering /v1/chat/completions and /v1/completions from the completion service's events: one
JSON body, or a stream of server-sent events. Failures before the first answer frame get their
own HTTP status; after it, an error event ends the stream."""

from __future__ import annotations

import functools
import hashlib
import logging
import secrets
import time
from typing import Any

from aiohttp import web

from ..core.errors import SERVER, ApiError
from ..core.ratelimit import RateLimiter
from ..core.request import CHAT, Caller, CompletionRequest
from ..core.service import Completion, CompletionService, Done, TextDelta, ToolCallDelta
from . import streaming
from .openai_format import ChunkFormat, response_body
from .request_state import CLIENT, REQUEST_ID, SERVED_BY, START

log = logging.getLogger("proxy.http")
JSON_CONTENT = "application/json"


async def respond(request: web.Request, service: CompletionService, limiter: RateLimiter,
                  req: CompletionRequest) -> web.StreamResponse:
    caller = Caller(request[CLIENT], limiter, request.headers, request[START],
                    functools.partial(request.__setitem__, SERVED_BY))
    async with service.open(req, caller) as completion:
        fingerprint = fingerprint_of(service.link.model)
        if req.stream:
            return await _stream(request, completion, fingerprint)
        done = await completion.result()
        body = response_body(req, _response_id(req), int(time.time()), completion.model, fingerprint, done.text,
                             done.finish_reason, done.usage, done.logprobs, done.tool_calls)
        return web.Response(body=body, content_type=JSON_CONTENT)


async def _stream(request: web.Request, completion: Completion, fingerprint: str | None) -> web.StreamResponse:
    req = completion.request
    response = await streaming.open_stream(request)
    fmt = ChunkFormat(req, _response_id(req), int(time.time()), completion.model, fingerprint)
    try:
        if req.kind == CHAT:
            await response.write(fmt.first())
        async for event in completion.events():
            if isinstance(event, TextDelta):
                await response.write(fmt.text(event.text, event.logprobs))
            elif isinstance(event, ToolCallDelta):
                await response.write(fmt.tool_calls(event.entries))
            elif isinstance(event, Done):
                await streaming.end(response, fmt.finish(event.finish_reason, event.usage) + streaming.DONE)
    except ApiError as exc:  # the answer ended early (deadline, the engine going away)
        await streaming.fail(response, exc)
    except ConnectionError:
        pass  # the client went away; leaving cancels the engine's work
    except Exception:  # a bug: the headers are gone, so the stream must still end properly
        log.exception("stream failed", extra={"request_id": request[REQUEST_ID]})
        await streaming.fail(response, ApiError(500, "internal error", type=SERVER, code="internal_error"))
    return response


def fingerprint_of(model: dict[str, Any] | None) -> str | None:
    """`system_fingerprint`: names the model build (checkpoint, quantization, architecture, and
    the KV cache type when it is not the default fp32, so earlier builds keep their fingerprint),
    so that a client sees when the build behind a model id changes; None while it is unknown."""
    if not model or not model.get("source_sha256"):
        return None
    kv = model.get("kv_dtype", "fp32")
    build = f"{model.get('source_sha256')}:{model.get('quantization')}:{model.get('arch')}"
    return _fingerprint(build if kv == "fp32" else f"{build}:kv{kv}")


@functools.lru_cache(maxsize=8)
def _fingerprint(build: str) -> str:
    return "fp_" + hashlib.sha256(build.encode()).hexdigest()[:12]


def _response_id(req: CompletionRequest) -> str:
    return ("chatcmpl-" if req.kind == CHAT else "cmpl-") + secrets.token_hex(12)
