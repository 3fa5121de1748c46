"""Issue 15, "cannot be knocked over": cross-site control, slowloris, and the rate limit's identity.

Two real `woolly serve` processes on loopback, each serving a tiny random model (cheap to load):
`open_server`, keyless and rate limited, with short read deadlines and a small connection cap;
`keyed_server`, with API keys and a rate limit. The rate limit counts per client address when no
valid key is sent, so each test talks from its own loopback address (127.0.0.N) to keep its own budget.
"""
from __future__ import annotations

import asyncio
import json
import os
import resource
import secrets
import select
import socket
import time

import httpx
import pytest
import websockets

from support.live_server import ALLOWED_ORIGIN, RunningServer, serving
from support.errors import assert_error
from tiny_models import write_tiny_model
from woolly.config import ServerSection
from woolly.http.guard import RequestGuard

TINY = "tiny"
OPEN_RATE = 12          # requests a minute per client, open server
KEYED_RATE = 8          # keyed server
HEADER_TIMEOUT = 2      # seconds, open server
BODY_TIMEOUT = 2
MAX_CONNECTIONS = 48
REPEAT_LIMIT = 10       # logging.repeat_limit's default
KEYS = ("hardening-key-one", "hardening-key-two", "hardening-key-three")


def tiny_config(models_dir, **server) -> dict:
    return {"models": {"directory": str(models_dir)},
            "inference": {"max_batch_size": 4, "max_sequence_length": 64},
            "server": {"max_body_bytes": 64 * 1024, **server},
            "logging": {"level": "info", "format": "text", "output": "stdout"}}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hardening_models")
    write_tiny_model(directory / f"{TINY}.gguf")
    return directory


@pytest.fixture(scope="module")
def open_server(tmp_path_factory, models_dir) -> RunningServer:
    config = tiny_config(models_dir, header_timeout=HEADER_TIMEOUT, body_timeout=BODY_TIMEOUT,
                         max_connections=MAX_CONNECTIONS, allowed_hosts=["woolly.lan"],
                         cors={"enabled": True, "origins": [ALLOWED_ORIGIN]})
    config["security"] = {"rate_limiting": {"enabled": True, "requests_per_minute": OPEN_RATE}}
    with serving(tmp_path_factory.mktemp("open_hardened"), config, model=TINY) as srv:
        yield srv


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory, models_dir) -> RunningServer:
    config = tiny_config(models_dir)
    config["security"] = {"api_key_required": True, "api_keys": list(KEYS),
                          "rate_limiting": {"enabled": True, "requests_per_minute": KEYED_RATE}}
    with serving(tmp_path_factory.mktemp("keyed_hardened"), config, model=TINY) as srv:
        yield srv


def client_from(server: RunningServer, address: str, **kw) -> httpx.Client:
    """An HTTP client whose connections come from `address`: its own rate-limit identity."""
    return httpx.Client(base_url=server.url, timeout=60, transport=httpx.HTTPTransport(local_address=address), **kw)


async def ws_connect(server: RunningServer, address: str, headers: dict | None = None):
    return await websockets.connect(server.ws_url, additional_headers=headers or {}, local_addr=(address, 0),
                                    open_timeout=30)


# -- cross-site control of a keyless server ------------------------------------------------------------------
@pytest.mark.parametrize("content_type, body", [
    ("text/plain", '{"text": "x"}'),
    ("application/x-www-form-urlencoded", '{"text": "x"}'),
    ("multipart/form-data; boundary=b", '--b\r\nContent-Disposition: form-data; name="text"\r\n\r\nx\r\n--b--\r\n'),
    (None, '{"text": "x"}'),
])
def test_a_body_that_is_not_declared_json_is_415(open_server, content_type, body):
    """What a page can send cross-site without a preflight (a form, text/plain) is refused."""
    with client_from(open_server, "127.0.0.2") as http:
        request = http.build_request("POST", "/api/tokenize", content=body.encode(),
                                     headers={"Content-Type": content_type} if content_type else {})
        assert ("content-type" in request.headers) == (content_type is not None)
        assert_error(http.send(request), 415, "INVALID_REQUEST", "application/json")


