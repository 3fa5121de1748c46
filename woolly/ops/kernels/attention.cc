// Woolly's CPU decode attention (see woolly/ops/attention.py; built by woolly/ops/cpu_kernels.py).
// One new token per slot: q [B, 1, N, H] f32 over caches k, v [B, K, S, H] (f32, f16 or bf16;
// row s holds position s), positions i32 [B] -> out f32 [B, 1, N, H]. Query head n reads kv
// head n / G (G = N / K). Slot b reads only rows s <= p = positions[b] (and p - s < window
// when window > 0); an idle slot (p < 0) reads nothing and gets zeros. The live rows of each
// (slot, kv head) are cut into chunks, each chunk one pass with an online softmax over blocks
// of 16 rows (its K rows once, its V rows once); the chunks' partial (max, sum, acc) are then
// merged. Chunks run on the calling thread and XLA's intra-op pool (qmatvec.cc's pattern).
// Also the cache write for f16/bf16 caches (XLA:CPU has no 16-bit float scatter and would
// convert the whole cache to f32 and back every step): new f32 [B, T, K, H] rounded to
// nearest even into rows positions [B, T] of the cache, in place (the result aliases it).
// Written in AVX-512 intrinsics (simd.h); the AVX2 build (WOOLLY_AVX2) has its own 256-bit
// version of the hot code with the same results bit for bit (tests/test_attention_isa.py).
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>
#include "simd.h"

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

namespace ffi = xla::ffi;

namespace {

#if !defined(WOOLLY_AVX2)
// 16 cache values -> f32.
template <int DT>  // 0: f32, 1: f16, 2: bf16
static inline __m512 load16(const void* base, int64_t i) {
  if (DT == 0) return _mm512_loadu_ps(static_cast<const float*>(base) + i);
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i));
  if (DT == 1) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// exp(x) for x <= 0 (lanes below -100 give ~0): 2^n * p(r), x = n ln2 + r, |r| <= ln2/2,
// p a degree-6 Taylor polynomial (relative error < 2e-7 over the range).
static inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-100.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

#endif  // !WOOLLY_AVX2

struct Unit {
  int64_t b, k, lo, hi;  // rows [lo, hi) of slot b, kv head k
};

struct Job {
  const float* q;
  const void* kc;
  const void* vc;
  int64_t K, S, H, G;
  int64_t qps;   // queries per cache slot: query b reads slot b / qps
  float scale;
  const Unit* units;
  float* parts;  // per unit: m [G], l [G], acc [G, H]
};

// Unit u's operands, its partial result reset (m = -inf, l = 0, acc = 0): both builds' run_unit.
struct UnitView {
  const float* q;         // [G, H]: this kv head's queries
  const char* kb;         // [S, H] K rows of the query's cache slot and kv head
  const char* vb;         // [S, H] V rows
  float *m, *l, *acc;     // in parts: [G], [G], [G, H]
};

template <int DT>  // 0: f32, 1: f16, 2: bf16 cache
static inline UnitView open_unit(const Job& J, int64_t u) {
  const Unit& U = J.units[u];
  const int64_t H = J.H, G = J.G;
  constexpr int64_t esz = DT == 0 ? 4 : 2;
  const int64_t rows = ((U.b / J.qps) * J.K + U.k) * J.S;           // the query's cache slot b / qps
  UnitView v;
  v.q = J.q + (U.b * J.K + U.k) * G * H;
  v.kb = static_cast<const char*>(J.kc) + rows * H * esz;
  v.vb = static_cast<const char*>(J.vc) + rows * H * esz;
  v.m = J.parts + u * G * (H + 2);
  v.l = v.m + G;
  v.acc = v.l + G;
  for (int64_t g = 0; g < G; ++g) v.m[g] = -INFINITY, v.l[g] = 0.f;
  std::memset(v.acc, 0, sizeof(float) * G * H);
  return v;
}

