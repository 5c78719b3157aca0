// CPU inference kernels of the encoder (criss-cross attention, bias + GELU, bf16 rounding) on raw float32
// buffers owned by torch tensors.
// The Python side (cbramod_fast/kernels/cpu_attention.py) checks dtypes, devices and shapes and passes data
// pointers and element strides; nothing here allocates tensors or keeps a pointer after returning.
#include <cmath>
#include <limits>
#include <type_traits>

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

// Call the kernel `fn` (void) of the AVX2+FMA build where encoder_avx2(), else of the portable build.
#ifdef CBF_HAVE_AVX2_ENCODER
#define CBF_ENCODER_KERNEL(fn, ...) (encoder_avx2() ? avx2::fn(__VA_ARGS__) : base::fn(__VA_ARGS__))
#else
#define CBF_ENCODER_KERNEL(fn, ...) base::fn(__VA_ARGS__)
#endif

void run(const AttentionHalf* halves, int n, int heads, int head_dim, int threads) {
  CBF_ENCODER_KERNEL(attend_halves, halves, n, heads, head_dim, threads);
}

// fn(lo, hi) over [0, n) in ranges of whole blocks of 4096 elements, in parallel (element-wise kernels).
template <typename Fn>
void parallel_elements(int64_t n, int threads, Fn fn) {
  constexpr int64_t kBlock = 4096;
  parallel_for_team((n + kBlock - 1) / kBlock, threads,
                    [&](int64_t b, int64_t e) { fn(b * kBlock, std::min(n, e * kBlock)); });
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

// The GEMMs' work items: blocks of up to kGemmRows rows against blocks of panels of about 256 KB in all; row
// blocks innermost, so that a thread's consecutive items share their panels (in L2).
struct GemmBlocks {
  std::vector<int64_t> first;  // first item of each task (and the total at the end)
  std::vector<int64_t> row_blocks, panels_per_block;

  explicit GemmBlocks(const std::vector<GemmTask>& ts) {
    first.push_back(0);
    for (const auto& g : ts) {
      const int64_t per = std::max<int64_t>(1, (int64_t{256} << 10) / (g.k * kGemmPanel * int64_t{sizeof(float)}));
      row_blocks.push_back((g.m + kGemmRows - 1) / kGemmRows);
      panels_per_block.push_back(per);
      first.push_back(first.back() + row_blocks.back() * ((gemm_panels(g.n) + per - 1) / per));
    }
  }
};

void run_gemms(const std::vector<GemmTask>& ts, int threads) {
  const GemmBlocks blocks(ts);
  parallel_for_team(blocks.first.back(), threads, [&](int64_t lo, int64_t hi) {
    for (int64_t item = lo; item < hi; ++item) {
      size_t t = std::upper_bound(blocks.first.begin(), blocks.first.end(), item) - blocks.first.begin() - 1;
      const GemmTask& g = ts[t];
      const int64_t local = item - blocks.first[t], rb = local % blocks.row_blocks[t];
      const int64_t pb = local / blocks.row_blocks[t], per = blocks.panels_per_block[t];
      const int64_t r0 = rb * kGemmRows, r1 = std::min(g.m, r0 + kGemmRows);
      const int64_t p0 = pb * per, p1 = std::min(gemm_panels(g.n), p0 + per);
      CBF_ENCODER_KERNEL(gemm_block, g, r0, r1, p0, p1);
    }
  });
}

// Blocks of at most kGemmRows rows, fewer (multiples of 6) when that leaves a thread without two blocks.
void run_ffn(const FfnTask& t, int threads) {
  threads = resolve_threads(threads, t.m);
  const int64_t per_block = (t.m + 2 * threads - 1) / (2 * threads);
  const int64_t rows_per = std::clamp<int64_t>((per_block + 5) / 6 * 6, 6, kGemmRows);
  parallel_for_team((t.m + rows_per - 1) / rows_per, threads, [&](int64_t lo, int64_t hi) {
    thread_local std::vector<float> h, f;
    h.resize(rows_per * t.d);
    f.resize(rows_per * t.ff);
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t r0 = b * rows_per, rows = std::min(rows_per, t.m - r0);
      CBF_ENCODER_KERNEL(ffn_rows, t, r0, rows, h.data(), f.data());
    }
  });
}

// The stem in four passes over the rows (conv 1; norm + conv 2; norm + conv 3; norm), each parallel over
// blocks of kStemRows patches. A GroupNorm needs its sample's statistics before the next pass: each block adds
// its patches' sums to its own slot (double), and the slots of a sample are summed in block order after the
// pass, so the result does not depend on the thread count.
constexpr int64_t kStemRows = 16;

