"""Python clients for a Woolly server: `WoollyClient` (sync) and `AsyncWoollyClient` (httpx).

    client = WoollyClient("http://127.0.0.1:11434", api_key=None)
    client.generate("Once upon a time", max_tokens=50).text
    for piece in client.stream("Tell me a story", max_tokens=50): print(piece, end="")
    client.chat([{"role": "user", "content": "Hi"}]).content

Sampling options (max_tokens, temperature, top_p, top_k, repeat_penalty, stop, seed, ...)
are passed as keyword arguments and sent as the request's fields. An error answer from
the server is raised as the `WoollyError` subclass of its code (`ModelNotLoaded`,
`InvalidRequest`, ...) with `.status`, `.details` and, for 429, `.retry_after`; network
failures stay httpx's own `TransportError`s.
"""
from __future__ import annotations

import json
from typing import Any, AsyncIterator, Iterable, Iterator, TypeVar

import httpx
import msgspec

from woolly import errors
from woolly.http import schemas as S

DEFAULT_URL = "http://127.0.0.1:11434"
DEFAULT_TIMEOUT = httpx.Timeout(300.0, connect=10.0)

T = TypeVar("T")

# error code -> the WoollyError subclass raised for it (codes beyond these keep the base class)
ERROR_CLASSES: dict[str, type[errors.WoollyError]] = {
    cls.code: cls for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, errors.WoollyError)
}


def error_from_response(status: int | None, body: bytes, headers: httpx.Headers | None = None) -> errors.WoollyError:
    """The server's `{"error": {message, code, details}}` -> a WoollyError of that code.

    `status` None (an error event inside a stream) takes the code's status from the API's table.
    """
    try:
        err = json.loads(body)["error"]
        code, message, details = str(err["code"]), str(err["message"]), err.get("details") or {}
    except (ValueError, KeyError, TypeError):
        code = "RATE_LIMITED" if status == 429 else "UNAUTHORIZED" if status == 401 else "INTERNAL_ERROR"
        message, details = f"HTTP {status}: {body[:200].decode('utf-8', 'replace')}", {}
    exc = ERROR_CLASSES.get(code, errors.WoollyError)(message, details=details, code=code)
    exc.status = status if status is not None else errors.HTTP_STATUS.get(code, 500)
    retry = (headers or {}).get("retry-after")
    exc.retry_after = float(retry) if retry and retry.replace(".", "", 1).isdigit() else None
    return exc


def _decode(response: httpx.Response, kind: type[T]) -> T:
    if response.status_code >= 400:
        raise error_from_response(response.status_code, response.content, response.headers)
    return msgspec.json.decode(response.content, type=kind)


def _body(fields: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in {**fields, **options}.items() if v is not None}


