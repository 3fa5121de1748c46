// Woolly's CPU matvec for block-quantized weights (see woolly/ops/qmatmul.py; built by woolly/ops/cpu_kernels.py).
// y[r, o] = sum_i x[r, i] * w[o, i],  w[o, i] = scale[o, i/SUB] * (code - off) (+ bias[o, i/SUB])
// kind 0: int8 codes [O, I]; kind 1: row-pair nibbles uint8 [O/2, I] (row o low, row o+O/2
// high); kind 2: dense f32 weights [O, I] (scale, bias unused).
// act 0: f32 activations (exact: weights formed in f32); act 1 (codes, I % 64 == 0, AVX512-VNNI or AVX2):
// int8 activations, as llama.cpp multiplies its quantized weights (see "int8 activations" below).
// grouped: codes, scales and biases in the grouped layout (see "The grouped layout" below).
#include <algorithm>
#include <cstring>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>
#include "simd.h"

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

namespace ffi = xla::ffi;

namespace {

// The template instance of FN<kind, sub, bias> for the runtime values (kinds 0/1, sub-blocks
// of 16/32), returned from the enclosing function; falls through when there is none.
#define PICK_KIND_SUB(FN)                                                                         \
  do {                                                                                            \
    if (kind == 0 && sub == 16) return bias ? FN<0, 16, true> : FN<0, 16, false>;                 \
    if (kind == 0 && sub == 32) return bias ? FN<0, 32, true> : FN<0, 32, false>;                 \
    if (kind == 1 && sub == 16) return bias ? FN<1, 16, true> : FN<1, 16, false>;                 \
    if (kind == 1 && sub == 32) return bias ? FN<1, 32, true> : FN<1, 32, false>;                 \
  } while (0)

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
  float* y = J.y + o * I;
#if defined(WOOLLY_AVX2)   // the same operations per element, 8 at a time
  const __m256 off8 = _mm256_set1_ps((float)J.off);
  for (int64_t e = 0; e < I; e += 8) {
    __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + e));
    __m256i ci;
    if (KIND == 0) {
      ci = _mm256_cvtepi8_epi32(v);
    } else {
      if (HALF) v = _mm_srli_epi16(v, 4);
      ci = _mm256_cvtepu8_epi32(_mm_and_si128(v, _mm_set1_epi8(15)));
    }
    __m256 w = _mm256_mul_ps(_mm256_set1_ps(J.s[o * nsub + e / SUB]), _mm256_sub_ps(_mm256_cvtepi32_ps(ci), off8));
    if (BIAS) w = _mm256_add_ps(w, _mm256_set1_ps(J.b[o * nsub + e / SUB]));
    _mm256_storeu_ps(y + e, w);
  }
#else
  const __m512 offv = _mm512_set1_ps((float)J.off);
  for (int64_t e = 0; e < I; e += 16) {
    const __m512 c = _mm512_sub_ps((codes16<KIND, HALF>(q, e)), offv);  // small integers: exact
    __m512 w = _mm512_mul_ps(_mm512_set1_ps(J.s[o * nsub + e / SUB]), c);
    if (BIAS) w = _mm512_add_ps(w, _mm512_set1_ps(J.b[o * nsub + e / SUB]));
    _mm512_storeu_ps(y + e, w);
  }
#endif
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
  PICK_KIND_SUB(deq_range);
  return nullptr;
}

static RangeFn pick(int64_t kind, int64_t sub, bool bias) {
  PICK_KIND_SUB(run_range);
  if (kind == 2) return run_range<2, 16, false>;
  return nullptr;
}



// ---- The grouped layout (QuantizedWeight.grouped in woolly/ops/qmatmul.py). Weights whose
// rows (kind 0) or row pairs (kind 1) come in groups of 16, with I % 64 == 0, are stored with
// each group's codes transposed in dwords: bytes q[g * 16 * I + (col * 16 + i) * 4 + t] are
// code bytes 4 * col + t of row (pair) 16g + i, so one 64-byte load is one dword column of 16
// rows; scale and bias likewise as [G][NR][nsub][16] (NR = 2 for row pairs: half h = 0 is row
// p, h = 1 row p + O/2). The int8-activation product below reads this layout directly; the
// row-by-row paths (f32 activations, dequantize) first copy a group back to plain rows.

// In-register transpose of 16 rows of 16 dwords: four stages, each swapping one bit of the
// row index with the same bit of the column index (two-source permutes).
struct TransposeIdx {
  __m512i lo[4], hi[4];
  TransposeIdx() {
    for (int k = 0; k < 4; ++k) {
      alignas(64) int32_t a[16], b[16];
      const int bit = 1 << k;
      for (int c = 0; c < 16; ++c) {
        a[c] = (c & bit) ? 16 + (c & ~bit) : c;    // new row r0: r0's own, or r1's shifted down
        b[c] = (c & bit) ? 16 + c : (c | bit);     // new row r1: r0's shifted up, or r1's own
      }
      lo[k] = _mm512_load_si512(a);
      hi[k] = _mm512_load_si512(b);
    }
  }
};

