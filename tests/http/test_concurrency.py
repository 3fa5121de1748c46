"""Concurrency against a real server: 8 streams decode together, disconnects free their slots."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import websockets

from support.live_server import MAX_QUEUE
from support.long_request import long_running
from support.metrics import metric, sse_events, wait_for_idle

pytestmark = pytest.mark.real

STREAMS = 8


async def timed_stream(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> dict:
    """Stream one generation; when its first token and its end arrived, and its tokens."""
    tokens, first = [], None
    async with client.stream("POST", "/api/generate", json={"prompt": prompt, "max_tokens": max_tokens,
                                                            "temperature": 0.8, "seed": 7, "stream": True}) as r:
        assert r.status_code == 200
        async for event in sse_events(r):
            tokens.append(event["token"])
            if first is None:
                first = time.monotonic()
    return {"first": first, "end": time.monotonic(), "tokens": tokens}


def test_eight_streams_all_receive_tokens_while_the_others_run(server, http):
    wait_for_idle(http)

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            return await asyncio.gather(*(timed_stream(client, f"Story number {i}:", 8) for i in range(STREAMS)))

    results = asyncio.run(main())
    assert all(r["tokens"] for r in results), [len(r["tokens"]) for r in results]
    last_first_token = max(r["first"] for r in results)
    first_end = min(r["end"] for r in results)
    assert last_first_token < first_end, "a stream got its first token only after another had finished"
    wait_for_idle(http)


def test_disconnect_mid_stream_frees_the_slot(server, http):
    wait_for_idle(http)
    before = metric(http, "woolly_tokens_generated")
    with httpx.Client(base_url=server.url, timeout=300) as client:
        with client.stream("POST", "/api/generate", json={"prompt": "Count from one to one thousand:",
                                                          "max_tokens": 200, "temperature": 0,
                                                          "stream": True}) as r:
            lines = r.iter_lines()
            got = [line for _, line in zip(range(6), (x for x in lines if x.startswith("data:")))]
            assert len(got) == 6
            assert metric(http, "woolly_slots_in_use") == 1
            t0 = time.monotonic()
            health = http.get("/health")   # answers while the generation runs
            assert health.status_code == 200 and time.monotonic() - t0 < 5
        # leaving the block closes the connection mid-stream
    wait_for_idle(http, timeout=15)
    generated = metric(http, "woolly_tokens_generated") - before
    assert generated < 100, f"{generated:.0f} tokens were generated for a client that left after 6"


def test_websocket_closed_mid_generation_frees_the_slot(server, http):
    wait_for_idle(http)
    before = metric(http, "woolly_tokens_generated")

    async def leave_early():
        async with websockets.connect(server.ws_url) as ws:
            await ws.recv()   # status
            await ws.send(json.dumps({"type": "generate", "id": "gone", "prompt": "Count from one to one thousand:",
                                      "config": {"max_tokens": 200, "temperature": 0}}))
            while json.loads(await ws.recv())["type"] != "token":
                pass

    asyncio.run(leave_early())
    wait_for_idle(http, timeout=15)
    assert metric(http, "woolly_tokens_generated") - before < 100


def test_many_early_cancels_leave_nothing_behind(server, http):
    """Streams abandoned right after they start, then streams that must all complete."""
    wait_for_idle(http)

    async def abandon(client, i):
        async with client.stream("POST", "/api/generate", json={"prompt": f"Abandoned {i}", "max_tokens": 100,
                                                                "stream": True}) as r:
            assert r.status_code == 200
            await asyncio.sleep(0.01)

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            await asyncio.gather(*(abandon(client, i) for i in range(STREAMS)))
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            return await asyncio.gather(*(timed_stream(client, f"Then {i}", 2) for i in range(STREAMS)))

    results = asyncio.run(main())
    assert all(r["tokens"] for r in results)
    wait_for_idle(http, timeout=30)


def test_full_queue_answers_busy_and_the_queued_still_complete(server, http):
    """Slots all busy and the queue full: the extra requests get 503 SERVER_BUSY, not a reset;
    the queued ones run once the slots free up."""
    wait_for_idle(http)
    extra = 3

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            longs = await asyncio.gather(*(client.send(client.build_request(
                "POST", "/api/generate", json={**long_running(i, 200), "stream": True}),
                stream=True) for i in range(STREAMS)))   # each answers once its first token is out
            assert [r.status_code for r in longs] == [200] * STREAMS
            burst = [asyncio.create_task(client.post("/api/generate", json={"prompt": f"Queued {i}", "max_tokens": 1}))
                     for i in range(MAX_QUEUE + extra)]
            deadline = time.monotonic() + 60
            while sum(t.done() for t in burst) < extra and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            refused = [t.result() for t in burst if t.done()]
            queued = float((await client.get("/metrics")).text.split("\nwoolly_queue_depth ")[1].split()[0])
            for r in longs:
                await r.aclose()   # free the slots
            return refused, queued, await asyncio.gather(*burst)

    refused, queued, answers = asyncio.run(main())
    assert len(refused) == extra and queued == MAX_QUEUE
    for r in refused:
        assert r.status_code == 503 and r.json()["error"]["code"] == "SERVER_BUSY"
    assert sorted(r.status_code for r in answers) == [200] * MAX_QUEUE + [503] * extra
    wait_for_idle(http)

