"""Dual masking for ECG pretraining: whole leads (inter-lead) plus random patches (intra-lead).

The rule, shared with the Triton kernel in ``cbramod_fast.kernels.masking_kernel`` (same distribution,
not the same random stream):

1. For each sample, every *present* lead ``c`` draws ``u_c ~ U(0, 1)`` and is masked whole when
   ``u_c < lead_ratio``. If that would mask every present lead of the sample, the present lead with the
   largest ``u_c`` stays unmasked, so a sample always keeps a visible lead to reconstruct from (a sample
   with one present lead, e.g. ``C = 1``, is never lead-masked).
2. Every patch of a present, not lead-masked lead is masked with probability ``patch_ratio``:
   independently per patch (``span`` None or 1), or in contiguous spans of ``span`` patches: the lead's
   time axis is cut into blocks of ``span`` patches at a random phase ``o ~ U{0, ..., span-1}`` (block of
   patch ``n`` = ``(n + o) // span``) and each block is masked with probability ``patch_ratio``. Every
   patch is then still masked with probability exactly ``patch_ratio``.
3. Absent leads (``present[b, c]`` False) are never masked: they are not reconstruction targets.

Everything is tensor ops (no boolean indexing, no ``.item()``), so it traces under ``torch.compile``.
"""

from __future__ import annotations

import torch

__all__ = ["dual_mask", "dual_mask_reference", "expected_lead_masked", "expected_mask_ratio"]


def _check(batch: int, channels: int, patches: int, patch_ratio: float, lead_ratio: float,
           span: int | None) -> None:
    for name, v in (("batch", batch), ("channels", channels), ("patches", patches)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"dual_mask: {name} must be a positive integer, got {v!r}")
    for name, v in (("patch_ratio", patch_ratio), ("lead_ratio", lead_ratio)):
        if not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"dual_mask: {name} must be in [0, 1], got {v!r}")
    if span is not None and (isinstance(span, bool) or not isinstance(span, int) or span < 1):
        raise ValueError(f"dual_mask: span must be None or a positive integer, got {span!r}")


def dual_mask_reference(batch: int, channels: int, patches: int, patch_ratio: float, lead_ratio: float,
                        generator: torch.Generator | None = None, present: torch.Tensor | None = None,
                        span: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """PyTorch implementation of the rule in the module docstring; returns a (B, C, N) bool mask."""
    _check(batch, channels, patches, patch_ratio, lead_ratio, span)
    if generator is not None:
        device = generator.device
    device = torch.device(device) if device is not None else torch.device("cpu")
    if present is None:
        present = torch.ones(batch, channels, dtype=torch.bool, device=device)
    else:
        if tuple(present.shape) != (batch, channels):
            raise ValueError(f"dual_mask: present must be (B, C) = {(batch, channels)}, got {tuple(present.shape)}")
        present = present.to(device=device, dtype=torch.bool)

    # 1. inter-lead: whole leads, with the all-masked rescue of the present lead with the largest u.
    u = torch.rand(batch, channels, generator=generator, device=device)
    lead = (u < lead_ratio) & present
    all_masked = (lead == present).all(dim=1) & present.any(dim=1)  # every present lead drew u < ratio
    keep = torch.where(present, u, torch.full_like(u, -1.0)).argmax(dim=1)  # present lead with largest u
    rescue = torch.nn.functional.one_hot(keep, channels).bool() & all_masked[:, None]
    lead = lead & ~rescue

    # 2. intra-lead: patches (or spans of patches) of the remaining present leads.
    if span is None or span == 1:
        patch = torch.rand(batch, channels, patches, generator=generator, device=device) < patch_ratio
    else:
        phase = torch.randint(0, span, (batch, channels, 1), generator=generator, device=device)
        block = (torch.arange(patches, device=device) + phase) // span  # (B, C, N)
        n_blocks = (patches + span - 1) // span + 1
        block_on = torch.rand(batch, channels, n_blocks, generator=generator, device=device) < patch_ratio
        patch = torch.gather(block_on, 2, block)
    return (lead[:, :, None] | patch) & present[:, :, None]


def dual_mask(batch: int, channels: int, patches: int, patch_ratio: float, lead_ratio: float,
              generator: torch.Generator | None = None, present: torch.Tensor | None = None,
              span: int | None = None, device: torch.device | str | None = None,
              backend: str = "auto") -> torch.Tensor:
    """Dual mask ``(B, C, N)`` bool (True = masked); see the module docstring for the exact rule.

    ``backend``: ``"auto"`` uses the fused Triton kernel on CUDA when it is importable and the PyTorch
    implementation elsewhere; ``"torch"`` / ``"triton"`` force one. ``generator`` (optional) seeds the
    draw and fixes the device.
    """
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"dual_mask: unknown backend {backend!r}; expected 'auto', 'torch' or 'triton'")
    dev = generator.device if generator is not None else torch.device(device if device is not None else "cpu")
    if backend == "triton" or (backend == "auto" and dev.type == "cuda"):
        try:
            from .kernels import masking_kernel
        except ImportError:
            if backend == "triton":
                raise
        else:
            return masking_kernel.dual_mask(batch, channels, patches, patch_ratio, lead_ratio,
                                            generator=generator, present=present, span=span, device=dev)
    return dual_mask_reference(batch, channels, patches, patch_ratio, lead_ratio, generator=generator,
                               present=present, span=span, device=dev)


def expected_lead_masked(n_present: int, lead_ratio: float) -> float:
    """Expected number of whole-masked leads in a sample with ``n_present`` present leads.

    ``k r`` leads draw ``u < r`` on average; when all ``k`` do (probability ``r**k``) one is rescued.
    """
    return n_present * lead_ratio - lead_ratio ** n_present if n_present > 0 else 0.0


def expected_mask_ratio(n_present: int, patch_ratio: float, lead_ratio: float) -> float:
    """Expected fraction of a sample's present (lead, patch) cells that are masked."""
    if n_present == 0:
        return 0.0
    frac_lead = expected_lead_masked(n_present, lead_ratio) / n_present
    return frac_lead + (1.0 - frac_lead) * patch_ratio
