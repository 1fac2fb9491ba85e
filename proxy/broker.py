"""The sidecar's MQTT side, on one broker connection: the fleet agent (when `[fleet] enabled`),
offload to cloud workers (the router's cloud path), the IoT device front, and, in role `cloud`,
the cloud worker. `attach(app, settings)` starts and stops them with the aiohttp application
(proxy/broker_settings.py reads their settings).

The broker is used when `[mqtt] url` is set, `--mqtt URL` is given, `[fleet] enabled` is true,
or the role is `cloud`; without one the sidecar is the plain HTTP gateway it always was.

Fleet: a pushed config is applied live where it can be: `[proxy]` rate limits, cache sizes,
request timeout and log level, every `[offload]` key (bounds, timeouts, breakers) but the
secret ones (read once, at the start), and the `[devices]` rate limits, grants, sampling
defaults and sizes; everything else is reported
`needs_restart` (and is in force from the next start: main.py lays the applied config over the
file)."""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from edge_wire.settings import ConfigError

from .broker_settings import GATEWAY, MqttSettings
from .compose import LIVE_PROXY_KEYS, Parts
from .devices.front import DeviceFront
from .fleet import APPLIED, NEEDS_RESTART, FleetAgent, ManagedTable
from .http.request_state import SERVED_BY
from .mqtt import MqttClient
from .offload import CloudWorker, EngineBackend, MqttMetrics, Offloader, UpstreamBackend

log = logging.getLogger("proxy.broker")

SERVICES = web.AppKey("mqtt_services", "MqttServices")
_GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
_RESTART_DEVICES = frozenset({"enabled", "reply_prefix"})
_RESTART_OFFLOAD = frozenset({"secret", "secret_file", "allow_unauthenticated"})  # the key is read once, at the start


