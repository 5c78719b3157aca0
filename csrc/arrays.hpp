// Binding helpers: strided 2-D views of numpy arrays and filter/FIR construction from Python arrays.
#pragma once

#include "common.hpp"
#include "dsp.hpp"

namespace cbf {

// A (rows, len) view with element strides (any layout, including Fortran order and negative strides).
template <typename T>
struct RowView {
  const T* data;
  int64_t rows, len, row_stride, col_stride;
};

template <typename T>
RowView<T> row_view(const py::array_t<T, 0>& x, const char* who) {
  if (x.ndim() != 2) throw std::invalid_argument(std::string(who) + ": expected a 2-D (rows, T) array");
  const auto isz = static_cast<int64_t>(sizeof(T));
  if (x.strides(0) % isz != 0 || x.strides(1) % isz != 0)
    throw std::invalid_argument(std::string(who) + ": strides must be multiples of the item size");
  return {x.data(), x.shape(0), x.shape(1), x.strides(0) / isz, x.strides(1) / isz};
}

using DoubleArray = py::array_t<double, py::array::c_style | py::array::forcecast>;

// sos: (n_sections, 6) with a0 == 1 (normalised by the caller); zi: (n_sections, 2). n_sections may be 0.
inline SosFilter make_sos(const DoubleArray& sos, const DoubleArray& zi, int64_t padlen) {
  SosFilter f;
  if (sos.size() == 0) return f;
  if (sos.ndim() != 2 || sos.shape(1) != 6) throw std::invalid_argument("sos must have shape (n_sections, 6)");
  if (zi.ndim() != 2 || zi.shape(0) != sos.shape(0) || zi.shape(1) != 2)
    throw std::invalid_argument("zi must have shape (n_sections, 2)");
  if (padlen < 0) throw std::invalid_argument("padlen must be >= 0");
  f.n_sections = static_cast<int>(sos.shape(0));
  f.coef.assign(sos.data(), sos.data() + sos.size());
  f.zi.assign(zi.data(), zi.data() + zi.size());
  f.padlen = padlen;
  return f;
}

inline Polyphase make_polyphase(const DoubleArray& h, int64_t up, int64_t down) {
  if (up < 1 || down < 1) throw std::invalid_argument("up and down must be >= 1");
  if (h.ndim() != 1) throw std::invalid_argument("h must be 1-D");
  if (up == 1 && down == 1) return Polyphase{};
  if (h.size() < 1 || h.size() % 2 == 0) throw std::invalid_argument("h must have an odd number of taps");
  return Polyphase(h.data(), h.size(), up, down);
}

}  // namespace cbf
