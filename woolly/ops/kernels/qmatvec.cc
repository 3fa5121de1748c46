// Woolly's CPU matvec for block-quantized weights (see woolly/ops/qmatmul.py; built by woolly/ops/cpu_kernels.py).
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
