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
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import numpy as np

from woolly.models.base import KVCache
from woolly.ops import attention, cpu_kernels, qmatmul
from woolly.runtime.compile_cache import compile_cache_dir
from woolly.runtime.sampling import SamplingParams

_lock = threading.Lock()
_source_hash: str | None = None
_registered = False
stats = {"exported": 0, "loaded": 0}   # lowerings written / read back in this process


def enabled() -> bool:
    return os.environ.get("WOOLLY_AOT", "1").lower() not in ("0", "false", "no", "off")


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
            "attention_on": attention.USE_KERNEL, "activations": qmatmul.ACTIVATIONS, "in_use": cpu_kernels.in_use()}


def _single_device(leaves) -> bool:
    """Every argument a host array or a concrete array on one device (not a tracer, not sharded)."""
    for x in leaves:
        if isinstance(x, np.ndarray):
            continue
        if isinstance(x, jax.core.Tracer) or not isinstance(x, jax.Array):
            return False
        s = getattr(x, "sharding", None)
        if s is None or len(s.device_set) != 1:
            return False
    return True


class Exported:
    """Call `jitted(*args, **static)` through an exported lowering cached on disk."""

    def __init__(self, jitted, name: str, donate_argnums: tuple[int, ...] = (), static_argnames=("cfg",)):
        self.jitted, self.name, self.donate_argnums = jitted, name, donate_argnums
        self.static_argnames = frozenset(static_argnames)
        self._calls: dict = {}   # in-memory signature -> jitted exported call
        self.__doc__ = jitted.__doc__
        self.__wrapped__ = getattr(jitted, "__wrapped__", jitted)   # the Python function, as jax.jit's

    def __getattr__(self, name):   # lower, trace, eval_shape, ...: the jitted function's own
        if name == "jitted":
            raise AttributeError(name)
        return getattr(self.jitted, name)

    def _cache_size(self) -> int:
        """Executables behind this entry point (as `jax.jit`'s own `_cache_size`)."""
        return len(self._calls) + self.jitted._cache_size()

    def __call__(self, *args, **static):
        leaves, tree = jax.tree.flatten(args)
        if (not enabled() or not cpu_kernels.in_use() or not static.keys() <= self.static_argnames
                or not _single_device(leaves)):
            return self.jitted(*args, **static)
        sig = (tree, tuple((x.shape, x.dtype, getattr(x, "weak_type", False)) for x in leaves),
               tuple(sorted((k, v) for k, v in static.items())), tuple(sorted(_kernels().items())))
        call = self._calls.get(sig)
        if call is None:
            with _lock:
                call = self._calls.get(sig) or self._prepare(args, static, sig)
                self._calls[sig] = call
        return call(*args)

    def _prepare(self, args, static, sig):
        _register_pytrees()
        key = hashlib.sha256(repr((self.name, str(sig[0]), sig[1], repr(sig[2]), sig[3], source_hash(),
                                   jax.__version__, jax.default_backend())).encode()).hexdigest()[:32]
        path = Path(compile_cache_dir()) / "woolly-aot" / f"{self.name}-{key}.bin"
        exp = None
        if path.exists():
            try:
                exp = jax.export.deserialize(bytearray(path.read_bytes()))
                stats["loaded"] += 1
            except Exception:   # a truncated or stale file: export again
                exp = None
        if exp is None:
            try:
                checks = [jax.export.DisabledSafetyCheck.custom_call(t)
                          for t in (qmatmul._TARGET, qmatmul._DEQUANT_TARGET, *attention.KERNEL_TARGETS)]
                exp = jax.export.export(self.jitted, disabled_checks=checks)(*args, **static)
                _write_atomic(path, exp.serialize())
                stats["exported"] += 1
            except Exception as e:   # an unexportable signature still runs, just traced each process
                warnings.warn(f"woolly: {self.name} not exported ({type(e).__name__}: {e})", RuntimeWarning,
                              stacklevel=3)
                return lambda *a: self.jitted(*a, **static)
        return jax.jit(exp.call, donate_argnums=self.donate_argnums)


def _write_atomic(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:   # a read-only cache directory: this process still uses the export in memory
        pass
