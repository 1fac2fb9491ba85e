"""Offload to cloud workers over MQTT (docs/offload-protocol.md): the gateway's publisher and
reply assembler (gateway.py, assembler.py), the cloud worker (worker.py), the wire format
(protocol.py), the `[offload]`, `[devices]` and `[cloud]` config tables (config.py) and their
metrics (metrics.py)."""

from .assembler import OffloadFailed, ReplyAssembler
from .config import CloudConfig, DevicesConfig, OffloadConfig, cloud_config_from, devices_config_from, offload_config_from
from .gateway import Offloader
from .metrics import MqttMetrics
from .worker import CloudWorker, EngineBackend, UpstreamBackend

__all__ = [
    "CloudConfig", "CloudWorker", "DevicesConfig", "EngineBackend", "MqttMetrics", "OffloadConfig", "OffloadFailed",
    "Offloader", "ReplyAssembler", "UpstreamBackend", "cloud_config_from", "devices_config_from", "offload_config_from",
]
