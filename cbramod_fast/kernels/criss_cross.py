"""Fused criss-cross attention in Triton: forward, backward, attention dropout.

Layout contract: ``reference.py`` (the PyTorch twin). One kernel family serves both halves: a program
owns one sequence (spatial: the C channels of one (b, n); temporal: the N patches of one (b, c)) and one
head, holds the whole (L x L) score tile in registers (L <= 64 for these models) and reads q, k, v
straight from the fused projection's strided layout; the output is written into its half of the
concatenated ``(B, C, N, Ds + Dt)`` tensor, so there are no transposes, copies or concatenations.

Order in this file: kernels, launchers, ``torch.library`` ops (opaque to ``torch.compile``) with their
autograd, and the functional entry point ``criss_cross_attention_triton``.

Dropout follows flash-attention: the keep mask is drawn in-kernel from ``tl.rand(seed, offset)`` and
regenerated in the backward from the same seed tensor (never stored). The seed is a device tensor drawn
from torch's RNG, so ``torch.manual_seed`` makes training reproducible without a host sync.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["criss_cross_attention_triton", "criss_cross_attention_triton_packed", "dropout_keep_mask"]


@triton.jit
def _tile_ptrs(base_ptr, pid, X, h, E, s_b, s_x, s_l, BL: tl.constexpr, BE: tl.constexpr):
    # Rows = sequence positions, columns = features of head h. int64 offsets: B*C*N*3D may exceed 2**31.
    b = (pid // X).to(tl.int64)
    x = (pid % X).to(tl.int64)
    offs_l = tl.arange(0, BL).to(tl.int64)
    offs_e = tl.arange(0, BE)
    return base_ptr + b * s_b + x * s_x + h * E + offs_l[:, None] * s_l + offs_e[None, :]


@triton.jit
def _load_qkv(QKV, pid, X, h, D, E, s_b, s_x, s_l, valid, BL: tl.constexpr, BE: tl.constexpr):
    ptrs = _tile_ptrs(QKV, pid, X, h, E, s_b, s_x, s_l, BL, BE)
    return (tl.load(ptrs, mask=valid, other=0.0), tl.load(ptrs + D, mask=valid, other=0.0),
            tl.load(ptrs + 2 * D, mask=valid, other=0.0))


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # see _upcast(): the interpreter's bf16 dot is wrong, its fp32 dot is exact
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _keep(seed, pid, h, L, p_drop, HEADS: tl.constexpr, BL: tl.constexpr):
    # Offsets are unique per (sequence, head, query, key) and independent of the block size.
    offs_i = tl.arange(0, BL)
    offs_j = tl.arange(0, BL)
    rng = ((pid * HEADS + h) * L + offs_i[:, None]) * L + offs_j[None, :]
    return tl.rand(seed, rng) >= p_drop


@triton.jit
def _cc_fwd_kernel(
    QKV, OUT, LSE, SEED,
    s_qb, s_qx, s_ql,  # qkv strides: batch, outer axis, sequence axis (last dim unit stride)
    s_ob, s_ox, s_ol, o_col,  # output strides and this half's first column
    X, L, D, E, scale, p_drop, seed_off,
    HEADS: tl.constexpr, BL: tl.constexpr, BE: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)  # sequence index in [0, B*X)
    h = tl.program_id(1)  # head
    offs_l = tl.arange(0, BL)
    valid = (offs_l[:, None] < L) & (tl.arange(0, BE)[None, :] < E)
    q, k, v = _load_qkv(QKV, pid, X, h, D, E, s_qb, s_qx, s_ql, valid, BL, BE)

    s = _dot(q, tl.trans(k), PREC, UPCAST) * scale  # (BL, BL) fp32
    s = tl.where(offs_l[None, :] < L, s, float("-inf"))
    m = tl.max(s, 1)
    p = tl.exp(s - m[:, None])
    denom = tl.sum(p, 1)
    p = p / denom[:, None]
    tl.store(LSE + (pid * HEADS + h).to(tl.int64) * L + offs_l, m + tl.log(denom), mask=offs_l < L)
    if DROPOUT:
        keep = _keep(tl.load(SEED) + seed_off, pid, h, L, p_drop, HEADS, BL)
        p = tl.where(keep, p / (1.0 - p_drop), 0.0)
    o = _dot(p.to(v.dtype), v, PREC, UPCAST)
    optrs = _tile_ptrs(OUT + o_col, pid, X, h, E, s_ob, s_ox, s_ol, BL, BE)
    tl.store(optrs, o.to(OUT.dtype.element_ty), mask=valid)


@triton.jit
def _cc_bwd_kernel(
    QKV, OUT, DOUT, LSE, DQKV, SEED,
    s_qb, s_qx, s_ql, s_ob, s_ox, s_ol, o_col, s_gb, s_gx, s_gl,
    X, L, D, E, scale, p_drop, seed_off,
    HEADS: tl.constexpr, BL: tl.constexpr, BE: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)  # sequence index in [0, B*X)
    h = tl.program_id(1)  # head
    offs_l = tl.arange(0, BL)
    valid = (offs_l[:, None] < L) & (tl.arange(0, BE)[None, :] < E)
    q, k, v = _load_qkv(QKV, pid, X, h, D, E, s_qb, s_qx, s_ql, valid, BL, BE)
    optrs = _tile_ptrs(OUT + o_col, pid, X, h, E, s_ob, s_ox, s_ol, BL, BE)
    o = tl.load(optrs, mask=valid, other=0.0).to(tl.float32)
    do = tl.load(_tile_ptrs(DOUT + o_col, pid, X, h, E, s_ob, s_ox, s_ol, BL, BE), mask=valid, other=0.0)
    lse = tl.load(LSE + (pid * HEADS + h).to(tl.int64) * L + offs_l, mask=offs_l < L, other=0.0)

    # Recompute the probabilities from the saved log-sum-exp instead of storing them.
    s = _dot(q, tl.trans(k), PREC, UPCAST) * scale
    p = tl.where(offs_l[None, :] < L, tl.exp(s - lse[:, None]), 0.0)
    dp = _dot(do, tl.trans(v), PREC, UPCAST)  # d(dropped P)
    if DROPOUT:
        keep = _keep(tl.load(SEED) + seed_off, pid, h, L, p_drop, HEADS, BL)
        pd = tl.where(keep, p / (1.0 - p_drop), 0.0)
        dp = tl.where(keep, dp / (1.0 - p_drop), 0.0)
    else:
        pd = p
    dv = _dot(tl.trans(pd).to(do.dtype), do, PREC, UPCAST)
    delta = tl.sum(do.to(tl.float32) * o, 1)  # rowsum(dO * O) = rowsum(P_d * dP_d)
    ds = p * (dp - delta[:, None]) * scale
    dq = _dot(ds.to(k.dtype), k, PREC, UPCAST)
    dk = _dot(tl.trans(ds).to(q.dtype), q, PREC, UPCAST)

    gptrs = _tile_ptrs(DQKV, pid, X, h, E, s_gb, s_gx, s_gl, BL, BE)
    ty = DQKV.dtype.element_ty
    tl.store(gptrs, dq.to(ty), mask=valid)
    tl.store(gptrs + D, dk.to(ty), mask=valid)
    tl.store(gptrs + 2 * D, dv.to(ty), mask=valid)


@triton.jit
def _keep_mask_kernel(SEED, KEEP, L, p_drop, seed_off, HEADS: tl.constexpr, BL: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.arange(0, BL)
    keep = _keep(tl.load(SEED) + seed_off, pid, h, L, p_drop, HEADS, BL)
    ptrs = KEEP + (pid * HEADS + h).to(tl.int64) * L * L + offs[:, None] * L + offs[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs[:, None] < L) & (offs[None, :] < L))


# -- launchers --------------------------------------------------------------------------------------------

def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot needs tiles of at least 16


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"  # fp32 must not drop to tf32


def _upcast(dtype: torch.dtype) -> bool:
    # TRITON_INTERPRET runs tl.dot through numpy, which has no bfloat16 and returns garbage for it; there
    # (CPU tests only) bf16 operands are widened to fp32 before the dot. GPUs take the native bf16 path.
    if dtype != torch.bfloat16:
        return False
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4 parses the variable as the decorator does
    return bool(knobs.runtime.interpret) if knobs is not None else os.environ.get("TRITON_INTERPRET") == "1"


def _axes(t: torch.Tensor, spatial: bool):
    """(X, L, stride_x, stride_l): spatial sequences run over C for each n; temporal over N for each c."""
    _, c, n, _ = t.shape
    return (n, c, t.stride(2), t.stride(1)) if spatial else (c, n, t.stride(1), t.stride(2))


def _half_args(qkv: torch.Tensor, out: torch.Tensor, heads: int, spatial: bool, col: int):
    x, l_, s_qx, s_ql = _axes(qkv, spatial)
    s_ox, s_ol = _axes(out, spatial)[2:]
    d = qkv.shape[-1] // 3
    return x, l_, d, d // heads, (qkv.stride(0), s_qx, s_ql), (out.stride(0), s_ox, s_ol, col)


def _forward(qkv_s, qkv_t, heads, dropout_p, seed):
    b, c, n, _ = qkv_s.shape
    ds, dt = qkv_s.shape[-1] // 3, qkv_t.shape[-1] // 3
    out = torch.empty(b, c, n, ds + dt, device=qkv_s.device, dtype=qkv_s.dtype)
    lses = []
    for i, (qkv, col) in enumerate(((qkv_s, 0), (qkv_t, ds))):
        x, l_, d, e, sq, so = _half_args(qkv, out, heads, i == 0, col)
        lse = torch.empty(b * x * heads * l_, device=qkv.device, dtype=torch.float32)
        _cc_fwd_kernel[(b * x, heads)](
            qkv, out, lse, seed, *sq, *so, x, l_, d, e, e ** -0.5, dropout_p, i,
            HEADS=heads, BL=_block(l_), BE=_block(e), DROPOUT=dropout_p > 0, PREC=_prec(qkv.dtype),
            UPCAST=_upcast(qkv.dtype),
        )
        lses.append(lse)
    return out, lses[0], lses[1]


def _backward(grad_out, qkv_s, qkv_t, out, lse_s, lse_t, heads, dropout_p, seed, g_s=None, g_t=None):
    """Gradients of both halves, written into ``g_s`` / ``g_t`` when given (views of a packed buffer)."""
    grad_out = grad_out.contiguous()  # same strides as `out` (contiguous), so one stride set serves both
    grads = []
    ds = qkv_s.shape[-1] // 3
    for i, (qkv, col, lse, g) in enumerate(((qkv_s, 0, lse_s, g_s), (qkv_t, ds, lse_t, g_t))):
        b = qkv.shape[0]
        if g is None:
            # Same memory order as the input (when it is dense): the view ops that made qkv then pass the
            # gradient back as views, without a copy.
            g = torch.empty_like(qkv)
        x, l_, d, e, sq, so = _half_args(qkv, out, heads, i == 0, col)
        _, _, s_gx, s_gl = _axes(g, i == 0)
        _cc_bwd_kernel[(b * x, heads)](
            qkv, out, grad_out, lse, g, seed, *sq, *so, g.stride(0), s_gx, s_gl, x, l_, d, e, e ** -0.5,
            dropout_p, i, HEADS=heads, BL=_block(l_), BE=_block(e), DROPOUT=dropout_p > 0,
            PREC=_prec(qkv.dtype), UPCAST=_upcast(qkv.dtype),
        )
        grads.append(g)
    return grads[0], grads[1]


# -- torch.library ops ------------------------------------------------------------------------------------

@torch.library.custom_op("cbramod_fast::criss_cross_fwd", mutates_args=())
def _fwd_op(qkv_s: torch.Tensor, qkv_t: torch.Tensor, heads: int, dropout_p: float,
            seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(qkv_s, qkv_t, heads, dropout_p, seed)


@_fwd_op.register_fake
def _fwd_fake(qkv_s, qkv_t, heads, dropout_p, seed):
    b, c, n, _ = qkv_s.shape
    out = qkv_s.new_empty(b, c, n, (qkv_s.shape[-1] + qkv_t.shape[-1]) // 3)
    return out, qkv_s.new_empty(b * n * heads * c, dtype=torch.float32), qkv_s.new_empty(
        b * c * heads * n, dtype=torch.float32)


@torch.library.custom_op("cbramod_fast::criss_cross_bwd", mutates_args=())
def _bwd_op(grad_out: torch.Tensor, qkv_s: torch.Tensor, qkv_t: torch.Tensor, out: torch.Tensor,
            lse_s: torch.Tensor, lse_t: torch.Tensor, heads: int, dropout_p: float,
            seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(grad_out, qkv_s, qkv_t, out, lse_s, lse_t, heads, dropout_p, seed)


@_bwd_op.register_fake
def _(grad_out, qkv_s, qkv_t, out, lse_s, lse_t, heads, dropout_p, seed):
    return torch.empty_like(qkv_s), torch.empty_like(qkv_t)


def _setup_context(ctx, inputs, output):
    qkv_s, qkv_t, heads, dropout_p, seed = inputs
    out, lse_s, lse_t = output
    ctx.save_for_backward(qkv_s, qkv_t, out, lse_s, lse_t, seed)
    ctx.heads, ctx.dropout_p = heads, dropout_p


def _autograd_backward(ctx, grad_out, _grad_lse_s, _grad_lse_t):
    qkv_s, qkv_t, out, lse_s, lse_t, seed = ctx.saved_tensors
    gs, gt = _bwd_op(grad_out, qkv_s, qkv_t, out, lse_s, lse_t, ctx.heads, ctx.dropout_p, seed)
    return gs, gt, None, None, None


_fwd_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# The packed variant takes the encoder's (2, B, C, N, 3D) batched-GEMM output whole. Same kernels; the only
# difference is the backward, which fills one (2, ...) gradient: given qkv[0] / qkv[1] separately, autograd
# would build a zero-filled (2, ...) tensor per half (select backward) and add the two.
@torch.library.custom_op("cbramod_fast::criss_cross_packed_fwd", mutates_args=())
def _packed_fwd_op(qkv: torch.Tensor, heads: int, dropout_p: float,
                   seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(qkv[0], qkv[1], heads, dropout_p, seed)


@_packed_fwd_op.register_fake
def _(qkv, heads, dropout_p, seed):
    return _fwd_fake(qkv[0], qkv[1], heads, dropout_p, seed)


@torch.library.custom_op("cbramod_fast::criss_cross_packed_bwd", mutates_args=())
def _packed_bwd_op(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse_s: torch.Tensor,
                   lse_t: torch.Tensor, heads: int, dropout_p: float, seed: torch.Tensor) -> torch.Tensor:
    g = torch.empty_like(qkv)
    _backward(grad_out, qkv[0], qkv[1], out, lse_s, lse_t, heads, dropout_p, seed, g[0], g[1])
    return g


@_packed_bwd_op.register_fake
def _(grad_out, qkv, out, lse_s, lse_t, heads, dropout_p, seed):
    return torch.empty_like(qkv)


def _packed_setup_context(ctx, inputs, output):
    qkv, heads, dropout_p, seed = inputs
    out, lse_s, lse_t = output
    ctx.save_for_backward(qkv, out, lse_s, lse_t, seed)
    ctx.heads, ctx.dropout_p = heads, dropout_p


def _packed_autograd_backward(ctx, grad_out, _grad_lse_s, _grad_lse_t):
    qkv, out, lse_s, lse_t, seed = ctx.saved_tensors
    return _packed_bwd_op(grad_out, qkv, out, lse_s, lse_t, ctx.heads, ctx.dropout_p, seed), None, None, None


_packed_fwd_op.register_autograd(_packed_autograd_backward, setup_context=_packed_setup_context)


# -- entry point ------------------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # float64: gradcheck


def _check(qkv_s: torch.Tensor, qkv_t: torch.Tensor, heads: int) -> None:
    if qkv_s.dim() != 4 or qkv_t.dim() != 4 or qkv_s.shape[:3] != qkv_t.shape[:3]:
        raise ValueError(f"qkv_s and qkv_t must be (B, C, N, 3*D) with equal (B, C, N); got "
                         f"{tuple(qkv_s.shape)} and {tuple(qkv_t.shape)}")
    for name, t in (("qkv_s", qkv_s), ("qkv_t", qkv_t)):
        if t.shape[-1] % (3 * heads):
            raise ValueError(f"{name}: last dim {t.shape[-1]} is not 3 * heads ({heads}) * head_dim")
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: the last dim must have unit stride, got strides {t.stride()}")
    if qkv_s.dtype != qkv_t.dtype or qkv_s.dtype not in _DTYPES:
        raise ValueError(f"qkv_s/qkv_t must share a float dtype {_DTYPES}, got {qkv_s.dtype}, {qkv_t.dtype}")


def new_seed(device: torch.device | str) -> torch.Tensor:
    """A dropout seed drawn from torch's RNG, kept on the device (no host sync under torch.compile)."""
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int32)


