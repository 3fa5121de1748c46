"""RMS normalization (the only norm the supported families use)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x [..., E] / rms(x) * weight [E], computed in f32.

    GGUF norm weights are used as stored: gemma's "+1" is already folded in by the converter.
    """
    x32 = x.astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(mean_square(x32) + eps)                              # [..., 1]
    return (x32 * inv_rms * weight).astype(x.dtype)


def mean_square(x: jax.Array) -> jax.Array:
    """mean(x * x) over the last axis -> [..., 1], summed as a fixed pairwise tree of
    elementwise adds. XLA:CPU's own reduction orders the sum by the array's shape (D = 64,
    1024: one row's result changed with the number of rows), which would make a prompt's
    result depend on what else is prefilled with it; elementwise adds do not."""
    y = x * x
    E = y.shape[-1]
    P = 1 << max(E - 1, 0).bit_length()
    if P != E:
        y = jnp.pad(y, [(0, 0)] * (y.ndim - 1) + [(0, P - E)])                    # zeros add exactly
    while y.shape[-1] > 1:
        h = y.shape[-1] // 2
        y = y[..., :h] + y[..., h:]
    return y / E
