"""Dual masking for ECG pretraining: whole leads (inter-lead) plus random patches (intra-lead), and the
masked-patch reconstruction loss (``masked_mse``).

The rule, shared by the PyTorch twin (``dual_mask_reference``, in ``kernels/reference.py``) and the Triton
kernel in ``cbramod_fast.kernels.masking_kernel`` (same distribution, not the same random stream):

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
This module is the public face: it dispatches to the twin or the kernel, whose argument checks are shared.
"""

from __future__ import annotations

import torch

from .kernels import BACKENDS, reference, triton_available
from .kernels.reference import dual_mask as dual_mask_reference

__all__ = ["dual_mask", "dual_mask_reference", "expected_lead_masked", "expected_mask_ratio", "masked_mse"]


def _use_triton(backend: str, device: torch.device) -> bool:
    """``auto``: the Triton kernel on CUDA when it is importable; ``triton`` / ``torch`` force one."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return device.type == "cuda" and triton_available()
    return backend == "triton"


def dual_mask(batch: int, channels: int, patches: int, patch_ratio: float, lead_ratio: float,
              generator: torch.Generator | None = None, present: torch.Tensor | None = None,
              span: int | None = None, device: torch.device | str | None = None,
              backend: str = "auto") -> torch.Tensor:
    """Dual mask ``(B, C, N)`` bool (True = masked); see the module docstring for the exact rule.

    ``backend``: ``"auto"`` uses the fused Triton kernel on CUDA (the device of ``generator``, else
    ``device``) when it is importable and the PyTorch implementation (``dual_mask_reference``) elsewhere;
    ``"torch"`` / ``"triton"`` force one. ``generator`` (optional) seeds the draw. The PyTorch path returns
    the mask on the generator's device, else ``device``, else the CPU; the Triton kernel runs on
    ``device``, else a CUDA generator's or ``present``'s device, else the current CUDA device.
    """
    dev = generator.device if generator is not None else torch.device(device if device is not None else "cpu")
    if _use_triton(backend, dev):
        from .kernels import masking_kernel

        return masking_kernel.dual_mask(batch, channels, patches, patch_ratio, lead_ratio, generator=generator,
                                        present=present, span=span, device=device)
    return dual_mask_reference(batch, channels, patches, patch_ratio, lead_ratio, generator=generator,
                               present=present, span=span, device=dev)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, present: torch.Tensor | None = None,
               loss_on: str = "masked", backend: str = "auto") -> torch.Tensor:
    """Pretraining loss, differentiable: the per-patch mean squared error of ``pred`` against ``target``
    (``(B, C, N, P)``, computed in fp32) averaged over the masked patches (``mask`` ``(B, C, N)``) of present
    leads (``present`` ``(B, C)``, default all); ``loss_on="all"`` averages over every patch of a present
    lead. 0 when no patch counts. Returns an fp32 scalar, without a host sync.

    ``backend``: ``"auto"`` runs the fused Triton kernels (one pass forward, one backward) for CUDA tensors
    and the PyTorch twin (``kernels.reference.masked_mse``) elsewhere; the two agree to fp32 rounding.
    """
    if _use_triton(backend, pred.device):
        from .kernels import masking_kernel

        return masking_kernel.masked_mse(pred, target, mask, present, loss_on)
    return reference.masked_mse(pred, target, mask, present, loss_on)


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
