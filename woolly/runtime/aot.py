"""Entry points traced once per machine: a jitted function's lowering kept on disk (`jax.export`).

Tracing a real model's forward in Python takes ~0.5-1 s per entry point, every new process,
before the persistent compile cache can even be asked (it is keyed by the lowered module).
`Exported(jitted)` wraps a jitted entry point: the first call with a new signature (static
arguments, argument tree and shapes) exports it and writes the serialized StableHLO next to
the compile cache; later calls — in this process or a new one — deserialize it and run it
under `jax.jit` with the same donation, which skips tracing the model altogether.

The file's key covers everything the lowering depends on: the signature, the source of
`woolly/` (models, ops, runtime and the C++ kernels), the jax version and backend, and which
kernels the process uses. Only single-device calls take this path; anything else (a mesh,
`WOOLLY_AOT=0`, an export error) calls the jitted function as before.

One step further, for a caller whose signature never changes (a `Runner`'s decode step and its
prefill buckets): `Exported.executable(*args, **static)` returns the compiled executable itself
(`jax.stages.Compiled`), serialized to disk next to the lowering (`jax.experimental.
serialize_executable`). A new process then deserializes it and calls it, skipping the trace,
the lowering of the exported module into a new one (~0.2 s for SmolLM2's decode step, plus
~0.1 s of LAPACK set-up that jax's lowering of any exported call does), the compile-cache key
and lookup. Its key adds what an executable depends on beyond the lowering: jaxlib, the CPU,
XLA_FLAGS.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import hashlib
import json
import os
import pickle
import tempfile
import threading
import warnings
from pathlib import Path

import jax

from woolly.models.base import KVCache
from woolly.ops import attention, cpu_kernels, qmatmul
from woolly.runtime.compile_cache import compile_cache_dir
from woolly.runtime.device_sampling import SamplingParams

_lock = threading.Lock()
_source_hash: str | None = None
_registered = False
stats = {"exported": 0, "loaded": 0,   # lowerings written / read back in this process
         "executables_written": 0, "executables_loaded": 0}


def enabled() -> bool:
    """WOOLLY_AOT is not off, and the process sees one device in all (called at call time, after
    any cluster is joined): saved lowerings and executables are one-device programs, and a process
    with several devices (a mesh, a multi-host cluster) takes the plain jitted path."""
    if os.environ.get("WOOLLY_AOT", "1").lower() in ("0", "false", "no", "off"):
        return False
    return jax.process_count() == 1 and jax.device_count() == 1


def _register_pytrees() -> None:
    """Teach jax.export how to write Woolly's pytree nodes (once per process)."""
    global _registered
    if _registered:
        return
    jax.export.register_pytree_node_serialization(
        qmatmul.QuantizedWeight, serialized_name="woolly.QuantizedWeight",
        serialize_auxdata=lambda aux: json.dumps(list(aux)).encode(),
        deserialize_auxdata=lambda b: tuple(json.loads(b)))
    jax.export.register_namedtuple_serialization(KVCache, serialized_name="woolly.KVCache")
    jax.export.register_namedtuple_serialization(SamplingParams, serialized_name="woolly.SamplingParams")
    _registered = True


def source_hash() -> str:
    """A hash of the code a lowering depends on (computed once per process)."""
    global _source_hash
    if _source_hash is None:
        root = Path(__file__).resolve().parent.parent
        h = hashlib.sha256()
        for sub in ("arch.py", "models", "ops", "runtime"):
            p = root / sub
            files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.suffix in (".py", ".cc"))
            for f in files:
                h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
        _source_hash = h.hexdigest()
    return _source_hash


def _kernels() -> dict:
    """Which kernels a trace would use now; asking also registers their FFI targets, which a
    deserialized module needs before it compiles."""
    return {"qmatvec": qmatmul.kernel_available(), "attention": attention.kernel_available(),
            "attention_on": attention.USE_KERNEL, "activations": qmatmul.ACTIVATIONS, "in_use": cpu_kernels.in_use(),
            "isa": cpu_kernels.isa(),
            "max_rows": (qmatmul.KERNEL_MAX_ROWS, qmatmul.KERNEL_MAX_ROWS_DENSE)}


