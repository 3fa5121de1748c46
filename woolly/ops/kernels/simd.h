// The vector intrinsics the kernels are written in (AVX-512 F/BW, VNNI where present).
// Built for an AVX-512 CPU they are the compiler's own (<immintrin.h>). Built with
// WOOLLY_PORTABLE (AVX2-only x86, ARM64 NEON, anything else: see woolly/ops/cpu_kernels.py)
// the same names come from SIMDe (https://github.com/simd-everywhere/simde, pip simde-py),
// which implements each AVX-512 intrinsic with the target's own vectors (two AVX2 registers,
// four NEON ones) or scalar code, with the same results. The AVX2 build also defines
// WOOLLY_AVX2: the hot loops have 256-bit versions written for it (as llama.cpp's AVX2 path:
// _mm256_maddubs_epi16 dot products), bit for bit equal to the AVX-512 ones.
#pragma once
#if defined(WOOLLY_PORTABLE)
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <cstdint>
#include <simde/x86/avx512.h>
#include <simde/x86/f16c.h>
#if !defined(__x86_64__)
#define _mm_pause() ((void)0)
#define _mm_prefetch(p, h) __builtin_prefetch((const void*)(p))
#define _MM_HINT_T0 0
#endif
// Reductions SIMDe lacks, summed in the order GCC's AVX-512 ones use (halves, then quarters,
// ...), so the portable build rounds exactly as the native one.
static inline float woolly_reduce_add_ps(simde__m512 a) {
  alignas(64) float v[16];
  simde_mm512_store_ps(v, a);
  float t[8];
  for (int i = 0; i < 8; ++i) t[i] = v[i + 8] + v[i];
  for (int i = 0; i < 4; ++i) t[i] = t[i + 4] + t[i];
  return (t[0] + t[2]) + (t[1] + t[3]);
}
static inline int woolly_reduce_add_epi32(simde__m512i a) {
  alignas(64) int32_t v[16];
  simde_mm512_store_si512(v, a);
  uint32_t s = 0;
  for (int i = 0; i < 16; ++i) s += static_cast<uint32_t>(v[i]);
  return static_cast<int>(s);
}
static inline simde__m256i woolly_cvtps_ph(simde__m512 a) {   // round to nearest even
  return simde_mm256_set_m128i(simde_mm256_cvtps_ph(simde_mm512_extractf32x8_ps(a, 1), 0),
                               simde_mm256_cvtps_ph(simde_mm512_extractf32x8_ps(a, 0), 0));
}
static inline simde__m256i woolly_cvtepi32_epi16(simde__m512i a) {   // truncating, as vpmovdw
  alignas(64) int32_t v[16];
  alignas(32) int16_t r[16];
  simde_mm512_store_si512(v, a);
  for (int i = 0; i < 16; ++i) r[i] = static_cast<int16_t>(v[i]);
  return simde_mm256_load_si256(reinterpret_cast<const simde__m256i*>(r));
}
static inline simde__m512i woolly_cvtepi8_epi32(simde__m128i a) {   // sign-extend 16 bytes
  return simde_mm512_cvtepi16_epi32(simde_mm256_cvtepi8_epi16(a));
}
static inline simde__m512i woolly_cvtepu8_epi32(simde__m128i a) {   // zero-extend 16 bytes
  return simde_mm512_cvtepu16_epi32(simde_mm256_cvtepu8_epi16(a));
}
#define _mm512_cvtepi8_epi32(a) woolly_cvtepi8_epi32(a)
#define _mm512_cvtepu8_epi32(a) woolly_cvtepu8_epi32(a)
#define _mm512_cmpneq_ps_mask(a, b) simde_mm512_cmp_ps_mask(a, b, SIMDE_CMP_NEQ_UQ)
#ifndef _MM_FROUND_NO_EXC
#define _MM_FROUND_NO_EXC SIMDE_MM_FROUND_NO_EXC
#endif
#define _mm512_cvtps_ph(a, imm) woolly_cvtps_ph(a)
#define _mm512_cvtepi32_epi16(a) woolly_cvtepi32_epi16(a)
#define _mm512_reduce_add_ps(a) woolly_reduce_add_ps(a)
#define _mm512_reduce_add_epi32(a) woolly_reduce_add_epi32(a)
#else
#if !defined(__AVX512F__) || !defined(__AVX512BW__)
#error "woolly kernels: AVX-512 (F, BW) or WOOLLY_PORTABLE"
#endif
#include <immintrin.h>
#endif
