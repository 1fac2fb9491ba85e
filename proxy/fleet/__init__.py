"""Fleet sync: presence, telemetry and desired/reported configuration between a gateway and
its controller over MQTT (the gateway side: FleetAgent; the controller: edgectl)."""

from .agent import FleetAgent
from .config import FleetConfig, fleet_config_from, load_fleet_config
from .schema import ManagedTable, default_tables, managed, overlay
from .sync import APPLIED, NEEDS_RESTART, applied_config
from .telemetry import EngineStatus

__all__ = [
    "APPLIED", "NEEDS_RESTART", "EngineStatus", "FleetAgent", "FleetConfig", "ManagedTable", "applied_config",
    "default_tables", "fleet_config_from", "load_fleet_config", "managed", "overlay",
]