static inline void transpose16(__m512i m[16]) {
  static const TransposeIdx T;
  for (int k = 0; k < 4; ++k) {
    const int bit = 1 << k;
    for (int r0 = 0; r0 < 16; ++r0) {
      if (r0 & bit) continue;
      const __m512i a = m[r0], b = m[r0 | bit];
      m[r0] = _mm512_permutex2var_epi32(a, T.lo[k], b);
      m[r0 | bit] = _mm512_permutex2var_epi32(a, T.hi[k], b);
    }
  }
}

#if defined(WOOLLY_AVX2)
// In-register transpose of 8 rows of 8 dwords (moved as floats: bits unchanged).
static inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int k = 0; k < 4; ++k) {
    t[2 * k] = _mm256_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm256_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 2; ++k) {   // pairs (t0, t2), (t1, t3) and (t4, t6), (t5, t7)
    u[4 * k] = _mm256_shuffle_ps(t[4 * k], t[4 * k + 2], 0x44);
    u[4 * k + 1] = _mm256_shuffle_ps(t[4 * k], t[4 * k + 2], 0xEE);
    u[4 * k + 2] = _mm256_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0x44);
    u[4 * k + 3] = _mm256_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {
    r[k] = _mm256_permute2f128_ps(u[k], u[k + 4], 0x20);
    r[k + 4] = _mm256_permute2f128_ps(u[k], u[k + 4], 0x31);
  }
}
#endif

// Group g in plain layout: codes [16, I] (rows or row pairs) and scale/bias [NR * 16, nsub]
// (half h's row i at h * 16 + i), the operands of a 16-row (pair) matrix with O' = NR * 16.
struct PlainGroup {
  std::vector<uint8_t> q;
  std::vector<float> s, b;
};

static void ungroup(const uint8_t* q, const float* s, const float* b, int64_t NR, int64_t g, int64_t I,
                    int64_t nsub, PlainGroup& p) {
  p.q.resize(16 * I);
  p.s.resize(NR * 16 * nsub);
  const uint8_t* qg = q + g * 16 * I;
#if defined(WOOLLY_AVX2)   // four 8x8 transposes per 16x16 block (rows hi, columns jh)
  for (int64_t c = 0; c < I / 64; ++c)
    for (int hi = 0; hi < 2; ++hi)
      for (int jh = 0; jh < 2; ++jh) {
        __m256 m[8];   // m[j]: dwords of rows 8hi .. 8hi + 7 in column 16c + 8jh + j
        for (int j = 0; j < 8; ++j) m[j] = _mm256_loadu_ps(reinterpret_cast<const float*>(qg + (c * 16 + jh * 8 + j) * 64 + hi * 32));
        transpose8(m);   // m[i]: row 8hi + i's dwords 8jh .. 8jh + 7 of this block
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(reinterpret_cast<float*>(p.q.data() + (hi * 8 + i) * I + c * 64 + jh * 32), m[i]);
      }
#else
  for (int64_t c = 0; c < I / 64; ++c) {
    __m512i m[16];
    for (int j = 0; j < 16; ++j) m[j] = _mm512_loadu_si512(qg + (c * 16 + j) * 64);
    transpose16(m);   // m[i]: bytes 64c .. 64c + 63 of row (pair) i
    for (int i = 0; i < 16; ++i) _mm512_storeu_si512(p.q.data() + i * I + c * 64, m[i]);
  }
#endif
  auto rows = [&](const float* src, std::vector<float>& dst) {
    const float* sg = src + g * NR * nsub * 16;
    for (int64_t h = 0; h < NR; ++h)
      for (int64_t sb = 0; sb < nsub; ++sb)
        for (int64_t i = 0; i < 16; ++i) dst[(h * 16 + i) * nsub + sb] = sg[(h * nsub + sb) * 16 + i];
  };
  rows(s, p.s);
  if (b != nullptr) {
    p.b.resize(NR * 16 * nsub);
    rows(b, p.b);
  }
}

// Output row of group g's local row o' (= h * 16 + i) in the whole matrix of O rows.
static inline int64_t group_row(int64_t NR, int64_t O, int64_t g, int64_t local) {
  return NR == 2 && local >= 16 ? 16 * g + local - 16 + O / 2 : 16 * g + local;
}

// For each group (in parallel): its plain copy, then f(g, plain group).
template <class F>
static void each_plain_group(ffi::ThreadPool& pool, const uint8_t* q, const float* s, const float* b,
                             int64_t NR, int64_t G, int64_t I, int64_t nsub, bool par, F f) {
  woolly::run_parallel(pool, G, par, [&](int64_t a, int64_t z) {
    thread_local PlainGroup p;
    for (int64_t g = a; g < z; ++g) {
      ungroup(q, s, b, NR, g, I, nsub, p);
      f(g, p);
    }
  });
}

// ---- int8 activations (llama.cpp's way): x is quantized per block of 32 to int8 (scale d =
// max|x|/127, as llama.cpp's Q8_0/Q8_1), and each 64-weight chunk becomes one VNNI dot
// product of unsigned 4/8-bit codes with the int8 activations: 16 int32 lanes of 4 products,
// lanes 0-7 one sub-block of 32 (or 0-3, 4-7, ... one of 16). Then per chunk one f32 FMA with
// scale * d per lane. The offset and bias enter once per sub-block through the sums of the
// quantized x: y = sum_sb scale * d * dot(code, xq) + (bias - K * scale) * d * sum(xq),
// K = off (nibbles) or off + 128 (int8 codes, made unsigned by flipping the sign bit).
// The result is W times the Q8-rounded x, in f32.
#if defined(__AVX512VNNI__) || defined(WOOLLY_PORTABLE)   // SIMDe: VNNI from AVX2/NEON integer dots
#define WOOLLY_Q8 1

