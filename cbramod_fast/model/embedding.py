"""Patch embedding: time-domain conv stack + spectral projection + depthwise positional conv.

Submodule and parameter names are the original's (``patch_embedding.*`` keys load unchanged).
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import cpu
from .config import CBraModConfig
from .cpu_path import cpu_inference, embed_for


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
        self.last_embed: str | None = None  # how the last CPU inference call ran (embed_for: "cpp" | "torch")

    def stem(self, x: torch.Tensor, how: str = "torch") -> torch.Tensor:
        """The conv stack on ``x`` (B, C, N, in_dim) -> (B, C, N, d_model), feature = conv channel * 8 + position;
        ``how``: ``"torch"`` (the modules) or ``"cpp"`` (one native call, inference only: ``cpu_path.embed_for``)."""
        b, c, n, p = x.shape
        if how == "cpp":
            return cpu.patch_stem(x.contiguous(), cpu.stem_params(self.proj_in), self.proj_in[1].eps,
                                  torch.get_num_threads())
        # GroupNorm statistics span all C*N patches of a sample, so the conv stack sees one row per patch.
        h = self.proj_in(x.reshape(b, 1, c * n, p))  # (B, 25, C*N, 8)
        return h.transpose(1, 2).reshape(b, c, n, self.d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cpu_path: str = "auto") -> torch.Tensor:
        """``cpu_path``: the encoder's CPU path setting (``cpu_path.PATHS``); it decides the native kernels in
        inference."""
        if mask is not None:
            # torch.where instead of boolean indexing: no host sync, no graph break under torch.compile.
            x = torch.where(mask.unsqueeze(-1) != 0, self.mask_encoding.to(x.dtype), x)
        how = "torch"
        if cpu_inference(x, self.training, self.parameters()):
            how = self.last_embed = embed_for(self, x, cpu_path)
        return self.embed(x, how)

    def embed(self, x: torch.Tensor, how: str = "torch") -> torch.Tensor:
        """Conv stack + spectral projection + positional conv of (masked) patches ``x`` (B, C, N, in_dim);
        ``how``: ``"torch"`` (the modules) or ``"cpp"`` (the native conv stack, spectrum magnitude and positional
        conv; inference only, chosen by ``cpu_path.embed_for``)."""
        h = self.stem(x, how)
        # pocketfft has no bf16/fp16 kernels: transform low-precision input in fp32 (native bf16 models).
        low = x.dtype in (torch.bfloat16, torch.float16)
        spec = torch.fft.rfft(x.float() if low else x, dim=-1, norm="forward")
        spec = cpu.magnitude(spec, torch.get_num_threads()) if how == "cpp" else spec.abs()
        spec = spec.to(x.dtype) if low else spec
        h = h + self.spectral_proj(spec)
        conv = self.positional_encoding[0]
        if how == "cpp" and cpu.pos_conv_supports(h, conv):
            return cpu.positional_conv(h, conv, torch.get_num_threads())
        # (B, C, N, D) permuted to (B, D, C, N) is exactly channels_last: the depthwise conv reads it in place.
        pos = self.positional_encoding(h.permute(0, 3, 1, 2))
        return h + pos.permute(0, 2, 3, 1)
