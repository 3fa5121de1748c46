"""Every error body a test of the session receives from a loopback server, for the path-leak scan.

`install()` wraps httpx's `Client.send` and `AsyncClient.send` (the clients of the HTTP
tests, the Woolly client and the openai client all use them) so that each answered
request with status >= 400 and a read body is kept as (request body, status, response
body). Streamed responses are kept when the test reads them (`read()`). The schemathesis
run adds its own through `record`. Only the client side is wrapped: servers run untouched.
"""
from __future__ import annotations

import httpx

PATH_MARKERS = ("/root", "/home", "/tmp", ".cache")
MAX_KEPT = 20000

seen: list[tuple[str, int, str, str]] = []   # (request line, status, request body, response body)


def record(request_line: str, status: int, request_body: str, response_body: str) -> None:
    if status >= 400 and len(seen) < MAX_KEPT:
        seen.append((request_line, status, request_body[:4096], response_body[:4096]))


def _keep(response: httpx.Response) -> None:
    try:
        if response.status_code < 400 or response.request.url.host not in ("127.0.0.1", "localhost"):
            return
        if not response.is_stream_consumed and not hasattr(response, "_content"):
            return
        body = response.content.decode("utf-8", "replace")
        try:
            sent = response.request.content.decode("utf-8", "replace")
        except httpx.RequestNotRead:
            sent = ""
        record(f"{response.request.method} {response.request.url.path}", response.status_code, sent, body)
    except Exception:  # the recorder must never change what a test sees
        pass


def install() -> None:
    if getattr(httpx.Client.send, "_leak_recorder", False):
        return
    sync_send, async_send = httpx.Client.send, httpx.AsyncClient.send

    def send(self, request, *args, **kwargs):
        response = sync_send(self, request, *args, **kwargs)
        _keep(response)
        return response

    async def asend(self, request, *args, **kwargs):
        response = await async_send(self, request, *args, **kwargs)
        _keep(response)
        return response

    send._leak_recorder = asend._leak_recorder = True
    httpx.Client.send, httpx.AsyncClient.send = send, asend


def leaks() -> list[tuple[str, int, str]]:
    """(request line, status, marker) for each error body naming a path the request did not."""
    found = []
    for line, status, sent, body in seen:
        for marker in PATH_MARKERS:
            if marker in body and marker not in sent:
                found.append((line, status, marker))
    return found
