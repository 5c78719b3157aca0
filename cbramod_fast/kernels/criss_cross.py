"""Fused criss-cross attention in Triton: forward, backward, attention dropout.

Layout contract: ``reference.py`` (the PyTorch twin). One kernel family serves both halves: a program
owns one or a few sequences (spatial: the C channels of one (b, n); temporal: the N patches of one (b, c))
and computes every head of each in turn, so the q|k|v rows of a sequence are read by one program (a head's
25-wide column block shares cache lines with its neighbours') instead of by programs a grid apart. Per head
it holds the whole (L x L) score tile in registers (L <= 64 for these models), reads q, k, v straight from
the fused projection's strided layout, and writes its half of the concatenated ``(B, C, N, Ds + Dt)``
output in place: no transposes, copies or concatenations. Every tensor is addressed through its own
strides (``grad_out`` included), with int64 offsets.

Order in this file: kernels, launchers, ``torch.library`` ops (opaque to ``torch.compile``) with their
autograd, and the functional entry points ``criss_cross_attention_triton`` / ``..._packed``.

Dropout follows flash-attention: the keep mask is drawn in-kernel from ``tl.rand(seed, offset)`` and
regenerated in the backward from the same seed tensor (never stored). The seed is a device tensor drawn
from torch's RNG, so ``torch.manual_seed`` makes training reproducible without a host sync.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .runtime import compiled_kernel_stats as _kernel_stats
from .runtime import kernel_device, require_kernel_device, triton_interpreting

__all__ = ["compiled_kernel_stats", "criss_cross_attention_triton", "criss_cross_attention_triton_packed",
           "dropout_keep_mask", "new_seed"]


@triton.jit
def _seq_offset(seq, X, s_b, s_x):
    # Offset of sequence seq = b * X + x; int64, since B*C*N*3D may exceed 2**31.
    seq = seq.to(tl.int64)
    return (seq // X) * s_b + (seq % X) * s_x


@triton.jit
def _tile(h, E, s_l, s_e, BL: tl.constexpr, BE: tl.constexpr):
    # (BL, BE) offsets of head h within a sequence: rows = positions, columns = the head's features.
    rows = tl.arange(0, BL).to(tl.int64)
    cols = h * E + tl.arange(0, BE)
    return rows[:, None] * s_l + cols[None, :].to(tl.int64) * s_e


@triton.jit
def _row_index(seq, h, L, HEADS: tl.constexpr):
    # First row of (sequence, head) in the (B*X*H*L) log-sum-exp buffer.
    return (seq.to(tl.int64) * HEADS + h) * L


@triton.jit
def _dropout_offsets(seq, h, L, HEADS: tl.constexpr, BL: tl.constexpr):
    # Random-stream offsets, unique per (sequence, head, query, key) and independent of the block size.
    # int64: B*X*H*L*L passes 2**31 at realistic sizes (B = 2048 at C = N = 64); int32 would wrap and
    # silently repeat masks.
    offs = tl.arange(0, BL).to(tl.int64)
    return (_row_index(seq, h, L, HEADS) + offs[:, None]) * L + offs[None, :]


@triton.jit
def _keep(seed, seq, h, L, p_drop, HEADS: tl.constexpr, BL: tl.constexpr):
    return tl.rand(seed, _dropout_offsets(seq, h, L, HEADS, BL)) >= p_drop


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # see _upcast(): the interpreter's bf16 dot is wrong, its fp32 dot is exact
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


# Sizes and strides are plain runtime integers: Triton would otherwise compile a variant per value class
# (== 1, divisible by 16), which buys nothing here (head columns start at h * 25) and multiplies compile
# time. grad_out's last-dim stride stays specialised: 1 (dense) and 0 (expanded) are its common values.
_RUNTIME_INTS = ["s_qb", "s_qx", "s_ql", "s_ob", "s_ox", "s_ol", "o_col", "n_seq", "seqs", "X", "L", "D", "E",
                 "seed_off"]


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _cc_fwd_kernel(
    QKV, OUT, LSE, SEED,
    s_qb, s_qx, s_ql,  # qkv strides: batch, outer axis, sequence axis (last dim unit stride)
    s_ob, s_ox, s_ol, o_col,  # output strides and this half's first column
    n_seq, seqs, X, L, D, E, scale, p_drop, seed_off,
    HEADS: tl.constexpr, BL: tl.constexpr, BE: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    offs_l = tl.arange(0, BL)
    in_e = tl.arange(0, BE)[None, :] < E
    for i in range(seqs):
        seq = tl.program_id(0) * seqs + i  # sequences [pid * seqs, (pid + 1) * seqs) of B*X
        rows = offs_l < tl.where(seq < n_seq, L, 0)  # no rows past the last sequence
        valid = rows[:, None] & in_e
        qkv = QKV + _seq_offset(seq, X, s_qb, s_qx)
        out = OUT + o_col + _seq_offset(seq, X, s_ob, s_ox)
        for h in range(HEADS):
            t = _tile(h, E, s_ql, 1, BL, BE)
            q = tl.load(qkv + t, mask=valid, other=0.0)
            k = tl.load(qkv + D + t, mask=valid, other=0.0)
            v = tl.load(qkv + 2 * D + t, mask=valid, other=0.0)
            s = _dot(q, tl.trans(k), PREC, UPCAST) * scale  # (BL, BL) fp32
            s = tl.where(offs_l[None, :] < L, s, float("-inf"))
            m = tl.max(s, 1)
            p = tl.exp(s - m[:, None])
            denom = tl.sum(p, 1)
            p = p / denom[:, None]
            tl.store(LSE + _row_index(seq, h, L, HEADS) + offs_l, m + tl.log(denom), mask=rows)
            if DROPOUT:
                keep = _keep(tl.load(SEED) + seed_off, seq, h, L, p_drop, HEADS, BL)
                p = tl.where(keep, p / (1.0 - p_drop), 0.0)
            o = _dot(p.to(v.dtype), v, PREC, UPCAST)
            tl.store(out + _tile(h, E, s_ol, 1, BL, BE), o.to(OUT.dtype.element_ty), mask=valid)


@triton.jit(do_not_specialize=_RUNTIME_INTS + ["s_db", "s_dx", "s_dl", "s_gb", "s_gx", "s_gl"])
def _cc_bwd_kernel(
    QKV, OUT, DOUT, LSE, DQKV, SEED,
    s_qb, s_qx, s_ql, s_ob, s_ox, s_ol, o_col,
    s_db, s_dx, s_dl, s_de,  # grad_out's own strides (any, e.g. 0 for an expanded gradient)
    s_gb, s_gx, s_gl,
    n_seq, seqs, X, L, D, E, scale, p_drop, seed_off,
    HEADS: tl.constexpr, BL: tl.constexpr, BE: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    offs_l = tl.arange(0, BL)
    in_e = tl.arange(0, BE)[None, :] < E
    ty = DQKV.dtype.element_ty
    for i in range(seqs):
        seq = tl.program_id(0) * seqs + i
        rows = offs_l < tl.where(seq < n_seq, L, 0)
        valid = rows[:, None] & in_e
        qkv = QKV + _seq_offset(seq, X, s_qb, s_qx)
        out = OUT + o_col + _seq_offset(seq, X, s_ob, s_ox)
        dout = DOUT + o_col * s_de + _seq_offset(seq, X, s_db, s_dx)
        dqkv = DQKV + _seq_offset(seq, X, s_gb, s_gx)
        for h in range(HEADS):
            t = _tile(h, E, s_ql, 1, BL, BE)
            q = tl.load(qkv + t, mask=valid, other=0.0)
            k = tl.load(qkv + D + t, mask=valid, other=0.0)
            v = tl.load(qkv + 2 * D + t, mask=valid, other=0.0)
            o = tl.load(out + _tile(h, E, s_ol, 1, BL, BE), mask=valid, other=0.0).to(tl.float32)
            do = tl.load(dout + _tile(h, E, s_dl, s_de, BL, BE), mask=valid, other=0.0)
            lse = tl.load(LSE + _row_index(seq, h, L, HEADS) + offs_l, mask=rows, other=0.0)

            # Recompute the probabilities from the saved log-sum-exp instead of storing them.
            s = _dot(q, tl.trans(k), PREC, UPCAST) * scale
            p = tl.where(offs_l[None, :] < L, tl.exp(s - lse[:, None]), 0.0)
            dp = _dot(do, tl.trans(v), PREC, UPCAST)  # d(dropped P)
            if DROPOUT:
                keep = _keep(tl.load(SEED) + seed_off, seq, h, L, p_drop, HEADS, BL)
                pd = tl.where(keep, p / (1.0 - p_drop), 0.0)
                dp = tl.where(keep, dp / (1.0 - p_drop), 0.0)
            else:
                pd = p
            dv = _dot(tl.trans(pd).to(do.dtype), do, PREC, UPCAST)
            delta = tl.sum(do.to(tl.float32) * o, 1)  # rowsum(dO * O) = rowsum(P_d * dP_d)
            ds = p * (dp - delta[:, None]) * scale
            dq = _dot(ds.to(k.dtype), k, PREC, UPCAST)
            dk = _dot(tl.trans(ds).to(q.dtype), q, PREC, UPCAST)

            g = dqkv + _tile(h, E, s_gl, 1, BL, BE)
            tl.store(g, dq.to(ty), mask=valid)
            tl.store(g + D, dk.to(ty), mask=valid)
            tl.store(g + 2 * D, dv.to(ty), mask=valid)


@triton.jit
def _keep_mask_kernel(SEED, KEEP, L, p_drop, seed_off, HEADS: tl.constexpr, BL: tl.constexpr):
    seq = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.arange(0, BL)
    keep = _keep(tl.load(SEED) + seed_off, seq, h, L, p_drop, HEADS, BL)
    ptrs = KEEP + _row_index(seq, h, L, HEADS) * L + offs[:, None] * L + offs[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs[:, None] < L) & (offs[None, :] < L))


# -- launchers --------------------------------------------------------------------------------------------

def compiled_kernel_stats() -> list[dict]:
    """Name, num_warps, n_regs and n_spills (etc.) of every compiled specialisation of this module's
    kernels, for a GPU check to print; empty under the interpreter."""
    return _kernel_stats(_cc_fwd_kernel, _cc_bwd_kernel, _keep_mask_kernel)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot needs tiles of at least 16


def _num_warps(bl: int) -> int:
    # At L = 64 the backward keeps ~8 (64 x 64) fp32 tiles live: 4 warps would spill registers.
    return 8 if bl >= 64 else 4


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"  # fp32 must not drop to tf32


def _upcast(dtype: torch.dtype) -> bool:
    # TRITON_INTERPRET runs tl.dot through numpy, which has no bfloat16 and returns garbage for it; there
    # (CPU tests only) bf16 operands are widened to fp32 before the dot. GPUs take the native bf16 path.
    return dtype == torch.bfloat16 and triton_interpreting()


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _seqs_per_program(n_seq: int, device: torch.device) -> int:
    """Sequences per program: more than one only while the grid keeps >= 16 programs per SM, since a
    small grid needs every program it has to hide memory latency."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    seqs = 1
    while seqs < 8 and n_seq >= 2 * seqs * 16 * sms:
        seqs *= 2
    return seqs


