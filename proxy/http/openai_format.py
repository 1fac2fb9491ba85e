"""The OpenAI API's response shapes: whole response bodies of chat and text completions, and
the stream chunks of both as server-sent events."""

from __future__ import annotations

import json
from typing import Any

from ..core.request import CHAT, CompletionRequest

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode  # one encoder: json.dumps makes one per call


def usage_body(usage: dict[str, int]) -> dict[str, int]:
    return {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
            "total_tokens": usage["total_tokens"]}


def chat_logprobs(entries: tuple[tuple[str, float], ...] | list[tuple[str, float]]) -> dict[str, Any]:
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8", "surrogatepass")), "top_logprobs": []}
                        for t, lp in entries], "refusal": None}


def completion_logprobs(entries: tuple[tuple[str, float], ...] | list[tuple[str, float]], offset: int = 0) -> dict[str, Any]:
    offsets = []
    for t, _ in entries:
        offsets.append(offset)
        offset += len(t)
    # No top_logprobs: no alternatives are computed (logprobs=0), and the published schema has no null for it.
    return {"tokens": [t for t, _ in entries], "token_logprobs": [lp for _, lp in entries], "text_offset": offsets}


def response_body(req: CompletionRequest, response_id: str, created: int, model: str, fingerprint: str | None, text: str,
                  finish_reason: str, usage: dict[str, int], logprobs: tuple[tuple[str, float], ...] | None,
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
            "usage": usage_body(usage)}
    if fingerprint is not None:
        body["system_fingerprint"] = fingerprint
    return _dumps(body).encode("utf-8", "surrogatepass")


class ChunkFormat:
    """Stream chunks of one response as SSE `data:` events. Text chunks, the hot path, are made by
    pasting the JSON-encoded text between a prefix and a suffix prepared once per response."""

    def __init__(self, req: CompletionRequest, response_id: str, created: int, model: str, fingerprint: str | None) -> None:
        self.req = req
        self.chat = req.kind == CHAT
        head = {"id": response_id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": created, "model": model}
        if fingerprint is not None:
            head["system_fingerprint"] = fingerprint
        self._head = _dumps(head)[:-1]  # without the closing brace
        # Chat chunks say `usage: null` until the usage chunk; completion chunks (whose published
        # schema is the response's, usage not nullable) leave it out.
        self._usage_null = ',"usage":null' if req.include_usage and self.chat else ""
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
