"""Criss-cross transformer layer, written for speed but keeping the original parameter names.

Per layer: LayerNorm -> ONE batched GEMM producing q|k|v of both attention halves -> criss-cross
attention on strided views (no transpose/contiguous round trips) -> ONE batched GEMM for both output
projections -> residual; then the feed-forward block.

CPU inference (eval, no autograd, eager) takes ``_forward_onednn`` instead: the same math through
oneDNN's fused linear ops (linear+GELU, linear+bias+residual) and the residual add folded into the
output projections' GEMM accumulation, which removes most elementwise passes. Everything else (training,
autograd, torch.compile, CUDA/Triton) uses the plain-op path, which Inductor fuses by itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import criss_cross_attention
from .config import CBraModConfig

try:  # private oneDNN ops (the ones Inductor's CPU freezing passes use); absent -> plain-op path only
    _linear_pointwise = torch.ops.mkldnn._linear_pointwise
    _reorder_linear_weight = torch.ops.mkldnn._reorder_linear_weight
except (AttributeError, RuntimeError):
    _linear_pointwise = _reorder_linear_weight = None


def _onednn_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """Compute dtype for the oneDNN inference path, or None when the plain-op path must run.

    bf16 autocast is honoured by hand (the mkldnn ops are not autocast-aware): GEMMs in bf16, the
    residual stream kept in x's dtype as autocast would.
    """
    if (x.device.type != "cpu" or _linear_pointwise is None or torch.compiler.is_compiling()
            or not torch.backends.mkldnn.is_available()):
        return None
    if torch.is_autocast_enabled("cpu"):
        return torch.bfloat16 if torch.get_autocast_dtype("cpu") == torch.bfloat16 else None
    if x.dtype in (torch.float32, torch.bfloat16) and weight.dtype == x.dtype:
        return x.dtype
    return None


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
        # Any tensor that needs a gradient (input or any parameter, e.g. partial fine-tuning) -> plain ops.
        no_autograd = not torch.is_grad_enabled() or not (
            x.requires_grad or any(p.requires_grad for p in self.parameters()))
        if not self.training and no_autograd:
            dtype = _onednn_dtype(x, self.linear1.weight)
            if dtype is not None:
                return self._forward_onednn(x, dtype, backend)
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

    def _forward_onednn(self, x: torch.Tensor, dtype: torch.dtype, backend: str) -> torch.Tensor:
        """Eval-mode forward without autograd on CPU (no dropout); same math as ``forward``."""
        x = x.contiguous()  # the residual stream is used as a flat (T, d) matrix
        b, c, n, d = x.shape
        half = d // 2
        w = self._weights(dtype)
        h = F.layer_norm(x, (d,), self.norm1.weight, self.norm1.bias, self.norm1.eps).view(-1, d)
        # The spatial half is projected in (B, N, C) row order (one copy of its 100-wide input instead of
        # three of its 300-wide q|k|v): the spatial attention batches are then views (kernels/reference.py).
        h_s = x.new_empty((b, n, c, half), dtype=dtype).copy_(h[:, :half].view(b, c, n, half).transpose(1, 2))
        qkv_s = _linear_pointwise(h_s.view(-1, half), w["in_s"], w["in_s_b"], "none", [], "")
        qkv_t = _linear_pointwise(h[:, half:].to(dtype), w["in_t"], w["in_t_b"], "none", [], "")
        a = criss_cross_attention(qkv_s.view(b, n, c, -1).transpose(1, 2), qkv_t.view(b, c, n, -1), self.heads,
                                  backend=backend).reshape(-1, d)
        if a.dtype == x.dtype:
            # x + out_proj(a): the bias add makes the new residual tensor, the GEMMs accumulate into it.
            x = (x + w["out_b"]).view(-1, d)
            x[:, :half].addmm_(a[:, :half], w["out_s"].t())
            x[:, half:].addmm_(a[:, half:], w["out_t"].t())
        else:  # bf16 autocast over an fp32 stream: bf16 GEMMs, fp32 residual add (as autocast does)
            o = torch.cat((_linear_pointwise(a[:, :half], w["out_s_packed"], w["out_s_b"], "none", [], ""),
                           _linear_pointwise(a[:, half:], w["out_t_packed"], w["out_t_b"], "none", [], "")), -1)
            x = x.view(-1, d) + o
        h = F.layer_norm(x, (d,), self.norm2.weight, self.norm2.bias, self.norm2.eps).to(dtype)
        h = _linear_pointwise(h, w["l1"], w["l1_b"], "gelu", [], "none")  # GELU (erf) fused into the GEMM
        if x.dtype == dtype:  # bias and residual fused into the GEMM
            x = _linear_pointwise.binary(h, x, w["l2"], w["l2_b"], "add")
        else:
            x = x + _linear_pointwise(h, w["l2"], w["l2_b"], "none", [], "")
        return x.view(b, c, n, d)

    def _weights(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Inference weights in ``dtype``, cached; rebuilt when a parameter changes (version counter).

        The oneDNN GEMM weights are stored pre-packed (oneDNN's blocked layout, e.g. VNNI pairs for
        bf16), which saves a weight reorder in every call.
        """
        s, t = self.self_attn_s, self.self_attn_t
        params = {"in_s": s.in_proj_weight, "in_s_b": s.in_proj_bias, "in_t": t.in_proj_weight,
                  "in_t_b": t.in_proj_bias, "out_s": s.out_proj.weight, "out_s_b": s.out_proj.bias,
                  "out_t": t.out_proj.weight, "out_t_b": t.out_proj.bias, "l1": self.linear1.weight,
                  "l1_b": self.linear1.bias, "l2": self.linear2.weight, "l2_b": self.linear2.bias}
        key = tuple((p.data_ptr(), p._version) for p in params.values())
        # One entry per dtype, so alternating fp32 and bf16 calls do not repack every time. A plain
        # attribute: not a buffer, never in the state dict, dropped when pickling (__getstate__).
        caches = self.__dict__.setdefault("_weight_cache", {})
        if dtype not in caches or caches[dtype][0] != key:
            w = {k: p.detach().to(dtype) for k, p in params.items()}
            w["out_b"] = torch.cat((w["out_s_b"], w["out_t_b"]))
            for k in ("in_s", "in_t", "l1", "l2"):
                w[k] = _reorder_linear_weight(w[k], None)
            for k in ("out_s", "out_t"):  # plain for addmm_, packed for the bf16-autocast linear
                w[k + "_packed"] = _reorder_linear_weight(w[k], None)
            caches[dtype] = (key, w)
        return caches[dtype][1]

    def __getstate__(self):
        # Packed oneDNN tensors cannot be pickled or deep-copied; the cache is rebuilt on demand.
        state = super().__getstate__().copy()
        state.pop("_weight_cache", None)
        return state


class Encoder(nn.Module):
    def __init__(self, cfg: CBraModConfig):
        super().__init__()
        self.layers = nn.ModuleList([CrissCrossLayer(cfg) for _ in range(cfg.n_layer)])

    def forward(self, x: torch.Tensor, backend: str = "torch") -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, backend)
        return x
