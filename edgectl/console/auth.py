"""Who may use the console, and CSRF-safe writes.

Access (the sidecar's rule, config.py): with no credentials configured the console listens on
loopback only, and takes requests only from a loopback peer naming a loopback Host (a web page
elsewhere cannot reach it through DNS rebinding). With credentials configured, every request
carries one: `Authorization: Bearer TOKEN` (scripts) or basic auth (browsers); digests are
compared in constant time, as the sidecar compares API keys.

Writes (POST): a browser sends basic auth and cookies by itself, so a page on another site
could make it post. A POST is taken only with `X-Console-Csrf` equal to the token the session
endpoint gives for this session's cookie (a cross-site page can neither read it nor set a
custom header without a CORS preflight, which the console never grants) and, when the browser
says where the request comes from (Origin, Sec-Fetch-Site), from this very origin. Bearer
tokens are never sent by a browser on its own, so requests carrying one need no CSRF token."""

from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import hmac
import ipaddress
import json
import secrets
import socket
from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy.auth.keys import KeyChecker

from .config import ConsoleConfig

SESSION_COOKIE = "console_session"
CSRF_HEADER = "X-Console-Csrf"
# Who made the request (set by the middleware); RequestKey where this aiohttp has it.
USER = web.RequestKey("console_user", str) if hasattr(web, "RequestKey") else "console_user"
_REALM = {"WWW-Authenticate": 'Basic realm="edgectl console", charset="UTF-8"'}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


_ERRORS: dict[int, type[web.HTTPException]] = {c.status_code: c for c in (
    web.HTTPBadRequest, web.HTTPUnauthorized, web.HTTPForbidden, web.HTTPNotFound, web.HTTPRequestEntityTooLarge,
    web.HTTPServiceUnavailable)}


def error(status: int, message: str, code: str, headers: dict[str, str] | None = None, **extra: object) -> web.HTTPException:
    """An HTTP error in the API's JSON error form: {"error": {"message", "code", ...}}."""
    body = json.dumps({"error": {"message": message, "code": code, **extra}})
    return _ERRORS[status](text=body, content_type="application/json", headers=headers)


class Access:
    def __init__(self, config: ConsoleConfig) -> None:
        self.tokens = KeyChecker(config.tokens)
        self.users = {name: bytes.fromhex(digest) for name, digest in config.users.items()}
        self.required = bool(config.tokens or config.users)
        self._secret = secrets.token_bytes(32)  # CSRF tokens are good for this process's life
        self._local_user = f"{_login()}@{socket.gethostname()}"

    def csrf_token(self, session: str) -> str:
        return hmac.new(self._secret, session.encode(), hashlib.sha256).hexdigest()

    def authenticate(self, request: web.Request) -> tuple[str, bool]:
        """(who, by bearer token) for this request; raises the 401/403 error otherwise."""
        header = request.headers.get("Authorization", "")
        if not self.required:
            if not _is_loopback(request.remote) or not _loopback_host(request.host):
                raise error(403, "this console serves loopback only (configure credentials and TLS to serve others)", "not_loopback")
            return self._local_user, False
        scheme, _, credential = header.partition(" ")
        credential = credential.strip()
        if scheme.lower() == "bearer" and credential and self.tokens.enabled:
            try:
                return f"token:{self.tokens.check_key(credential)[:8]}", True
            except Exception:
                pass
        elif scheme.lower() == "basic" and credential:
            user = self._basic(credential)
            if user is not None:
                return user, False
        raise error(401, "credentials required (basic auth, or Authorization: Bearer TOKEN)", "unauthorized", _REALM)

    def _basic(self, credential: str) -> str | None:
        try:
            user, _, password = base64.b64decode(credential, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, ValueError):
            return None
        digest = hashlib.sha256(password.encode("utf-8", "surrogatepass")).digest()
        stored = self.users.get(user, b"\0" * 32)  # an unknown user costs the same comparison
        return user if hmac.compare_digest(stored, digest) and user in self.users else None

    def check_csrf(self, request: web.Request) -> None:
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            raise error(403, f"cross-origin request refused (Origin {origin})", "csrf")
        if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
            raise error(403, "cross-site request refused", "csrf")
        session = request.cookies.get(SESSION_COOKIE, "")
        sent = request.headers.get(CSRF_HEADER, "")
        if not session or not hmac.compare_digest(sent, self.csrf_token(session)):
            raise error(403, f"missing or wrong {CSRF_HEADER} header (GET /api/v1/session gives it)", "csrf")


def middleware(access: Access) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        who, bearer = access.authenticate(request)
        if request.method not in ("GET", "HEAD") and not bearer:
            access.check_csrf(request)
        request[USER] = who
        response = await handler(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    return guard


# Everything the page loads comes from the console itself: a script or font from elsewhere would not load.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def _is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def _loopback_host(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]")
    return name == "localhost" or _is_loopback(name)


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
