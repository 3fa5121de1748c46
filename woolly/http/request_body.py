"""Decoding JSON request bodies: a depth limit before decoding, and "invalid JSON" as a 400.

msgspec decodes nested arrays and objects recursively: a body nested 1000 deep raised a
RecursionError deep in the decoder (a 500 over HTTP; over WebSocket it closed the socket).
`check_depth` refuses such a body first, with a scan of its raw bytes that skips strings.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np
from litestar import Request
from litestar.exceptions import SerializationException

from woolly.errors import InvalidRequest

_STRING = re.compile(rb'"(?:[^"\\]+|\\.)*"', re.DOTALL)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in the JSON text raw (strings skipped)."""
    if raw.count(b"[") + raw.count(b"{") == 0:
        return 0
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKET)
    if not brackets:
        return 0
    steps = np.frombuffer(brackets, np.uint8)
    depth = np.cumsum(np.where((steps == ord("[")) | (steps == ord("{")), 1, -1), dtype=np.int64)
    return int(depth.max())


def check_depth(raw: bytes | str, limit: int) -> None:
    """InvalidRequest when raw nests arrays/objects deeper than limit. Cheap when it cannot:
    a body with at most `limit` opening brackets is not scanned."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if raw.count(b"[") + raw.count(b"{") > limit and json_depth(raw) > limit:
        raise InvalidRequest(f"the JSON is nested more than {limit} levels deep (server.max_json_depth)",
                             details={"max_json_depth": limit})


class JsonRequest(Request):
    """Litestar's Request whose JSON body is depth-checked first, and whose malformed JSON
    is one 400 saying "invalid JSON" (route handlers get their `data` from `json()`)."""

    async def json(self) -> Any:
        body = await self.body()
        check_depth(body, self.app.state.server.config.server.max_json_depth)
        try:
            return await super().json()
        except SerializationException as e:
            raise InvalidRequest(f"invalid JSON: {_reason(e)}") from None


def _reason(exc: SerializationException) -> str:
    detail = str(exc.detail or exc)
    return detail.removeprefix("JSON is malformed: ")
