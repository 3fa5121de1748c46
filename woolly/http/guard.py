"""What a browser on another site must not do to a server, keyless or not: checks on a request's scope.

- Host (DNS rebinding): a server bound to loopback answers only Host localhost, 127.0.0.1,
  [::1] (any port) and `server.allowed_hosts`; bound elsewhere, any Host unless that list is set.
- Origin: a WebSocket or a state-changing request (POST...) from a page of another origin is
  refused unless CORS allows that origin; requests without Origin (programs, not browsers) pass.
- Content-Type: a request body must be `application/json` (parameters such as charset allowed):
  a form or text/plain body is what a page can send cross-site without a CORS preflight.
- One Authorization header at most.

Each check returns None when the request passes, else (status, message).
"""
from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from litestar.types import Scope

from woolly.config import ServerSection

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def split_host(value: str, default_port: int = 80) -> tuple[str, int | None]:
    """"Host[:port]" (IPv6 in brackets) -> (lower-case host, port); port None when not a number."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
        host = host if sep else value
    if not port:
        return host.rstrip("."), default_port
    return host.rstrip("."), int(port) if port.isdigit() else None


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RequestGuard:
    """The checks above for one server configuration."""

    def __init__(self, server: ServerSection):
        allowed = {split_host(h)[0] for h in server.allowed_hosts}
        self.any_host = "*" in server.allowed_hosts or (not allowed and not is_loopback(server.host))
        self.hosts = LOOPBACK_NAMES | allowed | ({server.host.lower()} if is_loopback(server.host) else set())
        cors = server.cors
        self.origins = set(cors.origins) if cors.enabled else set()

    @staticmethod
    def _header(scope: Scope, name: bytes) -> list[bytes]:
        return [v for k, v in scope.get("headers") or [] if k == name]

    def check_host(self, scope: Scope) -> tuple[int, str] | None:
        values = self._header(scope, b"host")
        if len(values) > 1:
            return 400, "more than one Host header"
        if not values or self.any_host:
            return None
        host = split_host(values[0].decode("latin-1"))[0]
        if host in self.hosts:
            return None
        return 400, (f"Host {host[:100]!r} is not served here: add it to server.allowed_hosts "
                     f"(WOOLLY_ALLOWED_HOSTS) to reach this server by that name")

    def check_origin(self, scope: Scope) -> tuple[int, str] | None:
        if scope["type"] != "websocket" and scope.get("method") not in UNSAFE_METHODS:
            return None
        values = self._header(scope, b"origin")
        if not values:
            return None
        origin = values[0].decode("latin-1").strip()
        if origin in self.origins or "*" in self.origins or self._same_host(scope, origin):
            return None
        return 403, (f"requests from the web page origin {origin[:100]!r} are refused: "
                     f"add it to server.cors.origins to allow it")

    def _same_host(self, scope: Scope, origin: str) -> bool:
        """The Origin names the host (and port) the request was sent to: the server's own pages."""
        hosts = self._header(scope, b"host")
        if not hosts:
            return False
        try:
            parts = urlsplit(origin)
            origin_port = parts.port or DEFAULT_PORTS.get(parts.scheme)
        except ValueError:
            return False
        default = DEFAULT_PORTS["https" if scope.get("scheme") in ("https", "wss") else "http"]
        return (parts.hostname or "", origin_port) == split_host(hosts[0].decode("latin-1"), default)

    def check_content_type(self, scope: Scope) -> tuple[int, str] | None:
        if scope["type"] != "http" or scope.get("method") not in UNSAFE_METHODS:
            return None
        types = self._header(scope, b"content-type")
        if types:
            media = types[0].decode("latin-1").split(";", 1)[0].strip().lower()
            if media == "application/json":
                return None
            return 415, f"the request body must be JSON (Content-Type: application/json), not {media[:60]!r}"
        length = self._header(scope, b"content-length")
        if self._header(scope, b"transfer-encoding") or (length and length[0].strip() not in (b"", b"0")):
            return 415, "the request body must be JSON: send Content-Type: application/json"
        return None   # no body, no type: a bodiless POST such as /api/models/unload

    def check_authorization(self, scope: Scope) -> tuple[int, str] | None:
        if len(self._header(scope, b"authorization")) > 1:
            return 400, "send one Authorization header, not several"
        return None

    def check(self, scope: Scope) -> tuple[int, str] | None:
        """Every check in order; the first refusal."""
        for check in (self.check_host, self.check_authorization, self.check_origin, self.check_content_type):
            refused = check(scope)
            if refused:
                return refused
        return None
