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

}  // namespace cbf
