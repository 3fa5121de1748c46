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
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
#include "simd.h"

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

namespace ffi = xla::ffi;

namespace {

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
  const int64_t H = J.H, G = J.G, S = J.S;
  const float* q = J.q + (U.b * J.K + U.k) * G * H;                  // [G, H]: this kv head's queries
  constexpr int64_t esz = DT == 0 ? 4 : 2;
  const int64_t cb = U.b / J.qps;                                     // the query's cache slot
  const char* kb = static_cast<const char*>(J.kc) + ((cb * J.K + U.k) * S) * H * esz;
  const char* vb = static_cast<const char*>(J.vc) + ((cb * J.K + U.k) * S) * H * esz;
  float* m = J.parts + u * G * (H + 2);
  float* l = m + G;
  float* acc = l + G;
  for (int64_t g = 0; g < G; ++g) m[g] = -INFINITY, l[g] = 0.f;
  std::memset(acc, 0, sizeof(float) * G * H);
  alignas(64) float pr[64][16];  // G <= 64: each head's probabilities for the block's rows
  __m512 sc[4];
  const __m512 scale = _mm512_set1_ps(J.scale);
  for (int64_t r0 = U.lo; r0 < U.hi; r0 += 16) {
    const int64_t nb = U.hi - r0 < 16 ? U.hi - r0 : 16;
    const __mmask16 live = nb == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nb) - 1);
    for (int64_t g0 = 0; g0 < G; g0 += 4) {
      const int64_t gb = G - g0 < 4 ? G - g0 : 4;
      switch (gb) {
        case 1: scores16_any<DT, 1>(q + g0 * H, kb, H, r0, nb, sc); break;
        case 2: scores16_any<DT, 2>(q + g0 * H, kb, H, r0, nb, sc); break;
        case 3: scores16_any<DT, 3>(q + g0 * H, kb, H, r0, nb, sc); break;
        default: scores16_any<DT, 4>(q + g0 * H, kb, H, r0, nb, sc); break;
      }
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
      switch (gb) {
        case 1: accumulate_all<DT, 1>(acc + g0 * H, pr + g0, vb, H, r0, nb); break;
        case 2: accumulate_all<DT, 2>(acc + g0 * H, pr + g0, vb, H, r0, nb); break;
        case 3: accumulate_all<DT, 3>(acc + g0 * H, pr + g0, vb, H, r0, nb); break;
        default: accumulate_all<DT, 4>(acc + g0 * H, pr + g0, vb, H, r0, nb); break;
      }
    }
  }
}

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
      float L = 0.f;
      __m512 w[16];  // H <= 256 in registers, else in passes below
      float* dst = o + (u0.b * N + u0.k * G + g) * H;
      for (int64_t h0 = 0; h0 < H; h0 += 256) {
        const int64_t nv = (H - h0 < 256 ? H - h0 : 256) / 16;
        for (int64_t i = 0; i < nv; ++i) w[i] = _mm512_setzero_ps();
        L = 0.f;
        for (int64_t u = first[j]; u < first[j + 1]; ++u) {
          const float* pu = parts.data() + u * G * (H + 2);
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
        for (int64_t h = 0; h < H; h += 16) {
          const __m512 v = _mm512_loadu_ps(src + h);
          __m256i r;
          if (dt == ffi::DataType::F16) {
            r = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          } else {  // bf16, round to nearest even; NaN stays a (quiet) NaN
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
