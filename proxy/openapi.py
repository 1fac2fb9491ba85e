"""The OpenAPI 3.1 document of the API this sidecar serves, built from its config (limits,
whether keys are required). It states what the parser accepts, not all of OpenAI's API: a
parameter the sidecar refuses is narrowed to the values it honours (n = 1, function tools only, ...)."""

from __future__ import annotations

from typing import Any

from .config import ProxyConfig

_MAX_INT = 2**31 - 1


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _number(lo: float, hi: float, *, open_low: bool = False) -> dict[str, Any]:
    low = {"exclusiveMinimum": lo} if open_low else {"minimum": lo}
    return _nullable({"type": "number", **low, "maximum": hi})


def _int(lo: int, hi: int) -> dict[str, Any]:
    return _nullable({"type": "integer", "minimum": lo, "maximum": hi})


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


_BOOL = _nullable({"type": "boolean"})
_EMPTY_LIST = _nullable({"type": "array", "maxItems": 0})

# Parameters of both endpoints, with the ranges the engine honours.
_SAMPLING: dict[str, Any] = {
    "model": {"type": "string", "minLength": 1, "description": "the engine's model id or an alias (see /v1/models)"},
    "max_tokens": _int(1, _MAX_INT),
    "temperature": _number(0, 2),
    "top_p": _number(0, 1, open_low=True),
    "n": _int(1, 1),
    "stream": _BOOL,
    "stream_options": _nullable({
        "type": "object", "properties": {"include_usage": _BOOL}, "additionalProperties": False,
        "description": "only with stream: true",
    }),
    "stop": _nullable({"anyOf": [
        {"type": "string", "minLength": 1, "maxLength": 256},
        {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 256}, "maxItems": 16},
    ]}),
    "seed": _int(-(2**63), 2**64 - 1),
    "presence_penalty": _number(-2, 2),
    "frequency_penalty": _number(-2, 2),
    "logit_bias": _nullable({"type": "object", "maxProperties": 0}),
    "user": _nullable({"type": "string"}),
    "top_k": _int(0, _MAX_INT),
    "repetition_penalty": _number(0, 100, open_low=True),
    "ignore_eos": _BOOL,
}

_TEXT_PART = {
    "type": "object",
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    "required": ["type", "text"],
    "additionalProperties": False,
}


_NAME = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}
_TOOL_CALL = {
    "type": "object",
    "properties": {
        "id": {"type": "string"}, "type": {"const": "function"},
        "function": {"type": "object", "properties": {"name": {"type": "string", "minLength": 1}, "arguments": {"type": "string"}},
                     "required": ["name", "arguments"]},
    },
    "required": ["id", "type", "function"],
}
_TOOL = {
    "type": "object",
    "properties": {
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "properties": {"name": _NAME, "description": {"type": "string"}, "strict": _BOOL,
                           "parameters": {"type": "object", "description": "JSON schema of the arguments (type object)"}},
            "required": ["name"],
            "additionalProperties": False,
        },
    },
    "required": ["type", "function"],
    "additionalProperties": False,
}
_RESPONSE_FORMAT = _nullable({"oneOf": [
    {"type": "object", "properties": {"type": {"enum": ["text", "json_object"]}}, "required": ["type"], "additionalProperties": False},
    {"type": "object", "properties": {"type": {"const": "json_schema"}, "json_schema": {
        "type": "object",
        "properties": {"name": _NAME, "description": {"type": "string"}, "schema": {"type": "object"}, "strict": _BOOL},
        "required": ["name"], "additionalProperties": False,
    }}, "required": ["type", "json_schema"], "additionalProperties": False},
]})


