"""Criss-cross transformer layer, written for speed but keeping the original parameter names.

Per layer: LayerNorm -> ONE batched GEMM producing q|k|v of both attention halves -> criss-cross
attention on strided views (no transpose/contiguous round trips) -> ONE batched GEMM for both output
projections -> residual; then the feed-forward block. This is the path of training, autograd,
``torch.compile`` and CUDA/Triton (Inductor fuses its elementwise work by itself).

CPU inference (eval, no autograd, eager) goes through ``cpu_path.py`` instead: the same math with each
step on the implementation measured fastest on this CPU (see there).
"""

from __future__ import annotations

import copy
import threading

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import criss_cross_attention_packed
from . import cpu_path
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
        # The packed entry: one gradient for qkv (not two zero-filled select-backward buffers summed).
        a = criss_cross_attention_packed(qkv, self.heads, self.p, self.training, backend=backend)
        w_out = torch.stack((s.out_proj.weight, t.out_proj.weight)).transpose(1, 2)
        b_out = torch.stack((s.out_proj.bias, t.out_proj.bias)).unsqueeze(1)
        o = torch.baddbmm(b_out, a.reshape(-1, 2, half).transpose(0, 1), w_out)  # (2, T, half)
        x = x + F.dropout(o.transpose(0, 1).reshape(b, c, n, d), self.p, self.training)
        h = F.layer_norm(x, (d,), self.norm2.weight, self.norm2.bias, self.norm2.eps)
        h = F.dropout(F.gelu(self.linear1(h)), self.p, self.training)
        return x + F.dropout(self.linear2(h), self.p, self.training)

    def __getstate__(self):
        # The CPU path's weight cache (packed oneDNN tensors) cannot be pickled or deep-copied; it is rebuilt
        # on demand.
        state = super().__getstate__().copy()
        state.pop("_weight_cache", None)
        return state


class Encoder(nn.Module):
    def __init__(self, cfg: CBraModConfig, clone_layers: bool = True):
        super().__init__()
        if clone_layers:
            # One layer built, the others deep copies of it, as the original builds its encoder: the random
            # number stream is consumed exactly as there (CBraMod.__init__ then re-initialises the Linears).
            layer = CrissCrossLayer(cfg)
            self.layers = nn.ModuleList([layer] + [copy.deepcopy(layer) for _ in range(cfg.n_layer - 1)])
        else:
            self.layers = nn.ModuleList([CrissCrossLayer(cfg) for _ in range(cfg.n_layer)])
        self.cpu_path = "auto"  # forcing setting of the CPU inference path (cpu_path.PATHS)
        self.last_cpu_path: str | None = None  # what the last CPU inference call ran

    def forward(self, x: torch.Tensor, backend: str = "torch") -> torch.Tensor:
        cpu = cpu_path.cpu_inference(x, self.training, self.parameters())
        plan = cpu_path.plan_for(self.layers, x, self.cpu_path) if cpu else None
        if cpu:
            self.last_cpu_path = plan.describe() if plan else f"plain ({x.dtype}, {self.cpu_path})"
        if plan is None or plan.precision == "plain":
            for layer in self.layers:
                x = layer(x, backend)
            return x
        ws = self._workspace()
        for i, layer in enumerate(self.layers):
            x = cpu_path.run_layer(layer, x, plan, ws, last=i == len(self.layers) - 1)
        ws.trim(cpu_path.KEEP_BYTES)
        return x

    def _workspace(self) -> cpu_path.Workspace:
        # Buffers kept between calls (a call's first touch of fresh memory costs page faults), one set per
        # thread so that concurrent inference calls never share them; the output is never one of them.
        spaces = self.__dict__.setdefault("_cpu_workspaces", {})
        return spaces.setdefault(threading.get_ident(), cpu_path.Workspace())

    def __getstate__(self):
        state = super().__getstate__().copy()
        state.pop("_cpu_workspaces", None)  # scratch buffers: neither pickled nor deep-copied
        return state
