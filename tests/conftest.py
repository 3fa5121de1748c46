"""Shared fixtures: the two real models (pulled by `make test`), llama.cpp as the oracle, an empty
models directory. Helper modules are in `support` (tests/support)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from oracle import close_all, llama_cpp_model, open_llama_cpp  # noqa: F401  (re-exported)
from woolly.model_store import resolve_model_path

REAL_MODELS = ("smollm2-135m-instruct", "gemma3-270m")

# Tests share one persistent compile cache so repeated runs don't recompile.
os.environ.setdefault("WOOLLY_COMPILE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "woolly", "jax-test"))


@pytest.fixture
def models(tmp_path, monkeypatch) -> Path:
    """An empty models directory, via WOOLLY_MODELS_DIR."""
    d = tmp_path / "models"
    d.mkdir()
    monkeypatch.setenv("WOOLLY_MODELS_DIR", str(d))
    return d


@pytest.fixture(scope="session")
def smollm2_path():
    return str(resolve_model_path("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def gemma_path():
    return str(resolve_model_path("gemma3-270m"))


@pytest.fixture(scope="session", params=REAL_MODELS)
def real_model_path(request):
    return str(resolve_model_path(request.param))


@pytest.fixture(scope="session", autouse=True)
def _close_llama_cpp_models():
    """Free cached llama.cpp models before interpreter shutdown (their __del__ fails noisily then)."""
    yield
    close_all()
