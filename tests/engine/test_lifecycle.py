"""Model lifecycle under load: unloading while a request runs, reloading, a failed load."""
from __future__ import annotations

import asyncio

import pytest

from woolly.errors import ModelNotFound, ModelNotLoaded, WoollyError

from support.engine import make_engine

pytestmark = pytest.mark.real

PROMPT = "The history of the printing press begins"


def greedy(engine, n=8):
    return engine.create_session().generate_sync(PROMPT, max_tokens=n, temperature=0)


def interrupted_stream(session, interrupt):
    """Stream a long greedy generation and call `interrupt()` after its second piece: the pieces,
    and the ModelNotLoaded the stream must end with."""
    async def consume():
        pieces = []
        with pytest.raises(ModelNotLoaded) as info:
            async for piece in session.generate_stream(PROMPT, max_tokens=200, temperature=0):
                pieces.append(piece)
                if len(pieces) == 2:
                    interrupt()
        return pieces, info.value
    return asyncio.run(consume())


def test_unload_while_generating_ends_the_request_and_a_reload_serves_again(engine, smollm2_path):
    before = greedy(engine)
    session = engine.create_session()
    pieces, err = interrupted_stream(session, engine.unload_model)
    assert err.code == "MODEL_NOT_LOADED" and 2 <= len(pieces) < 200
    assert engine.current_model_name is None and engine.stats().model is None
    with pytest.raises(ModelNotLoaded):
        engine.create_session()
    with pytest.raises(ModelNotLoaded):
        session.generate_sync(PROMPT, max_tokens=4)
    with pytest.raises(ModelNotLoaded):
        engine.unload_model()
    engine.load_model(smollm2_path)
    assert engine.current_model_name == "smollm2-135m-instruct"
    assert greedy(engine) == before


def test_a_failed_load_leaves_the_previous_model_serving(engine, smollm2_path, tmp_path):
    before = greedy(engine)
    truncated = tmp_path / "truncated.gguf"
    with open(smollm2_path, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(2 << 20))       # 2 MiB of a ~94 MiB file: tensor data missing
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    for bad in (truncated, garbage):
        with pytest.raises(WoollyError):
            engine.load_model(str(bad))
        assert engine.current_model_name == "smollm2-135m-instruct"
    with pytest.raises(ModelNotFound):
        engine.load_model(str(tmp_path / "missing.gguf"))
    assert engine.current_model_name == "smollm2-135m-instruct"
    assert greedy(engine) == before


def test_close_ends_requests_frees_the_model_and_is_idempotent(smollm2_path):
    """`Engine.close()` (here through `with`): a running request ends with MODEL_NOT_LOADED, the
    scheduler thread stops, the prefix cache is emptied; closing again is a no-op."""
    with make_engine(smollm2_path) as engine:
        greedy(engine)   # leaves an entry in the prefix cache
        sched = engine.scheduler()
        assert sched.prefix_cache.entries
        pieces, err = interrupted_stream(engine.create_session(), engine.close)
        assert "closed" in err.message and 2 <= len(pieces) < 200
        assert not sched._thread.is_alive() and not sched.prefix_cache.entries
        assert engine.current_model_name is None
    engine.close()
    with pytest.raises(ModelNotLoaded):
        engine.create_session()
    engine.load_model(smollm2_path)   # a closed engine can load again
    assert greedy(engine, 4)
    engine.close()
