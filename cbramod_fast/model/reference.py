"""A faithful, straightforward CBraMod, checked against outputs of the original implementation
(``tests/data`` fixtures) like the fast model.

It mirrors the original's structure on purpose (two ``nn.MultiheadAttention`` per layer, transposes,
``.contiguous()`` copies, boolean-index masking) and is the in-repo reference that tests and benchmarks
compare the fast model against. It is not used by anything in the hot path.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .cbramod import original_linear_init


class ReferencePatchEmbedding(nn.Module):
    def __init__(self, in_dim: int = 200, d_model: int = 200, dropout: float = 0.1):
        super().__init__()
        self.d_model = d_model
        self.positional_encoding = nn.Sequential(
            nn.Conv2d(d_model, d_model, kernel_size=(19, 7), stride=(1, 1), padding=(9, 3), groups=d_model)
        )
        self.mask_encoding = nn.Parameter(torch.zeros(in_dim), requires_grad=False)
        self.proj_in = nn.Sequential(
            nn.Conv2d(1, 25, kernel_size=(1, 49), stride=(1, 25), padding=(0, 24)),
            nn.GroupNorm(5, 25),
            nn.GELU(),
            nn.Conv2d(25, 25, kernel_size=(1, 3), stride=(1, 1), padding=(0, 1)),
            nn.GroupNorm(5, 25),
            nn.GELU(),
            nn.Conv2d(25, 25, kernel_size=(1, 3), stride=(1, 1), padding=(0, 1)),
            nn.GroupNorm(5, 25),
            nn.GELU(),
        )
        self.spectral_proj = nn.Sequential(nn.Linear(in_dim // 2 + 1, d_model), nn.Dropout(dropout))

    def forward(self, x, mask=None):
        bz, ch, n, p = x.shape
        if mask is None:
            mask_x = x
        else:
            mask_x = x.clone()
            mask_x[mask == 1] = self.mask_encoding
        mask_x = mask_x.contiguous().view(bz, 1, ch * n, p)
        emb = self.proj_in(mask_x)
        emb = emb.permute(0, 2, 1, 3).contiguous().view(bz, ch, n, self.d_model)
        spec = torch.fft.rfft(mask_x.contiguous().view(bz * ch * n, p), dim=-1, norm="forward")
        spec = torch.abs(spec).contiguous().view(bz, ch, n, p // 2 + 1)
        emb = emb + self.spectral_proj(spec)
        pos = self.positional_encoding(emb.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return emb + pos


class ReferenceCrissCrossLayer(nn.Module):
    def __init__(self, d_model=200, nhead=8, dim_feedforward=800, dropout=0.1):
        super().__init__()
        half = d_model // 2
        self.self_attn_s = nn.MultiheadAttention(half, nhead // 2, dropout=dropout, batch_first=True)
        self.self_attn_t = nn.MultiheadAttention(half, nhead // 2, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=1e-5)
        self.norm2 = nn.LayerNorm(d_model, eps=1e-5)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def _sa_block(self, x):
        bz, ch, n, d = x.shape
        xs = x[:, :, :, : d // 2]
        xt = x[:, :, :, d // 2 :]
        xs = xs.transpose(1, 2).contiguous().view(bz * n, ch, d // 2)
        xt = xt.contiguous().view(bz * ch, n, d // 2)
        xs = self.self_attn_s(xs, xs, xs, need_weights=False)[0]
        xs = xs.contiguous().view(bz, n, ch, d // 2).transpose(1, 2)
        xt = self.self_attn_t(xt, xt, xt, need_weights=False)[0]
        xt = xt.contiguous().view(bz, ch, n, d // 2)
        return self.dropout1(torch.cat((xs, xt), dim=3))

    def _ff_block(self, x):
        return self.dropout2(self.linear2(self.dropout(F.gelu(self.linear1(x)))))

    def forward(self, x):
        x = x + self._sa_block(self.norm1(x))
        return x + self._ff_block(self.norm2(x))


class ReferenceEncoder(nn.Module):
    def __init__(self, n_layer, **kw):
        super().__init__()
        layer = ReferenceCrissCrossLayer(**kw)  # one layer and deep copies, as the original builds it
        self.layers = nn.ModuleList([layer] + [copy.deepcopy(layer) for _ in range(n_layer - 1)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class ReferenceCBraMod(nn.Module):
    """Original-layout CBraMod: ``forward(x (B, C, N, 200), mask) -> (B, C, N, out_dim)``."""

    def __init__(self, in_dim=200, out_dim=200, d_model=200, dim_feedforward=800, seq_len=30, n_layer=12,
                 nhead=8):
        super().__init__()
        self.patch_embedding = ReferencePatchEmbedding(in_dim, d_model)
        self.encoder = ReferenceEncoder(n_layer, d_model=d_model, nhead=nhead, dim_feedforward=dim_feedforward)
        self.proj_out = nn.Sequential(nn.Linear(d_model, out_dim))
        self.apply(original_linear_init)

    def encode(self, x, mask=None):
        return self.encoder(self.patch_embedding(x, mask))

    def forward(self, x, mask=None):
        return self.proj_out(self.encode(x, mask))
