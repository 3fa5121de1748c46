"""Build the parameter pytree of a `Model`: GGUF names translated once, residency chosen here."""
from __future__ import annotations

import ctypes

import jax.numpy as jnp

from woolly.model_file import Model
from woolly.models.families import architecture
from woolly.ops.qmatmul import (RESIDENCIES, fuse_rows, grouped_where_possible, kernel_groups_weights, prepare_weight,
                                split_rows)

# Matrices read by the same input, kept as one where their formats agree (see `fuse_layer`).
FUSED = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up")}


def _vector(model: Model, name: str):
    return jnp.asarray(model.tensor(name), dtype=jnp.float32)                           # [E]


def _matrix(model: Model, name: str, residency: str, grouped: bool | None):
    info = model.tensors[name]
    return prepare_weight(model.raw(name), info.qtype, tuple(info.shape), residency, grouped=grouped)   # [out, in]


def _experts(model: Model, name: str, residency: str, grouped: bool | None) -> list:
    """A mixture-of-experts tensor [E, out, in] as E matrices, each prepared as `_matrix` does."""
    info = model.tensors[name]
    raw = model.raw(name)                                                               # [E, out, row_bytes]
    return [prepare_weight(raw[e], info.qtype, tuple(info.shape[1:]), residency, grouped=grouped)
            for e in range(info.shape[0])]


def load_params(model: Model, residency: str = "dense", grouped: bool | None = None) -> dict:
    """The params pytree of `model`: matrices dense (dequantized on load) or quantized-resident.

    Norm weights and other vectors are always f32. A tied output projection is not stored
    twice: `output` is simply absent and the model reads `embed`. `grouped`: quantized
    matrices in the CPU kernel's grouped layout (`qmatmul.prepare_weight`; None: where it is used);
    grouped layers get fused projections (`fuse_layer`).
    """
    if residency not in RESIDENCIES:
        raise ValueError(f"residency must be one of {RESIDENCIES}, got {residency!r}")
    cfg = model.config
    arch = architecture(cfg)
    if grouped is None:
        grouped = residency == "quantized" and kernel_groups_weights()
    fusable = {k for parts in FUSED.values() for k in parts} if grouped else set()
    params = {"embed": _matrix(model, "token_embd.weight", residency, grouped),                # [V, D]
              "output_norm": _vector(model, "output_norm.weight")}                   # [D]
    if not cfg.tied_output:
        params["output"] = _matrix(model, "output.weight", residency, grouped)                 # [V, D]
    layers = []
    for i in range(cfg.n_layers):
        lp = {}
        for key, suffix in arch.layer_tensors.items():
            name = f"blk.{i}.{suffix}"
            # a matrix that may be fused stays plain until fuse_layer (it groups what it cannot fuse)
            rank = len(model.tensors[name].shape)
            lp[key] = _vector(model, name) if rank == 1 else _experts(model, name, residency, grouped) if rank == 3 \
                else _matrix(model, name, residency, grouped and key not in fusable)
        layers.append(fuse_layer(lp) if grouped else lp)
    params["layers"] = layers
    # The device copy is made: the file's pages and the host-side decoding buffers are no
    # longer needed, so they leave the process's resident memory (bench: model memory).
    model.release_pages()
    trim_heap()
    return params


def fuse_layer(lp: dict) -> dict:
    """A layer's plain-layout wq/wk/wv as one grouped `wqkv`, and w_gate/w_up as one `w_gate_up`,
    where `fuse_rows` can (quantized in one format); what it cannot fuse is grouped alone. For the
    CPU kernel's path: one call instead of three or two, each ~10-20 us at decode whatever its
    size (SmolLM2's k and v projections are 1/3 the size of q and took as long). The model
    splits the output (`models.base.projections`)."""
    for fused, parts in FUSED.items():
        if all(k in lp for k in parts):
            w = fuse_rows([lp[k] for k in parts])
            if w is not None:
                lp = {k: v for k, v in lp.items() if k not in parts} | {fused: w}
                continue
        lp = {k: grouped_where_possible(v) if k in parts else v for k, v in lp.items()}
    return lp


def unfuse_layer(lp: dict, cfg) -> dict:
    """`fuse_layer` undone: the separate plain-layout matrices (what sharding splits by rows)."""
    for fused, parts in FUSED.items():
        if fused in lp:
            kv = cfg.n_kv_heads * cfg.head_dim
            widths = (cfg.q_dim, kv, kv) if fused == "wqkv" else (lp["w_down"].shape[1],) * 2
            lp = {k: v for k, v in lp.items() if k != fused} | dict(zip(parts, split_rows(lp[fused], widths)))
    return lp


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc's malloc_trim; a no-op elsewhere)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
