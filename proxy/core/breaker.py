"""A circuit breaker for one path a request can take (the local engine, the cloud): closed while
the path works; open after `failures` failures in a row, so that requests skip it at once; after
`cooldown_s` it lets one request through as a probe (half-open), whose outcome closes it again
or opens it for another cool-down."""

from __future__ import annotations

import time
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
STATE_VALUES = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}  # the metrics gauge's values


class Breaker:
    def __init__(self, name: str, failures: int = 3, cooldown_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.failures = failures
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._state = CLOSED
        self._count = 0  # failures in a row
        self._opened_at = 0.0
        self._probing = False  # half-open: the probe is out
        self._probe_at = 0.0
        self.on_change: Callable[[Breaker], None] | None = None

    @property
    def state(self) -> str:
        if self._state == OPEN and self._clock() - self._opened_at >= self.cooldown_s:
            return HALF_OPEN
        return self._state

    def allow(self) -> bool:
        """May a request take this path now? In half-open state, only the one probe may."""
        state = self.state
        if state == CLOSED:
            return True
        # A probe that never reported (a bug, a lost task) is given up on after a cool-down.
        if state == HALF_OPEN and (not self._probing or self._clock() - self._probe_at >= self.cooldown_s):
            self._set(HALF_OPEN)
            self._probing = True
            self._probe_at = self._clock()
            return True
        return False

    def retry_after_s(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when it would now)."""
        if self._state != OPEN:
            return 0.0
        return max(0.0, self.cooldown_s - (self._clock() - self._opened_at))

    def probe_now(self) -> None:
        """The path announced itself (a worker came online): an open breaker lets the next
        request through as its probe without waiting out the cool-down."""
        if self._state == OPEN:
            self._opened_at = self._clock() - self.cooldown_s
            self._probing = False

    def success(self) -> None:
        self._count = 0
        self._probing = False
        if self._state != CLOSED:
            self._set(CLOSED)

    def failure(self) -> None:
        self._count += 1
        was_probe = self._probing
        self._probing = False
        if was_probe or self._state == HALF_OPEN or self._count >= self.failures:
            self._opened_at = self._clock()
            self._set(OPEN)

    def release(self) -> None:
        """The request let through ended with neither verdict (e.g. the client went away)."""
        self._probing = False

    def _set(self, state: str) -> None:
        if state == self._state:
            return
        self._state = state
        if self.on_change is not None:
            self.on_change(self)
