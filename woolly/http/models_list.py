"""`GET /api/models`: pulled models with size, quantization and metadata (headers read once)."""
from __future__ import annotations

import os

from woolly.http.schemas import ModelInfo, ModelInfoMeta

_cache: dict[tuple[str, float], ModelInfo] = {}


def human_count(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _info(name: str, path: str) -> ModelInfo | None:
    from woolly.errors import WoollyError
    from woolly.model import Model

    key = (path, os.path.getmtime(path))
    if key not in _cache:
        try:
            m = Model.from_file(path)
        except WoollyError:
            return None
        md = m.metadata
        _cache[key] = ModelInfo(name=name, size=md.file_size, quantization=md.quantization, loaded=False,
                                metadata=ModelInfoMeta(md.author, human_count(md.parameters), md.license))
        m.close()
    return _cache[key]


def list_model_infos(pool) -> list[ModelInfo]:
    """The models directory's models, then loaded models from elsewhere (a path given to `woolly serve`)."""
    from woolly.model_store import list_models

    loaded = {name for name, _ in pool.loaded()}
    out = []
    for row in list_models():
        if not row["pulled"]:
            continue
        info = _info(row["name"], row["path"])
        if info is not None:
            out.append(ModelInfo(info.name, info.size, info.quantization, info.name in loaded, info.metadata))
    listed = {m.name for m in out}
    for name in sorted(loaded - listed):
        path = pool.loaded_path(name)
        info = _info(name, str(path)) if path is not None else None
        if info is not None:
            out.append(ModelInfo(name, info.size, info.quantization, True, info.metadata))
    return out