struct Q8Job {
  const int8_t* xq;   // [R, I]
  const float* dxv;   // [R, I/64, 16]: each lane's activation scale
  const float* xs;    // [R, NSP]: d * sum(xq) per sub-block, zero-padded to NSP (multiple of 16)
  const int32_t* xsi; // [R, NSP]: sum(xq) per sub-block (the AVX2 int8-code product's correction)
  const uint8_t* q;
  const float* s;
  const float* b;
  float* y;
  int64_t R, I, O, nsub, nsp, K;
};

#if defined(WOOLLY_AVX2)
static inline int32_t woolly_hsum_epi32(__m256i v) {   // exact in any order
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1)));
}
static inline float woolly_hmax_ps(__m256 v) {   // exact in any order (no NaN in x)
  __m128 t = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  t = _mm_max_ps(t, _mm_movehl_ps(t, t));
  return _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
}
#endif

static void quantize_x(const float* x, int64_t R, int64_t I, int SUB, int8_t* xq, float* dxv, float* xs,
                       int32_t* xsi, int64_t nsp) {
  const int64_t nch = I / 64, nblk = I / 32;
  for (int64_t r = 0; r < R; ++r) {
    float* xsr = xs + r * nsp;
    int32_t* xir = xsi + r * nsp;
    for (int64_t j = 0; j < nsp; ++j) xsr[j] = 0.f, xir[j] = 0;
    for (int64_t k = 0; k < nblk; ++k) {
      const float* xb = x + r * I + k * 32;
#if defined(WOOLLY_AVX2)   // the same per-element operations, 8 lanes at a time
      __m256 a[4];
      const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
      for (int i = 0; i < 4; ++i) a[i] = _mm256_loadu_ps(xb + 8 * i);
      const float amax = woolly_hmax_ps(_mm256_max_ps(_mm256_max_ps(_mm256_and_ps(a[0], absm), _mm256_and_ps(a[1], absm)),
                                                      _mm256_max_ps(_mm256_and_ps(a[2], absm), _mm256_and_ps(a[3], absm))));
      const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
      __m256i qi[4];
      for (int i = 0; i < 4; ++i) qi[i] = _mm256_cvtps_epi32(_mm256_mul_ps(a[i], _mm256_set1_ps(id)));
      // signed saturation 32 -> 16 -> 8 bits (as vpmovsdb), then the 128-bit lanes' dwords in order
      const __m256i p8 = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + r * I + k * 32),
                          _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
      const int sa = woolly_hsum_epi32(_mm256_add_epi32(qi[0], qi[1]));
      const int sc = woolly_hsum_epi32(_mm256_add_epi32(qi[2], qi[3]));
#else
      const __m512 a = _mm512_loadu_ps(xb), c = _mm512_loadu_ps(xb + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(c)));
      const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
      const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(id)));
      const __m512i qc = _mm512_cvtps_epi32(_mm512_mul_ps(c, _mm512_set1_ps(id)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + r * I + k * 32), _mm512_cvtsepi32_epi8(qa));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + r * I + k * 32 + 16), _mm512_cvtsepi32_epi8(qc));
      const int sa = _mm512_reduce_add_epi32(qa), sc = _mm512_reduce_add_epi32(qc);
#endif
      if (SUB == 32) {
        xsr[k] = d * (float)(sa + sc);
        xir[k] = sa + sc;
      } else {
        xsr[2 * k] = d * (float)sa;
        xsr[2 * k + 1] = d * (float)sc;
        xir[2 * k] = sa, xir[2 * k + 1] = sc;
      }
      float* dv = dxv + (r * nch + k / 2) * 16 + (k % 2) * 8;
      for (int l = 0; l < 8; ++l) dv[l] = d;
    }
  }
}

