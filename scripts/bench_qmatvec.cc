// Standalone timing of the int8-activation matvec kernel, one thread, on a cache-resident Q4_1-shaped
// 1536x576 matrix: weights one row at a time (plain layout, q8_range) against 16 rows per dword
// column (grouped layout, group_range), at several row counts, and their largest difference.
// The "2.3x at 1 row, 3x at 8 and 512 rows" of benchmarks/README.md comes from here:
//
//   INC=$(.venv/bin/python -c "import jax; print(jax.ffi.include_dir())")
//   g++ -O3 -march=native -ffp-contract=off -std=c++17 -w -I$INC -Iwoolly/ops/kernels \
//       scripts/bench_qmatvec.cc -o /tmp/bench_qmatvec && /tmp/bench_qmatvec
#include "qmatvec.cc"
#include <chrono>
#include <cstdio>
#include <random>
int main() {
  const int64_t O = 1536, I = 576, SUB = 32, NR = 2, U = O / 2, G = U / 16;
  std::mt19937 gen(0);
  std::vector<uint8_t> q(U * I), qg(U * I);
  for (auto& v : q) v = gen() & 255;
  const int64_t nsub = I / SUB, nsp = (nsub + 15) / 16 * 16;
  std::vector<float> s(O * nsub), b(O * nsub), sg(O * nsub), bg(O * nsub);
  for (auto& v : s) v = (gen() % 1000) / 1000.f;
  for (auto& v : b) v = (gen() % 1000) / 1000.f;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < 16; ++i)
      for (int64_t col = 0; col < I / 4; ++col)
        for (int t = 0; t < 4; ++t) qg[g * 16 * I + (col * 16 + i) * 4 + t] = q[(16 * g + i) * I + 4 * col + t];
  for (int64_t g = 0; g < G; ++g)
    for (int64_t h = 0; h < NR; ++h)
      for (int64_t sb = 0; sb < nsub; ++sb)
        for (int64_t i = 0; i < 16; ++i) {
          int64_t row = 16 * g + i + h * (O / 2);
          sg[((g * NR + h) * nsub + sb) * 16 + i] = s[row * nsub + sb];
          bg[((g * NR + h) * nsub + sb) * 16 + i] = b[row * nsub + sb];
        }
  for (int R : {1, 8, 64, 512}) {
    std::vector<float> x(R * I), y(R * O), y2(R * O);
    for (auto& v : x) v = (int)(gen() % 2000) / 1000.f - 1.f;
    std::vector<int8_t> xq(R * I);
    std::vector<float> dxv(R * (I / 64) * 16), xs(R * nsp);
    std::vector<int32_t> xsi(R * nsp);
    quantize_x(x.data(), R, I, SUB, xq.data(), dxv.data(), xs.data(), xsi.data(), nsp);
    Q8Job J{xq.data(), dxv.data(), xs.data(), xsi.data(), q.data(), s.data(), b.data(), y.data(), R, I, O, nsub, nsp, 8};
    Q8Job J2{xq.data(), dxv.data(), xs.data(), xsi.data(), qg.data(), sg.data(), bg.data(), y2.data(), R, I, O, nsub, nsp, 8};
    for (int variant = 0; variant < 2; ++variant) {
      int reps = 20000 / R + 10;
      auto t0 = std::chrono::steady_clock::now();
      for (int it = 0; it < reps; ++it) {
        if (variant == 0) q8_range<1, 32, true>(J, 0, U);
        else group_range<1, 32, true>(J2, 0, G);
      }
      double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
      printf("R=%3d %s: %8.1f us  %6.1f GMAC/s\n", R, variant ? "group" : "rows ", dt * 1e6, O * I * R / dt / 1e9);
    }
    double md = 0, mx = 0;
    for (int64_t k = 0; k < R * O; ++k) { md = std::max(md, (double)std::fabs(y[k] - y2[k])); mx = std::max(mx, (double)std::fabs(y[k])); }
    printf("   max diff %.3g of %.3g\n", md, mx);
  }
}
