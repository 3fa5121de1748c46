"""The on-disk caches stay within their budgets: saved lowerings and executables (aot.py) lose
their least recently used files first; JAX's compile cache is given its own budget."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tiny_models import write_tiny_model
from woolly.runtime import aot


def _files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}


def test_trim_removes_the_least_recently_used_first(tmp_path):
    now = time.time()
    for i, name in enumerate(["a.exe", "b.bin", "c.exe", "d.bin"]):   # a oldest ... d newest
        (tmp_path / name).write_bytes(b"x" * 100)
        os.utime(tmp_path / name, (now - 100 + i, now - 100 + i))
    aot._used(tmp_path / "a.exe")   # read just now: the most recent
    aot._trim(tmp_path, 250)
    assert sorted(_files(tmp_path)) == ["a.exe", "d.bin"]
    aot._trim(tmp_path, 1000)       # within budget: nothing goes
    assert sorted(_files(tmp_path)) == ["a.exe", "d.bin"]


CHILD = """
import sys
from woolly.model_file import Model
from woolly.runtime import Runner
runner = Runner(Model.from_file(sys.argv[1]), slots=1, cache_length=64)
for n in (3, 20, 40):   # three prefill buckets: three executables, three lowerings
    runner.prefill(list(range(1, n + 1)))
"""


def test_saved_programs_stay_within_the_budget(tmp_path):
    path = write_tiny_model(tmp_path / "tiny.gguf")
    cache = tmp_path / "jax"
    env = dict(os.environ, WOOLLY_COMPILE_CACHE=str(cache), PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    unbounded = _files(cache / "woolly-aot")
    assert len(unbounded) >= 4
    budget = sum(sorted(unbounded.values())[-2:])   # room for about two of them
    for p in (cache / "woolly-aot").iterdir():
        p.unlink()
    env["WOOLLY_AOT_CACHE_MAX_BYTES"] = str(budget)
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    kept = _files(cache / "woolly-aot")
    assert 0 < len(kept) < len(unbounded) and sum(kept.values()) <= budget


def test_the_compile_cache_has_a_budget(tmp_path):
    code = ("import jax; from woolly.runtime.compile_cache import enable_compile_cache; "
            f"enable_compile_cache({str(tmp_path)!r}); print(jax.config.jax_compilation_cache_max_size)")
    env = dict(os.environ, WOOLLY_COMPILE_CACHE_MAX_BYTES="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split()[-1] == "12345", out.stderr[-2000:]


def test_entries_from_before_the_budget_do_not_break_writes(tmp_path):
    """A cache written with eviction off has no -atime files, which JAX's eviction reads for every
    entry on each write: they are added once, and new programs are written as before."""
    (tmp_path / "jit_old-0123-cache").write_bytes(b"x" * 10)   # an entry from an older Woolly
    code = ("import warnings, jax, jax.numpy as jnp; warnings.simplefilter('error'); "
            "from woolly.runtime.compile_cache import enable_compile_cache; "
            f"enable_compile_cache({str(tmp_path)!r}); jax.jit(lambda x: x * 3 + 1)(jnp.ones(7)).block_until_ready()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "Error writing" not in out.stderr, out.stderr[-2000:]
    names = {p.name for p in tmp_path.iterdir()}
    assert "jit_old-0123-atime" in names
    entries = {n[:-len("-cache")] for n in names if n.endswith("-cache")}
    assert len(entries) >= 2 and entries == {n[:-len("-atime")] for n in names if n.endswith("-atime")}
