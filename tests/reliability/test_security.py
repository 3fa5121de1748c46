"""reliability.md "Security": default bind, constant-time keys, no path in any error body.

Covered elsewhere and counted in the summary: 401 for missing/wrong keys and a public /health,
429 with Retry-After per key, CORS for the configured origin only (tests/http/test_security.py),
the Jinja sandbox against the escape payloads (tests/test_chat_template.py,
tests/test_malformed_gguf.py).
"""
from __future__ import annotations

import ast
import asyncio
import inspect
import socket
import textwrap

import pytest

from support import leak_recorder
from woolly.config import load_config

KEYS = ["first-key-0123456789", "second-key-abcdefghij"]


def listening_addresses(port: int) -> list[str]:
    """Local addresses with a LISTEN socket on `port`, from /proc/net/tcp and tcp6."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            addr, p = fields[1].split(":")
            if int(p, 16) == port and fields[3] == "0A":
                if len(addr) == 8:
                    found.append(socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr)[::-1]))
                else:
                    raw = b"".join(bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, 32, 8))
                    found.append(socket.inet_ntop(socket.AF_INET6, raw))
    return found


@pytest.mark.real
def test_the_server_binds_loopback_by_default(rserver):
    """`woolly serve` ran without --host and with no server.host: only 127.0.0.1 listens."""
    assert listening_addresses(rserver.port) == ["127.0.0.1"]
    with pytest.raises(ConnectionRefusedError):   # another loopback address of this machine
        socket.create_connection(("127.0.0.2", rserver.port), timeout=5).close()


def test_all_interfaces_only_when_configured(tmp_path):
    assert load_config(None, env={}).server.host == "127.0.0.1"
    cfg = tmp_path / "woolly.config.yaml"
    cfg.write_text("server:\n  host: 0.0.0.0\n")
    assert load_config(cfg, env={}).server.host == "0.0.0.0"
    assert load_config(None, env={"WOOLLY_HOST": "0.0.0.0"}).server.host == "0.0.0.0"


# -- API keys, in-process: the middleware called as ASGI, hmac.compare_digest spied on -----------------------
def call(middleware, path: str, authorization: bytes | None) -> tuple[int, bool]:
    reached = []

    async def app(scope, receive, send):
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware.app = app
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    headers = [(b"host", b"x")] + ([(b"authorization", authorization)] if authorization is not None else [])
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers, "query_string": b"",
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2), "scheme": "http", "root_path": "",
             "http_version": "1.1", "app": None, "state": {}}
    asyncio.run(middleware(scope, receive, send))
    return sent[0]["status"], bool(reached)


@pytest.fixture
def middleware():
    from woolly.http.app import AccessLogAndAuth
    from woolly.http.metrics import Metrics

    return AccessLogAndAuth(None, KEYS, True, Metrics(pool=type("P", (), {"loaded": lambda self: []})()))


@pytest.mark.parametrize("auth", [None, b"", b"Bearer", b"Bearer ", b"Bearer wrong", b"Basic " + KEYS[0].encode(),
                                  KEYS[0].encode(), b"Bearer " + KEYS[0][:-1].encode(),
                                  b"Bearer " + KEYS[0].encode() + b"x", b"Bearer " + KEYS[0].upper().encode()])
def test_missing_or_wrong_key_is_401_and_never_reaches_the_app(middleware, auth):
    assert call(middleware, "/api/generate", auth) == (401, False)


@pytest.mark.parametrize("key", KEYS)
def test_each_configured_key_passes_and_health_is_public(middleware, key):
    assert call(middleware, "/api/generate", b"Bearer " + key.encode()) == (200, True)
    assert call(middleware, "/api/generate", b"bearer " + key.encode()) == (200, True)
    assert call(middleware, "/health", None) == (200, True)


def test_keys_are_compared_with_hmac_compare_digest_against_every_key(middleware, monkeypatch):
    import woolly.http.app as app_module

    calls = []
    real = app_module.hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(app_module.hmac, "compare_digest", spy)
    for auth, expected in ((b"Bearer wrong", 401), (b"Bearer " + KEYS[0].encode(), 200),
                           (b"Bearer " + KEYS[1].encode(), 200), (b"Bearer " + b"x" * 500, 401)):
        calls.clear()
        assert call(middleware, "/api/tokenize", auth)[0] == expected
        # every key is compared, whichever matches, on equal-length digests: no early exit, no length leak
        assert len(calls) == len(KEYS) and all(a == b for a, b in calls), calls


def test_the_key_check_has_no_ordinary_comparison():
    """No `==`, `!=`, `in` or startswith between the given key and a configured one."""
    from woolly.http.app import AccessLogAndAuth

    tree = ast.parse(textwrap.dedent(inspect.getsource(AccessLogAndAuth._authorized)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | \
                    {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
            assert not names & {"given", "key", "keys"}, ast.unparse(node)
    assert "compare_digest" in ast.unparse(tree)


# -- no file system path in any error body the session saw ---------------------------------------------------
@pytest.mark.real
@pytest.mark.runs_last
def test_no_error_body_names_a_file_system_path():
    """Every error body recorded this session (httpx clients of every test, schemathesis' calls) is
    scanned for /root, /home, /tmp and .cache, unless the request itself sent that text."""
    assert leak_recorder.seen, "no error body was recorded"
    assert not leak_recorder.leaks(), leak_recorder.leaks()[:5]
