"""API keys, rate limiting, CORS, and unloading/loading the model, on a server configured for them.

Each concern uses its own key, since the rate limit counts per key. The unload test runs
last in this module: it leaves the model unloaded until it loads it back.
"""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import websockets

from support.live_server import ALLOWED_ORIGIN, BROKEN_MODEL, KEYS, MODEL, RATE_PER_MINUTE
from support.errors import assert_error
from woolly.client import WoollyClient
from woolly.errors import ModelNotLoaded, RateLimited, Unauthorized

pytestmark = pytest.mark.real

AUTH_KEY, CORS_KEY, RATE_KEY, ADMIN_KEY = KEYS


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def secure(secure_server):
    with httpx.Client(base_url=secure_server.url, timeout=120) as client:
        yield client


def test_health_is_public(secure):
    r = secure.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


BAD_KEYS = [{}, bearer("wrong-key"), {"Authorization": AUTH_KEY}, {"Authorization": "Basic " + AUTH_KEY},
            {"Authorization": "Bearer"}, bearer(AUTH_KEY + "x"), bearer(AUTH_KEY[:-1])]


@pytest.mark.parametrize("headers", BAD_KEYS)
def test_missing_or_wrong_key_is_401(secure_server, headers):
    # each case from its own loopback address: a refused key counts against its address's rate limit
    address = f"127.0.1.{BAD_KEYS.index(headers) + 1}"
    with httpx.Client(base_url=secure_server.url, timeout=120,
                      transport=httpx.HTTPTransport(local_address=address)) as secure:
        for method, path in (("POST", "/api/tokenize"), ("GET", "/api/models"), ("GET", "/v1/models"),
                             ("GET", "/metrics")):
            r = secure.request(method, path, json={"text": "x"} if method == "POST" else None, headers=headers)
            assert_error(r, 401, "UNAUTHORIZED")
            assert r.headers["www-authenticate"] == "Bearer"


def test_every_configured_key_works(secure):
    for key in (AUTH_KEY, ADMIN_KEY):
        r = secure.post("/api/tokenize", json={"text": "hello"}, headers=bearer(key))
        assert r.status_code == 200 and r.json()["count"] > 0


def test_websocket_needs_a_key(secure_server):
    async def connect(headers):
        async with websockets.connect(secure_server.ws_url, additional_headers=headers) as ws:
            return await ws.recv()

    with pytest.raises(websockets.InvalidStatus) as e:
        asyncio.run(connect({}))
    assert e.value.response.status_code in (401, 403)
    assert '"status"' in asyncio.run(connect(bearer(AUTH_KEY)))


def test_client_with_and_without_key(secure_server):
    with WoollyClient(secure_server.url) as anonymous:
        with pytest.raises(Unauthorized) as e:
            anonymous.tokenize("x")
        assert e.value.status == 401
    with WoollyClient(secure_server.url, api_key=AUTH_KEY) as client:
        assert client.detokenize(client.tokenize("keyed")) == "keyed"


def test_rate_limit_per_key_with_retry_after(secure):
    """RATE_PER_MINUTE comes from WOOLLY_RATE_LIMIT; the config file allows ten times more."""
    statuses = []
    for _ in range(RATE_PER_MINUTE + 1):
        r = secure.post("/api/tokenize", json={"text": "x"}, headers=bearer(RATE_KEY))
        statuses.append(r.status_code)
        if r.status_code == 429:
            break
    assert statuses[:RATE_PER_MINUTE] == [200] * RATE_PER_MINUTE, statuses
    assert statuses[-1] == 429
    assert_error(r, 429, "RATE_LIMITED")
    assert 0 < int(r.headers["retry-after"]) <= 60
    with WoollyClient(str(secure.base_url), api_key=RATE_KEY) as client:
        with pytest.raises(RateLimited) as e:
            client.tokenize("x")
    assert e.value.status == 429 and 0 < e.value.retry_after <= 60
    # another key keeps its own budget, and /health stays exempt
    assert secure.post("/api/tokenize", json={"text": "x"}, headers=bearer(AUTH_KEY)).status_code == 200
    assert secure.get("/health").status_code == 200


