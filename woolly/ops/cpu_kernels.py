"""Woolly's small C++ CPU kernels: built with the machine's g++ on first use, registered with XLA.

Each kernel is one source file in `woolly/ops/kernels/` exporting XLA FFI handlers
(`XLA_FFI_DEFINE_HANDLER_SYMBOL`). `load_kernel(name, {target: symbol})` compiles
`kernels/{name}.cc` into `~/.cache/woolly/kernels` (or `WOOLLY_KERNEL_CACHE`), keyed by
source, jax version, compiler flags and CPU, so later processes only load the cached .so; it
then registers each handler as an FFI target for the CPU platform. Any failure (no g++,
`WOOLLY_QMATMUL_KERNEL=0`) is reported once as a warning and the caller falls back to pure XLA.

The kernels are written in AVX-512 intrinsics (kernels/simd.h). `isa()` picks the build from
the CPU's flags, or `WOOLLY_CPU_ISA` (auto | avx512 | avx2 | neon | portable): "avx512"
compiles them natively (-march=native); every other target defines WOOLLY_PORTABLE and takes
the same intrinsics from SIMDe (pip simde-py), which maps them onto AVX2 (-march=native
-mno-avx512f: AVX-512 switched off even where the CPU has it), NEON (-mcpu=native) or
scalar code, with the same results. The AVX2 build also defines WOOLLY_AVX2: the hot loops
(qmatvec's int8 product, the decode attention) have native 256-bit versions, bit for bit equal.
A first run builds every kernel at once (`_build_the_others`).
"""
from __future__ import annotations

import atexit
import concurrent.futures
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
FLAGS = ["-O3", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC", "-w"]
ISAS = ("avx512", "avx2", "neon", "portable")
_ISA_FLAGS = {"avx512": ["-march=native"],
              "avx2": ["-march=native", "-mno-avx512f", "-mavx2", "-mfma", "-mf16c", "-DWOOLLY_AVX2"],
              "neon": ["-mcpu=native"], "portable": []}

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


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo "flags" on x86, "Features" on ARM)."""
    for ln in cpu_tag().splitlines():
        if ln.startswith(("flags", "Features")):
            return set(ln.split(":", 1)[1].split())
    return set()


def isa() -> str:
    """The instruction set the kernels are built for: WOOLLY_CPU_ISA, else by the CPU's flags."""
    want = os.environ.get("WOOLLY_CPU_ISA", "auto").lower()
    if want != "auto":
        if want not in ISAS:
            raise ValueError(f"WOOLLY_CPU_ISA must be auto or one of {ISAS}, got {want!r}")
        return want
    machine, flags = platform.machine().lower(), cpu_flags()
    if machine in ("x86_64", "amd64"):
        if {"avx512f", "avx512bw"} <= flags:
            return "avx512"
        if {"avx2", "fma", "f16c"} <= flags:
            return "avx2"
    elif machine in ("aarch64", "arm64"):
        return "neon"
    return "portable"


def has_int8_dot() -> bool:
    """Whether the kernels multiply int8 activations (WOOLLY_Q8 in qmatvec.cc): AVX512-VNNI
    natively, or SIMDe's VNNI on every portable build."""
    return isa() != "avx512" or "avx512_vnni" in cpu_flags()


def compile_flags() -> list[str]:
    """g++ flags for this process's `isa()` (SIMDe's headers on the portable builds)."""
    target = isa()
    flags = [*FLAGS, *_ISA_FLAGS[target]]
    if target != "avx512":
        import simde_py   # the AVX-512 intrinsics on AVX2 / NEON / scalar

        flags += ["-DWOOLLY_PORTABLE", f"-I{simde_py.get_include()}"]
    return flags


def cpu_tag() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))][:3]
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
    flags = compile_flags()
    key = hashlib.sha256("\0".join([source, headers, jax.__version__, inc, cxx, " ".join(flags), cpu_tag(),
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
        r = subprocess.run([cxx, *flags, f"-I{inc}", f"-I{KERNEL_DIR}", src, "-o", out], capture_output=True, text=True,
                           timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {r.stderr.strip()[-2000:]}")
        os.replace(out, so)  # atomic: concurrent builders agree on the result
    return so


_builds: dict[str, concurrent.futures.Future] = {}   # kernel name -> its .so path, built once per process
_builds_lock = threading.Lock()


def _build_once(name: str) -> str:
    """`build(name)`, never twice at once in a process: a build under way is waited for."""
    with _builds_lock:
        future, mine = _builds.get(name), False
        if future is None:
            future, mine = _builds.setdefault(name, concurrent.futures.Future()), True
    if mine:
        try:
            future.set_result(build(name))
        except BaseException as e:
            future.set_exception(e)
    return future.result()


def _build_the_others(name: str) -> None:
    """Start building every other kernel in the background while `name` builds (a first run
    compiles them all, ~4-7 s of g++ each: in parallel on a machine with the cores for it)."""
    others = sorted(f[:-3] for f in os.listdir(KERNEL_DIR) if f.endswith(".cc") and f[:-3] != name)
    for other in others:
        if other not in _builds:
            threading.Thread(target=lambda o=other: _swallow(_build_once, o), name=f"woolly-build-{other}",
                             daemon=True).start()


def _swallow(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:   # reported when the kernel itself is loaded
        pass


@atexit.register
def _wait_for_builds() -> None:
    """At exit, let background compiles finish (bounded): a daemon thread stopped mid-build leaves
    its temporary directory behind."""
    concurrent.futures.wait(list(_builds.values()), timeout=300)


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
        else:
            try:
                _build_the_others(name)
                lib = ctypes.cdll.LoadLibrary(_build_once(name))
                for target, symbol in targets.items():
                    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
                st["lib"] = lib
                st["ok"] = True
            except Exception as e:  # no compiler, no simde-py, ...: the XLA path still works
                st["error"] = f"{type(e).__name__}: {e}"
                warnings.warn(f"woolly: CPU kernel {name!r} unavailable, using XLA only ({st['error']})",
                              RuntimeWarning, stacklevel=3)
        _state[name] = st
        return st["ok"]


def kernel_error(name: str) -> str | None:
    """Why kernel `name` is not in use (None when it is, or has not been tried)."""
    return _state.get(name, {}).get("error")
