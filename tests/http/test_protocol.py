"""The server does what was asked (issue 15): accepted fields act or are refused, errors name
what the client sent, limits hold on every route, and the process and its logs behave.

All against real `woolly serve` processes on loopback: the shared open `server` (JSON logs
on stdout, a 256-token context) and, for the access log's 429s, one small rate-limited server.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import httpx
import pytest

from support.live_server import CONTEXT, MODEL, base_config, serving
from support.errors import assert_error
from support.websocket import Socket, run_socket

pytestmark = pytest.mark.real

LONG_PROMPT = "hello " * (CONTEXT + 50)   # more tokens than the context holds
DEEP = 1000                                # nesting that overflowed msgspec's decoder


def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


# -- Ollama's options -------------------------------------------------------------------------
def test_ollama_options_are_honoured(http):
    """num_predict is max_tokens; temperature 0 makes two answers equal. Before: ignored (256 tokens)."""
    body = {"prompt": "Once upon a time", "options": {"num_predict": 3, "temperature": 0, "top_k": 1}}
    first, second = http.post("/api/generate", json=body), http.post("/api/generate", json=body)
    assert first.status_code == 200, first.text
    assert first.json()["tokens_generated"] == 3 and first.json()["finish_reason"] == "length"
    assert second.json()["text"] == first.json()["text"]
    chat = http.post("/api/chat", json={"messages": [{"role": "user", "content": "Hi"}],
                                         "options": {"num_predict": 2, "temperature": 0}})
    assert chat.status_code == 200 and chat.json()["tokens_generated"] <= 2


@pytest.mark.parametrize("route,body", [
    ("/api/generate", {"prompt": "Hi"}),
    ("/api/chat", {"messages": [{"role": "user", "content": "Hi"}]}),
])
def test_unknown_ollama_option_is_refused_by_name(http, route, body):
    err = assert_error(http.post(route, json={**body, "options": {"num_predict": 2, "mirostat": 2}}),
                       400, "INVALID_REQUEST", "mirostat")
    assert err["details"]["fields"] == ["options.mirostat"]


def test_num_ctx_over_the_context_is_refused(http):
    assert_error(http.post("/api/generate", json={"prompt": "Hi", "options": {"num_ctx": CONTEXT * 4}}),
                 400, "INVALID_REQUEST", "num_ctx", str(CONTEXT))
    ok = http.post("/api/generate", json={"prompt": "Hi", "options": {"num_ctx": CONTEXT, "num_predict": 1}})
    assert ok.status_code == 200, ok.text
    # a smaller num_ctx is this request's context
    assert_error(http.post("/api/generate", json={"prompt": "Hi", "options": {"num_ctx": 8, "num_predict": 64}}),
                 400, "INVALID_REQUEST", "context")


# -- OpenAI structured-output fields malformed, and the legacy functions API ------------------------
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}


@pytest.mark.parametrize("extra,word", [
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function",
                                                                                  "function": {"name": "g"}}},
     "tool_choice"),
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
])
def test_openai_malformed_fields_are_refused(http, extra, word):
    assert_error(http.post("/v1/chat/completions", json={**CHAT, **extra}), 400, "INVALID_REQUEST", word)


def test_openai_plain_text_format_is_accepted(http):
    r = http.post("/v1/chat/completions", json={**CHAT, "response_format": {"type": "text"}, "tool_choice": "none"})
    assert r.status_code == 200, r.text


# -- errors name what the client sent ------------------------------------------------------------
def test_missing_field_is_named_as_sent(http):
    err = assert_error(http.post("/api/generate", json={"max_tokens": 2}), 400, "INVALID_REQUEST", "prompt")
    assert err["details"]["fields"] == ["prompt"] and "data" not in err["message"]
    err = assert_error(http.post("/api/chat", json={"messages": [{"content": "x"}]}), 400, "INVALID_REQUEST")
    assert err["details"]["fields"] == ["messages[0].role"]
    err = assert_error(http.post("/api/generate", content=b"", headers={"content-type": "application/json"}),
                       400, "INVALID_REQUEST", "body")
    assert "'data'" not in err["message"]


@pytest.mark.parametrize("route", ["/api/generate", "/v1/completions"])
def test_invalid_json_says_so(http, route):
    assert_error(http.post(route, content=b'{"prompt": "Hi",', headers={"content-type": "application/json"}),
                 400, "INVALID_REQUEST", "invalid JSON")


# -- a prompt over the context, on every route ---------------------------------------------------
@pytest.mark.parametrize("route,body", [
    ("/api/generate", {"prompt": LONG_PROMPT, "max_tokens": 1}),
    ("/api/generate", {"prompt": LONG_PROMPT, "max_tokens": 1, "stream": True}),
    ("/api/chat", {"messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": 1}),
    ("/api/chat", {"messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": 1, "stream": True}),
    ("/v1/completions", {"prompt": LONG_PROMPT, "max_tokens": 1}),
    ("/v1/completions", {"prompt": LONG_PROMPT, "max_tokens": 1, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": 1,
                              "stream": True}),
])
def test_prompt_over_the_context_on_every_route(http, route, body):
    assert_error(http.post(route, json=body), 400, "CONTEXT_LENGTH_EXCEEDED", str(CONTEXT))


def test_prompt_over_the_context_over_websocket(server):
    async def scenario(sock: Socket):
        await sock.next()   # status
        await sock.send(type="generate", id="g", prompt=LONG_PROMPT, config={"max_tokens": 1})
        await sock.send(type="chat", id="c", messages=[{"role": "user", "content": LONG_PROMPT}],
                        config={"max_tokens": 1})
        return await sock.finish("g", "c")

    ends = run_socket(server.ws_url, scenario)
    assert [ends[i]["code"] for i in ("g", "c")] == ["CONTEXT_LENGTH_EXCEEDED"] * 2, ends


# -- seeds: all 64 bits ---------------------------------------------------------------------------
def test_seeds_use_all_64_bits(http):
    """2**64-1 is accepted; seeds equal in their low 32 bits draw differently (before: the same)."""
    def sample(seed: int) -> str:
        r = http.post("/api/generate", json={"prompt": "Once upon a time", "max_tokens": 12, "temperature": 1.5,
                                             "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": seed})
        assert r.status_code == 200, r.text
        return r.json()["text"]

    low = 0x1234_5678
    texts = [sample(low), sample(low | 1 << 40), sample(low | 1 << 63), sample(2**64 - 1)]
    assert len(set(texts)) == 4, texts
    assert sample(low | 1 << 40) == texts[1] and sample(2**64 - 1) == texts[3]   # honoured: repeatable
    assert_error(http.post("/api/generate", json={"prompt": "Hi", "seed": 2**64}), 400, "INVALID_REQUEST", "seed")


# -- JSON nested too deep -------------------------------------------------------------------------
@pytest.mark.parametrize("route", ["/api/generate", "/v1/chat/completions", "/api/tokenize"])
def test_deeply_nested_json_is_a_400(http, route):
    raw = '{"prompt": "Hi", "text": "Hi", "stop": ' + deep_json(DEEP) + "}"
    assert_error(http.post(route, content=raw.encode(), headers={"content-type": "application/json"}),
                 400, "INVALID_REQUEST", "nested")
    # brackets inside strings are text, not nesting
    r = http.post("/api/tokenize", json={"text": deep_json(DEEP)})
    assert r.status_code == 200, r.text


def test_deeply_nested_ws_message_leaves_the_socket_and_its_request(server):
    async def scenario(sock: Socket):
        await sock.next()   # status
        await sock.send(type="generate", id="long", prompt="Count to fifty:", config={"max_tokens": 24})
        await sock.until(lambda e: e["type"] == "token" and e["request_id"] == "long")
        await sock.ws.send('{"type": "generate", "id": "deep", "prompt": "x", "config": ' + deep_json(DEEP) + "}")
        error = await sock.until(lambda e: e["type"] == "error")
        complete = await sock.until(lambda e: e["type"] == "complete" and e["request_id"] == "long")
        await sock.send(type="status")
        status = await sock.until(lambda e: e["type"] == "status")
        return error, complete, status

    error, complete, status = run_socket(server.ws_url, scenario)
    assert error["code"] == "INVALID_REQUEST" and "nested" in error["error"]
    assert complete["finish_reason"] in ("length", "stop") and complete["tokens_generated"] > 0
    assert status["model"] == MODEL


# -- WebSocket cancel ------------------------------------------------------------------------------
def test_ws_cancel_reports_what_was_generated(server):
    async def scenario(sock: Socket):
        await sock.next()   # status
        await sock.send(type="generate", id="c", prompt="Count to one hundred:",
                        config={"max_tokens": 200, "temperature": 0})
        for _ in range(3):
            await sock.until(lambda e: e["type"] == "token" and e["request_id"] == "c")
        await sock.send(type="cancel", id="c")
        return await sock.until(lambda e: e["type"] == "complete" and e["request_id"] == "c")

    sock_events: list = []

    async def recording(sock: Socket):
        result = await scenario(sock)
        sock_events.extend(sock.tokens("c"))
        return result

    complete = run_socket(server.ws_url, recording)
    assert complete["finish_reason"] == "cancelled"
    assert complete["text"] == "".join(t["token"] for t in sock_events) and complete["text"]
    assert complete["tokens_generated"] >= len(sock_events) >= 3
    assert complete["generation_time_ms"] > 0


# -- the process: logs, port, version --------------------------------------------------------------
def test_json_logging_covers_uvicorns_lines(server):
    lines = server.log_path.read_text(errors="replace").splitlines()
    uvicorn_lines = [line for line in lines if "Uvicorn running on" in line or "Application startup" in line]
    assert uvicorn_lines, lines[-20:]
    for line in uvicorn_lines:
        record = json.loads(line)   # before: uvicorn's lines were plain text (or dropped)
        assert record["logger"].startswith("uvicorn")


def test_busy_port_fails_before_the_model_loads(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "woolly.cli", "serve", MODEL, "--port", str(port)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120,
                              env={k: v for k, v in __import__("os").environ.items() if not k.startswith("WOOLLY_")
                                   or k in ("WOOLLY_MODELS_DIR", "WOOLLY_COMPILE_CACHE")})
        elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("woolly: error: cannot listen on 127.0.0.1:") and str(port) in last, proc.stderr
    assert elapsed < 60, elapsed   # no model load, no compile (the message is the main check)


def test_version_flag():
    proc = subprocess.run([sys.executable, "-m", "woolly.cli", "--version"], capture_output=True, text=True, timeout=60)
    import woolly

    assert proc.returncode == 0 and proc.stdout.strip() == f"woolly {woolly.__version__}"


def test_access_log_records_429s(tmp_path_factory, smollm2_path):
    """A server allowing 2 requests a minute: the third is a 429, and its log line says 429 (before: 0)."""
    config = base_config(max_batch_size=1, max_sequence_length=64)
    config["security"] = {"rate_limiting": {"enabled": True, "requests_per_minute": 2}}
    with serving(tmp_path_factory.mktemp("rate_log"), config) as srv:
        statuses = [httpx.post(srv.url + "/api/tokenize", json={"text": "x"}, timeout=60).status_code
                    for _ in range(3)]
        assert statuses == [200, 200, 429], statuses
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            access = [json.loads(line) for line in srv.log_path.read_text(errors="replace").splitlines()
                      if line.startswith("{") and '"woolly.access"' in line]
            if len(access) >= 3:
                break
            time.sleep(0.2)
        assert [a["status"] for a in access if a["path"] == "/api/tokenize"] == [200, 200, 429], access
