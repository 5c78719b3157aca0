// patchify: cut rows of length T into N = T / patch whole patches (the remainder is dropped).
// Input is a C-contiguous (rows, T) array; output is a new (rows, N, patch) array.
#include "common.hpp"

#include <cstring>

namespace cbf {

template <typename T>
py::array_t<T> patchify_impl(py::array_t<T, py::array::c_style> x, int64_t patch, int threads) {
  if (x.ndim() != 2) throw std::invalid_argument("patchify: expected a 2-D (rows, T) array");
  const int64_t rows = x.shape(0), len = x.shape(1);
  if (patch <= 0) throw std::invalid_argument("patchify: patch size must be positive, got " + std::to_string(patch));
  if (len < patch)
    throw std::invalid_argument("patchify: signal length " + std::to_string(len) +
                                " is shorter than one patch (" + std::to_string(patch) + ")");
  const int64_t n = len / patch;
  py::array_t<T> out({rows, n, patch});
  const T* src = x.data();
  T* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    // The kept part of each row is contiguous, so each row is one memcpy.
    parallel_for(rows, threads, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r)
        std::memcpy(dst + r * n * patch, src + r * len, sizeof(T) * n * patch);
    });
  }
  return out;
}

void register_patchify(py::module_& m) {
  m.def("patchify_f32", &patchify_impl<float>, py::arg("x"), py::arg("patch"), py::arg("threads") = 0);
  m.def("patchify_f64", &patchify_impl<double>, py::arg("x"), py::arg("patch"), py::arg("threads") = 0);
}

}  // namespace cbf
