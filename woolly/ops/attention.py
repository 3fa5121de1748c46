"""Grouped-query attention over a preallocated KV cache, and the in-place cache write."""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def write_cache(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """Store new [B, T, K, H] into cache [B, K, S, H] at rows positions [B, T].

    A position < 0 (padding, an inactive slot) writes nothing. One scatter, which XLA updates
    in place when the cache buffer is donated. A single update is written twice: XLA turns a
    one-index scatter into a dynamic-update-slice that it then copies whole (every layer,
    every step, measured); a two-index scatter stays in place.
    """
    B, K, S, H = cache.shape
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


def attend(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """Softmax(q k^T * scale) v for q [B, T, N, H] over caches [B, K, S, H] -> [B, T, N, H]."""
    B, T, N, H = q.shape
    K = k_cache.shape[1]
    G = N // K
    qg = q.reshape(B, T, K, G, H)                                                       # [B, T, K, G, H]
    scores = jnp.einsum("btkgh,bksh->bkgts", qg, k_cache) * scale                       # [B, K, G, T, S]
    scores = jnp.where(mask[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v_cache.dtype)  # [B, K, G, T, S]
    # Output in the cache's own order, transposed after: "->btkgh" made XLA transpose the
    # whole V cache every step (5x slower decode attention, measured).
    out = jnp.einsum("bkgts,bksh->bkgth", probs, v_cache)                               # [B, K, G, T, H]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)
