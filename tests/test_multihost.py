"""Multi-host: two processes on loopback join one `jax.distributed` cluster (CPU, gloo
collectives) through `woolly.runtime.distributed.initialize`, configured by `WOOLLY_*`
variables, and compute ONE forward of a model sharded over all four devices (two per
process; the MLP and attention weights split over a "model" axis that spans both
processes, so the matmuls need cross-process all-reduces). Their logits must agree with a
forward in a plain single-device process.

This file is also the worker: `python test_multihost.py MODE MODEL OUT` (MODE "dist" or
"single", or "dist-sharding" to lay the params out with `woolly.runtime.sharding`).
`woolly run` is also started twice with the cluster flags, to show the CLI joins before the
engine touches a device. Every child has a timeout and is killed in a `finally`; initialize itself times out.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
CHILD_TIMEOUT = 150          # seconds for a whole worker (import, load, compile, forward)
INIT_TIMEOUT = 60            # seconds initialize waits for the other process
TOKENS = [[1, 17, 42, 99, 7, 250, 3, 64, 12, 200, 5, 88], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 22]]


# -- the worker (runs in the children) -------------------------------------------------------------
def _spec(name: str, shape: tuple, mcfg, n: int):
    """Megatron-style PartitionSpec over the "model" axis of size n (replicated where it won't divide)."""
    from jax.sharding import PartitionSpec as P

    if len(shape) != 2:
        return P()
    O, I = shape
    if name in ("w_gate", "w_up") and O % n == 0:
        return P("model", None)                      # columns of the MLP: [F, D] split over F
    if name == "w_down" and I % n == 0:
        return P(None, "model")                      # rows: [D, F] split over F -> all-reduce
    if name == "wq" and mcfg.n_heads % n == 0:
        return P("model", None)                      # query heads
    if name in ("wk", "wv") and mcfg.n_kv_heads % n == 0:
        return P("model", None)
    if name == "wo" and mcfg.n_heads % n == 0:
        return P(None, "model")
    if name in ("embed", "output") and I % n == 0:
        return P(None, "model")
    return P()


def _layout(host_params, mcfg, mesh):
    """Host (numpy) params -> global arrays on `mesh`, each process filling its own shards."""
    import jax
    from jax.sharding import NamedSharding

    n = mesh.shape["model"]

    def place(path, x):
        name = path[-1].key if hasattr(path[-1], "key") else str(path[-1])
        sharding = NamedSharding(mesh, _spec(name, x.shape, mcfg, n))
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree_util.tree_map_with_path(place, host_params)


def _worker(mode: str, model_path: str, out: str) -> None:
    report: dict = {}
    if mode.startswith("dist"):
        from woolly.config import load_config
        from woolly.runtime.distributed import describe, initialize

        cfg = load_config()                           # WOOLLY_COORDINATOR_ADDRESS etc. from the environment
        t = time.time()
        assert initialize(cfg) is True
        assert initialize(cfg) is True                # idempotent
        report["init_s"] = round(time.time() - t, 2)
        report["describe"] = describe()

    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from woolly.model import Model
    from woolly.ops.cpu_kernels import xla_only
    from woolly.runtime.entry import all_logits
    from woolly.runtime.params import load_params

    model = Model.from_file(model_path)
    mcfg = model.config
    tokens_np = np.asarray(TOKENS, np.int32)
    with jax.default_device(jax.local_devices()[0]):
        params = load_params(model, "dense")
    report.update(process_index=jax.process_index(), process_count=jax.process_count(),
                  devices=jax.device_count(), local_devices=jax.local_device_count())
    if mode == "single":
        with xla_only():
            logits = all_logits(params, jnp.asarray(tokens_np), cfg=mcfg)
        np.save(out + ".npy", np.asarray(logits))
        Path(out + ".json").write_text(json.dumps(report))
        return

    host = jax.tree.map(np.asarray, params)
    del params
    if mode == "dist-sharding":
        from woolly.runtime.sharding import make_mesh, shard_params

        mesh = make_mesh(tensor_parallel=jax.device_count(), data_parallel=1)
        params = shard_params(host, mcfg, mesh)
    else:
        mesh = Mesh(np.asarray(jax.devices()).reshape(1, -1), ("data", "model"))
        params = _layout(host, mcfg, mesh)
    gate = params["layers"][0]["w_gate"]
    report["w_gate_spec"] = list(gate.sharding.spec) if hasattr(gate.sharding, "spec") else str(gate.sharding)
    report["w_gate_local_shards"] = [list(s.data.shape) for s in gate.addressable_shards]
    report["mesh_processes"] = sorted({d.process_index for d in mesh.devices.flat})
    tokens = jax.make_array_from_callback(tokens_np.shape, NamedSharding(mesh, P()), lambda idx: tokens_np[idx])
    forward = all_logits
    if mode == "dist-sharding":
        from woolly.runtime import sharding

        if hasattr(sharding, "entry_points"):
            forward = sharding.entry_points(mesh).all_logits    # the sharded entry point the engine uses
    with xla_only():
        compiled = forward.lower(params, tokens, cfg=mcfg).compile()
        hlo = compiled.as_text()
        logits = compiled(params, tokens)
    report["collectives"] = sorted({op for op in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                                                 "collective-permute") if op in hlo})
    from jax.experimental import multihost_utils

    full = multihost_utils.process_allgather(logits, tiled=True)    # every process gets the whole [B, T, V]
    np.save(out + ".npy", np.asarray(full))
    Path(out + ".json").write_text(json.dumps(report))


