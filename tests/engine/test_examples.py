"""The reference's two Rust examples ("Basic Text Generation", "Streaming Generation") written in
Python against this API, run on SmolLM2. Only the model path and the engine's shapes differ: the
tests' small shapes (support.py), so compiled code is shared with the other engine tests."""
from __future__ import annotations

import asyncio

import pytest

from woolly.engine import Engine, EngineConfig

from support.engine import SEQ, SLOTS

pytestmark = pytest.mark.real


async def basic_generation(model_path: str):
    # Create engine
    config = EngineConfig.builder() \
        .enable_gpu(True) \
        .max_sequence_length(SEQ) \
        .max_batch_size(SLOTS) \
        .build()
    engine = Engine(config)
    # Load model
    engine.load_model(model_path)
    # Create session
    session = engine.create_session()
    # Generate text
    response = await session.generate(
        "Once upon a time",
        100,   # max_tokens
        0.7,   # temperature
        0.9,   # top_p
    )
    print(f"Generated: {response}")
    return engine, session, response


async def streaming_generation(model_path: str):
    engine = Engine(EngineConfig(max_batch_size=SLOTS, max_sequence_length=SEQ))
    engine.load_model(model_path)
    session = engine.create_session()
    # Create channel for streaming
    tx: asyncio.Queue = asyncio.Queue(100)
    # Start generation in background
    handle = asyncio.create_task(session.generate_stream("Tell me a story about", 200, 0.7, 0.9, tx=tx))
    # Process tokens as they arrive
    tokens = []
    while (token := await tx.get()) is not None:
        print(token, end="", flush=True)
        tokens.append(token)
    # Wait for completion
    await handle
    return engine, session, tokens


def test_basic_generation(smollm2_path, capsys):
    engine, session, response = asyncio.run(basic_generation(smollm2_path))
    try:
        assert capsys.readouterr().out == f"Generated: {response}\n"
        r = session.last_result
        assert response and response == r.text
        assert r.finish_reason == "length" and r.generated_tokens == 100 or r.finish_reason == "stop"
        assert session.stats().prompt_tokens == len(engine.tokenize("Once upon a time"))
    finally:
        engine.unload_model()


def test_streaming_generation(smollm2_path, capsys):
    engine, session, tokens = asyncio.run(streaming_generation(smollm2_path))
    try:
        r = session.last_result
        assert len(tokens) > 1 and capsys.readouterr().out == "".join(tokens) == r.text
        assert r.finish_reason == "length" and r.generated_tokens == 200 or r.finish_reason == "stop"
        assert session.stats().generated_tokens == r.generated_tokens
    finally:
        engine.unload_model()
