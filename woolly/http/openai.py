"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings.

Shapes follow OpenAI's API so the official `openai` client works unchanged: streaming
chunks end with `data: [DONE]`, `stream_options.include_usage` adds a usage chunk,
logprobs come in the completions or chat form.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator

import msgspec
from litestar import Request, get, post

from woolly.errors import InvalidRequest, WoollyError
from woolly.http import schemas as S
from woolly.http.responses import ERROR_RESPONSES
from woolly.http.streaming import EventStream, prime


def openai_routes(server) -> list:
    engine = server.engine

    def model_name() -> str:
        return engine.current_model_name or ""

    def token_text(token_id: int) -> str:
        return engine.tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")

    def token_bytes(token_id: int) -> list[int]:
        return list(engine.tokenizer.token_bytes(token_id))

    @get("/v1/models", summary="OpenAI: list models", responses=ERROR_RESPONSES)
    async def list_models() -> dict:
        from woolly.model_store import list_models as pulled

        names = [r["name"] for r in pulled() if r["pulled"]]
        if engine.current_model_name and engine.current_model_name not in names:
            names.insert(0, engine.current_model_name)
        return {"object": "list", "data": [{"id": n, "object": "model", "created": int(server.started),
                                            "owned_by": "woolly"} for n in names]}

    @post("/v1/completions", status_code=200, summary="OpenAI: text completion", responses=ERROR_RESPONSES)
    async def completions(data: S.CompletionRequest, request: Request) -> Any:
        server.check_model(data.model)
        if isinstance(data.prompt, list):
            if data.prompt and all(isinstance(p, int) for p in data.prompt):
                ids = list(data.prompt)
                engine.check_token_ids(ids)
            elif len(data.prompt) == 1 and isinstance(data.prompt[0], str):
                ids = await server.prompt_ids(data.prompt[0])
            else:
                raise InvalidRequest("one prompt per request (n and prompt arrays are not supported)")
        else:
            ids = await server.prompt_ids(data.prompt)
        options = data.options()
        if data.logprobs:
            options["logprobs"] = data.logprobs
        rid, created = "cmpl-" + uuid.uuid4().hex[:24], int(time.time())
        events = server.events(ids, options)
        if data.stream:
            include_usage = bool(data.stream_options and data.stream_options.include_usage)
            return EventStream(_stream(request, await prime(events), rid, created, model_name(), "text_completion",
                                          include_usage, lambda ev: _completion_delta(ev, data.logprobs, token_text)))
        result, toks = await _collect(request, events)
        choice = {"index": 0, "text": (data.prompt if data.echo and isinstance(data.prompt, str) else "") + result.text,
                  "finish_reason": result.finish_reason, "logprobs": None}
        if data.logprobs:
            choice["logprobs"] = {
                "tokens": [token_text(t.token_id) for t in toks],
                "token_logprobs": [t.logprob for t in toks],
                "top_logprobs": [{token_text(i): lp for i, lp in (t.top_logprobs or [])} for t in toks],
                "text_offset": _offsets(toks),
            }
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name(),
                "choices": [choice], "usage": _usage(result)}

    @post("/v1/chat/completions", status_code=200, summary="OpenAI: chat completion", responses=ERROR_RESPONSES)
    async def chat_completions(data: S.ChatCompletionRequest, request: Request) -> Any:
        server.check_model(data.model)
        ids = await server.chat_ids(data.messages)
        options = data.options()
        n_top = data.top_logprobs or 0
        if data.logprobs:
            options["logprobs"] = max(1, n_top)
        rid, created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())
        events = server.events(ids, options)

        def content_logprobs(toks) -> dict | None:
            if not data.logprobs:
                return None
            return {"content": [{"token": token_text(t.token_id), "logprob": t.logprob,
                                 "bytes": token_bytes(t.token_id),
                                 "top_logprobs": [{"token": token_text(i), "logprob": lp, "bytes": token_bytes(i)}
                                                  for i, lp in (t.top_logprobs or [])[:n_top]]}
                                for t in toks if t.token_id >= 0]}

        if data.stream:
            include_usage = bool(data.stream_options and data.stream_options.include_usage)
            return EventStream(_stream(request, await prime(events), rid, created, model_name(), "chat.completion.chunk",
                                          include_usage, lambda ev: {"delta": {"content": ev.text},
                                                                     "logprobs": content_logprobs([ev])},
                                          role_first=True))
        result, toks = await _collect(request, events)
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name(),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "logprobs": content_logprobs(toks), "finish_reason": result.finish_reason}],
                "usage": _usage(result)}

    @post("/v1/embeddings", status_code=200, summary="OpenAI: embeddings", responses=ERROR_RESPONSES)
    async def embeddings(data: S.OpenAIEmbeddingsRequest) -> dict:
        server.check_model(data.model)
        texts = [data.input] if isinstance(data.input, str) else data.input
        vecs, n_tokens = await server.embed(texts)
        return {"object": "list", "model": model_name(),
                "data": [{"object": "embedding", "index": i, "embedding": _encode_vector(v, data.encoding_format)}
                         for i, v in enumerate(vecs)],
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    return [list_models, completions, chat_completions, embeddings]


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
    async for kind, payload in events:
        if kind == "token":
            toks.append(payload)
        else:
            result = payload
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
        async for kind, payload in events:
            if kind == "token":
                if payload.text or payload.logprob is not None:
                    yield chunk({**delta_of(payload), "finish_reason": None})
            else:
                request.scope["state"]["tokens"] = payload.generated_tokens
                last = {"delta": {}, "logprobs": None} if role_first else {"text": "", "logprobs": None}
                yield chunk({**last, "finish_reason": payload.finish_reason})
                if include_usage:
                    yield chunk({}, usage=_usage(payload), with_choice=False)
    except WoollyError as e:
        yield msgspec.json.encode({"error": {"message": e.message, "code": e.code, "type": e.code}}).decode()
    finally:
        await events.aclose()
    yield "[DONE]"