# -- the test (runs in pytest) ---------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(devices: int, extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WOOLLY_COORDINATOR", "WOOLLY_NUM_PROC",
                                                                    "WOOLLY_PROCESS_ID", "WOOLLY_LOCAL_DEVICE",
                                                                    "JAX_COORDINATOR", "JAX_NUM_PROC"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")]))
    env.update(extra or {})
    return env


def run_cluster(model: Path, tmp: Path, mode: str = "dist", devices_per_process: int = 2) -> tuple[list, np.ndarray]:
    """Start the two distributed workers and the single-process reference; -> (reports, reference logits)."""
    port = _free_port()
    procs: list[tuple[str, subprocess.Popen]] = []
    try:
        for i in range(2):
            env = _child_env(devices_per_process, {"WOOLLY_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                                   "WOOLLY_NUM_PROCESSES": "2", "WOOLLY_PROCESS_ID": str(i),
                                                   "WOOLLY_DISTRIBUTED_TIMEOUT": str(INIT_TIMEOUT)})
            procs.append((f"p{i}", subprocess.Popen([sys.executable, __file__, mode, str(model), str(tmp / f"p{i}")],
                                                    cwd=tmp, env=env, stdout=subprocess.PIPE,
                                                    stderr=subprocess.STDOUT, text=True)))
        procs.append(("ref", subprocess.Popen([sys.executable, __file__, "single", str(model), str(tmp / "ref")],
                                              cwd=tmp, env=_child_env(1), stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True)))
        deadline = time.time() + CHILD_TIMEOUT
        for name, p in procs:
            try:
                output, _ = p.communicate(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"worker {name} did not finish in {CHILD_TIMEOUT} s")
            assert p.returncode == 0, f"worker {name} failed ({p.returncode}):\n{output[-4000:]}"
    finally:
        for _, p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    reports = [json.loads((tmp / f"p{i}.json").read_text()) for i in range(2)]
    reports = [dict(r, logits=np.load(tmp / f"p{i}.npy")) for i, r in enumerate(reports)]
    return reports, np.load(tmp / "ref.npy")


