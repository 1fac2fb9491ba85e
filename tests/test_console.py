"""The fleet console (`edgectl serve`) in a real browser (Debian's chromium, driven by
Playwright) against a real Mosquitto and three real sidecars with fleet on: the overview shows
their presence, a killed one turns offline within its Last Will delay, charts gain points as
telemetry arrives, a push from the page is applied (and a bad one shows the gateway's reasons),
the page needs nothing beyond loopback, and the console refuses who it should."""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from console_harness import CHROMIUM, KEEPALIVE_S, ConsoleProcess, is_loopback_url, kill, start_sidecar, stop
from gateway_harness import wait_for
from mqtt_harness import make_tls_files

from proxy.auth.keys import hash_key
from proxy.fleet.signing import generate_keypair

GATEWAYS = {"gw-a": ["site"], "gw-b": ["site"], "gw-c": ["lab"]}
UI_TIMEOUT_MS = 20_000
# The Last Will comes 1.5 keepalives after the last packet; the page polls every 0.5 s.
WILL_DELAY_S = 1.5 * KEEPALIVE_S
SCREENSHOTS = os.environ.get("EDGE_CONSOLE_SCREENSHOTS")  # a directory: save the docs' screenshots there


@pytest.fixture(scope="module")
def fleet(broker, tmp_path_factory):
    """Three sidecars trusting the controller key, and the console holding it."""
    root = tmp_path_factory.mktemp("console")
    generate_keypair(root / "ctl.key", root / "ctl.pub")
    sidecars = {gw: start_sidecar(root / gw, broker.url, gw, groups, root / "ctl.pub") for gw, groups in GATEWAYS.items()}
    console = ConsoleProcess(root / "console.log", broker.url, "--key", str(root / "ctl.key"))
    try:
        wait_for(lambda: _get(console.url, "/api/v1/gateways")[1]["counts"]["online"] == len(GATEWAYS), 60, "the sidecars online")
        yield {"root": root, "sidecars": sidecars, "console": console, "broker": broker}
    finally:
        console.stop()
        for proc in sidecars.values():
            stop(proc)


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A page whose network stops at loopback: anything else is aborted (and listed)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    blocked: list[str] = []

    def gate(route):
        if is_loopback_url(route.request.url):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    context.route("**/*", gate)
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    page.blocked = blocked
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    yield page
    context.close()


def until(page, predicate, timeout_s: float = UI_TIMEOUT_MS / 1000) -> None:
    """Poll a condition on the page from here (the console's Content-Security-Policy forbids
    the string evaluation page.wait_for_function uses)."""
    end = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < end, "timed out waiting for the page"
        page.wait_for_timeout(100)


def row_state(page, gw: str):
    return page.locator(f'tr[data-gateway="{gw}"] td[data-state]')


def test_overview_lists_the_gateways_with_presence_and_loads_with_the_network_blocked(fleet, page):
    loaded: list[str] = []
    page.on("requestfinished", lambda request: loaded.append(request.url))
    page.goto(f"{fleet['console'].url}/?poll=500")
    for gw in GATEWAYS:
        page.locator(f'tr[data-gateway="{gw}"] td[data-state="online"]').wait_for()
    assert page.locator('[data-count="total"] b').inner_text() == "3"
    assert page.locator('[data-count="online"] b').inner_text() == "3"
    row = page.locator('tr[data-gateway="gw-a"]')
    assert "site" in row.inner_text() and "0.1.0" in row.inner_text()  # groups, version
    page.locator("#filter").fill("lab")  # filtering keeps only gw-c
    page.locator('tr[data-gateway="gw-a"]').wait_for(state="detached")
    assert page.locator("#gateways tbody tr").count() == 1
    page.locator("#filter").fill("")
    page.get_by_role("button", name="Gateway").click()  # sort by id, descending
    until(page, lambda: page.locator("#gateways tbody tr").first.get_attribute("data-gateway") == "gw-c")
    # Everything the page loaded came from the console; nothing it asked for was blocked.
    assert loaded and all(is_loopback_url(u) for u in loaded)
    assert any(u.endswith("/static/overview.js") for u in loaded) and any(u.endswith("/static/console.css") for u in loaded)
    assert page.blocked == [] and page.errors == []
    # The page may not even ask (its Content-Security-Policy allows its own origin only) ...
    assert page.evaluate("fetch('http://192.0.2.1/x').then(() => 'loaded', () => 'failed')") == "failed"
    # ... and the block is real: a page off loopback does not load.
    other = page.context.new_page()
    with pytest.raises(Exception, match="ERR_FAILED"):
        other.goto("http://192.0.2.1/x")
    assert page.blocked == ["http://192.0.2.1/x"]
    if SCREENSHOTS:
        page.screenshot(path=str(Path(SCREENSHOTS) / "console-overview.png"), full_page=True)