// f(std::integral_constant<int, gb>) for a block of gb = 1..4 query heads (the kernels' GB).
template <class F>
static inline void with_heads(int64_t gb, F f) {
  switch (gb) {
    case 1: f(std::integral_constant<int, 1>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    default: f(std::integral_constant<int, 4>()); break;
  }
}

#if !defined(WOOLLY_AVX2)
// Sums of 16 vectors -> one vector: lane r holds the sum of v[r]'s lanes. A shuffle-add tree
// (about 3 ops per vector instead of a horizontal reduction each); it reads its inputs in the
// order T (the tree's 4x4 transposition, its own inverse), so lane r comes out as row r.
static inline __m512 reduce16(const __m512* v) {
  static constexpr int T[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};
  __m512 s1[8], s2[4], s3[2];
  for (int i = 0; i < 8; ++i) {
    const __m512 a = v[T[2 * i]], b = v[T[2 * i + 1]];
    s1[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  for (int i = 0; i < 4; ++i) {
    const __m512 a = s1[2 * i], b = s1[2 * i + 1];
    s2[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
  }
  for (int i = 0; i < 2; ++i) {
    const __m512 a = s2[2 * i], b = s2[2 * i + 1];
    s3[i] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  }
  const __m512d a = _mm512_castps_pd(s3[0]), b = _mm512_castps_pd(s3[1]);
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
}

// Scores of query heads g0..g0+GB-1 against rows r0..r0+nb-1: each K row is loaded once for
// the GB heads; the 16 rows' partial vectors are then summed by reduce16. HV: H / 16 when
// known at compile time (the queries then stay in registers), else 0.
template <int DT, int GB, int HV>
static inline void scores16(const float* q, const char* kb, int64_t H, int64_t r0, int64_t nb, __m512* out) {
  constexpr int64_t esz = DT == 0 ? 4 : 2;
  alignas(64) __m512 part[GB][16];
  __m512 qr[GB][HV > 0 ? HV : 1];
  if (HV > 0)
    for (int g = 0; g < GB; ++g)
      for (int i = 0; i < HV; ++i) qr[g][i] = _mm512_loadu_ps(q + g * H + 16 * i);
  if (HV > 0) {
    for (int64_t r = 0; r < 16; ++r) {
      __m512 a[GB];
      for (int g = 0; g < GB; ++g) a[g] = _mm512_setzero_ps();
      if (r < nb) {
        const void* kr = kb + (r0 + r) * H * esz;
        for (int i = 0; i < HV; ++i) {
          const __m512 kv = load16<DT>(kr, 16 * i);
          for (int g = 0; g < GB; ++g) a[g] = _mm512_fmadd_ps(qr[g][i], kv, a[g]);
        }
      }
      for (int g = 0; g < GB; ++g) part[g][r] = a[g];
    }
  } else {  // two rows at a time: each query vector loaded once for both
    for (int64_t r = 0; r < 16; r += 2) {
      __m512 a[GB], b[GB];
      for (int g = 0; g < GB; ++g) a[g] = b[g] = _mm512_setzero_ps();
      const int64_t r1 = r + 1 < nb ? r + 1 : (nb > 0 ? nb - 1 : 0);  // past nb: a live row, masked later
      if (r < nb) {
        const void* ka = kb + (r0 + r) * H * esz;
        const void* kc = kb + (r0 + r1) * H * esz;
        for (int64_t h = 0; h < H; h += 16) {
          const __m512 kva = load16<DT>(ka, h), kvc = load16<DT>(kc, h);
          for (int g = 0; g < GB; ++g) {
            const __m512 qv = _mm512_loadu_ps(q + g * H + h);
            a[g] = _mm512_fmadd_ps(qv, kva, a[g]);
            b[g] = _mm512_fmadd_ps(qv, kvc, b[g]);
          }
        }
      }
      for (int g = 0; g < GB; ++g) part[g][r] = a[g], part[g][r + 1] = b[g];
    }
  }
  for (int g = 0; g < GB; ++g) out[g] = reduce16(part[g]);
}

template <int DT, int GB>
static inline void scores16_any(const float* q, const char* kb, int64_t H, int64_t r0, int64_t nb, __m512* out) {
  if (H == 64) scores16<DT, GB, 4>(q, kb, H, r0, nb, out);
  else scores16<DT, GB, 0>(q, kb, H, r0, nb, out);
}

// acc[g][h0..h0+16*NV) += sum_r p[g][r] v[r][h0..], heads g0..g0+GB-1, accumulators in registers.
template <int DT, int GB, int NV>
static inline void accumulate(float* acc, const float (*pr)[16], const char* vb, int64_t H, int64_t h0,
                              int64_t r0, int64_t nb) {
  constexpr int64_t esz = DT == 0 ? 4 : 2;
  __m512 a[GB][NV];
  for (int g = 0; g < GB; ++g)
    for (int i = 0; i < NV; ++i) a[g][i] = _mm512_loadu_ps(acc + g * H + h0 + 16 * i);
  for (int64_t r = 0; r < nb; ++r) {
    const void* vr = vb + (r0 + r) * H * esz;
    __m512 v[NV];
    for (int i = 0; i < NV; ++i) v[i] = load16<DT>(vr, h0 + 16 * i);
    for (int g = 0; g < GB; ++g) {
      const __m512 pb = _mm512_set1_ps(pr[g][r]);
      for (int i = 0; i < NV; ++i) a[g][i] = _mm512_fmadd_ps(pb, v[i], a[g][i]);
    }
  }
  for (int g = 0; g < GB; ++g)
    for (int i = 0; i < NV; ++i) _mm512_storeu_ps(acc + g * H + h0 + 16 * i, a[g][i]);
}

template <int DT, int GB>
static inline void accumulate_all(float* acc, const float (*pr)[16], const char* vb, int64_t H, int64_t r0,
                                  int64_t nb) {
  int64_t h = 0;
  for (; h + 64 <= H; h += 64) accumulate<DT, GB, 4>(acc, pr, vb, H, h, r0, nb);
  for (; h < H; h += 16) accumulate<DT, GB, 1>(acc, pr, vb, H, h, r0, nb);
}

// One unit: online softmax over its rows in blocks of 16, unnormalized result into parts.
template <int DT>
static void run_unit(const Job& J, int64_t u) {
  const Unit& U = J.units[u];
  const int64_t H = J.H, G = J.G;
  const UnitView V = open_unit<DT>(J, u);
  const float* q = V.q;
  const char *kb = V.kb, *vb = V.vb;
  float *m = V.m, *l = V.l, *acc = V.acc;
  alignas(64) float pr[64][16];  // G <= 64: each head's probabilities for the block's rows
  __m512 sc[4];
  const __m512 scale = _mm512_set1_ps(J.scale);
  for (int64_t r0 = U.lo; r0 < U.hi; r0 += 16) {
    const int64_t nb = U.hi - r0 < 16 ? U.hi - r0 : 16;
    const __mmask16 live = nb == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nb) - 1);
    for (int64_t g0 = 0; g0 < G; g0 += 4) {
      const int64_t gb = G - g0 < 4 ? G - g0 : 4;
      with_heads(gb, [&](auto GB) { scores16_any<DT, decltype(GB)::value>(q + g0 * H, kb, H, r0, nb, sc); });
      for (int64_t j = 0; j < gb; ++j) {
        const int64_t g = g0 + j;
        const __m512 s = _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), live, sc[j], scale);
        const float bm = _mm512_reduce_max_ps(s);
        if (bm > m[g]) {  // a new maximum: rescale what came before (nothing, on the first block)
          const float alpha = m[g] == -INFINITY ? 0.f : std::exp(m[g] - bm);
          m[g] = bm;
          l[g] *= alpha;
          const __m512 av = _mm512_set1_ps(alpha);
          for (int64_t h = 0; h < H; h += 16)
            _mm512_storeu_ps(acc + g * H + h, _mm512_mul_ps(av, _mm512_loadu_ps(acc + g * H + h)));
        }
        const __m512 p = _mm512_maskz_mov_ps(live, exp_ps(_mm512_sub_ps(s, _mm512_set1_ps(m[g]))));
        l[g] += _mm512_reduce_add_ps(p);
        _mm512_store_ps(pr[g], p);
      }
      with_heads(gb, [&](auto GB) { accumulate_all<DT, decltype(GB)::value>(acc + g0 * H, pr + g0, vb, H, r0, nb); });
    }
  }
}

