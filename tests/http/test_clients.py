"""Clients against a real server: `woolly.client` (sync and async), and the API reference's own
Python, TypeScript and WebSocket client examples run unchanged (reference_clients/)."""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from support.live_server import MODEL
from woolly.client import AsyncWoollyClient, WoollyClient
from woolly.errors import InvalidRequest, ModelNotFound, WoollyError

pytestmark = pytest.mark.real

HERE = Path(__file__).parent
REFERENCE_CLIENTS = HERE / "reference_clients"
JS_DIR = HERE / "js"
API_REFERENCE = HERE.parents[2] / "shared" / "reference" / "api-reference.md"
GREEDY = {"max_tokens": 3, "temperature": 0}


# -- woolly.client ---------------------------------------------------------------------------
def test_sync_client_every_call(server):
    with WoollyClient(server.url) as c:
        assert c.health().status == "ok"
        assert MODEL in [m.name for m in c.models() if m.loaded]
        result = c.generate("Once upon a time", **GREEDY)
        assert result.tokens_generated > 0 and result.finish_reason in ("stop", "length")
        assert "".join(c.stream("Once upon a time", **GREEDY)) == result.text
        messages = [{"role": "user", "content": "Say hi."}]
        chat = c.chat(messages, **GREEDY)
        assert chat.role == "assistant"
        assert "".join(c.chat_stream(messages, **GREEDY)) == chat.content
        ids = c.tokenize("Hello, world!")
        assert c.detokenize(ids) == "Hello, world!"
        emb = c.embeddings(["a", "b"])
        assert len(emb.embeddings) == 2 and emb.dimensions == len(emb.embeddings[0])


def test_sync_client_raises_the_servers_error(server):
    with WoollyClient(server.url) as c:
        with pytest.raises(InvalidRequest) as e:
            c.generate("Hi", max_tokens=-1)
        assert e.value.code == "INVALID_REQUEST" and e.value.status == 400 and "max_tokens" in e.value.message
        with pytest.raises(InvalidRequest):
            list(c.stream("hello " * 600, max_tokens=1))
        with pytest.raises(ModelNotFound) as e:
            c.load_model("no-such-model")
        assert e.value.status == 404
        with pytest.raises(InvalidRequest):
            c.detokenize([-1])
        with pytest.raises(WoollyError) as e:
            c.generate("a" * 100_000)
        assert e.value.status == 413


def test_async_client_every_call(server):
    async def main():
        async with AsyncWoollyClient(server.url) as c:
            assert (await c.health()).status == "ok"
            assert MODEL in [m.name for m in await c.models()]
            results = await asyncio.gather(c.generate("Once upon a time", **GREEDY),
                                           c.chat([{"role": "user", "content": "Hi"}], **GREEDY))
            streamed = [p async for p in c.stream("Once upon a time", **GREEDY)]
            chat_streamed = [p async for p in c.chat_stream([{"role": "user", "content": "Hi"}], **GREEDY)]
            ids = await c.tokenize("async text")
            text = await c.detokenize(ids)
            emb = await c.embeddings("x")
            with pytest.raises(InvalidRequest):
                await c.chat([{"role": "wizard", "content": "x"}])
            return results, streamed, chat_streamed, text, emb

    (gen, chat), streamed, chat_streamed, text, emb = asyncio.run(main())
    assert "".join(streamed) == gen.text and "".join(chat_streamed) == chat.content
    assert text == "async text" and emb.dimensions > 0


# -- the reference's Python client (requests, SSE parsing) -----------------------------------
def reference_python_client():
    source = (REFERENCE_CLIENTS / "woolly_client.py").read_text()
    namespace: dict = {}
    exec(compile(source[:source.index("# Usage")], "woolly_client.py", "exec"), namespace)
    return namespace["WoollyClient"]


def test_reference_python_client(server):
    client = reference_python_client()(base_url=server.url)
    text = client.generate("Once upon a time", **GREEDY)
    assert isinstance(text, str) and text
    assert "".join(client.generate_stream("Once upon a time", **GREEDY)) == text
    import requests

    with pytest.raises(requests.HTTPError):
        client.generate("Hi", max_tokens=-1)


# -- the reference's JavaScript clients, with the machine's Node.js ---------------------------
@pytest.fixture(scope="module")
def node_packages():
    """`npm ci` into tests/http/js/node_modules once (ws, typescript), unless already there."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("Node.js and npm are needed to run the reference's JavaScript clients")
    if not ((JS_DIR / "node_modules" / "ws").is_dir() and (JS_DIR / "node_modules" / "typescript").is_dir()):
        npm = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, timeout=300,
                             capture_output=True, text=True)
        assert npm.returncode == 0, f"npm ci failed in {JS_DIR}:\n{npm.stderr[-2000:]}"
    return JS_DIR


def run_node(node_packages, mode: str, url: str) -> dict:
    proc = subprocess.run(["node", str(node_packages / "run_reference_client.js"), mode, url],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Failed to parse" not in proc.stdout + proc.stderr, proc.stderr   # every SSE line is one it reads
    results = [line[len("RESULT "):] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == 1, proc.stdout
    return json.loads(results[0])


def test_reference_typescript_client(server, node_packages):
    out = run_node(node_packages, "http", server.url)
    with WoollyClient(server.url) as c:
        expected = c.generate("Once upon a time", **GREEDY).text
    assert out["text"] == expected
    assert "".join(out["tokens"]) == expected
    assert out["error"] == "HTTP error! status: 400"


def test_reference_websocket_client(server, node_packages):
    out = run_node(node_packages, "ws", server.ws_url)
    assert out["statuses"] and out["statuses"][0]["model"] == MODEL
    story = out["story"]
    assert story["complete"]["finish_reason"] in ("stop", "length")
    assert "".join(t["token"] for t in story["tokens"]) == story["complete"]["text"]
    with WoollyClient(server.url) as c:
        assert story["complete"]["text"] == c.generate("Tell me a story", **GREEDY).text
    cancelled = out["cancelled"]
    assert cancelled["complete"]["finish_reason"] == "cancelled" and len(cancelled["tokens"]) < 200
    assert out["invalid"]["error"]["code"] == "INVALID_REQUEST"
    assert out["invalid"]["error"]["request_id"] == out["invalid"]["id"]


def test_reference_clients_are_verbatim():
    """The files under reference_clients/ are the reference's code blocks, byte for byte."""
    if not API_REFERENCE.is_file():
        pytest.skip(f"the API reference is not at {API_REFERENCE}")
    doc = API_REFERENCE.read_text()
    for heading, lang, name in (("### HTTP Client Example", "python", "woolly_client.py"),
                                ("### JavaScript/TypeScript Client", "typescript", "woolly_client.ts"),
                                ("### Example WebSocket Client", "javascript", "woolly_websocket.js")):
        start = doc.index(f"```{lang}\n", doc.index(heading)) + len(lang) + 4
        assert (REFERENCE_CLIENTS / name).read_text() == doc[start:doc.index("\n```", start)] + "\n", name
