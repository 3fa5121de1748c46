"""The runtime's quantized matrix (`QuantizedWeight`) and its layout helpers: pure data and
host-side reshuffles, imported by both multipliers (`qmatmul` on CPU, `pallas_qmatmul` on GPU).

Every GGUF block format is first decoded to the affine form w = scale * q + bias per
sub-block of 16 or 32 weights (woolly.formats.quants). Formats whose codes span at most 16
values keep 4-bit codes packed two per byte ("nib", row o low nibble, row o + O/2 high);
the rest keep int8 codes ("i8"). The grouped layout is the CPU kernel's (kernels/qmatvec.cc).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

def dequantize_rows(codes: jax.Array, scale: jax.Array, bias: jax.Array | None, sub: int) -> jax.Array:
    """codes int [N, I] with scale/bias [N, I/sub] -> f32 [N, I], in quants.dequantize's order."""
    N, I = codes.shape
    w = scale[:, :, None] * codes.reshape(N, I // sub, sub).astype(jnp.float32)
    if bias is not None:
        w = w + bias[:, :, None]
    return w.reshape(N, I)


@dataclass
class QuantizedWeight:
    """A block-quantized [O, I] matrix kept as codes plus per-sub-block scale (and bias).

    w[o, i] = scale[o, i // sub] * (code(o, i) - off) + bias[o, i // sub], where
    kind "i8":  code(o, i) = q[o, i]                       q: int8  [O, I]
    kind "nib": code(o, i) = q[o, i] & 15      (o < O/2)   q: uint8 [O/2, I]
                code(o, i) = q[o - O/2, i] >> 4 (o >= O/2)
    scale, bias: f32 [O, I // sub]; bias is None for formats without an offset.

    grouped: the same arrays (same shapes) in the CPU kernel's grouped layout, for weights
    whose rows (i8) or row pairs (nib) come in groups of 16 and I % 64 == 0: within group g,
    q's bytes are stored column-of-4-bytes major, [G, I/4, 16, 4] (so one 64-byte load holds
    4 codes of each of 16 rows), and scale/bias as [G, NR, I/sub, 16] (NR = 2 for row pairs:
    rows p and p + O/2). See `group_layout` and kernels/qmatvec.cc. `plain()` undoes it.
    """

    q: jax.Array
    scale: jax.Array
    bias: jax.Array | None
    kind: str = "i8"
    sub: int = 32
    off: int = 0
    grouped: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        O = self.scale.shape[0]
        return (O, self.q.shape[-1])

    @property
    def dtype(self):
        return jnp.float32

    def plain(self) -> "QuantizedWeight":
        """The same weight in the plain layout (a no-op when it is not grouped)."""
        if not self.grouped:
            return self
        U, I = self.q.shape
        G, NR, nsub = U // 16, 2 if self.kind == "nib" else 1, self.scale.shape[1]
        q = self.q.reshape(G, I // 4, 16, 4).transpose(0, 2, 1, 3).reshape(U, I)

        def rows(a):   # [G, NR, nsub, 16] -> [NR, G, 16, nsub] -> [O, nsub]
            return None if a is None else a.reshape(G, NR, nsub, 16).transpose(1, 0, 3, 2).reshape(-1, nsub)
        return QuantizedWeight(q, rows(self.scale), rows(self.bias), self.kind, self.sub, self.off)

    def codes(self) -> jax.Array:
        """Signed integer codes q = code - off, int32 [O, I]."""
        if self.grouped:
            return self.plain().codes()
        if self.kind == "nib":
            c = jnp.concatenate([self.q & 15, self.q >> 4], axis=0)
        else:
            c = self.q
        return c.astype(jnp.int32) - self.off

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The float matrix [O, I]; in f32 it equals `quants.dequantize` exactly."""
        w = self.plain()
        return dequantize_rows(w.codes(), w.scale, w.bias, w.sub).astype(dtype)


# A dataclass pytree is flattened by jax's C++ dispatch itself; a Python tree_flatten was
# called for each of ~200 weights on every decode step (~1 ms of a ~15 ms 8-slot step).
jax.tree_util.register_dataclass(QuantizedWeight, data_fields=["q", "scale", "bias"],
                                 meta_fields=["kind", "sub", "off", "grouped"])


def groupable(kind: str, O: int, I: int) -> bool:
    """Whether an [O, I] weight of this kind can take the grouped layout."""
    units = O // 2 if kind == "nib" else O
    return I % 64 == 0 and units % 16 == 0 and units > 0


def to_device(a):
    """A host array on the default device. `jax.device_put`, not `jnp.asarray`: in this jax
    the latter compiles (or looks up in the compile cache) a copy program per new shape, ~10 ms
    each, ~0.3 s of a model load; a `device_put` is a plain transfer. None stays None."""
    return None if a is None else jax.device_put(np.ascontiguousarray(a))


def _placed(w: "QuantizedWeight", host: bool) -> "QuantizedWeight":
    """w with its arrays on the device (or left on the host when `host`)."""
    if host:
        return w
    return QuantizedWeight(to_device(w.q), to_device(w.scale), to_device(w.bias), w.kind, w.sub, w.off, w.grouped)


def group_layout(w: QuantizedWeight, host: bool = False) -> QuantizedWeight:
    """w (plain, host-side arrays) in the grouped layout; see QuantizedWeight. `host`: the
    result's arrays stay numpy (the caller places them, e.g. a whole layer at once)."""
    q, scale, bias = np.asarray(w.q), np.asarray(w.scale), None if w.bias is None else np.asarray(w.bias)
    U, I = q.shape
    G, NR, nsub = U // 16, 2 if w.kind == "nib" else 1, scale.shape[1]
    words = np.ascontiguousarray(q).view(np.uint32).reshape(G, 16, I // 4)      # 4 codes per word
    qg = np.ascontiguousarray(words.transpose(0, 2, 1)).view(q.dtype).reshape(U, I)

    def groups(a):  # [O, nsub] = [NR, G, 16, nsub] -> [G, NR, nsub, 16]
        return None if a is None else a.reshape(NR, G, 16, nsub).transpose(1, 0, 3, 2).reshape(-1, nsub)
    return _placed(QuantizedWeight(qg, np.ascontiguousarray(groups(scale)),
                                   None if bias is None else np.ascontiguousarray(groups(bias)),
                                   w.kind, w.sub, w.off, grouped=True), host)


def pair_rows(codes: np.ndarray) -> np.ndarray:
    """4-bit codes uint8 [O, I] (O even) -> the "nib" bytes [O/2, I]: row o low, row o + O/2 high."""
    O = codes.shape[0]
    return codes[:O // 2] | (codes[O // 2:] << np.uint8(4))


def unpair_rows(q: np.ndarray) -> np.ndarray:
    """`pair_rows` undone: "nib" bytes [O/2, I] -> codes uint8 [O, I]."""
    return np.concatenate([q & 15, q >> 4])


def fuse_rows(ws: list, host: bool = False) -> QuantizedWeight | None:
    """Plain-layout weights -> one whose rows are theirs in order ([sum O, I]: one matmul and a
    split instead of one matmul each, for matrices that read the same input), in the grouped
    layout; None unless all are QuantizedWeights of one format and width whose fused shape can
    be grouped. Exact: codes, scales and biases are moved, not changed (4-bit row pairs are
    re-paired as the fused shape needs), and the kernel computes each output row alone."""
    if not all(isinstance(w, QuantizedWeight) and not w.grouped for w in ws):
        return None
    w0 = ws[0]
    if any((w.kind, w.sub, w.off, w.bias is None, w.shape[1]) != (w0.kind, w0.sub, w0.off, w0.bias is None,
                                                                  w0.shape[1]) for w in ws):
        return None
    O, I = sum(w.shape[0] for w in ws), w0.shape[1]
    if not groupable(w0.kind, O, I) or (w0.kind == "nib" and O % 2):
        return None
    if w0.kind == "nib":   # [O/2, I] byte pairs -> codes [O, I] -> the fused shape's pairs
        q = pair_rows(np.concatenate([unpair_rows(np.asarray(w.q)) for w in ws]))
    else:
        q = np.concatenate([np.asarray(w.q) for w in ws])
    scale = np.concatenate([np.asarray(w.scale) for w in ws])
    bias = None if w0.bias is None else np.concatenate([np.asarray(w.bias) for w in ws])
    return group_layout(QuantizedWeight(q, scale, bias, w0.kind, w0.sub, w0.off), host=host)


def split_rows(w: QuantizedWeight, widths: tuple[int, ...]) -> list[QuantizedWeight]:
    """`fuse_rows` undone: w's rows in consecutive parts of `widths` rows, each plain-layout
    (4-bit parts re-paired for their own shape)."""
    p = w.plain()
    q, scale = np.asarray(p.q), np.asarray(p.scale)
    bias = None if p.bias is None else np.asarray(p.bias)
    codes = unpair_rows(q) if p.kind == "nib" else q                                       # [O, I]
    out, o = [], 0
    for n in widths:
        c = codes[o:o + n]
        pq = pair_rows(c) if p.kind == "nib" else c
        out.append(QuantizedWeight(to_device(pq), to_device(scale[o:o + n]),
                                   None if bias is None else to_device(bias[o:o + n]), p.kind, p.sub, p.off))
        o += n
    return out


def grouped_where_possible(w, host: bool = False):
    """A plain-layout weight in the grouped layout where its shape allows (else as it is)."""
    if isinstance(w, QuantizedWeight) and not w.grouped and groupable(w.kind, *w.shape):
        return group_layout(w, host=host)
    return w