// Weight row p (KIND 0) or row pair p, p + O/2 (KIND 1) against RB quantized activation rows.
template <int KIND, int SUB, bool BIAS, int RB>
static inline void q8_rows(const Q8Job& J, int64_t p, int64_t r0) {
  constexpr int NR = KIND == 1 ? 2 : 1;
  const int64_t I = J.I, nch = I / 64, nsub = J.nsub;
  const uint8_t* q = J.q + p * I;
  const int64_t orow[2] = {p, p + J.O / 2};
  const __m512i idx = SUB == 32 ? _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)
                                : _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  const __m512i m4 = _mm512_set1_epi8(15);
  __m512 acc[NR][RB];
  for (int h = 0; h < NR; ++h)
    for (int r = 0; r < RB; ++r) acc[h][r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < nch; ++c) {
    const __m512i v = _mm512_loadu_si512(q + c * 64);
    __m512i codes[NR];
    __m512 ws[NR];
    if (KIND == 1) {
      codes[0] = _mm512_and_si512(v, m4);
      codes[NR - 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
    } else {
      codes[0] = _mm512_xor_si512(v, _mm512_set1_epi8((char)0x80));
    }
    for (int h = 0; h < NR; ++h) {
      const float* sp = J.s + orow[h] * nsub + c * (64 / SUB);
      const __m128 s4 = SUB == 32 ? _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(sp))) : _mm_loadu_ps(sp);
      ws[h] = _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(s4));
    }
    for (int r = 0; r < RB; ++r) {
      const __m512i xv = _mm512_loadu_si512(J.xq + (r0 + r) * I + c * 64);
      const __m512 dv = _mm512_loadu_ps(J.dxv + ((r0 + r) * nch + c) * 16);
      for (int h = 0; h < NR; ++h) {
        const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes[h], xv);
        acc[h][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(ws[h], dv), acc[h][r]);
      }
    }
  }
  const __m512 kv = _mm512_set1_ps((float)J.K);
  for (int h = 0; h < NR; ++h) {
    const float* sr = J.s + orow[h] * nsub;
    const float* br = BIAS ? J.b + orow[h] * nsub : nullptr;
    for (int64_t sb = 0; sb < nsub; sb += 16) {   // the offset/bias term, formed once for all rows
      const __mmask16 m = nsub - sb >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (nsub - sb)) - 1);
      const __m512 s16 = _mm512_maskz_loadu_ps(m, sr + sb);
      const __m512 b16 = BIAS ? _mm512_maskz_loadu_ps(m, br + sb) : _mm512_setzero_ps();
      const __m512 t = _mm512_fnmadd_ps(kv, s16, b16);                       // bias - K * scale
      for (int r = 0; r < RB; ++r)
        acc[h][r] = _mm512_fmadd_ps(t, _mm512_loadu_ps(J.xs + (r0 + r) * J.nsp + sb), acc[h][r]);
    }
    for (int r = 0; r < RB; ++r) J.y[(r0 + r) * J.O + orow[h]] = _mm512_reduce_add_ps(acc[h][r]);
  }
}

// Weight rows [a, z) in tiles small enough to stay in L1/L2 while every block of up to 8
// activation rows passes over them (a tile is read from memory once, whatever R is).
template <int KIND, int SUB, bool BIAS>
static void q8_range(const Q8Job& J, int64_t a, int64_t z) {
  const int64_t tile = J.I <= 1024 ? 32 : 16;
  for (int64_t t0 = a; t0 < z; t0 += tile) {
    const int64_t t1 = t0 + tile < z ? t0 + tile : z;
    int64_t r = 0;
    auto go = [&](auto rb) {
      constexpr int RB = decltype(rb)::value;
      for (int64_t p = t0; p < t1; ++p) q8_rows<KIND, SUB, BIAS, RB>(J, p, r);
      r += RB;
    };
    while (J.R - r >= 8) go(std::integral_constant<int, 8>());
    if (J.R - r >= 4) go(std::integral_constant<int, 4>());
    if (J.R - r >= 2) go(std::integral_constant<int, 2>());
    if (J.R - r >= 1) go(std::integral_constant<int, 1>());
  }
}

using Q8Fn = void (*)(const Q8Job&, int64_t, int64_t);

static Q8Fn pick_q8(int64_t kind, int64_t sub, bool bias) {
  PICK_KIND_SUB(q8_range);
  return nullptr;
}