def test_json_with_a_charset_and_a_bodiless_post_still_pass(open_server):
    with client_from(open_server, "127.0.0.3") as http:
        r = http.post("/api/tokenize", content=b'{"text": "x"}',
                      headers={"Content-Type": "application/json; charset=utf-8"})
        assert r.status_code == 200 and r.json()["count"] > 0
        assert http.post("/api/tokenize").status_code == 400   # no body, no type: reaches validation, not 415


@pytest.mark.parametrize("host", ["evil.example", "evil.example:11434", "127.0.0.1.nip.io", "10.0.0.1"])
def test_dns_rebinding_host_is_refused_on_a_loopback_server(open_server, host):
    with client_from(open_server, "127.0.0.4") as http:
        assert_error(http.get("/v1/models", headers={"Host": host}), 400, "INVALID_REQUEST", "allowed_hosts")
        assert_error(http.post("/api/models/unload", headers={"Host": host}), 400, "INVALID_REQUEST")
        assert http.get("/health").json()["model"] == TINY
    assert ws_handshake_status(open_server, "127.0.0.4", host) == 403
    assert ws_handshake_status(open_server, "127.0.0.4", f"127.0.0.1:{open_server.port}") == 101


def ws_handshake_status(server: RunningServer, address: str, host: str) -> int:
    """The status of a WebSocket handshake sent with exactly this Host (a client library adds its own)."""
    request = (f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=30, source_address=(address, 0)) as s:
        s.sendall(request.encode())
        return int(s.recv(4096).split(b" ", 2)[1])


@pytest.mark.parametrize("host", ["localhost", "localhost:9", "127.0.0.1", "[::1]:11434", "woolly.lan:8080", None])
def test_loopback_names_and_allowed_hosts_pass(open_server, host):
    with client_from(open_server, "127.0.0.4") as http:
        r = http.get("/v1/models", headers={"Host": host} if host else {})
        assert r.status_code == 200, r.text


def test_any_host_on_all_interfaces_unless_configured():
    """Bound to 0.0.0.0 the LAN's names work; `allowed_hosts` narrows that to its list (and loopback)."""
    def passes(guard, host):
        return guard.check_host({"type": "http", "headers": [(b"host", host.encode())]}) is None

    lan = RequestGuard(ServerSection(host="0.0.0.0"))
    assert passes(lan, "192.168.1.20:11434") and passes(lan, "box.local")
    narrowed = RequestGuard(ServerSection(host="0.0.0.0", allowed_hosts=["box.local"]))
    assert passes(narrowed, "box.local:11434") and passes(narrowed, "localhost")
    assert not passes(narrowed, "evil.example")
    assert passes(RequestGuard(ServerSection(allowed_hosts=["*"])), "anything.example")


def test_a_foreign_origin_cannot_open_the_websocket_or_post(open_server):
    async def ws(origin):
        async with await ws_connect(open_server, "127.0.0.5", {"Origin": origin} if origin else None) as sock:
            return json.loads(await sock.recv())["type"]

    with pytest.raises(websockets.InvalidStatus) as e:
        asyncio.run(ws("http://evil.example"))
    assert e.value.response.status_code == 403
    with pytest.raises(websockets.InvalidStatus):
        asyncio.run(ws("null"))
    for allowed in (ALLOWED_ORIGIN, f"http://127.0.0.1:{open_server.port}", None):   # CORS's, the server's own, none
        assert asyncio.run(ws(allowed)) == "status"

    with client_from(open_server, "127.0.0.5") as http:
        # a bodiless POST is a "simple" cross-site request: the Origin check is what stops it
        assert_error(http.post("/api/models/unload", headers={"Origin": "http://evil.example"}),
                     403, "UNAUTHORIZED", "server.cors.origins")
        assert http.get("/health").json()["model"] == TINY
        r = http.post("/api/tokenize", json={"text": "x"}, headers={"Origin": ALLOWED_ORIGIN})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ALLOWED_ORIGIN


