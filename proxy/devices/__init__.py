"""The IoT device front over MQTT (docs/mqtt-device-protocol.md)."""
