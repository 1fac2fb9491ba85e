"""Prometheus metrics of the router, offload, the device front and the cloud worker, registered
on the sidecar's own registry (proxy.metrics.Metrics.registry) so that /metrics shows them."""

from __future__ import annotations

from collections import Counter as Tally
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from ..core.breaker import STATE_VALUES, Breaker


class MqttMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.routed = Counter("edge_proxy_routed_requests", "Answered generation requests by where they were served "
                              "(local, cloud, cache) and front (http, mqtt)", ["route", "front"], registry=r)
        self.offloads = Counter("edge_proxy_offloads", "Requests sent to the cloud, by reason (busy, wait, unreachable, "
                                "error, breaker, thermal, memory)", ["reason"], registry=r)
        self.offload_failures = Counter("edge_proxy_offload_failures", "Offloads that failed, by reason (timeout, lost, "
                                        "unavailable, broken, rejected)", ["reason"], registry=r)
        self.offload_fallbacks = Counter("edge_proxy_offload_fallbacks", "Failed offloads retried on the local engine", registry=r)
        self.chunks_dropped = Counter("edge_proxy_offload_chunks_dropped", "Reply chunks dropped: duplicates, unknown "
                                      "requests, malformed", ["reason"], registry=r)
        self.offloads_in_flight = Gauge("edge_proxy_offloads_in_flight", "Offloaded requests being answered", registry=r)
        self.breaker_state = Gauge("edge_proxy_breaker_state", "Circuit breaker state by path: 0 closed, 1 open, 2 half-open",
                                   ["path"], registry=r)
        self.breaker_opened = Counter("edge_proxy_breaker_opened", "Times a path's circuit breaker opened", ["path"], registry=r)
        self.no_route = Counter("edge_proxy_no_route", "Requests neither the engine nor the cloud could take (503)", registry=r)
        self.device_requests = Counter("edge_proxy_device_requests", "MQTT device requests answered, by outcome "
                                       "(ok, error)", ["outcome"], registry=r)
        self.device_errors = Counter("edge_proxy_device_errors", "MQTT device requests refused or failed, by reason",
                                     ["reason"], registry=r)
        self.cloud_requests = Counter("edge_proxy_cloud_requests", "Offloaded requests a cloud worker handled, by outcome "
                                      "(served, failed, expired, busy, rejected, cancelled)", ["outcome"], registry=r)
        self.cloud_in_flight = Gauge("edge_proxy_cloud_in_flight", "Offloaded requests this cloud worker is serving", registry=r)
        self.mqtt_connected = Gauge("edge_proxy_mqtt_connected", "1 while the broker connection is up", registry=r)
        # Plain tallies for fleet telemetry (counters()): cheap to read, no registry walk.
        self.tally: Tally[str] = Tally()

    def offload(self, reason: str) -> None:
        self.offloads.labels(reason).inc()
        self.tally[f"offload.{reason}"] += 1

    def offload_failed(self, reason: str) -> None:
        self.offload_failures.labels(reason).inc()
        self.tally[f"offload_failed.{reason}"] += 1

    def route(self, route: str, front: str) -> None:
        self.routed.labels(route, front).inc()
        self.tally[f"route.{route}"] += 1

    def device_error(self, reason: str) -> None:
        self.device_errors.labels(reason).inc()
        self.tally[f"device_error.{reason}"] += 1

    def watch(self, breaker: Breaker) -> None:
        """Follow a breaker's state in the gauge."""
        gauge = self.breaker_state.labels(breaker.name)
        gauge.set(STATE_VALUES[breaker.state])

        def changed(b: Breaker) -> None:
            gauge.set(STATE_VALUES[b.state])
            if b.state == "open":
                self.breaker_opened.labels(b.name).inc()

        breaker.on_change = changed

    def summary(self) -> dict[str, Any]:
        """Routes and offloads by reason, for telemetry."""
        out: dict[str, dict[str, int]] = {}
        for key, value in self.tally.items():
            group, name = key.split(".", 1)
            out.setdefault(group, {})[name] = value
        return out