// The int8-activation product on the grouped layout: each int32 lane of a VNNI product belongs
// to one weight row, so a sub-block's whole integer dot product sits in one lane and the float
// work (convert, scale, FMA) is done once per sub-block for 16 rows, instead of once per 64
// weights per row as in q8_rows (which serves weights kept in the plain layout). Each y[r, o]
// is the same sequence of operations whatever R is and however rows are split into passes
// (integer sums are exact in any order; the float sums run over sub-blocks in order, then the
// offset terms in order), so a row's result does not depend on the other rows in the batch.
template <int KIND, int SUB, bool BIAS, int RB>
static inline void group_rows(const Q8Job& J, int64_t g, int64_t r0) {
  constexpr int NR = KIND == 1 ? 2 : 1, JS = SUB / 4;              // JS: dword columns per sub-block
  constexpr int CH = RB >= 4 ? 1 : (RB == 2 ? 2 : 4);              // independent dot chains per output
  const int64_t I = J.I, nch = I / 64, nsub = J.nsub;
  const uint8_t* qg = J.q + g * 16 * I;
  const float* sg = J.s + g * NR * nsub * 16;
  const float* bg = BIAS ? J.b + g * NR * nsub * 16 : nullptr;
  const __m512i m4 = _mm512_set1_epi8(15), flip = _mm512_set1_epi8((char)0x80);
  __m512 acc[NR][RB];
  for (int h = 0; h < NR; ++h)
    for (int r = 0; r < RB; ++r) acc[h][r] = _mm512_setzero_ps();
  for (int64_t sb = 0; sb < nsub; ++sb) {
    __m512i dot[NR][RB][CH];
    for (int h = 0; h < NR; ++h)
      for (int r = 0; r < RB; ++r)
        for (int u = 0; u < CH; ++u) dot[h][r][u] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int jj = 0; jj < JS; ++jj) {
      const int64_t col = sb * JS + jj;
      const __m512i t = _mm512_loadu_si512(qg + col * 64);
      __m512i code[NR];
      if (KIND == 1) {
        code[0] = _mm512_and_si512(t, m4);
        code[NR - 1] = _mm512_and_si512(_mm512_srli_epi16(t, 4), m4);
      } else {
        code[0] = _mm512_xor_si512(t, flip);   // int8 -> unsigned (K = off + 128)
      }
      for (int r = 0; r < RB; ++r) {
        int32_t x4;
        std::memcpy(&x4, J.xq + (r0 + r) * I + 4 * col, 4);
        const __m512i xb = _mm512_set1_epi32(x4);
        for (int h = 0; h < NR; ++h) dot[h][r][jj % CH] = _mm512_dpbusd_epi32(dot[h][r][jj % CH], code[h], xb);
      }
    }
    const int64_t blk = sb * SUB / 32;
    for (int r = 0; r < RB; ++r) {
      const __m512 d = _mm512_set1_ps(J.dxv[((r0 + r) * nch + blk / 2) * 16 + (blk % 2) * 8]);
      for (int h = 0; h < NR; ++h) {
        __m512i sum = dot[h][r][0];
        for (int u = 1; u < CH; ++u) sum = _mm512_add_epi32(sum, dot[h][r][u]);
        const __m512 sd = _mm512_mul_ps(_mm512_loadu_ps(sg + (h * nsub + sb) * 16), d);
        acc[h][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), sd, acc[h][r]);
      }
    }
  }
  const __m512 kv = _mm512_set1_ps((float)J.K);
  for (int64_t sb = 0; sb < nsub; ++sb)
    for (int h = 0; h < NR; ++h) {
      const __m512 b16 = BIAS ? _mm512_loadu_ps(bg + (h * nsub + sb) * 16) : _mm512_setzero_ps();
      const __m512 tb = _mm512_fnmadd_ps(kv, _mm512_loadu_ps(sg + (h * nsub + sb) * 16), b16);  // bias - K * scale
      for (int r = 0; r < RB; ++r)
        acc[h][r] = _mm512_fmadd_ps(tb, _mm512_set1_ps(J.xs[(r0 + r) * J.nsp + sb]), acc[h][r]);
    }
  for (int h = 0; h < NR; ++h) {
    const int64_t o0 = h == 0 ? 16 * g : 16 * g + J.O / 2;
    for (int r = 0; r < RB; ++r) _mm512_storeu_ps(J.y + (r0 + r) * J.O + o0, acc[h][r]);
  }
}

