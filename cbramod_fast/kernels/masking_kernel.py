"""Dual patch masking and the masked-patch loss in Triton.

The mask rule is the one in ``cbramod_fast.masking`` (its docstring is the specification;
``reference.dual_mask`` is the PyTorch twin). Same distribution, not the same random stream: the kernel
draws from ``tl.rand(seed + stream, offset)``, one stream per purpose (0 lead draws, 1 patch draws,
2 span phases, 3 span blocks), the seed being a device tensor drawn from torch's RNG (or from a
``torch.Generator``), or given explicitly (``seed=``). Masks are returned as ``torch.bool`` (1 byte per
cell, written as int8).

One masking program owns one sample: it holds the sample's (C x N) mask in registers, which is what the
"never mask every present lead" rescue needs, then streams the sample's patches, substituting
``mask_encoding`` where masked.

``masked_mse`` is the pretraining loss (twin: ``reference.masked_mse``) as two kernels, one pass over
pred/target forward and one backward, registered with ``torch.library`` (opaque to ``torch.compile``).

Order: kernels, host helpers, the loss's ops with their autograd, entry points.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import check_dual_mask_args, check_present, loss_weights
from .runtime import compiled_kernel_stats as _kernel_stats
from .runtime import kernel_device, require_kernel_device

__all__ = ["apply_dual_mask", "compiled_kernel_stats", "dual_mask", "masked_mse"]


@triton.jit
def _sample_mask(SEED, PRESENT, b, C, N, patch_ratio, lead_ratio, span, n_blocks,
                 HAS_PRESENT: tl.constexpr, SPAN: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr):
    """(BC, BN) int1 mask of sample b (True = masked), following cbramod_fast.masking's rule."""
    seed = tl.load(SEED)
    offs_c = tl.arange(0, BC)
    offs_n = tl.arange(0, BN)
    in_c = offs_c < C
    if HAS_PRESENT:
        present = (tl.load(PRESENT + b.to(tl.int64) * C + offs_c, mask=in_c, other=0) != 0) & in_c
    else:
        present = in_c
    row = b.to(tl.int64) * C + offs_c  # stream offsets unique per (sample, lead)
    u = tl.rand(seed + 0, row)
    lead = (u < lead_ratio) & present
    n_present = tl.sum(present.to(tl.int32), 0)
    n_lead = tl.sum(lead.to(tl.int32), 0)
    all_masked = (n_lead == n_present) & (n_present > 0)
    # Rescue: the present lead with the largest u stays visible when every present lead drew u < ratio.
    keep = tl.argmax(tl.where(present, u, -1.0), 0)
    lead = lead & ~((offs_c == keep) & all_masked)
    if SPAN:
        phase = tl.minimum((tl.rand(seed + 2, row) * span).to(tl.int32), span - 1)
        blk = (offs_n[None, :] + phase[:, None]) // span
        patch = tl.rand(seed + 3, row[:, None] * n_blocks + blk) < patch_ratio
    else:
        patch = tl.rand(seed + 1, row[:, None] * N + offs_n[None, :]) < patch_ratio
    return (lead[:, None] | patch) & present[:, None] & (offs_n[None, :] < N)


@triton.jit
def _dual_mask_kernel(SEED, PRESENT, MASK, C, N, patch_ratio, lead_ratio, span, n_blocks,
                      HAS_PRESENT: tl.constexpr, SPAN: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr):
    b = tl.program_id(0)
    m = _sample_mask(SEED, PRESENT, b, C, N, patch_ratio, lead_ratio, span, n_blocks, HAS_PRESENT, SPAN, BC, BN)
    offs_c = tl.arange(0, BC)
    offs_n = tl.arange(0, BN)
    ptrs = MASK + b.to(tl.int64) * C * N + offs_c[:, None] * N + offs_n[None, :]
    tl.store(ptrs, m.to(tl.int8), mask=(offs_c[:, None] < C) & (offs_n[None, :] < N))


