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


def _stamp_entries(path: str) -> None:
    """JAX's eviction reads a `<key>-atime` file beside each `<key>-cache` entry and fails every
    write while one lacks it; entries written with eviction off (Woolly before the budget) have
    none. Give them their mtime, once per cache directory (a marker file records it)."""
    marker = os.path.join(path, "woolly-atime-stamped")
    if os.path.exists(marker):
        return
    try:
        for entry in os.scandir(path):
            if entry.name.endswith("-cache"):
                atime = os.path.join(path, entry.name[:-len("-cache")] + "-atime")
                if not os.path.exists(atime):
                    with open(atime, "wb") as f:
                        f.write(entry.stat().st_mtime_ns.to_bytes(8, "little"))
        open(marker, "wb").close()
    except OSError:   # a read-only cache: JAX only reads it
        pass


def enable_compile_cache(path: str | None = None) -> str:
    """Point JAX's persistent cache at `path` (default `compile_cache_dir()`); idempotent."""
    global _enabled
    path = path or compile_cache_dir()
    if _enabled != path:
        os.makedirs(path, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        if max_bytes() != -1:
            _stamp_entries(path)
        jax.config.update("jax_compilation_cache_max_size", max_bytes())   # least recently used go first
        _enabled = path
    return path
