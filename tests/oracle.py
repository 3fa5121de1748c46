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
    import llama_cpp

    _disable_extra_buffer_types(llama_cpp)
    opts = dict(n_ctx=512, n_threads=2, n_batch=512, verbose=False, seed=0)
    opts.update(kw)
    return llama_cpp.Llama(model_path=path, **opts)


def _disable_extra_buffer_types(llama_cpp) -> None:
    """Load weights into plain CPU buffers (llama_model_params.use_extra_bufts = False).

    This machine's CPU reports AMX, and llama.cpp's AMX/repacked weight buffers segfault
    here on the first Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K matmul; `Llama()` has no option for
    it, so the default params it starts from are patched once.
    """
    import llama_cpp.llama as llama_module

    if getattr(llama_module.llama_cpp, "_woolly_plain_buffers", False):
        return
    default_params = llama_cpp.llama_model_default_params

    def plain_buffer_params():
        params = default_params()
        params.use_extra_bufts = False
        return params

    llama_module.llama_cpp.llama_model_default_params = plain_buffer_params
    llama_module.llama_cpp._woolly_plain_buffers = True


def close_all() -> None:
    while _llama_cache:
        _llama_cache.popitem()[1].close()
