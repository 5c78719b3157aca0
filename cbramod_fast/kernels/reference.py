"""PyTorch twins of the fused kernels: the CPU path, and the reference for tests and benchmarks.

Layout contract shared with the Triton kernels (``criss_cross.py``):

* ``qkv_s``: ``(B, C, N, 3 * Ds)``, the spatial half's fused projection, last dim ``[q | k | v]``;
  each of q, k, v holds ``heads`` heads of dim ``Ds // heads``, head-major (as
  ``nn.MultiheadAttention.in_proj_weight`` orders its rows). Spatial heads attend across C for each
  (b, n).
* ``qkv_t``: ``(B, C, N, 3 * Dt)``, the same for the temporal half; attends across N for each (b, c).
* Both may be strided views (unit stride on the last dim), e.g. slices of one ``(B, C, N, 6 * D/2)``
  tensor or of a ``(2, B, C, N, 3 * D/2)`` batched-GEMM output.
* Result: ``(B, C, N, Ds + Dt)`` = ``[spatial | temporal]``, before the output projections.

Also here: the dual mask (the rule is specified in ``cbramod_fast.masking``) and the masked-patch MSE of
pretraining, twins of ``masking_kernel.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _split_heads(qkv: torch.Tensor, heads: int):
    d = qkv.shape[-1] // 3
    return qkv.unflatten(-1, (3, heads, d // heads)).unbind(3)  # 3 x (B, C, N, H, E)


def _attend(qkv: torch.Tensor, heads: int, p: float) -> torch.Tensor:
    """Multi-head attention over ``qkv`` (S, L, 3*D) -> (S*H, L, E), E = D / heads.

    Explicit bmm + softmax + bmm: for these short sequences (L = C or N, ~20-30) it is 2-3x faster on CPU
    than SDPA's flash kernel, whose per-block overhead dominates. Heads go into the bmm batch, which needs
    q, k, v as contiguous (S*H, L, E): one permute copy of q|k|v (measured faster than
    ``_transform_bias_rescale_qkv``, the MHA fast path's kernel: 1.6x in fp32, 6x in bf16).
    """
    s, l, three_d = qkv.shape
    e = three_d // (3 * heads)
    q, k, v = qkv.unflatten(-1, (3, heads, e)).permute(2, 0, 3, 1, 4).reshape(3, s * heads, l, e).unbind(0)
    if not (torch.is_grad_enabled() and qkv.requires_grad) and not torch.compiler.is_compiling():
        # Inference. The 1/sqrt(E) scale rides on the GEMM (alpha) instead of a pass over q. The softmax
        # accumulates in fp32 also for bf16/fp16 input (ATen's bf16 softmax over short rows runs at half
        # the fp32 speed); the matmuls stay in the input dtype, as under autocast (upcasting q|k|v costs
        # large fp32 temporaries, i.e. page faults when glibc returns them to the OS between calls).
        with torch.autocast(qkv.device.type, enabled=False):
            scores = torch.baddbmm(q.new_zeros(()), q, k.transpose(1, 2), beta=0, alpha=e ** -0.5)
            attn = scores.softmax(-1, dtype=torch.float32).to(qkv.dtype)
            return torch.bmm(F.dropout(attn, p, True) if p > 0 else attn, v)
    attn = torch.bmm(q * e ** -0.5, k.transpose(1, 2)).softmax(-1, dtype=torch.float32).to(q.dtype)
    if p > 0:
        attn = F.dropout(attn, p, True)
    return torch.bmm(attn, v)


def criss_cross_attention(qkv_s: torch.Tensor, qkv_t: torch.Tensor, heads: int, dropout_p: float = 0.0,
                          training: bool = False) -> torch.Tensor:
    """Spatial (across C) and temporal (across N) multi-head attention, concatenated.

    Fastest when ``qkv_s`` is a ``(B, C, N, 3*Ds)`` view of ``(B, N, C, 3*Ds)`` memory and ``qkv_t`` is
    contiguous: both attention batches are then views of them. Other strides work (one extra copy).
    """
    p = dropout_p if training else 0.0
    b, c, n, _ = qkv_s.shape
    # Attention runs on 3-D tensors only: Inductor (torch 2.13) miscompiles 5-D batched matmul/SDPA on
    # permuted views (wrong values, or a crash), see tests/test_model.py::test_torch_compile*.
    os_ = _attend(qkv_s.transpose(1, 2).reshape(b * n, c, -1), heads, p)  # (B*N*H, C, Es)
    ot = _attend(qkv_t.reshape(b * c, n, -1), heads, p)  # (B*C*H, N, Et)
    os_ = os_.view(b, n, heads, c, -1).permute(0, 3, 1, 2, 4).flatten(-2)
    ot = ot.view(b, c, heads, n, -1).permute(0, 1, 3, 2, 4).flatten(-2)
    return torch.cat((os_, ot), dim=-1)


def criss_cross_attention_packed(qkv: torch.Tensor, heads: int, dropout_p: float = 0.0,
                                 training: bool = False) -> torch.Tensor:
    """``criss_cross_attention(qkv[0], qkv[1], ...)`` for a ``(2, B, C, N, 3*D)`` tensor. ``unbind``'s
    backward stacks the two gradients into one buffer; two ``qkv[i]`` selects would each zero-fill a
    ``(2, ...)`` buffer and add them."""
    if qkv.dim() != 5 or qkv.shape[0] != 2:
        raise ValueError(f"qkv must be (2, B, C, N, 3*D), got shape {tuple(qkv.shape)}")
    qkv_s, qkv_t = qkv.unbind(0)
    return criss_cross_attention(qkv_s, qkv_t, heads, dropout_p, training)


def criss_cross_attention_naive(qkv_s: torch.Tensor, qkv_t: torch.Tensor, heads: int) -> torch.Tensor:
    """Explicit softmax(QK^T/sqrt(E))V in float32 (no dropout): the plainest statement of the contract."""
    def attend(q, k, v):  # (..., L, E)
        s = (q.float() @ k.float().transpose(-1, -2)) / q.shape[-1] ** 0.5
        return (s.softmax(-1) @ v.float()).to(q.dtype)

    b, c, n, _ = qkv_s.shape
    qs, ks, vs = (t.permute(0, 2, 3, 1, 4).reshape(b * n, heads, c, -1) for t in _split_heads(qkv_s, heads))
    qt, kt, vt = (t.permute(0, 1, 3, 2, 4).reshape(b * c, heads, n, -1) for t in _split_heads(qkv_t, heads))
    os_ = attend(qs, ks, vs).view(b, n, heads, c, -1).permute(0, 3, 1, 2, 4).flatten(-2)
    ot = attend(qt, kt, vt).view(b, c, heads, n, -1).permute(0, 1, 3, 2, 4).flatten(-2)
    return torch.cat((os_, ot), dim=-1)


def criss_cross_attention_sdpa(qkv_s: torch.Tensor, qkv_t: torch.Tensor, heads: int, dropout_p: float = 0.0,
                               training: bool = False) -> torch.Tensor:
    """The same contract through ``F.scaled_dot_product_attention`` (the torch-native fused attention).

    The comparison point the kernel benchmarks need ("vs SDPA on the same layout"): SDPA wants 4-D
    ``(S, H, L, E)`` operands, so each half pays one reshape copy of q|k|v and the output is permuted back;
    which SDPA kernel runs (flash, memory-efficient, cuDNN, math) is PyTorch's choice for head dim E.
    """
    p = dropout_p if training else 0.0
    b, c, n, _ = qkv_s.shape

    def attend(qkv: torch.Tensor) -> torch.Tensor:  # (S, L, 3*D) -> (S, H, L, E)
        s, l_, three_d = qkv.shape
        q, k, v = qkv.reshape(s, l_, 3, heads, three_d // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p)

    os_ = attend(qkv_s.transpose(1, 2).reshape(b * n, c, -1))  # (B*N, H, C, Es)
    ot = attend(qkv_t.reshape(b * c, n, -1))  # (B*C, H, N, Et)
    os_ = os_.view(b, n, heads, c, -1).permute(0, 3, 1, 2, 4).flatten(-2)
    ot = ot.view(b, c, heads, n, -1).permute(0, 1, 3, 2, 4).flatten(-2)
    return torch.cat((os_, ot), dim=-1)


# -- dual masking and the pretraining loss ---------------------------------------------------------------

def check_dual_mask_args(batch: int, channels: int, patches: int, patch_ratio: float, lead_ratio: float,
                         span: int | None) -> None:
    for name, v in (("batch", batch), ("channels", channels), ("patches", patches)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"dual_mask: {name} must be a positive integer, got {v!r}")
    for name, v in (("patch_ratio", patch_ratio), ("lead_ratio", lead_ratio)):
        if not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"dual_mask: {name} must be in [0, 1], got {v!r}")
    if span is not None and (isinstance(span, bool) or not isinstance(span, int) or span < 1):
        raise ValueError(f"dual_mask: span must be None or a positive integer, got {span!r}")


def check_present(present: torch.Tensor, batch: int, channels: int, what: str = "dual_mask") -> None:
    if tuple(present.shape) != (batch, channels):
        raise ValueError(f"{what}: present must be (B, C) = {(batch, channels)}, got {tuple(present.shape)}")


def dual_mask(batch: int, channels: int, patches: int, patch_ratio: float, lead_ratio: float,
              generator: torch.Generator | None = None, present: torch.Tensor | None = None,
              span: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """The rule in ``cbramod_fast.masking``'s docstring in PyTorch; returns a (B, C, N) bool mask on the
    generator's device, else ``device``, else the CPU."""
    check_dual_mask_args(batch, channels, patches, patch_ratio, lead_ratio, span)
    if generator is not None:
        device = generator.device
    device = torch.device(device) if device is not None else torch.device("cpu")
    if present is None:
        present = torch.ones(batch, channels, dtype=torch.bool, device=device)
    else:
        check_present(present, batch, channels)
        present = present.to(device=device, dtype=torch.bool)

    # 1. inter-lead: whole leads, with the all-masked rescue of the present lead with the largest u.
    u = torch.rand(batch, channels, generator=generator, device=device)
    lead = (u < lead_ratio) & present
    all_masked = (lead == present).all(dim=1) & present.any(dim=1)  # every present lead drew u < ratio
    keep = torch.where(present, u, torch.full_like(u, -1.0)).argmax(dim=1)  # present lead with largest u
    rescue = F.one_hot(keep, channels).bool() & all_masked[:, None]
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


LOSS_ON = ("masked", "all")


def loss_weights(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, present: torch.Tensor | None,
                 loss_on: str) -> torch.Tensor:
    """Check the masked-MSE arguments; the (B, C, N) bool weight: masked (or all) patches of present leads."""
    if pred.dim() != 4 or pred.shape != target.shape or tuple(mask.shape) != tuple(pred.shape[:3]):
        raise ValueError(f"masked_mse: pred/target must be (B, C, N, P) and mask (B, C, N); got "
                         f"{tuple(pred.shape)}, {tuple(target.shape)}, {tuple(mask.shape)}")
    if loss_on not in LOSS_ON:
        raise ValueError(f"masked_mse: loss_on must be one of {LOSS_ON}, got {loss_on!r}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise ValueError(f"masked_mse: mask must be bool (or 0/1 integers), got {mask.dtype}")
    b, c = mask.shape[:2]
    if present is None:
        present = torch.ones(b, c, dtype=torch.bool, device=mask.device)
    check_present(present, b, c, "masked_mse")
    present = present.to(device=mask.device, dtype=torch.bool)[:, :, None]
    w = (mask != 0) if loss_on == "masked" else present.expand_as(mask)
    return w & present


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, present: torch.Tensor | None = None,
               loss_on: str = "masked") -> torch.Tensor:
    """Pretraining loss: the per-patch MSE (over P, in fp32) averaged over the masked patches of present
    leads (``loss_on="all"``: over every patch of a present lead); 0 when there are none. fp32 scalar."""
    w = loss_weights(pred, target, mask, present, loss_on)
    err = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (B, C, N)
    w = w.to(err.dtype)
    return (err * w).sum() / w.sum().clamp_min(1.0)
