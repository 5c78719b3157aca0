// CPU inference kernels of the encoder. The criss-cross attention (float32) makes one pass per sequence over
// all heads: q/k/v read in place from the projection output, scores and softmax in registers and a few KB
// of L1 scratch, the result written straight into the (token, [spatial | temporal]) matrix the output
// projection reads.
#pragma once

#include <cstdint>

namespace cbf {

// One attention half over a 2-level batch of sequences: sequence (a, b) starts at
// qkv + a*in_a + b*in_b, its rows are in_row apart, each row is [q | k | v] with `heads` heads of `head_dim`
// values (head-major, as nn.MultiheadAttention orders in_proj rows). Row i of the result goes to
// out + a*out_a + b*out_b + i*out_row (heads * head_dim values).
struct AttentionHalf {
  const float* qkv;
  int64_t n_a, n_b, in_a, in_b, in_row;
  float* out;
  int64_t out_a, out_b, out_row;
  int64_t len;  // sequence length
};

// The GEMM's blocking, shared by the work split (encoder_cpu.cpp) and the kernels (the size of their
// partial-sum scratch): B packed in panels of kGemmPanel columns, at most kGemmRows rows per block (8 tiles of
// 6), k in blocks of at most kGemmDepth (a panel's block, 16 KB, stays in L1).
constexpr int64_t kGemmPanel = 16, kGemmRows = 48, kGemmDepth = 256;
constexpr int64_t gemm_panels(int64_t n) { return (n + kGemmPanel - 1) / kGemmPanel; }

// One GEMM of the encoder with its epilogue: out[i, :n] = act(a[i, :k] @ B + bias + res[i, :n]) for i < m.
// B comes pre-packed in panels of kGemmPanel = 16 columns: panel p holds B[:, 16p .. 16p+16) as k rows of 16 values (zero
// past n), so the inner loop reads it contiguously. bias and res may be null; res may alias out (in place).
struct GemmTask {
  const float* a;
  int64_t lda;
  const float* b_packed;
  const float* bias;
  const float* res;
  int64_t ldr;
  float* out;
  int64_t ldo;
  int64_t m, n, k;
  bool gelu;
};

// The feed-forward block over m rows of d features: out = x + GELU(LayerNorm(x) W1 + b1) W2 + b2, with W1
// (d -> ff) and W2 (ff -> d) packed as GemmTask's B. out may be x (in place).
struct FfnTask {
  const float* x;
  float* out;
  int64_t m, d, ff;
  const float *ln_w, *ln_b;
  float eps;
  const float *w1, *b1, *w2, *b2;
};

// The patch embedding's convolution stem (the original's proj_in) over `rows` patches of `len` samples per
// sample, `batch` samples: conv (1 -> 25 channels, kernel 49, stride 25, zero padding 24) -> GroupNorm -> GELU,
// then twice conv (25 -> 25, kernel 3, padding 1) -> GroupNorm -> GELU. Every conv yields kStemPositions = 8
// positions per patch (len in [176, 200]); GroupNorm's 5 groups of 5 channels take their statistics over all
// the sample's patches. out: (batch * rows, 25 * 8), feature = channel * 8 + position (the original's order
// after its transpose); w[0] is (25, 49), w[1] and w[2] are (25, 25, 3), as torch stores conv weights.
constexpr int kStemChannels = 25, kStemKernel = 49, kStemStride = 25, kStemPad = 24, kStemPositions = 8,
              kStemGroups = 5;
struct StemTask {
  const float* x;
  float* out;
  int64_t batch, rows, len;
  const float *w[3], *b[3], *gn_w[3], *gn_b[3];
  float eps;
};

// The patch embedding's positional encoding with its residual: a depthwise conv over the (C, N) grid of each
// sample, channels last. out[b, c, n, :] = h[b, c, n, :] + bias + sum_{i < kh, j < kw} w[i, j, :] *
// h[b, c + i - ph, n + j - pw, :] (zero outside the grid); w is (kh, kw, d) (torch's (d, 1, kh, kw) moved),
// d a multiple of 8. out must not overlap h.
struct PosConvTask {
  const float *h, *w, *bias;
  float* out;
  int64_t b, c, n, d;
  int kh, kw, ph, pw;
};

}  // namespace cbf
