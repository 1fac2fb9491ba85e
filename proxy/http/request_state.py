"""What the sidecar notes on each request as it passes through (typed aiohttp request keys)."""

from __future__ import annotations

from aiohttp import web

REQUEST_ID = web.RequestKey("request_id", str)  # x-request-id: the client's, if valid, else a new one
SERVED_BY = web.RequestKey("served_by", str)  # x-served-by: "local" or "cache"
START = web.RequestKey("start", float)  # perf_counter() on arrival: latency and time to first token
CLIENT = web.RequestKey("client", str)  # who the rate limits count against: key id, or address
KEY_ID = web.RequestKey("key_id", str)  # a prefix of the API key's digest, for the access log
TRACE_IDS = web.RequestKey("trace_ids", tuple)  # (trace_id, span_id) of the request's span, while tracing is on
GRANT = web.RequestKey("grant", object)  # what the caller may do (proxy.auth.Grant)
