"""The WebSocket `/ws` protocol against a real server: generate, chat, cancel, status, errors,
several requests in flight on one socket."""
from __future__ import annotations

import asyncio

import pytest

from support.websocket import Socket, run_socket

pytestmark = pytest.mark.real

STATUS_KEYS = {"type", "model", "active_sessions", "memory_used", "gpu_memory_used"}
TOKEN_KEYS = {"type", "request_id", "token", "index", "timestamp"}
COMPLETE_KEYS = {"type", "request_id", "text", "tokens_generated", "generation_time_ms", "finish_reason"}
ERROR_KEYS = {"type", "request_id", "error", "code"}


def assert_stream(sock: Socket, complete: dict, max_tokens: int) -> None:
    """Token events numbered 0.. whose text joins to the complete event's text."""
    rid = complete["request_id"]
    assert set(complete) == COMPLETE_KEYS, complete
    tokens = sock.tokens(rid)
    for i, t in enumerate(tokens):
        assert set(t) == TOKEN_KEYS and t["index"] == i and isinstance(t["timestamp"], int)
    assert "".join(t["token"] for t in tokens) == complete["text"]
    assert 0 < complete["tokens_generated"] <= max_tokens
    assert complete["finish_reason"] in ("stop", "length")
    assert isinstance(complete["generation_time_ms"], int)


def test_status_on_connect_and_on_request(server):
    async def scenario(sock):
        first = await sock.next()
        await sock.send(type="status")
        second = await sock.next()
        return first, second

    for event in run_socket(server.ws_url, scenario):
        assert set(event) == STATUS_KEYS and event["type"] == "status"
        assert event["model"] == "smollm2-135m-instruct"
        assert event["active_sessions"] >= 0 and event["memory_used"] > 0 and event["gpu_memory_used"] >= 0


def test_generate_and_chat_in_flight_together(server):
    async def scenario(sock):
        await sock.next()   # status
        await sock.send(type="generate", id="gen-1", prompt="Tell me a story",
                        config={"max_tokens": 5, "temperature": 0.7, "top_p": 0.9})
        await sock.send(type="chat", id="chat-1", messages=[{"role": "user", "content": "Hello!"}],
                        config={"max_tokens": 5, "temperature": 0.7})
        await sock.send(type="generate", id="gen-2", prompt="The sky is", config={"max_tokens": 5})
        return await sock.finish("gen-1", "chat-1", "gen-2"), sock

    ends, sock = run_socket(server.ws_url, scenario)
    for rid in ("gen-1", "chat-1", "gen-2"):
        assert ends[rid]["type"] == "complete", ends[rid]
        assert_stream(sock, ends[rid], 5)
    # in flight together: every request's first token came before any request completed
    first_complete = next(i for i, e in enumerate(sock.events) if e["type"] == "complete")
    for rid in ("gen-1", "chat-1", "gen-2"):
        first_token = next(i for i, e in enumerate(sock.events) if e.get("request_id") == rid)
        assert first_token < first_complete, rid


def test_cancel_stops_the_generation(server):
    async def scenario(sock):
        await sock.next()
        await sock.send(type="generate", id="long", prompt="Count from one to one thousand:",
                        config={"max_tokens": 200, "temperature": 0})
        await sock.until(lambda e: e["type"] == "token" and e["request_id"] == "long")
        await sock.send(type="cancel", id="long")
        end = await sock.until(lambda e: e["type"] in ("complete", "error") and e.get("request_id") == "long")
        tokens_at_end = len(sock.tokens("long"))
        # the socket stays usable, and the cancelled request sends nothing more
        await sock.send(type="generate", id="after", prompt="Hi", config={"max_tokens": 3})
        after = (await sock.finish("after"))["after"]
        for _ in range(40):
            await sock.send(type="status")
            status = await sock.until(lambda e: e["type"] == "status")
            if status["active_sessions"] == 0:
                break
            await asyncio.sleep(0.25)
        return end, tokens_at_end, after, status, sock

    end, tokens_at_end, after, status, sock = run_socket(server.ws_url, scenario)
    assert end["type"] == "complete" and end["finish_reason"] == "cancelled"
    assert tokens_at_end < 200 and len(sock.tokens("long")) == tokens_at_end   # nothing after the cancel
    assert after["type"] == "complete" and after["finish_reason"] in ("stop", "length")
    assert status["active_sessions"] == 0


