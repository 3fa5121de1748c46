"""Meshes and shardings: Megatron-style tensor parallelism over "model", batches over "data".

Everything here is JAX's own machinery: a `Mesh` with axes ("data", "model") (Auto axis
types, so XLA's partitioner propagates shardings), `NamedSharding` placements of the params
pytree and the KV cache, and jitted entry points that XLA partitions. Rules (see
docs/sharding.md):

- wq | wk, wv | w_gate, w_up: column-parallel (rows O split over "model"); wo, w_down:
  row-parallel (columns I split), so each attention / MLP block needs one all-reduce.
- Q heads are split only when n_heads divides the model axis, KV heads only when
  n_kv_heads does; otherwise those projections (and, for Q, wo) are replicated.
  SmolLM2 (9 Q, 3 KV heads) keeps attention replicated and splits its MLP; Gemma-3-270M
  (4 Q, 1 KV) splits Q heads over 2 or 4 devices and replicates its one KV head.
- The MLP is split when ffn_dim (and, quantized, its sub-blocks) divides the model axis.
- embed / output: split over the vocabulary (rows V) when V divides the model axis; norms
  and other vectors replicated.
- A "nib" QuantizedWeight pairs row o with row o + O/2 in one byte, so a split of its packed
  rows is not a contiguous output slice. Where such a weight's rows are split, it is
  unpacked to "i8" codes (exact, 1 byte a weight, i.e. 8/m bits a weight per device);
  split by columns (row-parallel) it stays packed.
- The KV cache [B, K, S, H]: K split when the KV heads are, B split over "data" when the
  slot count divides it.

The C++ CPU kernels are opaque to XLA's partitioner, so sharded computations are traced
inside `cpu_kernels.xla_only()`, through their own jitted functions (`entry_points(mesh)`),
never sharing a trace or a compiled program with the single-device entry points.
"""
from __future__ import annotations

import functools
import inspect
from types import SimpleNamespace
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from woolly.arch import ModelConfig
from woolly.models.base import KVCache
from woolly.ops import cpu_kernels
from woolly.ops.quantized_weight import QuantizedWeight, unpair_rows
from woolly.runtime.params import unfuse_layer

DATA, MODEL = "data", "model"
COLUMN, ROW = "column", "row"   # split a matrix [O, I] by rows O (column-parallel) or columns I


