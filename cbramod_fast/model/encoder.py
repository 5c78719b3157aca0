"""Criss-cross transformer layer, written for speed but keeping the original parameter names.

Per layer: LayerNorm -> ONE batched GEMM producing q|k|v of both attention halves -> criss-cross
attention on strided views (no transpose/contiguous round trips) -> ONE batched GEMM for both output
projections -> residual; then the feed-forward block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import criss_cross_attention
from .config import CBraModConfig


class AttentionParams(nn.Module):
    """Parameters of one attention half, named like ``nn.MultiheadAttention`` (checkpoint-compatible)."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)


class CrissCrossLayer(nn.Module):
    def __init__(self, cfg: CBraModConfig):
        super().__init__()
        d, half = cfg.d_model, cfg.d_model // 2
        self.heads = cfg.nhead // 2  # per half
        self.p = cfg.dropout
        self.self_attn_s = AttentionParams(half)
        self.self_attn_t = AttentionParams(half)
        self.linear1 = nn.Linear(d, cfg.dim_feedforward)
        self.linear2 = nn.Linear(cfg.dim_feedforward, d)
        self.norm1 = nn.LayerNorm(d, eps=1e-5)
        self.norm2 = nn.LayerNorm(d, eps=1e-5)

    def forward(self, x: torch.Tensor, backend: str = "torch") -> torch.Tensor:
        b, c, n, d = x.shape
        half = d // 2
        s, t = self.self_attn_s, self.self_attn_t
        h = F.layer_norm(x, (d,), self.norm1.weight, self.norm1.bias, self.norm1.eps)
        # Both halves' q|k|v in one batched GEMM: (2, T, half) @ (2, half, 3*half); the (2, T, half) input
        # is a strided view of h, not a copy.
        w_in = torch.stack((s.in_proj_weight, t.in_proj_weight)).transpose(1, 2)
        b_in = torch.stack((s.in_proj_bias, t.in_proj_bias)).unsqueeze(1)
        qkv = torch.baddbmm(b_in, h.reshape(-1, 2, half).transpose(0, 1), w_in).view(2, b, c, n, 3 * half)
        a = criss_cross_attention(qkv[0], qkv[1], self.heads, self.p, self.training, backend=backend)
        w_out = torch.stack((s.out_proj.weight, t.out_proj.weight)).transpose(1, 2)
        b_out = torch.stack((s.out_proj.bias, t.out_proj.bias)).unsqueeze(1)
        o = torch.baddbmm(b_out, a.reshape(-1, 2, half).transpose(0, 1), w_out)  # (2, T, half)
        x = x + F.dropout(o.transpose(0, 1).reshape(b, c, n, d), self.p, self.training)
        h = F.layer_norm(x, (d,), self.norm2.weight, self.norm2.bias, self.norm2.eps)
        h = F.dropout(F.gelu(self.linear1(h)), self.p, self.training)
        return x + F.dropout(self.linear2(h), self.p, self.training)


class Encoder(nn.Module):
    def __init__(self, cfg: CBraModConfig):
        super().__init__()
        self.layers = nn.ModuleList([CrissCrossLayer(cfg) for _ in range(cfg.n_layer)])

    def forward(self, x: torch.Tensor, backend: str = "torch") -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, backend)
        return x
