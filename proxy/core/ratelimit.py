"""Token-bucket rate limits per client (API key, token subject, or address without keys): one
bucket of requests and one of tokens, each holding a minute's worth and refilling continuously.
A client's limits are the default ones or those of its tier (a JWT claim names it)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Annotated

from msgspec import Meta

from edge_wire.settings import Table

from .errors import status_error

_SWEEP_AT = 10_000  # clients tracked before full (idle) buckets are forgotten


class Limits(Table, kw_only=False):
    """The limits of one tier (or the default ones)."""

    requests_per_min: Annotated[float, Meta(ge=0, description="requests per minute; 0: no limit")] = 0.0
    tokens_per_min: Annotated[float, Meta(ge=0, description="prompt + completion tokens per minute; 0: no limit")] = 0.0

    @property
    def enabled(self) -> bool:
        return self.requests_per_min > 0 or self.tokens_per_min > 0


class RateLimiter:
    def __init__(self, requests_per_min: float, tokens_per_min: float, tiers: Mapping[str, Limits] | None = None,
                 max_clients: int | None = None) -> None:
        """`max_clients`: keep at most this many buckets, forgetting the least recently used one
        (no sweep): for clients that cannot be made up at will, e.g. broker-vouched devices."""
        self.default = Limits(requests_per_min, tokens_per_min)
        self.tiers = dict(tiers or {})
        self.max_clients = max_clients
        self._buckets: dict[str, list] = {}  # client -> [requests left, tokens left, last refill, Limits]

    @property
    def enabled(self) -> bool:
        return self.default.enabled or any(limits.enabled for limits in self.tiers.values())

    def admit(self, client: str, tier: str | None = None) -> None:
        """Take one request from the client's bucket; raises the 429 ApiError (with Retry-After)
        when it is empty, or while the client's token bucket is in debt. `tier` must be one of
        `tiers` (None: the default limits)."""
        limits = self.default if tier is None else self.tiers[tier]
        bucket = self._refill(client, limits)
        if limits.tokens_per_min and bucket[1] <= 0:
            wait = (1 - bucket[1]) / (limits.tokens_per_min / 60.0)
            raise status_error(429, f"token rate limit reached ({limits.tokens_per_min:g} tokens/min)", headers=_retry(wait))
        if limits.requests_per_min:
            if bucket[0] < 1:
                wait = (1 - bucket[0]) / (limits.requests_per_min / 60.0)
                raise status_error(429, f"request rate limit reached ({limits.requests_per_min:g} requests/min)", headers=_retry(wait))
            bucket[0] -= 1

    def charge_tokens(self, client: str, tokens: int) -> None:
        """Tokens are known only once a request ends: the bucket may go into debt, which then
        holds the client's next requests until it is paid back."""
        bucket = self._buckets.get(client)
        if bucket is not None and bucket[3].tokens_per_min and tokens:
            self._refill(client, bucket[3])[1] -= tokens

    def _refill(self, client: str, limits: Limits) -> list:
        now = time.monotonic()
        bucket = self._buckets.get(client)
        if bucket is not None and self.max_clients is not None:
            self._buckets[client] = self._buckets.pop(client)  # most recently used last
        if bucket is None:
            if self.max_clients is not None:
                while len(self._buckets) >= self.max_clients:
                    del self._buckets[next(iter(self._buckets))]
            elif len(self._buckets) >= _SWEEP_AT:
                self._sweep(now)
            bucket = self._buckets[client] = [limits.requests_per_min, limits.tokens_per_min, now, limits]
            return bucket
        elapsed = now - bucket[2]
        bucket[0] = min(limits.requests_per_min, bucket[0] + elapsed * limits.requests_per_min / 60.0)
        bucket[1] = min(limits.tokens_per_min, bucket[1] + elapsed * limits.tokens_per_min / 60.0)
        bucket[2], bucket[3] = now, limits  # a new token may move the client to another tier
        return bucket

    def _sweep(self, now: float) -> None:
        """Forget clients whose buckets would be full by now: they start full when they return."""
        def full(b: list) -> bool:
            elapsed, limits = now - b[2], b[3]
            return (b[0] + elapsed * limits.requests_per_min / 60.0 >= limits.requests_per_min
                    and b[1] + elapsed * limits.tokens_per_min / 60.0 >= limits.tokens_per_min)

        for client in [c for c, b in self._buckets.items() if full(b)]:
            del self._buckets[client]


def _retry(wait_s: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(wait_s)))}
