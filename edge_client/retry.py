"""When a failed request is sent again, and after how long. The rules:

- Never reached a gateway (DNS failure, connection refused, connect timeout, or the connection
  failed while the request was still being written, so the gateway never read all of it): safe
  to send again, to another gateway at once when one is healthy. The gateway is ejected.
- 429: sent again after at least Retry-After (the limit is the caller's, wherever it goes).
- 503: the gateway did not start the work; it is skipped until its Retry-After, and the request
  goes to another gateway at once (or, with none left, waits at least Retry-After).
- The connection broke after the whole request was sent, or after any byte of the answer came
  back, or 500/502/504: the gateway may have run it. Sent again only when the request is
  idempotent (GETs are; a completion is when the caller says so: `idempotent=True`).
- Any other error answer (400, 401, 403, 404, 413, ...) is final.
- Backoff between tries: exponential with full jitter (a uniform draw in [0, min(max, base *
  2^n)]), never less than Retry-After. A Retry-After longer than max_retry_after_s is not waited
  for: the error is raised.
- At most max_retries per request, and a retry budget per client: it starts with
  `budget_reserve` retries and each new request adds `budget_ratio` of one (up to the reserve),
  so when a gateway fleet is failing, retries add at most that fraction to the load."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass

from .errors import APIConnectionError, APIError, APITimeoutError, EdgeClientError
from .gateways import Gateway, GatewayPool

_MAYBE_RAN = frozenset({500, 502, 504})


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 3  # tries after the first, per request
    backoff_base_s: float = 0.1
    backoff_max_s: float = 5.0
    max_retry_after_s: float = 30.0
    budget_ratio: float = 0.2  # retries earned per request
    budget_reserve: float = 10.0  # retries available at start, and the most that can be saved up

    def backoff(self, retry: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2^retry)]."""
        return random.uniform(0.0, min(self.backoff_max_s, self.backoff_base_s * 2 ** retry))


class RetryBudget:
    def __init__(self, ratio: float, reserve: float) -> None:
        self.ratio = ratio
        self.cap = reserve
        self.balance = reserve
        self._lock = threading.Lock()

    def deposit(self) -> None:
        with self._lock:
            self.balance = min(self.cap, self.balance + self.ratio)

    def withdraw(self) -> bool:
        with self._lock:
            if self.balance < 1:
                return False
            self.balance -= 1
            return True


class Attempts:
    """The tries of one request: which gateway next, and whether (and when) to try again."""

    def __init__(self, pool: GatewayPool, policy: RetryPolicy, budget: RetryBudget, idempotent: bool) -> None:
        self.pool = pool
        self.policy = policy
        self.budget = budget
        self.idempotent = idempotent
        self.retries = 0
        self.failed: set[str] = set()  # gateways that failed this request: others first
        budget.deposit()

    def gateway(self) -> Gateway:
        return self.pool.pick(self.failed)

    def succeeded(self, gateway: Gateway) -> None:
        self.pool.release(gateway)
        self.pool.succeeded(gateway)

    def retry_delay(self, gateway: Gateway, error: EdgeClientError) -> float | None:
        """Seconds to wait before the next try, or None: raise `error` (its `attempts` set)."""
        self.pool.release(gateway)
        error.attempts = self.retries + 1
        retry_after = error.retry_after if isinstance(error, APIError) else None
        failover = True
        if isinstance(error, APIConnectionError):
            if not isinstance(error, APITimeoutError) or not error.may_have_started:
                self.pool.unreachable(gateway)  # a slow answer is not a dead gateway
            retryable = self.idempotent or not error.may_have_started
        elif isinstance(error, APIError) and error.status == 429:
            retryable, failover = True, False
        elif isinstance(error, APIError) and error.status == 503:
            self.pool.unavailable(gateway, retry_after)
            retryable = True
        elif isinstance(error, APIError) and error.status in _MAYBE_RAN:
            retryable = self.idempotent
        else:
            return None
        if failover:
            self.failed.add(gateway.url)
        if not retryable or self.retries >= self.policy.max_retries:
            return None
        if retry_after is not None and retry_after > self.policy.max_retry_after_s:
            return None
        if not self.budget.withdraw():
            return None
        self.retries += 1
        if failover and self.pool.has_healthy(self.failed):
            return 0.0  # another gateway can take it now
        delay = self.policy.backoff(self.retries - 1)
        return delay if retry_after is None else max(delay, retry_after)
