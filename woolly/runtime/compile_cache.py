"""The persistent compilation cache: a second process loads executables instead of compiling."""
from __future__ import annotations

import os

import jax

DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "woolly", "jax")
_enabled: str | None = None


def compile_cache_dir() -> str:
    """$WOOLLY_COMPILE_CACHE, else ~/.cache/woolly/jax."""
    return os.environ.get("WOOLLY_COMPILE_CACHE") or DEFAULT_DIR


def max_bytes() -> int:
    """JAX's compile cache budget: $WOOLLY_COMPILE_CACHE_MAX_BYTES, else 2 GiB (-1: unbounded)."""
    try:
        return int(os.environ.get("WOOLLY_COMPILE_CACHE_MAX_BYTES", 2 << 30))
    except ValueError:
        return 2 << 30


def enable_compile_cache(path: str | None = None) -> str:
    """Point JAX's persistent cache at `path` (default `compile_cache_dir()`); idempotent."""
    global _enabled
    path = path or compile_cache_dir()
    if _enabled != path:
        os.makedirs(path, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        jax.config.update("jax_compilation_cache_max_size", max_bytes())   # least recently used go first
        _enabled = path
    return path