@contextlib.contextmanager
def _lean_locations():
    """Lower without Python tracebacks in the ops' locations: by default every op carries up to 100
    frames of its trace, 60% of the HLO a saved executable holds, and deserializing it in a new
    process (before its first token) took ~20% longer with them (0.29 vs 0.23 s CPU, SmolLM2's
    decode step)."""
    try:
        from jax._src import config as jax_config
        frames = jax_config.traceback_in_locations_limit(0)
        full = jax_config.include_full_tracebacks_in_locations(False)
    except (ImportError, AttributeError):   # another jax: its defaults
        yield
        return
    with frames, full:
        yield


def _plain_args(args) -> bool:
    """No top-level argument is a tracer (a KVCache judged by its first buffer, a params tree by
    its first leaf): under a user's jit, grad or vmap the entry point is traced as plain jit.
    Checked per call, so it does not walk the params. (Placement needs no check: `enabled()`
    admits only a process with one device.)"""
    for a in args:
        if isinstance(a, KVCache):
            a = a.k[0]
        while isinstance(a, (dict, list, tuple)) and a:
            a = next(iter(a.values())) if isinstance(a, dict) else a[0]
        if isinstance(a, jax.core.Tracer):
            return False
    return True


class Exported:
    """Call `jitted(*args, **static)` through an exported lowering cached on disk.

    A `jax.jit` of its own dispatches each call (so a step pays jit's C++ dispatch, not a Python
    walk of the params); only when that jit traces a new signature does this look the lowering
    up on disk, or export and write it, and the trace is then just the lowering's call."""

    def __init__(self, jitted, name: str, donate_argnums: tuple[int, ...] = (), static_argnames=("cfg",)):
        self.jitted, self.name = jitted, name
        self.static_argnames = frozenset(static_argnames)
        self._dispatch = jax.jit(self._lowered, static_argnames=tuple(static_argnames), donate_argnums=donate_argnums)
        self._donate = donate_argnums
        self.__doc__ = jitted.__doc__
        self.__wrapped__ = getattr(jitted, "__wrapped__", jitted)   # the Python function, as jax.jit's

    def __getattr__(self, name):   # lower, trace, eval_shape, ...: the jitted function's own
        if name == "jitted":
            raise AttributeError(name)
        return getattr(self.jitted, name)

    def _cache_size(self) -> int:
        """Executables behind this entry point (as `jax.jit`'s own `_cache_size`)."""
        return self._dispatch._cache_size() + self.jitted._cache_size()

    def __call__(self, *args, **static):
        if (not enabled() or not cpu_kernels.in_use() or not static.keys() <= self.static_argnames
                or not _plain_args(args)):
            return self.jitted(*args, **static)
        return self._dispatch(*args, **static)

    def _lowered(self, *args, **static):
        """Traced once per signature (the dispatch jit's cache decides): the exported call."""
        with _lock:
            exp = self._exported(args, static)
        if exp is None:   # not exportable: trace the function itself, as plain jit would
            return self.__wrapped__(*args, **static)
        return exp.call(*args)

    def _key(self, args, static, *extra) -> str:
        leaves, tree = jax.tree.flatten(args)
        avals = tuple((x.shape, x.dtype, getattr(getattr(x, "aval", x), "weak_type", False)) for x in leaves)
        return hashlib.sha256(repr((self.name, str(tree), avals, repr(tuple(sorted(static.items()))),
                                    tuple(sorted(_kernels().items())), source_hash(), jax.__version__,
                                    jax.default_backend(), *extra)).encode()).hexdigest()[:32]

    def executable(self, *args, early: "_EarlyEntry | None" = None, **static):
        """The compiled executable for exactly this signature, called with the non-static
        arguments (`exe(*args)`), donating as the entry point does: deserialized from disk, or
        compiled through the exported lowering (and the compile cache) and written there. None
        where `__call__` would not take the exported path, or on any failure (the caller then
        calls the entry point as usual). `early`: this entry point's `EarlyLoad.entry`, used when
        it loaded this very signature's file; its hint is pointed at this signature's file."""
        if (not enabled() or not cpu_kernels.in_use() or not static.keys() <= self.static_argnames
                or not _plain_args(args)):
            return None
        from jax.experimental import serialize_executable as se
        from jax._src.lib import version_str as jaxlib_version

        try:
            with _lock:
                _register_pytrees()
                key = self._key(args, static, "executable", jaxlib_version, cpu_kernels.cpu_tag(),
                                os.environ.get("XLA_FLAGS", ""), jax.devices()[0].device_kind)
        except Exception:
            return None
        path = _exe_path(self.name, key)
        if early is not None:
            early.point_at(key)
            got = early.result()
            if got is not None and got[0] == key:
                return got[1]
        if path.exists():
            try:
                return _load_exe(path)
            except Exception:   # truncated, or written by an incompatible build: compile again
                pass
        # Compiled under a name of its own (with this file's key), so the persistent compile
        # cache holds no executable for its module: jaxlib 0.10 serializes an executable that
        # was itself loaded from that cache without some of its kernels ("Function ..._fusion
        # not found" when the copy runs). Only a fresh compile is written (checked below).
        def fresh(*a, **st):
            return self._lowered(*a, **st)
        fresh.__name__ = fresh.__qualname__ = f"woolly_executable_{self.name}_{key[:12]}"
        _watch_cache_hits()
        hits = _cache_hits.n = getattr(_cache_hits, "n", 0)
        try:
            jitted = jax.jit(fresh, static_argnames=tuple(self.static_argnames), donate_argnums=self._donate)
            with _lean_locations():
                exe = jitted.lower(*args, **static).compile()
        except Exception:
            return None
        if _cache_hits.n == hits:
            try:
                _write_atomic(path, pickle.dumps(se.serialize(exe)))
                stats["executables_written"] += 1
            except Exception:   # not serializable here: still usable in this process
                pass
        return exe

    def _exported(self, args, static):
        _register_pytrees()
        key = self._key(args, static)
        path = Path(compile_cache_dir()) / "woolly-aot" / f"{self.name}-{key}.bin"
        if path.exists():
            try:
                exp = jax.export.deserialize(bytearray(path.read_bytes()))
                _used(path)
                stats["loaded"] += 1
                return exp
            except Exception:   # a truncated or stale file: export again
                pass
        try:
            checks = [jax.export.DisabledSafetyCheck.custom_call(t)
                      for t in (qmatmul._TARGET, qmatmul._DEQUANT_TARGET, *attention.KERNEL_TARGETS)]
            specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
            with _lean_locations():
                exp = jax.export.export(self.jitted, disabled_checks=checks)(*specs, **static)
            _write_atomic(path, exp.serialize())
            stats["exported"] += 1
            return exp
        except Exception as e:   # an unexportable signature still runs, just traced each process
            warnings.warn(f"woolly: {self.name} not exported ({type(e).__name__}: {e})", RuntimeWarning,
                          stacklevel=3)
            return None


