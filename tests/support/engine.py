"""Helpers for the engine tests: the shared engine shape and a runner of one request's events."""
from __future__ import annotations

import asyncio

from woolly.engine import Engine, EngineConfig, TokenEvent

SLOTS = 8     # every engine test (and the notebooks) uses these shapes, so compiled code is shared
SEQ = 256


def make_engine(path: str) -> Engine:
    engine = Engine(EngineConfig(max_batch_size=SLOTS, max_sequence_length=SEQ))
    engine.load_model(path)
    return engine


def run_events(session, prompt, **options):
    """All of one generation's events -> (token events in order, GenerationResult)."""
    async def go():
        tokens, result = [], None
        async for event in session.generate_events(prompt, **options):
            if isinstance(event, TokenEvent):
                tokens.append(event)
            else:
                result = event
        return tokens, result
    return asyncio.run(go())
