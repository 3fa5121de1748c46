"""The Litestar app: the reference's routes, OpenAI's /v1, WebSocket /ws, /metrics, /schema.

Handlers stay thin: parse (msgspec schemas), call the engine, shape the answer. Errors
are `WoollyError`s turned into `{"error": {message, code, details}}` by one handler,
with the status from `woolly.errors.HTTP_STATUS`.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import msgspec
from litestar import Litestar, Request, Response, get, post, websocket
from litestar.config.cors import CORSConfig
from litestar.connection import WebSocket
from litestar.exceptions import HTTPException
from litestar.middleware.rate_limit import RateLimitConfig
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.types import ASGIApp, Receive, Scope, Send

import woolly
from woolly.config import WoollyConfig, parse_keep_alive
from woolly.engine import Engine
from woolly.engine.pool import KEEP, ModelPool
from woolly.errors import HTTP_STATUS, ContextLengthExceeded, InvalidRequest, ModelNotFound, ModelNotLoaded, WoollyError
from woolly.http import schemas as S
from woolly.http.chat import chat_prompt_ids
from woolly.http.metrics import Metrics
from woolly.http.responses import ERROR_RESPONSES
from woolly.http.models_list import list_model_infos
from woolly.http.streaming import EventStream, Primed, prime

log = logging.getLogger("woolly.http")
access_log = logging.getLogger("woolly.access")

FRAMEWORK_CODES = {400: "INVALID_REQUEST", 401: "UNAUTHORIZED", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED",
                   413: "PAYLOAD_TOO_LARGE", 429: "RATE_LIMITED"}


def error_response(status: int, code: str, message: str, details: dict | None = None,
                   headers: dict | None = None) -> Response:
    body = S.ErrorResponse(S.ErrorBody(message=message, code=code, details=details or {}))
    return Response(content=msgspec.json.encode(body), status_code=status, media_type="application/json",
                    headers=headers)


def woolly_error_handler(_: Request, exc: WoollyError) -> Response:
    return error_response(HTTP_STATUS.get(exc.code, 500), exc.code, exc.message, exc.details)


def http_error_handler(_: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    headers = dict(exc.headers or {})
    if status == 429:
        headers.setdefault("Retry-After", str(headers.get("RateLimit-Reset", 60)))
        return error_response(429, "RATE_LIMITED", "too many requests; retry later", headers=headers)
    if status == 400 and exc.extra:
        message, fields = _validation_message(exc)
        return error_response(400, "INVALID_REQUEST", message, {"fields": fields} if fields else None)
    code = FRAMEWORK_CODES.get(status, "INTERNAL_ERROR" if status >= 500 else "INVALID_REQUEST")
    message = exc.detail if status < 500 else "internal server error"
    return error_response(status, code, message, headers=headers or None)


def _validation_message(exc: HTTPException) -> tuple[str, list[str]]:
    """Litestar's validation errors -> one message naming each bad field, and those fields."""
    extra = exc.extra
    if isinstance(extra, list) and extra and isinstance(extra[0], dict):
        fields = [str(e["key"]) for e in extra[:3] if e.get("key")]
        parts = [f"{e['key']}: {e.get('message', '')}" if e.get("key") else str(e.get("message", e))
                 for e in extra[:3]]
        return "; ".join(parts), fields
    return str(exc.detail), []


def undecodable_body_handler(_: Request, exc: UnicodeDecodeError) -> Response:
    """Litestar decodes a JSON body as UTF-8 without catching the error: a 400, not a 500."""
    return error_response(400, "INVALID_REQUEST",
                          f"the request body is not valid UTF-8 ({exc.reason} at byte {exc.start})")


def internal_error_handler(_: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, "INTERNAL_ERROR", "internal server error")