def _exe_path(name: str, key: str) -> Path:
    return Path(compile_cache_dir()) / "woolly-aot" / f"{name}-{key}.exe"


def _load_exe(path: Path):
    """A saved executable, deserialized and loaded on the device."""
    from jax.experimental import serialize_executable as se

    blob, in_tree, out_tree = pickle.loads(path.read_bytes())
    _used(path)
    exe = se.deserialize_and_load(blob, in_tree, out_tree)
    stats["executables_loaded"] += 1
    return exe


_background: set[concurrent.futures.Future] = set()   # loads running in daemon threads


def in_background(fn, name: str) -> concurrent.futures.Future:
    """fn() in a daemon thread -> a Future of its result (None if it raised)."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException:
            future.set_result(None)
        finally:
            _background.discard(future)
    _background.add(future)
    threading.Thread(target=run, name=name, daemon=True).start()
    return future


@atexit.register
def _wait_for_background() -> None:
    """At interpreter exit, let loads still running finish: a daemon thread stopped inside XLA's
    deserializer or compiler can crash the exit."""
    concurrent.futures.wait(list(_background), timeout=120)


class EarlyLoad:
    """Entry points' executables loaded before their arguments exist (a new process's decode step
    and short prefill, while the model file is still being read): `hint` names what the caller
    knows early (model file, engine settings); per entry point a small file under it records the
    signature key its executable had last time, and that file is deserialized now, in the
    background. `Exported.executable(..., early=entry(name))` takes it only if the real arguments
    give the same key, and points the hint at the key they give."""

    def __init__(self, hint: str, names: tuple[str, ...]):
        self._entries = {name: _EarlyEntry(name, hint) for name in names}

    def entry(self, name: str) -> "_EarlyEntry | None":
        return self._entries.get(name)


class _EarlyEntry:
    """One entry point's early load (see EarlyLoad)."""

    def __init__(self, name: str, hint: str):
        self.name = name
        self._hint_file = Path(compile_cache_dir()) / "woolly-aot" / f"{name}-hint-{hint}.txt"
        self._future: concurrent.futures.Future | None = None
        if not enabled():
            return
        try:
            key = self._hint_file.read_text().strip()
        except OSError:
            return
        path = _exe_path(name, key)
        if key.isalnum() and path.exists():
            def load():
                with _lock:
                    _register_pytrees()
                _kernels()   # registers the kernels' FFI targets, which the executable calls
                return key, _load_exe(path)
            self._future = in_background(load, f"woolly-early-{name}")

    def result(self):
        """(key, executable) loaded early, or None."""
        return None if self._future is None else self._future.result()

    def point_at(self, key: str) -> None:
        try:
            if self._hint_file.read_text().strip() == key:
                return
        except OSError:
            pass
        _write_atomic(self._hint_file, key.encode())