// One query head's merged output over units [u0, u1) (parts: per unit m [G], l [G], acc [G, H]):
// dst [H] = sum_u e_u acc_u / sum_u e_u l_u, e_u = e^(m_u - M).
static void merge_head(const float* parts, int64_t u0, int64_t u1, int64_t G, int64_t H, int64_t g, float M,
                       float* dst) {
  __m512 w[16];  // H <= 256 in registers, else in passes
  for (int64_t h0 = 0; h0 < H; h0 += 256) {
    const int64_t nv = (H - h0 < 256 ? H - h0 : 256) / 16;
    for (int64_t i = 0; i < nv; ++i) w[i] = _mm512_setzero_ps();
    float L = 0.f;
    for (int64_t u = u0; u < u1; ++u) {
      const float* pu = parts + u * G * (H + 2);
      const float e = std::exp(pu[g] - M);
      L += e * pu[G + g];
      const __m512 ev = _mm512_set1_ps(e);
      const float* au = pu + 2 * G + g * H + h0;
      for (int64_t i = 0; i < nv; ++i) w[i] = _mm512_fmadd_ps(ev, _mm512_loadu_ps(au + 16 * i), w[i]);
    }
    const __m512 inv = _mm512_set1_ps(1.f / L);
    for (int64_t i = 0; i < nv; ++i) _mm512_storeu_ps(dst + h0 + 16 * i, _mm512_mul_ps(w[i], inv));
  }
}

