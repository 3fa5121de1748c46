"""RMS normalization (the only norm the supported families use)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x [..., E] / rms(x) * weight [E], computed in f32.

    GGUF norm weights are used as stored: gemma's "+1" is already folded in by the converter.
    """
    x32 = x.astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)  # [..., 1]
    return (x32 * inv_rms * weight).astype(x.dtype)
