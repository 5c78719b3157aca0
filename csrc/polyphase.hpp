// Polyphase resampling kernel shared by resample.cpp and preprocess.cpp.
//
// Reproduces scipy.signal.resample_poly(x, up, down) with padtype="constant" (zeros): with h the
// (2*half_len + 1)-tap FIR already scaled by `up`, scipy pre-pads h so that output i lands on the filter
// centre, which works out to  y[i] = sum_j h[j] * xu[i*down + half_len - j],  xu the zero-stuffed input
// (xu[m] = x[m/up] when up divides m and 0 <= m/up < n_in), for i < ceil(n_in*up/down).
// Each output only touches the taps of one phase, so the taps are regrouped per phase.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace cbf {

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

// x: n_in samples x W lanes interleaved; y: out_len(n_in) x W interleaved.
template <int W>
inline void resample_lanes(const double* x, int64_t n_in, const Polyphase& ph, double* y) {
  const int64_t n_out = ph.out_len(n_in);
  for (int64_t i = 0; i < n_out; ++i) {
    const int64_t m = i * ph.down + ph.half_len;
    const int64_t n = m / ph.up, p = m % ph.up;
    const std::vector<double>& g = ph.phases[p];
    const int64_t k_lo = std::max<int64_t>(0, n - (n_in - 1));
    const int64_t k_hi = std::min<int64_t>(static_cast<int64_t>(g.size()) - 1, n);
    double acc[W] = {};
    for (int64_t k = k_lo; k <= k_hi; ++k) {
      const double gk = g[k];
      const double* xs = x + (n - k) * W;
      for (int l = 0; l < W; ++l) acc[l] += gk * xs[l];
    }
    for (int l = 0; l < W; ++l) y[i * W + l] = acc[l];
  }
}

}  // namespace cbf
