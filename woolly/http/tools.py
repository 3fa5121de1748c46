"""Structured output over HTTP: `response_format`, `format`/`grammar`, and OpenAI tools.

Tools follow llama-server's approach (common/chat.cpp). A template that reads `tools` gets
them through that variable; its calls are parsed from `<tool_call>{...}</tool_call>` blocks
(Hermes, Qwen) or a bare `{"name", "arguments"|"parameters"}` object (Llama 3), and
"required" or a named function constrain the output to such a call. A template that does
not ("generic", e.g. SmolLM2, Gemma 3) is told the tools in a system message and its output
is constrained to `{"tool_call": {"name", "arguments"}}` or `{"response": "..."}`; tool
results go back to it as user messages.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from woolly.engine.grammar import Grammar
from woolly.errors import InvalidRequest

TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


# -- requests: shapes checked in the request struct, so a bad one is a 400 before any work ---
def check_openai(response_format, tools, tool_choice) -> None:
    """ValueError naming what is wrong with these OpenAI fields."""
    if response_format is not None:
        kind = response_format.get("type")
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError(f"response_format type must be text, json_object or json_schema, got {kind!r}")
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise ValueError("response_format json_schema needs {\"json_schema\": {\"name\", \"schema\": {...}}}")
    for k, t in enumerate(tools or []):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"] \
                or not isinstance(fn.get("parameters", {}), dict):
            raise ValueError(f"tools[{k}] must be "
                             '{"type": "function", "function": {"name", "parameters"}}')
    if tool_choice is None or tool_choice in ("auto", "none", "required"):
        return
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise ValueError('tool_choice must be auto, none, required or '
                         '{"type": "function", "function": {"name"}}')
    if name not in {t["function"]["name"] for t in tools or []}:
        raise ValueError(f"tool_choice names {name[:64]!r}, which is not among the tools")


def response_grammar(response_format: dict | None) -> Grammar | None:
    """OpenAI's response_format -> the grammar its output must match (None: plain text)."""
    if not response_format or response_format.get("type") == "text":
        return None
    if response_format["type"] == "json_object":
        return Grammar.json_object()
    schema = response_format["json_schema"].get("schema")
    return Grammar.json_schema(schema) if schema else Grammar.json_object()


def reference_grammar(format_: str | dict | None, gbnf: str | None) -> Grammar | None:
    """The reference routes' `format` ("json" or a JSON schema, as Ollama) and `grammar` (GBNF)."""
    if format_ is not None and gbnf is not None:
        raise InvalidRequest("set format or grammar, not both")
    if gbnf is not None:
        return Grammar.gbnf(gbnf)
    if format_ in (None, ""):
        return None
    if format_ == "json":
        return Grammar.json_object()
    if isinstance(format_, dict):
        return Grammar.json_schema(format_)
    raise InvalidRequest('format must be "json" or a JSON schema object')


# -- tools ------------------------------------------------------------------------------------
def _functions(tools) -> list[dict]:
    return [t["function"] for t in tools]


def _call_schema(fn: dict, args_key: str = "arguments") -> dict:
    return {"type": "object", "properties": {"name": {"const": fn["name"]},
                                             args_key: fn.get("parameters") or {"type": "object"}},
            "required": ["name", args_key]}


