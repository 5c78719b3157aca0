// Signal-processing kernels shared by filter.cpp, resample.cpp and preprocess.cpp.
//
// Zero-phase IIR filtering reproduces scipy.signal.sosfiltfilt / filtfilt (padtype="odd"): odd extension by
// `padlen` samples at both ends, a forward SOS pass started from sosfilt_zi * first sample, a backward pass
// started from sosfilt_zi * last forward output, then the extension is cut off; direct form II transposed,
// like scipy, in double.
//
// Polyphase resampling reproduces scipy.signal.resample_poly(x, up, down) with padtype="constant" (zeros):
// with h the (2*half_len + 1)-tap FIR already scaled by `up`, scipy pre-pads h so that output i lands on the
// filter centre, which works out to  y[i] = sum_j h[j] * xu[i*down + half_len - j],  xu the zero-stuffed
// input (xu[m] = x[m/up] when up divides m and 0 <= m/up < n_in), for i < ceil(n_in*up/down). Each output
// touches the taps of one phase only, so the taps are regrouped per phase.
//
// W rows are processed together, interleaved sample-major ([t][W]): the IIR recursion of one row is latency
// bound, four independent rows fill the vector units. The kernels (dsp_kernels.inc) are compiled twice, for
// baseline x86-64 and for AVX2+FMA, and picked at run time (about 2-3x apart on the resampling dot products).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

namespace cbf {

// Second-order sections normalised to a0 == 1, with their steady-state initial conditions.
struct SosFilter {
  int n_sections = 0;
  std::vector<double> coef;  // n_sections x 6: b0 b1 b2 a0 a1 a2
  std::vector<double> zi;    // n_sections x 2: sosfilt_zi (per unit step)
  int64_t padlen = 0;
};

struct Polyphase {
  int64_t up = 1, down = 1, half_len = 0;
  std::vector<std::vector<double>> phases;  // phases[p][k] = h[p + k*up]

  Polyphase() = default;
  Polyphase(const double* h, int64_t n_taps, int64_t up_, int64_t down_) : up(up_), down(down_) {
    half_len = (n_taps - 1) / 2;
    phases.resize(static_cast<size_t>(up));
    for (int64_t p = 0; p < up; ++p)
      for (int64_t j = p; j < n_taps; j += up) phases[p].push_back(h[j]);
  }
  bool identity() const { return up == 1 && down == 1; }
  int64_t out_len(int64_t n_in) const { return (n_in * up + down - 1) / down; }
};

// Load W rows (row r at base + r*row_stride, samples t*col_stride, strides in elements) into the
// interleaved buffer; lanes past `rows` are zero. Non-finite samples are replaced by 0 and the first one
// of each lane is reported in bad[l] (sample index, or -1).
template <int W, typename T>
inline void load_lanes(const T* base, int64_t rows, int64_t row_stride, int64_t col_stride, int64_t len,
                       double* dst, int64_t* bad) {
  for (int l = 0; l < W; ++l) bad[l] = -1;
  for (int l = 0; l < W; ++l) {
    if (l >= rows) {
      for (int64_t t = 0; t < len; ++t) dst[t * W + l] = 0.0;
      continue;
    }
    const T* src = base + l * row_stride;
    for (int64_t t = 0; t < len; ++t) {
      const double v = static_cast<double>(src[t * col_stride]);
      if (!std::isfinite(v)) {
        if (bad[l] < 0) bad[l] = t;
        dst[t * W + l] = 0.0;
      } else {
        dst[t * W + l] = v;
      }
    }
  }
}

// Four doubles handled as one value: GCC lowers it to SSE2 pairs or AVX registers and, unlike
// auto-vectorisation of a lane loop, reliably keeps the recursion's state in registers (~4x faster).
// Only passed between inlined internal helpers, so the AVX-vs-SSE argument-passing ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef double v4d __attribute__((vector_size(32)));

namespace base {
#include "dsp_kernels.inc"
}  // namespace base

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CBF_HAVE_AVX2_PATH 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "dsp_kernels.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif

// The AVX2+FMA kernels when the CPU has them, unless CBRAMOD_FAST_SIMD=baseline (lets tests cover both).
inline bool use_avx2() {
#ifdef CBF_HAVE_AVX2_PATH
  static const bool ok = [] {
    const char* env = std::getenv("CBRAMOD_FAST_SIMD");
    if (env && std::string(env) == "baseline") return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
#else
  return false;
#endif
}

// In place: the signal (T samples x W lanes) sits at sig; sig[-padlen*W .. 0) and sig[T*W .. (T+padlen)*W)
// must be writable scratch. Requires T > padlen (checked by the caller, as scipy does).
template <int W>
inline void filtfilt_inplace(double* sig, int64_t T, const SosFilter& f) {
#ifdef CBF_HAVE_AVX2_PATH
  if (use_avx2()) return avx2::filtfilt_inplace<W>(sig, T, f);
#endif
  base::filtfilt_inplace<W>(sig, T, f);
}

// x: n_in samples x W lanes interleaved; y: out_len(n_in) x W interleaved.
template <int W>
inline void resample_lanes(const double* x, int64_t n_in, const Polyphase& ph, double* y) {
#ifdef CBF_HAVE_AVX2_PATH
  if (use_avx2()) return avx2::resample_lanes<W>(x, n_in, ph, y);
#endif
  base::resample_lanes<W>(x, n_in, ph, y);
}

}  // namespace cbf
