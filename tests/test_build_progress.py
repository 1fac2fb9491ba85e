"""A model build shows how far it is: in a daemon as systemd's STATUS= line and log lines (the
first `serve`/`up` builds the default model), on a terminal as a line rewritten in place; steps
shorter than a second show nothing. The clock is a test's own, so no test waits for time."""

from __future__ import annotations

import logging
import socket

from edge_runtime.builder import progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_daemon_build_tells_systemd_and_the_log(tmp_path, monkeypatch, caplog):
    clock = Clock()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify"))
        notify.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        caplog.set_level(logging.INFO, "edge_runtime.build")
        report = progress.service("building layers", clock)
        report(1, 30)  # within the first second: nothing
        clock.now += 1.5
        report(10, 30)
        clock.now += 0.5
        report(11, 30)  # within 2 s of the last line: nothing
        clock.now += 0.5
        report(30, 30)  # the end: always
        statuses = [notify.recv(4096).decode(), notify.recv(4096).decode()]
    assert statuses == ["STATUS=building the model: building layers 33%", "STATUS=building the model: building layers 100%"]
    assert [(r.getMessage(), r.step, r.percent) for r in caplog.records] == [
        ("building the model", "building layers", 33), ("building the model", "building layers", 100)]


def test_a_short_step_shows_nothing_and_a_long_one_shows_on_the_terminal(capsys):
    clock = Clock()
    quick = progress.terminal("hashing model.gguf", clock)
    quick(5, 10)
    quick(10, 10)
    slow = progress.terminal("building layers", clock)
    clock.now += 2
    slow(15, 30)
    slow(30, 30)
    assert capsys.readouterr().err == "\rbuilding layers: 50%\rbuilding layers: 100%\n"
