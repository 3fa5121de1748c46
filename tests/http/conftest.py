"""Real `woolly serve` processes on loopback ports, shared by the HTTP tests of a session.

Two servers at most (each costs a model load and its compiles): `server`, open, with 8
slots so 8 streams decode together; `secure_server`, with API keys, rate limiting and
CORS. Both serve smollm2-135m-instruct.
"""
from __future__ import annotations

import httpx
import pytest

from support.live_server import (ALLOWED_ORIGIN, KEYS, MODEL, RATE_PER_MINUTE, RunningServer, base_config,
                                 free_port, models_directory, serving)


@pytest.fixture(scope="session")
def server(tmp_path_factory, smollm2_path) -> RunningServer:
    """An open server (no keys, no rate limit, no CORS) with 8 slots, compiled and warm.

    Started without a model argument: it serves the config's `models.preload`.
    """
    config = base_config()
    config["models"] = {"preload": [MODEL]}
    with serving(tmp_path_factory.mktemp("server"), config, model=None, warm_timeout=300) as srv:
        yield srv


@pytest.fixture(scope="session")
def secure_server(tmp_path_factory, smollm2_path) -> RunningServer:
    """API keys required, rate limited per key, CORS for one origin; 1 slot (it never generates).

    Its models directory holds the real model and a broken file (see `models_directory`).

    Settings come from all three places, so the tests also check their precedence: the
    file's rate limit and port are overridden by WOOLLY_RATE_LIMIT and WOOLLY_PORT, and
    WOOLLY_PORT by the --port flag (the server is reached on the flag's port).
    """
    config = base_config(max_batch_size=1, max_sequence_length=64)
    config["security"] = {"api_key_required": True, "api_keys": list(KEYS),
                          "rate_limiting": {"enabled": True, "requests_per_minute": 10 * RATE_PER_MINUTE}}
    config["server"]["cors"] = {"enabled": True, "origins": [ALLOWED_ORIGIN]}
    config["server"]["port"] = free_port()
    workdir = tmp_path_factory.mktemp("secure_server")
    config["models"] = {"directory": str(models_directory(workdir / "models", smollm2_path))}
    config["logging"] = {"level": "info", "format": "text", "output": str(workdir / "woolly.log")}
    env = {"WOOLLY_RATE_LIMIT": str(RATE_PER_MINUTE), "WOOLLY_PORT": str(free_port())}
    with serving(workdir, config, env) as srv:
        yield srv


@pytest.fixture(scope="session")
def http(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=300) as client:
        yield client
