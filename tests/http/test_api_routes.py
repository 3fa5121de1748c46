"""The reference's HTTP routes against a real server: exact response shapes, JSON and SSE."""
from __future__ import annotations

import json
import math

import httpx
import pytest

from support.live_server import MODEL

pytestmark = pytest.mark.real

GENERATE_KEYS = {"text", "tokens_generated", "generation_time_ms", "tokens_per_second", "finish_reason"}
CHAT_KEYS = {"content", "role", "tokens_generated", "generation_time_ms", "finish_reason"}


def sse_events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of an SSE body, in order."""
    return [line[len("data:"):].strip() for line in response.text.splitlines() if line.startswith("data:")]


def test_health(http):
    r = http.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert {"status", "version", "uptime"} <= body.keys()
    assert body["status"] == "ok" and body["version"] == "0.1.0"
    assert isinstance(body["uptime"], int) and body["uptime"] >= 0


def test_models_lists_the_loaded_model(http):
    r = http.get("/api/models")
    assert r.status_code == 200
    models = r.json()
    assert isinstance(models, list)
    for m in models:
        assert set(m) == {"name", "size", "quantization", "loaded", "metadata"}
        assert set(m["metadata"]) == {"author", "parameters", "license"}
        assert isinstance(m["size"], int) and m["size"] > 0
    loaded = [m for m in models if m["loaded"]]
    assert [m["name"] for m in loaded] == [MODEL]
    assert loaded[0]["quantization"] == "Q4_1"
    assert loaded[0]["metadata"]["parameters"].endswith("M")


def test_generate_json(http):
    r = http.post("/api/generate", json={"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0.7,
                                         "top_p": 0.9, "top_k": 40, "repeat_penalty": 1.1, "stop": ["\n\n", "###"],
                                         "seed": 42, "stream": False})
    assert r.status_code == 200, r.text
    body = r.json()
    assert GENERATE_KEYS <= body.keys()
    assert isinstance(body["text"], str)
    assert 0 < body["tokens_generated"] <= 4
    assert body["finish_reason"] in ("stop", "length")
    assert body["finish_reason"] == "stop" or body["tokens_generated"] == 4
    assert isinstance(body["generation_time_ms"], int) and body["generation_time_ms"] >= 0
    assert isinstance(body["tokens_per_second"], float) and body["tokens_per_second"] > 0


def test_generate_same_seed_same_text(http):
    body = {"prompt": "The weather today", "max_tokens": 4, "temperature": 0.9, "seed": 1234}
    first, second = (http.post("/api/generate", json=body).json()["text"] for _ in range(2))
    assert first == second


def test_generate_stream_matches_json(http):
    body = {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0.9, "seed": 99}
    r = http.post("/api/generate", json={**body, "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    tokens = [json.loads(e) for e in events[:-1]]
    assert tokens, "no token events"
    for i, t in enumerate(tokens):
        assert set(t) == {"token", "id"} and t["id"] == i and isinstance(t["token"], str)
    whole = http.post("/api/generate", json=body).json()
    assert "".join(t["token"] for t in tokens) == whole["text"]


def test_streamed_tokens_are_whole_characters(http):
    """Emoji take several tokens each; SSE events carry whole characters only."""
    body = {"prompt": "😀😃😄😁😆😅😂🤣", "max_tokens": 8, "temperature": 0}
    streamed = http.post("/api/generate", json={**body, "stream": True})
    tokens = [json.loads(e)["token"] for e in sse_events(streamed)[:-1]]
    whole = http.post("/api/generate", json=body).json()
    assert "".join(tokens) == whole["text"]
    assert any(ord(c) > 0xFFFF for c in whole["text"]), whole["text"]   # multi-token characters were streamed
    for t in tokens[:-1]:
        assert "\ufffd" not in t
    # only a generation cut off inside a character may end with its replacement (the engine's choice)
    assert not tokens[-1].endswith("\ufffd") or whole["finish_reason"] == "length"


def test_generate_stop_string_ends_the_text(http):
    free = http.post("/api/generate", json={"prompt": "1, 2, 3, 4,", "max_tokens": 8, "temperature": 0}).json()
    assert len(free["text"]) > 2
    stop = free["text"][1:3]   # a string the greedy continuation is known to contain
    r = http.post("/api/generate", json={"prompt": "1, 2, 3, 4,", "max_tokens": 8, "temperature": 0,
                                         "stop": [stop]}).json()
    assert r["finish_reason"] == "stop"
    assert stop not in r["text"] and free["text"].startswith(r["text"])


def test_chat_json(http):
    r = http.post("/api/chat", json={"messages": [{"role": "system", "content": "You are a helpful assistant."},
                                                  {"role": "user", "content": "What is the capital of France?"}],
                                     "max_tokens": 4, "temperature": 0.7, "stream": False})
    assert r.status_code == 200, r.text
    body = r.json()
    assert CHAT_KEYS <= body.keys()
    assert body["role"] == "assistant" and isinstance(body["content"], str)
    assert 0 < body["tokens_generated"] <= 4 and body["finish_reason"] in ("stop", "length")


def test_chat_stream_matches_json(http):
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 5, "temperature": 0}
    r = http.post("/api/chat", json={**body, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    tokens = [json.loads(e) for e in events[:-1]]
    assert [t["id"] for t in tokens] == list(range(len(tokens)))
    assert "".join(t["token"] for t in tokens) == http.post("/api/chat", json=body).json()["content"]


def test_tokenize_detokenize_round_trip(http):
    r = http.post("/api/tokenize", json={"text": "Hello, world!"})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"tokens", "count"}
    assert body["count"] == len(body["tokens"]) > 0 and all(isinstance(t, int) for t in body["tokens"])
    back = http.post("/api/detokenize", json={"tokens": body["tokens"]})
    assert back.status_code == 200 and back.json() == {"text": "Hello, world!"}


def test_special_token_text_is_plain_text_unless_asked(http):
    plain = http.post("/api/tokenize", json={"text": "<|im_start|>"}).json()
    special = http.post("/api/tokenize", json={"text": "<|im_start|>", "parse_special": True}).json()
    assert special["count"] == 1 and plain["count"] > 1


def test_embeddings(http):
    r = http.post("/api/embeddings", json={"input": "The quick brown fox", "model": MODEL})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"embeddings", "dimensions", "model"} and body["model"] == MODEL
    assert len(body["embeddings"]) == 1 and len(body["embeddings"][0]) == body["dimensions"] > 0
    assert math.isclose(math.sqrt(sum(x * x for x in body["embeddings"][0])), 1.0, rel_tol=1e-3)
    two = http.post("/api/embeddings", json={"input": ["The quick brown fox", "hello"]}).json()
    assert len(two["embeddings"]) == 2
    assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(two["embeddings"][0], body["embeddings"][0]))


def test_metrics(http):
    http.post("/api/tokenize", json={"text": "metrics"})
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ("woolly_requests_total", "woolly_request_latency_seconds_bucket", "woolly_tokens_generated",
                 "woolly_queue_depth", "woolly_slots_in_use"):
        assert name in text, name
    assert 'woolly_requests_total{route="/api/tokenize",status="200"}' in text
    generated = [line for line in text.splitlines() if line.startswith("woolly_tokens_generated ")]
    assert float(generated[0].split()[1]) > 0   # the warm-up generated tokens


def test_openapi_schema(http):
    r = http.get("/schema/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.")
    for path in ("/health", "/api/models", "/api/models/load", "/api/models/unload", "/api/generate",
                 "/api/chat", "/api/tokenize", "/api/detokenize", "/api/embeddings", "/v1/chat/completions",
                 "/v1/completions", "/v1/embeddings", "/v1/models"):
        assert path in doc["paths"], path
    assert http.get("/schema").status_code == 200


def test_access_log_line_per_request(server, http):
    http.post("/api/generate", json={"prompt": "log line", "max_tokens": 2})
    lines = [json.loads(x) for x in server.log_path.read_text().splitlines() if x.startswith("{")]
    access = [x for x in lines if x.get("logger") == "woolly.access" and x.get("path") == "/api/generate"
              and x.get("status") == 200]
    assert access, "no access-log line for /api/generate"
    assert access[-1]["latency_ms"] > 0 and access[-1]["tokens"] > 0

