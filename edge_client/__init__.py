"""edge_client: the Python SDK for edge-runtime gateways. It speaks only the documented
protocols (the OpenAI-compatible HTTP API, docs/mqtt-device-protocol.md) and imports nothing
from the engine or the sidecar.

- EdgeClient (sync) and AsyncEdgeClient (asyncio): chat, completions, models and streams over
  several gateways, with retries (edge_client/retry.py says exactly when) and failover.
- edge_client.mqtt_device.DeviceClient: request/response over MQTT for devices."""

from .aio import AsyncEdgeClient, AsyncStream
from .client import EdgeClient, Stream
from .errors import (
    APIConnectionError, APIError, APITimeoutError, AuthenticationError, BadRequestError, EdgeClientError,
    GatewayTimeoutError, InternalServerError, NotFoundError, PermissionDeniedError, RateLimitError,
    RequestTooLargeError, ServiceUnavailableError,
)
from .retry import RetryPolicy
from .types import (
    ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatMessage, Completion, CompletionChoice,
    CompletionChunk, Delta, Meta, Model, Usage,
)

__all__ = [
    "APIConnectionError", "APIError", "APITimeoutError", "AsyncEdgeClient", "AsyncStream", "AuthenticationError",
    "BadRequestError", "ChatChoice", "ChatChunkChoice", "ChatCompletion", "ChatCompletionChunk", "ChatMessage",
    "Completion", "CompletionChoice", "CompletionChunk", "Delta", "EdgeClient", "EdgeClientError",
    "GatewayTimeoutError", "InternalServerError", "Meta", "Model", "NotFoundError", "PermissionDeniedError",
    "RateLimitError", "RequestTooLargeError", "RetryPolicy", "ServiceUnavailableError", "Stream", "Usage",
]
