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
_CACHE_KEYS = ("cache_enabled", "cache_max_entries", "cache_max_bytes", "cache_ttl_s")


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
        live = {key: changes.get(key, getattr(self.config, key)) for key in LIVE_PROXY_KEYS}
        if changes.keys() & {"rate_limit_requests_per_min", "rate_limit_tokens_per_min"}:
            self.limiter.default = Limits(live["rate_limit_requests_per_min"], live["rate_limit_tokens_per_min"])
        if changes.keys() & set(_CACHE_KEYS):
            service = self.service
            if not live["cache_enabled"]:
                service.cache = None
            elif service.cache is None:
                service.cache = ResponseCache(live["cache_max_entries"], live["cache_max_bytes"], live["cache_ttl_s"],
                                              shared=self.config.cache_shared)
            else:
                service.cache.resize(live["cache_max_entries"], live["cache_max_bytes"], live["cache_ttl_s"])
        if "request_timeout_s" in changes:
            self.service.timeout_s = live["request_timeout_s"]
        if "log_level" in changes:
            logging.getLogger().setLevel(str(live["log_level"]).upper())
        self.config = self.config.with_overrides(**{k: v for k, v in changes.items() if k in LIVE_PROXY_KEYS})


def build(config: ProxyConfig) -> Parts:
    link = EngineLink(config.resolved_engine_socket())
    metrics = Metrics()
    limiter = RateLimiter(config.rate_limit_requests_per_min, config.rate_limit_tokens_per_min, config.rate_limit_tiers)
    safety = PolicySource(config.safety, metrics.safety_event)
    router = Router(link)  # local engine first; the cloud too once offload is enabled (proxy/broker.py)
    cache = (ResponseCache(config.cache_max_entries, config.cache_max_bytes, config.cache_ttl_s, shared=config.cache_shared)
             if config.cache_enabled else None)
    service = CompletionService(link, router, metrics, safety, config.model_aliases, config.request_timeout_s, cache)
    return Parts(config, link, Authenticator(config.api_keys, config.jwt), limiter, metrics, safety, router, service)
