"""The sidecar (`edge-proxy`): the OpenAI-compatible HTTP API in front of the engine daemon,
with API keys, rate limits, a response cache, metrics and an OpenAPI document."""
