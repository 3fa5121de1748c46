"""The error body every route answers with (api-reference.md's error shape)."""
from __future__ import annotations


def assert_error(response, status: int, code: str, *words: str) -> dict:
    """`{"error": {"message", "code", "details"}}` with this status and code; words in the message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "code", "details"}
    err = body["error"]
    assert err["code"] == code and isinstance(err["details"], dict) and err["message"]
    for w in words:
        assert w.lower() in err["message"].lower(), (w, err["message"])
    return err