def test_a_chart_gains_points_as_telemetry_arrives(fleet, page):
    page.goto(f"{fleet['console'].url}/gateway/gw-a?poll=500")
    cpu = page.locator('figure[data-series="cpu"]')
    until(page, lambda: int(cpu.get_attribute("data-points")) >= 2)
    before = int(cpu.get_attribute("data-points"))
    until(page, lambda: int(cpu.get_attribute("data-points")) >= before + 3)
    assert page.locator('figure[data-series="cpu"] svg path').count() == 1
    assert "latest" in page.locator('figure[data-series="cpu"] svg').get_attribute("aria-label")
    assert page.locator('figure[data-series="mem"]').get_attribute("data-points") != "0"
    assert page.errors == [] and page.blocked == []


def test_a_push_from_the_page_is_applied_and_the_reported_version_shows(fleet, page):
    page.goto(f"{fleet['console'].url}/gateway/gw-a?poll=500")
    page.locator("#target option[value='gw-a']").wait_for(state="attached")
    page.get_by_role("textbox", name="Configuration").fill("[proxy]\nrate_limit_requests_per_min = 120\n")
    page.get_by_role("button", name="Validate").click()
    page.locator('#push-result[data-outcome="valid"]').wait_for()
    page.get_by_role("button", name="Push").click()
    page.locator('#push-result[data-outcome="applied"]').wait_for()
    version = page.locator("#push-result").inner_text().split("version ", 1)[1].split(" ", 1)[0]
    # The tables below refresh on the page's own poll: wait for it rather than read them at once.
    until(page, lambda: page.locator("#pushes tbody tr").first.get_attribute("data-version") == version)
    key_row = page.locator('#keys tr[data-key="proxy.rate_limit_requests_per_min"]')
    key_row.wait_for()
    until(page, lambda: "applied" in key_row.inner_text() or "in force" in key_row.inner_text())
    until(page, lambda: f"gw-a: {version} / {version}" in page.locator("#summary").inner_text())  # desired / reported
    until(page, lambda: "@" in page.locator("#pushes tbody tr td:nth-child(4)").first.inner_text())
    # To a group: every member takes it; the page follows this gateway's report.
    page.get_by_label("Target").select_option("group:site")
    page.get_by_role("textbox", name="Configuration").fill("[proxy]\ncache_ttl_s = 300\n")
    page.get_by_role("button", name="Push").click()
    page.locator('#push-result[data-outcome="applied"]').wait_for()
    group_version = int(page.locator("#push-result").inner_text().split("version ", 1)[1].split(" ", 1)[0])
    wait_for(lambda: _get(fleet["console"].url, "/api/v1/gateways/gw-b")[1]["config"]["group:site"]
               == {"desired": group_version, "applied": group_version}, 20, "gw-b to report the group's push")
    assert page.errors == [] and page.blocked == []
    if SCREENSHOTS:
        until(page, lambda: int(page.locator('figure[data-series="cpu"]').get_attribute("data-points")) >= 20)
        page.screenshot(path=str(Path(SCREENSHOTS) / "console-gateway.png"), full_page=True)


def test_an_invalid_push_shows_the_gateways_reasons(fleet, page):
    page.goto(f"{fleet['console'].url}/gateway/gw-b?poll=500")
    page.locator("#target option[value='group:site']").wait_for(state="attached")
    page.get_by_role("textbox", name="Configuration").fill('[proxy]\nrate_limit_requests_per_min = -1\ncolour = "red"\n')
    page.get_by_role("button", name="Validate").click()  # the console applies the gateways' rules first
    page.locator('#push-result[data-outcome="invalid"]').wait_for()
    assert page.locator('#push-result li[data-key="proxy.colour"]').inner_text() == "proxy.colour: unknown key"
    page.get_by_role("button", name="Push").click()  # refused by the console without force
    page.locator('#push-result[data-outcome="refused"]').wait_for()
    page.get_by_label("Push even with problems").check()
    page.get_by_role("button", name="Push").click()  # the gateway decides, and says why not
    page.locator('#push-result[data-outcome="rejected"]').wait_for()
    reasons = page.locator("#push-result li")
    assert sorted(reasons.all_inner_texts()) == ["proxy.colour: unknown key", "proxy.rate_limit_requests_per_min: must be >= 0, got -1"]
    page.locator('#keys tr[data-key="proxy.colour"]').wait_for()
    assert "rejected" in page.locator('#keys tr[data-key="proxy.colour"]').inner_text()
    page.goto(f"{fleet['console'].url}/?poll=500")
    page.locator('tr[data-gateway="gw-b"] .flags').get_by_text("rejecting config").wait_for()


