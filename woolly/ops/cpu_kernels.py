"""Woolly's small C++ CPU kernels: built with the machine's g++ on first use, registered with XLA.

Each kernel is one source file in `woolly/ops/kernels/` exporting XLA FFI handlers
(`XLA_FFI_DEFINE_HANDLER_SYMBOL`). `load_kernel(name, {target: symbol})` compiles
`kernels/{name}.cc` (-O3 -march=native) into `~/.cache/woolly/kernels` (or
`WOOLLY_KERNEL_CACHE`), keyed by source, jax version, compiler flags and CPU, so later
processes only load the cached .so; it then registers each handler as an FFI target for
the CPU platform. Any failure (no g++, no AVX-512, not x86-64, `WOOLLY_QMATMUL_KERNEL=0`)
is reported once as a warning and the caller falls back to pure XLA.
"""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import jax

KERNEL_DIR = os.path.join(os.path.dirname(__file__), "kernels")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC", "-w"]

_xla_only = contextvars.ContextVar("woolly_xla_only", default=False)
_lock = threading.Lock()
_state: dict[str, dict] = {}   # kernel name -> {"ok": bool, "error": str, "lib": CDLL}


def disabled() -> bool:
    return os.environ.get("WOOLLY_QMATMUL_KERNEL", "1").lower() in ("0", "false", "no", "off")


@contextlib.contextmanager
def xla_only():
    """Trace without the C++ kernels (ops code asks `in_use()`): for computations XLA must
    partition itself, e.g. over a device mesh, where a custom call would be replicated.
    Traces made inside must not share a jit cache entry with ones made outside."""
    token = _xla_only.set(True)
    try:
        yield
    finally:
        _xla_only.reset(token)


def in_use() -> bool:
    """False inside `xla_only()`; whether a kernel also built is `load_kernel`'s answer."""
    return not _xla_only.get()


def cpu_tag() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor()


def build(name: str) -> str:
    """Compile kernels/{name}.cc (once per source, jaxlib and CPU) and return the .so path."""
    with open(os.path.join(KERNEL_DIR, f"{name}.cc")) as f:
        source = f.read()
    headers = "".join(Path(KERNEL_DIR, h).read_text() for h in sorted(os.listdir(KERNEL_DIR))
                      if h.endswith(".h"))
    cxx = os.environ.get("CXX", "g++")
    inc = jax.ffi.include_dir()
    key = hashlib.sha256("\0".join([source, headers, jax.__version__, inc, cxx, " ".join(FLAGS), cpu_tag(),
                                    sys.platform, platform.machine()]).encode()).hexdigest()[:16]
    root = os.environ.get("WOOLLY_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "woolly", "kernels")
    so = os.path.join(root, f"{name}-{key}.so")
    if os.path.exists(so):
        return so
    try:
        os.makedirs(root, exist_ok=True)
    except OSError:  # read-only home: build in the temp dir instead
        root = os.path.join(tempfile.gettempdir(), f"woolly-kernels-{os.getuid()}")
        so = os.path.join(root, f"{name}-{key}.so")
        if os.path.exists(so):
            return so
        os.makedirs(root, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        src = os.path.join(tmp, f"{name}.cc")
        with open(src, "w") as f:
            f.write(source)
        out = os.path.join(tmp, f"{name}.so")
        r = subprocess.run([cxx, *FLAGS, f"-I{inc}", f"-I{KERNEL_DIR}", src, "-o", out], capture_output=True, text=True,
                           timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {r.stderr.strip()[-2000:]}")
        os.replace(out, so)  # atomic: concurrent builders agree on the result
    return so


def load_kernel(name: str, targets: dict[str, str]) -> bool:
    """Build and load kernels/{name}.cc and register {ffi target: exported symbol} on CPU.
    -> whether it worked (decided once per process; `kernel_error(name)` says why not)."""
    st = _state.get(name)
    if st is not None:
        return st["ok"]
    with _lock:
        st = _state.get(name)
        if st is not None:
            return st["ok"]
        st = {"ok": False}
        if disabled():
            st["error"] = "disabled by WOOLLY_QMATMUL_KERNEL"
        elif platform.machine().lower() not in ("x86_64", "amd64"):
            st["error"] = f"no kernel for {platform.machine()}"
        else:
            try:
                lib = ctypes.cdll.LoadLibrary(build(name))
                for target, symbol in targets.items():
                    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
                st["lib"] = lib
                st["ok"] = True
            except Exception as e:  # no compiler, no AVX-512, ...: the XLA path still works
                st["error"] = f"{type(e).__name__}: {e}"
                warnings.warn(f"woolly: CPU kernel {name!r} unavailable, using XLA only ({st['error']})",
                              RuntimeWarning, stacklevel=3)
        _state[name] = st
        return st["ok"]


def kernel_error(name: str) -> str | None:
    """Why kernel `name` is not in use (None when it is, or has not been tried)."""
    return _state.get(name, {}).get("error")
