"""`woolly pull` of a local GGUF path and of `hf.co/owner/repo:QUANT`.

The Hugging Face pulls run against a small local server implementing the Hub routes
huggingface_hub calls (the repo tree, and HEAD/GET of /{repo}/resolve/{revision}/{file}),
with HF_ENDPOINT pointed at it: the real client, real HTTP, no network.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from tiny_models import write_tiny_model
from woolly.cli import main
from woolly.errors import InvalidRequest, ModelLoadFailed, ModelNotFound
from woolly.model_file import Model
from woolly.model_store import model_path, pull

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """Serves repos {"owner/repo": {"file": bytes}}; `truncate` names files sent short (a dropped connection)."""

    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos, self.truncate, self.requests = repos, set(), []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_HEAD(self):
                self.respond(body=False)

            def do_GET(self):
                self.respond(body=True)

            def respond(self, body: bool):
                path = unquote(urlparse(self.path).path)
                hub.requests.append((self.command, path))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("tree", "revision"):
                    files = hub.repos.get("/".join(parts[2:4]))
                    if files is None:
                        return self.send(404, b'{"error":"Repository not found"}', {"X-Error-Code": "RepoNotFound"})
                    if parts[4] == "tree":
                        data = [{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                                for f, b in files.items()]
                    else:
                        data = {"id": "/".join(parts[2:4]), "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]}
                    return self.send(200, json.dumps(data).encode(), {"Content-Type": "application/json"})
                if len(parts) >= 5 and parts[2] == "resolve":
                    files = hub.repos.get("/".join(parts[:2]), {})
                    name = "/".join(parts[4:])
                    if name not in files:
                        return self.send(404, b"", {"X-Error-Code": "EntryNotFound"})
                    data = files[name]
                    headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                               "Content-Length": str(len(data)), "Content-Type": "application/octet-stream"}
                    if body and name in hub.truncate:
                        data = data[: len(data) // 2]
                    return self.send(200, data if body else b"", headers, length_set=True)
                self.send(404, b"")

            def send(self, code, data, headers=None, length_set=False):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                if not length_set:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if data:
                    self.wfile.write(data)
                if length_set and self.command == "GET":
                    self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def tiny_bytes(tmp_path) -> bytes:
    return write_tiny_model(tmp_path / "t.gguf").read_bytes()


@pytest.fixture
def hub(monkeypatch, tmp_path, tiny_bytes):
    h = FakeHub({"owner/Tiny-GGUF": {"tiny-Q4_K_M.gguf": tiny_bytes, "tiny-Q8_0.gguf": tiny_bytes,
                                     "mmproj-tiny-Q4_K_M.gguf": b"not a model", "README.md": b"# tiny"},
                 "owner/broken": {"broken-Q4_K_M.gguf": b"GGUF but not really" * 10}})
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))   # no token or cache of the user's
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield h
    h.close()


def leftovers(models: Path) -> list[str]:
    return sorted(p.name for p in models.iterdir())


# -- a local file ------------------------------------------------------------------------------
def test_a_local_gguf_is_registered_under_a_name(tmp_path, models):
    src = write_tiny_model(tmp_path / "My Model.Q8_0.gguf")
    assert main(["pull", str(src), "--name", "mymodel"]) == 0
    assert model_path("mymodel").read_bytes() == src.read_bytes()
    m = Model.from_file("mymodel")
    m.validate()
    assert m.name == "mymodel"
    assert main(["pull", str(src), "--name", "mymodel"]) == 0   # the same file again: a no-op


def test_a_local_gguf_gets_a_name_from_its_file_name(tmp_path, models):
    src = write_tiny_model(tmp_path / "My Model.Q8_0.gguf")
    assert pull(src) == models / "my-model.q8_0.gguf"
    assert leftovers(models) == ["my-model.q8_0.gguf"]


def test_a_local_gguf_is_hard_linked_on_the_same_file_system_else_copied(tmp_path, models):
    src = write_tiny_model(tmp_path / "same.gguf")
    assert pull(src).stat().st_ino == src.stat().st_ino
    other_fs = Path("/dev/shm")
    if not other_fs.is_dir() or other_fs.stat().st_dev == models.stat().st_dev:
        pytest.skip("no second file system to copy from")
    far = write_tiny_model(other_fs / f"woolly-test-{os.getpid()}.gguf")
    try:
        stages = []
        dest = pull(far, name="far", progress=lambda stage, frac: stages.append((stage, frac)))
        assert dest.stat().st_ino != far.stat().st_ino and dest.read_bytes() == far.read_bytes()
        assert stages[-1] == ("copy", 1.0)
    finally:
        far.unlink()


def test_a_local_file_that_is_not_a_gguf_is_refused(tmp_path, models, capsys):
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello, not a model")
    assert main(["pull", str(bad), "--name", "notes"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("woolly: error: notes.gguf is not a usable GGUF file") and err.count("\n") == 1
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(write_tiny_model(tmp_path / "whole.gguf").read_bytes()[:5000])
    with pytest.raises(ModelLoadFailed, match="not a usable GGUF"):
        pull(truncated, name="cut")
    assert leftovers(models) == []


def test_a_local_pull_never_replaces_another_model(tmp_path, models):
    a = write_tiny_model(tmp_path / "a.gguf")
    b = write_tiny_model(tmp_path / "b.gguf", seed=1)
    pull(a, name="m")
    with pytest.raises(InvalidRequest, match="already exists"):
        pull(b, name="m")
    assert model_path("m").read_bytes() == a.read_bytes()


def test_local_pull_errors_are_one_line(tmp_path, models, capsys):
    assert main(["pull", str(tmp_path / "missing.gguf")]) == 1
    assert "model file not found" in capsys.readouterr().err
    assert main(["pull", str(tmp_path)]) == 1
    assert "is not a regular file" in capsys.readouterr().err
    src = write_tiny_model(tmp_path / "x.gguf")
    assert main(["pull", str(src), "--name", "Bad Name"]) == 1
    assert "invalid model name" in capsys.readouterr().err
    assert leftovers(models) == []


# -- Hugging Face --------------------------------------------------------------------------------
def test_hf_pull_picks_the_quant_named_by_the_tag(hub, models, tiny_bytes, capsys):
    assert main(["pull", "hf.co/owner/Tiny-GGUF:q8_0"]) == 0
    assert "pulled tiny-q8_0" in capsys.readouterr().out
    assert model_path("tiny-q8_0").read_bytes() == tiny_bytes
    got = [p for m, p in hub.requests if m == "GET" and "/resolve/" in p]
    assert got == ["/owner/Tiny-GGUF/resolve/main/tiny-Q8_0.gguf"]
    Model.from_file("tiny-q8_0").validate()
    assert leftovers(models) == ["tiny-q8_0.gguf"]


def test_hf_pull_without_a_tag_takes_q4_k_m_never_the_projector(hub, models):
    assert pull("hf.co/owner/Tiny-GGUF", name="tiny") == model_path("tiny")
    assert [p for m, p in hub.requests if m == "GET" and "/resolve/" in p] == [
        "/owner/Tiny-GGUF/resolve/main/tiny-Q4_K_M.gguf"]
    n = len(hub.requests)
    pull("hf.co/owner/Tiny-GGUF", name="tiny")   # already there: no download
    assert not any("/resolve/" in p for _, p in hub.requests[n:])


def test_hf_pull_of_a_missing_tag_or_repo_says_what_exists(hub, models):
    with pytest.raises(ModelNotFound, match=r"no \.gguf file for 'Q2_K'.*tiny-Q4_K_M\.gguf"):
        pull("hf.co/owner/Tiny-GGUF:Q2_K")
    with pytest.raises(ModelNotFound, match="hf.co/owner/nope"):
        pull("hf.co/owner/nope:Q4_K_M")
    with pytest.raises(InvalidRequest, match="not a Hugging Face repo"):
        pull("hf.co/just-a-name")
    assert leftovers(models) == []


def test_hf_pull_of_a_file_that_is_not_a_gguf_registers_nothing(hub, models, capsys):
    assert main(["pull", "hf.co/owner/broken"]) == 1
    err = capsys.readouterr().err
    assert "woolly: error: hf.co/owner/broken/broken-Q4_K_M.gguf is not a usable GGUF file" in err
    assert leftovers(models) == []


def test_an_interrupted_hf_download_leaves_no_file(hub, models, capsys):
    hub.truncate.add("tiny-Q4_K_M.gguf")
    assert main(["pull", "hf.co/owner/Tiny-GGUF:Q4_K_M"]) == 1
    err = capsys.readouterr().err
    assert "woolly: error: download of hf.co/owner/Tiny-GGUF failed" in err
    assert leftovers(models) == []


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"},
                                 pytest.param({"HF_ENDPOINT": "http://127.0.0.1:9"},   # refused: ~25 s of retries
                                              marks=pytest.mark.slow)], ids=["offline", "unreachable"])
def test_no_hub_is_one_line_from_the_real_cli(models, tmp_path, env):
    import subprocess
    import sys

    run_env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_ENDPOINT": "http://127.0.0.1:9", **env}
    r = subprocess.run([sys.executable, "-m", "woolly.cli", "pull", "hf.co/owner/Tiny-GGUF"], env=run_env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1].startswith("woolly: error: ") and "Traceback" not in r.stderr, r.stderr
    assert leftovers(models) == []