# -- slowloris ------------------------------------------------------------------------------------------------
def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_half_sent_requests_are_closed_and_do_not_starve_the_server(open_server):
    """300 connections: silent, half a head, or a head and part of a body. The server closes each within
    its deadline (or at once, past the connection cap), answers /health throughout, and logs little."""
    log_before = open_server.log_path.stat().st_size
    fds_before = open_fds(open_server.process.pid)
    head = b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    socks = []
    for i in range(300):
        s = socket.create_connection(("127.0.0.1", open_server.port), timeout=10, source_address=("127.0.0.6", 0))
        if i % 3 == 1:
            s.sendall(head + b"X-Slow: ")
        elif i % 3 == 2:
            s.sendall(head + b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\": ")
        socks.append(s)
    opened = time.monotonic()

    # /health answers while they hang: the cap closes the longest-idle connection to admit a new one
    with client_from(open_server, "127.0.0.7") as http:
        assert http.get("/health", timeout=5).status_code == 200
    assert time.monotonic() - opened < 5
    assert open_fds(open_server.process.pid) <= fds_before + MAX_CONNECTIONS + 8

    # every one is closed by the server within its deadline (plus slack for a busy machine)
    pending, answers = {s: b"" for s in socks}, []
    deadline = opened + max(HEADER_TIMEOUT, BODY_TIMEOUT) + 8
    while pending and time.monotonic() < deadline:
        readable, _, _ = select.select(list(pending), [], [], 0.5)
        for s in readable:
            try:
                data = s.recv(4096)
            except ConnectionResetError:
                data = b""
            if data:
                pending[s] += data
            else:
                answers.append(pending.pop(s))
                s.close()
    for s in pending:
        s.close()
    assert not pending, f"{len(pending)} of 300 half-sent connections still open after {deadline - opened:.0f}s"
    assert any(a.startswith(b"HTTP/1.1 408 ") for a in answers)   # the ones still held when their time ran out
    with client_from(open_server, "127.0.0.7") as http:
        assert http.get("/health", timeout=5).status_code == 200
    assert open_server.log_path.stat().st_size - log_before < 64 * 1024, open_server.log_tail(20)
    log = open_server.log_path.read_text(errors="replace")
    assert 0 < log.count("connection limit reached") <= REPEAT_LIMIT + 1   # 250 evictions, logged a few times


def test_running_out_of_descriptors_does_not_flood_the_log(open_server):
    """With the open-file limit reached, asyncio's accept loop fails thousands of times a second (Python 3.11
    logs each, with a traceback: 61 MB in 16 s before the throttle). The log grows by a bounded amount, and
    the server answers again once the half-open connections are closed."""
    pid = open_server.process.pid
    limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    log_before = open_server.log_path.stat().st_size
    socks = []
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (open_fds(pid) + 16, limits[1]))
    try:
        for _ in range(64):   # the kernel completes these handshakes; the server cannot accept them all
            socks.append(socket.create_connection(("127.0.0.1", open_server.port), timeout=10,
                                                  source_address=("127.0.0.9", 0)))
        time.sleep(3)
        grown = open_server.log_path.stat().st_size - log_before
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
        for s in socks:
            s.close()
    assert grown < 64 * 1024, open_server.log_tail(20)
    with client_from(open_server, "127.0.0.10") as http:
        assert http.get("/health", timeout=HEADER_TIMEOUT + 10).status_code == 200


def test_a_body_must_keep_flowing(open_server):
    """A trickle within the body deadline is read to the end; a body that stops gets 408."""
    body = json.dumps({"text": "slow but steady"}).encode()
    head = (f"POST /api/tokenize HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", open_server.port), timeout=30,
                                  source_address=("127.0.0.8", 0)) as s:
        s.sendall(head)
        for i in range(0, len(body), 3):   # about 3 s in all, never BODY_TIMEOUT between two pieces
            time.sleep(BODY_TIMEOUT / 4)
            s.sendall(body[i:i + 3])
        assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
    with socket.create_connection(("127.0.0.1", open_server.port), timeout=30,
                                  source_address=("127.0.0.8", 0)) as s:
        s.sendall(head + body[:5])
        t0 = time.monotonic()
        answer = s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"INVALID_REQUEST" in answer, answer
        assert BODY_TIMEOUT - 0.5 < time.monotonic() - t0 < BODY_TIMEOUT + 8


