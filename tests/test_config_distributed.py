"""The `distributed` config section (YAML, WOOLLY_* variables, CLI flags) and the checks
`woolly.runtime.distributed.initialize` makes before handing over to `jax.distributed`.
Nothing here joins a cluster (tests/test_multihost.py does, in child processes)."""
from __future__ import annotations

import socket
import time

import pytest

from woolly.cli import _distributed_overrides, build_parser, main
from woolly.config import load_config
from woolly.errors import InvalidRequest, WoollyError
from woolly.runtime import distributed


def cfg_from(tmp_path, yaml_text: str | None = None, env: dict | None = None, overrides: dict | None = None):
    path = None
    if yaml_text is not None:
        path = tmp_path / "woolly.config.yaml"
        path.write_text(yaml_text)
    return load_config(path, env=env or {}, overrides=overrides)


def test_off_by_default(tmp_path):
    d = cfg_from(tmp_path).distributed
    assert not d.enabled and d.num_processes is None and d.initialization_timeout == 300
    assert distributed.initialize(cfg_from(tmp_path)) is False      # asks for no cluster: nothing happens


def test_from_yaml(tmp_path):
    d = cfg_from(tmp_path, "distributed:\n  coordinator_address: 10.0.0.1:1234\n  num_processes: 4\n"
                           "  process_id: 3\n  local_device_ids: [0, 1]\n  initialization_timeout: 60\n").distributed
    assert (d.enabled, d.coordinator_address, d.num_processes, d.process_id) == (True, "10.0.0.1:1234", 4, 3)
    assert d.local_device_ids == [0, 1] and d.initialization_timeout == 60 and d.cpu_collectives == "gloo"


def test_from_environment_over_yaml(tmp_path):
    env = {"WOOLLY_COORDINATOR_ADDRESS": "node0:8476", "WOOLLY_NUM_PROCESSES": "2", "WOOLLY_PROCESS_ID": "1",
           "WOOLLY_LOCAL_DEVICE_IDS": "2,3", "WOOLLY_DISTRIBUTED_TIMEOUT": "30", "WOOLLY_CPU_COLLECTIVES": "mpi"}
    d = cfg_from(tmp_path, "distributed:\n  coordinator_address: other:1\n  num_processes: 8\n  process_id: 5\n",
                 env=env).distributed
    assert (d.coordinator_address, d.num_processes, d.process_id) == ("node0:8476", 2, 1)
    assert d.local_device_ids == [2, 3] and d.initialization_timeout == 30 and d.cpu_collectives == "mpi"


def test_cli_flags_override_everything(tmp_path):
    args = build_parser().parse_args(["serve", "--coordinator-address", "[::1]:9000", "--num-processes", "3",
                                      "--process-id", "2"])
    d = cfg_from(tmp_path, env={"WOOLLY_COORDINATOR_ADDRESS": "x:1", "WOOLLY_NUM_PROCESSES": "2",
                                "WOOLLY_PROCESS_ID": "0"}, overrides=_distributed_overrides(args)).distributed
    assert (d.coordinator_address, d.num_processes, d.process_id) == ("[::1]:9000", 3, 2)
    run = build_parser().parse_args(["run", "m", "p", "--process-id", "1"])
    assert _distributed_overrides(run)[("distributed", "process_id")] == 1


@pytest.mark.parametrize("yaml_text,env,fragment", [
    ("distributed:\n  num_processes: 2\n  process_id: 0\n", {}, "coordinator_address (WOOLLY_COORDINATOR_ADDRESS) is required"),
    ("", {"WOOLLY_PROCESS_ID": "1"}, "coordinator_address (WOOLLY_COORDINATOR_ADDRESS) is required"),
    ("distributed:\n  coordinator_address: h:1\n", {}, "num_processes (WOOLLY_NUM_PROCESSES) and process_id"),
    ("distributed:\n  coordinator_address: h:1\n  num_processes: 2\n  process_id: 2\n", {}, "process_id must be in 0..1"),
    ("distributed:\n  coordinator_address: h:1\n  num_processes: 0\n  process_id: 0\n", {}, "num_processes must be >= 1"),
    ("distributed:\n  coordinator_address: h\n  num_processes: 2\n  process_id: 0\n", {}, "must be host:port"),
    ("distributed:\n  coordinator_address: h:70000\n  num_processes: 2\n  process_id: 0\n", {}, "must be host:port"),
    ("distributed:\n  coordinator_address: ::1:80\n  num_processes: 2\n  process_id: 0\n", {}, "IPv6 host in brackets"),
    ("distributed:\n  coordinator_address: h:1\n  num_processes: 2\n  process_id: 0\n  local_device_ids: [1, 1]\n",
     {}, "local_device_ids must be distinct"),
    ("distributed:\n  coordinator_address: h:1\n  num_processes: 2\n  process_id: 0\n  initialization_timeout: 0\n",
     {}, "initialization_timeout must be >= 1"),
    ("distributed:\n  coordinator: h:1\n", {}, "unknown field"),
    ("distributed:\n  cpu_collectives: nccl\n", {}, "invalid configuration"),
    ("", {"WOOLLY_NUM_PROCESSES": "two"}, "WOOLLY_NUM_PROCESSES must be an integer"),
    ("", {"WOOLLY_COORDINATOR_ADDRESS": "h:1", "WOOLLY_NUM_PROCESSES": "2", "WOOLLY_PROCESS_ID": "0",
          "WOOLLY_LOCAL_DEVICE_IDS": "0,x"}, "local_device_ids"),
])
def test_bad_settings_are_one_clear_line(tmp_path, yaml_text, env, fragment):
    with pytest.raises(InvalidRequest) as e:
        cfg_from(tmp_path, yaml_text, env=env)
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_cli_reports_a_bad_cluster_setting_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name in ("WOOLLY_COORDINATOR_ADDRESS", "WOOLLY_NUM_PROCESSES", "WOOLLY_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert main(["run", "no-model.gguf", "hi", "--coordinator-address", "127.0.0.1:1", "--num-processes", "2",
                 "--process-id", "5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("woolly: error: distributed.process_id must be in 0..1") and err.count("\n") == 1, err


def test_busy_coordinator_port_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        d = load_config(env={"WOOLLY_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "WOOLLY_NUM_PROCESSES": "2",
                             "WOOLLY_PROCESS_ID": "0"}).distributed
        with pytest.raises(InvalidRequest, match=f"port {port}, which is in use"):
            distributed._preflight(d)


def test_missing_coordinator_is_a_clear_error_after_the_timeout():
    with socket.socket() as s:          # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = load_config(env={"WOOLLY_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "WOOLLY_NUM_PROCESSES": "2",
                         "WOOLLY_PROCESS_ID": "1", "WOOLLY_DISTRIBUTED_TIMEOUT": "1"}).distributed
    t = time.monotonic()
    with pytest.raises(WoollyError, match="no coordinator answered at 127.0.0.1"):
        distributed._preflight(d)
    assert time.monotonic() - t < 10


def test_initialize_after_jax_started_is_refused():
    import jax

    jax.devices()        # the backend is up in this process
    cfg = load_config(env={"WOOLLY_COORDINATOR_ADDRESS": "127.0.0.1:1", "WOOLLY_NUM_PROCESSES": "2",
                           "WOOLLY_PROCESS_ID": "1", "WOOLLY_DISTRIBUTED_TIMEOUT": "1"})
    with pytest.raises(InvalidRequest, match="must come before anything uses a JAX device"):
        distributed.initialize(cfg)
    assert not jax.distributed.is_initialized()
