// Polyphase resampling of (rows, T) arrays: scipy.signal.resample_poly(x, up, down, axis=-1).
// The Python side designs the FIR (scipy.signal.firwin, Kaiser beta 5, times `up`).
#include "arrays.hpp"

namespace cbf {

template <int W, typename T>
void resample_rows(const RowView<T>& v, const Polyphase& ph, T* out, std::vector<int64_t>& bad, int threads) {
  const int64_t n_blocks = (v.rows + W - 1) / W, len = v.len, n_out = ph.out_len(len);
  parallel_for(n_blocks, threads, [&](int64_t b, int64_t e) {
    std::vector<double> xbuf(static_cast<size_t>(len * W)), ybuf(static_cast<size_t>(n_out * W));
    int64_t first_bad[W];
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t r0 = blk * W, nr = std::min<int64_t>(W, v.rows - r0);
      load_lanes<W>(v.data + r0 * v.row_stride, nr, v.row_stride, v.col_stride, len, xbuf.data(), first_bad);
      bool any_bad = false;
      for (int l = 0; l < nr; ++l) {
        bad[r0 + l] = first_bad[l];
        any_bad |= first_bad[l] >= 0;
      }
      if (any_bad) continue;
      const double* y = xbuf.data();
      if (!ph.identity()) {
        resample_lanes<W>(xbuf.data(), len, ph, ybuf.data());
        y = ybuf.data();
      }
      for (int l = 0; l < nr; ++l) {
        T* dst = out + (r0 + l) * n_out;
        for (int64_t t = 0; t < n_out; ++t) dst[t] = static_cast<T>(y[t * W + l]);
      }
    }
  });
}

template <typename T>
py::tuple resample_impl(py::array_t<T, 0> x, DoubleArray h, int64_t up, int64_t down, int threads) {
  const RowView<T> v = row_view(x, "resample");
  const Polyphase ph = make_polyphase(h, up, down);
  if (v.len < 1) throw std::invalid_argument("resample: empty signal");
  const int64_t n_out = ph.out_len(v.len);
  py::array_t<T> out({v.rows, n_out});
  T* dst = out.mutable_data();
  std::vector<int64_t> bad(static_cast<size_t>(v.rows), -1);
  {
    py::gil_scoped_release release;
    if (v.rows == 1)
      resample_rows<1>(v, ph, dst, bad, threads);
    else
      resample_rows<4>(v, ph, dst, bad, threads);
  }
  for (int64_t r = 0; r < v.rows; ++r)
    if (bad[r] >= 0) return py::make_tuple(out, r, bad[r]);
  return py::make_tuple(out, int64_t{-1}, int64_t{-1});
}

void register_resample(py::module_& m) {
  m.def("resample_f32", &resample_impl<float>, py::arg("x"), py::arg("h"), py::arg("up"), py::arg("down"),
        py::arg("threads") = 0);
  m.def("resample_f64", &resample_impl<double>, py::arg("x"), py::arg("h"), py::arg("up"), py::arg("down"),
        py::arg("threads") = 0);
}

}  // namespace cbf
