"""The official `openai` Python client, unchanged, against the server's /v1 routes."""
from __future__ import annotations

import math

import openai
import pytest

from support.live_server import MODEL

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300) as c:
        yield c


def test_models(client):
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids


def test_chat_completion(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}],
                                       max_tokens=4, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 4 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_with_usage_matches_non_stream(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Name a color."}], max_tokens=4, temperature=0)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    with_choice = [c for c in chunks if c.choices]
    assert with_choice[0].choices[0].delta.role == "assistant"
    assert with_choice[-1].choices[0].finish_reason in ("stop", "length")
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens > 0
    text = "".join(c.choices[0].delta.content or "" for c in with_choice)
    whole = client.chat.completions.create(**kwargs)
    assert text == whole.choices[0].message.content
    assert usage.usage.completion_tokens == whole.usage.completion_tokens


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert content and len(content) <= 3
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 2
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert t.token == t.top_logprobs[0].token   # greedy picks the most likely token


def test_completion_with_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0,
                                  logprobs=3)
    assert r.object == "text_completion"
    choice = r.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) > 0
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(len(top) <= 3 for top in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert math.isclose(max(top.values()), logprob, abs_tol=1e-4)   # greedy: the best token was taken


def test_completion_stream(client):
    chunks = list(client.completions.create(model=MODEL, prompt="One, two,", max_tokens=4, temperature=0,
                                            stream=True))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    whole = client.completions.create(model=MODEL, prompt="One, two,", max_tokens=4, temperature=0)
    assert text == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_embeddings(client):
    r = client.embeddings.create(model=MODEL, input=["hello", "world"])
    assert [d.index for d in r.data] == [0, 1]
    dims = {len(d.embedding) for d in r.data}
    assert len(dims) == 1 and dims.pop() > 0
    assert r.usage.prompt_tokens > 0


def test_errors_are_openai_api_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "x"}], max_tokens=2)
    assert e.value.status_code == 400 and e.value.body["code"] == "INVALID_REQUEST"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=-1)