#if defined(WOOLLY_AVX2)
// group_rows for AVX2 (no VNNI), as llama.cpp's AVX2 path: _mm256_maddubs_epi16 (u8 x i8 -> pairs
// summed to int16) then _mm256_madd_epi16 with ones (pairs -> int32). A 64-byte dword column is
// 16 rows: this does NH 8-row halves (lanes 8 * half0 ..), every lane the same integer dot
// as the VNNI one and then the same float operations in the same order, so the results are the
// AVX-512 build's bit for bit. Nibbles (<= 15) with |x| <= 127: one column's pair sum is at most
// 3810 in magnitude, so a sub-block's JS <= 8 columns sum in int16 (<= 30480) before one madd.
// (|x| <= 127: quantize_x rounds x / d, |x| <= 127 d; only a block whose d is subnormal, 1 / d
// infinite, can give -128, where this and the VNNI product differ.)
// Int8 codes would saturate maddubs once made unsigned (255 * 127 * 2), so the signed dot is
// formed as |code| * (x signed by code) (a pair at most 2 * 128 * 127 = 32512) and made the
// unsigned one exactly in int32: dot(code ^ 0x80, x) = dot(code, x) + 128 * sum(x).
// Registers (16 ymm): NR * RB int accumulators + NR * RB float ones + codes, x, masks.
// A register the compiler must materialize here: keeps each column's sums in order, not all
// of a sub-block's products formed first and summed as a tree (which spilled them to the stack).
#define WOOLLY_KEEP(v) __asm__("" : "+x"(v))
template <int KIND, int SUB, bool BIAS, int RB, int NH>
static inline void group_rows8(const Q8Job& J, int64_t g, int64_t r0, int half0) {
  constexpr int NR = KIND == 1 ? 2 : 1, JS = SUB / 4;   // NH: halves in this pass (from half0)
  const int64_t I = J.I, nch = I / 64, nsub = J.nsub;
  const uint8_t* qg = J.q + g * 16 * I + half0 * 32;
  const float* sg = J.s + g * NR * nsub * 16 + half0 * 8;
  const float* bg = BIAS ? J.b + g * NR * nsub * 16 + half0 * 8 : nullptr;
  const __m256i m4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  __m256 acc[NH][NR][RB];
  for (int f = 0; f < NH; ++f)
    for (int h = 0; h < NR; ++h)
      for (int r = 0; r < RB; ++r) acc[f][h][r] = _mm256_setzero_ps();
  for (int64_t sb = 0; sb < nsub; ++sb) {
    __m256i dot[NH][NR][RB];   // int16 pair sums (nibbles) or int32 lanes (int8 codes)
    for (int f = 0; f < NH; ++f)
      for (int h = 0; h < NR; ++h)
        for (int r = 0; r < RB; ++r) dot[f][h][r] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int jj = 0; jj < JS; ++jj) {
      const int64_t col = sb * JS + jj;
      for (int f = 0; f < NH; ++f) {
        const __m256i t = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qg + col * 64 + f * 32));
        if (KIND == 1) {
          const __m256i c0 = _mm256_and_si256(t, m4), c1 = _mm256_and_si256(_mm256_srli_epi16(t, 4), m4);
          for (int r = 0; r < RB; ++r) {
            int32_t x4;
            std::memcpy(&x4, J.xq + (r0 + r) * I + 4 * col, 4);
            const __m256i xb = _mm256_set1_epi32(x4);
            dot[f][0][r] = _mm256_add_epi16(dot[f][0][r], _mm256_maddubs_epi16(c0, xb));
            dot[f][NR - 1][r] = _mm256_add_epi16(dot[f][NR - 1][r], _mm256_maddubs_epi16(c1, xb));
            WOOLLY_KEEP(dot[f][0][r]);
            WOOLLY_KEEP(dot[f][NR - 1][r]);
          }
        } else {
          const __m256i ca = _mm256_abs_epi8(t);   // -128 -> 0x80, read unsigned: 128
          for (int r = 0; r < RB; ++r) {
            int32_t x4;
            std::memcpy(&x4, J.xq + (r0 + r) * I + 4 * col, 4);
            const __m256i xs = _mm256_sign_epi8(_mm256_set1_epi32(x4), t);
            dot[f][0][r] = _mm256_add_epi32(dot[f][0][r], _mm256_madd_epi16(_mm256_maddubs_epi16(ca, xs), ones));
            WOOLLY_KEEP(dot[f][0][r]);
          }
        }
      }
    }
    const int64_t blk = sb * SUB / 32;
    for (int r = 0; r < RB; ++r) {
      const __m256 d = _mm256_set1_ps(J.dxv[((r0 + r) * nch + blk / 2) * 16 + (blk % 2) * 8]);
      const __m256i corr = _mm256_set1_epi32(128 * J.xsi[(r0 + r) * J.nsp + sb]);
      for (int f = 0; f < NH; ++f)
        for (int h = 0; h < NR; ++h) {
          const __m256i sum = KIND == 1 ? _mm256_madd_epi16(dot[f][h][r], ones) : _mm256_add_epi32(dot[f][h][r], corr);
          const __m256 sd = _mm256_mul_ps(_mm256_loadu_ps(sg + (h * nsub + sb) * 16 + f * 8), d);
          acc[f][h][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), sd, acc[f][h][r]);
        }
    }
  }
  const __m256 kv = _mm256_set1_ps((float)J.K);
  for (int64_t sb = 0; sb < nsub; ++sb)
    for (int f = 0; f < NH; ++f)
      for (int h = 0; h < NR; ++h) {
        const __m256 b8 = BIAS ? _mm256_loadu_ps(bg + (h * nsub + sb) * 16 + f * 8) : _mm256_setzero_ps();
        const __m256 tb = _mm256_fnmadd_ps(kv, _mm256_loadu_ps(sg + (h * nsub + sb) * 16 + f * 8), b8);  // bias - K * scale
        for (int r = 0; r < RB; ++r)
          acc[f][h][r] = _mm256_fmadd_ps(tb, _mm256_set1_ps(J.xs[(r0 + r) * J.nsp + sb]), acc[f][h][r]);
      }
  for (int f = 0; f < NH; ++f)
    for (int h = 0; h < NR; ++h) {
      const int64_t o0 = (h == 0 ? 16 * g : 16 * g + J.O / 2) + 8 * (half0 + f);
      for (int r = 0; r < RB; ++r) _mm256_storeu_ps(J.y + (r0 + r) * J.O + o0, acc[f][h][r]);
    }
}
#endif

// Groups [a, z): all R activation rows, in passes of up to 4 (the group's codes stay in cache).
template <int KIND, int SUB, bool BIAS>
static void group_range(const Q8Job& J, int64_t a, int64_t z) {
  constexpr int NR = KIND == 1 ? 2 : 1;
  const int64_t code_bytes = 16 * J.I, scale_bytes = NR * J.nsub * 16 * 4;
  for (int64_t g = a; g < z; ++g) {
#ifndef WOOLLY_NO_PREFETCH
    if (g + 1 < z) {   // the next group's codes and scales, while this one computes
      const char* qn = reinterpret_cast<const char*>(J.q + (g + 1) * code_bytes);
      for (int64_t o = 0; o < code_bytes; o += 64) _mm_prefetch(qn + o, _MM_HINT_T0);
      const char* sn = reinterpret_cast<const char*>(J.s) + (g + 1) * scale_bytes;
      for (int64_t o = 0; o < scale_bytes; o += 64) _mm_prefetch(sn + o, _MM_HINT_T0);
      if (BIAS) {
        const char* bn = reinterpret_cast<const char*>(J.b) + (g + 1) * scale_bytes;
        for (int64_t o = 0; o < scale_bytes; o += 64) _mm_prefetch(bn + o, _MM_HINT_T0);
      }
    }
#endif
#if defined(WOOLLY_AVX2)
    constexpr int RBM = KIND == 1 ? 2 : 4;   // what fits 16 ymm registers
    int64_t rows = J.R;   // all but a last single row: passes over one 8-row half (its codes stay in L1)
    const bool single = J.R % 2 == 1;
    if (single) --rows;
    for (int half = 0; half < 2 && rows > 0; ++half) {
      int64_t r = 0;
      for (; rows - r >= RBM; r += RBM) group_rows8<KIND, SUB, BIAS, RBM, 1>(J, g, r, half);
      if (rows - r >= 2) group_rows8<KIND, SUB, BIAS, 2, 1>(J, g, r, half);
    }
    if (single) group_rows8<KIND, SUB, BIAS, 1, 2>(J, g, J.R - 1, 0);   // a single row: both halves at once
#else
    int64_t r = 0;
    for (; J.R - r >= 4; r += 4) group_rows<KIND, SUB, BIAS, 4>(J, g, r);
    if (J.R - r >= 2) {
      group_rows<KIND, SUB, BIAS, 2>(J, g, r);
      r += 2;
    }
    if (J.R - r >= 1) group_rows<KIND, SUB, BIAS, 1>(J, g, r);
#endif
  }
}