// src f32 [H] -> dst [H] f16 or bf16, rounded to nearest even (a bf16 NaN stays a quiet NaN).
static void write_row(uint16_t* dst, const float* src, int64_t H, bool f16) {
  for (int64_t h = 0; h < H; h += 16) {
    const __m512 v = _mm512_loadu_ps(src + h);
    __m256i r;
    if (f16) {
      r = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
      const __m512i u = _mm512_castps_si512(v);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      __m512i rr = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
      const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      rr = _mm512_mask_mov_epi32(rr, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
      r = _mm512_cvtepi32_epi16(rr);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + h), r);
  }
}

#endif  // !WOOLLY_AVX2

#if defined(WOOLLY_AVX2)
// ---- The AVX2 build's own 256-bit code (no AVX-512 emulation in the hot loops), bit for bit
// the AVX-512 code's results: each of its 16-lane vectors is two 8-lane halves here (lo: lanes
// 0-7, hi: lanes 8-15) under the same per-lane operations in the same order, and every
// horizontal sum or maximum is taken in the order of GCC's _mm512_reduce_*_ps (the halves,
// then the quarters, then (0 + 2) + (1 + 3)). 16 ymm registers: at most 4 heads at once.

// 8 cache values -> f32.
template <int DT>  // 0: f32, 1: f16, 2: bf16
static inline __m256 load8(const void* base, int64_t i) {
  if (DT == 0) return _mm256_loadu_ps(static_cast<const float*>(base) + i);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
  if (DT == 1) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline __m256 pow2i(__m256i k) {  // 2^k for -126 <= k <= 127
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k, _mm256_set1_epi32(127)), 23));
}

// The AVX-512 exp_ps on 8 lanes. Its last step scalef(p, n) = p 2^n rounded once; here n is in
// [-145, 0] (x clamped to [-100, 0]) and p in [0.7, 1.5], so p 2^(n - n/2) is exact (a normal)
// and the second product rounds (to a denormal or zero far down) exactly as scalef does.
static inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-100.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i ni = _mm256_cvtps_epi32(n);       // exact: n is integral
  const __m256i n1 = _mm256_srai_epi32(ni, 1);    // floor(n / 2)
  return _mm256_mul_ps(_mm256_mul_ps(p, pow2i(n1)), pow2i(_mm256_sub_epi32(ni, n1)));
}

// _mm512_reduce_add_ps / _mm512_reduce_max_ps of the vector (lo, hi).
static inline float reduce_add16(__m256 lo, __m256 hi) {
  const __m256 t = _mm256_add_ps(hi, lo);
  const __m128 t4 = _mm_add_ps(_mm256_extractf128_ps(t, 1), _mm256_castps256_ps128(t));
  const __m128 t2 = _mm_add_ps(t4, _mm_shuffle_ps(t4, t4, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(t2) + _mm_cvtss_f32(_mm_shuffle_ps(t2, t2, 1));
}
static inline float reduce_max16(__m256 lo, __m256 hi) {
  const __m256 t = _mm256_max_ps(hi, lo);
  const __m128 t4 = _mm_max_ps(_mm256_extractf128_ps(t, 1), _mm256_castps256_ps128(t));
  const __m128 t2 = _mm_max_ps(t4, _mm_shuffle_ps(t4, t4, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(_mm_max_ps(t2, _mm_shuffle_ps(t2, t2, _MM_SHUFFLE(0, 1, 0, 1))));
}

// 8 rows' sums -> lane j: row j's, where x[j] = lo + hi of row j is reduce_add16's first step
// taken: (y0 + y2) + (y1 + y3), y = x[j][0..3] + x[j][4..7] (the AVX-512 reduce16's per-row
// order). A transpose-add tree; reading rows in the order P brings lane j out as row j.
static inline __m256 reduce8(const __m256* x) {
  static constexpr int P[8] = {0, 4, 1, 5, 2, 6, 3, 7};
  __m256 z[4], w[2];
  for (int i = 0; i < 4; ++i) {  // z[i] = (y of row P[2i]) | (y of row P[2i + 1])
    const __m256 a = x[P[2 * i]], b = x[P[2 * i + 1]];
    z[i] = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
  }
  for (int i = 0; i < 2; ++i) {  // w[i]: y0 + y2 and y1 + y3 of 4 rows, interleaved
    const __m256 a = z[2 * i], b = z[2 * i + 1];
    w[i] = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
  }
  const __m256d a = _mm256_castps_pd(w[0]), b = _mm256_castps_pd(w[1]);
  return _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)), _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)));
}