# -- one rate-limit identity: key when valid, else the address; WebSocket messages count ---------------------
def test_random_bearers_do_not_escape_the_limit_of_a_keyless_server(open_server):
    with client_from(open_server, "127.0.0.20") as http:
        statuses = [http.post("/api/tokenize", json={"text": "x"},
                              headers={"Authorization": f"Bearer {secrets.token_hex(8)}"}).status_code
                    for _ in range(OPEN_RATE + 1)]
    assert statuses == [200] * OPEN_RATE + [429], statuses


def ws_generate_until_limited(server: RunningServer, address: str, n: int, headers: dict | None = None) -> dict:
    """Send n generate messages on one socket; the last one's error, and that the socket still answers."""
    async def run():
        async with await ws_connect(server, address, headers) as sock:
            assert json.loads(await sock.recv())["type"] == "status"
            for i in range(n):
                await sock.send(json.dumps({"type": "generate", "id": f"r{i}", "prompt": "Hi",
                                            "config": {"max_tokens": 1}}))
            last, finished = None, set()
            while len(finished) < n:
                event = json.loads(await asyncio.wait_for(sock.recv(), 60))
                if event["type"] in ("complete", "error"):
                    finished.add(event["request_id"])
                    if event["request_id"] == f"r{n - 1}":
                        last = event
            await sock.send(json.dumps({"type": "status"}))   # the socket stays open
            assert json.loads(await asyncio.wait_for(sock.recv(), 30))["type"] == "status"
            return last

    return asyncio.run(run())


def test_websocket_generations_count_against_the_same_limit(open_server):
    last = ws_generate_until_limited(open_server, "127.0.0.21", OPEN_RATE + 1)
    assert last["type"] == "error" and last["code"] == "RATE_LIMITED", last
    with client_from(open_server, "127.0.0.21") as http:   # the same client's HTTP budget is spent too
        assert_error(http.post("/api/tokenize", json={"text": "x"}), 429, "RATE_LIMITED")


def test_several_authorization_headers_are_400(keyed_server):
    with client_from(keyed_server, "127.0.0.30") as http:
        for pair in ((f"Bearer {secrets.token_hex(8)}", f"Bearer {KEYS[0]}"), (f"Bearer {KEYS[0]}",) * 2):
            r = http.post("/api/tokenize", json={"text": "x"}, headers=[("Authorization", v) for v in pair])
            assert_error(r, 400, "INVALID_REQUEST", "Authorization")


def test_wrong_keys_are_throttled_per_address_and_a_valid_key_keeps_its_budget(keyed_server):
    with client_from(keyed_server, "127.0.0.31") as http:
        statuses = [http.post("/api/tokenize", json={"text": "x"},
                              headers={"Authorization": f"Bearer {secrets.token_hex(8)}"}).status_code
                    for _ in range(KEYED_RATE + 1)]
        assert statuses == [401] * KEYED_RATE + [429], statuses
        r = http.get("/v1/models")   # no key at all: the same address, over its budget
        assert_error(r, 429, "RATE_LIMITED")
        assert 0 < int(r.headers["retry-after"]) <= 60
        ok = http.post("/api/tokenize", json={"text": "x"}, headers={"Authorization": f"Bearer {KEYS[0]}"})
        assert ok.status_code == 200


def test_websocket_generations_count_against_the_key(keyed_server):
    key = {"Authorization": f"Bearer {KEYS[1]}"}
    last = ws_generate_until_limited(keyed_server, "127.0.0.32", KEYED_RATE + 1, key)
    assert last["type"] == "error" and last["code"] == "RATE_LIMITED", last
    with client_from(keyed_server, "127.0.0.33", headers=key) as http:   # the key's budget, from any address
        assert_error(http.post("/api/tokenize", json={"text": "x"}), 429, "RATE_LIMITED")