static Q8Fn pick_group(int64_t kind, int64_t sub, bool bias) {
  PICK_KIND_SUB(group_range);
  return nullptr;
}

#endif

}  // namespace

// Group g's outputs, computed into yl [R, NR * 16] by a row-by-row path on its plain copy, put
// in place in y [R, O].
static void scatter_group(const float* yl, float* y, int64_t R, int64_t O, int64_t NR, int64_t g) {
  const int64_t Ol = NR * 16;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t l = 0; l < Ol; ++l) y[r * O + group_row(NR, O, g, l)] = yl[r * Ol + l];
}

// Rows up to which a call is a decode step's, run on woolly::SpinPool (a prefill chunk's on
// XLA's pool). Measured on SmolLM2's 8-slot step: its output projection (8 x 49152 x 576) on
// XLA's pool made the whole step 20% slower.
constexpr int64_t SMALL_ROWS = 16;

// y [R, O] = x [R, I] @ w.T for rows that are all live (see QMatVecImpl).
static ffi::Error matvec_rows(ffi::ThreadPool& pool, const float* x, const void* qv, const float* s, const float* b,
                              float* y, int64_t R, int64_t I, int64_t O, int64_t kind, int64_t sub, int64_t off,
                              bool bias, int64_t min_par, int64_t act, bool grouped) {
  const bool par = O * I * (R < 8 ? R : 8) >= min_par;
  const bool small = R <= SMALL_ROWS;   // a decode step: see woolly::SpinPool
  const uint8_t* q = static_cast<const uint8_t*>(qv);
  const int64_t NR = kind == 1 ? 2 : 1, units = kind == 1 ? O / 2 : O, G = units / 16, Ol = NR * 16;
  if (grouped && (kind == 2 || I % 64 != 0 || units % 16 != 0))
    return ffi::Error::InvalidArgument("woolly_qmatvec: the grouped layout needs groups of 16 rows and I % 64 == 0");
#ifdef WOOLLY_Q8
  if (act == 1 && kind != 2 && I % 64 == 0) {
    const Q8Fn fn = grouped ? pick_group(kind, sub, bias) : pick_q8(kind, sub, bias);
    if (fn == nullptr) return ffi::Error::InvalidArgument("woolly_qmatvec: unsupported kind/sub");
    const int64_t nsub = I / sub, nsp = (nsub + 15) / 16 * 16;
    std::vector<int8_t> xq(R * I);
    std::vector<float> dxv(R * (I / 64) * 16), xs(R * nsp);
    std::vector<int32_t> xsi(R * nsp);
    quantize_x(x, R, I, (int)sub, xq.data(), dxv.data(), xs.data(), xsi.data(), nsp);
    const Q8Job job{xq.data(), dxv.data(), xs.data(), xsi.data(), q, s, bias ? b : nullptr, y, R, I, O, nsub, nsp,
                    kind == 0 ? off + 128 : off};
    woolly::run_parallel(pool, grouped ? G : units, par, [&](int64_t a, int64_t z) { fn(job, a, z); }, small);
    return ffi::Error::Success();
  }
#endif
  RangeFn fn = pick(kind, sub, bias);
  if (fn == nullptr) return ffi::Error::InvalidArgument("woolly_qmatvec: unsupported kind/sub");
  if (grouped) {
    each_plain_group(pool, q, s, bias ? b : nullptr, NR, G, I, I / sub, par, [&](int64_t g, const PlainGroup& p) {
      thread_local std::vector<float> yl;
      yl.resize(R * Ol);
      const Job lj{x, p.q.data(), p.s.data(), bias ? p.b.data() : nullptr, yl.data(), R, I, Ol, off};
      fn(lj, 0, 16);
      scatter_group(yl.data(), y, R, O, NR, g);
    });
    return ffi::Error::Success();
  }
  const Job job{x, q, s, bias ? b : nullptr, y, R, I, O, off};
  woolly::run_parallel(pool, units, par, [&](int64_t a, int64_t z) { fn(job, a, z); }, small);
  return ffi::Error::Success();
}