void run_stem(const StemTask& t, int threads) {
  const int64_t per_sample = (t.rows + kStemRows - 1) / kStemRows, items = t.batch * per_sample;
  constexpr int nstat = 2 * kStemGroups, per = kStemChannels / kStemGroups;
  std::vector<double> stats(static_cast<size_t>(items) * nstat);
  std::vector<float> scale(static_cast<size_t>(t.batch) * kStemChannels), shift(scale.size());
  for (int stage = 0; stage < 4; ++stage) {
    std::fill(stats.begin(), stats.end(), 0.0);
    parallel_for_team(items, threads, [&](int64_t lo, int64_t hi) {
      for (int64_t it = lo; it < hi; ++it) {
        const int64_t s = it / per_sample, r0 = s * t.rows + (it % per_sample) * kStemRows;
        const int64_t r1 = std::min(r0 + kStemRows, (s + 1) * t.rows);
        double* st = stats.data() + it * nstat;
        if (stage == 0) {
          CBF_ENCODER_KERNEL(stem_conv1, t, r0, r1, st);
        } else {
          const float* sc = scale.data() + s * kStemChannels;
          const float* sh = shift.data() + s * kStemChannels;
          CBF_ENCODER_KERNEL(stem_norm_conv, t, stage, r0, r1, sc, sh, st);
        }
      }
    });
    if (stage == 3) break;
    // GroupNorm of stage's conv output: y * scale + shift with scale = rstd * gamma, shift = beta - mean * scale.
    const double n = static_cast<double>(t.rows) * per * kStemPositions;
    for (int64_t s = 0; s < t.batch; ++s)
      for (int g = 0; g < kStemGroups; ++g) {
        double sum = 0.0, sq = 0.0;
        for (int64_t it = s * per_sample; it < (s + 1) * per_sample; ++it) {
          sum += stats[it * nstat + 2 * g];
          sq += stats[it * nstat + 2 * g + 1];
        }
        const double mean = sum / n, var = std::max(0.0, sq / n - mean * mean);
        const double rstd = 1.0 / std::sqrt(var + static_cast<double>(t.eps));
        for (int c = g * per; c < (g + 1) * per; ++c) {
          const double a = rstd * t.gn_w[stage][c];
          scale[s * kStemChannels + c] = static_cast<float>(a);
          shift[s * kStemChannels + c] = static_cast<float>(t.gn_b[stage][c] - mean * a);
        }
      }
  }
}

