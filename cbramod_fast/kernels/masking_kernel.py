"""Dual patch masking in Triton: draw the mask and write the masked input in one pass.

The rule is the one in ``cbramod_fast.masking`` (its docstring is the specification; ``dual_mask_reference``
is the PyTorch twin). Same distribution, not the same random stream: the kernel draws from
``tl.rand(seed, offset)`` with one stream per purpose (lead draws, patch draws, span phases, span blocks),
the seed being a device tensor drawn from torch's RNG (or from a ``torch.Generator``), or given
explicitly (``seed=``). Masks are returned as ``torch.bool`` (1 byte per cell, written as int8).

One program owns one sample: it holds the sample's (C x N) mask in registers, which is what the
"never mask every present lead" rescue needs, then streams the sample's patches, substituting
``mask_encoding`` where masked. ``masked_mse`` fuses the pretraining loss reduction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..masking import _check

__all__ = ["apply_dual_mask", "dual_mask", "masked_mse", "masked_sse"]

# Independent random streams per purpose (added to the seed).
_LEAD, _PATCH, _PHASE, _BLOCK = 0, 1, 2, 3


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
    row = b * C + offs_c  # stream offsets unique per (sample, lead)
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
def _masked_sse_kernel(PRED, TARGET, MASK, SSE, COUNT, N, P, BN: tl.constexpr, BP: tl.constexpr):
    # One program per (b, c): sum of squared errors over its masked patches (fp32) and their number.
    bc = tl.program_id(0).to(tl.int64)
    offs_n = tl.arange(0, BN)
    offs_p = tl.arange(0, BP)
    m = tl.load(MASK + bc * N + offs_n, mask=offs_n < N, other=0) != 0
    io = (offs_n[:, None] < N) & (offs_p[None, :] < P) & m[:, None]
    off = (bc * N + offs_n[:, None]) * P + offs_p[None, :]
    d = tl.load(PRED + off, mask=io, other=0.0).to(tl.float32) - tl.load(TARGET + off, mask=io, other=0.0).to(tl.float32)
    tl.store(SSE + bc, tl.sum(tl.sum(d * d, 1), 0))
    tl.store(COUNT + bc, tl.sum(m.to(tl.int32), 0))


# -- host side --------------------------------------------------------------------------------------------

_SEED_MAX = 2**31 - 4  # the kernel adds stream numbers 0..3 to the int32 seed


def _seed(generator: torch.Generator | None, device: torch.device,
          seed: int | torch.Tensor | None = None) -> torch.Tensor:
    if seed is None:
        return torch.randint(0, _SEED_MAX, (1,), generator=generator, device=device, dtype=torch.int32)
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
    _check(batch, channels, patches, patch_ratio, lead_ratio, span)
    device = generator.device if generator is not None else torch.device(device or "cpu")
    if present is not None:
        if tuple(present.shape) != (batch, channels):
            raise ValueError(f"dual_mask: present must be (B, C) = {(batch, channels)}, got {tuple(present.shape)}")
        present = present.to(device=device, dtype=torch.int8).contiguous()
    use_span = span is not None and span > 1
    span_v = span if use_span else 1
    meta = {"HAS_PRESENT": present is not None, "SPAN": use_span, "BC": triton.next_power_of_2(channels),
                "BN": triton.next_power_of_2(patches)}
    dummy = torch.zeros(1, device=device, dtype=torch.int8)
    args = (float(patch_ratio), float(lead_ratio), span_v, (patches + span_v - 1) // span_v + 1)
    return device, present if present is not None else dummy, args, meta


def dual_mask(batch: int, channels: int, patches: int, patch_ratio: float, lead_ratio: float,
              generator: torch.Generator | None = None, present: torch.Tensor | None = None,
              span: int | None = None, device: torch.device | str | None = None,
              seed: int | torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, N) bool dual mask drawn on the device (the signature of ``masking.dual_mask_reference``).

    ``seed`` (instead of ``generator``): an int, or a one-element int32 device tensor (no host sync);
    the same seed gives the same mask, also from ``apply_dual_mask``.
    """
    device, present_t, args, meta = _launch_args(batch, channels, patches, patch_ratio, lead_ratio, generator,
                                                 present, span, device)
    mask = torch.empty(batch, channels, patches, device=device, dtype=torch.int8)
    _dual_mask_kernel[(batch,)](_seed(generator, device, seed), present_t, mask, channels, patches, *args, **meta)
    return mask.view(torch.bool)


def apply_dual_mask(x: torch.Tensor, mask_encoding: torch.Tensor, patch_ratio: float, lead_ratio: float,
                    generator: torch.Generator | None = None, present: torch.Tensor | None = None,
                    span: int | None = None, seed: int | torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the dual mask for ``x`` (B, C, N, P) and return ``(x_masked, mask)`` from one kernel pass;
    masked patches hold ``mask_encoding`` (P,)."""
    if x.dim() != 4 or x.stride(-1) != 1:
        raise ValueError(f"x must be (B, C, N, P) with unit stride on P, got shape {tuple(x.shape)}, "
                         f"strides {x.stride()}")
    b, c, n, p = x.shape
    if tuple(mask_encoding.shape) != (p,):
        raise ValueError(f"mask_encoding must be ({p},), got {tuple(mask_encoding.shape)}")
    device, present_t, args, meta = _launch_args(b, c, n, patch_ratio, lead_ratio, generator, present, span,
                                                 x.device)
    mask = torch.empty(b, c, n, device=device, dtype=torch.int8)
    out = torch.empty((b, c, n, p), device=device, dtype=x.dtype)
    _apply_kernel[(b,)](_seed(generator, device, seed), present_t, mask, x, mask_encoding.contiguous(), out, c, n, p,
                        *args, x.stride(0), x.stride(1), x.stride(2), BP=triton.next_power_of_2(p), **meta)
    return out, mask.view(torch.bool)


def masked_sse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of squared errors over the masked patches, number of masked patches)``, fp32 and int64
    device scalars, from one kernel pass (no host sync). Forward only: for logging and evaluation."""
    if pred.shape != target.shape or pred.dim() != 4 or tuple(mask.shape) != tuple(pred.shape[:3]):
        raise ValueError(f"pred/target must be (B, C, N, P) and mask (B, C, N); got {tuple(pred.shape)}, "
                         f"{tuple(target.shape)}, {tuple(mask.shape)}")
    b, c, n, p = pred.shape
    sse = torch.empty(b * c, device=pred.device, dtype=torch.float32)
    count = torch.empty(b * c, device=pred.device, dtype=torch.int32)
    m8 = mask.contiguous()
    m8 = m8.view(torch.int8) if m8.dtype == torch.bool else m8.to(torch.int8)
    _masked_sse_kernel[(b * c,)](pred.contiguous(), target.contiguous(), m8, sse, count, n, p,
                                 BN=triton.next_power_of_2(n), BP=triton.next_power_of_2(p))
    return sse.sum(), count.sum()


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked patches (fp32 scalar; 0 when nothing is masked). Forward only:
    for logging/evaluation, the training loss keeps autograd in PyTorch."""
    sse, count = masked_sse(pred, target, mask)
    return sse / (count * pred.shape[-1]).clamp_min(1).to(torch.float32)
