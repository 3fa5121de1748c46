"""Weights as the runtime holds them, and the one helper that multiplies by them.

Residency is chosen in one place (`prepare_weight`): "dense" dequantizes on load to a
float array [out, in]; "quantized" keeps the block codes resident as a `QuantizedWeight`
and dequantizes inside the jitted matmul. Model code only calls `linear` and
`embed_rows`, so it never branches on the weight's kind.

How `linear` multiplies (chosen per call from static facts: backend, weight kind, rows of x;
the figures behind each choice come from `scripts/probe_qmatmul.py`):

- Decode, batches and short prefills on CPU (quantized: rows <= KERNEL_MAX_ROWS = 256;
  dense f32: rows <= KERNEL_MAX_ROWS_DENSE = 8):
  an XLA custom call (`jax.ffi`) into a small AVX-512 C++ kernel. It reads each weight row
  once, forms 16 weights at a time in registers (int8 or 4-bit codes -> f32, one FMA with
  the sub-block's scale and bias), FMAs them with up to 8 activation rows, and splits the
  rows over XLA's intra-op thread pool. In a decode step (a chain of dependent matmuls)
  XLA:CPU's own formulations were 3-10x slower: a dequantize fused into the dot runs as a
  single-threaded loop, and inside the real model XLA materializes the dequantized f32
  matrix every step.
- More rows (long prefills), quantized: the kernel dequantizes to f32 (bit-exact, threaded),
  then XLA's GEMM; dense: XLA's GEMM directly. Prefill is compute-bound; the GEMM dominates.
- No kernel (not CPU, no g++ or AVX-512, WOOLLY_QMATMUL_KERNEL=0): dequantize in XLA, then
  `x @ W.T`. Correct everywhere, but quantized decode is then several times slower than dense.

The kernel is compiled from the source below with the machine's g++ (-march=native) on first
use, into ~/.cache/woolly/kernels (or WOOLLY_KERNEL_CACHE), keyed by source, jax version and
CPU; later processes load the cached .so.

Quantized layout (`QuantizedWeight`): every GGUF block format is first decoded to the
affine form w = scale * q + bias per sub-block of 16 or 32 weights (woolly.formats.quants).
Formats whose codes span at most 16 values (Q4_0, Q4_1, Q4_K, Q3_K, Q2_K) keep 4-bit codes
c = q + off packed two per byte, pairing row o (low nibble) with row o + O/2 (high nibble)
so one byte load feeds two output rows; the rest (Q5_*, Q6_K, Q8_0) keep int8 codes.
Scales and biases stay f32 per sub-block, so `dequantize` reproduces
`woolly.formats.quants.dequantize` bit for bit.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from woolly.formats.quants import QuantizationType, decode_blocks

RESIDENCIES = ("dense", "quantized")

# Rows of x up to which the CPU kernel multiplies. Quantized: the kernel beat dequantize +
# GEMM at every measured shape up to 128 rows (it reads 4/8-bit codes once per 8 rows instead
# of writing and re-reading an f32 copy); above, (kernel) dequantize + XLA GEMM. Dense f32:
# the kernel wins up to ~8 rows, XLA's GEMM beyond.
KERNEL_MAX_ROWS = int(os.environ.get("WOOLLY_KERNEL_MAX_ROWS", "256"))
KERNEL_MAX_ROWS_DENSE = int(os.environ.get("WOOLLY_KERNEL_MAX_ROWS_DENSE", "8"))
# Below this many multiply-adds (rows capped at 8) the kernel stays on one thread.
KERNEL_MIN_PARALLEL = 1 << 16

# Code offsets for the formats packed as 4-bit codes: c = q + off lies in [0, 15].
_NIBBLE_OFFSET = {
    QuantizationType.Q4_0: 8,
    QuantizationType.Q4_1: 0,
    QuantizationType.Q4_K: 0,
    QuantizationType.Q3_K: 4,
    QuantizationType.Q2_K: 0,
}


@jax.tree_util.register_pytree_node_class
@dataclass
class QuantizedWeight:
    """A block-quantized [O, I] matrix kept as codes plus per-sub-block scale (and bias).

    w[o, i] = scale[o, i // sub] * (code(o, i) - off) + bias[o, i // sub], where
    kind "i8":  code(o, i) = q[o, i]                       q: int8  [O, I]
    kind "nib": code(o, i) = q[o, i] & 15      (o < O/2)   q: uint8 [O/2, I]
                code(o, i) = q[o - O/2, i] >> 4 (o >= O/2)
    scale, bias: f32 [O, I // sub]; bias is None for formats without an offset.
    """

    q: jax.Array
    scale: jax.Array
    bias: jax.Array | None
    kind: str = "i8"
    sub: int = 32
    off: int = 0

    def tree_flatten(self):
        return (self.q, self.scale, self.bias), (self.kind, self.sub, self.off)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def shape(self) -> tuple[int, int]:
        O = self.scale.shape[0]
        return (O, self.q.shape[-1])

    @property
    def dtype(self):
        return jnp.float32

    def codes(self) -> jax.Array:
        """Signed integer codes q = code - off, int32 [O, I]."""
        if self.kind == "nib":
            c = jnp.concatenate([self.q & 15, self.q >> 4], axis=0)
        else:
            c = self.q
        return c.astype(jnp.int32) - self.off

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The float matrix [O, I]; in f32 it equals `quants.dequantize` exactly."""
        return _dequantize_rows(self.codes(), self.scale, self.bias, self.sub).astype(dtype)


def _dequantize_rows(codes: jax.Array, scale: jax.Array, bias: jax.Array | None, sub: int) -> jax.Array:
    """codes int [N, I] with scale/bias [N, I/sub] -> f32 [N, I], in quants.dequantize's order."""
    N, I = codes.shape
    w = scale[:, :, None] * codes.reshape(N, I // sub, sub).astype(jnp.float32)
    if bias is not None:
        w = w + bias[:, :, None]
    return w.reshape(N, I)


def prepare_weight(raw: np.ndarray, qtype: QuantizationType, shape: tuple[int, int], residency: str,
                   dtype=jnp.float32):
    """Host bytes of a 2-D tensor -> what the runtime keeps on device for it."""
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
        packed = c[: O // 2] | (c[O // 2:] << np.uint8(4))
        return QuantizedWeight(jnp.asarray(packed), jnp.asarray(scale),
                               None if bias is None else jnp.asarray(bias), "nib", sub, off)
    return QuantizedWeight(jnp.asarray(np.ascontiguousarray(q)), jnp.asarray(scale),
                           None if bias is None else jnp.asarray(bias), "i8", sub, 0)


def resident_nbytes(w) -> int:
    """Bytes a prepared weight (or any pytree of them) keeps resident on its device."""
    return int(sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(w)))


def linear(x: jax.Array, w) -> jax.Array:
    """x [..., I] times w [O, I] transposed -> [..., O], for a dense or quantized w."""
    lead, I = x.shape[:-1], x.shape[-1]
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


# ----------------------------------------------------------------------------------------
# The CPU kernel: source, build on first use, registration with XLA.

_KERNEL_SOURCE = r"""
// Woolly's CPU matvec for block-quantized weights (see woolly/ops/qmatmul.py).
// y[r, o] = sum_i x[r, i] * w[o, i],  w[o, i] = scale[o, i/SUB] * (code - off) (+ bias[o, i/SUB])
// kind 0: int8 codes [O, I]; kind 1: row-pair nibbles uint8 [O/2, I] (row o low, row o+O/2
// high); kind 2: dense f32 weights [O, I] (scale, bias unused).
#if !defined(__AVX512F__) || !defined(__AVX512BW__)
#error "woolly qmatvec kernel needs AVX-512 (F, BW)"
#endif
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>
#include <immintrin.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Job {
  const float* x;
  const uint8_t* q;
  const float* s;
  const float* b;
  float* y;
  int64_t R, I, O, off;
};

template <int KIND, int HALF>
static inline __m512 codes16(const uint8_t* q, int64_t e) {
  if (KIND == 0)
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + e))));
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + e));
  if (HALF) v = _mm_srli_epi16(v, 4);
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(v, _mm_set1_epi8(15))));
}

// One weight row o against RB activation rows from r0. Each sub-block's weights are formed
// in registers as w = code * s + (bias - off * s) (one FMA per 16 weights), then one FMA
// per 16 weights and activation row; two accumulators per row keep the FMA chains short.
template <int KIND, int HALF, int SUB, bool BIAS, int RB>
static inline void one_row(const Job& J, const uint8_t* q, int64_t o, int64_t r0) {
  const int64_t I = J.I, nsub = I / SUB;
  const float* s = J.s + o * nsub;
  const float* b = BIAS ? J.b + o * nsub : nullptr;
  const float offf = (float)J.off;
  __m512 acc0[RB], acc1[RB];
  for (int r = 0; r < RB; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  auto wts = [&](int64_t sb, const __m512 c) {
    const float sv = s[sb];
    const float bv = (BIAS ? b[sb] : 0.f) - offf * sv;
    return _mm512_fmadd_ps(c, _mm512_set1_ps(sv), _mm512_set1_ps(bv));
  };
  int64_t sb = 0;
  if (SUB == 32) {
    for (; sb < nsub; ++sb) {
      const int64_t e = sb * 32;
      const __m512 w0 = wts(sb, codes16<KIND, HALF>(q, e));
      const __m512 w1 = wts(sb, codes16<KIND, HALF>(q, e + 16));
      for (int r = 0; r < RB; ++r) {
        const float* xr = J.x + (r0 + r) * I + e;
        acc0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), acc0[r]);
        acc1[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), acc1[r]);
      }
    }
  } else {
    for (; sb + 2 <= nsub; sb += 2) {
      const int64_t e = sb * 16;
      const __m512 w0 = wts(sb, codes16<KIND, HALF>(q, e));
      const __m512 w1 = wts(sb + 1, codes16<KIND, HALF>(q, e + 16));
      for (int r = 0; r < RB; ++r) {
        const float* xr = J.x + (r0 + r) * I + e;
        acc0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), acc0[r]);
        acc1[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), acc1[r]);
      }
    }
    for (; sb < nsub; ++sb) {
      const int64_t e = sb * 16;
      const __m512 w0 = wts(sb, codes16<KIND, HALF>(q, e));
      for (int r = 0; r < RB; ++r)
        acc0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(J.x + (r0 + r) * I + e), acc0[r]);
    }
  }
  for (int r = 0; r < RB; ++r) J.y[(r0 + r) * J.O + o] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r]));
}

// Dense f32 row o against RB activation rows.
template <int RB>
static inline void one_row_f32(const Job& J, int64_t o, int64_t r0) {
  constexpr int U = RB >= 4 ? 1 : 4 / RB;
  const int64_t I = J.I;
  const float* w = reinterpret_cast<const float*>(J.q) + o * I;
  __m512 acc[RB][U];
  for (int r = 0; r < RB; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = _mm512_setzero_ps();
  int64_t e = 0;
  for (; e + 16 * U <= I; e += 16 * U)
    for (int u = 0; u < U; ++u) {
      const __m512 wv = _mm512_loadu_ps(w + e + 16 * u);
      for (int r = 0; r < RB; ++r)
        acc[r][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(J.x + (r0 + r) * I + e + 16 * u), acc[r][u]);
    }
  for (; e < I; e += 16) {
    const __m512 wv = _mm512_loadu_ps(w + e);
    for (int r = 0; r < RB; ++r) acc[r][0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(J.x + (r0 + r) * I + e), acc[r][0]);
  }
  for (int r = 0; r < RB; ++r) {
    __m512 t = acc[r][0];
    for (int u = 1; u < U; ++u) t = _mm512_add_ps(t, acc[r][u]);
    J.y[(r0 + r) * J.O + o] = _mm512_reduce_add_ps(t);
  }
}

template <int KIND, int SUB, bool BIAS, int RB>
static void rows_any(const Job& J, int64_t a, int64_t z, int64_t r0) {
  if (KIND == 0) {
    for (int64_t o = a; o < z; ++o) one_row<0, 0, SUB, BIAS, RB>(J, J.q + o * J.I, o, r0);
  } else if (KIND == 1) {
    const int64_t H = J.O / 2;
    for (int64_t p = a; p < z; ++p) {
      one_row<1, 0, SUB, BIAS, RB>(J, J.q + p * J.I, p, r0);
      one_row<1, 1, SUB, BIAS, RB>(J, J.q + p * J.I, p + H, r0);
    }
  } else {
    for (int64_t o = a; o < z; ++o) one_row_f32<RB>(J, o, r0);
  }
}

template <int KIND, int SUB, bool BIAS>
static void run_range(const Job& J, int64_t a, int64_t z) {
  int64_t r = 0;
  auto go = [&](auto rb) {
    constexpr int RB = decltype(rb)::value;
    rows_any<KIND, SUB, BIAS, RB>(J, a, z, r);
    r += RB;
  };
  while (J.R - r >= 8) go(std::integral_constant<int, 8>());
  if (J.R - r >= 4) go(std::integral_constant<int, 4>());
  if (J.R - r >= 2) go(std::integral_constant<int, 2>());
  if (J.R - r >= 1) go(std::integral_constant<int, 1>());
}

using RangeFn = void (*)(const Job&, int64_t, int64_t);

// Dequantize rows [a, z) (row pairs for kind 1) to f32 y [O, I]: scale * (code - off) (+ bias),
// multiply then add (compiled with -ffp-contract=off), as woolly.formats.quants.dequantize.
template <int KIND, int HALF, int SUB, bool BIAS>
static inline void deq_row(const Job& J, const uint8_t* q, int64_t o) {
  const int64_t I = J.I, nsub = I / SUB;
  const __m512 offv = _mm512_set1_ps((float)J.off);
  float* y = J.y + o * I;
  for (int64_t e = 0; e < I; e += 16) {
    const __m512 c = _mm512_sub_ps(codes16<KIND, HALF>(q, e), offv);  // small integers: exact
    __m512 w = _mm512_mul_ps(_mm512_set1_ps(J.s[o * nsub + e / SUB]), c);
    if (BIAS) w = _mm512_add_ps(w, _mm512_set1_ps(J.b[o * nsub + e / SUB]));
    _mm512_storeu_ps(y + e, w);
  }
}

template <int KIND, int SUB, bool BIAS>
static void deq_range(const Job& J, int64_t a, int64_t z) {
  if (KIND == 0) {
    for (int64_t o = a; o < z; ++o) deq_row<0, 0, SUB, BIAS>(J, J.q + o * J.I, o);
  } else {
    const int64_t H = J.O / 2;
    for (int64_t p = a; p < z; ++p) {
      deq_row<1, 0, SUB, BIAS>(J, J.q + p * J.I, p);
      deq_row<1, 1, SUB, BIAS>(J, J.q + p * J.I, p + H);
    }
  }
}

static RangeFn pick_deq(int64_t kind, int64_t sub, bool bias) {
#define W_PICK(K, S) \
  if (kind == K && sub == S) return bias ? deq_range<K, S, true> : deq_range<K, S, false>;
  W_PICK(0, 16) W_PICK(0, 32) W_PICK(1, 16) W_PICK(1, 32)
#undef W_PICK
  return nullptr;
}

static RangeFn pick(int64_t kind, int64_t sub, bool bias) {
#define W_PICK(K, S) \
  if (kind == K && sub == S) return bias ? run_range<K, S, true> : run_range<K, S, false>;
  W_PICK(0, 16) W_PICK(0, 32) W_PICK(1, 16) W_PICK(1, 32)
#undef W_PICK
  if (kind == 2) return run_range<2, 16, false>;
  return nullptr;
}

// Work is split in units of rows claimed from a shared counter: the calling thread and
// the tasks it schedules on XLA's intra-op pool all claim units, so the call never waits
// on a task that has not started (it only waits for units already being computed).
struct Shared {
  Job job;
  RangeFn fn = nullptr;
  int64_t total = 0, units = 0, per = 1;
  std::atomic<int64_t> next{0}, done{0};
  void work() {
    for (;;) {
      const int64_t u = next.fetch_add(1, std::memory_order_relaxed);
      if (u >= units) return;
      const int64_t a = u * per, z = a + per < total ? a + per : total;
      fn(job, a, z);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Split sp's rows over the calling thread and XLA's intra-op pool; returns when all are done.
static void run_parallel(ffi::ThreadPool& pool, const std::shared_ptr<Shared>& sp, bool parallel) {
  int64_t nt = parallel ? pool.num_threads() : 1;
  if (nt < 1) nt = 1;
  const int64_t want = nt == 1 ? 1 : nt * 4;  // a few units per thread: a busy core holds back less
  sp->per = (sp->total + want - 1) / want;
  if (sp->per < 1) sp->per = 1;
  sp->units = (sp->total + sp->per - 1) / sp->per;
  for (int64_t t = 1; t < nt && t < sp->units; ++t) pool.Schedule([sp]() { sp->work(); });
  sp->work();
  int spins = 0;
  while (sp->done.load(std::memory_order_acquire) < sp->units) {
    _mm_pause();
    if (++spins > 2048) std::this_thread::yield();
  }
}

}  // namespace

static ffi::Error QMatVecImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer q,
                              ffi::Buffer<ffi::F32> s, ffi::Buffer<ffi::F32> b,
                              ffi::ResultBuffer<ffi::F32> y, int64_t kind, int64_t sub, int64_t off,
                              int64_t has_bias, int64_t min_par) {
  auto xd = x.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 2 || yd.size() != 2 || yd[0] != xd[0])
    return ffi::Error::InvalidArgument("woolly_qmatvec: x [R, I] and y [R, O] expected");
  const int64_t R = xd[0], I = xd[1], O = yd[1];
  if (I % 16 != 0) return ffi::Error::InvalidArgument("woolly_qmatvec: I must be a multiple of 16");
  if (kind != 2) {
    auto sd = s.dimensions();
    if ((sub != 16 && sub != 32) || I % sub != 0 || sd.size() != 2 || sd[0] != O || sd[1] != I / sub ||
        (kind == 1 && O % 2 != 0))
      return ffi::Error::InvalidArgument("woolly_qmatvec: bad scale shape or sub-block");
  }
  RangeFn fn = pick(kind, sub, has_bias != 0);
  if (fn == nullptr) return ffi::Error::InvalidArgument("woolly_qmatvec: unsupported kind/sub");
  if (R == 0 || O == 0) return ffi::Error::Success();
  auto sp = std::make_shared<Shared>();
  sp->job = Job{x.typed_data(), static_cast<const uint8_t*>(q.untyped_data()), s.typed_data(),
                has_bias ? b.typed_data() : nullptr, y->typed_data(), R, I, O, off};
  sp->fn = fn;
  sp->total = kind == 1 ? O / 2 : O;
  run_parallel(pool, sp, O * I * (R < 8 ? R : 8) >= min_par);
  return ffi::Error::Success();
}

static ffi::Error DequantImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::Buffer<ffi::F32> s,
                              ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> y, int64_t kind,
                              int64_t sub, int64_t off, int64_t has_bias) {
  auto yd = y->dimensions();
  auto sd = s.dimensions();
  if (yd.size() != 2) return ffi::Error::InvalidArgument("woolly_dequant: y [O, I] expected");
  const int64_t O = yd[0], I = yd[1];
  if (I % 16 != 0 || (sub != 16 && sub != 32) || I % sub != 0 || sd.size() != 2 || sd[0] != O ||
      sd[1] != I / sub || (kind == 1 && O % 2 != 0))
    return ffi::Error::InvalidArgument("woolly_dequant: bad shapes");
  RangeFn fn = pick_deq(kind, sub, has_bias != 0);
  if (fn == nullptr) return ffi::Error::InvalidArgument("woolly_dequant: unsupported kind/sub");
  if (O == 0) return ffi::Error::Success();
  auto sp = std::make_shared<Shared>();
  sp->job = Job{nullptr, static_cast<const uint8_t*>(q.untyped_data()), s.typed_data(),
                has_bias ? b.typed_data() : nullptr, y->typed_data(), 0, I, O, off};
  sp->fn = fn;
  sp->total = kind == 1 ? O / 2 : O;
  run_parallel(pool, sp, O * I >= (1 << 16));
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(WoollyDequant, DequantImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kind")
                                  .Attr<int64_t>("sub")
                                  .Attr<int64_t>("off")
                                  .Attr<int64_t>("has_bias"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(WoollyQMatVec, QMatVecImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kind")
                                  .Attr<int64_t>("sub")
                                  .Attr<int64_t>("off")
                                  .Attr<int64_t>("has_bias")
                                  .Attr<int64_t>("min_par"));
"""

_TARGET = "woolly_qmatvec"
_DEQUANT_TARGET = "woolly_dequant"
_kernel_lock = threading.Lock()
_kernel_state: dict = {}  # "ok": bool once decided, "error": why not


def _cpu_tag() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor()


def _build_kernel() -> str:
    """Compile the kernel (once per source, jaxlib and CPU) and return the .so path."""
    cxx = os.environ.get("CXX", "g++")
    inc = jax.ffi.include_dir()
    flags = ["-O3", "-march=native", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC", "-w"]
    key = hashlib.sha256("\0".join([_KERNEL_SOURCE, jax.__version__, inc, cxx, " ".join(flags), _cpu_tag(),
                                    sys.platform, platform.machine()]).encode()).hexdigest()[:16]
    root = os.environ.get("WOOLLY_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "woolly", "kernels")
    so = os.path.join(root, f"qmatvec-{key}.so")
    if os.path.exists(so):
        return so
    try:
        os.makedirs(root, exist_ok=True)
    except OSError:  # read-only home: build in the temp dir instead
        root = os.path.join(tempfile.gettempdir(), f"woolly-kernels-{os.getuid()}")
        so = os.path.join(root, f"qmatvec-{key}.so")
        if os.path.exists(so):
            return so
        os.makedirs(root, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        src = os.path.join(tmp, "qmatvec.cc")
        with open(src, "w") as f:
            f.write(_KERNEL_SOURCE)
        out = os.path.join(tmp, "qmatvec.so")
        r = subprocess.run([cxx, *flags, f"-I{inc}", src, "-o", out], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {r.stderr.strip()[-2000:]}")
        os.replace(out, so)  # atomic: concurrent builders agree on the result
    return so


def kernel_available() -> bool:
    """Whether the CPU kernel is built and registered (builds it on first call)."""
    if "ok" in _kernel_state:
        return _kernel_state["ok"]
    with _kernel_lock:
        if "ok" in _kernel_state:
            return _kernel_state["ok"]
        ok = False
        if os.environ.get("WOOLLY_QMATMUL_KERNEL", "1") in ("0", "false", "no", "off"):
            _kernel_state["error"] = "disabled by WOOLLY_QMATMUL_KERNEL"
        elif platform.machine().lower() not in ("x86_64", "amd64"):
            _kernel_state["error"] = f"no kernel for {platform.machine()}"
        else:
            try:
                lib = ctypes.cdll.LoadLibrary(_build_kernel())
                jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.WoollyQMatVec), platform="cpu")
                jax.ffi.register_ffi_target(_DEQUANT_TARGET, jax.ffi.pycapsule(lib.WoollyDequant), platform="cpu")
                _kernel_state["lib"] = lib
                ok = True
            except Exception as e:  # no compiler, no AVX-512, ...: the XLA path still works
                _kernel_state["error"] = f"{type(e).__name__}: {e}"
                warnings.warn(f"woolly: CPU matvec kernel unavailable, using XLA only ({_kernel_state['error']})",
                              RuntimeWarning, stacklevel=3)
        _kernel_state["ok"] = ok
        return ok


def _use_kernel(w, I: int) -> bool:
    if I % 16 != 0 or jax.default_backend() != "cpu":
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
                     has_bias=np.int64(w.bias is not None))
    else:
        dummy = jnp.zeros((1,), jnp.float32)
        args = (x2, w, dummy.reshape(1, 1), dummy)
        attrs = dict(kind=np.int64(2), sub=np.int64(16), off=np.int64(0), has_bias=np.int64(0))
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
                off=np.int64(w.off), has_bias=np.int64(w.bias is not None))
