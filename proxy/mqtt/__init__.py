"""The MQTT connection layer shared by fleet sync, the device front and offload: an asyncio
client on paho-mqtt (v5, falling back to 3.1.1; TLS; reconnect with backoff; Last Will; a
bounded outbound queue), its `[mqtt]` configuration, and the topic tree."""

from .client import Message, MessageProperties, MqttClient, MqttClosed, MqttError, OutMessage, QueueFull
from .config import BrokerAddress, MqttConfig, load_mqtt_config, mqtt_config_from, parse_url
from .topics import Topics, check_name, check_prefix

__all__ = [
    "BrokerAddress", "Message", "MessageProperties", "MqttClient", "MqttClosed", "MqttConfig", "MqttError",
    "OutMessage", "QueueFull", "Topics", "check_name", "check_prefix", "load_mqtt_config", "mqtt_config_from",
    "parse_url",
]