def test_openai_client_sends_the_key(secure_server):
    import openai

    url = secure_server.url + "/v1"
    with openai.OpenAI(base_url=url, api_key=AUTH_KEY, max_retries=0) as client:
        assert MODEL in [m.id for m in client.models.list()]
    with openai.OpenAI(base_url=url, api_key="wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.models.list()


def test_cors_for_the_configured_origin_only(secure):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    ok = secure.options("/api/generate", headers={"Origin": ALLOWED_ORIGIN, **preflight})
    assert ok.status_code in (200, 204)
    assert ok.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "POST" in ok.headers["access-control-allow-methods"]
    refused = secure.options("/api/generate", headers={"Origin": "http://evil.example", **preflight})
    assert refused.headers.get("access-control-allow-origin") not in ("*", "http://evil.example")

    simple = secure.post("/api/tokenize", json={"text": "x"}, headers={"Origin": ALLOWED_ORIGIN, **bearer(CORS_KEY)})
    assert simple.status_code == 200 and simple.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    other = secure.post("/api/tokenize", json={"text": "x"}, headers={"Origin": "http://evil.example",
                                                                     **bearer(CORS_KEY)})
    assert "access-control-allow-origin" not in other.headers


def test_open_server_sends_no_cors_headers(http):
    """Without CORS every other origin is foreign: its POST is refused, and no CORS header is sent."""
    r = http.post("/api/tokenize", json={"text": "x"}, headers={"Origin": ALLOWED_ORIGIN})
    assert_error(r, 403, "UNAUTHORIZED")
    assert "access-control-allow-origin" not in r.headers
    r = http.get("/api/models", headers={"Origin": ALLOWED_ORIGIN})   # a read: answered, but not to the page
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_text_access_log_in_the_configured_file(secure_server, secure):
    secure.post("/api/tokenize", json={"text": "logged"}, headers=bearer(AUTH_KEY))
    secure.get("/api/models")   # refused: 401
    lines = (secure_server.log_path.parent / "woolly.log").read_text().splitlines()
    access = [line for line in lines if " woolly.access: " in line]
    assert any(" POST /api/tokenize 200 " in line and line.endswith("tokens=0") for line in access), access[-5:]
    assert any(" GET /api/models 401 " in line for line in access)
    assert not [line for line in lines if line.lstrip().startswith("{")]   # text, not JSON


def test_loading_a_broken_model_fails_and_keeps_the_loaded_one(secure_server, secure):
    admin = bearer(ADMIN_KEY)
    err = assert_error(secure.post("/api/models/load", json={"name": BROKEN_MODEL}, headers=admin),
                       500, "MODEL_LOAD_FAILED")
    assert str(secure_server.log_path.parent) not in err["message"]   # no file system path leaks
    assert secure.get("/health").json()["model"] == MODEL
    assert secure.post("/api/tokenize", json={"text": "still here"}, headers=admin).status_code == 200
    names = [m["name"] for m in secure.get("/api/models", headers=admin).json()]
    assert names == [MODEL]   # the directory's unreadable file is not offered


def test_unload_then_model_not_loaded_then_load(secure_server, secure):
    """Last in this module: every model-needing route says MODEL_NOT_LOADED until a load."""
    admin = bearer(ADMIN_KEY)
    r = secure.post("/api/models/unload", headers=admin)
    assert r.status_code == 200 and r.json() == {"success": True, "message": "Model unloaded"}
    assert secure.get("/health").json()["model"] is None
    for path, body in (("/api/generate", {"prompt": "Hi"}), ("/api/generate", {"prompt": "Hi", "stream": True}),
                       ("/api/chat", {"messages": [{"role": "user", "content": "Hi"}]}),
                       ("/api/tokenize", {"text": "Hi"}), ("/api/detokenize", {"tokens": [1]}),
                       ("/api/embeddings", {"input": "Hi"}), ("/v1/completions", {"prompt": "Hi"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
                       ("/v1/embeddings", {"input": "Hi"})):
        assert_error(secure.post(path, json=body, headers=admin), 400, "MODEL_NOT_LOADED")
    assert_error(secure.post("/api/models/unload", headers=admin), 400, "MODEL_NOT_LOADED")
    assert not [m for m in secure.get("/api/models", headers=admin).json() if m["loaded"]]

    async def ws_generate():
        async with websockets.connect(secure_server.ws_url, additional_headers=admin) as ws:
            status = json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "generate", "id": "r1", "prompt": "Hi"}))
            return status, json.loads(await ws.recv())

    status, err = asyncio.run(ws_generate())
    assert status["model"] is None
    assert err == {"type": "error", "request_id": "r1", "error": err["error"], "code": "MODEL_NOT_LOADED"}

    with WoollyClient(secure_server.url, api_key=ADMIN_KEY) as client:
        with pytest.raises(ModelNotLoaded):
            client.generate("Hi")
        t0 = time.monotonic()
        loaded = client.load_model(MODEL)
    assert loaded.success and loaded.message == "Model loaded successfully"
    assert 0 <= loaded.load_time_ms <= (time.monotonic() - t0) * 1000 + 1
    assert secure.get("/health").json()["model"] == MODEL
    assert secure.post("/api/tokenize", json={"text": "back"}, headers=admin).status_code == 200