def _launch(n_seq: int, l_: int, e: int, heads: int, dtype: torch.dtype, device: torch.device,
            dropout_p: float) -> tuple[tuple[int], int, dict]:
    """(grid, sequences per program, launch keywords) shared by forward and backward."""
    seqs = _seqs_per_program(n_seq, device)
    bl = _block(l_)
    meta = {"HEADS": heads, "BL": bl, "BE": _block(e), "DROPOUT": dropout_p > 0, "PREC": _prec(dtype),
            "UPCAST": _upcast(dtype), "num_warps": _num_warps(bl), "num_stages": 1}
    return (triton.cdiv(n_seq, seqs),), seqs, meta


def _axes(t: torch.Tensor, spatial: bool):
    """(X, L, stride_x, stride_l): spatial sequences run over C for each n; temporal over N for each c."""
    _, c, n, _ = t.shape
    return (n, c, t.stride(2), t.stride(1)) if spatial else (c, n, t.stride(1), t.stride(2))


def _strides(t: torch.Tensor, spatial: bool) -> tuple[int, int, int]:
    """(batch, outer axis, sequence axis) strides of a (B, C, N, ...) tensor for one half."""
    _, _, s_x, s_l = _axes(t, spatial)
    return t.stride(0), s_x, s_l


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    # The public entries reject other inputs; this guards the ops against a compiler's relayout.
    return t if t.stride(-1) == 1 else t.contiguous()


