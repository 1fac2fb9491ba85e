"""The [mqtt] table: URL parsing, validation messages naming the key, secrets from the environment."""

from __future__ import annotations

import pytest

from edge_wire.settings import ConfigError
from proxy.mqtt import BrokerAddress, MqttConfig, load_mqtt_config, parse_url


@pytest.mark.parametrize("url, expected", [
    ("mqtt://broker", BrokerAddress("broker", 1883, False)),
    ("mqtts://broker.example.net", BrokerAddress("broker.example.net", 8883, True)),
    ("mqtt://10.0.0.5:1884", BrokerAddress("10.0.0.5", 1884, False)),
    ("mqtts://[::1]:8884/", BrokerAddress("::1", 8884, True)),
])
def test_parse_url(url, expected):
    assert parse_url(url) == expected


@pytest.mark.parametrize("url, message", [
    ("tcp://broker:1883", "scheme must be mqtt:// or mqtts://"),
    ("mqtt://user:secret@broker", "must not carry credentials"),
    ("mqtt://broker:99999", "bad port"),
    ("mqtt://broker/topic", "scheme://host[:port] only"),
    ("mqtt://:1883", "no host"),
])
def test_parse_url_refuses(url, message):
    with pytest.raises(ConfigError, match="^url: ") as info:
        parse_url(url)
    assert message in str(info.value)
    assert "secret" not in str(info.value)


def test_load_names_the_key_at_fault(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[mqtt]\nurl = "mqtt://b"\nkeepalive_s = 0\n')
    with pytest.raises(ConfigError, match=r"\[mqtt\] keepalive_s: must be in \[1, 65535\], got 0"):
        load_mqtt_config(path, environ={})
    path.write_text('[mqtt]\nurl = "mqtt://b"\nca_file = "/ca.pem"\n')
    with pytest.raises(ConfigError, match=r"ca_file: TLS files need an mqtts:// url"):
        load_mqtt_config(path, environ={})
    path.write_text('[mqtt]\nurl = "mqtts://b"\ncert_file = "/c.pem"\n')
    with pytest.raises(ConfigError, match=r"cert_file: cert_file and key_file go together"):
        load_mqtt_config(path, environ={})
    path.write_text('[mqtt]\nbroker = "mqtt://b"\n')
    with pytest.raises(ConfigError, match=r"\[mqtt\] unknown key 'broker'"):
        load_mqtt_config(path, environ={})
    path.write_text('[mqtt]\nprotocol = 5\n')
    with pytest.raises(ConfigError, match=r"protocol: must be one of 'auto', '5', '3.1.1', got 5"):
        load_mqtt_config(path, environ={})


def test_credentials_from_the_environment_and_never_shown(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[mqtt]\nurl = "mqtts://broker:8883"\nusername = "file-user"\npassword = "file-secret"\n')
    config = load_mqtt_config(path, environ={"EDGE_MQTT_USERNAME": "gw-1", "EDGE_MQTT_PASSWORD": "env-secret"})
    assert (config.username, config.password) == ("gw-1", "env-secret")
    assert "secret" not in repr(config)
    with pytest.raises(ConfigError, match="password: must be a non-empty string$"):
        MqttConfig(username="u", password="")
    with pytest.raises(ConfigError, match="username: a password needs a username"):
        MqttConfig(password="x")


def test_defaults(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[proxy]\nport = 8081\n")
    config = load_mqtt_config(path, environ={})
    assert config.address == BrokerAddress("127.0.0.1", 1883, False)
    assert (config.protocol, config.keepalive_s, config.max_queued) == ("auto", 30, 1000)