@triton.jit
def _apply_kernel(SEED, PRESENT, MASK, X, ENC, OUT, C, N, P, patch_ratio, lead_ratio, span, n_blocks,
                  s_xb, s_xc, s_xn, HAS_PRESENT: tl.constexpr, SPAN: tl.constexpr, BC: tl.constexpr,
                  BN: tl.constexpr, BP: tl.constexpr):
    b = tl.program_id(0)
    m = _sample_mask(SEED, PRESENT, b, C, N, patch_ratio, lead_ratio, span, n_blocks, HAS_PRESENT, SPAN, BC, BN)
    offs_c = tl.arange(0, BC)
    offs_n = tl.arange(0, BN)
    offs_p = tl.arange(0, BP)
    mptrs = MASK + b.to(tl.int64) * C * N + offs_c[:, None] * N + offs_n[None, :]
    tl.store(mptrs, m.to(tl.int8), mask=(offs_c[:, None] < C) & (offs_n[None, :] < N))
    enc = tl.load(ENC + offs_p, mask=offs_p < P, other=0.0)
    for c in range(C):
        m_row = tl.sum(tl.where(offs_c[:, None] == c, m.to(tl.int32), 0), 0) != 0  # (BN,)
        src = X + b.to(tl.int64) * s_xb + c * s_xc + offs_n[:, None].to(tl.int64) * s_xn + offs_p[None, :]
        io = (offs_n[:, None] < N) & (offs_p[None, :] < P)
        x = tl.load(src, mask=io, other=0.0)
        y = tl.where(m_row[:, None], enc[None, :].to(x.dtype), x)
        dst = OUT + ((b.to(tl.int64) * C + c) * N + offs_n[:, None]) * P + offs_p[None, :]
        tl.store(dst, y, mask=io)


