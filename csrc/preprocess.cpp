// The one-call corpus pipeline, fused per block of rows: load (NaN/Inf -> 0) -> zero-phase band-pass ->
// optional zero-phase notch -> polyphase resampling -> scale -> float32 patches, plus per-patch flags.
// Intermediates stay in per-thread double buffers of one block of rows: extra memory is O(threads * T),
// besides the float32 output.
#include "arrays.hpp"

#include <cstring>

namespace cbf {

enum PatchFlag : uint8_t { kFlat = 1, kClipped = 2, kOverAmplitude = 4, kNonFinite = 8 };

struct PreprocessParams {
  SosFilter band, notch;
  Polyphase ph;
  double scale = 1.0, max_abs = 0.0, flat_ptp = 0.0;
  bool check_max_abs = false;
  int64_t patch = 200, n_patches = 0, clip_run = 2;
};

// Flags visible in the raw row only: non-finite samples, and clipping = a run of >= clip_run consecutive
// samples equal to the row's largest (or smallest) finite value, when the row is not constant.
// Input sample s lands in output patch floor(s * up / (down * patch)).
template <typename T>
void raw_flags(const T* src, int64_t cs, int64_t len, const PreprocessParams& p, uint8_t* flags) {
  const int64_t den = p.ph.down * p.patch;
  auto patch_of = [&](int64_t s) { return (s * p.ph.up) / den; };
  auto mark = [&](int64_t s, uint8_t bit) {
    const int64_t k = patch_of(s);
    if (k < p.n_patches) flags[k] |= bit;
  };
  double hi = -INFINITY, lo = INFINITY;
  for (int64_t t = 0; t < len; ++t) {
    const double v = static_cast<double>(src[t * cs]);
    if (!std::isfinite(v)) {
      mark(t, kNonFinite);
    } else {
      hi = std::max(hi, v);
      lo = std::min(lo, v);
    }
  }
  if (!(hi > lo)) return;  // all non-finite, or constant (a flat row, not a clipped one)
  int64_t run_start = 0;
  double run_val = NAN;
  auto close_run = [&](int64_t end) {
    if (end - run_start >= p.clip_run)
      for (int64_t s = run_start; s < end; ++s) mark(s, kClipped);
  };
  for (int64_t t = 0; t < len; ++t) {
    const double v = static_cast<double>(src[t * cs]);
    const bool rail = v == hi || v == lo;
    if (rail && v == run_val) continue;
    if (run_val == run_val) close_run(t);  // a run was open (run_val not NaN)
    run_val = rail ? v : NAN;
    run_start = t;
  }
  if (run_val == run_val) close_run(len);
}

template <int W, typename T>
void preprocess_rows(const RowView<T>& v, const PreprocessParams& p, float* out, uint8_t* flags, int threads) {
  const int64_t len = v.len, n_blocks = (v.rows + W - 1) / W;
  const int64_t pad = std::max(p.band.padlen, p.notch.padlen);
  const int64_t n_out = p.ph.out_len(len), kept = p.n_patches * p.patch;
  parallel_for(n_blocks, threads, [&](int64_t b, int64_t e) {
    std::vector<double> buf(static_cast<size_t>((len + 2 * pad) * W));
    std::vector<double> ybuf(p.ph.identity() ? 0 : static_cast<size_t>(n_out * W));
    int64_t first_bad[W];
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t r0 = blk * W, nr = std::min<int64_t>(W, v.rows - r0);
      for (int l = 0; l < nr; ++l) {
        uint8_t* fl = flags + (r0 + l) * p.n_patches;
        std::memset(fl, 0, static_cast<size_t>(p.n_patches));
        raw_flags(v.data + (r0 + l) * v.row_stride, v.col_stride, len, p, fl);
      }
      double* sig = buf.data() + pad * W;
      load_lanes<W>(v.data + r0 * v.row_stride, nr, v.row_stride, v.col_stride, len, sig, first_bad);
      if (p.band.n_sections) filtfilt_inplace<W>(sig, len, p.band);
      if (p.notch.n_sections) filtfilt_inplace<W>(sig, len, p.notch);
      const double* y = sig;
      if (!p.ph.identity()) {
        resample_lanes<W>(sig, len, p.ph, ybuf.data());
        y = ybuf.data();
      }
      for (int l = 0; l < nr; ++l) {
        float* dst = out + (r0 + l) * kept;
        uint8_t* fl = flags + (r0 + l) * p.n_patches;
        for (int64_t k = 0; k < p.n_patches; ++k) {
          double mx = -INFINITY, mn = INFINITY;
          for (int64_t i = k * p.patch; i < (k + 1) * p.patch; ++i) {
            const double val = y[i * W + l];
            mx = std::max(mx, val);
            mn = std::min(mn, val);
            dst[i] = static_cast<float>(val * p.scale);
          }
          if ((mx - mn) * std::abs(p.scale) < p.flat_ptp) fl[k] |= kFlat;
          if (p.check_max_abs && std::max(mx, -mn) > p.max_abs) fl[k] |= kOverAmplitude;
        }
      }
    }
  });
}