// Scores of query heads g < GB (q [GB, H]) against rows r0..r0+nb-1 -> out[g] = rows 0-7 and
// 8-15 (rows >= nb: zero, masked later). Per row and lane l of each 16 values of H, the
// AVX-512 code's FMA chain over the 16-blocks: two chains here (lanes 0-7, 8-15), added, then
// summed across by reduce8. Rows go in pairs, one half of H at a time: 2 GB accumulators, two
// K vectors, each query vector loaded once for both rows. HV: H / 16 when known at compile time.
template <int DT, int GB, int HV>
static inline void scores16(const float* q, const char* kb, int64_t H, int64_t r0, int64_t nb, __m256 (*out)[2]) {
  constexpr int64_t esz = DT == 0 ? 4 : 2;
  const int64_t nv = HV > 0 ? HV : H / 16;
  alignas(32) __m256 x[GB][16];
  for (int64_t r = 0; r < 16; r += 2) {
    if (r >= nb) {
      for (int g = 0; g < GB; ++g) x[g][r] = x[g][r + 1] = _mm256_setzero_ps();
      continue;
    }
    const char* ka = kb + (r0 + r) * H * esz;
    const char* kc = kb + (r0 + (r + 1 < nb ? r + 1 : r)) * H * esz;  // past nb: a live row, masked later
    for (int half = 0; half < 2; ++half) {
      __m256 a[GB], c[GB];
      for (int g = 0; g < GB; ++g) a[g] = c[g] = _mm256_setzero_ps();
      for (int64_t i = 0; i < nv; ++i) {
        const int64_t h = 16 * i + 8 * half;
        const __m256 kva = load8<DT>(ka, h), kvc = load8<DT>(kc, h);
        for (int g = 0; g < GB; ++g) {
          const __m256 qv = _mm256_loadu_ps(q + g * H + h);
          a[g] = _mm256_fmadd_ps(qv, kva, a[g]);
          c[g] = _mm256_fmadd_ps(qv, kvc, c[g]);
        }
      }
      for (int g = 0; g < GB; ++g) {
        x[g][r] = half ? _mm256_add_ps(x[g][r], a[g]) : a[g];
        x[g][r + 1] = half ? _mm256_add_ps(x[g][r + 1], c[g]) : c[g];
      }
    }
  }
  for (int g = 0; g < GB; ++g) out[g][0] = reduce8(x[g]), out[g][1] = reduce8(x[g] + 8);
}

template <int DT, int GB>
static inline void scores16_any(const float* q, const char* kb, int64_t H, int64_t r0, int64_t nb, __m256 (*out)[2]) {
  if (H == 64) scores16<DT, GB, 4>(q, kb, H, r0, nb, out);
  else scores16<DT, GB, 0>(q, kb, H, r0, nb, out);
}

// acc[g][h0..h0+8 NV) += sum_r p[g][r] v[r][h0..], heads g < GB: GB NV accumulators (the
// chains, one FMA per row each: 8 or more to hide the FMA latency), the GB probabilities of
// the row broadcast, one V vector at a time.
template <int DT, int GB, int NV>
static inline void accumulate(float* acc, const float (*pr)[16], const char* vb, int64_t H, int64_t h0,
                              int64_t r0, int64_t nb) {
  constexpr int64_t esz = DT == 0 ? 4 : 2;
  __m256 a[GB][NV];
  for (int g = 0; g < GB; ++g)
    for (int i = 0; i < NV; ++i) a[g][i] = _mm256_loadu_ps(acc + g * H + h0 + 8 * i);
  for (int64_t r = 0; r < nb; ++r) {
    const void* vr = vb + (r0 + r) * H * esz;
    __m256 pb[GB];
    for (int g = 0; g < GB; ++g) pb[g] = _mm256_broadcast_ss(&pr[g][r]);
    for (int i = 0; i < NV; ++i) {
      const __m256 v = load8<DT>(vr, h0 + 8 * i);
      for (int g = 0; g < GB; ++g) a[g][i] = _mm256_fmadd_ps(pb[g], v, a[g][i]);
    }
  }
  for (int g = 0; g < GB; ++g)
    for (int i = 0; i < NV; ++i) _mm256_storeu_ps(acc + g * H + h0 + 8 * i, a[g][i]);
}

