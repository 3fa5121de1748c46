"""Grouped-query attention over a preallocated KV cache, and the in-place cache write."""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def write_cache(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """Store new [B, T, K, H] into cache [B, K, S, H] at rows positions [B, T].

    A position < 0 (padding, an inactive slot) writes nothing. One scatter with unique,
    sorted indices, which XLA updates in place when the cache buffer is donated.
    """
    B, K, S, H = cache.shape
    rows = jnp.where(positions >= 0, positions, S)                                      # [B, T]; S: dropped
    slot = jnp.broadcast_to(jnp.arange(B, dtype=rows.dtype)[:, None], rows.shape)       # [B, T]
    return cache.at[slot, :, rows].set(new.astype(cache.dtype), mode="drop",
                                       unique_indices=True, indices_are_sorted=True)


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
    out = jnp.einsum("bkgts,bksh->btkgh", probs, v_cache)                               # [B, T, K, G, H]
    return out.reshape(B, T, N, H)
