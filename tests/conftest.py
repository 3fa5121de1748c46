"""Shared fixtures: the two real models (pulled by `make test`) and llama.cpp as the oracle."""
from __future__ import annotations

import os

import pytest

from woolly.registry import resolve_model_path

REAL_MODELS = ("smollm2-135m-instruct", "gemma3-270m")

# Tests share one persistent compile cache so repeated runs don't recompile.
os.environ.setdefault("WOOLLY_COMPILE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "woolly", "jax-test"))


@pytest.fixture(scope="session")
def smollm2_path():
    return str(resolve_model_path("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def gemma_path():
    return str(resolve_model_path("gemma3-270m"))


@pytest.fixture(scope="session", params=REAL_MODELS)
def real_model_path(request):
    return str(resolve_model_path(request.param))


_llama_cache: dict = {}


def llama_cpp_model(path: str, **kw):
    """One llama-cpp-python `Llama` per (path, options), reused across tests (loading costs)."""
    import llama_cpp

    key = (path, tuple(sorted(kw.items())))
    if key not in _llama_cache:
        opts = dict(n_ctx=512, n_threads=2, n_batch=512, verbose=False, seed=0)
        opts.update(kw)
        _llama_cache[key] = llama_cpp.Llama(model_path=path, **opts)
    return _llama_cache[key]