def _chat_request(config: ProxyConfig) -> dict[str, Any]:
    message = {
        "type": "object",
        "properties": {
            "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
            "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}, {"type": "null"}],
                        "description": "null only in an assistant message with tool_calls"},
            "name": _nullable({"type": "string"}),
            "refusal": {"type": "null"},
            "tool_calls": _nullable({"type": "array", "items": _TOOL_CALL, "description": "assistant messages only"}),
            "tool_call_id": _nullable({"type": "string", "minLength": 1, "description": "required in tool messages"}),
        },
        "required": ["role"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {
            **_SAMPLING,
            "messages": {"type": "array", "items": message, "minItems": 1, "maxItems": config.max_messages,
                         "description": f"at most {config.max_prompt_chars} characters of content in all"},
            "max_completion_tokens": _int(1, _MAX_INT),
            "logprobs": _BOOL,
            "top_logprobs": _int(0, 0),
            "tools": _nullable({"type": "array", "items": _TOOL, "maxItems": 128}),
            "functions": _EMPTY_LIST,
            "tool_choice": _nullable({"anyOf": [
                {"enum": ["none", "auto", "required"]},
                {"type": "object", "properties": {"type": {"const": "function"}, "function": {
                    "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}},
                 "required": ["type", "function"]},
            ]}),
            "function_call": _nullable({"const": "none"}),
            "parallel_tool_calls": _BOOL,
            "response_format": _RESPONSE_FORMAT,
            "store": _nullable({"const": False}),
            "metadata": _nullable({"type": "object"}),
            "modalities": _nullable({"type": "array", "items": {"const": "text"}, "minItems": 1, "maxItems": 1}),
            "service_tier": _nullable({"enum": ["auto", "default"]}),
        },
        "required": ["model", "messages"],
        "additionalProperties": False,
    }


def _completion_request(config: ProxyConfig) -> dict[str, Any]:
    text = {"type": "string", "minLength": 1, "maxLength": config.max_prompt_chars}
    ids = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": _MAX_INT}, "minItems": 1,
           "maxItems": config.max_prompt_chars}
    return {
        "type": "object",
        "properties": {
            **_SAMPLING,
            "prompt": {"anyOf": [text, ids, {"type": "array", "items": {"anyOf": [text, ids]}, "minItems": 1, "maxItems": 1}]},
            "logprobs": _int(0, 0),
            "echo": _nullable({"const": False}),
            "best_of": _int(1, 1),
            "suffix": _nullable({"const": ""}),
        },
        "required": ["model", "prompt"],
        "additionalProperties": False,
    }


_USAGE = {
    "type": "object",
    "properties": {k: {"type": "integer", "minimum": 0} for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
}
_FINISH = {"enum": ["stop", "length", "tool_calls", "content_filter"]}
_HEAD = {"id": {"type": "string"}, "created": {"type": "integer"}, "model": {"type": "string"}}

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
    "ChatCompletion": {
        "type": "object",
        "properties": {
            **_HEAD,
            "object": {"const": "chat.completion"},
            "choices": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
                "type": "object",
                "properties": {
                    "index": {"const": 0},
                    "message": {"type": "object", "properties": {
                        "role": {"const": "assistant"}, "content": {"type": ["string", "null"]},
                        "tool_calls": {"type": "array", "items": _TOOL_CALL},
                    }, "required": ["role", "content"]},
                    "logprobs": {"type": ["object", "null"]},
                    "finish_reason": _FINISH,
                },
                "required": ["index", "message", "finish_reason"],
            }},
            "usage": _USAGE,
        },
        "required": ["id", "object", "created", "model", "choices", "usage"],
    },
    "Completion": {
        "type": "object",
        "properties": {
            **_HEAD,
            "object": {"const": "text_completion"},
            "choices": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
                "type": "object",
                "properties": {"index": {"const": 0}, "text": {"type": "string"}, "logprobs": {"type": ["object", "null"]},
                               "finish_reason": _FINISH},
                "required": ["index", "text", "finish_reason"],
            }},
            "usage": _USAGE,
        },
        "required": ["id", "object", "created", "model", "choices", "usage"],
    },
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
        "/v1/completions": _generation("Create a text completion", "CompletionRequest", "Completion", secured),
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
            "schemas": {**_SCHEMAS, "ChatCompletionRequest": _chat_request(config),
                        "CompletionRequest": _completion_request(config)},
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
    }