def _sse_token(line: str) -> str | None:
    """One SSE line -> its token text, "" for lines without one, None at `[DONE]`."""
    if not line.startswith("data:"):
        return ""
    data = line[5:].strip()
    if data == "[DONE]":
        return None
    event = json.loads(data)
    if "error" in event:  # an error after the stream began
        raise error_from_response(None, data.encode())
    return event.get("token", "")


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class WoollyClient:
    """Blocking client; use as a context manager or call `close()`."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT):
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=_headers(api_key), timeout=timeout)

    def __enter__(self) -> WoollyClient:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, kind: type[T], body: dict | None = None) -> T:
        return _decode(self._http.post(path, json=body if body is not None else {}), kind)

    def _stream(self, path: str, body: dict) -> Iterator[str]:
        with self._http.stream("POST", path, json={**body, "stream": True}) as response:
            if response.status_code >= 400:
                raise error_from_response(response.status_code, response.read(), response.headers)
            for line in response.iter_lines():
                token = _sse_token(line)
                if token is None:
                    return
                if token:
                    yield token

    def health(self) -> S.Health:
        return _decode(self._http.get("/health"), S.Health)

    def models(self) -> list[S.ModelInfo]:
        return _decode(self._http.get("/api/models"), list[S.ModelInfo])

    def load_model(self, name: str, gpu_layers: int | None = None) -> S.LoadModelResponse:
        return self._post("/api/models/load", S.LoadModelResponse, _body({"name": name, "gpu_layers": gpu_layers}, {}))

    def unload_model(self, name: str | None = None) -> S.LoadModelResponse:
        """Unload `name`, or every loaded model."""
        return self._post("/api/models/unload", S.LoadModelResponse, _body({"name": name}, {}))

    def generate(self, prompt: str, **options) -> S.GenerateResponse:
        return self._post("/api/generate", S.GenerateResponse, _body({"prompt": prompt, "stream": False}, options))

    def stream(self, prompt: str, **options) -> Iterator[str]:
        """Text pieces of the completion as the server sends them."""
        return self._stream("/api/generate", _body({"prompt": prompt}, options))

    def chat(self, messages: Iterable[dict], **options) -> S.ChatResponse:
        return self._post("/api/chat", S.ChatResponse, _body({"messages": list(messages), "stream": False}, options))

    def chat_stream(self, messages: Iterable[dict], **options) -> Iterator[str]:
        return self._stream("/api/chat", _body({"messages": list(messages)}, options))

    def tokenize(self, text: str, add_bos: bool | None = None, parse_special: bool = False) -> list[int]:
        body = _body({"text": text, "add_bos": add_bos, "parse_special": parse_special}, {})
        return self._post("/api/tokenize", S.TokenizeResponse, body).tokens

    def detokenize(self, tokens: Iterable[int]) -> str:
        return self._post("/api/detokenize", S.DetokenizeResponse, {"tokens": list(tokens)}).text

    def embeddings(self, input: str | list[str], model: str | None = None) -> S.EmbeddingsResponse:
        return self._post("/api/embeddings", S.EmbeddingsResponse, _body({"input": input, "model": model}, {}))


class AsyncWoollyClient:
    """The same calls as `WoollyClient`, awaitable; `stream`/`chat_stream` are async iterators."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT):
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=_headers(api_key), timeout=timeout)

    async def __aenter__(self) -> AsyncWoollyClient:
        return self

    async def __aexit__(self, *_) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _post(self, path: str, kind: type[T], body: dict | None = None) -> T:
        return _decode(await self._http.post(path, json=body if body is not None else {}), kind)

    async def _stream(self, path: str, body: dict) -> AsyncIterator[str]:
        async with self._http.stream("POST", path, json={**body, "stream": True}) as response:
            if response.status_code >= 400:
                raise error_from_response(response.status_code, await response.aread(), response.headers)
            async for line in response.aiter_lines():
                token = _sse_token(line)
                if token is None:
                    return
                if token:
                    yield token

    async def health(self) -> S.Health:
        return _decode(await self._http.get("/health"), S.Health)

    async def models(self) -> list[S.ModelInfo]:
        return _decode(await self._http.get("/api/models"), list[S.ModelInfo])

    async def load_model(self, name: str, gpu_layers: int | None = None) -> S.LoadModelResponse:
        return await self._post("/api/models/load", S.LoadModelResponse,
                                _body({"name": name, "gpu_layers": gpu_layers}, {}))

    async def unload_model(self, name: str | None = None) -> S.LoadModelResponse:
        """Unload `name`, or every loaded model."""
        return await self._post("/api/models/unload", S.LoadModelResponse, _body({"name": name}, {}))

    async def generate(self, prompt: str, **options) -> S.GenerateResponse:
        return await self._post("/api/generate", S.GenerateResponse,
                                _body({"prompt": prompt, "stream": False}, options))

    def stream(self, prompt: str, **options) -> AsyncIterator[str]:
        return self._stream("/api/generate", _body({"prompt": prompt}, options))

    async def chat(self, messages: Iterable[dict], **options) -> S.ChatResponse:
        return await self._post("/api/chat", S.ChatResponse,
                                _body({"messages": list(messages), "stream": False}, options))

    def chat_stream(self, messages: Iterable[dict], **options) -> AsyncIterator[str]:
        return self._stream("/api/chat", _body({"messages": list(messages)}, options))

    async def tokenize(self, text: str, add_bos: bool | None = None, parse_special: bool = False) -> list[int]:
        body = _body({"text": text, "add_bos": add_bos, "parse_special": parse_special}, {})
        return (await self._post("/api/tokenize", S.TokenizeResponse, body)).tokens

    async def detokenize(self, tokens: Iterable[int]) -> str:
        return (await self._post("/api/detokenize", S.DetokenizeResponse, {"tokens": list(tokens)})).text

    async def embeddings(self, input: str | list[str], model: str | None = None) -> S.EmbeddingsResponse:
        return await self._post("/api/embeddings", S.EmbeddingsResponse, _body({"input": input, "model": model}, {}))
