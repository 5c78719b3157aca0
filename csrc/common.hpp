// Shared helpers for the signal extension: thread splitting and array checks.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <system_error>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#ifdef __linux__
#include <dlfcn.h>
#include <sched.h>
#endif

namespace cbf {

namespace py = pybind11;

// Cores this process may run on: the affinity mask on Linux (containers and taskset narrow it), else
// what the standard library reports.
inline int available_cores() {
#ifdef __linux__
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
}

// Number of worker threads: `requested` if > 0, else the cores available, never more than the work items.
inline int resolve_threads(int requested, int64_t work_items) {
  int n = requested > 0 ? requested : available_cores();
  if (n < 1) n = 1;
  return static_cast<int>(std::min<int64_t>(n, std::max<int64_t>(work_items, 1)));
}

// [0, n) handed out in chunks (about four per thread) from a shared counter, so whoever runs takes the work;
// the first exception stops the handing out and is kept for the calling thread to re-throw.
struct Chunks {
  std::atomic<int64_t> next{0};
  const int64_t n, grain;
  std::mutex mu;
  std::exception_ptr error;

  Chunks(int64_t n_, int threads) : n(n_), grain(std::max<int64_t>(1, n_ / (int64_t{4} * threads))) {}

  template <typename Fn>
  void drain(Fn& fn) noexcept {
    try {
      for (int64_t b = next.fetch_add(grain); b < n; b = next.fetch_add(grain)) fn(b, std::min(n, b + grain));
    } catch (...) {
      std::lock_guard<std::mutex> lk(mu);
      if (!error) error = std::current_exception();
      next.store(n);  // stop handing out work
    }
  }
};

// Run fn(begin, end) over [0, n) on up to `threads` threads, the caller's included, taking Chunks. Helpers
// are detached: the caller waits only for helpers that are inside a chunk, never for one the OS has not
// started yet (on a busy machine that wait is a scheduler time slice, longer than a whole record's work); a
// late helper finds the call closed and exits without touching fn. The first exception is re-thrown on the
// calling thread.
template <typename Fn>
void parallel_for(int64_t n, int threads, Fn fn) {
  threads = resolve_threads(threads, n);
  if (threads <= 1 || n <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  struct State {
    explicit State(int64_t n, int threads) : chunks(n, threads) {}
    Chunks chunks;
    std::condition_variable cv;
    bool closed = false;
    int active = 0;
  };
  auto st = std::make_shared<State>(n, threads);
  for (int t = 1; t < threads; ++t) {
    try {
      std::thread([st, f = &fn] {
        {
          std::lock_guard<std::mutex> lk(st->chunks.mu);
          if (st->closed) return;
          ++st->active;
        }
        st->chunks.drain(*f);
        {
          std::lock_guard<std::mutex> lk(st->chunks.mu);
          --st->active;
        }
        st->cv.notify_all();
      }).detach();
    } catch (const std::system_error&) {
      break;  // no more threads available: the ones running (and the caller) do the work
    }
  }
  st->chunks.drain(fn);
  {
    std::unique_lock<std::mutex> lk(st->chunks.mu);
    st->closed = true;
    st->cv.wait(lk, [&] { return st->active == 0; });
  }
  if (st->chunks.error) std::rethrow_exception(st->chunks.error);
}

// The OpenMP runtime torch has loaded into the process, if any: libgomp's GOMP_parallel, looked up at run
// time (the extension links no OpenMP, so the signal functions stay free of torch). Not cached while absent:
// the encoder kernels are only called once torch is imported.
using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);
inline GompParallel process_openmp() {
#ifdef __linux__
  static std::atomic<GompParallel> cached{nullptr};
  GompParallel f = cached.load(std::memory_order_acquire);
  if (!f) {
    f = reinterpret_cast<GompParallel>(dlsym(RTLD_DEFAULT, "GOMP_parallel"));
    if (f) cached.store(f, std::memory_order_release);
  }
  return f;
#else
  return nullptr;
#endif
}

// parallel_for on the team of torch's own OpenMP threads where there is one: between two GEMMs those threads
// spin waiting for work, so fresh threads of ours would share their cores with spinning ones. The encoder's
// C++ kernels use this; elsewhere (or when no OpenMP is loaded) it is parallel_for.
template <typename Fn>
void parallel_for_team(int64_t n, int threads, Fn fn) {
  threads = resolve_threads(threads, n);
  GompParallel omp = threads > 1 && n > 1 ? process_openmp() : nullptr;
  if (!omp) {
    parallel_for(n, threads, fn);
    return;
  }
  struct Team {
    Chunks chunks;
    Fn* fn;
  } team{{n, threads}, &fn};
  // Every member of the team drains the same Chunks (drain catches: no exception leaves the region).
  auto body = [](void* p) {
    Team& t = *static_cast<Team*>(p);
    t.chunks.drain(*t.fn);
  };
  omp(body, &team, static_cast<unsigned>(threads), 0);
  if (team.chunks.error) std::rethrow_exception(team.chunks.error);
}

}  // namespace cbf
