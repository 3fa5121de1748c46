"""Build the parameter pytree of a `Model`: GGUF names translated once, residency chosen here."""
from __future__ import annotations

import ctypes

import jax.numpy as jnp

from woolly.model import Model
from woolly.models.registry import architecture
from woolly.ops.qmatmul import RESIDENCIES, prepare_weight


def _vector(model: Model, name: str):
    return jnp.asarray(model.tensor(name), dtype=jnp.float32)                           # [E]


def _matrix(model: Model, name: str, residency: str, grouped: bool | None):
    info = model.tensors[name]
    return prepare_weight(model.raw(name), info.qtype, tuple(info.shape), residency, grouped=grouped)   # [out, in]


def load_params(model: Model, residency: str = "dense", grouped: bool | None = None) -> dict:
    """The params pytree of `model`: matrices dense (dequantized on load) or quantized-resident.

    Norm weights and other vectors are always f32. A tied output projection is not stored
    twice: `output` is simply absent and the model reads `embed`. `grouped`: quantized
    matrices in the CPU kernel's grouped layout (`qmatmul.prepare_weight`; None: where it is used).
    """
    if residency not in RESIDENCIES:
        raise ValueError(f"residency must be one of {RESIDENCIES}, got {residency!r}")
    cfg = model.config
    arch = architecture(cfg)
    params = {"embed": _matrix(model, "token_embd.weight", residency, grouped),                # [V, D]
              "output_norm": _vector(model, "output_norm.weight")}                   # [D]
    if not cfg.tied_output:
        params["output"] = _matrix(model, "output.weight", residency, grouped)                 # [V, D]
    layers = []
    for i in range(cfg.n_layers):
        lp = {}
        for key, suffix in arch.layer_tensors.items():
            name = f"blk.{i}.{suffix}"
            lp[key] = _vector(model, name) if len(model.tensors[name].shape) == 1 else _matrix(model, name, residency, grouped)
        layers.append(lp)
    params["layers"] = layers
    # The device copy is made: the file's pages and the host-side decoding buffers are no
    # longer needed, so they leave the process's resident memory (bench: model memory).
    model.release_pages()
    trim_heap()
    return params


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc's malloc_trim; a no-op elsewhere)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
