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
import re
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import msgspec
from litestar import Litestar, Request, Response, get, post, websocket
from litestar.config.cors import CORSConfig
from litestar.connection import WebSocket
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.types import ASGIApp, Receive, Scope, Send

import woolly
from woolly.config import WoollyConfig, parse_keep_alive
from woolly.engine import Engine, GenerationResult, TokenEvent
from woolly.engine.pool import KEEP, ModelPool
from woolly.errors import HTTP_STATUS, ContextLengthExceeded, InvalidRequest, ModelNotFound, ModelNotLoaded, WoollyError
from woolly.http import schemas as S
from woolly.http.chat import chat_prompt_ids, check_prompt_bytes
from woolly.http.guard import RequestGuard
from woolly.http.metrics import Metrics
from woolly.http.responses import ERROR_RESPONSES
from woolly.http.models_list import list_model_infos
from woolly.http.ratelimit import STATE_KEY, ClientLimiter, address_identity, key_identity, rate_limit_config
from woolly.http.request_body import JsonRequest
from woolly.http.streaming import EventStream, Primed, prime
from woolly.http.tools import reference_grammar

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
    """Litestar's validation errors -> one message naming each bad field as the client sent it, and those fields."""
    extra = exc.extra
    if isinstance(extra, list) and extra and isinstance(extra[0], dict):
        named = [_field_error(str(e.get("key") or ""), str(e.get("message", e))) for e in extra[:3]]
        return "; ".join(f"{k}: {m}" if k else m for k, m in named), [k for k, _ in named if k]
    return str(exc.detail), []


_MISSING = re.compile(r"Object missing required field `([^`]*)`")
_UNKNOWN = re.compile(r"Object contains unknown field `([^`]*)`")


def _field_error(key: str, message: str) -> tuple[str, str]:
    """(field, message) of one error; Litestar names the whole body `data` (its handlers' parameter)."""
    missing = _MISSING.match(message)
    if missing:   # msgspec names the missing field in the message, the object holding it in the key
        return (missing[1] if key in ("", "data") else f"{key}.{missing[1]}"), "a required field is missing"
    unknown = _UNKNOWN.match(message)
    if unknown:   # a struct that refuses what it would otherwise ignore (Ollama's options)
        return (unknown[1] if key in ("", "data") else f"{key}.{unknown[1]}"), "not a supported field"
    if key == "data":
        if message == "'data'":   # no body at all
            return "", "the request needs a JSON body"
        return "", f"the request body: {message}" if message.startswith("Expected") else message
    return key, message


def undecodable_body_handler(_: Request, exc: UnicodeDecodeError) -> Response:
    """Litestar decodes a JSON body as UTF-8 without catching the error: a 400, not a 500."""
    return error_response(400, "INVALID_REQUEST",
                          f"the request body is not valid UTF-8 ({exc.reason} at byte {exc.start})")


def internal_error_handler(_: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, "INTERNAL_ERROR", "internal server error")