class AccessLogAndAuth:
    """ASGI middleware: header limits, API keys (constant-time), then one access-log line per request.

    uvicorn's h11 parser bounds only headers that arrive in pieces: a header block sent in one
    write passes whatever its size, so the limits on their number and size are enforced here.
    """

    PUBLIC = ("/health",)
    MAX_HEADERS = 128
    MAX_HEADER_BYTES = 32 * 1024

    def __init__(self, app: ASGIApp, keys: list[str], required: bool, metrics: Metrics):
        self.app, self.metrics = app, metrics
        self.keys = [k.encode() for k in keys] if required else []

    def _authorized(self, scope: Scope) -> bool:
        if not self.keys or scope.get("path") in self.PUBLIC or scope.get("method") == "OPTIONS":
            return True
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        given = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
        ok = False
        for key in self.keys:  # compare against every key, always, in constant time
            ok |= hmac.compare_digest(hashlib.sha256(given).digest(), hashlib.sha256(key).digest())
        return ok and bool(given)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = {"code": 0}
        scope.setdefault("state", {})

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            elif message["type"] == "websocket.accept":
                status["code"] = 101
            await send(message)

        try:
            raw_headers = scope.get("headers") or []
            if len(raw_headers) > self.MAX_HEADERS or \
                    sum(len(k) + len(v) for k, v in raw_headers) > self.MAX_HEADER_BYTES:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    status["code"] = 431
                    return
                resp = error_response(431, "INVALID_REQUEST", f"too many or too large request headers (at most "
                                      f"{self.MAX_HEADERS} headers, {self.MAX_HEADER_BYTES} bytes)")
                return await resp.to_asgi_response(None, None)(scope, receive, send_wrapper)  # type: ignore[arg-type]
            if not self._authorized(scope):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 4401})
                    status["code"] = 401
                    return
                resp = error_response(401, "UNAUTHORIZED", "missing or invalid API key",
                                      headers={"WWW-Authenticate": "Bearer"})
                return await resp.to_asgi_response(None, None)(scope, receive, send_wrapper)  # type: ignore[arg-type]
            await self.app(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - start
            path = scope.get("path", "")
            tokens = scope["state"].get("tokens", 0)
            self.metrics.observe_request(path, status["code"], elapsed)
            access_log.info("%s %s %s %.1fms tokens=%d", scope.get("method", "WS"), path, status["code"],
                            elapsed * 1000, tokens,
                            extra={"method": scope.get("method", "WS"), "path": path, "status": status["code"],
                                   "latency_ms": round(elapsed * 1000, 1), "tokens": tokens})


class Server:
    """The app's state: the model pool, config, metrics, start time."""

    def __init__(self, config: WoollyConfig, pool: ModelPool):
        self.config, self.pool = config, pool
        self.started = time.time()
        self.metrics = Metrics(pool)

    @property
    def engine(self) -> Engine:
        """The default model's engine (the one a request naming no model uses), when loaded."""
        engine = self.pool.current()
        if engine is None:
            raise ModelNotLoaded("no model is loaded; POST /api/models/load first")
        return engine

    # -- helpers shared by the routes -------------------------------------------------------------
    @staticmethod
    def model_name(name: str | None) -> str | None:
        """A request's `model`: a model's name (never a path), or None for the default model."""
        from woolly.registry import check_name, is_path

        if not name:
            return None
        if is_path(name):
            raise InvalidRequest("model must be a model name, not a path", details={"field": "model"})
        return check_name(name)

    @asynccontextmanager
    async def use(self, name: str | None, keep_alive: str | float | None = None) -> AsyncIterator[Engine]:
        """The engine of the request's model (loaded on demand, off the event loop), held while the block runs.

        Unknown name: 404 MODEL_NOT_FOUND; every loaded model busy and no room: 503 SERVER_BUSY.
        """
        name = self.model_name(name)
        keep = KEEP if keep_alive is None else parse_keep_alive(keep_alive)
        engine = self.pool.try_acquire(name, keep)
        if engine is None:   # a load (seconds): in a thread; a client gone meanwhile still releases it
            task = asyncio.ensure_future(asyncio.to_thread(self.pool.acquire, name, keep))
            try:
                engine = await asyncio.shield(task)
            except asyncio.CancelledError:
                task.add_done_callback(lambda t: t.cancelled() or t.exception() or self.pool.release(t.result()))
                raise
        try:
            yield engine
        finally:
            self.pool.release(engine)

    def load_spec(self, name: str) -> str:
        """/api/models/load's `name`: a model's name, or a `.gguf` path inside the models directory (else 400)."""
        from woolly.registry import check_name, is_path, models_dir

        if not is_path(name):
            return check_name(name)
        if any(ord(c) < 32 for c in name):
            raise InvalidRequest("a model path may not hold control characters", details={"field": "name"})
        root = os.path.abspath(models_dir())
        path = os.path.normpath(os.path.join(root, name))   # an absolute name replaces root
        if os.path.commonpath([root, path]) != root:
            raise InvalidRequest("a model path must be inside the models directory (models.directory)",
                                 details={"field": "name"})
        if not os.path.isfile(path):
            raise ModelNotFound(f"model file not found: {os.path.basename(path)}",
                                details={"model": name, "available_models": self.pool.available()})
        return path

    def max_tokens(self, engine: Engine, requested: int | None, prompt_len: int) -> int:
        context = engine.scheduler().runner.cache_length
        if prompt_len >= context:   # said as the prompt's fault, not max_tokens'
            raise ContextLengthExceeded(
                f"the prompt has {prompt_len} tokens; the context holds {context} "
                f"(prompt plus at least one generated token)",
                details={"prompt_tokens": prompt_len, "context_length": context})
        room = context - prompt_len
        if requested is None:
            return max(0, min(256, room))
        if requested > room:
            raise InvalidRequest(
                f"max_tokens={requested} plus the prompt's {prompt_len} tokens exceed the context of "
                f"{room + prompt_len}", details={"max_tokens": requested, "prompt_tokens": prompt_len})
        return requested

    async def events(self, engine: Engine, ids: list[int], options: dict) -> AsyncIterator[tuple[str, Any]]:
        session = engine.create_session()
        options = dict(options)
        options["max_tokens"] = self.max_tokens(engine, options.get("max_tokens"), len(ids))
        async for kind, payload in session.generate_events(ids, **options):
            yield kind, payload


def create_app(config: WoollyConfig, pool: ModelPool) -> Litestar:
    server = Server(config, pool)
    sec = config.security

    @get("/health", summary="Liveness, version and uptime", responses=ERROR_RESPONSES)
    async def health() -> S.Health:
        return S.Health(status="ok", version=woolly.__version__, uptime=int(time.time() - server.started),
                        model=server.pool.default)

    @get("/api/models", summary="Pulled and loaded models", responses=ERROR_RESPONSES)
    async def models() -> list[S.ModelInfo]:
        return await asyncio.to_thread(list_model_infos, server.pool)

    @post("/api/models/load", status_code=200,
          summary="Load a model (a pulled model's name, or a .gguf path in the models directory)",
          responses=ERROR_RESPONSES)
    async def load_model(data: S.LoadModelRequest) -> S.LoadModelResponse:
        spec = server.load_spec(data.name)
        keep = KEEP if data.keep_alive is None else parse_keep_alive(data.keep_alive)
        t0 = time.perf_counter()
        await asyncio.to_thread(server.pool.load, spec, keep)
        return S.LoadModelResponse(True, "Model loaded successfully", int((time.perf_counter() - t0) * 1000))

    @post("/api/models/unload", status_code=200, summary="Unload a model (default: every loaded model)",
          responses=ERROR_RESPONSES)
    async def unload_model(data: S.UnloadModelRequest | None = None) -> S.LoadModelResponse:
        name = server.model_name(data.name) if data is not None else None
        await asyncio.to_thread(server.pool.unload, name)
        return S.LoadModelResponse(True, "Model unloaded")

    @post("/api/generate", status_code=200,
          summary="Complete a prompt (JSON, or SSE with stream=true)", responses=ERROR_RESPONSES)
    async def generate(data: S.GenerateRequest, request: Request) -> Any:
        async with server.use(data.model, data.keep_alive) as engine:
            ids = engine.tokenize(data.prompt)
            return await _answer(request, server.events(engine, ids, data.options()), data.stream, _generate_json)

    @post("/api/chat", status_code=200,
          summary="Chat with the model's template applied (JSON, or SSE with stream=true)", responses=ERROR_RESPONSES)
    async def chat(data: S.ChatRequest, request: Request) -> Any:
        async with server.use(data.model, data.keep_alive) as engine:
            ids = chat_prompt_ids(engine.model, data.messages)
            return await _answer(request, server.events(engine, ids, data.options()), data.stream, _chat_json)

    @post("/api/tokenize", status_code=200, summary="Text to token ids", responses=ERROR_RESPONSES)
    async def tokenize(data: S.TokenizeRequest) -> S.TokenizeResponse:
        async with server.use(None) as engine:
            ids = engine.tokenize(data.text, add_bos=data.add_bos, parse_special=data.parse_special)
        return S.TokenizeResponse(ids, len(ids))

    @post("/api/detokenize", status_code=200, summary="Token ids to text", responses=ERROR_RESPONSES)
    async def detokenize(data: S.DetokenizeRequest) -> S.DetokenizeResponse:
        async with server.use(None) as engine:
            return S.DetokenizeResponse(engine.detokenize(data.tokens))

    @post("/api/embeddings", status_code=200,
          summary="Mean-pooled, L2-normalized embeddings", responses=ERROR_RESPONSES)
    async def embeddings(data: S.EmbeddingsRequest) -> S.EmbeddingsResponse:
        texts = [data.input] if isinstance(data.input, str) else data.input
        async with server.use(data.model, data.keep_alive) as engine:
            vecs = await asyncio.to_thread(engine.embed, texts)
        return S.EmbeddingsResponse(vecs.tolist(), int(vecs.shape[1]), engine.current_model_name or "")

    @get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    async def metrics() -> Response:
        body, ctype = server.metrics.render()
        return Response(content=body, media_type=ctype)

    @websocket("/ws")
    async def ws(socket: WebSocket) -> None:
        from woolly.http.ws import serve_socket
        await serve_socket(socket, server)

    from woolly.http.openai import openai_routes

    cors = CORSConfig(allow_origins=config.server.cors.origins, allow_credentials=False) \
        if config.server.cors.enabled and config.server.cors.origins else None
    rate = None
    if sec.rate_limiting.enabled:
        rate = RateLimitConfig(rate_limit=("minute", sec.rate_limiting.requests_per_minute),
                               exclude=["/health", "/metrics"], identifier_for_request=_client_identity)

    def auth_middleware(app: ASGIApp) -> ASGIApp:
        return AccessLogAndAuth(app, sec.api_keys, sec.api_key_required, server.metrics)

    app = Litestar(
        route_handlers=[health, models, load_model, unload_model, generate, chat, tokenize, detokenize, embeddings,
                        metrics, ws, *openai_routes(server)],
        middleware=[auth_middleware] + ([rate.middleware] if rate else []),
        cors_config=cors,
        exception_handlers={WoollyError: woolly_error_handler, HTTPException: http_error_handler,
                            UnicodeDecodeError: undecodable_body_handler, Exception: internal_error_handler},
        request_max_body_size=config.server.max_body_bytes,
        openapi_config=OpenAPIConfig(title="Woolly", version=woolly.__version__, path="/schema",
                                     render_plugins=[SwaggerRenderPlugin()]),
        debug=False,
    )
    app.state.server = server
    return app


def _client_identity(request: Request) -> str:
    """Rate-limit key: a hash of the API key when one is sent, else the client address."""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return "key:" + hashlib.sha256(auth[7:].strip().encode()).hexdigest()[:16]
    return "addr:" + (request.client.host if request.client else "unknown")


# -- answering: one JSON body, or an SSE stream ------------------------------------------------------
async def _answer(request: Request, events: AsyncIterator[tuple[str, Any]], stream: bool, to_json):
    if not stream:
        result = None
        async for kind, payload in events:
            if kind == "done":
                result = payload
        request.scope["state"]["tokens"] = result.generated_tokens
        return to_json(result)
    return EventStream(_sse_tokens(request, await prime(events)))


async def _sse_tokens(request: Request, events: Primed) -> AsyncIterator[str]:
    index = 0
    try:
        async for kind, payload in events:
            if kind == "token" and payload.text:
                yield msgspec.json.encode({"token": payload.text, "id": index}).decode()
                index += 1
            elif kind == "done":
                request.scope["state"]["tokens"] = payload.generated_tokens
    except WoollyError as e:
        yield msgspec.json.encode({"error": {"message": e.message, "code": e.code, "details": e.details}}).decode()
    finally:
        await events.aclose()
    yield "[DONE]"


def _generate_json(r) -> S.GenerateResponse:
    return S.GenerateResponse(text=r.text, tokens_generated=r.generated_tokens,
                              generation_time_ms=int(r.generation_time * 1000),
                              tokens_per_second=round(r.tokens_per_second, 2), finish_reason=r.finish_reason,
                              prompt_tokens=r.prompt_tokens)


def _chat_json(r) -> S.ChatResponse:
    return S.ChatResponse(content=r.text, role="assistant", tokens_generated=r.generated_tokens,
                          generation_time_ms=int(r.generation_time * 1000), finish_reason=r.finish_reason,
                          prompt_tokens=r.prompt_tokens)
