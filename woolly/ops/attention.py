"""Grouped-query attention over a preallocated KV cache, and the in-place cache write.

`attend` is the jnp attention over the whole cache with a mask (the fallback).
`cached_attend` is what the model calls for new tokens (decode: one per slot; prefill and
whole-sequence passes: T per slot): on CPU it calls the C++ kernel `kernels/attention.cc`
from inside jit through `jax.ffi`, which reads only each query's live rows (s <= p, within
the window) instead of the whole cache bucket, one query at a time, so a row's result does
not depend on the others in its batch; elsewhere (another backend, no g++,
`cpu_kernels.xla_only()`) it is `attend` with the mask.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from woolly.ops import cpu_kernels

NEG_INF = -1e30


def write_cache(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """Store new [B, T, K, H] into cache [B, K, S, H] at rows positions [B, T].

    A position < 0 (padding, an inactive slot) writes nothing. One scatter, which XLA updates
    in place when the cache buffer is donated. A single update is written twice: XLA turns a
    one-index scatter into a dynamic-update-slice that it then copies whole (every layer,
    every step, measured); a two-index scatter stays in place.
    """
    B, K, S, H = cache.shape
    if cache.dtype in (jnp.float16, jnp.bfloat16) and H % 16 == 0 and _kernel_ready():
        # XLA:CPU has no 16-bit float scatter: it converts the whole cache to f32 and back every
        # step (even a bitcast to uint16 is a copy there). The kernel writes the rows in place.
        return _kernel_write(cache, new.astype(jnp.float32), positions.astype(jnp.int32))
    rows = jnp.where(positions >= 0, positions, S)                                      # [B, T]; S: dropped
    slot = jnp.broadcast_to(jnp.arange(B, dtype=rows.dtype)[:, None], rows.shape)       # [B, T]
    new = new.astype(cache.dtype)                                                       # [B, T, K, H]
    if rows.size == 1:
        rows, slot, new = (jnp.concatenate([a, a], axis=1) for a in (rows, slot, new))  # [1, 2], [1, 2, K, H]
    return cache.at[slot, :, rows].set(new, mode="drop")


def attention_mask(positions: jax.Array, cache_len: int, window: int = 0) -> jax.Array:
    """Which cache rows each query may read: bool [B, T, S].

    Row s holds the key at position s; a query at position p sees s <= p, and with a
    sliding window only p - s < window (llama.cpp's LLAMA_SWA_TYPE_STANDARD).
    """
    s = jnp.arange(cache_len, dtype=positions.dtype)                                    # [S]
    p = positions[:, :, None]                                                           # [B, T, 1]
    allowed = s <= p
    if window:
        allowed &= (p - s) < window
    return allowed


def attend(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, mask: jax.Array, scale: float,
           softcap: float = 0.0) -> jax.Array:
    """Softmax(q k^T * scale) v for q [B, T, N, H] over caches [B, K, S, H] -> [B, T, N, H];
    softcap > 0: scores -> softcap * tanh(scores / softcap) before the mask (gemma2)."""
    B, T, N, H = q.shape
    K, S = k_cache.shape[1], k_cache.shape[2]
    G = N // K
    # The G query heads of a KV head and the T positions form one matrix dimension, so each
    # product is one plain batched matmul over (B, K) (1.7x faster at T = 512 than "btkgh").
    qg = q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)    # [B, K, G*T, H]
    scores = jnp.einsum("bkqh,bksh->bkqs", qg, k_cache).reshape(B, K, G, T, S) * scale  # [B, K, G, T, S]
    if softcap:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(mask[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v_cache.dtype)  # [B, K, G, T, S]
    # Output in the cache's own order, transposed after: "->btkgh" made XLA transpose the
    # whole V cache every step (5x slower decode attention, measured).
    out = jnp.einsum("bkqs,bksh->bkqh", probs.reshape(B, K, G * T, S), v_cache)         # [B, K, G*T, H]
    return out.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


# ----------------------------------------------------------------------------------------
# Attention of new tokens over the cache through the CPU kernel (kernels/attention.cc).

_TARGET = "woolly_decode_attention"
_WRITE_TARGET = "woolly_cache_write"
KERNEL_TARGETS = (_TARGET, _WRITE_TARGET)   # the FFI targets this module may put in a trace
# Below this much work (live rows x K x H x (G + 1)) the kernel stays on the calling thread.
# Low, since a decode step's call goes to the kernels' own awake worker (ops/kernels/parallel.h):
# an 8-slot SmolLM2 step's attention 1.29 -> 0.87 ms when it went parallel.
KERNEL_MIN_PARALLEL = 1 << 14
# False: decode uses the masked jnp `attend` even where the kernel works (for measuring).
USE_KERNEL = True


def kernel_available() -> bool:
    """Whether the decode-attention kernel is built and registered (builds it on first call)."""
    return cpu_kernels.load_kernel("attention", {_TARGET: "WoollyDecodeAttention", _WRITE_TARGET: "WoollyCacheWrite"})


def kernel_error() -> str | None:
    """Why the decode-attention kernel is not in use, if it is not."""
    return cpu_kernels.kernel_error("attention")


def _kernel_ready() -> bool:
    return USE_KERNEL and jax.default_backend() == "cpu" and cpu_kernels.in_use() and kernel_available()


def _use_kernel(q: jax.Array, k_cache: jax.Array) -> bool:
    B, T, N, H = q.shape
    K = k_cache.shape[1]
    return (H % 16 == 0 and K > 0 and N % K == 0 and N // K <= 64 and k_cache.shape[0] == B
            and k_cache.dtype in (jnp.float32, jnp.float16, jnp.bfloat16) and _kernel_ready())


def _kernel_call(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, positions: jax.Array,
                 window: int, scale: float) -> jax.Array:
    """q [B, T, N, H] at positions [B, T] over caches [B, K, S, H]: the kernel sees B*T queries
    of one token each, T per cache slot."""
    B, T, N, H = q.shape
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((B * T, 1, N, H), jnp.float32), vmap_method="sequential")
    out = call(q.reshape(B * T, 1, N, H).astype(jnp.float32), k_cache, v_cache.astype(k_cache.dtype),
               positions.reshape(-1).astype(jnp.int32), window=np.int64(window), scale=np.float32(scale),
               min_par=np.int64(KERNEL_MIN_PARALLEL), qps=np.int64(T))
    return out.reshape(B, T, N, H)


def _masked_reference(q, k_cache, v_cache, positions, window: int, scale: float) -> jax.Array:
    """The kernel's result in jnp: masked `attend`, zeros for idle queries (position < 0)."""
    out = attend(q, k_cache, v_cache, attention_mask(positions, k_cache.shape[2], window), scale)
    return jnp.where((positions >= 0)[:, :, None, None], out, 0).astype(jnp.float32)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def _kernel_attend(q, k_cache, v_cache, positions, window: int, scale: float) -> jax.Array:
    """`_kernel_call` made differentiable: the tangent goes through the jnp reference."""
    return _kernel_call(q, k_cache, v_cache, positions, window, scale)


@_kernel_attend.defjvp
def _kernel_attend_jvp(window, scale, primals, tangents):
    q, k_cache, v_cache, positions = primals
    dq, dk, dv = tangents[:3]
    f = lambda a, b, c: _masked_reference(a, b, c, positions, window, scale)  # noqa: E731
    _, dout = jax.jvp(f, (q, k_cache, v_cache), (dq, dk, dv))
    return _kernel_call(q, k_cache, v_cache, positions, window, scale), dout


def cached_attend(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, positions: jax.Array,
                  scale: float, window: int = 0) -> jax.Array:
    """Attention of new tokens over the cache they were just written to: q [B, T, N, H] at
    positions [B, T] (-1: padding or an idle slot) over caches [B, K, S, H] -> [B, T, N, H],
    each query reading rows s <= p (and p - s < window when window > 0).

    On CPU with the kernel, only live rows are read and an idle query's output is zeros; else
    it is `attend` with `attention_mask` (an idle query's output is then meaningless, not zero).
    """
    if _use_kernel(q, k_cache):
        return _kernel_attend(q, k_cache, v_cache, positions, int(window), float(scale)).astype(q.dtype)
    return attend(q, k_cache, v_cache, attention_mask(positions, k_cache.shape[2], window), scale)


def _write_call(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    call = jax.ffi.ffi_call(_WRITE_TARGET, jax.ShapeDtypeStruct(cache.shape, cache.dtype),
                            input_output_aliases={0: 0}, vmap_method="sequential")
    return call(cache, new, positions)


def _write_reference(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    B, K, S, H = cache.shape
    rows = jnp.where(positions >= 0, positions, S)
    slot = jnp.broadcast_to(jnp.arange(B, dtype=rows.dtype)[:, None], rows.shape)
    return cache.at[slot, :, rows].set(new.astype(cache.dtype), mode="drop")


@jax.custom_jvp
def _kernel_write(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """f16/bf16 cache write in place through the kernel; the tangent is the jnp scatter's."""
    return _write_call(cache, new, positions)


@_kernel_write.defjvp
def _kernel_write_jvp(primals, tangents):
    cache, new, positions = primals
    dc, dn = tangents[:2]
    _, dout = jax.jvp(lambda c, n: _write_reference(c, n, positions), (cache, new), (dc, dn))
    return _write_call(cache, new, positions), dout
