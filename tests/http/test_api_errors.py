"""Every error a request can trigger on the open server: the reference's shape, code and status."""
from __future__ import annotations

import pytest

from support.errors import assert_error
from support.live_server import BODY_LIMIT, CONTEXT

pytestmark = pytest.mark.real


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", 2**31), ("max_tokens", 2**63), ("max_tokens", "ten"),
    ("temperature", -0.5), ("top_k", -1), ("top_k", 2**40), ("top_p", 1.5),
    ("top_p", -0.1), ("repeat_penalty", 0), ("seed", 2**64), ("stop", [""]), ("stop", ["x"] * 100),
])
def test_bad_sampling_parameter(http, field, value):
    err = assert_error(http.post("/api/generate", json={"prompt": "Hi", field: value}), 400, "INVALID_REQUEST")
    assert field in err["message"]


@pytest.mark.parametrize("raw", [b'{"prompt": "Hi", "temperature": NaN}',   # Python's json.dumps of nan
                                 b'{"prompt": "Hi", "temperature": 1e999}', b'{"prompt": "Hi", "top_p": -1e999}'])
def test_non_finite_temperature(http, raw):
    assert_error(http.post("/api/generate", content=raw, headers={"content-type": "application/json"}),
                 400, "INVALID_REQUEST")


@pytest.mark.parametrize("raw", [b'{"prompt": ', b"not json", b"[1, 2]", b'{"prompt": 5}', b"{}",
                                 b'{"prompt": "\xff\xfe"}', b'{"prompt": "\\ud800 lone surrogate"}'])
def test_malformed_body(http, raw):
    assert_error(http.post("/api/generate", content=raw, headers={"content-type": "application/json"}),
                 400, "INVALID_REQUEST")


def test_max_tokens_beyond_the_context(http):
    prompt_tokens = http.post("/api/tokenize", json={"text": "Hi"}).json()["count"]
    err = assert_error(http.post("/api/generate", json={"prompt": "Hi", "max_tokens": CONTEXT - prompt_tokens + 1}),
                       400, "INVALID_REQUEST", "context")
    assert err["details"]["max_tokens"] == CONTEXT - prompt_tokens + 1


def test_prompt_longer_than_the_context(http):
    prompt = "hello " * (2 * CONTEXT)
    err = assert_error(http.post("/api/generate", json={"prompt": prompt, "max_tokens": 1}),
                       400, "CONTEXT_LENGTH_EXCEEDED", "prompt", "context")
    assert err["details"]["prompt_tokens"] > CONTEXT and err["details"]["context_length"] == CONTEXT
    assert_error(http.post("/api/generate", json={"prompt": prompt, "max_tokens": 1, "stream": True}),
                 400, "CONTEXT_LENGTH_EXCEEDED", "context")
    assert_error(http.post("/api/chat", json={"messages": [{"role": "user", "content": prompt}]}),
                 400, "CONTEXT_LENGTH_EXCEEDED", "context")


def test_chat_unknown_role_and_bad_messages(http):
    assert_error(http.post("/api/chat", json={"messages": [{"role": "wizard", "content": "hi"}]}),
                 400, "INVALID_REQUEST", "role")
    assert_error(http.post("/api/chat", json={"messages": []}), 400, "INVALID_REQUEST", "messages")
    assert_error(http.post("/api/chat", json={"messages": [{"content": "no role"}]}), 400, "INVALID_REQUEST", "role")
    assert_error(http.post("/api/chat", json={"messages": "hello"}), 400, "INVALID_REQUEST", "messages")


@pytest.mark.parametrize("route", ["/api/chat", "/v1/chat/completions"])
def test_request_supplied_chat_template_is_refused(http, route):
    body = {"messages": [{"role": "user", "content": "hi"}], "chat_template": "{{ 7 * 7 }}", "max_tokens": 1}
    assert_error(http.post(route, json=body), 400, "INVALID_REQUEST", "chat_template")


@pytest.mark.parametrize("tokens", [[-1], [2**31], [1, 10**9], ["a"], [1.5]])
def test_detokenize_ids_out_of_range(http, tokens):
    assert_error(http.post("/api/detokenize", json={"tokens": tokens}), 400, "INVALID_REQUEST")


def test_tokenize_needs_text(http):
    assert_error(http.post("/api/tokenize", json={}), 400, "INVALID_REQUEST", "text")


def test_load_unknown_model(http):
    err = assert_error(http.post("/api/models/load", json={"name": "no-such-model"}), 404, "MODEL_NOT_FOUND",
                       "no-such-model")
    assert "/" not in err["message"]   # no file system path leaks
    assert http.get("/health").json()["model"] is not None   # the loaded model stays


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "..", "a/b", "x.gguf/../../y", "C:\\win", "Name With Spaces",
                                  "", "a" * 300])
def test_path_like_model_names(http, name):
    assert_error(http.post("/api/models/load", json={"name": name}), 400, "INVALID_REQUEST")


@pytest.mark.parametrize("route,body", [
    ("/api/generate", {"prompt": "Hi"}), ("/api/chat", {"messages": [{"role": "user", "content": "Hi"}]}),
    ("/api/embeddings", {"input": "Hi"}),
])
@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "../../models/smollm2-135m-instruct.gguf"])
def test_path_like_model_field(http, route, body, name):
    assert_error(http.post(route, json={**body, "model": name}), 400, "INVALID_REQUEST", "model")


def test_body_over_the_limit(http):
    big = {"prompt": "a" * (BODY_LIMIT + 1)}
    r = http.post("/api/generate", json=big)
    assert_error(r, 413, "PAYLOAD_TOO_LARGE")


def test_chunked_body_over_the_limit(http):
    """No Content-Length to check up front: the limit holds while the body streams in."""
    def chunks():
        yield b'{"prompt": "'
        for _ in range(BODY_LIMIT // 4096 + 2):
            yield b"a" * 4096
        yield b'"}'

    r = http.post("/api/generate", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert_error(r, 413, "PAYLOAD_TOO_LARGE")


def test_unknown_route_and_method(http):
    assert_error(http.get("/api/nothing-here"), 404, "NOT_FOUND")
    assert_error(http.get("/api/generate"), 405, "METHOD_NOT_ALLOWED")


@pytest.mark.parametrize("route,body", [
    ("/v1/completions", {"prompt": "Hi", "logprobs": -1}), ("/v1/completions", {"prompt": "Hi", "logprobs": 10**6}),
    ("/v1/completions", {"prompt": "Hi", "n": 0}), ("/v1/completions", {"prompt": "Hi", "n": 10**6}),
    ("/v1/completions", {"prompt": [-1, 5]}), ("/v1/completions", {"prompt": "Hi", "max_tokens": -1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": -1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "temperature": -1}),
    ("/v1/embeddings", {"input": []}),
])
def test_openai_routes_bad_parameters(http, route, body):
    assert_error(http.post(route, json=body), 400, "INVALID_REQUEST")

