"""Build the parameter pytree of a `Model`: GGUF names translated once, residency chosen here."""
from __future__ import annotations

import ctypes

import jax
import numpy as np

from woolly.model_file import Model
from woolly.models.families import architecture
from woolly.runtime import weights_cache
from woolly.ops.qmatmul import (RESIDENCIES, fuse_rows, grouped_where_possible, kernel_groups_weights, prepare_weight,
                                split_rows)

# Matrices read by the same input, kept as one where their formats agree (see `fuse_layer`).
FUSED = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up")}


# Everything is prepared in host memory and placed with `jax.device_put` a layer at a time: one
# transfer call per layer, and never `jnp.asarray`, which in this jax compiles (or fetches from
# the compile cache) a copy program for each new shape (~10 ms each, ~0.3 s of a SmolLM2 load).


def _vector(model: Model, name: str):
    return np.asarray(model.tensor(name), dtype=np.float32)                             # [E]


def _matrix(model: Model, name: str, residency: str, grouped: bool | None):
    info = model.tensors[name]
    return prepare_weight(model.raw(name), info.qtype, tuple(info.shape), residency, grouped=grouped,
                          host=True)                                                    # [out, in]


def _experts(model: Model, name: str, residency: str, grouped: bool | None) -> list:
    """A mixture-of-experts tensor [E, out, in] as E matrices, each prepared as `_matrix` does."""
    info = model.tensors[name]
    raw = model.raw(name)                                                               # [E, out, row_bytes]
    return [prepare_weight(raw[e], info.qtype, tuple(info.shape[1:]), residency, grouped=grouped, host=True)
            for e in range(info.shape[0])]


def load_params(model: Model, residency: str = "dense", grouped: bool | None = None, cache: bool = False) -> dict:
    """The params pytree of `model`: matrices dense (dequantized on load) or quantized-resident.

    Norm weights and other vectors are always f32. A tied output projection is not stored
    twice: `output` is simply absent and the model reads `embed`. `grouped`: quantized
    matrices in the CPU kernel's grouped layout (`qmatmul.prepare_weight`; None: where it is used);
    grouped layers get fused projections (`fuse_layer`). `cache`: quantized weights are read
    from, or else written to, the prepared-weights cache (`weights_cache`; what `Runner` does).
    """
    if residency not in RESIDENCIES:
        raise ValueError(f"residency must be one of {RESIDENCIES}, got {residency!r}")
    cfg = model.config
    arch = architecture(cfg)
    if grouped is None:
        grouped = residency == "quantized" and kernel_groups_weights()
    key = weights_cache.key_for(model.path, residency, grouped) if cache and residency == "quantized" else None
    cached = weights_cache.read(key)
    if cached is not None:   # host views of a read-only map: copied to the device, then unmapped
        params = {k: jax.device_put(v) for k, v in cached.items() if k != "layers"}
        params["layers"] = [jax.device_put(lp) for lp in cached["layers"]]
        return params
    writer = weights_cache.Writer(key)
    fusable = {k for parts in FUSED.values() for k in parts} if grouped else set()
    top = {"embed": _matrix(model, "token_embd.weight", residency, grouped),                # [V, D]
           "output_norm": _vector(model, "output_norm.weight")}                      # [D]
    if not cfg.tied_output:
        top["output"] = _matrix(model, "output.weight", residency, grouped)                  # [V, D]
    index = {k: writer.add(v) for k, v in top.items()}
    params = jax.device_put(top)
    del top
    layers, layer_index = [], []
    for i in range(cfg.n_layers):
        lp = {}
        for key_, suffix in arch.layer_tensors.items():
            name = f"blk.{i}.{suffix}"
            # a matrix that may be fused stays plain until fuse_layer (it groups what it cannot fuse)
            rank = len(model.tensors[name].shape)
            lp[key_] = _vector(model, name) if rank == 1 else _experts(model, name, residency, grouped) if rank == 3 \
                else _matrix(model, name, residency, grouped and key_ not in fusable)
        lp = fuse_layer(lp, host=True) if grouped else lp
        layer_index.append(writer.add(lp))
        layers.append(jax.device_put(lp))
    params["layers"] = layers
    if None not in index.values() and None not in layer_index:
        writer.commit({"d": {**index, "layers": {"l": layer_index}}})
    else:
        writer.commit(None)
    # The device copy is made: the file's pages and the host-side decoding buffers are no
    # longer needed, so they leave the process's resident memory (bench: model memory).
    model.release_pages()
    trim_heap()
    return params


def fuse_layer(lp: dict, host: bool = False) -> dict:
    """A layer's plain-layout wq/wk/wv as one grouped `wqkv`, and w_gate/w_up as one `w_gate_up`,
    where `fuse_rows` can (quantized in one format); what it cannot fuse is grouped alone. For the
    CPU kernel's path: one call instead of three or two, each ~10-20 us at decode whatever its
    size (SmolLM2's k and v projections are 1/3 the size of q and took as long). The model
    splits the output (`models.base.projections`)."""
    for fused, parts in FUSED.items():
        if all(k in lp for k in parts):
            w = fuse_rows([lp[k] for k in parts], host=host)
            if w is not None:
                lp = {k: v for k, v in lp.items() if k not in parts} | {fused: w}
                continue
        lp = {k: grouped_where_possible(v, host=host) if k in parts else v for k, v in lp.items()}
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
