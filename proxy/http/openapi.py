"""The OpenAPI 3.1 document of the API this sidecar serves. The request bodies come from their
typed definitions (proxy/http/openai_schema.py: what the parser accepts, a parameter the engine
cannot honour narrowed to the values it takes), with this gateway's limits; the responses and
errors are described here."""

from __future__ import annotations

from typing import Any

import msgspec

from ..config import ProxyConfig
from .openai_schema import schemas
from .tools import MAX_TOOLS


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _requests(config: ProxyConfig) -> dict[str, Any]:
    """The request bodies' schemas, generated from their typed definitions, with the limits this
    gateway's config sets."""
    _, components = msgspec.json.schema_components(schemas(), ref_template="#/components/schemas/{name}")
    chat = components["ChatCompletionRequest"]["properties"]
    chat["messages"].update(maxItems=config.max_messages,
                            description=f"at most {config.max_prompt_chars} characters of content in all")
    chat["tools"]["anyOf"][0]["maxItems"] = MAX_TOOLS
    prompt = components["TextCompletionRequest"]["properties"]["prompt"]
    prompt["description"] += f"; at most {config.max_prompt_chars} characters or tokens"
    return components


_USAGE = {
    "type": "object",
    "properties": {k: {"type": "integer", "minimum": 0} for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
}
_FINISH = {"enum": ["stop", "length", "tool_calls", "content_filter"]}
_HEAD = {"id": {"type": "string"}, "created": {"type": "integer"}, "model": {"type": "string"}}



def _completion(kind: str, field: str, schema: dict[str, Any]) -> dict[str, Any]:
    """A whole (not streamed) response, whose one choice carries its answer in `field`."""
    choice = {"type": "object", "required": ["index", field, "finish_reason"], "properties": {
        "index": {"const": 0}, field: schema, "logprobs": {"type": ["object", "null"]}, "finish_reason": _FINISH}}
    return {
        "type": "object",
        "properties": {**_HEAD, "object": {"const": kind}, "usage": _USAGE,
                       "choices": {"type": "array", "minItems": 1, "maxItems": 1, "items": choice}},
        "required": ["id", "object", "created", "model", "choices", "usage"],
    }


_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "properties": {"error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
            "required": ["message", "type", "param", "code"],
        }},
        "required": ["error"],
    },
    "ChatCompletion": _completion("chat.completion", "message", {"type": "object", "properties": {
        "role": {"const": "assistant"}, "content": {"type": ["string", "null"]},
        "tool_calls": {"type": "array", "items": _ref("MessageToolCall")},
    }, "required": ["role", "content"]}),
    "Completion": _completion("text_completion", "text", {"type": "string"}),
    "Model": {
        "type": "object",
        "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
                       "owned_by": {"type": "string"}},
        "required": ["id", "object", "created", "owned_by"],
    },
    "ModelList": {
        "type": "object",
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}},
        "required": ["object", "data"],
    },
    "Status": {"type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"]},
}

# Before OpenAPI 3.2's itemSchema, an event stream's schema describes one event. Each `data` is
# a JSON chunk, an error body, or the final "[DONE]".
_SSE_EVENT = {"type": "object", "properties": {"data": {"type": "string"}, "event": {"type": "string"}}, "required": ["data"]}
_RETRY_AFTER = {"Retry-After": {"required": True, "schema": {"type": "string"}, "description": "seconds to wait"}}
_ERROR_TEXT = {
    400: "invalid or unsupported parameter (param names it, e.g. an unsupported JSON schema feature), context_length_exceeded, or content_policy_violation (a prompt the safety policy blocks)",
    401: "missing or incorrect API key, or an invalid bearer token (the message says which check failed)",
    403: "the bearer token does not allow this model, this max_tokens or its rate-limit tier",
    404: "unknown model",
    413: "request body too large",
    415: "content type is not application/json",
    429: "rate limited",
    503: "engine unreachable, busy or restarting, and no cloud worker could take the request (codes engine_unavailable, engine_busy, cloud_unavailable, no_capacity)",
    504: "the request did not finish in time",
}


def _error(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {"description": _ERROR_TEXT[status], "content": {"application/json": {"schema": _ref("Error")}}}
    if status in (429, 503):
        response["headers"] = _RETRY_AFTER
    return response


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): _error(s) for s in statuses}


def _generation(summary: str, request: str, response: str, secured: bool) -> dict[str, Any]:
    statuses = (400, 401, 404, 413, 415, 429, 503, 504) if secured else (400, 404, 413, 415, 429, 503, 504)
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
        "responses": {
            "200": {"description": "the completion; with stream: true, server-sent events of chunks ending in `data: [DONE]`",
                    "content": {"application/json": {"schema": _ref(response)}, "text/event-stream": {"schema": _SSE_EVENT}}},
            **_errors(*statuses),
        },
    }}


def _get(summary: str, content_type: str, schema: dict[str, Any], errors: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {"200": {"description": summary, "content": {content_type: {"schema": schema}}}, **(errors or {})}}}


def document(config: ProxyConfig, secured: bool) -> dict[str, Any]:
    """The document served at /openapi.json; `secured`: API keys are required on /v1."""
    auth_errors = (401, 429, 503) if secured else (429, 503)
    paths = {
        "/v1/chat/completions": _generation("Create a chat completion", "ChatCompletionRequest", "ChatCompletion", secured),
        "/v1/completions": _generation("Create a text completion", "TextCompletionRequest", "Completion", secured),
        "/v1/models": _get("List the models", "application/json", _ref("ModelList"), _errors(*auth_errors)),
        "/v1/models/{model}": {
            **_get("Describe a model", "application/json", _ref("Model"), _errors(*auth_errors, 404)),
            "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
        },
        "/healthz": _get("The sidecar is alive", "application/json", _ref("Status")),
        "/readyz": _get("The engine is reachable and has its model loaded, or requests can be offloaded to the cloud",
                        "application/json", _ref("Status"),
                        {"503": {"description": "not ready", "headers": _RETRY_AFTER,
                                 "content": {"application/json": {"schema": _ref("Status")}}}}),
        "/health": _get("Requests can be served (the test of /readyz; the path vLLM, TGI and llama.cpp's server use)",
                        "application/json", _ref("Status"),
                        {"503": {"description": "not serving", "headers": _RETRY_AFTER,
                                 "content": {"application/json": {"schema": _ref("Status")}}}}),
        "/metrics": _get("Prometheus metrics", "text/plain", {"type": "string"}),
        "/openapi.json": _get("This document", "application/json", {"type": "object"}),
    }
    if secured:
        for path, item in paths.items():
            if path.startswith("/v1/"):
                for key in ("get", "post"):
                    if key in item:
                        item[key]["security"] = [{"apiKey": []}]
                        if config.jwt is not None:  # token claims may refuse a request
                            item[key]["responses"]["403"] = _error(403)
    return {
        "openapi": "3.1.0",
        "info": {"title": "edge-runtime sidecar", "version": "1",
                 "description": "OpenAI-compatible API of the edge-runtime sidecar (proxy/)."},
        "paths": paths,
        "components": {
            "schemas": {**_SCHEMAS, **_requests(config)},
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
    }
