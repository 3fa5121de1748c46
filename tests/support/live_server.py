"""Starting and stopping a real `woolly serve` subprocess on a free loopback port."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

MODEL = "smollm2-135m-instruct"
CONTEXT = 256
BODY_LIMIT = 64 * 1024
MAX_QUEUE = 8            # requests waiting for a slot before 503 SERVER_BUSY
STARTUP_TIMEOUT = 240.0
KEYS = ("key-auth-tests", "key-cors-tests", "key-rate-tests", "key-admin-tests")
RATE_PER_MINUTE = 20
ALLOWED_ORIGIN = "http://allowed.example"


@dataclass
class RunningServer:
    url: str
    port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env() -> dict[str, str]:
    """The test environment without WOOLLY_* settings that would override the config file."""
    keep = ("WOOLLY_COMPILE_CACHE", "WOOLLY_MODELS_DIR")
    return {k: v for k, v in os.environ.items() if not k.startswith("WOOLLY_") or k in keep}


def start_server(workdir: Path, config: dict, env: dict[str, str] | None = None,
                 model: str | None = MODEL) -> RunningServer:
    """`woolly serve [model]` with `config` as its file, `env` as WOOLLY_* variables, `--port` a free port."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config_path = workdir / "woolly.config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = workdir / "server.log"
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "woolly.cli", "serve", *([model] if model else []), "--port", str(port),
         "--config", str(config_path)],
        cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env={**_clean_env(), **(env or {})},
        start_new_session=True)
    log.close()
    server = RunningServer(f"http://127.0.0.1:{port}", port, process, log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"woolly serve exited with {process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    stop_server(server)
    pytest.fail(f"woolly serve did not answer /health within {STARTUP_TIMEOUT:.0f}s:\n{server.log_tail()}")


def stop_server(server: RunningServer) -> None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=15)


@contextmanager
def serving(workdir: Path, config: dict, env: dict[str, str] | None = None, model: str | None = MODEL,
            warm_timeout: float | None = None) -> Iterator[RunningServer]:
    """A started server for the block, stopped after it; `warm_timeout` set: one short generation
    first, so its compiles are done before the tests time anything."""
    server = start_server(workdir, config, env, model)
    try:
        if warm_timeout is not None:
            warm = httpx.post(server.url + "/api/generate", json={"prompt": "Hi", "max_tokens": 2},
                              timeout=warm_timeout)
            assert warm.status_code == 200, warm.text
        yield server
    finally:
        stop_server(server)


BROKEN_MODEL = "broken-model"


def models_directory(directory: Path, real_model_path: str) -> Path:
    """A models directory with the real model (a link) and `BROKEN_MODEL`, a file that is not GGUF."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{MODEL}.gguf").symlink_to(real_model_path)
    (directory / f"{BROKEN_MODEL}.gguf").write_bytes(b"GGUF" + b"\xff" * 60)
    return directory


def base_config(**inference) -> dict:
    return {
        "inference": {"max_batch_size": 8, "max_sequence_length": CONTEXT, **inference},
        "server": {"max_body_bytes": BODY_LIMIT, "max_queue": MAX_QUEUE},
        "logging": {"level": "info", "format": "json", "output": "stdout"},
    }
