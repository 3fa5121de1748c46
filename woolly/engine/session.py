"""`Session`: one conversation over the engine's shared scheduler.

A session remembers its context (prompt and generated tokens): the next `generate`
continues after it, and the scheduler's prefix cache means the history is not
prefilled again. Async methods for servers and notebooks, `*_sync` for scripts.
"""
from __future__ import annotations

import asyncio
import contextlib
import queue
from dataclasses import dataclass
from typing import AsyncIterator, Iterator

from woolly.engine.samplers import GenerationParams
from woolly.engine.scheduler import GenerationResult, Request, TokenEvent
from woolly.errors import WoollyError


@dataclass
class SessionStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cached_prompt_tokens: int = 0
    time_to_first_token: float | None = None   # seconds, last generation
    tokens_per_second: float = 0.0              # last generation
    generations: int = 0
    last_finish_reason: str | None = None


class Session:
    def __init__(self, engine, session_id: int):
        self.engine = engine
        self.id = session_id
        self.context: list[int] = []
        self._stats = SessionStats()
        self._current: Request | None = None
        self.last_result: GenerationResult | None = None

    # -- the reference's API -------------------------------------------------------------
    async def generate(self, prompt: str, max_tokens: int = 128, temperature: float = 0.8, top_p: float = 0.95,
                       **options) -> str:
        """The whole completion of `prompt` (continuing this session's context) as text."""
        parts = []
        async for piece in self.generate_stream(prompt, max_tokens, temperature, top_p, **options):
            parts.append(piece)
        return "".join(parts)

    def generate_stream(self, prompt: str, max_tokens: int = 128, temperature: float = 0.8, top_p: float = 0.95,
                        tx: asyncio.Queue | None = None, **options):
        """Decoded text pieces as they come (never a broken character), as an async iterator.

        With `tx` (an asyncio.Queue), the reference's channel form: a coroutine that puts each
        piece on `tx`, then None, and returns when generation ends, so it can be awaited or
        run as a task (`asyncio.create_task(session.generate_stream(..., tx=tx))`)."""
        pieces = self._pieces(prompt, max_tokens, temperature, top_p, **options)
        return pieces if tx is None else self._send(pieces, tx)

    async def _send(self, pieces: AsyncIterator[str], tx: asyncio.Queue) -> None:
        try:
            async with contextlib.aclosing(pieces):
                async for piece in pieces:
                    await tx.put(piece)
        finally:
            await tx.put(None)

    async def _pieces(self, prompt, max_tokens, temperature, top_p, **options) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        req = self._submit(prompt, lambda e: loop.call_soon_threadsafe(events.put_nowait, e), max_tokens=max_tokens,
                           temperature=temperature, top_p=top_p, **options)
        done = False
        try:
            while True:
                event = await events.get()
                if isinstance(event, TokenEvent):
                    if event.text:
                        yield event.text
                elif isinstance(event, GenerationResult):
                    done = True
                    self._record(req, event)
                    break
                else:
                    done = True
                    raise event
        finally:
            if not done:       # the consumer went away: stop generating at the next step
                req.cancel()

    async def generate_events(self, prompt: str | list[int], **options) -> AsyncIterator[TokenEvent | GenerationResult]:
        """TokenEvent ... then one GenerationResult (an error is raised): for servers needing ids and counts."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        req = self._submit(prompt, lambda e: loop.call_soon_threadsafe(events.put_nowait, e), **options)
        done = False
        try:
            while True:
                event = await events.get()
                if isinstance(event, WoollyError):
                    done = True
                    raise event
                if isinstance(event, GenerationResult):
                    done = True
                    self._record(req, event)
                yield event
                if done:
                    return
        finally:
            if not done:
                req.cancel()

    def cancel_generation(self) -> None:
        """Stop the running generation; it ends with finish_reason "cancelled" within one step."""
        if self._current is not None:
            self._current.cancel()

    def stats(self) -> SessionStats:
        return self._stats

    def clear_context(self) -> None:
        self.context = []

    # -- synchronous forms for scripts and notebooks ----------------------------------------
    def generate_sync(self, prompt: str, max_tokens: int = 128, temperature: float = 0.8, top_p: float = 0.95,
                      **options) -> str:
        return "".join(self.stream_sync(prompt, max_tokens, temperature, top_p, **options))

    def stream_sync(self, prompt: str, max_tokens: int = 128, temperature: float = 0.8, top_p: float = 0.95,
                    **options) -> Iterator[str]:
        q: queue.Queue = queue.Queue()
        req = self._submit(prompt, q.put, max_tokens=max_tokens, temperature=temperature, top_p=top_p, **options)
        done = False
        try:
            while True:
                event = q.get()
                if isinstance(event, TokenEvent):
                    if event.text:
                        yield event.text
                elif isinstance(event, GenerationResult):
                    done = True
                    self._record(req, event)
                    return
                else:
                    done = True
                    raise event
        finally:
            if not done:
                req.cancel()

    # -- internals ---------------------------------------------------------------------------
    def _submit(self, prompt: str | list[int], emit, **options) -> Request:
        params = GenerationParams.from_kwargs(**options)
        if isinstance(prompt, str):
            ids = self.engine.tokenize(prompt, add_bos=None if not self.context else False)
        else:
            ids = list(prompt)
            self.engine.check_token_ids(ids)
        prompt_ids = self.context + ids
        req = self.engine.scheduler().submit(prompt_ids, params, emit)
        self._current = req
        return req

    def _record(self, req: Request, result: GenerationResult) -> None:
        self.last_result = result
        self.context = req.prompt_ids + result.token_ids
        s = self._stats
        s.prompt_tokens += result.prompt_tokens
        s.generated_tokens += result.generated_tokens
        s.cached_prompt_tokens += result.cached_prompt_tokens
        s.time_to_first_token = result.time_to_first_token
        s.tokens_per_second = result.tokens_per_second
        s.generations += 1
        s.last_finish_reason = result.finish_reason
        self.engine._count_generated(result.generated_tokens)
