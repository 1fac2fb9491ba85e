"""The request bodies of /v1/chat/completions and /v1/completions as typed messages (msgspec):
each field's type and range, stated once, make the parser and the OpenAPI document. What the
types cannot say (a parameter the engine cannot honour, limits from the config, fields that
depend on each other) is checked after decoding; anything the engine cannot honour is refused
with a 400 naming the parameter, never ignored."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

import msgspec
from msgspec import Meta

from edge_wire.sampling import MaxTokens, RequestedSampling

from ..core.errors import invalid, unsupported
from ..core.request import CHAT, COMPLETION, CompletionRequest
from ..core.schema import Message, Model, SamplingFields, decode, messages, only, prompt, sampling, unsupported_past
from .tools import Tool, parse_structured

COMPLETION_DEFAULT_MAX_TOKENS = 16  # as OpenAI's legacy completions; chat leaves it to the engine


One = Annotated[int, Meta(ge=1, le=1), unsupported_past("n > 1 is not supported (ask once per completion)")]
NoBias = Annotated[dict[str, float], Meta(max_length=0), unsupported_past("logit_bias is not supported")]


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: Optional[bool] = None


class _Sampled(SamplingFields, kw_only=True):
    """The parameters of both endpoints, with the ranges the engine honours."""

    model: Model
    n: Optional[One] = None
    stream: Optional[bool] = None
    stream_options: Optional[Annotated[StreamOptions, Meta(description="only with stream: true")]] = None
    logit_bias: Optional[NoBias] = None
    user: Optional[str] = None
    ignore_eos: Optional[bool] = None  # an engine extension, as vLLM names it


class ChatCompletionRequest(_Sampled, kw_only=True):
    messages: Annotated[list[Message], Meta(min_length=1)]
    max_completion_tokens: Optional[MaxTokens] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[Annotated[int, Meta(ge=0, le=0), unsupported_past(
        "top_logprobs is not supported (only the chosen token's logprob)")]] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None
    parallel_tool_calls: Optional[bool] = None
    functions: Optional[Annotated[list[Any], Meta(max_length=0), unsupported_past(
        "functions (the legacy form) are not supported; use tools")]] = None
    function_call: Optional[Annotated[str, only(const="none")]] = None
    response_format: Optional[dict[str, Any]] = None
    store: Optional[Annotated[bool, only(const=False)]] = None
    metadata: Optional[dict[str, Any]] = None
    modalities: Optional[Annotated[list[str], only(const=["text"])]] = None
    service_tier: Optional[Annotated[str, only(enum=["auto", "default"])]] = None


class TextCompletionRequest(_Sampled, kw_only=True):
    prompt: Annotated[Union[str, list[Any]], Meta(description=(
        "a string, an array of token ids, or an array of one of those"))]
    echo: Optional[Annotated[bool, only(const=False)]] = None
    best_of: Optional[Annotated[int, Meta(ge=1, le=1), unsupported_past("best_of > 1 is not supported")]] = None
    suffix: Optional[Annotated[str, Meta(max_length=0), unsupported_past("suffix (insertion) is not supported")]] = None
    logprobs: Optional[Annotated[int, Meta(ge=0, le=0), unsupported_past(
        "logprobs > 0 (top alternatives) is not supported; use logprobs=0")]] = None


# ---------------------------------------------------------------------------------------------- parsing


def parse_chat(body: dict[str, Any], max_messages: int, max_prompt_chars: int) -> CompletionRequest:
    chat = decode(body, ChatCompletionRequest)
    if chat.store:
        raise unsupported("store", "stored completions are not supported")
    if chat.function_call not in (None, "none"):
        raise unsupported("function_call", "function_call (the legacy form) is not supported; use tool_choice")
    if chat.modalities is not None and chat.modalities != ["text"]:
        raise unsupported("modalities", "only the 'text' modality is supported")
    if chat.service_tier not in (None, "auto", "default"):
        raise unsupported("service_tier", "service_tier must be 'auto' or 'default'")
    turns = messages(chat.messages, max_messages, max_prompt_chars)
    structured = parse_structured(chat.tools, chat.tool_choice, chat.parallel_tool_calls, chat.response_format)
    max_tokens = chat.max_completion_tokens if chat.max_completion_tokens is not None else chat.max_tokens
    params = _sampling(chat, max_tokens, bool(chat.logprobs))
    if structured.grammar is not None and params.ignore_eos:
        raise invalid("ignore_eos", "ignore_eos cannot be combined with tools or response_format (the grammar ends the answer)")
    stream, include_usage = _stream(chat)
    return CompletionRequest(CHAT, chat.model, "messages", {"messages": turns}, params, stream, include_usage,
                             structured)


def parse_completion(body: dict[str, Any], max_prompt_chars: int) -> CompletionRequest:
    request = decode(body, TextCompletionRequest)
    if request.echo:
        raise unsupported("echo", "echo is not supported")
    max_tokens = COMPLETION_DEFAULT_MAX_TOKENS if request.max_tokens is None else request.max_tokens
    params = _sampling(request, max_tokens, request.logprobs == 0)
    stream, include_usage = _stream(request)
    return CompletionRequest(COMPLETION, request.model, "prompt", prompt(request.prompt, max_prompt_chars), params, stream,
                             include_usage)


def _sampling(request: _Sampled, max_tokens: int | None, logprobs: bool) -> RequestedSampling:
    return sampling(request, max_tokens, logprobs, ignore_eos=bool(request.ignore_eos))


def _stream(request: _Sampled) -> tuple[bool, bool]:
    stream = bool(request.stream)
    if request.stream_options is None:
        return stream, False
    if not stream:
        raise invalid("stream_options", "stream_options is only allowed when stream is true")
    return True, bool(request.stream_options.include_usage)


def schemas() -> tuple[type[msgspec.Struct], ...]:
    """The request bodies, for the OpenAPI document."""
    return ChatCompletionRequest, TextCompletionRequest