def _grad_like(qkv: torch.Tensor) -> torch.Tensor:
    """Gradient buffer in the input's memory order when that is dense (the view ops that made qkv then
    pass the gradient back as views, without a copy); also the fake op's output, so the strides agree."""
    g = torch.empty_like(qkv)
    return g if g.stride(-1) == 1 else torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)


def _forward(qkv_s, qkv_t, heads, dropout_p, seed):
    qkv_s, qkv_t = _unit_last(qkv_s), _unit_last(qkv_t)
    b, c, n, _ = qkv_s.shape
    ds, dt = qkv_s.shape[-1] // 3, qkv_t.shape[-1] // 3
    out = torch.empty(b, c, n, ds + dt, device=qkv_s.device, dtype=qkv_s.dtype)
    lses = []
    for i, (qkv, col) in enumerate(((qkv_s, 0), (qkv_t, ds))):
        x, l_ = _axes(qkv, i == 0)[:2]
        d = qkv.shape[-1] // 3
        lse = torch.empty(b * x * heads * l_, device=qkv.device, dtype=torch.float32)
        grid, seqs, meta = _launch(b * x, l_, d // heads, heads, qkv.dtype, qkv.device, dropout_p)
        _cc_fwd_kernel[grid](
            qkv, out, lse, seed, *_strides(qkv, i == 0), *_strides(out, i == 0), col,
            b * x, seqs, x, l_, d, d // heads, (d // heads) ** -0.5, dropout_p, i, **meta,
        )
        lses.append(lse)
    return out, lses[0], lses[1]


def _backward(grad_out, qkv_s, qkv_t, out, lse_s, lse_t, heads, dropout_p, seed, g_s=None, g_t=None):
    """Gradients of both halves, written into ``g_s`` / ``g_t`` when given (views of a packed buffer).
    ``grad_out`` is read through its own strides: no copy, whatever layout autograd hands over."""
    grads = []
    ds = qkv_s.shape[-1] // 3
    for i, (qkv, col, lse, g) in enumerate(((qkv_s, 0, lse_s, g_s), (qkv_t, ds, lse_t, g_t))):
        g = _grad_like(qkv) if g is None else g
        qkv = _unit_last(qkv)
        b = qkv.shape[0]
        x, l_ = _axes(qkv, i == 0)[:2]
        d = qkv.shape[-1] // 3
        grid, seqs, meta = _launch(b * x, l_, d // heads, heads, qkv.dtype, qkv.device, dropout_p)
        _cc_bwd_kernel[grid](
            qkv, out, grad_out, lse, g, seed, *_strides(qkv, i == 0), *_strides(out, i == 0), col,
            *_strides(grad_out, i == 0), grad_out.stride(3), *_strides(g, i == 0),
            b * x, seqs, x, l_, d, d // heads, (d // heads) ** -0.5, dropout_p, i, **meta,
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
    return _grad_like(qkv_s), _grad_like(qkv_t)


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
    g = _grad_like(qkv)
    _backward(grad_out, qkv[0], qkv[1], out, lse_s, lse_t, heads, dropout_p, seed, g[0], g[1])
    return g


@_packed_bwd_op.register_fake
def _(grad_out, qkv, out, lse_s, lse_t, heads, dropout_p, seed):
    return _grad_like(qkv)


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
    if qkv_s.device != qkv_t.device:
        raise ValueError(f"qkv_s is on {qkv_s.device}, qkv_t on {qkv_t.device}")
    require_kernel_device(qkv_s.device, "criss_cross_attention_triton")


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
    """(p, seed on ``device``): a seed given on another device (e.g. the CPU) is moved, since a GPU kernel
    cannot read host memory."""
    p = float(dropout_p) if training else 0.0
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if seed is None:
        return p, new_seed(device) if p > 0 else torch.zeros(1, device=device, dtype=torch.int32)
    if not torch.is_tensor(seed) or seed.numel() != 1 or seed.dtype != torch.int32:
        raise ValueError(f"seed must be a one-element int32 tensor, got {seed!r}")
    return p, seed.reshape(1).to(device)


def dropout_keep_mask(batch: int, channels: int, patches: int, heads: int, dropout_p: float,
                      seed: torch.Tensor, device: torch.device | str | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The keep masks the kernels draw for ``seed`` (tests and debugging): spatial ``(B, N, H, C, C)`` and
    temporal ``(B, C, H, N, N)``, 1 = kept; on ``device``, else the seed's (a CPU seed: the CUDA device)."""
    device = kernel_device(device, seed)
    require_kernel_device(device, "dropout_keep_mask")
    seed = seed.reshape(1).to(device)
    masks = []
    for i, (x, l_) in enumerate(((patches, channels), (channels, patches))):
        keep = torch.empty(batch * x * heads * l_ * l_, device=device, dtype=torch.int8)
        _keep_mask_kernel[(batch * x, heads)](seed, keep, l_, dropout_p, i, HEADS=heads, BL=_block(l_))
        masks.append(keep.view(batch, x, heads, l_, l_).bool())
    return masks[0], masks[1]
