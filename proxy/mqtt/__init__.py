"""The MQTT connection layer shared by fleet sync, the device front and offload: an asyncio
client on paho-mqtt (v5, falling back to 3.1.1; TLS; reconnect with backoff; Last Will; a
bounded outbound queue), its `[mqtt]` configuration, and the topic tree."""

from .. import lazy

# Each name loads its module on first use (proxy/lazy.py says why).
_EXPORTS = {
    "Message": ".client",
    "MessageProperties": ".client",
    "MqttClient": ".client",
    "MqttClosed": ".client",
    "MqttError": ".client",
    "OutMessage": ".client",
    "QueueFull": ".client",
    "BrokerAddress": ".config",
    "MqttConfig": ".config",
    "load_mqtt_config": ".config",
    "mqtt_config_from": ".config",
    "parse_url": ".config",
    "Topics": ".topics",
    "check_name": ".topics",
    "check_prefix": ".topics",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy.exports(__name__, _EXPORTS)