class MqttServices:
    def __init__(self, settings: MqttSettings, parts: Parts) -> None:
        assert settings.mqtt is not None
        self.settings = settings
        self.parts = parts
        self.metrics = MqttMetrics(parts.metrics.registry)
        self.topics = settings.topics
        self.gateway_id = settings.gateway_id
        self.agent: FleetAgent | None = None
        self.offloader: Offloader | None = None
        self.devices: DeviceFront | None = None
        self.worker: CloudWorker | None = None
        self._subscribed: list[asyncio.Future[int]] = []  # the parts' subscriptions, until acknowledged
        self._left = False  # off the broker for good (leave() or stop())
        mqtt = settings.mqtt
        if settings.role == GATEWAY and settings.fleet.enabled:
            self.agent = FleetAgent(settings.fleet, mqtt, tables=_file_tables(settings.config_path), on_apply=self.on_apply,
                                    counters=self.counters, engine_status=parts.link.status,
                                    command_line=settings.command_line)
            self.client = self.agent.client
        else:
            client_id = mqtt.client_id or (self.gateway_id if settings.role == GATEWAY
                                           else f"edge-cloud-{socket.gethostname()[:40]}-{secrets.token_hex(3)}")
            self.client = MqttClient(mqtt, client_id)
        self.client.on_connect(lambda: self.metrics.mqtt_connected.set(1))
        self.client.on_disconnect(lambda: self.metrics.mqtt_connected.set(0))
        key = settings.offload_key()
        if key is None and settings.offload.allow_unauthenticated:
            log.warning("offload messages are not authenticated (allow_unauthenticated): anyone on the broker can read, "
                        "answer and cancel them; set [offload] secret_file or $EDGE_OFFLOAD_SECRET outside labs")
        elif key is None and settings.role == GATEWAY and settings.offload.enabled:
            log.error("offload is off: no offload secret ([offload] secret_file or $EDGE_OFFLOAD_SECRET, the same on "
                      "every gateway and worker); requests are served locally only")
        if settings.role == GATEWAY:
            self.offloader = Offloader(self.client, self.topics, self.gateway_id, settings.offload, self.metrics, key)
            parts.router.enable_offload(self.offloader, settings.offload, self.metrics)
            if settings.devices.enabled:
                self.devices = DeviceFront(self.client, self.topics, self.gateway_id, settings.devices, parts.service,
                                           parts.config, parts.auth, self.metrics)
        else:
            cloud = settings.cloud
            backend = (UpstreamBackend(cloud.upstream, cloud.upstream_api_key, cloud.upstream_model) if cloud.upstream
                       else EngineBackend(parts.link))
            self.worker = CloudWorker(self.client, self.topics, cloud, backend, self.metrics, key=key,
                                      presence_name=mqtt.username or self.client.client_id)

    async def start(self) -> None:
        for part in (self.offloader, self.devices, self.worker):
            if part is not None:
                self._subscribed += part.start()
        if self.agent is not None:
            await self.agent.start()
        else:
            await self.client.start()
        self.parts.router.start()
        log.info("mqtt side started", extra={"role": self.settings.role, "gateway": self.gateway_id,
                                             "broker": self.settings.mqtt.url,
                                             "offload": self.offloader is not None and self.offloader.auth != "refused"
                                             and self.settings.offload.enabled,
                                             "devices": self.devices is not None, "fleet": self.agent is not None})

    async def wait_subscribed(self, timeout: float) -> None:
        """Until the broker has acknowledged every subscription of the offload, device and
        worker parts: before that, a message sent to them can be dropped by the broker."""
        async with asyncio.timeout(timeout):
            await asyncio.gather(*self._subscribed)

    async def leave(self) -> None:
        """SIGTERM: off the broker before the HTTP side drains (docs/reliability.md), so that a
        new instance with the same client id connects without a fight: nothing reconnects from
        here, and the DISCONNECT is clean (the Will is not sent). A gateway fails its offloads in
        flight at once (the router moves those not started to the engine) and drops the device
        requests in flight (their answers could not be delivered); a worker says `draining`,
        finishes what it serves within grace_s, then leaves."""
        if self._left:
            return
        self._left = True
        self.client.reconnect = False
        log.info("leaving the broker", extra={"role": self.settings.role, "client_id": self.client.client_id})
        if self.worker is not None:
            await self.worker.stop(self.parts.config.grace_s)
        if self.offloader is not None:
            self.offloader.leave()
        if self.devices is not None:
            await self.devices.stop(0.0)
        await self._disconnect()

    async def stop(self) -> None:
        await self.parts.router.stop()
        if self._left:
            return
        self._left = True
        grace = self.parts.config.grace_s
        if self.devices is not None:
            await self.devices.stop(grace)
        if self.worker is not None:
            await self.worker.stop(grace)
        await self._disconnect()

    async def _disconnect(self) -> None:
        if self.agent is not None:
            await self.agent.stop()
        else:
            await self.client.stop(final=self.worker.farewell() if self.worker is not None else ())

    # -- fleet ----------------------------------------------------------------------------------

    def on_apply(self, changes: dict[str, Any]) -> dict[str, str]:
        """Apply what a controller pushed, live where possible."""
        results: dict[str, str] = {}
        proxy: dict[str, Any] = {}
        offload: dict[str, Any] = {}
        devices: dict[str, Any] = {}
        for key, value in changes.items():
            table, name = key.split(".", 1)
            if table == "proxy" and name in LIVE_PROXY_KEYS:
                proxy[name] = value
                results[key] = APPLIED
            elif table == "offload" and name not in _RESTART_OFFLOAD:
                offload[name] = value
                results[key] = APPLIED
            elif table == "devices" and name not in _RESTART_DEVICES:
                devices[name] = value
                results[key] = APPLIED if self.devices is not None else NEEDS_RESTART
            else:
                results[key] = NEEDS_RESTART
        try:
            self.parts.apply_live(proxy)
            if offload:
                router = self.parts.router
                router.configure(msgspec.structs.replace(router.config or self.settings.offload, **offload))
                if self.offloader is not None:
                    self.offloader.config = router.config
            if devices and self.devices is not None:
                self.devices.configure(msgspec.structs.replace(self.devices.config, **devices))
        except (ConfigError, TypeError, ValueError) as exc:  # validated before: should not happen
            log.error("pushed config could not be applied", extra={"error": str(exc)})
            return {key: f"could not apply: {exc}" for key in changes}
        log.info("pushed config applied", extra={"results": results})
        return results

    def counters(self) -> dict[str, Any]:
        """The sidecar's figures for fleet telemetry."""
        registry = self.parts.metrics.registry
        requests = errors = 0.0
        for metric in self.parts.metrics.requests.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    requests += sample.value
                    if sample.labels.get("status", "").startswith("5"):
                        errors += sample.value
        summary = self.metrics.summary()
        out: dict[str, Any] = {
            "requests": int(requests), "errors": int(errors),
            "cache": {"hits": int(registry.get_sample_value("edge_proxy_cache_hits_total") or 0),
                      "misses": int(registry.get_sample_value("edge_proxy_cache_misses_total") or 0)},
            # cumulative, like the rest: a controller takes differences for the mean over an interval
            "ttft_s": {"sum": round(registry.get_sample_value("edge_proxy_time_to_first_token_seconds_sum") or 0.0, 6),
                       "count": int(registry.get_sample_value("edge_proxy_time_to_first_token_seconds_count") or 0)},
            "routes": summary.get("route", {}),
            "offload": summary.get("offload", {}),
            "offload_failed": summary.get("offload_failed", {}),
            "mqtt": {"connected": self.client.connected, "queued": self.client.queued},
        }
        if self.offloader is not None:
            router = self.parts.router
            out["offload_auth"] = self.offloader.auth
            out["offload_in_flight"] = self.offloader.in_flight
            out["breakers"] = {"local": router.local.state, "cloud": router.cloud.state}
        if self.devices is not None:
            out["devices"] = {"active": self.devices.active, "errors": summary.get("device_error", {})}
        if self.worker is not None:
            out["cloud_worker"] = {"active": self.worker.active, "served": self.worker.served}
        return out


def _file_tables(path: Path | None) -> dict[str, ManagedTable]:
    """The managed tables as the file alone says (keys a push leaves out fall back to these)."""
    from .fleet import default_tables

    return default_tables(path)


def attach(app: web.Application, settings: MqttSettings) -> MqttServices | None:
    """Run the MQTT side with `app` (started after the engine link, stopped before it), and count
    where generation requests were served. Returns None when no broker is configured."""
    from .http.app import SIDECAR

    if settings.mqtt is None:
        return None
    services = app[SERVICES] = MqttServices(settings, app[SIDECAR].parts)

    async def lifecycle(_app: web.Application):
        await services.start()
        yield
        await services.stop()

    async def count(request: web.BaseRequest, response: web.StreamResponse) -> None:
        if request.path in _GENERATION_PATHS and response.status < 400:
            services.metrics.route(request.get(SERVED_BY, "local"), "http")

    app.cleanup_ctx.append(lifecycle)
    app.on_response_prepare.append(count)
    return services