// Returns (patches float32 (rows, N, patch), flags uint8 (rows, N)) with the PatchFlag bits.
template <typename T>
py::tuple preprocess_impl(py::array_t<T, 0> x, DoubleArray band_sos, DoubleArray band_zi, int64_t band_padlen,
                          DoubleArray notch_sos, DoubleArray notch_zi, int64_t notch_padlen, DoubleArray h,
                          int64_t up, int64_t down, double scale, int64_t patch, double max_abs, double flat_ptp,
                          int64_t clip_run, int threads) {
  const RowView<T> v = row_view(x, "preprocess");
  PreprocessParams p;
  p.band = make_sos(band_sos, band_zi, band_padlen);
  p.notch = make_sos(notch_sos, notch_zi, notch_padlen);
  p.ph = make_polyphase(h, up, down);
  p.scale = scale;
  p.check_max_abs = std::isfinite(max_abs);
  p.max_abs = max_abs;
  p.flat_ptp = flat_ptp;
  p.clip_run = std::max<int64_t>(1, clip_run);
  if (patch <= 0) throw std::invalid_argument("preprocess: patch must be positive");
  p.patch = patch;
  const int64_t need = std::max(p.band.n_sections ? p.band.padlen : -1, p.notch.n_sections ? p.notch.padlen : -1);
  if (v.len <= need)
    throw std::invalid_argument("The length of the input vector x must be greater than padlen, which is " +
                                std::to_string(need) + ".");
  const int64_t n_out = p.ph.out_len(v.len);
  p.n_patches = n_out / patch;
  if (p.n_patches < 1)
    throw std::invalid_argument("preprocess: the resampled signal (" + std::to_string(n_out) +
                                " samples) is shorter than one patch (" + std::to_string(patch) + ")");
  py::array_t<float> out({v.rows, p.n_patches, patch});
  py::array_t<uint8_t> flags({v.rows, p.n_patches});
  float* dst = out.mutable_data();
  uint8_t* fl = flags.mutable_data();
  {
    py::gil_scoped_release release;
    if (v.rows == 1)
      preprocess_rows<1>(v, p, dst, fl, threads);
    else
      preprocess_rows<4>(v, p, dst, fl, threads);
  }
  return py::make_tuple(out, flags);
}

void register_preprocess(py::module_& m) {
  m.attr("FLAG_FLAT") = static_cast<int>(kFlat);
  m.attr("FLAG_CLIPPED") = static_cast<int>(kClipped);
  m.attr("FLAG_OVER_AMPLITUDE") = static_cast<int>(kOverAmplitude);
  m.attr("FLAG_NONFINITE") = static_cast<int>(kNonFinite);
  m.def("preprocess_f32", &preprocess_impl<float>, py::arg("x"), py::arg("band_sos"), py::arg("band_zi"),
        py::arg("band_padlen"), py::arg("notch_sos"), py::arg("notch_zi"), py::arg("notch_padlen"), py::arg("h"),
        py::arg("up"), py::arg("down"), py::arg("scale"), py::arg("patch"), py::arg("max_abs"),
        py::arg("flat_ptp"), py::arg("clip_run"), py::arg("threads") = 0);
  m.def("preprocess_f64", &preprocess_impl<double>, py::arg("x"), py::arg("band_sos"), py::arg("band_zi"),
        py::arg("band_padlen"), py::arg("notch_sos"), py::arg("notch_zi"), py::arg("notch_padlen"), py::arg("h"),
        py::arg("up"), py::arg("down"), py::arg("scale"), py::arg("patch"), py::arg("max_abs"),
        py::arg("flat_ptp"), py::arg("clip_run"), py::arg("threads") = 0);
}

}  // namespace cbf
