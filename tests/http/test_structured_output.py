"""Structured output and tools over HTTP on a live server (smollm2-135m-instruct): OpenAI's
response_format and tools with the official `openai` client, the reference routes' format/grammar."""
from __future__ import annotations

import json
import re

import openai
import pytest

from support.live_server import MODEL

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")
pytestmark = pytest.mark.real

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time now in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 16}}, "required": ["tz"]}}}


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300) as c:
        yield c


def test_response_format_json_schema_and_object(client):
    for prompt in ("Describe Ada Lovelace as JSON.", "A person, please."):
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=48, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                                    "strict": True}})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": 'Reply in JSON with the key "answer": what is 2+2?'}],
        max_tokens=48, temperature=0, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_tool_call_round_trip(client):
    """required -> a parsed call; the tool's result sent back -> an answer with no further call."""
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER],   # (the context is 256)
                                       tool_choice="required", max_tokens=40, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    r2 = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="auto",
                                        max_tokens=32, temperature=0)
    assert r2.choices[0].finish_reason in ("stop", "tool_calls", "length")
    if r2.choices[0].finish_reason == "stop":   # "auto": an answer in content, or another call
        assert isinstance(r2.choices[0].message.content, str)


def test_named_tool_choice_and_streaming(client):
    named = {"type": "function", "function": {"name": "get_time"}}
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Time in Tokyo?"}],
                                       tools=[WEATHER, TIME], tool_choice=named, max_tokens=48, temperature=0)
    assert r.choices[0].finish_reason == "tool_calls", r.choices[0].message
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_time" and "tz" in json.loads(call.function.arguments)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Time in Tokyo?"}], tools=[WEATHER, TIME],
        tool_choice=named, max_tokens=48, temperature=0, stream=True))
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or []) if c.choices]
    assert len(calls) == 1 and calls[0].function.name == "get_time"
    assert json.loads(calls[0].function.arguments) == json.loads(call.function.arguments)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_tool_choice_none_is_plain_text(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}],
                                       tools=[WEATHER], tool_choice="none", max_tokens=4, temperature=0)
    assert r.choices[0].message.tool_calls is None and isinstance(r.choices[0].message.content, str)


def test_reference_routes_format_and_grammar(http):
    r = http.post("/api/generate", json={"prompt": "A person as JSON:", "max_tokens": 48, "temperature": 0,
                                         "format": PERSON})
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["text"]), PERSON)
    r = http.post("/api/chat", json={"messages": [{"role": "user", "content": "Is water wet?"}], "max_tokens": 8,
                                     "temperature": 0, "grammar": 'root ::= "yes" | "no"'})
    assert r.status_code == 200, r.text
    assert r.json()["content"] in ("yes", "no") and r.json()["finish_reason"] == "stop"
    r = http.post("/api/chat", json={"messages": [{"role": "user", "content": 'JSON with the key "answer": 2+2?'}],
                                     "max_tokens": 48,
                                     "temperature": 0, "format": "json"})
    assert isinstance(json.loads(r.json()["content"]), dict)
    bad = http.post("/api/generate", json={"prompt": "x", "grammar": "root ::= ("})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "INVALID_REQUEST"
    assert re.search("grammar", bad.json()["error"]["message"])
