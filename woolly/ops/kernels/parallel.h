// Splitting a kernel's work over the calling thread and XLA's intra-op thread pool (shared by
// every kernel in this directory; woolly/ops/cpu_kernels.py compiles them with -I here).
#pragma once

#include <immintrin.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace woolly {

// Work items [0, total) are split in units claimed from a shared counter: the calling thread
// and the tasks it schedules on the pool all claim units, so the call never waits on a task
// that has not started (it only waits for units already being computed). `body(a, z)` does
// items [a, z); it may refer to the caller's stack, since a task that starts after the last
// unit is done claims nothing and never calls it.
struct ParallelFor {
  std::function<void(int64_t, int64_t)> body;
  int64_t total = 0, units = 0, per = 1;
  std::atomic<int64_t> next{0}, done{0};
  void work() {
    for (;;) {
      const int64_t u = next.fetch_add(1, std::memory_order_relaxed);
      if (u >= units) return;
      const int64_t a = u * per, z = a + per < total ? a + per : total;
      body(a, z);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Run body over [0, total) on the calling thread and, when `parallel`, the pool's threads;
// returns when every item is done.
inline void run_parallel(xla::ffi::ThreadPool& pool, int64_t total, bool parallel,
                         std::function<void(int64_t, int64_t)> body) {
  auto sp = std::make_shared<ParallelFor>();
  sp->body = std::move(body);
  sp->total = total;
  int64_t nt = parallel ? pool.num_threads() : 1;
  if (nt < 1) nt = 1;
  const int64_t want = nt == 1 ? 1 : nt * 4;  // a few units per thread: a busy core holds back less
  sp->per = (total + want - 1) / want;
  if (sp->per < 1) sp->per = 1;
  sp->units = (total + sp->per - 1) / sp->per;
  for (int64_t t = 1; t < nt && t < sp->units; ++t) pool.Schedule([sp]() { sp->work(); });
  sp->work();
  int spins = 0;
  while (sp->done.load(std::memory_order_acquire) < sp->units) {
    _mm_pause();
    if (++spins > 2048) std::this_thread::yield();
  }
}

}  // namespace woolly
