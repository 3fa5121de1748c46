// Splitting a kernel's work over the calling thread and other threads: the kernels' own spinning
// worker for a decode step's calls, XLA's intra-op thread pool for the rest (shared by every
// kernel in this directory; woolly/ops/cpu_kernels.py compiles them with -I here).
#pragma once

#include "simd.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#include <unistd.h>

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
  // Until every unit is done (those other threads are computing), spinning, then yielding.
  void wait() const {
    int spins = 0;
    while (done.load(std::memory_order_acquire) < units) {
      _mm_pause();
      if (++spins > 2048) std::this_thread::yield();
    }
  }
};

// Threads of this kernel library's own that stay awake between calls. XLA's pool parks its
// threads as soon as they idle, and a decode step's kernels are tens of microseconds apart
// (norms, rope, the residual add run in between on one thread): each call then waited for a
// parked thread to wake, or ran alone (measured: SmolLM2's attention output projection took
// 52 us after the single-threaded attention kernel vs 19 us back to back). These workers spin
// (pausing, yielding to runnable threads) for up to WOOLLY_KERNEL_SPIN_US (default 300) after
// each job, then sleep until the next one. Only small jobs come here (`run_parallel`'s `small`:
// a decode step's, up to 16 rows): while XLA runs two kernels at once (a prefill's independent
// matmuls) an extra thread only oversubscribes the cores (measured: Gemma-3's 512-token first
// token 305 -> 355 ms when prefill used this pool too). One job at a time: a caller that finds
// the pool busy uses XLA's pool instead.
class SpinPool {
 public:
  static SpinPool* get(int64_t threads) {
    static SpinPool* pool = make(threads);
    return pool;
  }

  // Runs `job` (units claimed by its own work()) with the workers and the caller; false when busy.
  bool run(const std::shared_ptr<ParallelFor>& job) {
    if (getpid() != pid_) return false;   // a forked child: the workers (and maybe the lock) stayed behind
    bool expected = false;
    if (!busy_.compare_exchange_strong(expected, true, std::memory_order_acquire)) return false;
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = job;
      epoch_.fetch_add(1, std::memory_order_release);
    }
    if (sleepers_.load(std::memory_order_acquire) > 0) cv_.notify_all();
    job->work();
    job->wait();
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_.reset();
    }
    busy_.store(false, std::memory_order_release);
    return true;
  }

 private:
  static SpinPool* make(int64_t threads) {
    const char* env = std::getenv("WOOLLY_KERNEL_SPIN_US");
    const long spin_us = env ? std::atol(env) : 300;
    if (spin_us <= 0 || threads < 2) return nullptr;
    auto* p = new SpinPool();   // lives as long as the process: its threads never join
    p->spin_ = std::chrono::microseconds(spin_us);
    p->pid_ = getpid();
    for (int64_t t = 1; t < threads; ++t) std::thread([p] { p->loop(); }).detach();
    return p;
  }

  void loop() {
    uint64_t seen = epoch_.load(std::memory_order_acquire);
    for (;;) {
      auto until = std::chrono::steady_clock::now() + spin_;
      int spins = 0;
      while (epoch_.load(std::memory_order_acquire) == seen) {
        _mm_pause();
        if (++spins % 64 != 0) continue;
        std::this_thread::yield();   // let a runnable XLA thread have this core
        if (std::chrono::steady_clock::now() < until) continue;
        std::unique_lock<std::mutex> lk(mu_);
        sleepers_.fetch_add(1, std::memory_order_acq_rel);
        cv_.wait(lk, [&] { return epoch_.load(std::memory_order_acquire) != seen; });
        sleepers_.fetch_sub(1, std::memory_order_acq_rel);
      }
      // A worker late for a job finds every unit claimed (its caller waited for them all) and
      // does nothing; the shared_ptr keeps the job itself alive until then.
      std::shared_ptr<ParallelFor> job;
      {
        std::lock_guard<std::mutex> lk(mu_);
        seen = epoch_.load(std::memory_order_acquire);
        job = job_;
      }
      if (job) job->work();
    }
  }

  std::atomic<bool> busy_{false};
  std::atomic<uint64_t> epoch_{0};
  std::atomic<int> sleepers_{0};
  std::shared_ptr<ParallelFor> job_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::chrono::microseconds spin_{300};
  pid_t pid_ = 0;
};

// Run body over [0, total) on the calling thread and, when `parallel`, other threads (for a
// `small` job the kernels' SpinPool where free, else XLA's pool); returns when every item is done.
inline void run_parallel(xla::ffi::ThreadPool& pool, int64_t total, bool parallel,
                         std::function<void(int64_t, int64_t)> body, bool small = false) {
  auto sp = std::make_shared<ParallelFor>();
  sp->body = std::move(body);
  sp->total = total;
  int64_t nt = parallel ? pool.num_threads() : 1;
  if (nt < 1) nt = 1;
  const int64_t want = nt == 1 ? 1 : nt * 4;  // a few units per thread: a busy core holds back less
  sp->per = (total + want - 1) / want;
  if (sp->per < 1) sp->per = 1;
  sp->units = (total + sp->per - 1) / sp->per;
  if (small && nt > 1 && sp->units > 1) {
    SpinPool* spin = SpinPool::get(nt);
    if (spin != nullptr && spin->run(sp)) return;
  }
  for (int64_t t = 1; t < nt && t < sp->units; ++t) pool.Schedule([sp]() { sp->work(); });
  sp->work();
  sp->wait();
}

}  // namespace woolly
