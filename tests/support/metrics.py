"""Helpers of the reliability tests: /metrics gauges, idle waits, one streamed generation, RssAnon."""
from __future__ import annotations

import json
import time
from typing import AsyncIterator

import httpx


def metric(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


def wait_for_idle(http: httpx.Client, timeout: float = 30.0) -> float:
    """Seconds until no slot decodes and nothing waits; fails after `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if metric(http, "woolly_slots_in_use") == 0 and metric(http, "woolly_queue_depth") == 0:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"slots in use: {metric(http, 'woolly_slots_in_use')}, "
                         f"queued: {metric(http, 'woolly_queue_depth')} after {timeout}s")


def handled_requests(http: httpx.Client, route: str = "/api/generate") -> float:
    """Requests to `route` the server has finished with (any status), from woolly_requests_total."""
    total = 0.0
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("woolly_requests_total{") and f'route="{route}"' in line:
            total += float(line.split()[-1])
    return total


def wait_for_settled(http: httpx.Client, quiet: float = 2.0, timeout: float = 60.0) -> float:
    """Seconds until idle and no request to /api/generate has finished for `quiet` seconds.

    Idle alone is not enough after clients leave early: a loaded server may still be parsing a
    request whose client is gone, and queue it a moment later.
    """
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        wait_for_idle(http, timeout)
        count = handled_requests(http)
        time.sleep(quiet)
        if handled_requests(http) == count and metric(http, "woolly_slots_in_use") == 0 \
                and metric(http, "woolly_queue_depth") == 0:
            return time.monotonic() - start - quiet
    raise AssertionError(f"requests still arriving or running after {timeout}s")


async def sse_events(response: httpx.Response) -> AsyncIterator[dict]:
    """The JSON events of a streaming response's `data:` lines, as they arrive, up to [DONE]."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


async def stream_text(client: httpx.AsyncClient, body: dict, route: str = "/api/generate") -> dict:
    """One streamed generation: its status, text, and error event (if any), read to [DONE]."""
    pieces, error = [], None
    async with client.stream("POST", route, json={**body, "stream": True}) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code, "text": "", "error": r.json()["error"]}
        async for event in sse_events(r):
            if "error" in event:
                error = event["error"]
            else:
                pieces.append(event["token"])
    return {"status": 200, "text": "".join(pieces), "error": error}


def rss_anon_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise AssertionError("no RssAnon in /proc/PID/status")