// GB NV accumulators + GB broadcasts + 1 V vector <= 16 ymm registers (GB 3: 4 vectors, all
// 16, measured faster than 3 vectors and a 2-vector tail); then 16-column tails.
template <int DT, int GB>
static inline void accumulate_all(float* acc, const float (*pr)[16], const char* vb, int64_t H, int64_t r0,
                                  int64_t nb) {
  constexpr int NV = GB == 1 ? 8 : GB == 2 ? 4 : GB == 3 ? 4 : 2;
  int64_t h = 0;
  for (; h + 8 * NV <= H; h += 8 * NV) accumulate<DT, GB, NV>(acc, pr, vb, H, h, r0, nb);
  for (; h < H; h += 16) accumulate<DT, GB, 2>(acc, pr, vb, H, h, r0, nb);
}

// One unit: the AVX-512 run_unit's online softmax, on half vectors.
template <int DT>
static void run_unit(const Job& J, int64_t u) {
  const Unit& U = J.units[u];
  const int64_t H = J.H, G = J.G;
  const UnitView V = open_unit<DT>(J, u);
  const float* q = V.q;
  const char *kb = V.kb, *vb = V.vb;
  float *m = V.m, *l = V.l, *acc = V.acc;
  alignas(64) float pr[64][16];  // G <= 64: each head's probabilities for the block's rows
  __m256 sc[4][2];
  const __m256 scale = _mm256_set1_ps(J.scale), ninf = _mm256_set1_ps(-INFINITY);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t r0 = U.lo; r0 < U.hi; r0 += 16) {
    const int64_t nb = U.hi - r0 < 16 ? U.hi - r0 : 16;
    const __m256i nbv = _mm256_set1_epi32((int)nb);
    const __m256 live[2] = {_mm256_castsi256_ps(_mm256_cmpgt_epi32(nbv, lane)),
                            _mm256_castsi256_ps(_mm256_cmpgt_epi32(nbv, _mm256_add_epi32(lane, _mm256_set1_epi32(8))))};
    for (int64_t g0 = 0; g0 < G; g0 += 4) {
      const int64_t gb = G - g0 < 4 ? G - g0 : 4;
      with_heads(gb, [&](auto GB) { scores16_any<DT, decltype(GB)::value>(q + g0 * H, kb, H, r0, nb, sc); });
      for (int64_t j = 0; j < gb; ++j) {
        const int64_t g = g0 + j;
        __m256 s[2];
        for (int i = 0; i < 2; ++i) s[i] = _mm256_blendv_ps(ninf, _mm256_mul_ps(sc[j][i], scale), live[i]);
        const float bm = reduce_max16(s[0], s[1]);
        if (bm > m[g]) {  // a new maximum: rescale what came before (nothing, on the first block)
          const float alpha = m[g] == -INFINITY ? 0.f : std::exp(m[g] - bm);
          m[g] = bm;
          l[g] *= alpha;
          const __m256 av = _mm256_set1_ps(alpha);
          for (int64_t h = 0; h < H; h += 8)
            _mm256_storeu_ps(acc + g * H + h, _mm256_mul_ps(av, _mm256_loadu_ps(acc + g * H + h)));
        }
        const __m256 mv = _mm256_set1_ps(m[g]);
        __m256 p[2];
        for (int i = 0; i < 2; ++i) p[i] = _mm256_and_ps(exp8(_mm256_sub_ps(s[i], mv)), live[i]);
        l[g] += reduce_add16(p[0], p[1]);
        _mm256_store_ps(pr[g], p[0]);
        _mm256_store_ps(pr[g] + 8, p[1]);
      }
      with_heads(gb, [&](auto GB) { accumulate_all<DT, decltype(GB)::value>(acc + g0 * H, pr + g0, vb, H, r0, nb); });
    }
  }
}

