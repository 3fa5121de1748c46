"""A JSON-message view of one `/ws` connection to a live server, and a runner of one scenario on it."""
from __future__ import annotations

import asyncio
import json

import websockets


class Socket:
    """A JSON-message view of one connection, collecting every event it receives."""

    def __init__(self, ws):
        self.ws, self.events = ws, []

    async def send(self, **message) -> None:
        await self.ws.send(json.dumps(message))

    async def next(self, timeout: float = 120) -> dict:
        event = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        self.events.append(event)
        return event

    async def until(self, predicate, timeout: float = 120) -> dict:
        while True:
            event = await self.next(timeout)
            if predicate(event):
                return event

    async def finish(self, *request_ids: str) -> dict[str, dict]:
        """Read until every request has its complete or error event; those events by id."""
        ends: dict[str, dict] = {}
        while set(ends) != set(request_ids):
            e = await self.next()
            if e["type"] in ("complete", "error") and e.get("request_id") in request_ids:
                ends[e["request_id"]] = e
        return ends

    def tokens(self, request_id: str) -> list[dict]:
        return [e for e in self.events if e["type"] == "token" and e["request_id"] == request_id]


def run_socket(url: str, scenario, headers: dict | None = None):
    async def main():
        async with websockets.connect(url, additional_headers=headers, max_size=None) as ws:
            sock = Socket(ws)
            return await scenario(sock)
    return asyncio.run(main())
