"""KV cache allocation and the bucket policy for sequence lengths."""
from __future__ import annotations

import jax.numpy as jnp

from woolly.arch import ModelConfig
from woolly.models.base import KVCache

MIN_BUCKET = 16
# KV cache element types (llama.cpp's --cache-type-k/v f32/f16/bf16): a 16-bit cache halves the
# cache's memory; attention reads it in f32 (ops.attention), writes round to nearest even.
# q8_0 is not offered: it needs attention that dequantizes blocks of 32 as it reads.
KV_CACHE_TYPES = {"f32": jnp.float32, "f16": jnp.float16, "bf16": jnp.bfloat16}


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """The smallest power of two >= max(n, minimum): prompt lengths and cache lengths."""
    b = minimum
    while b < n:
        b *= 2
    return b


def cache_shape(cfg: ModelConfig, slots: int, length: int) -> tuple[int, int, int, int]:
    """One layer's K (or V) buffer: [B, K, S, H]."""
    return (slots, cfg.n_kv_heads, length, cfg.head_dim)


def new_cache(cfg: ModelConfig, slots: int, length: int, dtype=jnp.float32) -> KVCache:
    """Zeroed cache for `slots` concurrent sequences of up to `length` positions."""
    shape = cache_shape(cfg, slots, length)                                              # [B, K, S, H]
    return KVCache(tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)),
                   tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)))
