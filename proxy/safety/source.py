"""The live safety policy: compiled once, recompiled when its file changes (looked at no more
than once a second, from the requests themselves) or when asked (SIGHUP). A policy that fails
to load leaves the previous one in force."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from edge_wire.settings import ConfigError

from . import policy
from .filter import EventSink, SafetyFilter
from .policy import SafetyConfig

log = logging.getLogger("proxy.safety")

CHECK_INTERVAL_S = 1.0


class PolicySource:
    def __init__(self, config: SafetyConfig, on_event: EventSink | None = None) -> None:
        self._config = config
        self._on_event = on_event
        self.filter = SafetyFilter(config, on_event)
        self._stamp = self._file_stamp()
        self._checked = time.monotonic()

    def current(self) -> SafetyFilter:
        """The filter in force, reloading first if its file changed."""
        now = time.monotonic()
        if now - self._checked >= CHECK_INTERVAL_S:
            self._checked = now
            if self._file_stamp() != self._stamp:
                self.reload()
        return self.filter

    def reload(self) -> bool:
        """Read the policy again; on an error keep the one in force (and say why in the log)."""
        try:
            config = policy.reload(self._config)
        except ConfigError as exc:
            log.error("safety policy not reloaded; keeping the previous one", extra={"error": str(exc)})
            self._stamp = self._file_stamp()  # do not retry until the file changes again
            return False
        self._config = config
        self.filter = SafetyFilter(config, self._on_event)
        self._stamp = self._file_stamp()
        log.info("safety policy loaded", extra={"categories": [c.name for c in config.categories], "active": config.active})
        return True

    def _file_stamp(self) -> tuple[tuple[int, int] | None, ...]:
        return tuple(_stamp(p) for p in (self._config.source, self._config.policy_file) if p is not None)


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size
