"""Chat messages from a request -> prompt token ids, control tokens only from the template."""
from __future__ import annotations

import logging

from woolly.errors import InvalidRequest

ROLES = ("system", "user", "assistant", "tool", "developer")


def message_dicts(messages) -> list[dict]:
    """Request messages (msgspec structs) -> plain dicts with text content.

    OpenAI's content parts are joined when they are text; other parts are refused.
    """
    out = []
    for m in messages:
        if m.role not in ROLES:
            raise InvalidRequest(f"unknown message role {m.role[:32]!r}; one of {', '.join(ROLES)}")
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidRequest("only text content parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
        if m.tool_calls or m.tool_call_id:   # tool use (woolly.http.tools)
            out[-1].update({k: v for k, v in (("tool_calls", m.tool_calls), ("tool_call_id", m.tool_call_id)) if v})
    return out


def check_prompt_bytes(texts, limit: int | None) -> None:
    """InvalidRequest when `texts` hold more than `limit` UTF-8 bytes together (None: no limit)."""
    if limit is None:
        return
    n = sum(len(t) if t.isascii() else len(t.encode("utf-8", "surrogatepass")) for t in texts)
    if n > limit:
        raise InvalidRequest(f"the prompt is {n} bytes, over the limit of {limit} (server.max_prompt_bytes)",
                             details={"prompt_bytes": n, "max_prompt_bytes": limit})


def chat_prompt_ids(model, messages, max_bytes: int | None = None, tools=None) -> list[int]:
    """Blocks (template worker, tokenizer): call it off the event loop. `tools`: a
    woolly.http.tools.ToolPlan, which rewrites the messages and adds template variables."""
    from woolly.chat_template import base_model_warning, tokenize_chat

    if warning := base_model_warning(model, once=True):
        logging.getLogger("woolly").warning(warning)
    dicts = message_dicts(messages)
    check_prompt_bytes([m["content"] for m in dicts], max_bytes)
    if tools is not None:
        dicts = tools.messages(dicts)
    return list(tokenize_chat(model, dicts, add_generation_prompt=True, **(tools.template_vars if tools else {})))
