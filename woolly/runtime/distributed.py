"""Multi-process JAX: join this process to a `jax.distributed` cluster, once.

`initialize(cfg)` takes a `WoollyConfig` (or just its `distributed` section). It does
nothing when no coordinator address is configured; otherwise it sets the CPU backend's
cross-process collectives (`jax_cpu_collectives_implementation`: "gloo" over TCP, the
default in jax 0.10, or "mpi") and calls `jax.distributed.initialize` with the configured
address, process count and id. After it, `jax.devices()` lists every process's devices
(ordered by process), `jax.local_devices()` this one's, and a `Mesh` over `jax.devices()`
spans all processes. Every process must then run the same jitted computations in the same
order (JAX's multi-controller model).

It must run before anything touches a JAX backend (`jax.devices()`, `device_put`, any
computation): the CLI calls it right after reading the configuration. A second call with
the same settings is a no-op; different settings, or a call after the backend started,
is a clear `InvalidRequest`. Before calling JAX it checks what JAX would otherwise answer by
killing the process: process 0's coordinator port must be free, and the other processes
wait (up to `initialization_timeout`) for the coordinator to accept connections. One case
is left to JAX: if process 0 runs but a peer never joins, JAX aborts every joined process
after `initialization_timeout` seconds with a fatal `DEADLINE_EXCEEDED` log line.
"""
from __future__ import annotations

import errno
import socket
import threading
import time

from woolly.config import DistributedSection, check_distributed, split_address
from woolly.errors import InvalidRequest, WoollyError

_TOO_LATE = ("distributed initialization must come before anything uses a JAX device; "
             "call woolly.runtime.distributed.initialize first")
_lock = threading.Lock()
_joined: DistributedSection | None = None   # the settings this process joined with


def _section(cfg) -> DistributedSection:
    return cfg.distributed if hasattr(cfg, "distributed") else cfg


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _port_free(port: int) -> bool:
    """Whether process 0's coordinator can bind `port` on every interface, as JAX's service does ([::]:port)."""
    for family, addr in ((socket.AF_INET6, ("::", port)), (socket.AF_INET, ("0.0.0.0", port))):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                s.bind(addr)
                return True
        except OSError as e:
            if family == socket.AF_INET6 and e.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                continue            # no IPv6 here: JAX falls back too; check IPv4
            return False
    return False


def _wait_for_coordinator(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), port), timeout=min(2.0, timeout)):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):   # a jax without it: jax.distributed.initialize checks too
        return False


def _preflight(d: DistributedSection) -> float:
    """Turn the two common mistakes into one clear line. JAX itself answers both by killing the
    process (a busy port: a crash in its gRPC server; an unreachable coordinator: a fatal
    DEADLINE_EXCEEDED log and abort after initialization_timeout). -> seconds spent waiting."""
    t = time.monotonic()
    host, port = split_address(d.coordinator_address)
    if d.process_id == 0:
        if not _port_free(port):
            raise InvalidRequest(f"distributed: process 0 runs the coordinator on port {port}, which is in use; "
                                 "choose another coordinator_address port")
    elif not _wait_for_coordinator(host, port, d.initialization_timeout):
        raise WoollyError(f"distributed: no coordinator answered at {d.coordinator_address} within "
                          f"{d.initialization_timeout} s (is process 0 running, and is the address reachable from here?)")
    return time.monotonic() - t


def initialize(cfg) -> bool:
    """Join the cluster `cfg` describes; -> True when this process is (now or already) part of
    one, False when the configuration asks for no cluster. Raises `WoollyError`; waits at most
    `initialization_timeout` seconds in all for the other processes."""
    global _joined
    d = _section(cfg)
    check_distributed(d)
    if not d.enabled:
        return False
    with _lock:
        if _joined is not None:
            if _joined == d:
                return True
            raise InvalidRequest("jax.distributed is already initialized with other settings "
                                 f"(coordinator {_joined.coordinator_address}, process {_joined.process_id} "
                                 f"of {_joined.num_processes})")
        import jax

        if jax.distributed.is_initialized():   # someone called jax.distributed.initialize directly
            _joined = d
            return True
        if _backend_started():
            raise InvalidRequest(_TOO_LATE)
        waited = _preflight(d)
        jax.config.update("jax_cpu_collectives_implementation", d.cpu_collectives)
        try:
            jax.distributed.initialize(
                coordinator_address=d.coordinator_address,
                num_processes=d.num_processes,
                process_id=d.process_id,
                local_device_ids=d.local_device_ids,
                cluster_detection_method="deactivate",   # the configuration is explicit: no Slurm/MPI guessing
                initialization_timeout=max(1, round(d.initialization_timeout - waited)),   # one budget in all
                # a process whose peers died waits this long at exit, not jax's default 5 minutes
                shutdown_timeout_seconds=d.initialization_timeout,
            )
        except RuntimeError as e:
            if "must be called before" in str(e):
                raise InvalidRequest(_TOO_LATE) from None
            raise WoollyError(f"distributed initialization failed (coordinator {d.coordinator_address}, "
                              f"process {d.process_id} of {d.num_processes}): {_one_line(e)}") from None
        except Exception as e:  # whatever else JAX raises (not aborts): one line, not a gRPC dump
            raise WoollyError(f"distributed initialization failed (coordinator {d.coordinator_address}, "
                              f"process {d.process_id} of {d.num_processes}): {_one_line(e)}") from None
        _joined = d
        return True


def is_initialized() -> bool:
    import jax

    return jax.distributed.is_initialized()


def describe() -> str:
    """One line for logs: this process's place in the cluster and its devices."""
    import jax

    return (f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local / "
            f"{jax.device_count()} global {jax.default_backend()} devices")
