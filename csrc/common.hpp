// Shared helpers for the signal extension: thread splitting and array checks.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace cbf {

namespace py = pybind11;

// Number of worker threads: `requested` if > 0, else the machine's cores.
inline int resolve_threads(int requested, int64_t work_items) {
  int n = requested > 0 ? requested : static_cast<int>(std::thread::hardware_concurrency());
  if (n < 1) n = 1;
  return static_cast<int>(std::min<int64_t>(n, std::max<int64_t>(work_items, 1)));
}

// Run fn(begin, end) over [0, n) split into contiguous chunks, one per thread.
// Exceptions in workers are re-thrown on the calling thread.
template <typename Fn>
void parallel_for(int64_t n, int threads, Fn fn) {
  threads = resolve_threads(threads, n);
  if (threads <= 1 || n <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  std::vector<std::thread> pool;
  std::vector<std::exception_ptr> errors(threads);
  const int64_t chunk = (n + threads - 1) / threads;
  for (int t = 0; t < threads; ++t) {
    const int64_t b = t * chunk, e = std::min(n, b + chunk);
    if (b >= e) break;
    pool.emplace_back([&, t, b, e] {
      try {
        fn(b, e);
      } catch (...) {
        errors[t] = std::current_exception();
      }
    });
  }
  for (auto& th : pool) th.join();
  for (auto& err : errors)
    if (err) std::rethrow_exception(err);
}

}  // namespace cbf
