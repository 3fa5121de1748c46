"""reliability.md "Requests", fuzzed: schemathesis over the live server's own /schema/openapi.json.

Every operation gets generated requests, valid (positive) and invalid (negative); every answer
must be below 500, match the schema's documented responses (status, content type, body) and
name no file system path. /api/models/load and /unload change what the other operations see:
they run last, load after unload, and the model must be back at the end. Generations are kept
short (`max_tokens` capped at 4: the engine's default is up to the whole context) so the run
stays bounded: WOOLLY_FUZZ_EXAMPLES examples per operation and mode (3 in the quick subset,
`make reliability` sets more).

Not checked: that every schema-valid request is accepted (schemathesis' positive_data_acceptance).
The schema cannot say what the server rightly refuses with a 400: an empty prompt, a role
outside system/user/assistant/tool, a model name with odd characters, a prompt over the context.

schemathesis' own pytest loader (`from_fixture`) does not run under pytest 9, so each operation
is a parametrized test that draws cases from `operation.as_strategy()` with Hypothesis.
"""
from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from schemathesis.specs.openapi.checks import positive_data_acceptance

from support import leak_recorder
from support.live_server import MODEL

pytestmark = pytest.mark.real

EXAMPLES = int(os.environ.get("WOOLLY_FUZZ_EXAMPLES", "3"))
OPERATIONS = ["GET /health", "GET /api/models", "POST /api/generate", "POST /api/chat", "POST /api/tokenize",
              "POST /api/detokenize", "POST /api/embeddings", "GET /v1/models", "POST /v1/completions",
              "POST /v1/chat/completions", "POST /v1/embeddings", "GET /v1/models/{model_id}",
              "POST /api/models/unload", "POST /api/models/load"]   # these two last, in this order
POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
HAS_BODY = [op for op in OPERATIONS if op.startswith("POST") and op != "POST /api/models/unload"]
CASES = [(op, POSITIVE) for op in OPERATIONS] + [(op, NEGATIVE) for op in HAS_BODY]   # nothing to break without a body
CASES.sort(key=lambda c: OPERATIONS.index(c[0]))
tried: dict[str, int] = {}


@pytest.fixture(scope="module")
def api_schema(rserver):
    return schemathesis.openapi.from_url(rserver.url + "/schema/openapi.json")


def test_the_schema_lists_exactly_these_operations(api_schema):
    found = {f"{op.ok().method.upper()} {op.ok().path}" for op in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


GENERATING = ("/api/generate", "/api/chat", "/v1/completions", "/v1/chat/completions")


def short(case) -> None:
    """Generated bodies ask for at most 4 tokens (an out-of-range value is kept: it is a 400)."""
    body = case.body
    if isinstance(body, dict) and case.path in GENERATING:
        for key in ("max_tokens", "max_completion_tokens"):
            value = body.get(key)
            if value is None or (type(value) is int and 4 < value <= 1 << 20):
                body[key] = 4
    if isinstance(body, dict) and isinstance(body.get("input"), list):
        body["input"] = body["input"][:4]


def no_path_in_errors(ctx, response, case):
    sent = response.request.body or b""
    sent = sent.decode("utf-8", "replace") if isinstance(sent, bytes) else str(sent)
    leak_recorder.record(f"{case.method} {case.path}", response.status_code, sent, response.text)
    if response.status_code >= 400:
        for marker in leak_recorder.PATH_MARKERS:
            assert marker not in response.text or marker in sent, f"the error body names {marker}"


@pytest.mark.parametrize("operation,mode", CASES, ids=[f"{op}-{m.value}" for op, m in CASES])
def test_no_5xx_and_every_answer_matches_the_schema(api_schema, rserver, rhttp, operation, mode):
    method, path = operation.split()
    op = api_schema[path][method]

    @given(op.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case):
        short(case)
        if path == "/api/models/load" and mode is POSITIVE:
            case.body = {**(case.body if isinstance(case.body, dict) else {}), "name": MODEL}
        tried[operation] = tried.get(operation, 0) + 1
        case.call_and_validate(base_url=rserver.url, timeout=300, additional_checks=[no_path_in_errors],
                               excluded_checks=[positive_data_acceptance])

    try:
        run()
    finally:
        if path.startswith("/api/models/") and rhttp.get("/health").json()["model"] is None:
            assert rhttp.post("/api/models/load", json={"name": MODEL}).status_code == 200
    assert rhttp.get("/health").json()["model"] == MODEL