def test_killing_a_gateway_turns_it_offline_within_its_last_will_delay(fleet, page):
    page.goto(f"{fleet['console'].url}/?poll=500")
    page.locator('tr[data-gateway="gw-c"] td[data-state="online"]').wait_for()
    kill(fleet["sidecars"]["gw-c"])
    killed = time.monotonic()
    # The broker's keepalive check runs on its own clock: allow one more keepalive, and the page's poll.
    page.locator('tr[data-gateway="gw-c"] td[data-state="offline"]').wait_for(timeout=(WILL_DELAY_S + KEEPALIVE_S + 2) * 1000)
    assert time.monotonic() - killed <= WILL_DELAY_S + KEEPALIVE_S + 2
    assert "connection lost" in row_state(page, "gw-c").inner_text()
    assert page.locator('[data-count="offline"] b').inner_text() == "1"
    assert "offline" in page.locator('tr[data-gateway="gw-c"] .flags').inner_text()


def test_without_a_key_the_console_is_read_only_and_says_so(fleet, page):
    console = ConsoleProcess(fleet["root"] / "console-ro.log", fleet["broker"].url)
    try:
        page.goto(f"{console.url}/gateway/gw-a")
        page.locator("#read-only").wait_for()
        assert page.get_by_role("button", name="Push").is_disabled()
        assert "read-only" in page.locator("#session").inner_text()
        status, body = _post(console.url, "/api/v1/push", {"target": "gw-a", "toml": "[proxy]\nrate_limit_requests_per_min = 1\n"},
                             csrf=True)
        assert status == 403 and body["error"]["code"] == "read_only"
    finally:
        console.stop()


def test_requests_are_refused_without_credentials_off_loopback_and_cross_site(fleet, tmp_path):
    url = fleet["console"].url
    # A loopback console answers a loopback Host only (no DNS rebinding) ...
    status, body = _get(url, "/api/v1/gateways", headers={"Host": "console.example.com"})
    assert status == 403 and body["error"]["code"] == "not_loopback"
    # ... and takes a POST only with its CSRF token, from its own origin.
    assert _post(url, "/api/v1/validate", {"target": "gw-a", "toml": ""})[0] == 403
    assert _post(url, "/api/v1/validate", {"target": "gw-a", "toml": ""}, csrf=True, headers={"Origin": "http://evil.example"})[0] == 403
    status, body = _post(url, "/api/v1/validate", {"target": "gw-a", "toml": "[proxy]\nport = 80\n[mqtt]\nurl = 'x'\n"}, csrf=True)
    assert status == 200 and body["reasons"] == {"mqtt": "broker settings are set locally (a wrong push would cut the gateway off)"}

    # Off loopback: no start without credentials, nor without TLS.
    done = subprocess.run([sys.executable, "-m", "edgectl", "--broker", fleet["broker"].url, "serve", "--host", "0.0.0.0"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert done.returncode == 2 and "tokens: required when listening on 0.0.0.0 (not loopback)" in done.stderr
    # With a token, a user and TLS: a remote request without credentials gets 401, with them 200.
    tls = make_tls_files(tmp_path)
    config = tmp_path / "console.toml"
    config.write_text(f'[console]\nhost = "0.0.0.0"\ntokens = ["{hash_key("s3cret-token")}"]\nusers = {{ ops = "{hash_key("pw")}" }}\n'
                      f'tls_cert = "{tls["cert"]}"\ntls_key = "{tls["key"]}"\n')
    console = ConsoleProcess(tmp_path / "console-tls.log", fleet["broker"].url, config=config)
    try:
        port = int(console.url.rsplit(":", 1)[1])
        context = ssl.create_default_context(cafile=str(tls["ca"]))
        context.check_hostname = False  # reached by this host's own address, which the test certificate does not name
        remote = f"https://{_own_address()}:{port}"
        status, body = _get(remote, "/api/v1/gateways", context=context)
        assert status == 401 and body["error"]["code"] == "unauthorized"
        assert _get(remote, "/api/v1/gateways", context=context, headers={"Authorization": "Bearer wrong"})[0] == 401
        status, body = _get(remote, "/api/v1/gateways", context=context, headers={"Authorization": "Bearer s3cret-token"})
        assert status == 200 and body["counts"]["total"] >= 2
        basic = base64.b64encode(b"ops:pw").decode()
        status, body = _get(remote, "/api/v1/session", context=context, headers={"Authorization": f"Basic {basic}"})
        assert status == 200 and body["user"] == "ops" and body["read_only"] is True
    finally:
        console.stop()


def _own_address() -> str:
    """This host's address on its default route (a non-loopback peer for the console), else loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def _get(base: str, path: str, headers: dict | None = None, context=None) -> tuple[int, dict]:
    request = urllib.request.Request(base + path, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=20, context=context) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _post(base: str, path: str, body: dict, *, csrf: bool = False, headers: dict | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **(headers or {})}
    if csrf:  # as the page does: the session cookie and the token that goes with it
        with urllib.request.urlopen(base + "/api/v1/session", timeout=20) as r:
            session = json.loads(r.read())
            cookie = r.headers["Set-Cookie"].split(";", 1)[0]
        headers.update({"Cookie": cookie, session["csrf_header"]: session["csrf"]})
    request = urllib.request.Request(base + path, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=20) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
