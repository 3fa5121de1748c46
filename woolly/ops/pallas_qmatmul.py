"""Quantized matmul on GPU: a Pallas (Triton) kernel that multiplies by a `QuantizedWeight`
without ever materializing its float matrix in HBM.

y = x @ W.T for x [R, I] (f32 or bf16) and W a `QuantizedWeight` [O, I] of either kind:
each program owns a tile of output columns (weight rows), walks I in steps of BK, loads the
codes ([BO, BK] uint8 or int8), their scales (and biases) ([BO, BK/sub]), forms the f32
weights in registers as w = scale * (code - off) + bias and multiplies them into f32
accumulators. For kind "nib" one byte tile feeds two output tiles: rows o (low nibble) and
o + O/2 (high nibble). Scales, biases and y are viewed as [P, O/P] / [R, P, O/P] (P = 2 for
"nib", 1 for "i8"; free reshapes) so one BlockSpec gives a program both halves.

Two shapes of program, chosen by the static row count R:
- R <= GEMV_MAX_ROWS (decode): every row of x in one program; per row a broadcast multiply and
  a row sum over the tile (f32 FMAs; a tensor-core dot would pad M to 16).
- R > GEMV_MAX_ROWS (prefill): R in blocks of BR (16..64) on a second grid axis, one `jnp.dot`
  per tile: bf16 x -> bf16 weights, tensor cores, f32 accumulation (rounding as the XLA path
  `w.dequantize(bf16)` then matmul); f32 x -> TF32x3 on tensor cores (three TF32 products,
  ~f32 accuracy; WOOLLY_PALLAS_F32_DOT=ieee for plain f32 FMAs, =tf32 for one TF32 product).
  Interpret mode (CPU) always uses an f32 dot at HIGHEST.

Tiles (for an H200: 132 SMs, 4.8 TB/s; memory-bound at decode, so tiles aim at enough
programs to fill the SMs and at <= ~64 f32 weights a thread in registers with 4 warps):
  BK  = the largest power of two dividing I, at most 128 (GEMV) / 64 (bf16 dot) / 32 (f32 dot);
        a multiple of sub, so no K masking (I = 576 -> 64, 640 -> 128, 1536/2048 -> 128).
  BO  = the largest power of two dividing O/P, at most 64/P (GEMV) / 64 (dot), at least 16,
        so no O masking; for GEMV halved (down to 16) while that gives fewer than
        GEMV_MIN_PROGRAMS programs, since a small matrix (576 rows: 9 programs of 64) would
        leave most of the 132 SMs idle (SmolLM2 vocab 49152 Q8_0 -> 768 programs of 64).
  BR  = GEMV: R itself (rows are loaded one at a time, so any count works); dot: the next
        power of two >= R, between 16 and 64, x padded with zero rows to a multiple of BR.
  4 warps a program (8 for a bf16 "nib" dot tile, which feeds two 64-wide outputs), 3 stages.
  Checked without a GPU (`scripts/gpu_pallas_check.py --offline-triton`): every path compiles
  with Triton 3.9 to sm_90a cubin without register spills.
Shapes outside this (O/P not a multiple of 16, I not a multiple of 16 and sub, sub not 16 or
32) are refused by `pallas_supported`; the caller falls back to XLA. Triton needs
power-of-two tiles, hence the divisibility rules instead of masks.

The kernel is tested on CPU in interpret mode (`interpret=True`) against the numpy reference
(tests/test_pallas_qmatmul.py), and its Triton lowering is checked there too;
scripts/gpu_pallas_check.py runs it natively and measures it against XLA on a GPU.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from woolly.ops.quantized_weight import QuantizedWeight

GEMV_MAX_ROWS = 8        # rows of x up to which one program holds every row (decode)
GEMV_MIN_PROGRAMS = 128  # GEMV output tiles shrink (to 16 rows) until there are this many
_GEMV_BO, _GEMV_BK = 64, 128   # per program: BO weight rows (split over the P parts) x BK
_DOT_BO, _DOT_BR = 64, 64
_DOT_BK = {"bf16": 64, "f32": 32}   # f32 (TF32x3) tiles need more registers: half the K step
_MIN_BO = 16             # smallest output tile (a Triton dot needs N >= 16)
_NUM_WARPS = 4           # 8 for "nib" dot tiles (two 64-wide output tiles a program)
_NUM_STAGES = 3          # Triton software pipelining of the K loop (prefill)
_F32_DOTS = {"tf32x3": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
             "ieee": jax.lax.DotAlgorithmPreset.F32_F32_F32,
             "tf32": jax.lax.DotAlgorithmPreset.TF32_TF32_F32}
F32_DOT = os.environ.get("WOOLLY_PALLAS_F32_DOT", "tf32x3")
if F32_DOT not in _F32_DOTS:
    raise ValueError(f"WOOLLY_PALLAS_F32_DOT must be one of {sorted(_F32_DOTS)}, got {F32_DOT!r}")


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two that divides n, at most cap."""
    b = 1
    while b < cap and n % (2 * b) == 0:
        b *= 2
    return b


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _parts(w: QuantizedWeight) -> int:
    return 2 if w.kind == "nib" else 1


