"""Helpers for streamed answers."""
from __future__ import annotations

from typing import AsyncIterator


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