class AccessLogAndAuth:
    """ASGI middleware: header limits, the request guard, API keys (constant-time), then one access-log
    line per request.

    uvicorn's h11 parser bounds only headers that arrive in pieces: a header block sent in one
    write passes whatever its size, so the limits on their number and size are enforced here.
    It also names the client for the rate limit (`woolly.http.ratelimit`): a refused key counts
    against the client's address.
    """

    PUBLIC = ("/health",)
    MAX_HEADERS = 128
    MAX_HEADER_BYTES = 32 * 1024

    def __init__(self, app: ASGIApp, keys: list[str], required: bool, metrics: Metrics,
                 guard: RequestGuard | None = None, limiter: ClientLimiter | None = None):
        self.app, self.metrics, self.guard, self.limiter = app, metrics, guard, limiter
        self.keys = [k.encode() for k in keys] if required else []

    def _public(self, scope: Scope) -> bool:
        return not self.keys or scope.get("path") in self.PUBLIC or scope.get("method") == "OPTIONS"

    @staticmethod
    def _bearer(scope: Scope) -> bytes:
        auth = dict(scope.get("headers") or []).get(b"authorization", b"")
        return auth[7:].strip() if auth[:7].lower() == b"bearer " else b""

    def _authorized(self, scope: Scope) -> bool:
        if self._public(scope):
            return True
        given = self._bearer(scope)
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

        async def refuse(code: int, error: str, message: str, headers: dict | None = None) -> None:
            if scope["type"] == "websocket":   # closed before the handshake: the client sees 403
                await send({"type": "websocket.close", "code": 1008 if code != 401 else 4401})
                status["code"] = code
                return
            resp = error_response(code, error, message, headers=headers)
            await resp.to_asgi_response(None, None)(scope, receive, send_wrapper)  # type: ignore[arg-type]

        try:
            raw_headers = scope.get("headers") or []
            if len(raw_headers) > self.MAX_HEADERS or \
                    sum(len(k) + len(v) for k, v in raw_headers) > self.MAX_HEADER_BYTES:
                return await refuse(431, "INVALID_REQUEST", f"too many or too large request headers (at most "
                                    f"{self.MAX_HEADERS} headers, {self.MAX_HEADER_BYTES} bytes)")
            refused = self.guard.check(scope) if self.guard else None
            if refused:
                code, message = refused
                return await refuse(code, "UNAUTHORIZED" if code == 403 else "INVALID_REQUEST", message)
            scope["state"][STATE_KEY] = address_identity(scope)
            if not self._authorized(scope):
                limited = await self.limiter.hit(scope["litestar_app"], scope["state"][STATE_KEY]) \
                    if self.limiter else None
                if limited:
                    return await refuse(429, "RATE_LIMITED", "too many requests; retry later", limited)
                return await refuse(401, "UNAUTHORIZED", "missing or invalid API key", {"WWW-Authenticate": "Bearer"})
            if self.keys and not self._public(scope):
                scope["state"][STATE_KEY] = key_identity(self._bearer(scope))
            try:
                await self.app(scope, receive, send_wrapper)
            except Exception as e:
                # Litestar answers what inner middleware raises (the rate limiter's 429) outside this
                # one's send_wrapper: the log line takes the status from the exception instead.
                status["code"] = status["code"] or getattr(e, "status_code", 500)
                raise
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
        self.embedding_passes = asyncio.Semaphore(1)   # one at a time: the others wait without a thread
        self.limiter: ClientLimiter | None = None   # the rate limit, when enabled

    @property
    def engine(self) -> Engine:
        """The default model's engine (the one a request naming no model uses), when loaded."""
        engine = self.pool.current()
        if engine is None:
            raise ModelNotLoaded("no model is loaded; POST /api/models/load first")
        return engine

    # -- CPU work, off the event loop ---------------------------------------------------------------
    async def prompt_ids(self, engine: Engine, text: str, **options) -> list[int]:
        """A prompt's ids (at most server.max_prompt_bytes), tokenized in a thread."""
        check_prompt_bytes([text], self.config.server.max_prompt_bytes)
        return await asyncio.to_thread(engine.tokenize, text, **options)

    async def chat_ids(self, engine: Engine, messages, tools=None) -> list[int]:
        """A chat's prompt ids: rendered in a template worker and tokenized, from a thread
        (`tools`: a woolly.http.tools.ToolPlan)."""
        return await asyncio.to_thread(chat_prompt_ids, engine.model, messages,
                                       self.config.server.max_prompt_bytes, tools)

    async def embed(self, engine: Engine, texts: list[str]):
        """(vectors f32 [N, D], tokens) for `texts`, one embedding request at a time, in a thread."""
        check_prompt_bytes(texts, self.config.server.max_prompt_bytes)
        async with self.embedding_passes:
            return await asyncio.to_thread(engine.embed_counted, texts)

    async def rate_limited(self, scope: Scope) -> dict[str, str] | None:
        """Count one request (a WebSocket message) against the connection's client; 429 headers when over."""
        if self.limiter is None:
            return None
        identity = scope.get("state", {}).get(STATE_KEY) or address_identity(scope)
        return await self.limiter.hit(scope["litestar_app"], identity)

    # -- helpers shared by the routes -------------------------------------------------------------
    @staticmethod
    def model_name(name: str | None) -> str | None:
        """A request's `model`: a model's name (never a path), or None for the default model."""
        from woolly.model_store import check_name, is_path

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
        from woolly.model_store import check_name, is_path, models_dir

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

    def max_tokens(self, engine: Engine, requested: int | None, prompt_len: int, num_ctx: int | None = None) -> int:
        context = engine.scheduler().runner.cache_length
        if num_ctx is not None:   # Ollama's options.num_ctx: a smaller context for this request, never a larger one
            if num_ctx > context:
                raise InvalidRequest(f"options.num_ctx={num_ctx} exceeds the server's context of {context} "
                                     f"(inference.max_sequence_length)", details={"num_ctx": num_ctx,
                                                                                   "context_length": context})
            context = num_ctx
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

    async def events(self, engine: Engine, ids: list[int], options: dict) -> AsyncIterator[TokenEvent | GenerationResult]:
        session = engine.create_session()
        options = dict(options)
        options["max_tokens"] = self.max_tokens(engine, options.get("max_tokens"), len(ids),
                                                options.pop("num_ctx", None))
        async for event in session.generate_events(ids, **options):
            yield event


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
            ids = await server.prompt_ids(engine, data.prompt)
            options = {**data.options(), "grammar": reference_grammar(data.format, data.grammar)}
            return await _answer(request, server.events(engine, ids, options), data.stream, _generate_json)

    @post("/api/chat", status_code=200,
          summary="Chat with the model's template applied (JSON, or SSE with stream=true)", responses=ERROR_RESPONSES)
    async def chat(data: S.ChatRequest, request: Request) -> Any:
        async with server.use(data.model, data.keep_alive) as engine:
            ids = await server.chat_ids(engine, data.messages)
            options = {**data.options(), "grammar": reference_grammar(data.format, data.grammar)}
            return await _answer(request, server.events(engine, ids, options), data.stream, _chat_json)

    @post("/api/tokenize", status_code=200, summary="Text to token ids", responses=ERROR_RESPONSES)
    async def tokenize(data: S.TokenizeRequest) -> S.TokenizeResponse:
        async with server.use(None) as engine:
            ids = await server.prompt_ids(engine, data.text, add_bos=data.add_bos, parse_special=data.parse_special)
        return S.TokenizeResponse(ids, len(ids))

    @post("/api/detokenize", status_code=200, summary="Token ids to text", responses=ERROR_RESPONSES)
    async def detokenize(data: S.DetokenizeRequest) -> S.DetokenizeResponse:
        async with server.use(None) as engine:
            return S.DetokenizeResponse(await asyncio.to_thread(engine.detokenize, data.tokens))

    @post("/api/embeddings", status_code=200,
          summary="Mean-pooled, L2-normalized embeddings", responses=ERROR_RESPONSES)
    async def embeddings(data: S.EmbeddingsRequest) -> S.EmbeddingsResponse:
        texts = [data.input] if isinstance(data.input, str) else data.input
        async with server.use(data.model, data.keep_alive) as engine:
            vecs, _ = await server.embed(engine, texts)
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
        rate = rate_limit_config(sec.rate_limiting.requests_per_minute, exclude=["/health", "/metrics"])
        server.limiter = ClientLimiter(rate)
    guard = RequestGuard(config.server)

    def auth_middleware(app: ASGIApp) -> ASGIApp:
        return AccessLogAndAuth(app, sec.api_keys, sec.api_key_required, server.metrics, guard, server.limiter)

    app = Litestar(
        route_handlers=[health, models, load_model, unload_model, generate, chat, tokenize, detokenize, embeddings,
                        metrics, ws, *openai_routes(server)],
        middleware=[auth_middleware] + ([rate.middleware] if rate else []),
        cors_config=cors,
        exception_handlers={WoollyError: woolly_error_handler, HTTPException: http_error_handler,
                            UnicodeDecodeError: undecodable_body_handler, Exception: internal_error_handler},
        request_max_body_size=config.server.max_body_bytes,
        request_class=JsonRequest,
        openapi_config=OpenAPIConfig(title="Woolly", version=woolly.__version__, path="/schema",
                                     render_plugins=[SwaggerRenderPlugin()]),
        debug=False,
    )
    app.state.server = server
    from woolly import template_worker
    template_worker.configure(timeout=config.server.template_timeout, memory_bytes=config.server.template_memory_bytes,
                              workers=config.server.template_workers)
    return app


# -- answering: one JSON body, or an SSE stream ------------------------------------------------------
async def _answer(request: Request, events: AsyncIterator[TokenEvent | GenerationResult], stream: bool, to_json):
    if not stream:
        result = None
        async for event in events:
            if isinstance(event, GenerationResult):
                result = event
        request.scope["state"]["tokens"] = result.generated_tokens
        return to_json(result)
    return EventStream(_sse_tokens(request, await prime(events)))


async def _sse_tokens(request: Request, events: Primed) -> AsyncIterator[str]:
    index = 0
    try:
        async for event in events:
            if isinstance(event, TokenEvent):
                if event.text:
                    yield msgspec.json.encode({"token": event.text, "id": index}).decode()
                    index += 1
            else:
                request.scope["state"]["tokens"] = event.generated_tokens
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
