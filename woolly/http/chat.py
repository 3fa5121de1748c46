"""Chat messages from a request -> prompt token ids, control tokens only from the template."""
from __future__ import annotations

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
    return out


def chat_prompt_ids(model, messages) -> list[int]:
    from woolly.chat_template import tokenize_chat

    return list(tokenize_chat(model, message_dicts(messages), add_generation_prompt=True))
