"""The OpenAI-compatible HTTP front (aiohttp): parses requests into the core's typed request,
formats its events as JSON bodies and server-sent events, and serves the operations endpoints."""
