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
is a clear `InvalidRequest`.
"""
from __future__ import annotations

import threading

from woolly.config import DistributedSection, check_distributed
from woolly.errors import InvalidRequest, WoollyError

_lock = threading.Lock()
_joined: DistributedSection | None = None   # the settings this process joined with


def _section(cfg) -> DistributedSection:
    return cfg.distributed if hasattr(cfg, "distributed") else cfg


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def initialize(cfg) -> bool:
    """Join the cluster `cfg` describes; -> True when this process is (now or already) part of
    one, False when the configuration asks for no cluster. Raises `WoollyError`, never hangs
    longer than `initialization_timeout` seconds waiting for the other processes."""
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
        from jax._src import xla_bridge

        if jax.distributed.is_initialized():   # someone called jax.distributed.initialize directly
            _joined = d
            return True
        if xla_bridge.backends_are_initialized():
            raise InvalidRequest("distributed initialization must come before anything uses a JAX device; "
                                 "call woolly.runtime.distributed.initialize first")
        jax.config.update("jax_cpu_collectives_implementation", d.cpu_collectives)
        try:
            jax.distributed.initialize(
                coordinator_address=d.coordinator_address,
                num_processes=d.num_processes,
                process_id=d.process_id,
                local_device_ids=d.local_device_ids,
                cluster_detection_method="deactivate",   # the configuration is explicit: no Slurm/MPI guessing
                initialization_timeout=d.initialization_timeout,
                # a process whose peers died waits this long at exit, not jax's default 5 minutes
                shutdown_timeout_seconds=d.initialization_timeout,
            )
        except Exception as e:  # a refused/late coordinator, a port in use: one line, not a gRPC dump
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
