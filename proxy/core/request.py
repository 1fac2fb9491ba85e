"""The core's typed request: what every front (OpenAI HTTP, MQTT devices) parses into, in the
engine's terms, and who is asking."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from edge_wire.sampling import RequestedSampling

if TYPE_CHECKING:
    from .ratelimit import RateLimiter

CHAT = "chat"
COMPLETION = "completion"


@dataclass(frozen=True, slots=True)
class Structured:
    """The engine fields of one request: `tools` and `grammar` (each None when not used)."""

    tools: list[dict[str, Any]] | None = None
    grammar: dict[str, Any] | None = None

    def engine_fields(self) -> dict[str, Any]:
        return {k: v for k, v in (("tools", self.tools), ("grammar", self.grammar)) if v is not None}


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """One validated request."""

    kind: str  # CHAT or COMPLETION
    model: str  # the name the client asked for
    prompt_field: str  # the client's field holding the prompt ("messages" or "prompt"): errors name it
    prompt: dict[str, Any]  # the engine's prompt argument: {"messages": ...}, {"prompt": ...} or {"prompt_ids": ...}
    sampling: RequestedSampling
    stream: bool = False
    include_usage: bool = False
    structured: Structured = Structured()

    @property
    def logprobs(self) -> bool:
        return self.sampling.logprobs

    @property
    def deterministic(self) -> bool:
        """Same request, same answer: greedy, or sampled from a fixed seed."""
        return self.sampling.temperature == 0.0 or self.sampling.seed is not None

    @property
    def params(self) -> dict[str, Any]:
        """The engine's `params` map: what differs from its defaults."""
        return msgspec.to_builtins(self.sampling)

    def cache_fields(self) -> dict[str, Any]:
        return {**self.prompt, "params": self.params, **self.structured.engine_fields()}


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request, as the front learned it."""

    client: str  # what rate limits and token budgets count against: key id, JWT subject, device, address
    limiter: RateLimiter  # the front's limiter, charged with the tokens the answer took
    trace: Mapping[str, str] = field(default_factory=dict)  # the caller's W3C trace fields (HTTP headers, payload)
    start: float = 0.0  # perf_counter() at arrival: time to first token
    on_route: Callable[[str], None] | None = field(default=None, compare=False)  # told where it is served
