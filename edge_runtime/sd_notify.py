"""systemd's notify protocol (sd_notify(3)): state lines sent as one datagram to $NOTIFY_SOCKET.
A no-op when not run by systemd with Type=notify."""

from __future__ import annotations

import os
import socket


def notify(*states: str) -> bool:
    """Send state lines (READY=1, STATUS=..., WATCHDOG=1, STOPPING=1); True if sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(states).encode(), address)
    except OSError:
        return False  # systemd gone or not listening: nothing to tell
    return True


def watchdog_interval_s() -> float | None:
    """How often to send WATCHDOG=1 (half the configured timeout), or None if no watchdog."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None
