"""issue 15: a models directory entry that is not a regular file (a link into sysfs, a FIFO, a
directory, /dev/zero) is one clear MODEL_LOAD_FAILED from the load route, at once, and the
listing still answers. Before the fix the sysfs link was a bare OSError (500 INTERNAL_ERROR on
load, and `GET /api/models` failed), and the others were "not found".
"""
from __future__ import annotations

import os
import shutil

import pytest

from support.live_server import MODEL
from support.metrics import wait_for_idle
from support.errors import assert_error

pytestmark = pytest.mark.real

SYSFS_FILE = next((p for p in ("/sys/kernel/mm/transparent_hugepage/enabled", "/sys/power/state",
                               "/sys/kernel/uevent_seqnum") if os.path.isfile(p)), None)

ENTRIES = {   # name in the models directory -> (how to make it, words the error says)
    "sysfs-link": (lambda p: p.symlink_to(SYSFS_FILE), "cannot map"),
    "fifo-model": (lambda p: os.mkfifo(p), "FIFO"),
    "dir-model": (lambda p: p.mkdir(), "directory"),
    "dev-zero": (lambda p: p.symlink_to("/dev/zero"), "character device"),
}


@pytest.fixture
def odd_entries(rserver):
    if str(rserver.log_path) == os.devnull or SYSFS_FILE is None:
        pytest.skip("needs the suite's own server (its models directory) and a sysfs file")
    models = rserver.log_path.parent / "models"
    made = []
    try:
        for name, (make, _) in ENTRIES.items():
            path = models / f"{name}.gguf"
            make(path)
            made.append(path)
        yield
    finally:
        for path in made:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def test_loading_an_entry_that_is_not_a_regular_file_is_one_clear_error(rserver, rhttp, odd_entries):
    wait_for_idle(rhttp)
    for name, (_, words) in ENTRIES.items():
        r = rhttp.post("/api/models/load", json={"name": name}, timeout=10)
        err = assert_error(r, 500, "MODEL_LOAD_FAILED", words)
        assert f"{name}.gguf" in err["message"]
    listed = rhttp.get("/api/models", timeout=10)
    assert listed.status_code == 200, listed.text
    names = {m["name"] for m in listed.json()}
    assert MODEL in names and not names & set(ENTRIES)
    assert rhttp.get("/health").json()["model"] == MODEL
