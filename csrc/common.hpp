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

// Run fn(begin, end) over [0, n) on up to `threads` threads, the caller's included. Chunks (about four per
// thread) come from a shared counter, so whoever runs takes the work. Helpers are detached: the caller waits
// only for helpers that are inside a chunk, never for one the OS has not started yet (on a busy machine that
// wait is a scheduler time slice, longer than a whole record's work); a late helper finds the call closed
// and exits without touching fn. The first exception is re-thrown on the calling thread.
template <typename Fn>
void parallel_for(int64_t n, int threads, Fn fn) {
  threads = resolve_threads(threads, n);
  if (threads <= 1 || n <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::mutex mu;
    std::condition_variable cv;
    bool closed = false;
    int active = 0;
    std::exception_ptr error;
  };
  auto st = std::make_shared<State>();
  const int64_t grain = std::max<int64_t>(1, n / (int64_t{4} * threads));
  auto run_chunks = [n, grain](State& s, Fn& f) {
    try {
      for (int64_t b = s.next.fetch_add(grain); b < n; b = s.next.fetch_add(grain)) f(b, std::min(n, b + grain));
    } catch (...) {
      std::lock_guard<std::mutex> lk(s.mu);
      if (!s.error) s.error = std::current_exception();
      s.next.store(n);  // stop handing out work
    }
  };
  for (int t = 1; t < threads; ++t) {
    try {
      std::thread([st, f = &fn, run_chunks] {
        {
          std::lock_guard<std::mutex> lk(st->mu);
          if (st->closed) return;
          ++st->active;
        }
        run_chunks(*st, *f);
        {
          std::lock_guard<std::mutex> lk(st->mu);
          --st->active;
        }
        st->cv.notify_all();
      }).detach();
    } catch (const std::system_error&) {
      break;  // no more threads available: the ones running (and the caller) do the work
    }
  }
  run_chunks(*st, fn);
  {
    std::unique_lock<std::mutex> lk(st->mu);
    st->closed = true;
    st->cv.wait(lk, [&] { return st->active == 0; });
  }
  if (st->error) std::rethrow_exception(st->error);
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
    std::atomic<int64_t> next{0};
    int64_t n, grain;
    Fn* fn;
    std::mutex mu;
    std::exception_ptr error;
  } team;
  team.n = n;
  team.grain = std::max<int64_t>(1, n / (int64_t{4} * threads));
  team.fn = &fn;
  // Every member of the team takes chunks from the shared counter; exceptions must not leave the region.
  auto body = [](void* p) {
    Team& t = *static_cast<Team*>(p);
    try {
      for (int64_t b = t.next.fetch_add(t.grain); b < t.n; b = t.next.fetch_add(t.grain))
        (*t.fn)(b, std::min(t.n, b + t.grain));
    } catch (...) {
      std::lock_guard<std::mutex> lk(t.mu);
      if (!t.error) t.error = std::current_exception();
      t.next.store(t.n);
    }
  };
  omp(body, &team, static_cast<unsigned>(threads), 0);
  if (team.error) std::rethrow_exception(team.error);
}

}  // namespace cbf
