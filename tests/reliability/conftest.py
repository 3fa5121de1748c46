"""One real `woolly serve` for the reliability suite, and a recorder of every error body.

The server is small on purpose (2 slots, a queue of 4, a 256-token context, an 8 MiB
prefix cache) so that "slots + 1", "more than the queue admits" and "memory flat after
warm-up" are cheap to reach. It is started like `tests/http`'s servers (by
`support.live_server`), without --host, so it also shows the default bind.
"""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from support import leak_recorder
from support.live_server import MODEL, RunningServer, base_config, models_directory, serving
from support.rel_shapes import CACHE_BYTES, CONTEXT, QUEUE, SLOTS

leak_recorder.install()


HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    """Tests here are marked `reliability` (so `-m "not (slow and reliability)"` drops only this
    suite's slow ones); the path-leak scan reads every error body the session saw: it runs last."""
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.reliability)
    last = [i for i in items if i.get_closest_marker("runs_last")]
    if last:
        items[:] = [i for i in items if i not in last] + last


def pytest_configure(config):
    config.addinivalue_line("markers", "runs_last: scheduled after every other test of the session")
    config.addinivalue_line("markers", "reliability: in tests/reliability (reliability.md's suite)")


@pytest.fixture(scope="session")
def rserver(tmp_path_factory, smollm2_path) -> RunningServer:
    """2 slots, queue 4, context 256; its models directory also holds a file that is not GGUF.

    WOOLLY_RELIABILITY_URL and WOOLLY_RELIABILITY_PID attach to a server already running with
    these shapes instead (for working on the suite; not used by `make`).
    """
    if os.environ.get("WOOLLY_RELIABILITY_URL"):
        url = os.environ["WOOLLY_RELIABILITY_URL"]
        process = SimpleNamespace(pid=int(os.environ["WOOLLY_RELIABILITY_PID"]), poll=lambda: None)
        yield RunningServer(url, int(url.rsplit(":", 1)[1]), process, Path("/dev/null"))
        return
    config = base_config(max_batch_size=SLOTS, max_sequence_length=CONTEXT)
    config["server"]["max_queue"] = QUEUE
    config["cache"] = {"size": CACHE_BYTES}
    workdir = tmp_path_factory.mktemp("reliability_server")
    config["models"] = {"directory": str(models_directory(workdir / "models", smollm2_path))}
    with serving(workdir, config, model=MODEL, warm_timeout=600) as srv:
        yield srv


@pytest.fixture(scope="session")
def rhttp(rserver) -> httpx.Client:
    with httpx.Client(base_url=rserver.url, timeout=600) as client:
        yield client