static bool row_is_zero(const float* xr, int64_t I) {
#if defined(WOOLLY_AVX2)
  __m256 any = _mm256_setzero_ps();
  for (int64_t e = 0; e < I; e += 8)
    any = _mm256_or_ps(any, _mm256_cmp_ps(_mm256_loadu_ps(xr + e), _mm256_setzero_ps(), _CMP_NEQ_UQ));
  return _mm256_movemask_ps(any) == 0;
#else
  __mmask16 any = 0;
  for (int64_t e = 0; e < I; e += 16)
    any |= _mm512_cmpneq_ps_mask(_mm512_loadu_ps(xr + e), _mm512_setzero_ps());
  return any == 0;
#endif
}

// Rows of x that are exactly zero (an idle slot, prompt padding: the model keeps their hidden
// state at zero) have zero outputs, so they are skipped: the live rows are multiplied as a
// compact block and the rest of y is zero. An 8-slot step with one live slot costs one row; a
// padded prompt's zero tail costs nothing (its live rows are a head, multiplied in place).
static ffi::Error QMatVecImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer q,
                              ffi::Buffer<ffi::F32> s, ffi::Buffer<ffi::F32> b,
                              ffi::ResultBuffer<ffi::F32> y, int64_t kind, int64_t sub, int64_t off,
                              int64_t has_bias, int64_t min_par, int64_t act, int64_t grouped) {
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
  if (R == 0 || O == 0) return ffi::Error::Success();
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  const bool bias = has_bias != 0;
  std::vector<int64_t> live;
  live.reserve(R);
  for (int64_t r = 0; r < R; ++r)
    if (!row_is_zero(xp + r * I, I)) live.push_back(r);
  const int64_t L = (int64_t)live.size();
  if (L == R)
    return matvec_rows(pool, xp, q.untyped_data(), s.typed_data(), b.typed_data(), yp, R, I, O, kind, sub, off,
                       bias, min_par, act, grouped != 0);
  if (L == 0 || live.back() == L - 1) {   // a zero tail (prompt padding): the live head in place, no copies
    std::fill(yp + L * O, yp + R * O, 0.f);
    if (L == 0) return ffi::Error::Success();
    return matvec_rows(pool, xp, q.untyped_data(), s.typed_data(), b.typed_data(), yp, L, I, O, kind, sub, off,
                       bias, min_par, act, grouped != 0);
  }
  std::fill(yp, yp + R * O, 0.f);
  std::vector<float> xc(L * I), yc(L * O);
  for (int64_t j = 0; j < L; ++j) std::copy(xp + live[j] * I, xp + (live[j] + 1) * I, xc.data() + j * I);
  ffi::Error err = matvec_rows(pool, xc.data(), q.untyped_data(), s.typed_data(), b.typed_data(), yc.data(), L, I,
                               O, kind, sub, off, bias, min_par, act, grouped != 0);
  if (err.failure()) return err;
  for (int64_t j = 0; j < L; ++j) std::copy(yc.data() + j * O, yc.data() + (j + 1) * O, yp + live[j] * O);
  return ffi::Error::Success();
}

static ffi::Error DequantImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::Buffer<ffi::F32> s,
                              ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> y, int64_t kind,
                              int64_t sub, int64_t off, int64_t has_bias, int64_t grouped) {
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
  if (grouped) {
    const int64_t NR = kind == 1 ? 2 : 1, units = kind == 1 ? O / 2 : O, Ol = NR * 16;
    if (I % 64 != 0 || units % 16 != 0)
      return ffi::Error::InvalidArgument("woolly_dequant: the grouped layout needs groups of 16 rows and I % 64 == 0");
    const float* bp = has_bias ? b.typed_data() : nullptr;
    float* y0 = y->typed_data();
    each_plain_group(pool, static_cast<const uint8_t*>(q.untyped_data()), s.typed_data(), bp, NR, units / 16, I,
                     I / sub, O * I >= (1 << 16), [&](int64_t g, const PlainGroup& p) {
                       thread_local std::vector<float> yl;
                       yl.resize(Ol * I);
                       const Job lj{nullptr, p.q.data(), p.s.data(), bp ? p.b.data() : nullptr, yl.data(), 0, I, Ol, off};
                       fn(lj, 0, 16);
                       for (int64_t l = 0; l < Ol; ++l)
                         std::copy(yl.data() + l * I, yl.data() + (l + 1) * I, y0 + group_row(NR, O, g, l) * I);
                     });
    return ffi::Error::Success();
  }
  const Job job{nullptr, static_cast<const uint8_t*>(q.untyped_data()), s.typed_data(),
                has_bias ? b.typed_data() : nullptr, y->typed_data(), 0, I, O, off};
  woolly::run_parallel(pool, kind == 1 ? O / 2 : O, O * I >= (1 << 16), [&](int64_t a, int64_t z) { fn(job, a, z); });
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
                                  .Attr<int64_t>("has_bias")
                                  .Attr<int64_t>("grouped"));

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
                                  .Attr<int64_t>("min_par")
                                  .Attr<int64_t>("act")
                                  .Attr<int64_t>("grouped"));
