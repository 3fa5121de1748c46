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
    from woolly.model_file import Model

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


def list_model_infos(engine) -> list[ModelInfo]:
    from woolly.registry import list_models

    out = []
    for row in list_models():
        if not row["pulled"]:
            continue
        info = _info(row["name"], row["path"])
        if info is not None:
            loaded = engine.current_model_name == row["name"]
            out.append(ModelInfo(info.name, info.size, info.quantization, loaded, info.metadata))
    return out
