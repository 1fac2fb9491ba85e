"""The fleet console: `edgectl serve`, a self-hosted web page (and JSON API) over the fleet's
MQTT topics: presence, telemetry history, reported config, and signed pushes (docs/console.md).

Modules: config (the [console] table and who may connect), store (SQLite history), metrics
(telemetry -> chart points), health (flags), fleet_listener (the MQTT side), auth (access and
CSRF), api (the JSON API), server (the aiohttp app and `serve`)."""
