"""The shipped broker setup (systemd/mosquitto/: edge-runtime.conf and acl) run as it is, with
test certificates and passwords made here: TLS only, no anonymous clients, and from the
attacker's side, a device can neither publish to another device's request topic, nor read
another's answers, nor read the offload requests; while the documented clients (a gateway, a
cloud worker, the SDK's DeviceClient) work under it."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import secrets
import shutil
import ssl
import subprocess
import tempfile
from pathlib import Path

import pytest
from engine_harness import Engine
from gateway_harness import Gateway, mqtt_config, post, settings, wait_for
from mqtt_harness import Broker, make_tls_files, mosquitto_binary

from proxy.config import ProxyConfig
from proxy.mqtt import Message, MqttClient, MqttError

SHIPPED = Path(__file__).resolve().parent.parent / "systemd" / "mosquitto"
INSTALLED = "/etc/mosquitto/edge-runtime/"  # where edge-runtime.conf expects its files
USERS = ("gw-0042", "cloud-1", "controller", "dev-a", "dev-b")

pytestmark = pytest.mark.skipif(mosquitto_binary() is None or shutil.which("mosquitto_passwd") is None,
                                reason="needs mosquitto and mosquitto_passwd")


class ShippedBroker(Broker):
    """Mosquitto with the shipped config, its paths moved into the test's directory."""

    def config_text(self, port: int) -> str:
        text = (SHIPPED / "edge-runtime.conf").read_text().replace(INSTALLED, f"{self.directory}/")
        text, listeners = re.subn(r"(?m)^listener 8883$", f"listener {port} 127.0.0.1", text)
        assert listeners == 1
        return text + f"user {pwd.getpwuid(os.getuid()).pw_name}\npersistence false\nlog_dest stderr\nlog_type error\n"

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def shipped():
    """The broker, and each user's password."""
    with tempfile.TemporaryDirectory(prefix="acl-", dir="/tmp") as d:
        directory = Path(d)
        (directory / "certs").mkdir()
        tls = make_tls_files(directory / "certs")
        tls["ca"].rename(directory / "certs" / "ca.crt")
        tls["cert"].rename(directory / "certs" / "server.crt")
        tls["key"].rename(directory / "certs" / "server.key")
        shutil.copy(SHIPPED / "acl", directory / "acl")
        passwords = {user: secrets.token_urlsafe(12) for user in USERS}
        passwd = directory / "passwd"
        passwd.touch(0o600)
        for user, password in passwords.items():
            subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True, capture_output=True)
        broker = ShippedBroker(directory)
        broker.start()
        try:
            yield broker, passwords
        finally:
            broker.stop()


def client_config(shipped, user: str | None, password: str | None = None, **kw):
    broker, passwords = shipped
    return mqtt_config(broker.url, ca_file=str(broker.directory / "certs" / "ca.crt"), username=user,
                       password=password if password is not None or user is None else passwords[user], **kw)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    with tempfile.TemporaryDirectory(prefix="acl-e-", dir="/tmp") as d, Engine(tiny_model_dir, Path(d) / "e.sock") as e:
        yield e


@pytest.fixture(scope="module")
def fleet(shipped, engine):
    """Gateway gw-0042 (devices on, everything offloaded) and cloud worker cloud-1, both on the shipped broker."""
    broker = shipped[0]
    mqtt_gw = {"ca_file": str(broker.directory / "certs" / "ca.crt"), "username": "gw-0042", "password": shipped[1]["gw-0042"]}
    mqtt_w = {**mqtt_gw, "username": "cloud-1", "password": shipped[1]["cloud-1"]}
    config = ProxyConfig(engine_socket=str(engine.socket_path), model_aliases=("tiny",))
    with Gateway(ProxyConfig(engine_socket=str(engine.socket_path)), settings(broker.url, role="cloud", mqtt=mqtt_w)) as worker, \
            Gateway(config, settings(broker.url, "gw-0042", mqtt=mqtt_gw, offload={"max_memory_percent": 0.001},
                                     devices={"enabled": True, "require_grant": False, "rate_limit_requests_per_min": 0})) as gw:
        yield gw, worker


def test_no_anonymous_client_nor_a_wrong_password_gets_in(shipped):
    async def main():
        outcomes = []
        for config in (client_config(shipped, None), client_config(shipped, "dev-a", "wrong")):
            client = MqttClient(config, "intruder")
            await client.start()
            outcomes.append(await client.wait_connected(2))
            await client.stop()
        return outcomes

    assert asyncio.run(main()) == [False, False]


async def connected(shipped, user: str) -> MqttClient:
    client = MqttClient(client_config(shipped, user), user)
    await client.start()
    assert await client.wait_connected(10), f"{user} could not connect"
    return client


async def try_subscribe(client: MqttClient, topic_filter: str, handler) -> None:
    """Subscribe as an attacker would: Mosquitto refuses some filters at once (SUBACK) and grants
    wildcards, delivering through them only what the ACL lets the client read."""
    try:
        await client.subscribe(topic_filter, handler, qos=1)
    except MqttError:
        pass


