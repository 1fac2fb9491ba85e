"""A private Mosquitto broker for tests: its own config file, a free port on loopback, and, when
asked, a persistence file so that retained messages and sessions survive a restart."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

START_TIMEOUT_S = 20.0  # the machine may be busy with other tests


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    def __init__(self, directory: Path, *, persistence: bool = False, extra: tuple[str, ...] = (), tls_port: bool = False) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed")
        self.binary = binary
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.persistence = persistence
        self.extra = extra
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def config_text(self, port: int) -> str:
        lines = [
            f"listener {port} 127.0.0.1",
            "allow_anonymous true",
            f"user {pwd.getpwuid(os.getuid()).pw_name}",  # as root, mosquitto would drop to a user who cannot write here
            f"persistence {'true' if self.persistence else 'false'}",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            *self.extra,
        ]
        if self.persistence:
            lines += [f"persistence_location {self.directory}/", "persistence_file broker.db", "autosave_interval 0"]
        return "\n".join(lines) + "\n"

    def start(self, port: int | None = None) -> None:
        """Start on our port (or on `port`, e.g. a side port no gateway knows); wait until it listens."""
        port = self.port if port is None else port
        conf = self.directory / f"mosquitto-{port}.conf"
        conf.write_text(self.config_text(port))
        with open(self.directory / "mosquitto.log", "ab") as log:
            self.proc = subprocess.Popen([self.binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {(self.directory / 'mosquitto.log').read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on {port} within {START_TIMEOUT_S} s")

    def stop(self) -> None:
        """SIGTERM (Mosquitto saves its persistence file), then wait for the exit."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=START_TIMEOUT_S)


def make_tls_files(directory: Path) -> dict[str, Path]:
    """A CA, and a server certificate it signed for 127.0.0.1 / localhost (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject: str, key, issuer: str, issuer_key, *, ca: bool, san: list | None = None):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("test CA", ca_key, "test CA", ca_key, ca=True)
    server = cert("localhost", server_key, "test CA", ca_key, ca=False,
                  san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    files = {"ca": directory / "ca.pem", "cert": directory / "server.pem", "key": directory / "server.key"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                                      serialization.NoEncryption()))
    return files


class V311OnlyFront:
    """A TCP front that answers an MQTT v5 CONNECT as a 3.1.1-only broker does (CONNACK
    "unacceptable protocol version", then close) and relays any other client to `port`."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.refused_v5 = 0
        self.server = None

    async def start(self) -> int:
        import asyncio

        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.server.close()

    async def _client(self, reader, writer) -> None:
        import asyncio

        head = await reader.readexactly(2)  # packet type, first byte of the remaining length
        length_bytes = head[1:]
        while length_bytes[-1] & 0x80:
            length_bytes += await reader.readexactly(1)
        body = await reader.readexactly(9)  # protocol name (2 + 4 bytes), level, flags, keepalive high byte
        if body[6] == 5:
            self.refused_v5 += 1
            writer.write(b"\x20\x02\x00\x01")
            await writer.drain()
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        up_writer.write(head + length_bytes[1:] + body)

        async def pipe(src, dst) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
