"""Triton dual-masking kernel vs the PyTorch rule in cbramod_fast.masking (same distribution, invariants).

Runs under TRITON_INTERPRET=1 without CUDA. Statistical checks use bounds of 5 binomial standard
deviations, so a correct kernel fails them with negligible probability and a wrong ratio is caught.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from cbramod_fast.kernels import masking_kernel as mk
from cbramod_fast.masking import dual_mask_reference, expected_lead_masked, expected_mask_ratio

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def _within(observed, expected, n, k=5.0):
    sd = max(expected * (1 - expected), 1e-12) ** 0.5 / n ** 0.5
    return abs(observed - expected) <= k * sd + 1e-9


@pytest.mark.parametrize("c, n, pr, lr", [(12, 10, 0.5, 0.25), (2, 30, 0.3, 0.5), (1, 16, 0.4, 0.9), (19, 3, 0.0, 0.2),
                                             (64, 5, 0.5, 0.1)])
def test_ratios_match_expectation_and_reference(c, n, pr, lr):
    b = 256
    m = mk.dual_mask(b, c, n, pr, lr, generator=_gen(0)).cpu()
    ref = dual_mask_reference(b, c, n, pr, lr, generator=torch.Generator().manual_seed(0))
    assert m.shape == (b, c, n) and m.dtype == torch.bool
    exp = expected_mask_ratio(c, pr, lr)
    assert _within(m.float().mean().item(), exp, b * c), (m.float().mean().item(), exp)
    assert _within(ref.float().mean().item(), exp, b * c)
    lead = m.all(dim=2).float().sum(1)  # fully masked leads (lead-masked, or every patch drawn)
    exp_lead = expected_lead_masked(c, lr) + (c - expected_lead_masked(c, lr)) * pr ** n
    assert abs(lead.mean().item() - exp_lead) <= 5 * c / b ** 0.5 + 1e-9


def test_invariants_with_absent_leads():
    b, c, n = 150, 12, 10
    present = torch.rand(b, c, generator=torch.Generator().manual_seed(1)) < 0.7
    present[0] = False  # a sample with no lead at all
    present[1] = False
    present[1, 3] = True  # one present lead: never lead-masked
    m = mk.dual_mask(b, c, n, 0.0, 0.95, generator=_gen(2), present=present.to(DEV)).cpu()
    assert not (m & ~present[:, :, None]).any(), "an absent lead was masked"
    visible = (~m.all(dim=2)) & present
    has = present.any(1)
    assert visible[has].any(dim=1).all(), "a sample lost all of its present leads"
    assert not m[0].any() and not m[1].any()


def test_spans_are_contiguous_and_keep_the_ratio():
    b, c, n, span = 200, 4, 20, 5
    m = mk.dual_mask(b, c, n, 0.4, 0.0, generator=_gen(3), span=span).cpu()
    assert _within(m.float().mean().item(), 0.4, b * c * n // span)
    # masked runs start only at block boundaries of some phase: runs are whole blocks except at the ends
    runs = (m[..., 1:] != m[..., :-1]).sum(-1)
    assert runs.float().mean().item() < (n - 1) * 0.4 * 0.6  # far fewer switches than independent patches


def test_reproducible_per_generator_seed():
    a = mk.dual_mask(3, 5, 7, 0.5, 0.3, generator=_gen(9))
    b = mk.dual_mask(3, 5, 7, 0.5, 0.3, generator=_gen(9))
    c = mk.dual_mask(3, 5, 7, 0.5, 0.3, generator=_gen(10))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_reproducible_per_explicit_seed():
    a = mk.dual_mask(3, 5, 7, 0.5, 0.3, seed=11, device=DEV)
    assert torch.equal(a, mk.dual_mask(3, 5, 7, 0.5, 0.3, seed=11, device=DEV))
    assert torch.equal(a, mk.dual_mask(3, 5, 7, 0.5, 0.3, seed=torch.tensor([11], dtype=torch.int32, device=DEV)))
    assert not torch.equal(a, mk.dual_mask(3, 5, 7, 0.5, 0.3, seed=12, device=DEV))
    x = torch.randn(3, 5, 7, 8, device=DEV)
    assert torch.equal(mk.apply_dual_mask(x, torch.zeros(8, device=DEV), 0.5, 0.3, seed=11)[1], a)
    with pytest.raises(ValueError, match="not both"):
        mk.dual_mask(3, 5, 7, 0.5, 0.3, generator=_gen(1), seed=1)
    with pytest.raises(ValueError, match="seed must be"):
        mk.dual_mask(3, 5, 7, 0.5, 0.3, seed=2**31, device=DEV)


def test_apply_writes_masked_input_and_mask_in_one_pass():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 6, 200, generator=g).to(DEV)
    enc = torch.randn(200, generator=g).to(DEV)
    out, m = mk.apply_dual_mask(x, enc, 0.5, 0.3, generator=_gen(5))
    expected = torch.where(m[..., None], enc, x)
    assert torch.equal(out, expected)
    assert torch.equal(m, mk.dual_mask(3, 5, 6, 0.5, 0.3, generator=_gen(5)))  # same draw as the mask-only kernel
    strided = torch.randn(3, 5, 12, 200, generator=g).to(DEV)[:, :, ::2]
    out2, m2 = mk.apply_dual_mask(strided, enc, 0.5, 0.3, generator=_gen(6))
    assert torch.equal(out2, torch.where(m2[..., None], enc, strided))


def test_masked_mse_matches_torch():
    g = torch.Generator().manual_seed(7)
    pred, target = torch.randn(2, 3, 4, 200, generator=g).to(DEV), torch.randn(2, 3, 4, 200, generator=g).to(DEV)
    mask = torch.rand(2, 3, 4, generator=g).to(DEV) < 0.5
    ref = ((pred - target) ** 2)[mask].mean()
    assert abs(mk.masked_mse(pred, target, mask).item() - ref.item()) <= 1e-5 * ref.item()
    sse, count = mk.masked_sse(pred, target, mask)
    assert count.item() == mask.sum().item()
    assert abs(sse.item() - ((pred - target) ** 2)[mask].sum().item()) <= 1e-5 * sse.item()
    assert mk.masked_mse(pred, target, torch.zeros_like(mask)).item() == 0.0


def test_bad_input():
    with pytest.raises(ValueError, match="patch_ratio"):
        mk.dual_mask(2, 3, 4, 1.5, 0.1, device=DEV)
    with pytest.raises(ValueError, match="present must be"):
        mk.dual_mask(2, 3, 4, 0.5, 0.1, present=torch.ones(2, 4, dtype=torch.bool, device=DEV), device=DEV)
    with pytest.raises(ValueError, match="mask_encoding"):
        mk.apply_dual_mask(torch.randn(1, 2, 3, 200, device=DEV), torch.zeros(100, device=DEV), 0.5, 0.1)
