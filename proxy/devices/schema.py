"""A device's request payload (docs/mqtt-device-protocol.md) as a typed message: the protocol's
own fields, chat messages or a prompt, and the sampling fields with the same types and ranges
as the HTTP API's (proxy/core/schema.py), parsed into the core's request."""

from __future__ import annotations

from typing import Annotated, Any, Optional

from msgspec import Meta

from edge_wire.sampling import RequestedSampling

from ..core.errors import invalid
from ..core.request import CHAT, COMPLETION, CompletionRequest
from ..core.schema import Message, Model, SamplingFields, decode, messages, prompt, sampling


class DeviceRequest(SamplingFields, kw_only=True):
    id: Optional[str] = None  # checked before parsing: errors are answered with it
    reply_to: Optional[str] = None  # checked before parsing: only the device's own reply topic
    authorization: Optional[str] = None  # checked before parsing: "Bearer KEY_OR_TOKEN", as on HTTP
    stream: bool = False
    trace: Optional[dict[str, Any]] = None  # W3C trace context (read by proxy/mqtt/trace.py)
    model: Optional[Model] = None
    prompt: Optional[Annotated[str, Meta(min_length=1)]] = None
    messages: Optional[Annotated[list[Message], Meta(min_length=1)]] = None


def parse_device_request(body: dict[str, Any], default_model: str, defaults: dict[str, Any], max_messages: int,
                         max_prompt_chars: int) -> CompletionRequest:
    """`defaults`: the gateway's max_tokens and temperature for requests that name none."""
    for key in body:  # msgpack maps may have keys of any type
        if not isinstance(key, str):
            raise invalid(str(key)[:64], f"unrecognized field: {str(key)[:64]}", code="unknown_parameter")
    if ("prompt" in body) == ("messages" in body):  # before the types: which one is missing is the news
        raise invalid("prompt", "exactly one of prompt and messages is required", code="missing_required_parameter")
    request = decode(body, DeviceRequest)
    max_tokens = defaults["max_tokens"] if request.max_tokens is None else request.max_tokens
    params: RequestedSampling = sampling(request, max_tokens, False, temperature=defaults["temperature"])
    model = request.model or default_model
    if request.messages is not None:
        turns = messages(request.messages, max_messages, max_prompt_chars)
        return CompletionRequest(CHAT, model, "messages", {"messages": turns}, params, request.stream)
    if request.prompt is None:
        raise invalid("prompt", "prompt must be a string")
    return CompletionRequest(COMPLETION, model, "prompt", prompt(request.prompt, max_prompt_chars), params, request.stream)
