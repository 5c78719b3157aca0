// Zero-phase IIR filtering kernel shared by filter.cpp and preprocess.cpp.
//
// Reproduces scipy.signal.sosfiltfilt / filtfilt (padtype="odd"): odd extension by `padlen` samples at both
// ends, a forward SOS pass started from sosfilt_zi * first sample, a backward pass started from
// sosfilt_zi * last forward output, then the extension is cut off. Direct form II transposed, like scipy,
// accumulated in double. W rows are processed together, interleaved sample-major ([t][W]), so the
// loop-carried recursion of W independent rows overlaps (the single-row recursion is latency bound).
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

namespace cbf {

// Second-order sections normalised to a0 == 1, with their steady-state initial conditions.
struct SosFilter {
  int n_sections = 0;
  std::vector<double> coef;  // n_sections x 6: b0 b1 b2 a0 a1 a2
  std::vector<double> zi;    // n_sections x 2: sosfilt_zi (per unit step)
  int64_t padlen = 0;
};

// One pass over buf[0..len) (interleaved W lanes), forward (dir > 0) or backward.
template <int W>
inline void sos_pass(double* buf, int64_t len, bool forward, const SosFilter& f) {
  const int ns = f.n_sections;
  std::vector<double> z(static_cast<size_t>(ns) * 2 * W);
  const double* first = forward ? buf : buf + (len - 1) * W;
  for (int s = 0; s < ns; ++s)
    for (int l = 0; l < W; ++l) {
      z[(s * 2 + 0) * W + l] = f.zi[s * 2 + 0] * first[l];
      z[(s * 2 + 1) * W + l] = f.zi[s * 2 + 1] * first[l];
    }
  const double* c = f.coef.data();
  double* zp = z.data();
  for (int64_t i = 0; i < len; ++i) {
    double* p = forward ? buf + i * W : buf + (len - 1 - i) * W;
    double v[W];
    for (int l = 0; l < W; ++l) v[l] = p[l];
    for (int s = 0; s < ns; ++s) {
      const double b0 = c[s * 6 + 0], b1 = c[s * 6 + 1], b2 = c[s * 6 + 2];
      const double a1 = c[s * 6 + 4], a2 = c[s * 6 + 5];
      double* z0 = zp + (s * 2 + 0) * W;
      double* z1 = zp + (s * 2 + 1) * W;
      for (int l = 0; l < W; ++l) {
        const double y = b0 * v[l] + z0[l];
        z0[l] = b1 * v[l] - a1 * y + z1[l];
        z1[l] = b2 * v[l] - a2 * y;
        v[l] = y;
      }
    }
    for (int l = 0; l < W; ++l) p[l] = v[l];
  }
}

// In place: the signal (T samples, W lanes) sits at sig; sig[-padlen*W .. 0) and sig[T*W .. (T+padlen)*W)
// must be writable scratch. Requires T > padlen (checked by the caller, as scipy does).
template <int W>
inline void filtfilt_inplace(double* sig, int64_t T, const SosFilter& f) {
  const int64_t P = f.padlen;
  for (int64_t i = 1; i <= P; ++i)
    for (int l = 0; l < W; ++l) {
      sig[-i * W + l] = 2.0 * sig[l] - sig[i * W + l];
      sig[(T - 1 + i) * W + l] = 2.0 * sig[(T - 1) * W + l] - sig[(T - 1 - i) * W + l];
    }
  double* ext = sig - P * W;
  const int64_t len = T + 2 * P;
  sos_pass<W>(ext, len, true, f);
  sos_pass<W>(ext, len, false, f);
}

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

}  // namespace cbf