_cache_hits = threading.local()   # persistent compile-cache hits on this thread
_watching = False


def _watch_cache_hits() -> None:
    global _watching
    with _lock:
        if not _watching:
            def on_event(event: str, **_):
                if event == "/jax/compilation_cache/cache_hits":
                    _cache_hits.n = getattr(_cache_hits, "n", 0) + 1
            jax.monitoring.register_event_listener(on_event)
            _watching = True


def max_bytes() -> int:
    """The saved lowerings' and executables' budget: $WOOLLY_AOT_CACHE_MAX_BYTES, else 1 GiB.
    Each code version and signature writes its own files (2-5 MB each for the real models)."""
    try:
        return int(os.environ.get("WOOLLY_AOT_CACHE_MAX_BYTES", 1 << 30))
    except ValueError:
        return 1 << 30


def _used(path: Path) -> None:
    """Mark a file read now (its mtime), so `_trim` removes the least recently used first."""
    try:
        os.utime(path)
    except OSError:
        pass


def _trim(folder: Path, budget: int) -> None:
    """Remove the least recently used files of `folder` until the rest fit in `budget` bytes."""
    try:
        found = [(e.stat(), e.path) for e in os.scandir(folder) if e.is_file() and not e.name.endswith(".tmp")]
    except OSError:
        return
    files = [(st.st_mtime, st.st_size, name) for st, name in found]
    total = sum(size for _, size, _ in files)
    for _, size, name in sorted(files):
        if total <= budget:
            break
        try:
            os.remove(name)
            total -= size
        except OSError:   # removed by another process meanwhile
            pass


def _write_atomic(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:   # a read-only cache directory: this process still uses the export in memory
        return
    _trim(path.parent, max_bytes())
