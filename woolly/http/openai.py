"""OpenAI-compatible routes: /v1/models[/{id}], /v1/completions, /v1/chat/completions, /v1/embeddings.

Shapes follow OpenAI's API so the official `openai` client works unchanged: streaming
chunks end with `data: [DONE]`, `stream_options.include_usage` adds a usage chunk,
logprobs come in the completions or chat form.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from functools import partial
from typing import Any, AsyncIterator

import msgspec
from litestar import Request, Response, get, post
from litestar.openapi.datastructures import ResponseSpec

from woolly.chat_template import chat_template_source
from woolly.engine import TokenEvent
from woolly.errors import InvalidRequest, WoollyError
from woolly.http import schemas as S
from woolly.http.responses import ERROR_RESPONSES
from woolly.http.streaming import EventStream, prime
from woolly.http import tools as T


def openai_routes(server) -> list:
    def token_text(engine, token_id: int) -> str:
        return engine.tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")

    def token_bytes(engine, token_id: int) -> list[int]:
        return list(engine.tokenizer.token_bytes(token_id))

    def model_object(name: str) -> S.OpenAIModel:
        return S.OpenAIModel(id=name, created=int(server.started))

    @get("/v1/models", summary="OpenAI: list models", responses=ERROR_RESPONSES)
    async def list_models() -> dict:
        names = await asyncio.to_thread(server.pool.available)
        return {"object": "list", "data": [model_object(n) for n in names]}

    @get("/v1/models/{model_id:str}", summary="OpenAI: one model (404 in OpenAI's error shape when unknown)",
         responses={**ERROR_RESPONSES, 404: ResponseSpec(data_container=S.OpenAIErrorResponse, generate_examples=False,
                                                         description="No such model (model_not_found)")})
    async def retrieve_model(model_id: str) -> Response[S.OpenAIModel]:
        if model_id in await asyncio.to_thread(server.pool.available):
            return Response(model_object(model_id))
        error = S.OpenAIErrorBody(message=f"The model '{model_id[:256]}' does not exist",
                                  type="invalid_request_error", param="model", code="model_not_found")
        return Response(S.OpenAIErrorResponse(error), status_code=404)  # type: ignore[arg-type]

    @post("/v1/completions", status_code=200, summary="OpenAI: text completion", responses=ERROR_RESPONSES)
    async def completions(data: S.CompletionRequest, request: Request) -> Any:
        async with server.use(data.model, data.keep_alive) as engine:
            return await _completions(data, request, engine)

    async def _completions(data: S.CompletionRequest, request: Request, engine) -> Any:
        model_name = engine.current_model_name or ""
        if isinstance(data.prompt, list):
            if data.prompt and all(isinstance(p, int) for p in data.prompt):
                ids = list(data.prompt)
                engine.check_token_ids(ids)
            elif len(data.prompt) == 1 and isinstance(data.prompt[0], str):
                ids = await server.prompt_ids(engine, data.prompt[0])
            else:
                raise InvalidRequest("one prompt per request (n and prompt arrays are not supported)")
        else:
            ids = await server.prompt_ids(engine, data.prompt)
        options = {**data.options(), "grammar": T.response_grammar(data.response_format)}
        if data.logprobs:
            options["logprobs"] = data.logprobs
        rid, created = "cmpl-" + uuid.uuid4().hex[:24], int(time.time())
        events = server.events(engine, ids, options)
        text_of = partial(token_text, engine)
        if data.stream:
            include_usage = bool(data.stream_options and data.stream_options.include_usage)
            return EventStream(_stream(request, await prime(events), rid, created, model_name, "text_completion",
                                          include_usage, lambda ev: _completion_delta(ev, data.logprobs, text_of)))
        result, toks = await _collect(request, events)
        choice = {"index": 0, "text": (data.prompt if data.echo and isinstance(data.prompt, str) else "") + result.text,
                  "finish_reason": result.finish_reason, "logprobs": None}
        if data.logprobs:
            choice["logprobs"] = {
                "tokens": [text_of(t.token_id) for t in toks],
                "token_logprobs": [t.logprob for t in toks],
                "top_logprobs": [{text_of(i): lp for i, lp in (t.top_logprobs or [])} for t in toks],
                "text_offset": _offsets(toks),
            }
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                "choices": [choice], "usage": _usage(result)}

    @post("/v1/chat/completions", status_code=200, summary="OpenAI: chat completion", responses=ERROR_RESPONSES)
    async def chat_completions(data: S.ChatCompletionRequest, request: Request) -> Any:
        async with server.use(data.model, data.keep_alive) as engine:
            return await _chat_completions(data, request, engine)

    async def _chat_completions(data: S.ChatCompletionRequest, request: Request, engine) -> Any:
        model_name = engine.current_model_name or ""
        plan = T.plan(chat_template_source(engine.model), data.tools, data.tool_choice)   # None: no tools
        ids = await server.chat_ids(engine, data.messages, plan)
        options = {**data.options(), "grammar": plan.grammar() if plan else T.response_grammar(data.response_format)}
        n_top = data.top_logprobs or 0
        if data.logprobs:
            options["logprobs"] = max(1, n_top)
        rid, created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())
        events = server.events(engine, ids, options)

        def content_logprobs(toks) -> dict | None:
            if not data.logprobs:
                return None
            return {"content": [{"token": token_text(engine, t.token_id), "logprob": t.logprob,
                                 "bytes": token_bytes(engine, t.token_id),
                                 "top_logprobs": [{"token": token_text(engine, i), "logprob": lp,
                                                   "bytes": token_bytes(engine, i)}
                                                  for i, lp in (t.top_logprobs or [])[:n_top]]}
                                for t in toks if t.token_id >= 0]}

        if data.stream and plan is not None:   # the call is parsed from the whole text: sent in one delta
            include_usage = bool(data.stream_options and data.stream_options.include_usage)
            return EventStream(_stream_tools(request, events, plan, rid, created, model_name, include_usage))
        if data.stream:
            include_usage = bool(data.stream_options and data.stream_options.include_usage)
            return EventStream(_stream(request, await prime(events), rid, created, model_name, "chat.completion.chunk",
                                          include_usage, lambda ev: {"delta": {"content": ev.text},
                                                                     "logprobs": content_logprobs([ev])},
                                          role_first=True))
        result, toks = await _collect(request, events)
        message, finish = {"role": "assistant", "content": result.text}, result.finish_reason
        if plan is not None:
            message, finish = _tool_message(plan, result)
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": message,
                             "logprobs": content_logprobs(toks), "finish_reason": finish}],
                "usage": _usage(result)}

    @post("/v1/embeddings", status_code=200, summary="OpenAI: embeddings", responses=ERROR_RESPONSES)
    async def embeddings(data: S.OpenAIEmbeddingsRequest) -> dict:
        texts = [data.input] if isinstance(data.input, str) else data.input
        async with server.use(data.model, data.keep_alive) as engine:
            vecs, n_tokens = await server.embed(engine, texts)
        return {"object": "list", "model": engine.current_model_name or "",
                "data": [{"object": "embedding", "index": i, "embedding": _encode_vector(v, data.encoding_format)}
                         for i, v in enumerate(vecs)],
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    return [list_models, retrieve_model, completions, chat_completions, embeddings]


def _tool_message(plan, result) -> tuple[dict, str]:
    """The assistant message of a generation with tools -> (message, finish_reason)."""
    content, calls = plan.parse(result.text)
    if not calls:
        return {"role": "assistant", "content": content}, result.finish_reason
    return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"


async def _stream_tools(request: Request, events: AsyncIterator, plan, rid: str, created: int, model: str,
                        include_usage: bool) -> AsyncIterator[str]:
    """A streamed chat with tools: the whole answer (content or tool calls) in one delta."""
    def chunk(choices: list, usage: dict | None = None) -> str:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
        if include_usage:
            body["usage"] = usage
        return msgspec.json.encode(body).decode()

    try:
        result, _ = await _collect(request, events)
        message, finish = _tool_message(plan, result)
        if message.get("tool_calls"):
            message["tool_calls"] = [dict(c, index=k) for k, c in enumerate(message["tool_calls"])]
        yield chunk([{"index": 0, "delta": message, "logprobs": None, "finish_reason": None}])
        yield chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}])
        if include_usage:
            yield chunk([], usage=_usage(result))
    except WoollyError as e:
        yield msgspec.json.encode({"error": {"message": e.message, "code": e.code, "type": e.code}}).decode()
    finally:
        await events.aclose()
    yield "[DONE]"


def _encode_vector(v, encoding: str):
    import base64

    import numpy as np

    if encoding == "base64":
        return base64.b64encode(np.asarray(v, "<f4").tobytes()).decode()
    return [float(x) for x in v]


def _usage(result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.generated_tokens,
            "total_tokens": result.prompt_tokens + result.generated_tokens}


def _offsets(toks) -> list[int]:
    out, pos = [], 0
    for t in toks:
        out.append(pos)
        pos += len(t.text)
    return out


def _completion_delta(ev, logprobs: int | None, token_text) -> dict:
    d: dict = {"text": ev.text, "logprobs": None}
    if logprobs and ev.token_id >= 0:
        d["logprobs"] = {"tokens": [token_text(ev.token_id)], "token_logprobs": [ev.logprob],
                         "top_logprobs": [{token_text(i): lp for i, lp in (ev.top_logprobs or [])}]}
    return d


async def _collect(request: Request, events: AsyncIterator) -> tuple[Any, list]:
    toks, result = [], None
    async for event in events:
        if isinstance(event, TokenEvent):
            toks.append(event)
        else:
            result = event
    request.scope["state"]["tokens"] = result.generated_tokens
    return result, toks


async def _stream(request: Request, events: AsyncIterator, rid: str, created: int, model: str, obj: str,
                  include_usage: bool, delta_of, role_first: bool = False) -> AsyncIterator[str]:
    def chunk(choice: dict, usage: dict | None = None, with_choice: bool = True) -> str:
        body = {"id": rid, "object": obj, "created": created, "model": model,
                "choices": [dict(index=0, **choice)] if with_choice else []}
        if usage is not None or include_usage:
            body["usage"] = usage
        return msgspec.json.encode(body).decode()

    try:
        if role_first:
            yield chunk({"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})
        async for event in events:
            if isinstance(event, TokenEvent):
                if event.text or event.logprob is not None:
                    yield chunk({**delta_of(event), "finish_reason": None})
            else:   # the GenerationResult
                request.scope["state"]["tokens"] = event.generated_tokens
                last = {"delta": {}, "logprobs": None} if role_first else {"text": "", "logprobs": None}
                yield chunk({**last, "finish_reason": event.finish_reason})
                if include_usage:
                    yield chunk({}, usage=_usage(event), with_choice=False)
    except WoollyError as e:
        yield msgspec.json.encode({"error": {"message": e.message, "code": e.code, "type": e.code}}).decode()
    finally:
        await events.aclose()
    yield "[DONE]"