# -- the mesh ------------------------------------------------------------------------------
def make_mesh(tensor_parallel: int | None = None, data_parallel: int | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "model") mesh over `devices` (default: all, every host's).

    An axis left None takes what the other leaves: make_mesh() puts every device on "data",
    make_mesh(tensor_parallel=4) puts the rest on "data"; the first tp*dp devices are used.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    tp = tensor_parallel or (max(1, n // data_parallel) if data_parallel else 1)
    dp = data_parallel or max(1, n // tp)
    if tp < 1 or dp < 1:
        raise ValueError(f"tensor_parallel and data_parallel must be >= 1, got {tp} and {dp}")
    if tp * dp > n:
        raise ValueError(f"a {dp} x {tp} (data x model) mesh needs {tp * dp} devices; {n} available")
    return jax.make_mesh((dp, tp), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices[:tp * dp])


def axis_size(mesh: Mesh, name: str) -> int:
    return int(mesh.shape.get(name, 1))


def _sharding(mesh: Mesh, *spec) -> NamedSharding:
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return _sharding(mesh)


# -- which parts split ------------------------------------------------------------------------
def split_heads(cfg: ModelConfig, mesh: Mesh) -> tuple[bool, bool]:
    """(Q heads split, KV heads split) over the model axis: each only where its count divides."""
    m = axis_size(mesh, MODEL)
    kv = m > 1 and cfg.n_kv_heads % m == 0
    q = m > 1 and cfg.n_heads % m == 0
    return q, kv


def _divides(w, how: str, m: int) -> bool:
    """Whether w [O, I] splits m ways by rows (COLUMN) or columns (ROW), sub-blocks whole."""
    O, I = w.shape
    if how == COLUMN:
        return O % m == 0
    sub = w.sub if isinstance(w, QuantizedWeight) else 1
    return I % (sub * m) == 0


def layer_plan(lp: dict, cfg: ModelConfig, mesh: Mesh) -> dict[str, str | None]:
    """name -> COLUMN, ROW or None (replicated) for one layer's matrices."""
    m = axis_size(mesh, MODEL)
    q, kv = split_heads(cfg, mesh)
    plan: dict[str, str | None] = {k: None for k, v in lp.items() if _is_matrix(v)}
    if q and _divides(lp["wq"], COLUMN, m) and _divides(lp["wo"], ROW, m):
        plan["wq"], plan["wo"] = COLUMN, ROW
    if kv and _divides(lp["wk"], COLUMN, m) and _divides(lp["wv"], COLUMN, m):
        plan["wk"] = plan["wv"] = COLUMN
    mlp = (("w_gate", COLUMN), ("w_up", COLUMN), ("w_down", ROW))   # absent in a mixture-of-experts layer
    if m > 1 and all(k in lp and _divides(lp[k], h, m) for k, h in mlp):
        plan["w_gate"], plan["w_up"], plan["w_down"] = COLUMN, COLUMN, ROW
    return plan


def _is_matrix(v) -> bool:
    return isinstance(v, QuantizedWeight) or getattr(v, "ndim", 0) == 2


# -- placing params ------------------------------------------------------------------------------
def _put(x, sharding: NamedSharding) -> jax.Array:
    """x (host or device array) placed with `sharding`; every process passes the same x."""
    if getattr(x, "sharding", None) == sharding:
        return x
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx], dtype=host.dtype)


def unpack_nibbles(w: QuantizedWeight) -> QuantizedWeight:
    """A "nib" weight as "i8" codes [O, I] (exact): its rows can then be split contiguously."""
    if w.kind != "nib":
        return w
    packed = np.asarray(w.q)                                                            # u8 [O/2, I]
    codes = unpair_rows(packed).astype(np.int16) - w.off                                # [O, I]
    return QuantizedWeight(jnp.asarray(codes.astype(np.int8)), w.scale, w.bias, "i8", w.sub, 0)


def place_matrix(w, how: str | None, mesh: Mesh):
    """w [O, I] (array or QuantizedWeight) split by COLUMN (rows O), ROW (columns I) or replicated."""
    spec = {COLUMN: (MODEL, None), ROW: (None, MODEL), None: ()}[how]
    if not isinstance(w, QuantizedWeight):
        return _put(w, _sharding(mesh, *spec))
    w = w.plain()                   # rows split contiguously; the sharded path multiplies in XLA
    if how == COLUMN:
        w = unpack_nibbles(w)
    s = _sharding(mesh, *spec)      # q [O|O/2, I] and scale/bias [O, I/sub] split alike
    return QuantizedWeight(_put(w.q, s), _put(w.scale, s), None if w.bias is None else _put(w.bias, s),
                           w.kind, w.sub, w.off)


def shard_params(params: dict, cfg: ModelConfig, mesh: Mesh) -> dict:
    """The params pytree placed on `mesh` by the rules above (replicated over "data").
    Idempotent: already placed params come back as they are."""
    m = axis_size(mesh, MODEL)
    out = {}
    for key, value in params.items():
        if key == "layers":
            continue
        if _is_matrix(value):   # embed / output [V, D]: split over the vocabulary where it divides
            out[key] = place_matrix(value, COLUMN if m > 1 and _divides(value, COLUMN, m) else None, mesh)
        else:
            out[key] = _put(value, replicated(mesh))
    layers = []
    for lp in params["layers"]:
        lp = unfuse_layer(lp, cfg)   # fused projections (one-device params) split by rows again
        plan = layer_plan(lp, cfg, mesh)
        layers.append({k: place_matrix(v, plan[k], mesh) if k in plan else
                       [place_matrix(e, None, mesh) for e in v] if isinstance(v, list) else   # experts: replicated
                       _put(v, replicated(mesh))
                       for k, v in lp.items()})
    out["layers"] = layers
    return out


# -- the KV cache ----------------------------------------------------------------------------------
def buffer_sharding(shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    """Sharding of one cache buffer [B, K, S, H]: B over "data" and K over "model" where they divide."""
    B, K = shape[0], shape[1]
    d, m = axis_size(mesh, DATA), axis_size(mesh, MODEL)
    return _sharding(mesh, DATA if d > 1 and B % d == 0 else None, MODEL if m > 1 and K % m == 0 else None,
                     None, None)


def cache_sharding(cfg: ModelConfig, mesh: Mesh, batch: int | None = None) -> NamedSharding:
    """The sharding of every [B, K, S, H] buffer of a cache with `batch` slots (None: B divides "data")."""
    return buffer_sharding((batch if batch is not None else axis_size(mesh, DATA), cfg.n_kv_heads), mesh)


def constrain_cache(cache: KVCache, mesh: Mesh) -> KVCache:
    """Inside a trace: pin each buffer to `buffer_sharding` (so donated caches keep their layout)."""
    return jax.tree.map(lambda c: jax.lax.with_sharding_constraint(c, buffer_sharding(c.shape, mesh)), cache)


def new_cache(cfg: ModelConfig, mesh: Mesh, slots: int, length: int, dtype=jnp.float32) -> KVCache:
    """A zeroed cache [B, K, S, H] per layer, created already sharded (never whole on one device)."""
    from woolly.runtime.cache import new_cache as plain
    s = cache_sharding(cfg, mesh, slots)
    shardings = KVCache((s,) * cfg.n_layers, (s,) * cfg.n_layers)
    return jax.jit(lambda: plain(cfg, slots, length, dtype), out_shardings=shardings)()


# -- the sharded entry points ------------------------------------------------------------------------
def read_slot_rows(cache: KVCache, slot: jax.Array) -> KVCache:
    """One slot's rows [1, K, S, H] per buffer as a masked sum over B: with B split over "data",
    each device sums its own slots and XLA all-reduces one slot's worth (a dynamic slice of a
    split axis made it all-gather the whole cache)."""
    def rows(c):                                                                              # [B, K, S, H]
        mine = (jnp.arange(c.shape[0]) == slot)[:, None, None, None]
        return jnp.sum(jnp.where(mine, c, 0), axis=0, keepdims=True)                        # [1, K, S, H]
    return jax.tree.map(rows, cache)


def _batch_sharded(x: jax.Array, mesh: Mesh) -> jax.Array:
    """Inside a trace: x [B, ...] split over "data" where B divides it."""
    d = axis_size(mesh, DATA)
    if d > 1 and x.shape[0] % d == 0:
        return jax.lax.with_sharding_constraint(x, _sharding(mesh, DATA))
    return x


@functools.lru_cache(maxsize=None)
def entry_points(mesh: Mesh) -> SimpleNamespace:
    """`woolly.runtime.entry`'s jitted functions for params and caches placed on `mesh`.

    Each is a fresh jit of a fresh wrapper (its own trace and compile caches), traced inside
    `xla_only()`; caches come out with `buffer_sharding`, token ids, counts and log-probs
    replicated (readable from every process), batched token inputs split over "data".
    """
    from woolly.runtime import entry

    rep = replicated(mesh)

    def wrap(raw, outs, batch_arg=None, **jit_kw):
        sig = inspect.signature(raw)

        @functools.wraps(raw)
        def traced(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            if batch_arg is not None:
                bound.arguments[batch_arg] = _batch_sharded(bound.arguments[batch_arg], mesh)
            with cpu_kernels.xla_only():
                out = raw(*bound.args, **bound.kwargs)
            single = not isinstance(out, tuple) or isinstance(out, KVCache)
            parts = [out] if single else list(out)
            for i, kind in enumerate(outs):
                if kind == "cache":
                    parts[i] = constrain_cache(parts[i], mesh)
                elif kind == "rep":
                    parts[i] = jax.lax.with_sharding_constraint(parts[i], rep)
            return parts[0] if single else tuple(parts)
        traced.__wrapped__ = raw
        return jax.jit(traced, **jit_kw)

    cfg_static = dict(static_argnames=("cfg",))
    donate = dict(donate_argnames=("cache",))
    raw = lambda f: f.__wrapped__   # noqa: E731  (the function under entry's jax.jit)
    return SimpleNamespace(
        prefill=wrap(raw(entry.prefill), (None, "cache"), static_argnames=("cfg", "kv_len", "logits"), **donate),
        prefill_rows=wrap(raw(entry.prefill_rows), (None, "cache"), batch_arg="tokens",
                          static_argnames=("cfg", "logits"), **donate),
        decode_step=wrap(raw(entry.decode_step), (None, "cache"), **cfg_static, **donate),
        decode_and_sample=wrap(raw(entry.decode_and_sample), ("rep", None, "cache"), **cfg_static, **donate),
        generate=wrap(raw(entry.generate), ("rep", "rep", "cache"), static_argnames=("cfg", "max_new"), **donate),
        all_logits=wrap(raw(entry.all_logits), (None,), batch_arg="tokens", **cfg_static),
        token_logprobs=wrap(raw(entry.token_logprobs), ("rep",), batch_arg="tokens", **cfg_static),
        embed=wrap(raw(entry.embed), ("rep",), batch_arg="tokens", **cfg_static),
        read_slot=wrap(read_slot_rows if axis_size(mesh, DATA) > 1 else raw(entry.read_slot), ("cache",)),
        write_slot=wrap(raw(entry.write_slot), ("cache",), donate_argnums=(0,)),
    )


def describe(params: dict, cfg: ModelConfig, mesh: Mesh) -> dict[str, str]:
    """A short account of what is split (for logs and docs): part -> rule."""
    q, kv = split_heads(cfg, mesh)
    plan = layer_plan(params["layers"][0], cfg, mesh) if params["layers"] else {}
    vocab = params.get("output", params["embed"])
    m = axis_size(mesh, MODEL)
    return {"mesh": f"data={axis_size(mesh, DATA)} model={m}",
            "q_heads": "split" if plan.get("wq") else "replicated",
            "kv_heads": "split" if plan.get("wk") else "replicated",
            "mlp": "split" if plan.get("w_gate") else "replicated",
            "vocab": "split" if m > 1 and _divides(vocab, COLUMN, m) else "replicated",
            "heads_divide": f"q={q} kv={kv}"}


__all__ = ["DATA", "MODEL", "axis_size", "buffer_sharding", "cache_sharding", "constrain_cache", "describe",
           "entry_points", "layer_plan", "make_mesh", "new_cache", "place_matrix", "read_slot_rows", "replicated", "shard_params",
           "split_heads", "unpack_nibbles"]
