"""Rotary position embedding in both pair layouts GGUF files use."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rope(x: jax.Array, positions: jax.Array, base: float, neox: bool, freq_scale: float = 1.0,
         freq_factors: tuple[float, ...] = ()) -> jax.Array:
    """Rotate x [B, T, heads, H] by angle positions [B, T] * freq_scale * base^(-2i/H) / freq_factors[i]
    (llama.cpp's ggml_rope_ext without YaRN: linear scaling, Llama 3.1's per-frequency factors).

    neox=False rotates adjacent pairs (x[2i], x[2i+1]) — llama GGUF files, whose Q/K rows the
    converter permuted; neox=True rotates halves (x[i], x[i+H/2]) — gemma3 and most others.
    """
    H = x.shape[-1]
    inv_freq = base ** (-jnp.arange(0, H // 2, dtype=jnp.float32) * 2.0 / H)          # [H/2]
    if freq_factors:
        inv_freq = inv_freq / jnp.asarray(freq_factors, jnp.float32)
    if freq_scale != 1.0:
        inv_freq = inv_freq * jnp.float32(freq_scale)
    angle = positions.astype(jnp.float32)[:, :, None, None] * inv_freq                 # [B, T, 1, H/2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x32 = x.astype(jnp.float32)
    if neox:
        a, b = x32[..., : H // 2], x32[..., H // 2:]                                     # [B, T, heads, H/2]
        out = jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
    else:
        pairs = x32.reshape(*x.shape[:-1], H // 2, 2)                                   # [B, T, heads, H/2, 2]
        a, b = pairs[..., 0], pairs[..., 1]
        out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(x.shape)
    return out.astype(x.dtype)
