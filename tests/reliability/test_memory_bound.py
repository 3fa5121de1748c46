"""issue 15 "Cannot be knocked over": the prefix cache's byte bound holds for the whole process.

Disconnect storms (many clients start a streamed generation and leave after its first token)
make every request end cancelled and store a slot's KV, so the cache churns: one entry stored
and one evicted per request. The server's RssAnon must then grow by no more than the cache's
bound over what the same storms cost a server without a cache (plus slack). Before the fix,
glibc kept the evicted entries' buffers in its heap: the default 1 GiB cache grew
~1.9 GB (vs ~0.15 GB without a cache); after it, ~1.0 GB.
"""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from support.live_server import MODEL, base_config, start_server, stop_server
from support.metrics import rss_anon_kib, wait_for_idle

pytestmark = [pytest.mark.real, pytest.mark.slow]

CACHE_BOUND = 1 << 30     # bytes (the default): 11 entries of SmolLM2's 2048-position slot (90 MiB each)
STORMS, CLIENTS = 8, 16
SLACK = 128 << 20         # bytes beyond bound + the cacheless server's growth (allocator noise)


async def _storm(url: str, storm: int) -> list:
    async def one(client, i):
        body = {"prompt": f"Storm {storm}, client {i} writes about topic {i * 7 + storm}", "max_tokens": 64,
                "stream": True}
        async with client.stream("POST", "/api/generate", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    return r.status_code   # leave after the first event: the request is cancelled
        return r.status_code

    limits = httpx.Limits(max_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        return await asyncio.gather(*(one(client, i) for i in range(CLIENTS)))


def _growth_over_storms(workdir, cache: dict) -> tuple[int, list[int]]:
    """A 4-slot, 2048-position server with `cache`: RssAnon growth (bytes) from warm to after the storms."""
    config = base_config(max_batch_size=4, max_sequence_length=2048)
    config["server"]["max_queue"] = 4 * CLIENTS
    config["cache"] = cache
    config["logging"]["level"] = "warning"
    config["models"] = {"preload": [MODEL]}
    srv = start_server(workdir, config, model=None)
    try:
        with httpx.Client(base_url=srv.url, timeout=300) as http:
            assert http.post("/api/generate", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
            base = rss_anon_kib(srv.process.pid)
            samples = [base]
            for s in range(STORMS):
                assert asyncio.run(_storm(srv.url, s)) == [200] * CLIENTS
                wait_for_idle(http)
                samples.append(rss_anon_kib(srv.process.pid))
            time.sleep(1.0)
            samples.append(rss_anon_kib(srv.process.pid))
        return (samples[-1] - base) * 1024, [k >> 10 for k in samples]
    finally:
        stop_server(srv)


def test_rss_after_disconnect_storms_stays_within_the_cache_bound(tmp_path):
    without, mib_without = _growth_over_storms(tmp_path / "nocache", {"enabled": False})
    with_cache, mib_with = _growth_over_storms(tmp_path / "cache", {"enabled": True, "size": CACHE_BOUND})
    assert with_cache <= CACHE_BOUND + without + SLACK, (
        f"RssAnon MiB with a {CACHE_BOUND >> 20} MiB cache: {mib_with}; without a cache: {mib_without}")
