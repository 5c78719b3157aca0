"""PyTorch twins of the fused kernels: the CPU path, and the reference for tests and benchmarks.

Layout contract shared with the Triton kernels (``criss_cross.py``):

* ``qkv_s``: ``(B, C, N, 3 * Ds)``, the spatial half's fused projection, last dim ``[q | k | v]``;
  each of q, k, v holds ``heads`` heads of dim ``Ds // heads``, head-major (as
  ``nn.MultiheadAttention.in_proj_weight`` orders its rows). Spatial heads attend across C for each
  (b, n).
* ``qkv_t``: ``(B, C, N, 3 * Dt)``, the same for the temporal half; attends across N for each (b, c).
* Both may be strided views (unit stride on the last dim), e.g. slices of one ``(B, C, N, 6 * D/2)``
  tensor or of a ``(2, B, C, N, 3 * D/2)`` batched-GEMM output.
* Result: ``(B, C, N, Ds + Dt)`` = ``[spatial | temporal]``, before the output projections.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _split_heads(qkv: torch.Tensor, heads: int):
    b, c, n, three_d = qkv.shape
    d = three_d // 3
    return qkv.unflatten(-1, (3, heads, d // heads)).unbind(3)  # 3 x (B, C, N, H, E)


def criss_cross_attention(qkv_s: torch.Tensor, qkv_t: torch.Tensor, heads: int, dropout_p: float = 0.0,
                          training: bool = False) -> torch.Tensor:
    """Spatial (across C) and temporal (across N) multi-head attention, concatenated."""
    p = dropout_p if training else 0.0
    b, c, n, _ = qkv_s.shape
    # Attention inputs are kept 4-D: Inductor (torch 2.13) miscompiles 5-D batched matmul/SDPA on
    # permuted views (wrong values, or a crash), see tests/test_model.py::test_torch_compile*.
    # Spatial: sequence axis C -> (B*N, H, C, E).
    qs, ks, vs = (t.permute(0, 2, 3, 1, 4).reshape(b * n, heads, c, -1) for t in _split_heads(qkv_s, heads))
    os_ = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=p).view(b, n, heads, c, -1)
    # Temporal: sequence axis N -> (B*C, H, N, E).
    qt, kt, vt = (t.permute(0, 1, 3, 2, 4).reshape(b * c, heads, n, -1) for t in _split_heads(qkv_t, heads))
    ot = F.scaled_dot_product_attention(qt, kt, vt, dropout_p=p).view(b, c, heads, n, -1)
    return torch.cat((os_.permute(0, 3, 1, 2, 4).flatten(-2), ot.permute(0, 1, 3, 2, 4).flatten(-2)), dim=-1)


def criss_cross_attention_naive(qkv_s: torch.Tensor, qkv_t: torch.Tensor, heads: int) -> torch.Tensor:
    """Explicit softmax(QK^T/sqrt(E))V in float32 (no dropout): the plainest statement of the contract."""
    def attend(q, k, v):  # (..., L, E)
        s = (q.float() @ k.float().transpose(-1, -2)) / q.shape[-1] ** 0.5
        return (s.softmax(-1) @ v.float()).to(q.dtype)

    b, c, n, _ = qkv_s.shape
    qs, ks, vs = (t.permute(0, 2, 3, 1, 4).reshape(b * n, heads, c, -1) for t in _split_heads(qkv_s, heads))
    qt, kt, vt = (t.permute(0, 1, 3, 2, 4).reshape(b * c, heads, n, -1) for t in _split_heads(qkv_t, heads))
    os_ = attend(qs, ks, vs).view(b, n, heads, c, -1).permute(0, 3, 1, 2, 4).flatten(-2)
    ot = attend(qt, kt, vt).view(b, c, heads, n, -1).permute(0, 1, 3, 2, 4).flatten(-2)
    return torch.cat((os_, ot), dim=-1)