@triton.jit
def _patch_ptrs(BASE, bc, C, n, s_b, s_c, s_n, offs_p):
    # (rows, P) pointers of patches n of lead bc = b * C + c in a (B, C, N, P) tensor (unit stride on P).
    return BASE + (bc // C) * s_b + (bc % C) * s_c + n[:, None].to(tl.int64) * s_n + offs_p[None, :]


@triton.jit
def _mse_fwd_kernel(PRED, TARGET, W, SSE, COUNT, C, N, P, s_pb, s_pc, s_pn, s_tb, s_tc, s_tn,
                    BN: tl.constexpr, BP: tl.constexpr):
    # One program per lead (b, c): sum over its weighted patches of each patch's mean squared error (fp32)
    # and the number of weighted patches; unweighted patches are not read.
    bc = tl.program_id(0).to(tl.int64)
    offs_p = tl.arange(0, BP)
    acc = tl.zeros((BN, BP), dtype=tl.float32)
    count = tl.zeros((BN,), dtype=tl.int32)
    for n0 in range(0, N, BN):
        n = n0 + tl.arange(0, BN)
        w = tl.load(W + bc * N + n, mask=n < N, other=0) != 0
        io = w[:, None] & (offs_p[None, :] < P)
        pred = tl.load(_patch_ptrs(PRED, bc, C, n, s_pb, s_pc, s_pn, offs_p), mask=io, other=0.0)
        target = tl.load(_patch_ptrs(TARGET, bc, C, n, s_tb, s_tc, s_tn, offs_p), mask=io, other=0.0)
        d = pred.to(tl.float32) - target.to(tl.float32)
        acc += d * d
        count += w.to(tl.int32)
    tl.store(SSE + bc, tl.sum(tl.sum(acc, 1), 0) / P)
    tl.store(COUNT + bc, tl.sum(count, 0))


@triton.jit
def _mse_bwd_kernel(GRAD, DENOM, PRED, TARGET, W, DPRED, C, N, P, s_pb, s_pc, s_pn, s_tb, s_tc, s_tn,
                    s_gb, s_gc, s_gn, BN: tl.constexpr, BP: tl.constexpr):
    # d loss / d pred = grad * 2 (pred - target) / (P * denom) on weighted patches, 0 elsewhere.
    bc = tl.program_id(0).to(tl.int64)
    offs_p = tl.arange(0, BP)
    scale = tl.load(GRAD).to(tl.float32) * 2.0 / (tl.load(DENOM) * P)
    for n0 in range(0, N, BN):
        n = n0 + tl.arange(0, BN)
        w = tl.load(W + bc * N + n, mask=n < N, other=0) != 0
        inside = (n[:, None] < N) & (offs_p[None, :] < P)
        io = inside & w[:, None]
        pred = tl.load(_patch_ptrs(PRED, bc, C, n, s_pb, s_pc, s_pn, offs_p), mask=io, other=0.0)
        target = tl.load(_patch_ptrs(TARGET, bc, C, n, s_tb, s_tc, s_tn, offs_p), mask=io, other=0.0)
        g = (pred.to(tl.float32) - target.to(tl.float32)) * scale
        tl.store(_patch_ptrs(DPRED, bc, C, n, s_gb, s_gc, s_gn, offs_p), g.to(DPRED.dtype.element_ty), mask=inside)


# -- host side --------------------------------------------------------------------------------------------

_SEED_MAX = 2**31 - 4  # the kernel adds stream numbers 0..3 to the int32 seed


def compiled_kernel_stats() -> list[dict]:
    """Registers and spills of this module's compiled kernels (see ``kernels.compiled_kernel_stats``)."""
    return _kernel_stats(_dual_mask_kernel, _apply_kernel, _mse_fwd_kernel, _mse_bwd_kernel)


def _seed(generator: torch.Generator | None, device: torch.device,
          seed: int | torch.Tensor | None = None) -> torch.Tensor:
    """The one-element int32 seed tensor on ``device`` (drawn on the generator's own device, then moved)."""
    if seed is None:
        where = generator.device if generator is not None else device
        return torch.randint(0, _SEED_MAX, (1,), generator=generator, device=where, dtype=torch.int32).to(device)
    if generator is not None:
        raise ValueError("dual_mask: pass either generator or seed, not both")
    if torch.is_tensor(seed):
        if seed.numel() != 1 or seed.dtype != torch.int32:
            raise ValueError(f"dual_mask: a seed tensor must hold one int32, got {seed.dtype} {tuple(seed.shape)}")
        return seed.reshape(1).to(device)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _SEED_MAX:
        raise ValueError(f"dual_mask: seed must be an int in [0, 2**31 - 4), got {seed!r}")
    return torch.tensor([seed], device=device, dtype=torch.int32)


def _launch_args(batch, channels, patches, patch_ratio, lead_ratio, generator, present, span, device):
    check_dual_mask_args(batch, channels, patches, patch_ratio, lead_ratio, span)
    require_kernel_device(device, "dual_mask")
    if present is not None:
        check_present(present, batch, channels)
        present = present.to(device=device, dtype=torch.int8).contiguous()
    use_span = span is not None and span > 1
    span_v = span if use_span else 1
    meta = {"HAS_PRESENT": present is not None, "SPAN": use_span, "BC": triton.next_power_of_2(channels),
            "BN": triton.next_power_of_2(patches)}
    dummy = torch.zeros(1, device=device, dtype=torch.int8)
    args = (float(patch_ratio), float(lead_ratio), span_v, (patches + span_v - 1) // span_v + 1)
    return present if present is not None else dummy, args, meta


def _patch_strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _mse_blocks(n: int, p: int) -> dict:
    bp = triton.next_power_of_2(p)
    return {"BN": min(triton.next_power_of_2(n), max(1, 2048 // bp)), "BP": bp}  # <= 2048 fp32 per tile


# -- masked MSE as torch.library ops ----------------------------------------------------------------------

@torch.library.custom_op("cbramod_fast::masked_mse_fwd", mutates_args=())
def _mse_fwd_op(pred: torch.Tensor, target: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pred, target = _unit_last(pred), _unit_last(target)
    b, c, n, p = pred.shape
    sse = torch.empty(b * c, device=pred.device, dtype=torch.float32)
    count = torch.empty(b * c, device=pred.device, dtype=torch.int32)
    _mse_fwd_kernel[(b * c,)](pred, target, w.contiguous().view(torch.int8), sse, count, c, n, p,
                              *_patch_strides(pred), *_patch_strides(target), **_mse_blocks(n, p))
    denom = count.sum().clamp_min(1).to(torch.float32)
    return sse.sum() / denom, denom


@_mse_fwd_op.register_fake
def _(pred, target, w):
    return pred.new_empty((), dtype=torch.float32), pred.new_empty((), dtype=torch.float32)


@torch.library.custom_op("cbramod_fast::masked_mse_bwd", mutates_args=())
def _mse_bwd_op(grad: torch.Tensor, denom: torch.Tensor, pred: torch.Tensor, target: torch.Tensor,
                w: torch.Tensor) -> torch.Tensor:
    dpred = torch.empty(pred.shape, device=pred.device, dtype=pred.dtype)
    pred, target = _unit_last(pred), _unit_last(target)
    b, c, n, p = pred.shape
    _mse_bwd_kernel[(b * c,)](grad.reshape(1), denom.reshape(1), pred, target, w.contiguous().view(torch.int8),
                              dpred, c, n, p, *_patch_strides(pred), *_patch_strides(target),
                              *_patch_strides(dpred), **_mse_blocks(n, p))
    return dpred


@_mse_bwd_op.register_fake
def _(grad, denom, pred, target, w):
    return pred.new_empty(pred.shape)


def _mse_setup_context(ctx, inputs, output):
    pred, target, w = inputs
    ctx.save_for_backward(pred, target, w, output[1])


def _mse_autograd_backward(ctx, grad, _grad_denom):
    pred, target, w, denom = ctx.saved_tensors
    dpred = _mse_bwd_op(grad, denom, pred, target, w) if any(ctx.needs_input_grad[:2]) else None
    dtarget = -dpred.to(target.dtype) if ctx.needs_input_grad[1] else None
    return (dpred if ctx.needs_input_grad[0] else None), dtarget, None


_mse_fwd_op.register_autograd(_mse_autograd_backward, setup_context=_mse_setup_context)


# -- entry points -----------------------------------------------------------------------------------------

def dual_mask(batch: int, channels: int, patches: int, patch_ratio: float, lead_ratio: float,
              generator: torch.Generator | None = None, present: torch.Tensor | None = None,
              span: int | None = None, device: torch.device | str | None = None,
              seed: int | torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, N) bool dual mask drawn on the device (the signature of ``masking.dual_mask_reference``).

    The kernel runs on ``device``, else on a CUDA generator's or ``present``'s device, else on the current
    CUDA device; a CPU generator or seed tensor is moved there. ``seed`` (instead of ``generator``): an int,
    or a one-element int32 tensor (on the device: no host sync); the same seed gives the same mask, also
    from ``apply_dual_mask``.
    """
    device = kernel_device(device, generator, present)
    present_t, args, meta = _launch_args(batch, channels, patches, patch_ratio, lead_ratio, generator, present,
                                         span, device)
    mask = torch.empty(batch, channels, patches, device=device, dtype=torch.int8)
    _dual_mask_kernel[(batch,)](_seed(generator, device, seed), present_t, mask, channels, patches, *args, **meta)
    return mask.view(torch.bool)


def apply_dual_mask(x: torch.Tensor, mask_encoding: torch.Tensor, patch_ratio: float, lead_ratio: float,
                    generator: torch.Generator | None = None, present: torch.Tensor | None = None,
                    span: int | None = None, seed: int | torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the dual mask for ``x`` (B, C, N, P) and return ``(x_masked, mask)`` from one kernel pass;
    masked patches hold ``mask_encoding`` (P,). Runs on ``x``'s device (generator, seed, ``present`` and
    ``mask_encoding`` are moved there)."""
    if x.dim() != 4 or x.stride(-1) != 1:
        raise ValueError(f"x must be (B, C, N, P) with unit stride on P, got shape {tuple(x.shape)}, "
                         f"strides {x.stride()}")
    b, c, n, p = x.shape
    if tuple(mask_encoding.shape) != (p,):
        raise ValueError(f"mask_encoding must be ({p},), got {tuple(mask_encoding.shape)}")
    device = x.device
    present_t, args, meta = _launch_args(b, c, n, patch_ratio, lead_ratio, generator, present, span, device)
    mask = torch.empty(b, c, n, device=device, dtype=torch.int8)
    out = torch.empty((b, c, n, p), device=device, dtype=x.dtype)
    enc = mask_encoding.to(device).contiguous()
    _apply_kernel[(b,)](_seed(generator, device, seed), present_t, mask, x, enc, out, c, n, p, *args,
                        x.stride(0), x.stride(1), x.stride(2), BP=triton.next_power_of_2(p), **meta)
    return out, mask.view(torch.bool)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, present: torch.Tensor | None = None,
               loss_on: str = "masked") -> torch.Tensor:
    """``reference.masked_mse`` (the pretraining loss; contract in ``cbramod_fast.masking.masked_mse``) in
    two kernels: fp32 scalar, differentiable with respect to ``pred`` (and ``target``), no host sync."""
    w = loss_weights(pred, target, mask, present, loss_on)
    require_kernel_device(pred.device, "masked_mse")
    if target.device != pred.device:
        raise ValueError(f"masked_mse: pred is on {pred.device}, target on {target.device}")
    return _mse_fwd_op(pred, target, w.to(pred.device))[0]
