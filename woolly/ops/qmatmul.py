"""Weights as the runtime holds them, and the one helper that multiplies by them.

Residency is chosen in one place (`prepare_weight`): "dense" dequantizes on load to a
float array [out, in]; "quantized" keeps the block codes resident as a `QuantizedWeight`
and dequantizes inside the jitted matmul. Model code only calls `linear` and
`embed_rows`, so it never branches on the weight's kind.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from woolly.formats.quants import QuantizationType, decode_blocks

RESIDENCIES = ("dense", "quantized")


@jax.tree_util.register_pytree_node_class
@dataclass
class QuantizedWeight:
    """w[o, i] = scale[o, i // sub] * q[o, i] + bias[o, i // sub]."""

    q: jax.Array             # int8 [O, I]
    scale: jax.Array         # f32  [O, I/sub]
    bias: jax.Array | None   # f32  [O, I/sub] or None

    def tree_flatten(self):
        return (self.q, self.scale, self.bias), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        O, I = self.q.shape
        n_sub = self.scale.shape[-1]
        w = self.q.reshape(O, n_sub, I // n_sub).astype(dtype) * self.scale[..., None].astype(dtype)
        if self.bias is not None:
            w = w + self.bias[..., None].astype(dtype)
        return w.reshape(O, I)


def prepare_weight(raw: np.ndarray, qtype: QuantizationType, shape: tuple[int, int], residency: str,
                   dtype=jnp.float32):
    """Host bytes of a 2-D tensor -> what the runtime keeps on device for it."""
    from woolly.formats.quants import dequantize

    if residency not in RESIDENCIES:
        raise ValueError(f"residency must be one of {RESIDENCIES}, got {residency!r}")
    if residency == "dense" or not QuantizationType(qtype).is_quantized:
        return jnp.asarray(dequantize(raw, qtype, shape), dtype=dtype)
    O, I = shape
    bs, ts = qtype.block_size, qtype.type_size
    q, scale, bias = decode_blocks(np.ascontiguousarray(raw).reshape(-1, ts), qtype)
    n_sub = scale.shape[1]
    return QuantizedWeight(
        q=jnp.asarray(q.reshape(O, I)),
        scale=jnp.asarray(scale.reshape(O, I // bs * n_sub)),
        bias=None if bias is None else jnp.asarray(bias.reshape(O, I // bs * n_sub)),
    )


def linear(x: jax.Array, w) -> jax.Array:
    """x [..., I] times w [O, I] transposed -> [..., O], for a dense or quantized w."""
    if isinstance(w, QuantizedWeight):
        w = w.dequantize(x.dtype)
    return jnp.einsum("...i,oi->...o", x, w)


def embed_rows(w, ids: jax.Array) -> jax.Array:
    """Rows of w [V, D] at ids [...] -> [..., D]."""
    if isinstance(w, QuantizedWeight):
        rows = QuantizedWeight(w.q[ids], w.scale[ids], None if w.bias is None else w.bias[ids])
        flat = QuantizedWeight(rows.q.reshape(-1, w.q.shape[1]), rows.scale.reshape(-1, w.scale.shape[1]),
                               None if rows.bias is None else rows.bias.reshape(-1, w.scale.shape[1]))
        return flat.dequantize().reshape(*ids.shape, w.q.shape[1])
    return w[ids]