// merge_head of the AVX-512 code, 64 columns at a time (the same per-column sums).
static void merge_head(const float* parts, int64_t u0, int64_t u1, int64_t G, int64_t H, int64_t g, float M,
                       float* dst) {
  for (int64_t h0 = 0; h0 < H; h0 += 64) {
    const int64_t nv = (H - h0 < 64 ? H - h0 : 64) / 8;
    __m256 w[8];
    for (int64_t i = 0; i < nv; ++i) w[i] = _mm256_setzero_ps();
    float L = 0.f;
    for (int64_t u = u0; u < u1; ++u) {
      const float* pu = parts + u * G * (H + 2);
      const float e = std::exp(pu[g] - M);
      L += e * pu[G + g];
      const __m256 ev = _mm256_set1_ps(e);
      const float* au = pu + 2 * G + g * H + h0;
      for (int64_t i = 0; i < nv; ++i) w[i] = _mm256_fmadd_ps(ev, _mm256_loadu_ps(au + 8 * i), w[i]);
    }
    const __m256 inv = _mm256_set1_ps(1.f / L);
    for (int64_t i = 0; i < nv; ++i) _mm256_storeu_ps(dst + h0 + 8 * i, _mm256_mul_ps(w[i], inv));
  }
}

// write_row of the AVX-512 code, 8 values at a time: f16 by F16C, bf16 by the same integer steps.
static void write_row(uint16_t* dst, const float* src, int64_t H, bool f16) {
  for (int64_t h = 0; h < H; h += 16) {
    const __m256 v0 = _mm256_loadu_ps(src + h), v1 = _mm256_loadu_ps(src + h + 8);
    if (f16) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + h), _mm256_cvtps_ph(v0, _MM_FROUND_TO_NEAREST_INT));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + h + 8), _mm256_cvtps_ph(v1, _MM_FROUND_TO_NEAREST_INT));
      continue;
    }
    __m256i rr[2];
    const __m256 v[2] = {v0, v1};
    for (int i = 0; i < 2; ++i) {
      const __m256i u = _mm256_castps_si256(v[i]);
      const __m256i hi = _mm256_srli_epi32(u, 16);
      const __m256i lsb = _mm256_and_si256(hi, _mm256_set1_epi32(1));
      const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
      const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v[i], v[i], _CMP_UNORD_Q));
      rr[i] = _mm256_blendv_epi8(rounded, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan);
    }
    // values <= 0xFFFF: packus truncates as vpmovdw; it packs per 128-bit lane, permute4x64 restores the order
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rr[0], rr[1]), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + h), packed);
  }
}

#endif  // WOOLLY_AVX2

using UnitFn = void (*)(const Job&, int64_t);


}  // namespace

static ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer kc,
                                      ffi::AnyBuffer vc, ffi::Buffer<ffi::S32> pos,
                                      ffi::ResultBuffer<ffi::F32> out, int64_t window, float scale,
                                      int64_t min_par, int64_t qps) {
  auto qd = q.dimensions();
  auto kd = kc.dimensions();
  auto vd = vc.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || qd[1] != 1)
    return ffi::Error::InvalidArgument("woolly_decode_attention: q [B, 1, N, H], caches [B, K, S, H] expected");
  const int64_t B = qd[0], N = qd[2], H = qd[3], K = kd[1], S = kd[2];
  for (int i = 0; i < 4; ++i)
    if (kd[i] != vd[i]) return ffi::Error::InvalidArgument("woolly_decode_attention: k and v caches differ");
  if (qps < 1 || kd[0] * qps != B || kd[3] != H || K == 0 || N % K != 0 || N / K > 64 || H % 16 != 0 ||
      pos.element_count() != B || kc.element_type() != vc.element_type())
    return ffi::Error::InvalidArgument("woolly_decode_attention: bad shapes");
  UnitFn fn = nullptr;
  switch (kc.element_type()) {
    case ffi::DataType::F32: fn = run_unit<0>; break;
    case ffi::DataType::F16: fn = run_unit<1>; break;
    case ffi::DataType::BF16: fn = run_unit<2>; break;
    default: return ffi::Error::InvalidArgument("woolly_decode_attention: cache must be f32, f16 or bf16");
  }
  const int64_t G = N / K;
  const int32_t* p = pos.typed_data();
  float* o = out->typed_data();
  // Live rows [lo, hi) per slot; zeros for idle slots.
  std::vector<int64_t> lo(B), hi(B);
  int64_t rows = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t pb = p[b];
    hi[b] = pb < 0 ? 0 : (pb + 1 < S ? pb + 1 : S);
    lo[b] = window > 0 && pb - window + 1 > 0 ? pb - window + 1 : 0;
    if (lo[b] > hi[b]) lo[b] = hi[b];
    rows += hi[b] - lo[b];
    if (hi[b] == lo[b]) std::memset(o + b * N * H, 0, sizeof(float) * N * H);
  }
  if (rows == 0) return ffi::Error::Success();
  // Chunks of rows: about 4 per thread over all (slot, kv head) pairs, at least 64 rows.
  const bool par = rows * K * H * (G + 1) >= min_par;
  int64_t nt = par ? pool.num_threads() : 1;
  if (nt < 1) nt = 1;
  int64_t chunk = nt == 1 ? S : (rows * K + nt * 4 - 1) / (nt * 4);
  chunk = chunk < 64 ? 64 : (chunk + 15) / 16 * 16;
  std::vector<Unit> units;
  std::vector<int64_t> first;  // per (b, k) with live rows: index of its first unit
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < K && hi[b] > lo[b]; ++k) {
      first.push_back((int64_t)units.size());
      for (int64_t a = lo[b]; a < hi[b]; a += chunk) units.push_back(Unit{b, k, a, a + chunk < hi[b] ? a + chunk : hi[b]});
    }
  first.push_back((int64_t)units.size());
  std::vector<float> parts(units.size() * G * (H + 2));
  const Job job{q.typed_data(), kc.untyped_data(), vc.untyped_data(), K, S, H, G, qps, scale, units.data(), parts.data()};
  const bool small = qps == 1;   // a decode step: one query per slot (see woolly::SpinPool)
  woolly::run_parallel(pool, (int64_t)units.size(), par && units.size() > 1, [&](int64_t a, int64_t z) {
    for (int64_t i = a; i < z; ++i) fn(job, i);
  }, small);
  // Merge each (slot, kv head)'s chunks: out = sum_i e^(m_i - M) acc_i / sum_i e^(m_i - M) l_i.
  for (size_t j = 0; j + 1 < first.size(); ++j) {
    const Unit& u0 = units[first[j]];
    for (int64_t g = 0; g < G; ++g) {
      float M = -INFINITY;
      for (int64_t u = first[j]; u < first[j + 1]; ++u) {
        const float mu = parts[u * G * (H + 2) + g];
        M = mu > M ? mu : M;
      }
      merge_head(parts.data(), first[j], first[j + 1], G, H, g, M, o + (u0.b * N + u0.k * G + g) * H);
    }
  }
  return ffi::Error::Success();
}

static ffi::Error CacheWriteImpl(ffi::AnyBuffer cache, ffi::Buffer<ffi::F32> nw, ffi::Buffer<ffi::S32> pos,
                                 ffi::Result<ffi::AnyBuffer> out) {
  auto cd = cache.dimensions();
  auto nd = nw.dimensions();
  if (cd.size() != 4 || nd.size() != 4 || nd[0] != cd[0] || nd[2] != cd[1] || nd[3] != cd[3] ||
      pos.element_count() != nd[0] * nd[1] || cd[3] % 16 != 0)
    return ffi::Error::InvalidArgument("woolly_cache_write: cache [B, K, S, H], new [B, T, K, H], positions [B, T]");
  const auto dt = cache.element_type();
  if (dt != ffi::DataType::F16 && dt != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("woolly_cache_write: f16 or bf16 cache expected");
  const int64_t B = cd[0], K = cd[1], S = cd[2], H = cd[3], T = nd[1];
  uint16_t* c = static_cast<uint16_t*>(out->untyped_data());
  if (out->untyped_data() != cache.untyped_data())  // not aliased after all: start from a copy
    std::memcpy(c, cache.untyped_data(), sizeof(uint16_t) * B * K * S * H);
  const float* x = nw.typed_data();
  const int32_t* p = pos.typed_data();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t s = p[b * T + t];
      if (s < 0 || s >= S) continue;
      for (int64_t k = 0; k < K; ++k) {
        const float* src = x + ((b * T + t) * K + k) * H;
        uint16_t* dst = c + ((b * K + k) * S + s) * H;
        write_row(dst, src, H, dt == ffi::DataType::F16);
      }
    }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(WoollyCacheWrite, CacheWriteImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(WoollyDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("min_par")
                                  .Attr<int64_t>("qps"));
