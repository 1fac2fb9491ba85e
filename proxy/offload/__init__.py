"""Offload to cloud workers over MQTT (docs/offload-protocol.md): the gateway's publisher and
reply assembler (gateway.py, assembler.py), the cloud worker (worker.py), the wire format
(protocol.py), the `[offload]`, `[devices]` and `[cloud]` config tables (config.py) and their
metrics (metrics.py)."""

from .. import lazy

# Each name loads its module on first use (proxy/lazy.py says why).
_EXPORTS = {
    "OffloadFailed": ".assembler",
    "ReplyAssembler": ".assembler",
    "CloudConfig": ".config",
    "DevicesConfig": ".config",
    "OffloadConfig": ".config",
    "cloud_config_from": ".config",
    "devices_config_from": ".config",
    "offload_config_from": ".config",
    "Offloader": ".gateway",
    "MqttMetrics": ".metrics",
    "CloudWorker": ".worker",
    "EngineBackend": ".worker",
    "UpstreamBackend": ".worker",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy.exports(__name__, _EXPORTS)