GemmTask gemm_from(const py::tuple& t) {
  if (t.size() != 12) throw std::invalid_argument("gemm: expected 12 values");
  auto i = [&](int k) { return t[k].cast<int64_t>(); };
  auto f = [&](int k) { return reinterpret_cast<float*>(t[k].cast<uintptr_t>()); };
  GemmTask g{f(0), i(1), f(2), f(3), f(4), i(5), f(6), i(7), i(8), i(9), i(10), t[11].cast<bool>()};
  if (g.m < 0 || g.n < 1 || g.k < 1 || !g.a || !g.b_packed || !g.out)
    throw std::invalid_argument("gemm: bad sizes or null pointer");
  return g;
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
        parallel_elements(n, threads, [&](int64_t lo, int64_t hi) { CBF_ENCODER_KERNEL(round_bf16, x + lo, hi - lo); });
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
          CBF_ENCODER_KERNEL(bias_gelu_rows, x + r0 * row_stride, nr, n, row_stride, b);
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
            CBF_ENCODER_KERNEL(layer_norm_row, xp + r * d, d, wp, bp, eps, split, lo + r_lo * split,
                               hi + r * (d - split));
          }
        });
      },
      py::arg("x"), py::arg("b"), py::arg("c"), py::arg("n"), py::arg("d"), py::arg("w"), py::arg("bias"),
      py::arg("eps"), py::arg("out_lo"), py::arg("out_hi"), py::arg("split"), py::arg("lo_bnc"),
      py::arg("threads") = 1, "LayerNorm of float32 rows into two destinations (see the source)");
  m.def(
      "gemm_f32",
      [](const py::list& tasks, int threads) {
        std::vector<GemmTask> ts;
        for (const auto& t : tasks) ts.push_back(gemm_from(t.cast<py::tuple>()));
        py::gil_scoped_release release;
        run_gemms(ts, threads);
      },
      py::arg("tasks"), py::arg("threads") = 1,
      "float32 GEMMs with epilogue, all in one parallel pass: tasks are (a, lda, b_packed, bias, res, ldr, out, "
      "ldo, m, n, k, gelu) tuples (pointers as integers, 0 = none; strides in elements), see GemmTask");
  m.def(
      "ffn_f32",
      [](uintptr_t x, uintptr_t out, int64_t m, int64_t d, int64_t ff, uintptr_t ln_w, uintptr_t ln_b, float eps,
         uintptr_t w1, uintptr_t b1, uintptr_t w2, uintptr_t b2, int threads) {
        auto p = [](uintptr_t v) { return reinterpret_cast<float*>(v); };
        if (m < 0 || d < 1 || ff < 1) throw std::invalid_argument("ffn: bad sizes");
        const FfnTask t{p(x), p(out), m, d, ff, p(ln_w), p(ln_b), eps, p(w1), p(b1), p(w2), p(b2)};
        py::gil_scoped_release release;
        run_ffn(t, threads);
      },
      py::arg("x"), py::arg("out"), py::arg("m"), py::arg("d"), py::arg("ff"), py::arg("ln_w"), py::arg("ln_b"),
      py::arg("eps"), py::arg("w1"), py::arg("b1"), py::arg("w2"), py::arg("b2"), py::arg("threads") = 1,
      "The feed-forward block, out = x + GELU(LayerNorm(x) W1 + b1) W2 + b2, per block of 48 rows (see FfnTask)");
  m.def(
      "patch_stem_f32",
      [](uintptr_t x, uintptr_t out, int64_t batch, int64_t rows, int64_t len, const py::tuple& params, float eps,
         int threads) {
        // params: 12 pointers, (w, b, gn_w, gn_b) of the three convs in turn
        if (params.size() != 12) throw std::invalid_argument("patch stem: expected 12 parameter pointers");
        if (batch < 0 || rows < 1 || (len - 1) / kStemStride + 1 != kStemPositions)
          throw std::invalid_argument("patch stem: need rows >= 1 and 176 <= len <= 200");
        auto p = [&](int k) { return reinterpret_cast<const float*>(params[k].cast<uintptr_t>()); };
        StemTask t{reinterpret_cast<const float*>(x), reinterpret_cast<float*>(out), batch, rows, len,
                   {p(0), p(4), p(8)}, {p(1), p(5), p(9)}, {p(2), p(6), p(10)}, {p(3), p(7), p(11)}, eps};
        py::gil_scoped_release release;
        run_stem(t, threads);
      },
      py::arg("x"), py::arg("out"), py::arg("batch"), py::arg("rows"), py::arg("len"), py::arg("params"),
      py::arg("eps"), py::arg("threads") = 1,
      "The patch embedding's conv stem (3 x conv + GroupNorm + GELU) over float32 patches, see StemTask");
  m.def(
      "pos_conv_f32",
      [](uintptr_t h, uintptr_t w, uintptr_t bias, uintptr_t out, int64_t b, int64_t c, int64_t n, int64_t d, int kh,
         int kw, int ph, int pw, int threads) {
        if (b < 0 || c < 1 || n < 1 || d < 8 || d % 8 || kh < 1 || kw < 1 || ph < 0 || pw < 0)
          throw std::invalid_argument("pos conv: bad sizes (d must be a positive multiple of 8)");
        const PosConvTask t{reinterpret_cast<const float*>(h), reinterpret_cast<const float*>(w),
                            reinterpret_cast<const float*>(bias), reinterpret_cast<float*>(out), b, c, n, d,
                            kh, kw, ph, pw};
        py::gil_scoped_release release;
        parallel_for_team(b * c, threads, [&](int64_t lo, int64_t hi) {
          for (int64_t r = lo; r < hi; ++r) CBF_ENCODER_KERNEL(pos_conv_row, t, r / c, r % c);
        });
      },
      py::arg("h"), py::arg("w"), py::arg("bias"), py::arg("out"), py::arg("b"), py::arg("c"), py::arg("n"),
      py::arg("d"), py::arg("kh"), py::arg("kw"), py::arg("ph"), py::arg("pw"), py::arg("threads") = 1,
      "The positional depthwise conv plus its residual over float32 channels-last grids, see PosConvTask");
  m.def(
      "magnitude_f32",
      [](uintptr_t z, uintptr_t out, int64_t n, int threads) {
        const float* zp = reinterpret_cast<const float*>(z);
        float* op = reinterpret_cast<float*>(out);
        py::gil_scoped_release release;
        parallel_elements(n, threads, [&](int64_t lo, int64_t hi) {
          CBF_ENCODER_KERNEL(magnitude, zp + 2 * lo, op + lo, hi - lo);
        });
      },
      py::arg("z"), py::arg("out"), py::arg("n"), py::arg("threads") = 1,
      "out[i] = |z[i]| for n contiguous complex64 values, as sqrt(re^2 + im^2)");
  m.def("encoder_simd_path", [] { return std::string(encoder_avx2() ? "avx2+fma" : "baseline"); });
  m.def("encoder_thread_team", [] { return std::string(process_openmp() ? "openmp" : "threads"); },
        "Whose threads the encoder kernels run on: the process's OpenMP team (torch's) or threads of their own");
}

}  // namespace cbf
