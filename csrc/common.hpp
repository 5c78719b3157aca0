// Shared helpers for the signal extension: thread splitting and array checks.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#ifdef __linux__
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

// Run fn(begin, end) over [0, n) on `threads` threads (the caller's thread is one of them). Chunks are
// handed out from a shared counter, about four per thread, so a thread the OS descheduled (a busy shared
// machine) does not hold the whole call back; fn may allocate scratch per call, amortised over a chunk.
// Exceptions in workers are re-thrown on the calling thread.
template <typename Fn>
void parallel_for(int64_t n, int threads, Fn fn) {
  threads = resolve_threads(threads, n);
  if (threads <= 1 || n <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  const int64_t grain = std::max<int64_t>(1, n / (int64_t{4} * threads));
  std::atomic<int64_t> next{0};
  std::vector<std::exception_ptr> errors(threads);
  auto work = [&](int t) {
    try {
      for (int64_t b = next.fetch_add(grain); b < n; b = next.fetch_add(grain)) fn(b, std::min(n, b + grain));
    } catch (...) {
      errors[t] = std::current_exception();
      next.store(n);  // stop handing out work
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int t = 1; t < threads; ++t) pool.emplace_back(work, t);
  work(0);
  for (auto& th : pool) th.join();
  for (auto& err : errors)
    if (err) std::rethrow_exception(err);
}

}  // namespace cbf
