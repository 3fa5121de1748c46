"""The request's `model` on every route: loaded on demand, several resident, LRU eviction, keep_alive.

Two small servers of their own (2 slots each):
- `pool_server`: `woolly serve <elsewhere>/served.gguf` (SmolLM2 under another name, from a path
  outside the models directory), models.max_loaded 2, a models directory holding both real models;
- `single_server`: models.max_loaded 1, models.keep_alive 3s, SmolLM2 under two names (the
  directory's, and `alias` from a path), so its eviction and expiry cost only SmolLM2's loads.
"""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import openai
import pytest
import websockets

from support.errors import assert_error
from support.live_server import base_config, serving

pytestmark = pytest.mark.real

SMOL, GEMMA = "smollm2-135m-instruct", "gemma3-270m"
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name a colour."}]


def models_dir(root: Path, links: dict[str, str]) -> Path:
    d = root / "models"
    d.mkdir(parents=True)
    for name, target in links.items():
        (d / f"{name}.gguf").symlink_to(target)
    return d


def loaded(http: httpx.Client) -> dict[str, bool]:
    return {m["name"]: m["loaded"] for m in http.get("/api/models").json()}


def log_count(server, text: str) -> int:
    return server.log_path.read_text(errors="replace").count(text)


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"not {what} after {timeout}s")


@pytest.fixture(scope="module")
def pool_server(tmp_path_factory, smollm2_path, gemma_path):
    root = tmp_path_factory.mktemp("pool_server")
    (root / "elsewhere").mkdir()
    served = root / "elsewhere" / "served.gguf"
    served.symlink_to(smollm2_path)
    (root / "elsewhere" / "evil.gguf").write_bytes(b"GGUF" + b"\xff" * 60)   # would be a 500 if it were opened
    config = base_config(max_batch_size=2, max_sequence_length=64)
    config["models"] = {"directory": str(models_dir(root, {SMOL: smollm2_path, GEMMA: gemma_path})), "max_loaded": 2}
    with serving(root, config, model=str(served)) as srv:
        srv.root = root
        yield srv


