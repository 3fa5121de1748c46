"""Helpers for streamed answers."""
from __future__ import annotations

from typing import AsyncIterator

from litestar.response import ServerSentEvent
from litestar.response.sse import ServerSentEventMessage


class Primed:
    """An async event iterator whose first event was already awaited, so errors that come
    before any output (bad parameters, no model) surface as a plain HTTP error, not mid-stream."""

    def __init__(self, events: AsyncIterator, first):
        self.events, self.first = events, first

    def __aiter__(self):
        return self._iter()

    async def _iter(self):
        if self.first is not None:
            yield self.first
        async for ev in self.events:
            yield ev

    async def aclose(self) -> None:
        await self.events.aclose()


async def prime(events: AsyncIterator) -> Primed:
    try:
        first = await events.__anext__()
    except StopAsyncIteration:
        first = None
    return Primed(events, first)


class EventStream(ServerSentEvent):
    """An SSE response that keeps `Content-Type: text/event-stream`, its lines ended by `\n`.

    Litestar lets a route's media type (JSON, the default) override a returned
    ServerSentEvent's own, so SSE clients that check the header would refuse the stream.
    Litestar ends lines with `\r\n`, which the SSE spec allows but line-splitting clients
    (the reference's own TypeScript one: `data === '[DONE]'`) read as `[DONE]\r`: each
    event here is `data: <text>\n\n`, as OpenAI and Ollama send it.
    """

    def __init__(self, events: AsyncIterator[str], **kwargs):
        super().__init__(_lf_framed(events), **kwargs)

    def to_asgi_response(self, *args, **kwargs):
        kwargs["media_type"] = "text/event-stream"
        return super().to_asgi_response(*args, **kwargs)


async def _lf_framed(events: AsyncIterator[str]) -> AsyncIterator[ServerSentEventMessage]:
    async for data in events:
        yield ServerSentEventMessage(data=data, sep="\n")
