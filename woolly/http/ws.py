"""WebSocket `/ws`: many generate/chat requests in flight on one socket, each cancellable by id.

Client messages: generate {id, prompt, config, model?, keep_alive?}, chat {id, messages, config, model?,
keep_alive?}, cancel {id},
status {}. Server events: token, complete, error, status (the reference's shapes).
"""
from __future__ import annotations

import asyncio
import time

import msgspec
from litestar.connection import WebSocket
from litestar.exceptions import WebSocketDisconnect

from woolly.engine import TokenEvent
from woolly.errors import InvalidRequest, RateLimited, WoollyError
from woolly.http import schemas as S
from woolly.http.request_body import check_depth

MAX_IN_FLIGHT = 16


class ClientMessage(msgspec.Struct, kw_only=True):
    type: str
    id: str | None = None
    prompt: str | None = None
    messages: list[S.ChatMessage] | None = None
    config: S.SamplingFields | None = None
    model: S.ModelName | None = None            # default: the default model, as the HTTP routes
    keep_alive: S.KeepAlive | None = None


async def serve_socket(socket: WebSocket, server) -> None:
    await socket.accept()
    send_lock = asyncio.Lock()
    tasks: dict[str, asyncio.Task] = {}
    sent: dict[str, dict] = {}   # id -> what its token events carried so far: {"text": [str], "tokens": int, "start": s}
    max_depth = server.config.server.max_json_depth

    async def send(event: dict) -> None:
        async with send_lock:
            await socket.send_text(msgspec.json.encode(event).decode())

    async def send_error(request_id, exc: WoollyError) -> None:
        await send({"type": "error", "request_id": request_id, "error": exc.message, "code": exc.code})

    async def run(msg: ClientMessage) -> None:
        rid = msg.id
        progress = sent[rid] = {"text": [], "tokens": 0, "start": time.perf_counter()}
        try:
            options = msg.config.options() if msg.config else {}
            if msg.type == "generate" and msg.prompt is None:
                raise InvalidRequest("a generate message needs a prompt")
            if msg.type == "chat" and not msg.messages:
                raise InvalidRequest("a chat message needs messages")
            async with server.use(msg.model, msg.keep_alive) as engine:
                if msg.type == "generate":
                    ids = await server.prompt_ids(engine, msg.prompt)
                else:
                    ids = await server.chat_ids(engine, msg.messages)
                index = 0
                async for event in server.events(engine, ids, options):
                    if isinstance(event, TokenEvent):
                        if event.text:
                            await send({"type": "token", "request_id": rid, "token": event.text, "index": index,
                                        "timestamp": int(time.time() * 1000)})
                            index += 1
                            progress["text"].append(event.text)
                        progress["tokens"] = event.index + 1
                    else:
                        await send({"type": "complete", "request_id": rid, "text": event.text,
                                    "tokens_generated": event.generated_tokens,
                                    "generation_time_ms": int(event.generation_time * 1000),
                                    "finish_reason": event.finish_reason})
        except WoollyError as e:
            await send_error(rid, e)
        finally:
            tasks.pop(rid, None)
            sent.pop(rid, None)

    await send(status_event(server))
    try:
        while True:
            raw = await socket.receive_text()
            try:
                check_depth(raw, max_depth)   # before msgspec's recursive decoder, which a deep message overflows
            except InvalidRequest as e:
                await send_error(None, e)
                continue
            try:
                msg = msgspec.json.decode(raw, type=ClientMessage)
            except msgspec.DecodeError as e:
                await send_error(_request_id(raw), InvalidRequest(f"invalid message: {e}"))
                continue
            if msg.type == "status":
                await send(status_event(server))
            elif msg.type == "cancel":
                task = tasks.get(msg.id or "")
                if task is not None:
                    task.cancel()   # its generation stops at the next decode step
                    await send(cancelled_event(msg.id, sent.get(msg.id)))
            elif msg.type in ("generate", "chat"):
                if not msg.id:
                    await send_error(None, InvalidRequest("a request needs an id"))
                elif msg.id in tasks:
                    await send_error(msg.id, InvalidRequest(f"request id {msg.id!r} is already in flight"))
                elif len(tasks) >= MAX_IN_FLIGHT:
                    await send_error(msg.id, InvalidRequest(f"at most {MAX_IN_FLIGHT} requests in flight per socket"))
                elif limited := await server.rate_limited(socket.scope):   # one request of the client's budget
                    await send_error(msg.id, RateLimited(f"too many requests; retry in {limited['Retry-After']}s",
                                                         details={"retry_after": int(limited["Retry-After"])}))
                else:
                    tasks[msg.id] = asyncio.create_task(run(msg))
            else:
                await send_error(msg.id, InvalidRequest(f"unknown message type {msg.type[:32]!r}"))
    except WebSocketDisconnect:
        pass
    finally:
        for task in list(tasks.values()):
            task.cancel()


def cancelled_event(rid: str, progress: dict | None) -> dict:
    """The complete event of a cancelled request: the text and token count its token events carried."""
    progress = progress or {"text": [], "tokens": 0, "start": time.perf_counter()}
    return {"type": "complete", "request_id": rid, "text": "".join(progress["text"]),
            "tokens_generated": progress["tokens"],
            "generation_time_ms": int((time.perf_counter() - progress["start"]) * 1000), "finish_reason": "cancelled"}


def status_event(server) -> dict:
    """The default model's name; sessions and memory over every loaded model."""
    from woolly.engine.engine import rss_anon_bytes

    stats = [e.stats() for _, e in server.pool.loaded()]
    gpu = server.pool.config.enable_gpu and stats
    return {"type": "status", "model": server.pool.default, "active_sessions": sum(s.active_sessions for s in stats),
            "memory_used": rss_anon_bytes(), "gpu_memory_used": stats[0].device_memory if gpu else 0}


def _request_id(raw: str) -> str | None:
    """The id of a message that failed validation, so its error event reaches that request's handler."""
    try:
        msg = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return None
    rid = msg.get("id") if isinstance(msg, dict) else None
    return rid if isinstance(rid, str) else None
