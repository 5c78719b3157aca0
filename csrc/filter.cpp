// Zero-phase IIR filtering of (rows, T) arrays: scipy.signal.sosfiltfilt / filtfilt with odd padding.
// The Python side designs the filter (scipy) and passes normalised sections, sosfilt_zi and padlen.
#include "arrays.hpp"

namespace cbf {

template <int W, typename T>
void filtfilt_rows(const RowView<T>& v, const SosFilter& f, T* out, std::vector<int64_t>& bad, int threads) {
  const int64_t n_blocks = (v.rows + W - 1) / W, len = v.len, P = f.padlen;
  parallel_for(n_blocks, threads, [&](int64_t b, int64_t e) {
    std::vector<double> buf(static_cast<size_t>((len + 2 * P) * W));
    int64_t first_bad[W];
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t r0 = blk * W, nr = std::min<int64_t>(W, v.rows - r0);
      double* sig = buf.data() + P * W;
      load_lanes<W>(v.data + r0 * v.row_stride, nr, v.row_stride, v.col_stride, len, sig, first_bad);
      bool any_bad = false;
      for (int l = 0; l < nr; ++l) {
        bad[r0 + l] = first_bad[l];
        any_bad |= first_bad[l] >= 0;
      }
      if (any_bad) continue;  // the caller raises; no point filtering
      filtfilt_inplace<W>(sig, len, f);
      for (int l = 0; l < nr; ++l) {
        T* dst = out + (r0 + l) * len;
        for (int64_t t = 0; t < len; ++t) dst[t] = static_cast<T>(sig[t * W + l]);
      }
    }
  });
}

// Returns (y, bad_row, bad_sample): bad_row >= 0 names the first row holding a NaN/Inf (y is then garbage).
template <typename T>
py::tuple filtfilt_impl(py::array_t<T, 0> x, DoubleArray sos, DoubleArray zi, int64_t padlen, int threads) {
  const RowView<T> v = row_view(x, "filtfilt");
  const SosFilter f = make_sos(sos, zi, padlen);
  if (f.n_sections == 0) throw std::invalid_argument("filtfilt: no filter sections");
  if (v.len <= f.padlen)
    throw std::invalid_argument("The length of the input vector x must be greater than padlen, which is " +
                                std::to_string(f.padlen) + ".");
  py::array_t<T> out({v.rows, v.len});
  T* dst = out.mutable_data();
  std::vector<int64_t> bad(static_cast<size_t>(v.rows), -1);
  {
    py::gil_scoped_release release;
    if (v.rows == 1)
      filtfilt_rows<1>(v, f, dst, bad, threads);
    else
      filtfilt_rows<4>(v, f, dst, bad, threads);
  }
  for (int64_t r = 0; r < v.rows; ++r)
    if (bad[r] >= 0) return py::make_tuple(out, r, bad[r]);
  return py::make_tuple(out, int64_t{-1}, int64_t{-1});
}

void register_filter(py::module_& m) {
  m.def("default_threads", &available_cores, "Threads used for threads=0: the cores this process may run on");
  m.def("simd_path", [] { return std::string(use_avx2() ? "avx2+fma" : "baseline"); },
        "Which build of the filtering/resampling kernels runs: 'avx2+fma' or 'baseline' (x86-64 SSE2 / generic)");
  m.def("filtfilt_f32", &filtfilt_impl<float>, py::arg("x"), py::arg("sos"), py::arg("zi"), py::arg("padlen"),
        py::arg("threads") = 0);
  m.def("filtfilt_f64", &filtfilt_impl<double>, py::arg("x"), py::arg("sos"), py::arg("zi"), py::arg("padlen"),
        py::arg("threads") = 0);
}

}  // namespace cbf
