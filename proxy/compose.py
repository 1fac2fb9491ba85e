"""The composition root: each part of the sidecar built once (engine link, auth, rate limiter,
metrics, safety policy, response cache, router, completion service) and handed by reference to
the fronts that use them. Live config changes (a controller's push) are applied here, the one
place that knows which part holds which setting."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .auth.keys import Authenticator
from .config import ProxyConfig
from .core.cache import ResponseCache
from .core.engine_link import EngineLink
from .core.ratelimit import Limits, RateLimiter
from .core.router import Router
from .core.service import CompletionService
from .metrics import Metrics
from .safety import PolicySource

# [proxy] keys a pushed config changes without a restart.
LIVE_PROXY_KEYS = frozenset({"rate_limit_requests_per_min", "rate_limit_tokens_per_min", "cache_enabled",
                             "cache_max_entries", "cache_max_bytes", "cache_ttl_s", "request_timeout_s", "log_level"})
_RATE_KEYS = frozenset({"rate_limit_requests_per_min", "rate_limit_tokens_per_min"})
_CACHE_KEYS = frozenset({"cache_enabled", "cache_max_entries", "cache_max_bytes", "cache_ttl_s"})


@dataclass
class Parts:
    config: ProxyConfig
    link: EngineLink
    auth: Authenticator
    limiter: RateLimiter
    metrics: Metrics
    safety: PolicySource
    router: Router
    service: CompletionService

    def apply_live(self, changes: Mapping[str, Any]) -> None:
        """Apply pushed `[proxy]` keys (names from LIVE_PROXY_KEYS) to the parts that hold them."""
        self.config = config = self.config.with_overrides(**changes)
        if changes.keys() & _RATE_KEYS:
            self.limiter.default = Limits(config.rate_limit_requests_per_min, config.rate_limit_tokens_per_min)
        if changes.keys() & _CACHE_KEYS:
            if self.service.cache is None or not config.cache_enabled:
                self.service.cache = response_cache(config)
            else:
                self.service.cache.resize(config.cache_max_entries, config.cache_max_bytes, config.cache_ttl_s)
        if "request_timeout_s" in changes:
            self.service.timeout_s = config.request_timeout_s
        if "log_level" in changes:
            logging.getLogger().setLevel(config.log_level.upper())


def response_cache(config: ProxyConfig) -> ResponseCache | None:
    """The response cache `config` asks for (None: off)."""
    if not config.cache_enabled:
        return None
    return ResponseCache(config.cache_max_entries, config.cache_max_bytes, config.cache_ttl_s, shared=config.cache_shared)


def build(config: ProxyConfig) -> Parts:
    link = EngineLink(config.resolved_engine_socket())
    metrics = Metrics()
    limiter = RateLimiter(config.rate_limit_requests_per_min, config.rate_limit_tokens_per_min, config.rate_limit_tiers)
    safety = PolicySource(config.safety, metrics.safety_event)
    router = Router(link)  # local engine first; the cloud too once offload is enabled (proxy/broker.py)
    service = CompletionService(link, router, metrics, safety, config.model_aliases, config.request_timeout_s,
                                response_cache(config))
    return Parts(config, link, Authenticator(config.api_keys, config.jwt), limiter, metrics, safety, router, service)
