// Entry point of cbramod_fast._ext: each concern registers its own functions.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace cbf {
void register_patchify(py::module_& m);
void register_filter(py::module_& m);
void register_resample(py::module_& m);
void register_preprocess(py::module_& m);
void register_encoder_cpu(py::module_& m);
}  // namespace cbf

PYBIND11_MODULE(_ext, m) {
  m.doc() = "cbramod_fast native kernels (filtering, resampling, patching; CPU criss-cross attention); GIL released";
  cbf::register_patchify(m);
  cbf::register_filter(m);
  cbf::register_resample(m);
  cbf::register_preprocess(m);
  cbf::register_encoder_cpu(m);
}