def test_a_device_cannot_publish_to_another_devices_request_topic_nor_read_its_answers(shipped, fleet):
    async def main():
        a, b = await connected(shipped, "dev-a"), await connected(shipped, "dev-b")
        got_a: list[Message] = []
        got_b: list[Message] = []
        try:
            await b.subscribe("edge/gw-0042/infer/reply/dev-b", got_b.append, qos=1)
            await try_subscribe(a, "edge/#", got_a.append)  # reading dev-b's answers would give the attack away too
            forged = json.dumps({"prompt": "x", "max_tokens": 2, "reply_to": "edge/gw-0042/infer/reply/dev-b"}).encode()
            refused = a.publish("edge/gw-0042/infer/request/dev-b", forged, qos=1)
            own = a.publish("edge/gw-0042/infer/request/dev-a", json.dumps({"prompt": "x", "max_tokens": 2}).encode(), qos=1)
            await own
            for _ in range(400):  # its own request is answered (the ACL lets the documented traffic through) ...
                if got_a:
                    break
                await asyncio.sleep(0.05)
            await asyncio.wait([refused])  # the broker refused it (PUBACK "not authorized"): it went nowhere
            return got_a, got_b, refused
        finally:
            await a.stop()
            await b.stop()

    got_a, got_b, refused = asyncio.run(main())
    assert [m.topic for m in got_a] == ["edge/gw-0042/infer/reply/dev-a"] and json.loads(got_a[0].payload)["type"] == "result"
    assert got_b == []  # ... the forged one reached no gateway: nothing went to dev-b
    assert refused.done() and isinstance(refused.exception(), MqttError)  # MQTT v5: PUBACK "not authorized"
    gw = fleet[0]
    assert gw.metric("edge_proxy_device_errors_total", reason="bad_reply_topic") == 0


def test_a_device_cannot_read_offload_requests_while_the_fleet_offloads(shipped, fleet):
    gw, worker = fleet

    async def main():
        spy = await connected(shipped, "dev-b")
        seen: list[Message] = []
        try:
            for topic in ("edge/offload/request", "$share/edge-cloud/edge/offload/request", "edge/+/offload/#", "#"):
                await try_subscribe(spy, topic, seen.append)
            answer = await post(f"{gw.url}/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                                   "max_tokens": 3})
            # A marker: the spy's own device request, answered by the gateway after it published the
            # offload request; a copy of that request (were the ACL to let one through) comes first.
            own_reply = "edge/gw-0042/infer/reply/dev-b"
            marker = asyncio.get_running_loop().create_future()
            await spy.subscribe(own_reply, lambda m: marker.done() or marker.set_result(m), qos=1)
            spy.publish("edge/gw-0042/infer/request/dev-b", json.dumps({"prompt": "x", "max_tokens": 2}).encode(), qos=1)
            await asyncio.wait_for(marker, 30)
            return answer, [m for m in seen if m.topic != own_reply]
        finally:
            await spy.stop()

    (status, headers, _), seen = asyncio.run(main())
    assert (status, headers["x-served-by"]) == (200, "cloud") and seen == []
    assert worker.metric("edge_proxy_cloud_requests_total", outcome="served") >= 1


def test_the_sdk_device_client_works_under_the_shipped_acl(shipped, fleet):
    from edge_client.mqtt_device import DeviceClient

    broker, passwords = shipped
    tls = ssl.create_default_context(cafile=str(broker.directory / "certs" / "ca.crt"))
    with DeviceClient(broker.url, gateway="gw-0042", client_id="dev-b", username="dev-b",
                      password=passwords["dev-b"], tls=tls) as dev:
        assert dev.complete("the quick", max_tokens=2, timeout=30).usage.completion_tokens <= 2


def test_the_gateway_sees_the_workers_presence_under_the_shipped_acl(shipped, fleet):
    gw, _ = fleet
    wait_for(lambda: gw.run(lambda: gw.services.offloader.workers_online) == 1, timeout=10, what="the worker's presence")


def test_a_client_cannot_clear_or_forge_a_workers_presence_under_the_shipped_acl(shipped, fleet):
    """An emptied presence makes gateways fail over the worker's requests and a forged one would
    draw requests to nobody: only the worker itself may write its presence topic."""
    gw, _ = fleet
    wait_for(lambda: gw.run(lambda: gw.services.offloader.workers_online) == 1, timeout=10, what="the worker's presence")

    async def main():
        attacker = await connected(shipped, "dev-a")
        try:
            attempts = [attacker.publish("edge/offload/worker/cloud-1", b"", qos=1, retain=True),
                        attacker.publish("edge/offload/worker/dev-a", b"\x81\xa5state\xa6online", qos=1, retain=True)]
            await asyncio.wait(attempts)  # each answered by the broker's PUBACK
            answer = await post(f"{gw.url}/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                                   "max_tokens": 3})
            return attempts, answer
        finally:
            await attacker.stop()

    attempts, (status, headers, _) = asyncio.run(main())
    assert all(isinstance(a.exception(), MqttError) for a in attempts)  # MQTT v5: PUBACK "not authorized"
    assert list(gw.run(lambda: gw.services.offloader.workers).values()) == ["online"]  # the one real worker, still online
    assert (status, headers["x-served-by"]) == (200, "cloud")  # the worker still serves this gateway