def pallas_supported(w, I: int) -> bool:
    """Whether `pallas_linear` handles w [O, I] (else the caller falls back to XLA)."""
    if (not isinstance(w, QuantizedWeight) or w.kind not in ("nib", "i8") or w.sub not in (16, 32)
            or w.grouped):   # the CPU kernel's layout (not made on a GPU backend)
        return False
    O = w.shape[0]
    P = _parts(w)
    if w.shape[1] != I or I % 16 != 0 or I % w.sub != 0 or O % P != 0:
        return False
    return (O // P) % _MIN_BO == 0


def _tiles(R: int, Oh: int, I: int, P: int, bf16: bool) -> tuple[bool, int, int, int, int]:
    """(gemv, BR, R padded, BO, BK) for R rows, Oh = O/P weight rows per part, I inputs."""
    if R <= GEMV_MAX_ROWS:
        bo = max(_MIN_BO, _pow2_divisor(Oh, _GEMV_BO // P))
        while bo > _MIN_BO and Oh // bo < GEMV_MIN_PROGRAMS:
            bo //= 2
        return True, R, R, bo, _pow2_divisor(I, _GEMV_BK)
    br = min(_DOT_BR, max(16, _next_pow2(R)))
    bk = _pow2_divisor(I, _DOT_BK["bf16" if bf16 else "f32"])
    return False, br, -(-R // br) * br, _pow2_divisor(Oh, _DOT_BO), bk


def _num_warps(P: int, gemv: bool, bf16: bool) -> int:
    return 2 * _NUM_WARPS if (P == 2 and not gemv and bf16) else _NUM_WARPS


def _kernel(*refs, P: int, sub: int, off: int, has_bias: bool, gemv: bool, BR: int, BK: int, nk: int,
            f32_dot):
    """One program: y[rows, :, cols] for every part p (refs: x, q, scale[, bias], y)."""
    if has_bias:
        x_ref, q_ref, s_ref, b_ref, y_ref = refs
    else:
        x_ref, q_ref, s_ref, y_ref = refs
        b_ref = None
    BO = q_ref.shape[0]
    ns = BK // sub

    def weights(k, k0):
        """The f32 weight tiles [BO, BK] of each part for columns k0 = k*BK .. k0+BK."""
        q = q_ref[:, pl.ds(k0, BK)]                                          # [BO, BK]
        if P == 2:
            codes, base = [q & 15, q >> 4], 0
        else:   # int8 -> c + 128 in [0, 255]
            codes, base = [jax.lax.bitcast_convert_type(q, jnp.uint8) ^ jnp.uint8(0x80)], 128
        out = []
        for p, c in enumerate(codes):
            # code -> f32 without an int-to-float conversion (quarter rate on the GPU): the
            # byte as the low mantissa bits of 2^23, then subtract 2^23 (+ base + off); exact.
            c = jax.lax.bitcast_convert_type(c.astype(jnp.uint32) | jnp.uint32(0x4B000000), jnp.float32)
            c = c - float((1 << 23) + base + off)
            s = s_ref[p, :, pl.ds(k * ns, ns)]                                 # [BO, ns]
            s = jnp.broadcast_to(s[:, :, None], (BO, ns, sub)).reshape(BO, BK)
            w = s * c
            if has_bias:
                b = b_ref[p, :, pl.ds(k * ns, ns)]
                w = w + jnp.broadcast_to(b[:, :, None], (BO, ns, sub)).reshape(BO, BK)
            out.append(w)
        return out

    if gemv:
        def body(k, acc):                     # acc: P*BR vectors [BO]
            k0 = pl.multiple_of(k * BK, BK)
            ws = weights(k, k0)
            acc = list(acc)
            for r in range(BR):
                xr = x_ref[r, pl.ds(k0, BK)].astype(jnp.float32)                # [BK]
                for p in range(P):
                    acc[p * BR + r] = acc[p * BR + r] + jnp.sum(ws[p] * xr[None, :], axis=1)
            return tuple(acc)

        init = tuple(jnp.zeros((BO,), jnp.float32) for _ in range(P * BR))
        acc = jax.lax.fori_loop(0, nk, body, init)
        for p in range(P):
            for r in range(BR):
                y_ref[r, p, :] = acc[p * BR + r].astype(y_ref.dtype)
        return

    bf16 = x_ref.dtype == jnp.bfloat16

    def body(k, acc):                         # acc: P arrays [BR, BO]
        k0 = pl.multiple_of(k * BK, BK)
        x = x_ref[:, pl.ds(k0, BK)]                                              # [BR, BK]
        ws = weights(k, k0)
        out = []
        for p in range(P):
            if bf16:
                d = jnp.dot(x, ws[p].astype(jnp.bfloat16).T, preferred_element_type=jnp.float32)
            else:
                d = jnp.dot(x.astype(jnp.float32), ws[p].T, precision=f32_dot,
                            preferred_element_type=jnp.float32)
            out.append(acc[p] + d)                                               # [BR, BO]
        return tuple(out)

    init = tuple(jnp.zeros((BR, BO), jnp.float32) for _ in range(P))
    acc = jax.lax.fori_loop(0, nk, body, init)
    for p in range(P):
        y_ref[:, p, :] = acc[p].astype(y_ref.dtype)


def _pallas_call(x2: jax.Array, w: QuantizedWeight, interpret: bool) -> jax.Array:
    """x2 [R, I] @ w.T -> [R, O] in x2's dtype, through the kernel."""
    R, I = x2.shape
    O = w.shape[0]
    P = _parts(w)
    Oh = O // P
    gemv, BR, Rp, BO, BK = _tiles(R, Oh, I, P, x2.dtype == jnp.bfloat16)
    num_warps = _num_warps(P, gemv, x2.dtype == jnp.bfloat16)
    if Rp != R:
        x2 = jnp.pad(x2, ((0, Rp - R), (0, 0)))                                  # [Rp, I]
    nsub = I // w.sub
    has_bias = w.bias is not None
    operands = [x2, w.q, w.scale.reshape(P, Oh, nsub)]                          # q: [Oh, I]
    if gemv:
        grid = (Oh // BO,)
        xmap, wmap, smap, ymap = (lambda j: (0, 0)), (lambda j: (j, 0)), (lambda j: (0, j, 0)), \
            (lambda j: (0, 0, j))
    else:
        grid = (Oh // BO, Rp // BR)
        xmap, wmap, smap, ymap = (lambda j, i: (i, 0)), (lambda j, i: (j, 0)), (lambda j, i: (0, j, 0)), \
            (lambda j, i: (i, 0, j))
    in_specs = [pl.BlockSpec((BR, I), xmap), pl.BlockSpec((BO, I), wmap), pl.BlockSpec((P, BO, nsub), smap)]
    if has_bias:
        operands.append(w.bias.reshape(P, Oh, nsub))
        in_specs.append(pl.BlockSpec((P, BO, nsub), smap))
    kernel = functools.partial(_kernel, P=P, sub=w.sub, off=int(w.off), has_bias=has_bias, gemv=gemv,
                               BR=BR, BK=BK, nk=I // BK,
                               f32_dot=jax.lax.Precision.HIGHEST if interpret else _F32_DOTS[F32_DOT])
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((Rp, P, Oh), x2.dtype),
        grid=grid,
        in_specs=in_specs,
        out_specs=pl.BlockSpec((BR, P, BO), ymap),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=_NUM_STAGES),
        interpret=interpret,
        name=f"woolly_qmatmul_{w.kind}{w.sub}",
    )(*operands)                                                                   # [Rp, P, Oh]
    return y.reshape(Rp, O)[:R]


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _pallas_matmul(x2: jax.Array, w: QuantizedWeight, interpret: bool) -> jax.Array:
    """`_pallas_call` made differentiable in x (a pallas_call has no transpose rule): the
    tangent is an ordinary matmul by the dequantized weight; codes and scales are constants."""
    return _pallas_call(x2, w, interpret)


@_pallas_matmul.defjvp
def _pallas_matmul_jvp(interpret, primals, tangents):
    x2, w = primals
    dx, _ = tangents
    dense = w.dequantize(jnp.float32)                                             # [O, I]
    dy = jnp.dot(dx.astype(jnp.float32), dense.T, precision=jax.lax.Precision.HIGHEST)
    return _pallas_call(x2, w, interpret), dy.astype(x2.dtype)


def pallas_linear(x: jax.Array, w: QuantizedWeight, *, interpret: bool = False) -> jax.Array:
    """x [..., I] times w [O, I] transposed -> [..., O] in x's dtype (computed in bf16 or f32).
    Requires `pallas_supported(w, I)`; `interpret=True` runs the kernel on CPU (tests)."""
    lead, I = x.shape[:-1], x.shape[-1]
    if not pallas_supported(w, I):
        raise ValueError(f"pallas_linear does not handle {w.kind} sub={w.sub} weight {w.shape} with I={I}")
    dtype = x.dtype
    if dtype not in (jnp.float32, jnp.bfloat16):
        x = x.astype(jnp.float32)
    R = 1
    for d in lead:
        R *= d
    if R == 0:
        return jnp.zeros((*lead, w.shape[0]), dtype)
    y = _pallas_matmul(x.reshape(R, I), w, interpret)                             # [R, O]
    return y.reshape(*lead, w.shape[0]).astype(dtype)
