"""Weights as the runtime holds them, and the one helper that multiplies by them.

Residency is chosen in one place (`prepare_weight`): "dense" dequantizes on load to a
float array [out, in]; "quantized" keeps the block codes resident as a `QuantizedWeight`
and dequantizes inside the jitted matmul. Model code only calls `linear` and
`embed_rows`, so it never branches on the weight's kind.

How `linear` multiplies (chosen per call from static facts: backend, weight kind, rows of x;
the figures behind each choice come from `scripts/probe_qmatmul.py`):

- Decode, batches and prefill chunks on CPU (quantized: rows <= KERNEL_MAX_ROWS = 512;
  dense f32: rows <= KERNEL_MAX_ROWS_DENSE = 8):
  an XLA custom call (`jax.ffi`) into a small AVX-512 C++ kernel that splits the weight
  rows over XLA's intra-op thread pool. Quantized weights, by default: x is rounded to int8
  per block of 32 (as llama.cpp does) and multiplied with VNNI integer dot products on the
  grouped layout (see QuantizedWeight), where each int32 lane is one weight row, so the
  float work is once per sub-block for 16 rows. With f32 activations it forms 16 weights
  at a time in registers (exact). In a decode step (a chain of dependent matmuls) XLA:CPU's
  own formulations were 3-10x slower: a dequantize fused into the dot runs as a
  single-threaded loop, and inside the real model XLA materializes the dequantized f32
  matrix every step.
- More rows (long prefills), quantized: the kernel dequantizes to f32 (bit-exact, threaded),
  then XLA's GEMM; dense: XLA's GEMM directly. Prefill is compute-bound; the GEMM dominates.
- Quantized weights on a GPU: the Pallas (Triton) kernel in `pallas_qmatmul.py`, which forms
  weights tile by tile in registers and never writes the f32 matrix to HBM.
- No kernel (not CPU, no g++ or AVX-512, WOOLLY_QMATMUL_KERNEL=0): dequantize in XLA, then
  `x @ W.T`. Correct everywhere, but quantized decode is then several times slower than dense.

The kernel's source is `kernels/qmatvec.cc`; `woolly.ops.cpu_kernels` compiles it with the
machine's g++ (-march=native) on first use into ~/.cache/woolly/kernels (or
WOOLLY_KERNEL_CACHE), keyed by source, jax version and CPU; later processes load the cached .so.

Quantized layout (`QuantizedWeight`): every GGUF block format is first decoded to the
affine form w = scale * q + bias per sub-block of 16 or 32 weights (woolly.formats.quants).
Formats whose codes span at most 16 values (Q4_0, Q4_1, Q4_K, Q3_K, Q2_K) keep 4-bit codes
c = q + off packed two per byte, pairing row o (low nibble) with row o + O/2 (high nibble)
so one byte load feeds two output rows; the rest (Q5_*, Q6_K, Q8_0) keep int8 codes.
Scales and biases stay f32 per sub-block, so `dequantize` reproduces
`woolly.formats.quants.dequantize` bit for bit. Where the CPU kernel multiplies with int8
activations, weights are stored grouped (16 rows per dword column, `group_layout`); every
other reader (dequantize, embedding rows, sharding, f32 activations) sees them plain.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from woolly.formats.quants import QuantizationType, decode_blocks
from woolly.ops import cpu_kernels

RESIDENCIES = ("dense", "quantized")

# Rows of x up to which the CPU kernel multiplies. Quantized: with int8 activations on the
# grouped layout the kernel beat dequantize + XLA GEMM at every size up to a whole prefill
# chunk (512 rows: Gemma-3 prefill 1330 vs 810 tok/s, SmolLM2 1180 vs 730, measured);
# above, (kernel) dequantize + XLA GEMM. Dense f32: the kernel wins up to ~8 rows, XLA's
# GEMM beyond.
KERNEL_MAX_ROWS = int(os.environ.get("WOOLLY_KERNEL_MAX_ROWS", "512"))
KERNEL_MAX_ROWS_DENSE = int(os.environ.get("WOOLLY_KERNEL_MAX_ROWS_DENSE", "8"))
# Below this many multiply-adds (rows capped at 8) the kernel stays on one thread.
KERNEL_MIN_PARALLEL = 1 << 16
# How the kernel multiplies quantized weights: "q8" rounds activations to int8 per block of 32
# (scale max|x|/127, llama.cpp's Q8_0 rule) and uses AVX512-VNNI integer dot products, as
# llama.cpp does for these formats; "f32" forms each weight in f32 (exact W @ x, slower).
ACTIVATIONS = os.environ.get("WOOLLY_QMATMUL_ACTIVATIONS", "q8")
if ACTIVATIONS not in ("q8", "f32"):
    raise ValueError(f"WOOLLY_QMATMUL_ACTIVATIONS must be q8 or f32, got {ACTIVATIONS!r}")

# Code offsets for the formats packed as 4-bit codes: c = q + off lies in [0, 15].
_NIBBLE_OFFSET = {
    QuantizationType.Q4_0: 8,
    QuantizationType.Q4_1: 0,
    QuantizationType.Q4_K: 0,
    QuantizationType.Q3_K: 4,
    QuantizationType.Q2_K: 0,
}


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
        return _dequantize_rows(w.codes(), w.scale, w.bias, w.sub).astype(dtype)


# A dataclass pytree is flattened by jax's C++ dispatch itself; a Python tree_flatten was
# called for each of ~200 weights on every decode step (~1 ms of a ~15 ms 8-slot step).
jax.tree_util.register_dataclass(QuantizedWeight, data_fields=["q", "scale", "bias"],
                                 meta_fields=["kind", "sub", "off", "grouped"])


def groupable(kind: str, O: int, I: int) -> bool:
    """Whether an [O, I] weight of this kind can take the grouped layout."""
    units = O // 2 if kind == "nib" else O
    return I % 64 == 0 and units % 16 == 0 and units > 0


def group_layout(w: QuantizedWeight) -> QuantizedWeight:
    """w (plain, host-side arrays) in the grouped layout; see QuantizedWeight."""
    q, scale, bias = np.asarray(w.q), np.asarray(w.scale), None if w.bias is None else np.asarray(w.bias)
    U, I = q.shape
    G, NR, nsub = U // 16, 2 if w.kind == "nib" else 1, scale.shape[1]
    words = np.ascontiguousarray(q).view(np.uint32).reshape(G, 16, I // 4)      # 4 codes per word
    qg = np.ascontiguousarray(words.transpose(0, 2, 1)).view(q.dtype).reshape(U, I)

    def groups(a):  # [O, nsub] = [NR, G, 16, nsub] -> [G, NR, nsub, 16]
        return None if a is None else a.reshape(NR, G, 16, nsub).transpose(1, 0, 3, 2).reshape(-1, nsub)
    return QuantizedWeight(jnp.asarray(qg), jnp.asarray(np.ascontiguousarray(groups(scale))),
                           None if bias is None else jnp.asarray(np.ascontiguousarray(groups(bias))),
                           w.kind, w.sub, w.off, grouped=True)


def pair_rows(codes: np.ndarray) -> np.ndarray:
    """4-bit codes uint8 [O, I] (O even) -> the "nib" bytes [O/2, I]: row o low, row o + O/2 high."""
    O = codes.shape[0]
    return codes[:O // 2] | (codes[O // 2:] << np.uint8(4))


def unpair_rows(q: np.ndarray) -> np.ndarray:
    """`pair_rows` undone: "nib" bytes [O/2, I] -> codes uint8 [O, I]."""
    return np.concatenate([q & 15, q >> 4])


def fuse_rows(ws: list) -> QuantizedWeight | None:
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
    return group_layout(QuantizedWeight(q, scale, bias, w0.kind, w0.sub, w0.off))


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
        out.append(QuantizedWeight(jnp.asarray(pq), jnp.asarray(scale[o:o + n]),
                                   None if bias is None else jnp.asarray(bias[o:o + n]), p.kind, p.sub, p.off))
        o += n
    return out


def grouped_where_possible(w):
    """A plain-layout weight in the grouped layout where its shape allows (else as it is)."""
    if isinstance(w, QuantizedWeight) and not w.grouped and groupable(w.kind, *w.shape):
        return group_layout(w)
    return w


def kernel_groups_weights() -> bool:
    """Whether quantized weights prepared now should take the grouped layout: the CPU kernel
    multiplies them with int8 activations (ACTIVATIONS "q8", AVX512-VNNI)."""
    return (ACTIVATIONS == "q8" and jax.default_backend() == "cpu" and cpu_kernels.in_use()
            and kernel_available() and _cpu_has_vnni())


def _dequantize_rows(codes: jax.Array, scale: jax.Array, bias: jax.Array | None, sub: int) -> jax.Array:
    """codes int [N, I] with scale/bias [N, I/sub] -> f32 [N, I], in quants.dequantize's order."""
    N, I = codes.shape
    w = scale[:, :, None] * codes.reshape(N, I // sub, sub).astype(jnp.float32)
    if bias is not None:
        w = w + bias[:, :, None]
    return w.reshape(N, I)


def prepare_weight(raw: np.ndarray, qtype: QuantizationType, shape: tuple[int, int], residency: str,
                   dtype=jnp.float32, grouped: bool | None = None):
    """Host bytes of a 2-D tensor -> what the runtime keeps on device for it. `grouped`: a
    quantized weight in the CPU kernel's grouped layout where its shape allows; None: exactly
    when the CPU kernel multiplies with int8 activations here (the fast path)."""
    from woolly.formats.quants import dequantize

    if residency not in RESIDENCIES:
        raise ValueError(f"residency must be one of {RESIDENCIES}, got {residency!r}")
    qtype = QuantizationType(qtype)
    if residency == "dense" or not qtype.is_quantized:
        return jnp.asarray(dequantize(raw, qtype, shape), dtype=dtype)
    O, I = shape
    q, scale, bias = decode_blocks(np.ascontiguousarray(raw).reshape(-1, qtype.type_size), qtype)
    sub = q.shape[1] // scale.shape[1]
    q = q.reshape(O, I)
    scale = np.ascontiguousarray(scale.reshape(O, I // sub))
    bias = None if bias is None else np.ascontiguousarray(bias.reshape(O, I // sub))
    off = _NIBBLE_OFFSET.get(qtype)
    if off is not None and O % 2 == 0:
        c = q.astype(np.int16) + off
        if c.min() < 0 or c.max() > 15:  # not expected from these formats; stay exact regardless
            raise ValueError(f"{qtype.name} codes outside the 4-bit range after offset {off}")
        c = c.astype(np.uint8)
        w = QuantizedWeight(pair_rows(c), scale, bias, "nib", sub, off)
    else:
        w = QuantizedWeight(np.ascontiguousarray(q), scale, bias, "i8", sub, 0)       # host arrays so far
    if grouped is None:
        grouped = kernel_groups_weights()
    if grouped and groupable(w.kind, O, I):
        return group_layout(w)
    return QuantizedWeight(jnp.asarray(w.q), jnp.asarray(w.scale), None if bias is None else jnp.asarray(bias),
                           w.kind, w.sub, w.off)


def resident_nbytes(w) -> int:
    """Bytes a prepared weight (or any pytree of them) keeps resident on its device."""
    return int(sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(w)))


def linear(x: jax.Array, w) -> jax.Array:
    """x [..., I] times w [O, I] transposed -> [..., O], for a dense or quantized w."""
    lead, I = x.shape[:-1], x.shape[-1]
    if isinstance(w, QuantizedWeight) and jax.default_backend() == "gpu" and cpu_kernels.in_use():
        from woolly.ops.pallas_qmatmul import pallas_linear, pallas_supported   # imports this module

        if pallas_supported(w, I):
            return pallas_linear(x, w)   # codes stay codes in GPU memory (woolly/ops/pallas_qmatmul.py)
    rows = int(np.prod(lead)) if lead else 1
    O = w.shape[0]
    max_rows = KERNEL_MAX_ROWS if isinstance(w, QuantizedWeight) else KERNEL_MAX_ROWS_DENSE
    if 0 < rows <= max_rows and _use_kernel(w, I):
        y = _kernel_matmul(x.reshape(rows, I).astype(jnp.float32), w)
        return y.reshape(*lead, O).astype(x.dtype)
    if isinstance(w, QuantizedWeight):
        w = _kernel_dequantize(w).astype(x.dtype) if _use_kernel(w, I) else w.dequantize(x.dtype)
    return jnp.einsum("...i,oi->...o", x, w)


def embed_rows(w, ids: jax.Array) -> jax.Array:
    """Rows of w [V, D] at ids [...] -> [..., D]."""
    if not isinstance(w, QuantizedWeight):
        return w[ids]
    V, D = w.shape
    flat = ids.reshape(-1)
    if w.grouped:
        return _embed_grouped(w, flat).reshape(*ids.shape, D)
    bias = None if w.bias is None else w.bias[flat]
    if w.kind == "nib":
        H = V // 2
        hi = flat >= H
        byte = w.q[jnp.where(hi, flat - H, flat)]                                       # [N, D]
        codes = jnp.where(hi[:, None], byte >> 4, byte & 15).astype(jnp.int32) - w.off
    else:
        codes = w.q[flat].astype(jnp.int32)
    rows = _dequantize_rows(codes, w.scale[flat], bias, w.sub)
    return rows.reshape(*ids.shape, D)


def _embed_grouped(w: QuantizedWeight, flat: jax.Array) -> jax.Array:
    """Rows `flat` [N] of a grouped weight, read in place (no plain copy of the matrix) -> [N, D]."""
    U, D = w.q.shape
    NR, nsub = (2, w.scale.shape[1]) if w.kind == "nib" else (1, w.scale.shape[1])
    h = flat // U if NR == 2 else jnp.zeros_like(flat)          # which half of a row pair
    p = flat - h * U                                             # row (pair)
    g, i = p // 16, p % 16
    q = w.q.reshape(U // 16, D // 4, 16, 4)[g, :, i, :].reshape(-1, D)                    # [N, D]
    if w.kind == "nib":
        codes = jnp.where((h == 1)[:, None], q >> 4, q & 15).astype(jnp.int32) - w.off
    else:
        codes = q.astype(jnp.int32)

    def rows(a):
        return None if a is None else a.reshape(U // 16, NR, nsub, 16)[g, h, :, i]      # [N, nsub]
    return _dequantize_rows(codes, rows(w.scale), rows(w.bias), w.sub)


# ----------------------------------------------------------------------------------------
# The CPU kernel (kernels/qmatvec.cc): registration with XLA and the calls into it.

_TARGET = "woolly_qmatvec"
_DEQUANT_TARGET = "woolly_dequant"


def kernel_available() -> bool:
    """Whether the CPU kernel (kernels/qmatvec.cc) is built and registered (builds it on first call)."""
    return cpu_kernels.load_kernel("qmatvec", {_TARGET: "WoollyQMatVec", _DEQUANT_TARGET: "WoollyDequant"})


def kernel_error() -> str | None:
    """Why the CPU kernel is not in use, if it is not."""
    return cpu_kernels.kernel_error("qmatvec")


def _cpu_has_vnni() -> bool:
    return "avx512_vnni" in cpu_kernels.cpu_tag()


def uses_q8_activations(w, rows: int, I: int) -> bool:
    """Whether `linear` rounds x to int8 for this weight and row count (see ACTIVATIONS);
    the kernel does exactly when this holds."""
    return (isinstance(w, QuantizedWeight) and ACTIVATIONS == "q8" and 0 < rows <= KERNEL_MAX_ROWS
            and I % 64 == 0 and _use_kernel(w, I) and _cpu_has_vnni())


def q8_activations(x: np.ndarray) -> np.ndarray:
    """Host reference of the kernel's activation rounding: x f32 [R, I] (I % 32 == 0) rounded
    per block of 32 to d * q, d = max|x| / 127, q = round-half-even(x / d) (llama.cpp's Q8_0)."""
    R, I = x.shape
    b = x.astype(np.float32).reshape(R, I // 32, 32)
    d = np.abs(b).max(axis=-1, keepdims=True) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    q = np.clip(np.rint(b * inv), -127, 127)
    return (d * q).reshape(R, I).astype(np.float32)


def _use_kernel(w, I: int) -> bool:
    if I % 16 != 0 or jax.default_backend() != "cpu" or not cpu_kernels.in_use():
        return False
    if isinstance(w, QuantizedWeight):
        if w.sub not in (16, 32) or I % w.sub != 0:
            return False
    elif getattr(w, "dtype", None) != jnp.float32 or getattr(w, "ndim", 0) != 2:
        return False
    return kernel_available()


def _kernel_call(x2: jax.Array, w) -> jax.Array:
    """x2 f32 [R, I] @ w.T through the CPU kernel -> f32 [R, O]."""
    R = x2.shape[0]
    O = w.shape[0]
    if isinstance(w, QuantizedWeight):
        args = (x2, w.q, w.scale, w.bias if w.bias is not None else jnp.zeros((1,), jnp.float32))
        attrs = dict(kind=np.int64(1 if w.kind == "nib" else 0), sub=np.int64(w.sub), off=np.int64(w.off),
                     has_bias=np.int64(w.bias is not None), grouped=np.int64(w.grouped),
                     act=np.int64(ACTIVATIONS == "q8" and x2.shape[1] % 64 == 0))
    else:
        dummy = jnp.zeros((1,), jnp.float32)
        args = (x2, w, dummy.reshape(1, 1), dummy)
        attrs = dict(kind=np.int64(2), sub=np.int64(16), off=np.int64(0), has_bias=np.int64(0), act=np.int64(0),
                     grouped=np.int64(0))
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((R, O), jnp.float32), vmap_method="sequential")
    return call(*args, min_par=np.int64(KERNEL_MIN_PARALLEL), **attrs)


@jax.custom_jvp
def _kernel_matmul(x2: jax.Array, w) -> jax.Array:
    """`_kernel_call` made differentiable (a custom call has no derivative of its own), so
    `jax.grad` works through decode-sized inputs: the tangent is two ordinary matmuls.
    Gradients reach activations and dense weights; quantized codes and scales are constants."""
    return _kernel_call(x2, w)


@_kernel_matmul.defjvp
def _kernel_matmul_jvp(primals, tangents):
    x2, w = primals
    dx, dw = tangents
    dense = w.dequantize() if isinstance(w, QuantizedWeight) else w                  # [O, I]
    dy = dx @ dense.T                                                                 # [R, O]
    if not isinstance(w, QuantizedWeight):
        dy = dy + x2 @ dw.T
    return _kernel_call(x2, w), dy


def _kernel_dequantize(w: QuantizedWeight) -> jax.Array:
    """w's f32 matrix [O, I] through the CPU kernel (bit-identical to `w.dequantize()`)."""
    O, I = w.shape
    call = jax.ffi.ffi_call(_DEQUANT_TARGET, jax.ShapeDtypeStruct((O, I), jnp.float32), vmap_method="sequential")
    b = w.bias if w.bias is not None else jnp.zeros((1,), jnp.float32)
    return call(w.q, w.scale, b, kind=np.int64(1 if w.kind == "nib" else 0), sub=np.int64(w.sub),
                off=np.int64(w.off), has_bias=np.int64(w.bias is not None), grouped=np.int64(w.grouped))