def test_cancel_of_an_unknown_id_changes_nothing(server):
    async def scenario(sock):
        await sock.next()
        await sock.send(type="cancel", id="never-sent")
        await sock.send(type="generate", id="real", prompt="Hi", config={"max_tokens": 3})
        return (await sock.finish("real"))["real"], sock.events

    end, events = run_socket(server.ws_url, scenario)
    assert end["type"] == "complete"
    assert not [e for e in events if e.get("request_id") == "never-sent"]


def test_errors_arrive_as_error_events(server):
    async def scenario(sock):
        await sock.next()
        await sock.ws.send("{not json")
        bad_json = await sock.until(lambda e: e["type"] == "error")
        await sock.send(type="dance", id="x1")
        unknown = await sock.until(lambda e: e["type"] == "error")
        await sock.send(type="generate", id="no-prompt")
        no_prompt = await sock.until(lambda e: e["type"] == "error")
        await sock.send(type="generate", prompt="Hi")
        no_id = await sock.until(lambda e: e["type"] == "error")
        await sock.send(type="generate", id="too-long", prompt="hello " * 600, config={"max_tokens": 1})
        too_long = await sock.until(lambda e: e["type"] == "error")
        await sock.send(type="chat", id="bad-role", messages=[{"role": "wizard", "content": "x"}])
        bad_role = await sock.until(lambda e: e["type"] == "error")
        await sock.send(type="generate", id="bad-config", prompt="Hi", config={"max_tokens": -5})
        bad_config = await sock.until(lambda e: e["type"] == "error")
        await sock.send(type="generate", id="ok", prompt="Hi", config={"max_tokens": 2})
        ok = (await sock.finish("ok"))["ok"]
        return [bad_json, unknown, no_prompt, no_id, too_long, bad_role, bad_config], ok

    errors, ok = run_socket(server.ws_url, scenario)
    bad_json, unknown, no_prompt, no_id, too_long, bad_role, bad_config = errors
    for e in errors:
        code = "CONTEXT_LENGTH_EXCEEDED" if e is too_long else "INVALID_REQUEST"
        assert set(e) == ERROR_KEYS and e["code"] == code and e["error"], e
    assert unknown["request_id"] == "x1" and "dance" in unknown["error"]
    assert no_prompt["request_id"] == "no-prompt" and "prompt" in no_prompt["error"]
    assert too_long["request_id"] == "too-long" and "context" in too_long["error"]
    assert bad_role["request_id"] == "bad-role" and "role" in bad_role["error"]
    assert bad_config["request_id"] == "bad-config" and "max_tokens" in bad_config["error"]
    assert bad_json["request_id"] is None and no_id["request_id"] is None
    assert ok["type"] == "complete"   # the socket outlives its errors


def test_duplicate_id_in_flight_is_refused(server):
    async def scenario(sock):
        await sock.next()
        await sock.send(type="generate", id="dup", prompt="Once upon a time", config={"max_tokens": 6})
        await sock.send(type="generate", id="dup", prompt="Again", config={"max_tokens": 6})
        err = await sock.until(lambda e: e["type"] == "error")
        end = await sock.until(lambda e: e["type"] == "complete")
        return err, end

    err, end = run_socket(server.ws_url, scenario)
    assert err["request_id"] == "dup" and err["code"] == "INVALID_REQUEST" and "in flight" in err["error"]
    assert end["request_id"] == "dup"
