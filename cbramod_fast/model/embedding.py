"""Patch embedding: time-domain conv stack + spectral projection + depthwise positional conv.

Submodule and parameter names are the original's (``patch_embedding.*`` keys load unchanged).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import CBraModConfig


class PatchEmbedding(nn.Module):
    def __init__(self, cfg: CBraModConfig):
        super().__init__()
        d = cfg.d_model
        self.d_model = d
        self.positional_encoding = nn.Sequential(
            nn.Conv2d(d, d, kernel_size=(19, 7), stride=(1, 1), padding=(9, 3), groups=d)
        )
        # Substituted for masked patches; frozen like the original's.
        self.mask_encoding = nn.Parameter(torch.zeros(cfg.in_dim), requires_grad=False)
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
        self.spectral_proj = nn.Sequential(nn.Linear(cfg.in_dim // 2 + 1, d), nn.Dropout(cfg.dropout))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, c, n, p = x.shape
        if mask is not None:
            # torch.where instead of boolean indexing: no host sync, no graph break under torch.compile.
            x = torch.where(mask.unsqueeze(-1) != 0, self.mask_encoding.to(x.dtype), x)
        # GroupNorm statistics span all C*N patches of a sample, so the conv stack sees one row per patch.
        h = self.proj_in(x.reshape(b, 1, c * n, p))  # (B, 25, C*N, 8)
        h = h.transpose(1, 2).reshape(b, c, n, self.d_model)  # feature = conv channel * 8 + position
        # pocketfft has no bf16/fp16 kernels: transform low-precision input in fp32 (native bf16 models).
        low = x.dtype in (torch.bfloat16, torch.float16)
        spec = torch.fft.rfft(x.float() if low else x, dim=-1, norm="forward").abs()
        spec = spec.to(x.dtype) if low else spec
        h = h + self.spectral_proj(spec)
        # (B, C, N, D) permuted to (B, D, C, N) is exactly channels_last: the depthwise conv reads it in place.
        pos = self.positional_encoding(h.permute(0, 3, 1, 2))
        return h + pos.permute(0, 2, 3, 1)
