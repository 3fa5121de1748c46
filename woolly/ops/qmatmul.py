"""Weights as the runtime holds them, and the one helper that multiplies by them.

Residency is chosen in one place (`prepare_weight`): "dense" dequantizes on load to a
float array [out, in]; "quantized" keeps the block codes resident as a `QuantizedWeight`
and dequantizes inside the jitted matmul. Model code only calls `linear` and
`embed_rows`, so it never branches on the weight's kind.

How `linear` multiplies (chosen per call from static facts: backend, weight kind, rows of x;
the figures behind each choice come from `scripts/probe_qmatmul.py`):

- Decode, batches and prefill chunks on CPU (quantized: rows <= KERNEL_MAX_ROWS = 512;
  dense f32: rows <= KERNEL_MAX_ROWS_DENSE = 8):
  an XLA custom call (`jax.ffi`) into a small C++ kernel (AVX-512; AVX2, NEON through SIMDe:
  see cpu_kernels.isa) that splits the weight
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
- No kernel (not CPU, no g++, WOOLLY_QMATMUL_KERNEL=0): dequantize in XLA, then
  `x @ W.T`. Correct everywhere, but quantized decode is then several times slower than dense.

The kernel's source is `kernels/qmatvec.cc`; `woolly.ops.cpu_kernels` compiles it with the
machine's g++ (-march=native) on first use into ~/.cache/woolly/kernels (or
WOOLLY_KERNEL_CACHE), keyed by source, jax version and CPU; later processes load the cached .so.

Quantized layout (`QuantizedWeight`, in `quantized_weight.py`): every GGUF block format is first decoded to the
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

import jax
import jax.numpy as jnp
import numpy as np

from woolly.formats.quants import QuantizationType, decode_blocks
from woolly.ops import cpu_kernels
from woolly.ops.quantized_weight import (  # noqa: F401  (re-exported: the weight lives there)
    QuantizedWeight, _placed, dequantize_rows, fuse_rows, group_layout, groupable, grouped_where_possible, pair_rows,
    split_rows, to_device, unpair_rows)

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




def kernel_groups_weights() -> bool:
    """Whether quantized weights prepared now should take the grouped layout: the CPU kernel
    multiplies them with int8 activations (ACTIVATIONS "q8", AVX512-VNNI or its SIMDe form)."""
    return (ACTIVATIONS == "q8" and jax.default_backend() == "cpu" and cpu_kernels.in_use()
            and kernel_available() and _cpu_has_vnni())




def prepare_weight(raw: np.ndarray, qtype: QuantizationType, shape: tuple[int, int], residency: str,
                   dtype=jnp.float32, grouped: bool | None = None, host: bool = False):
    """Host bytes of a 2-D tensor -> what the runtime keeps on device for it. `grouped`: a
    quantized weight in the CPU kernel's grouped layout where its shape allows; None: exactly
    when the CPU kernel multiplies with int8 activations here (the fast path). `host`: the
    same arrays left in numpy (the caller places them; `to_device` / `jax.device_put`)."""
    from woolly.formats.quants import dequantize

    if residency not in RESIDENCIES:
        raise ValueError(f"residency must be one of {RESIDENCIES}, got {residency!r}")
    qtype = QuantizationType(qtype)
    if residency == "dense" or not qtype.is_quantized:
        dense = np.asarray(dequantize(raw, qtype, shape), dtype=np.dtype(dtype))
        return dense if host else to_device(dense)
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
        return group_layout(w, host=host)
    return _placed(w, host)


def resident_nbytes(w) -> int:
    """Bytes a prepared weight (or any pytree of them) keeps resident on its device."""
    return int(sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(w)))


def linear(x: jax.Array, w) -> jax.Array:
    """x [..., I] times w [O, I] transposed -> [..., O], for a dense or quantized w."""
    lead, I = x.shape[:-1], x.shape[-1]
    if isinstance(w, QuantizedWeight) and jax.default_backend() == "gpu" and cpu_kernels.in_use():
        from woolly.ops.pallas_qmatmul import pallas_linear, pallas_supported   # lazy: Pallas/Triton is GPU-only

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
    rows = dequantize_rows(codes, w.scale[flat], bias, w.sub)
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
    return dequantize_rows(codes, rows(w.scale), rows(w.bias), w.sub)


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
    return cpu_kernels.has_int8_dot()


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
