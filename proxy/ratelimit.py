"""Token-bucket rate limits per client (API key, or address without keys): one bucket of
requests and one of tokens, each holding a minute's worth and refilling continuously."""

from __future__ import annotations

import math
import time

from .errors import status_error

_SWEEP_AT = 10_000  # clients tracked before full (idle) buckets are forgotten


class RateLimiter:
    def __init__(self, requests_per_min: float, tokens_per_min: float) -> None:
        self.requests_per_s = requests_per_min / 60.0
        self.tokens_per_s = tokens_per_min / 60.0
        self.request_cap = requests_per_min
        self.token_cap = tokens_per_min
        self._buckets: dict[str, list[float]] = {}  # client -> [requests left, tokens left, last refill]

    @property
    def enabled(self) -> bool:
        return self.request_cap > 0 or self.token_cap > 0

    def admit(self, client: str) -> None:
        """Take one request from the client's bucket; raises the 429 ApiError (with Retry-After)
        when it is empty, or while the client's token bucket is in debt."""
        bucket = self._refill(client)
        if self.token_cap and bucket[1] <= 0:
            wait = (1 - bucket[1]) / self.tokens_per_s
            raise status_error(429, f"token rate limit reached ({self.token_cap:g} tokens/min)", headers=_retry(wait))
        if self.request_cap:
            if bucket[0] < 1:
                wait = (1 - bucket[0]) / self.requests_per_s
                raise status_error(429, f"request rate limit reached ({self.request_cap:g} requests/min)", headers=_retry(wait))
            bucket[0] -= 1

    def charge_tokens(self, client: str, tokens: int) -> None:
        """Tokens are known only once a request ends: the bucket may go into debt, which then
        holds the client's next requests until it is paid back."""
        if self.token_cap and tokens:
            self._refill(client)[1] -= tokens

    def _refill(self, client: str) -> list[float]:
        now = time.monotonic()
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= _SWEEP_AT:
                self._sweep(now)
            bucket = self._buckets[client] = [self.request_cap, self.token_cap, now]
            return bucket
        elapsed = now - bucket[2]
        bucket[0] = min(self.request_cap, bucket[0] + elapsed * self.requests_per_s)
        bucket[1] = min(self.token_cap, bucket[1] + elapsed * self.tokens_per_s)
        bucket[2] = now
        return bucket

    def _sweep(self, now: float) -> None:
        """Forget clients whose buckets would be full by now: they start full when they return."""
        def full(b: list[float]) -> bool:
            elapsed = now - b[2]
            return (b[0] + elapsed * self.requests_per_s >= self.request_cap
                    and b[1] + elapsed * self.tokens_per_s >= self.token_cap)

        for client in [c for c, b in self._buckets.items() if full(b)]:
            del self._buckets[client]


def _retry(wait_s: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(wait_s)))}
