"""Health-aware selection among several gateways. Requests go to the healthy gateway with the
fewest requests in flight (ties in turn). A gateway that cannot be reached is ejected for a
cool-down (doubling while it stays down, up to a ceiling) and comes back only after a probe of
its health endpoint answers 200; one that answers 503 is skipped until its Retry-After has
passed. When every gateway is out, the one due back first is tried anyway: that request is its
probe. Thread-safe; the clients run the probes (a thread each, or a task)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass
class Gateway:
    url: str  # base URL, without /v1
    in_flight: int = 0
    failures: int = 0  # consecutive failures to connect
    down_until: float = 0.0  # time.monotonic() before which it is not chosen while others are up
    needs_probe: bool = False  # unreachable when last tried: a health probe must pass first
    probing: bool = False

    def healthy(self, now: float) -> bool:
        return not self.needs_probe and self.down_until <= now


def base_url(url: str) -> str:
    """`http://host:8080`, `http://host:8080/` and `http://host:8080/v1` all name one gateway."""
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


class GatewayPool:
    def __init__(self, urls: list[str], cooldown_s: float = 2.0, max_cooldown_s: float = 30.0) -> None:
        if not urls:
            raise ValueError("at least one gateway URL is needed")
        self.gateways = [Gateway(base_url(u)) for u in urls]
        self.cooldown_s = cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self._turn = 0
        self._lock = threading.Lock()

    def pick(self, avoid: set[str] = frozenset()) -> Gateway:
        """The gateway for the next attempt (its in-flight count taken); `avoid`: gateways that
        already failed this request, used only when nothing else is left."""
        with self._lock:
            now = time.monotonic()
            n = len(self.gateways)
            order = [self.gateways[(self._turn + i) % n] for i in range(n)]
            self._turn = (self._turn + 1) % n
            healthy = [g for g in order if g.healthy(now) and g.url not in avoid]
            if healthy:
                chosen = min(healthy, key=lambda g: g.in_flight)  # min keeps the first of equals: turns rotate
            else:
                fresh = [g for g in order if g.url not in avoid] or order
                chosen = min(fresh, key=lambda g: (g.needs_probe and g.probing, g.down_until))
            chosen.in_flight += 1
            return chosen

    def has_healthy(self, avoid: set[str]) -> bool:
        with self._lock:
            now = time.monotonic()
            return any(g.healthy(now) and g.url not in avoid for g in self.gateways)

    def release(self, gateway: Gateway) -> None:
        with self._lock:
            gateway.in_flight -= 1

    def succeeded(self, gateway: Gateway) -> None:
        with self._lock:
            gateway.failures, gateway.down_until, gateway.needs_probe = 0, 0.0, False

    def unreachable(self, gateway: Gateway) -> None:
        """Eject it: a probe must pass before it is chosen again while others are up."""
        with self._lock:
            gateway.failures += 1
            cooldown = min(self.max_cooldown_s, self.cooldown_s * 2 ** (gateway.failures - 1))
            gateway.down_until = time.monotonic() + cooldown
            gateway.needs_probe = True

    def unavailable(self, gateway: Gateway, retry_after_s: float | None) -> None:
        """It answered 503: it is up but cannot serve; skip it until Retry-After has passed."""
        with self._lock:
            wait = retry_after_s if retry_after_s is not None else self.cooldown_s
            gateway.down_until = max(gateway.down_until, time.monotonic() + wait)

    def due_probes(self) -> list[Gateway]:
        """Ejected gateways whose cool-down is over, now marked as being probed."""
        with self._lock:
            now = time.monotonic()
            due = [g for g in self.gateways if g.needs_probe and not g.probing and g.down_until <= now]
            for g in due:
                g.probing = True
            return due

    def probed(self, gateway: Gateway, ok: bool) -> None:
        with self._lock:
            gateway.probing = False
        if ok:
            self.succeeded(gateway)
        else:
            self.unreachable(gateway)
