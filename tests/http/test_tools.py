"""woolly.http.tools without a server: request checks, prompts, grammars and parsing of tool calls
in the generic (SmolLM2, Gemma 3), Hermes (<tool_call>) and Llama 3 (bare JSON) styles."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("llguidance")
from woolly.http import tools as T  # noqa: E402

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
HERMES_TEMPLATE = "{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %} ... <tool_call>"
LLAMA3_TEMPLATE = "{% if tools %}{{ tools | tojson }}{% endif %} {\"name\": function name, \"parameters\": ...}"


@pytest.mark.parametrize("response_format,tools,choice", [
    ({"type": "yaml"}, None, None),
    ({"type": "json_schema", "json_schema": {"schema": []}}, None, None),
    (None, [{"type": "function", "function": {}}], None),
    (None, [WEATHER], {"type": "function", "function": "get_weather"}),
    (None, [WEATHER], {"type": "function", "function": {"name": "other"}}),
    (None, [WEATHER], "sometimes"),
])
def test_malformed_fields_are_value_errors(response_format, tools, choice):
    with pytest.raises(ValueError):
        T.check_openai(response_format, tools, choice)


def test_generic_plan_prompts_constrains_and_parses():
    plan = T.plan("{{ messages }}", [WEATHER], "auto")
    assert not plan.native and plan.template_vars == {}
    msgs = plan.messages([{"role": "user", "content": "weather?"},
                          {"role": "assistant", "content": "", "tool_calls": [
                              {"id": "c1", "type": "function",
                               "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                          {"role": "tool", "tool_call_id": "c1", "content": "rain"}])
    assert msgs[0]["role"] == "system" and "get_weather" in msgs[0]["content"]
    assert json.loads(msgs[2]["content"]) == {"tool_call": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    assert msgs[3]["role"] == "user" and json.loads(msgs[3]["content"])["tool_response"]["content"] == "rain"
    assert plan.grammar().kind == "json_schema"
    content, calls = plan.parse('{"tool_call": {"name": "get_weather", "arguments": {"city": "Oslo"}}}')
    assert content is None and calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert plan.parse('{"response": "It rains."}') == ("It rains.", [])
    assert T.plan("{{ messages }}", [WEATHER], "none") is None


def test_native_plans_render_tools_and_parse_their_calls():
    hermes = T.plan(HERMES_TEMPLATE, [WEATHER], "required")
    assert hermes.native and hermes.hermes and hermes.template_vars["tools"][0]["function"]["name"] == "get_weather"
    assert hermes.grammar().kind == "lark"   # <tool_call> + the call's JSON, compiled by llguidance
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    content, calls = hermes.parse(text)
    assert content == "Let me check." and json.loads(calls[0]["function"]["arguments"]) == {"city": "Rome"}
    assert T.plan(HERMES_TEMPLATE, [WEATHER], "auto").grammar() is None
    llama = T.plan(LLAMA3_TEMPLATE, [WEATHER], {"type": "function", "function": {"name": "get_weather"}})
    assert llama.native and not llama.hermes and llama.grammar().kind == "json_schema"
    content, calls = llama.parse('{"name": "get_weather", "parameters": {"city": "Lima"}}')
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"city": "Lima"}
    assert llama.parse("Just text.") == ("Just text.", [])


def test_reference_format_and_grammar():
    assert T.reference_grammar(None, None) is None
    assert T.reference_grammar("json", None).kind == "json_schema"
    assert T.reference_grammar({"type": "object"}, None).kind == "json_schema"
    assert T.reference_grammar(None, 'root ::= "a"').kind == "lark"
    from woolly.errors import InvalidRequest
    with pytest.raises(InvalidRequest):
        T.reference_grammar("yaml", None)
    with pytest.raises(InvalidRequest):
        T.reference_grammar("json", 'root ::= "a"')