@pytest.fixture(scope="module")
def pool(pool_server):
    with httpx.Client(base_url=pool_server.url, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def single_server(tmp_path_factory, smollm2_path):
    root = tmp_path_factory.mktemp("single_server")
    alias = root / "alias.gguf"
    alias.symlink_to(smollm2_path)
    config = base_config(max_batch_size=2, max_sequence_length=512)
    config["models"] = {"directory": str(models_dir(root, {SMOL: smollm2_path})), "max_loaded": 1, "keep_alive": "3s"}
    with serving(root, config, model=str(alias)) as srv:
        yield srv


@pytest.fixture(scope="module")
def single(single_server):
    with httpx.Client(base_url=single_server.url, timeout=300) as client:
        yield client


# -- pool_server: max_loaded 2 -------------------------------------------------------------------------------
def test_a_model_served_from_a_path_is_listed_as_loaded(pool):
    assert pool.get("/health").json()["model"] == "served"
    assert loaded(pool) == {"served": True, SMOL: False, GEMMA: False}
    assert {m["id"] for m in pool.get("/v1/models").json()["data"]} == {"served", SMOL, GEMMA}


def tokens_of(path: str, text: str | None = None, messages=None) -> int:
    from woolly.chat_template import tokenize_chat
    from woolly.model_file import Model

    m = Model.from_file(path)
    try:
        return len(tokenize_chat(m, messages, add_generation_prompt=True) if messages
                   else m.tokenizer.tokenize(text))
    finally:
        m.close()


async def ws_generate(url: str, model: str) -> dict:
    async with websockets.connect(url) as ws:
        json.loads(await ws.recv())   # status
        await ws.send(json.dumps({"type": "generate", "id": "g", "prompt": PROMPT, "model": model,
                                  "config": {"max_tokens": 3, "temperature": 0}}))
        while True:
            event = json.loads(await ws.recv())
            if event["type"] in ("complete", "error"):
                return event


def test_every_route_answers_with_the_requested_model(pool_server, pool, smollm2_path, gemma_path):
    """gemma3-270m is loaded on demand beside `served`; each route's answer is Gemma's (its tokenizer's
    counts, its 640-wide embeddings), while `served` (SmolLM2, 576 wide) still answers when named."""
    n_prompt = {m: tokens_of(p, PROMPT) for m, p in ((GEMMA, gemma_path), ("served", smollm2_path))}
    n_chat = {m: tokens_of(p, messages=CHAT) for m, p in ((GEMMA, gemma_path), ("served", smollm2_path))}
    width = {GEMMA: 640, "served": 576}
    assert n_prompt[GEMMA] != n_prompt["served"] and n_chat[GEMMA] != n_chat["served"]
    for model in (GEMMA, "served"):
        gen = dict(max_tokens=3, temperature=0, model=model)
        r = pool.post("/api/generate", json={"prompt": PROMPT, **gen})
        assert r.status_code == 200 and r.json()["prompt_tokens"] == n_prompt[model], (model, r.text)
        greedy = r.json()["text"]
        r = pool.post("/api/chat", json={"messages": CHAT, **gen})
        assert r.status_code == 200 and r.json()["prompt_tokens"] == n_chat[model], (model, r.text)
        r = pool.post("/api/embeddings", json={"input": "hello", "model": model})
        assert r.json()["dimensions"] == width[model] and r.json()["model"] == model, r.text
        r = pool.post("/v1/completions", json={"prompt": PROMPT, **gen})
        assert r.json()["model"] == model and r.json()["usage"]["prompt_tokens"] == n_prompt[model], r.text
        r = pool.post("/v1/chat/completions", json={"messages": CHAT, **gen})
        assert r.json()["model"] == model and r.json()["usage"]["prompt_tokens"] == n_chat[model], r.text
        r = pool.post("/v1/embeddings", json={"input": "hello", "model": model})
        assert r.json()["model"] == model and len(r.json()["data"][0]["embedding"]) == width[model], r.text
        event = asyncio.run(ws_generate(pool_server.ws_url, model))
        assert event["type"] == "complete" and event["text"] == greedy, (model, event)
    assert loaded(pool) == {"served": True, SMOL: False, GEMMA: True}   # both resident
    assert log_count(pool_server, f"loaded model {GEMMA}") == 1


def test_a_request_naming_no_model_uses_the_most_recently_loaded(pool, gemma_path):
    assert pool.get("/health").json()["model"] == GEMMA
    r = pool.post("/api/generate", json={"prompt": PROMPT, "max_tokens": 1})
    assert r.json()["prompt_tokens"] == tokens_of(gemma_path, PROMPT)


@pytest.mark.parametrize("route,body", [
    ("/api/generate", {"prompt": "Hi"}), ("/api/chat", {"messages": CHAT}), ("/api/embeddings", {"input": "Hi"}),
    ("/v1/completions", {"prompt": "Hi"}), ("/v1/chat/completions", {"messages": CHAT}),
    ("/v1/embeddings", {"input": "Hi"}),
])
def test_an_unknown_model_is_404_naming_the_available_ones(pool, route, body):
    err = assert_error(pool.post(route, json={**body, "model": "no-such-model"}), 404, "MODEL_NOT_FOUND")
    assert err["details"]["model"] == "no-such-model"
    assert set(err["details"]["available_models"]) == {"served", SMOL, GEMMA}


def test_an_unknown_model_on_the_websocket_is_an_error_event(pool_server):
    event = asyncio.run(ws_generate(pool_server.ws_url, "no-such-model"))
    assert event["type"] == "error" and event["code"] == "MODEL_NOT_FOUND" and event["request_id"] == "g"


def test_the_least_recently_used_idle_model_is_evicted_at_max_loaded(pool_server, pool):
    assert pool.post("/api/generate", json={"prompt": "Hi", "max_tokens": 1, "model": "served"}).status_code == 200
    r = pool.post("/api/generate", json={"prompt": "Hi", "max_tokens": 1, "model": SMOL})   # a third: Gemma goes
    assert r.status_code == 200, r.text
    assert loaded(pool) == {"served": True, SMOL: True, GEMMA: False}
    assert log_count(pool_server, f"unloaded model {GEMMA}") == 1


def test_v1_models_retrieve_with_the_openai_client(pool_server):
    with openai.OpenAI(base_url=pool_server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
        m = client.models.retrieve(GEMMA)   # pulled, not loaded: still a model the server offers
        assert (m.id, m.object, m.owned_by) == (GEMMA, "model", "woolly") and m.created > 0
        assert client.models.retrieve("served").id == "served"
        with pytest.raises(openai.NotFoundError) as e:
            client.models.retrieve("no-such-model")
    assert e.value.body["code"] == "model_not_found" and e.value.body["type"] == "invalid_request_error"
    r = httpx.get(pool_server.url + "/v1/models/no-such-model")
    assert r.status_code == 404 and set(r.json()) == {"error"}
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_loading_a_path_only_from_the_models_directory(pool_server, pool):
    root = pool_server.root
    for name in (str(root / "elsewhere" / "evil.gguf"), "../elsewhere/evil.gguf", str(root / "elsewhere" / "served.gguf"),
                 "/etc/passwd.gguf"):
        err = assert_error(pool.post("/api/models/load", json={"name": name}), 400, "INVALID_REQUEST", "models directory")
        assert str(root) not in err["message"]
    assert_error(pool.post("/api/models/load", json={"name": "missing.gguf"}), 404, "MODEL_NOT_FOUND")
    r = pool.post("/api/models/load", json={"name": str(root / "models" / f"{GEMMA}.gguf")})
    assert r.status_code == 200, r.text
    assert pool.get("/health").json()["model"] == GEMMA and loaded(pool)[GEMMA]


def test_unload_by_name_leaves_the_others(pool_server, pool):
    from woolly.client import WoollyClient

    resident = [n for n, is_loaded in loaded(pool).items() if is_loaded]
    assert GEMMA in resident and len(resident) == 2
    with WoollyClient(pool_server.url) as client:
        r = client.unload_model(GEMMA)
    assert r.success and r.message == "Model unloaded"
    now = loaded(pool)
    assert not now[GEMMA] and [n for n, is_loaded in now.items() if is_loaded] == [n for n in resident if n != GEMMA]
    assert_error(pool.post("/api/models/unload", json={"name": GEMMA}), 400, "MODEL_NOT_LOADED")


# -- single_server: max_loaded 1, keep_alive 3s ----------------------------------------------------------------
def test_max_loaded_one_evicts_the_idle_model_and_refuses_while_it_is_busy(single_server, single):
    assert single.get("/health").json()["model"] == "alias"
    assert loaded(single) == {SMOL: False, "alias": True}
    r = single.post("/api/generate", json={"prompt": "Hi", "max_tokens": 1, "model": SMOL, "keep_alive": -1})
    assert r.status_code == 200, r.text
    assert loaded(single) == {SMOL: True}   # alias, from a path, went to make room
    assert log_count(single_server, "unloaded model alias") == 1

    async def main():
        async with httpx.AsyncClient(base_url=single_server.url, timeout=300) as client:
            async with client.stream("POST", "/api/generate", json={
                    "prompt": "Write a long story about a dragon:", "max_tokens": 400, "temperature": 0.8, "seed": 1,
                    "model": SMOL, "stream": True}) as stream:
                lines = stream.aiter_lines()
                async for line in lines:   # its first token: SmolLM2 is busy now
                    if line.startswith("data:"):
                        break
                other = await client.post("/api/generate", json={"prompt": "Hi", "max_tokens": 1, "model": "alias"})
                rest = [line async for line in lines if line.startswith("data:")]
            return other, rest

    other, rest = asyncio.run(main())
    err = assert_error(other, 503, "SERVER_BUSY", "max_loaded")
    assert err["details"]["max_loaded"] == 1
    assert rest[-1] == "data: [DONE]" and not any('"error"' in line for line in rest)   # the stream was not cut
    r = single.post("/api/generate", json={"prompt": "Hi", "max_tokens": 1, "model": "alias", "keep_alive": -1})
    assert r.status_code == 200, r.text
    assert loaded(single) == {SMOL: False, "alias": True}


def test_concurrent_requests_for_an_unloaded_model_load_it_once(single_server, single):
    before = log_count(single_server, f"loaded model {SMOL}")

    async def main():
        async with httpx.AsyncClient(base_url=single_server.url, timeout=300) as client:
            return await asyncio.gather(*(client.post("/api/generate", json={
                "prompt": f"Hi {i}", "max_tokens": 1, "model": SMOL, "keep_alive": "-1"}) for i in range(3)))

    assert [r.status_code for r in asyncio.run(main())] == [200] * 3
    assert log_count(single_server, f"loaded model {SMOL}") == before + 1


def test_keep_alive_zero_unloads_after_the_request_and_the_default_reloads(single_server, single):
    r = single.post("/api/generate", json={"prompt": "Hi", "max_tokens": 1, "model": SMOL, "keep_alive": 0})
    assert r.status_code == 200, r.text
    wait_until(lambda: not any(loaded(single).values()), 5, "unloaded")
    assert single.get("/health").json()["model"] == SMOL   # still the model a request naming none gets
    r = single.post("/api/generate", json={"prompt": "Hi", "max_tokens": 1})
    assert r.status_code == 200 and loaded(single)[SMOL], r.text


def test_a_model_loaded_on_demand_is_unloaded_after_the_default_keep_alive(single_server, single):
    assert single.post("/api/models/unload").status_code == 200
    assert_error(single.post("/api/generate", json={"prompt": "Hi", "max_tokens": 1}), 400, "MODEL_NOT_LOADED")
    r = single.post("/api/generate", json={"prompt": "Hi", "max_tokens": 1, "model": SMOL})   # models.keep_alive 3s
    assert r.status_code == 200 and loaded(single)[SMOL], r.text
    wait_until(lambda: not loaded(single)[SMOL], 10, "unloaded")
    r = single.post("/api/generate", json={"prompt": "Hi", "max_tokens": 1, "model": SMOL, "keep_alive": "1h"})
    assert r.status_code == 200
    time.sleep(4.5)
    assert loaded(single)[SMOL]   # its own keep_alive outlasts the default


@pytest.mark.parametrize("keep_alive", ["soon", "5 minutes", "1d", "", True, "m5"])
def test_a_bad_keep_alive_is_a_400(single, keep_alive):
    assert_error(single.post("/api/generate", json={"prompt": "Hi", "max_tokens": 1, "keep_alive": keep_alive}),
                 400, "INVALID_REQUEST", "keep_alive")


# -- configuration ----------------------------------------------------------------------------------------------
def test_the_pool_settings_come_from_the_file_and_woolly_variables(tmp_path):
    from woolly.config import load_config, parse_keep_alive
    from woolly.errors import InvalidRequest

    cfg = load_config(env={})
    assert (cfg.models.max_loaded, parse_keep_alive(cfg.models.keep_alive)) == (3, 300.0)   # Ollama's defaults
    assert cfg.inference.residency == "quantized"
    cfg = load_config(env={"WOOLLY_MAX_LOADED_MODELS": "1", "WOOLLY_KEEP_ALIVE": "1h30m"})
    assert (cfg.models.max_loaded, parse_keep_alive(cfg.models.keep_alive)) == (1, 5400.0)
    assert parse_keep_alive(-1) is None and parse_keep_alive("0") == 0.0 and parse_keep_alive("250ms") == 0.25
    for env in ({"WOOLLY_MAX_LOADED_MODELS": "0"}, {"WOOLLY_KEEP_ALIVE": "soon"}):
        with pytest.raises(InvalidRequest):
            load_config(env=env)