def check_cluster(reports: list, ref: np.ndarray, devices_per_process: int = 2, atol: float = 1e-4) -> float:
    """-> the largest |sharded - single| logit difference."""
    n = 2 * devices_per_process
    for i, r in enumerate(reports):
        assert (r["process_index"], r["process_count"], r["devices"], r["local_devices"]) == (i, 2, n, devices_per_process)
        assert r["mesh_processes"] == [0, 1]
        assert "all-reduce" in r["collectives"] or "reduce-scatter" in r["collectives"], r["collectives"]
        assert r["logits"].shape == ref.shape
        np.testing.assert_allclose(r["logits"], ref, rtol=1e-4, atol=atol)
    np.testing.assert_array_equal(reports[0]["logits"], reports[1]["logits"])
    return float(np.abs(reports[0]["logits"] - ref).max())


def test_two_processes_compute_one_sharded_forward(tmp_path):
    from tiny_models import write_tiny_model

    model = write_tiny_model(tmp_path / "tiny.gguf", n_heads=4, n_kv_heads=2)
    t = time.time()
    reports, ref = run_cluster(model, tmp_path)
    diff = check_cluster(reports, ref)
    # the MLP is really split across the processes: each holds 2 of the 4 row blocks of w_gate [128, 64]
    assert reports[0]["w_gate_spec"] == ["model", None]
    assert reports[0]["w_gate_local_shards"] == reports[1]["w_gate_local_shards"] == [[32, 64]] * 2
    print(f"two-process tiny forward: {time.time() - t:.1f} s, init {reports[0]['init_s']} s, "
          f"collectives {reports[0]['collectives']}, max |diff| {diff:.2e}")


def test_with_the_sharding_module(tmp_path):
    """The same, with `woolly.runtime.sharding` laying out the params (where it exists)."""
    pytest.importorskip("woolly.runtime.sharding")
    from tiny_models import write_tiny_model

    model = write_tiny_model(tmp_path / "tiny.gguf", n_heads=4, n_kv_heads=2)
    reports, ref = run_cluster(model, tmp_path, mode="dist-sharding")
    check_cluster(reports, ref)


def test_woolly_run_joins_a_cluster_from_its_flags(tmp_path):
    """`woolly run` on two processes: each joins through the CLI flags before the engine starts."""
    from tiny_models import write_tiny_model

    model = write_tiny_model(tmp_path / "tiny.gguf")
    port = _free_port()
    procs = []
    try:
        for i in range(2):
            env = _child_env(1, {"WOOLLY_DISTRIBUTED_TIMEOUT": str(INIT_TIMEOUT)})
            cmd = [sys.executable, "-m", "woolly.cli", "run", str(model), "hello there", "-n", "4", "--temperature", "0",
                   "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)]
            procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
        outs = []
        deadline = time.time() + CHILD_TIMEOUT
        for i, p in enumerate(procs):
            try:
                out, err = p.communicate(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"woolly run (process {i}) did not finish in {CHILD_TIMEOUT} s")
            assert p.returncode == 0, err[-3000:]
            assert f"woolly: distributed: process {i} of 2: 1 local / 2 global cpu devices" in err, err
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    assert outs[0] == outs[1] and outs[0].strip()      # greedy, same model: the same text


@pytest.mark.real
def test_two_processes_on_smollm2(tmp_path):
    from woolly.model_store import resolve_model_path

    model = resolve_model_path("smollm2-135m-instruct")
    if not Path(model).is_file():
        pytest.skip("smollm2-135m-instruct is not pulled")
    t = time.time()
    reports, ref = run_cluster(Path(model), tmp_path, devices_per_process=1)
    # 30 layers of f32 summed in another order: differences of a few 1e-4 on logits up to ~36,
    # so the tolerance is 1e-4 of the logits' scale
    diff = check_cluster(reports, ref, devices_per_process=1, atol=1e-4 * float(np.abs(ref).max()))
    print(f"two-process SmolLM2 forward: {time.time() - t:.1f} s, max |diff| {diff:.2e} "
          f"(logits up to {np.abs(ref).max():.1f}), collectives {reports[0]['collectives']}")


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
