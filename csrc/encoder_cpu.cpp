// CPU inference kernels of the encoder (criss-cross attention, bias + GELU, bf16 rounding) on raw float32
// buffers owned by torch tensors.
// The Python side (cbramod_fast/kernels/cpu_attention.py) checks dtypes, devices and shapes and passes data
// pointers and element strides; nothing here allocates tensors or keeps a pointer after returning.
#include <cmath>
#include <limits>

#include "encoder_cpu.hpp"
#include "common.hpp"

namespace cbf {

#pragma GCC diagnostic ignored "-Wpsabi"
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

namespace base {
#include "encoder_cpu_kernels.inc"
}  // namespace base

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CBF_HAVE_AVX2_ENCODER 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "encoder_cpu_kernels.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif

namespace {

// Same switch as the signal kernels (dsp.hpp): AVX2+FMA when the CPU has it, unless CBRAMOD_FAST_SIMD=baseline.
bool encoder_avx2() {
#ifdef CBF_HAVE_AVX2_ENCODER
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

void run(const AttentionHalf* halves, int n, int heads, int head_dim, int threads) {
#ifdef CBF_HAVE_AVX2_ENCODER
  if (encoder_avx2()) return avx2::attend_halves(halves, n, heads, head_dim, threads);
#endif
  base::attend_halves(halves, n, heads, head_dim, threads);
}

AttentionHalf half_from(const py::tuple& t) {
  if (t.size() != 11) throw std::invalid_argument("attention half: expected 11 values");
  auto i = [&](int k) { return t[k].cast<int64_t>(); };
  AttentionHalf h;
  h.qkv = reinterpret_cast<const float*>(t[0].cast<uintptr_t>());
  h.n_a = i(1);
  h.n_b = i(2);
  h.in_a = i(3);
  h.in_b = i(4);
  h.in_row = i(5);
  h.out = reinterpret_cast<float*>(t[6].cast<uintptr_t>());
  h.out_a = i(7);
  h.out_b = i(8);
  h.out_row = i(9);
  h.len = i(10);
  if (h.n_a < 0 || h.n_b < 0 || h.len < 1) throw std::invalid_argument("attention half: bad sizes");
  return h;
}

}  // namespace

void register_encoder_cpu(py::module_& m) {
  m.def(
      "attention_f32",
      [](const py::list& halves, int heads, int head_dim, int threads) {
        std::vector<AttentionHalf> hs;
        for (const auto& h : halves) hs.push_back(half_from(h.cast<py::tuple>()));
        if (heads < 1 || head_dim < 1 || head_dim > 256)
          throw std::invalid_argument("attention: need heads >= 1 and 1 <= head_dim <= 256");
        py::gil_scoped_release release;
        run(hs.data(), static_cast<int>(hs.size()), heads, head_dim, threads);
      },
      py::arg("halves"), py::arg("heads"), py::arg("head_dim"), py::arg("threads") = 1,
      "Softmax attention over float32 sequences given as (qkv_ptr, n_a, n_b, in_a, in_b, in_row, out_ptr, "
      "out_a, out_b, out_row, len) tuples (element strides); all halves share heads and head_dim");
  m.def(
      "round_bf16_f32",
      [](uintptr_t ptr, int64_t n, int threads) {
        float* x = reinterpret_cast<float*>(ptr);
        py::gil_scoped_release release;
        parallel_for_team((n + 4095) / 4096, threads, [&](int64_t b, int64_t e) {
          const int64_t lo = b * 4096, hi = std::min(n, e * 4096);
#ifdef CBF_HAVE_AVX2_ENCODER
          if (encoder_avx2()) return avx2::round_bf16(x + lo, hi - lo);
#endif
          base::round_bf16(x + lo, hi - lo);
        });
      },
      py::arg("ptr"), py::arg("n"), py::arg("threads") = 1,
      "Round n contiguous float32 values to the nearest bfloat16 (ties to even), in place");
  m.def(
      "bias_gelu_f32",
      [](uintptr_t ptr, int64_t rows, int64_t n, int64_t row_stride, uintptr_t bias, int threads) {
        float* x = reinterpret_cast<float*>(ptr);
        const float* b = reinterpret_cast<const float*>(bias);
        py::gil_scoped_release release;
        parallel_for_team((rows + 15) / 16, threads, [&](int64_t lo, int64_t hi) {
          const int64_t r0 = lo * 16, nr = std::min(rows, hi * 16) - r0;
#ifdef CBF_HAVE_AVX2_ENCODER
          if (encoder_avx2()) return avx2::bias_gelu_rows(x + r0 * row_stride, nr, n, row_stride, b);
#endif
          base::bias_gelu_rows(x + r0 * row_stride, nr, n, row_stride, b);
        });
      },
      py::arg("ptr"), py::arg("rows"), py::arg("n"), py::arg("row_stride"), py::arg("bias"), py::arg("threads") = 1,
      "In place: x[r, :n] = gelu(x[r, :n] + bias) (erf form) over float32 rows; bias 0 = none");
  m.def(
      "layer_norm_f32",
      [](uintptr_t x, int64_t b, int64_t c, int64_t n, int64_t d, uintptr_t w, uintptr_t bias, float eps,
         uintptr_t out_lo, uintptr_t out_hi, int64_t split, bool lo_bnc, int threads) {
        // x: (B, C, N, d) contiguous. Features [0, split) go to out_lo, [split, d) to out_hi, both row-major
        // with row lengths split and d - split; out_lo's rows in (B, N, C) order when lo_bnc, else (B, C, N).
        const float* xp = reinterpret_cast<const float*>(x);
        const float* wp = reinterpret_cast<const float*>(w);
        const float* bp = reinterpret_cast<const float*>(bias);
        float* lo = reinterpret_cast<float*>(out_lo);
        float* hi = reinterpret_cast<float*>(out_hi);
        const int64_t rows = b * c * n;
        py::gil_scoped_release release;
        parallel_for_team((rows + 63) / 64, threads, [&](int64_t blo, int64_t bhi) {
          for (int64_t r = blo * 64; r < std::min(rows, bhi * 64); ++r) {
            const int64_t bi = r / (c * n), ci = (r / n) % c, ni = r % n;
            const int64_t r_lo = lo_bnc ? (bi * n + ni) * c + ci : r;
#ifdef CBF_HAVE_AVX2_ENCODER
            if (encoder_avx2()) {
              avx2::layer_norm_row(xp + r * d, d, wp, bp, eps, split, lo + r_lo * split, hi + r * (d - split));
              continue;
            }
#endif
            base::layer_norm_row(xp + r * d, d, wp, bp, eps, split, lo + r_lo * split, hi + r * (d - split));
          }
        });
      },
      py::arg("x"), py::arg("b"), py::arg("c"), py::arg("n"), py::arg("d"), py::arg("w"), py::arg("bias"),
      py::arg("eps"), py::arg("out_lo"), py::arg("out_hi"), py::arg("split"), py::arg("lo_bnc"),
      py::arg("threads") = 1, "LayerNorm of float32 rows into two destinations (see the source)");
  m.def("encoder_simd_path", [] { return std::string(encoder_avx2() ? "avx2+fma" : "baseline"); });
  m.def("encoder_thread_team", [] { return std::string(process_openmp() ? "openmp" : "threads"); },
        "Whose threads the encoder kernels run on: the process's OpenMP team (torch's) or threads of their own");
}

}  // namespace cbf