@dataclass
class ToolPlan:
    """How one chat request with tools is prompted, constrained and parsed."""

    functions: list[dict]
    choice: str | None             # "auto" | "required" | a function's name
    native: bool                   # the template reads `tools`
    hermes: bool = False           # the template writes <tool_call> blocks
    template_vars: dict = field(default_factory=dict)

    def grammar(self) -> Grammar | None:
        fns = [f for f in self.functions if self.choice in ("auto", "required") or f["name"] == self.choice]
        calls = [_call_schema(f) for f in fns]
        one_call = calls[0] if len(calls) == 1 else {"anyOf": calls}
        if not self.native:
            shapes = [{"type": "object", "properties": {"tool_call": one_call}, "required": ["tool_call"]}]
            if self.choice == "auto":
                shapes.append({"type": "object", "properties": {"response": {"type": "string"}},
                               "required": ["response"]})
            return Grammar.json_schema(shapes[0] if len(shapes) == 1 else {"anyOf": shapes})
        if self.choice == "auto":
            return None     # the model chooses between text and its own call syntax
        if self.hermes:
            return Grammar.lark('start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: %json '
                                + json.dumps(one_call))
        return Grammar.json_schema(one_call)

    def messages(self, msgs: list[dict]) -> list[dict]:
        """Chat messages as the template takes them (generic: tools described in a system message,
        calls and results as JSON text)."""
        out = []
        for m in msgs:
            m = dict(m)
            calls = m.pop("tool_calls", None)
            if calls:
                parsed = [{"name": c["function"]["name"], "arguments": _loads(c["function"].get("arguments"))}
                          for c in calls]
                if self.native:
                    m["tool_calls"] = [{"type": "function", "id": c.get("id"), "function": p}
                                       for c, p in zip(calls, parsed)]
                else:
                    m["content"] = json.dumps({"tool_call": parsed[0]} if len(parsed) == 1
                                              else {"tool_calls": parsed})
            if m["role"] == "tool" and not self.native:
                m = {"role": "user", "content": json.dumps({"tool_response": {
                    "tool_call_id": m.get("tool_call_id"), "content": m.get("content", "")}})}
            out.append(m)
        if not self.native and self.choice is not None:
            note = ("You can call these tools:\n" + json.dumps(self.functions)
                    + "\n\nRespond in JSON: either {\"tool_call\": {\"name\": ..., \"arguments\": {...}}} to call "
                    "a tool, or {\"response\": \"...\"} to answer the user.")
            if out and out[0]["role"] == "system":
                out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + note}
            else:
                out.insert(0, {"role": "system", "content": note})
        return out

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """The model's output -> (content, OpenAI tool_calls)."""
        if not self.native:
            obj = _loads(text, strict=False)
            if isinstance(obj, dict) and isinstance(obj.get("tool_call"), dict):
                return None, [_tool_call(obj["tool_call"])]
            if isinstance(obj, dict) and isinstance(obj.get("response"), str):
                return obj["response"], []
            return text, []
        blocks = TOOL_CALL_BLOCK.findall(text) if self.hermes else []
        calls = [c for c in (_loads(b, strict=False) for b in blocks) if isinstance(c, dict) and "name" in c]
        if not blocks:
            obj = _loads(text.strip(), strict=False)
            if isinstance(obj, dict) and isinstance(obj.get("name"), str) \
                    and ("arguments" in obj or "parameters" in obj):
                calls = [obj]
        if not calls:
            return text, []
        content = TOOL_CALL_BLOCK.sub("", text).strip() if blocks else ""
        return content or None, [_tool_call(c) for c in calls]


def plan(template_source: str, tools, tool_choice) -> ToolPlan | None:
    """The plan for a chat request's tools (None: no tools, or tool_choice "none")."""
    if not tools or tool_choice == "none":
        return None
    choice = tool_choice["function"]["name"] if isinstance(tool_choice, dict) else (tool_choice or "auto")
    native = "tools" in template_source
    functions = _functions(tools)
    return ToolPlan(functions, choice, native, hermes=native and "<tool_call>" in template_source,
                    template_vars={"tools": [{"type": "function", "function": f} for f in functions]} if native else {})


def _tool_call(call: dict) -> dict:
    args = call.get("arguments", call.get("parameters", {}))
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": str(call.get("name", "")),
                         "arguments": args if isinstance(args, str) else json.dumps(args)}}


def _loads(text, strict: bool = True) -> Any:
    if not isinstance(text, str):
        return text if text is not None else {}
    try:
        return json.loads(text)
    except ValueError:
        if strict:
            raise InvalidRequest("a tool call's arguments are not valid JSON") from None
        return None