def criss_cross_attention_triton(qkv_s: torch.Tensor, qkv_t: torch.Tensor, heads: int, dropout_p: float = 0.0,
                                 training: bool = False, seed: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of ``reference.criss_cross_attention`` (same contract); differentiable.

    ``seed``: optional int32 device tensor of one element fixing the dropout mask (default: drawn from
    torch's RNG, so ``torch.manual_seed`` reproduces it).
    """
    _check(qkv_s, qkv_t, heads)
    p, seed = _dropout_args(dropout_p, training, seed, qkv_s.device)
    return _fwd_op(qkv_s, qkv_t, heads, p, seed)[0]


def criss_cross_attention_triton_packed(qkv: torch.Tensor, heads: int, dropout_p: float = 0.0,
                                        training: bool = False, seed: torch.Tensor | None = None) -> torch.Tensor:
    """``criss_cross_attention_triton(qkv[0], qkv[1], ...)`` for a ``(2, B, C, N, 3D)`` tensor (both halves
    of width D, e.g. the encoder's batched q|k|v GEMM output); the gradient of ``qkv`` is one tensor
    written by the kernels, without the per-half zero-filled buffers and their sum."""
    if qkv.dim() != 5 or qkv.shape[0] != 2:
        raise ValueError(f"qkv must be (2, B, C, N, 3*D), got shape {tuple(qkv.shape)}")
    _check(qkv[0], qkv[1], heads)
    p, seed = _dropout_args(dropout_p, training, seed, qkv.device)
    return _packed_fwd_op(qkv, heads, p, seed)[0]


def _dropout_args(dropout_p: float, training: bool, seed: torch.Tensor | None,
                  device: torch.device) -> tuple[float, torch.Tensor]:
    p = float(dropout_p) if training else 0.0
    if seed is None:
        seed = new_seed(device) if p > 0 else torch.zeros(1, device=device, dtype=torch.int32)
    return p, seed


def dropout_keep_mask(batch: int, channels: int, patches: int, heads: int, dropout_p: float,
                      seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keep masks the kernels draw for ``seed`` (tests and debugging): spatial ``(B, N, H, C, C)`` and
    temporal ``(B, C, H, N, N)``, 1 = kept."""
    masks = []
    for i, (x, l_) in enumerate(((patches, channels), (channels, patches))):
        keep = torch.empty(batch * x * heads * l_ * l_, device=seed.device, dtype=torch.int8)
        _keep_mask_kernel[(batch * x, heads)](seed, keep, l_, dropout_p, i, HEADS=heads, BL=_block(l_))
        masks.append(keep.view(batch, x, heads, l_, l_).bool())
    return masks[0], masks[1]
