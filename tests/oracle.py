"""llama.cpp (llama-cpp-python) as the oracle: opened safely on this CPU and cached across tests.

A plain module, not conftest, so test files in any folder can `from oracle import ...`
(tests/ is on pytest's pythonpath).
"""
from __future__ import annotations

_llama_cache: dict = {}


def llama_cpp_model(path: str, **kw):
    """One llama-cpp-python `Llama` per (path, options), reused across tests (loading costs)."""
    key = (path, tuple(sorted(kw.items())))
    if key not in _llama_cache:
        _llama_cache[key] = open_llama_cpp(path, **kw)
    return _llama_cache[key]


def open_llama_cpp(path: str, **kw):
    """A fresh, uncached `Llama` (for throwaway files); the caller closes it."""
    from woolly.bench import import_llama_cpp   # loads weights into plain CPU buffers (AMX crashes here)

    llama_cpp = import_llama_cpp()
    opts = dict(n_ctx=512, n_threads=2, n_batch=512, verbose=False, seed=0)
    opts.update(kw)
    return llama_cpp.Llama(model_path=path, **opts)


def close_all() -> None:
    while _llama_cache:
        _llama_cache.popitem()[1].close()
