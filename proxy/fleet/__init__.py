"""Fleet sync: presence, telemetry and desired/reported configuration between a gateway and
its controller over MQTT (the gateway side: FleetAgent; the controller: edgectl)."""

from .. import lazy

# Each name loads its module on first use (proxy/lazy.py says why).
_EXPORTS = {
    "FleetAgent": ".agent",
    "FleetConfig": ".config",
    "fleet_config_from": ".config",
    "load_fleet_config": ".config",
    "ManagedTable": ".schema",
    "default_tables": ".schema",
    "managed": ".schema",
    "overlay": ".schema",
    "APPLIED": ".sync",
    "NEEDS_RESTART": ".sync",
    "applied_config": ".sync",
    "EngineStatus": ".telemetry",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy.exports(__name__, _EXPORTS)
