"""Triton dual-masking kernel vs the PyTorch rule in cbramod_fast.masking (same distribution, invariants),
and the masked-MSE kernels vs their twin (reference.masked_mse).

Runs under TRITON_INTERPRET=1 without CUDA. Statistical checks use bounds of 5 binomial standard
deviations, so a correct kernel fails them with negligible probability and a wrong ratio is caught.
The loss: forward and gradients within 1e-6 relative of the fp32 twin (same math, another summation order).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from cbramod_fast import kernels
from cbramod_fast.kernels import masking_kernel as mk
from cbramod_fast.kernels.reference import masked_mse as masked_mse_reference
from cbramod_fast.masking import dual_mask, dual_mask_reference, expected_lead_masked, expected_mask_ratio

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


def _loss_inputs(b=2, c=3, n=5, p=200, pred_dtype=torch.float32, seed=7):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(b, c, n, p, generator=g).to(DEV, pred_dtype).requires_grad_(True)
    target = torch.randn(b, c, n, p, generator=g).to(DEV)
    mask = (torch.rand(b, c, n, generator=g) < 0.5).to(DEV)
    present = (torch.rand(b, c, generator=g) < 0.7).to(DEV)
    return pred, target, mask, present


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _check_grad(ours, twin, pred, target, mask, present=None, loss_on="masked", g=None):
    """fp32: within 1e-6 of the twin. bf16: both are roundings of the fp32 gradient, so (flash-attention's
    rule) our error against the fp32 gradient is at most 2x the twin's, plus the fp32 floor."""
    if pred.dtype == torch.float32:
        assert _rel(ours, twin) <= 1e-6
        return
    p32 = pred.detach().float().requires_grad_(True)
    (gold,) = torch.autograd.grad(masked_mse_reference(p32, target, mask, present, loss_on), p32, g)
    assert _rel(ours, gold) <= 2 * _rel(twin, gold) + 1e-6


@pytest.mark.parametrize("loss_on", ["masked", "all"])
@pytest.mark.parametrize("pred_dtype", [torch.float32, torch.bfloat16])
def test_masked_mse_matches_twin_forward_and_backward(loss_on, pred_dtype):
    # bf16 pred with an fp32 target is what pretraining under bf16 autocast feeds the loss.
    pred, target, mask, present = _loss_inputs(pred_dtype=pred_dtype)
    ours = mk.masked_mse(pred, target, mask, present, loss_on)
    ref = masked_mse_reference(pred, target, mask, present, loss_on)
    assert ours.dtype == torch.float32 and ours.shape == ()
    assert abs(ours.item() - ref.item()) <= 1e-6 * ref.item()
    g = torch.tensor(1.7, device=DEV)
    (ga,) = torch.autograd.grad(ours, pred, g)
    (gb,) = torch.autograd.grad(ref, pred, g)
    assert ga.dtype == pred_dtype and ga.shape == pred.shape
    _check_grad(ga, gb, pred, target, mask, present, loss_on, g)
    # patches outside the weight get exactly zero gradient
    w = (mask if loss_on == "masked" else torch.ones_like(mask)) & present[:, :, None]
    assert not ga[~w].any()


def test_masked_mse_strided_inputs_target_gradient_and_nothing_masked():
    g = torch.Generator().manual_seed(8)
    pred = torch.randn(2, 6, 3, 200, generator=g).to(DEV)[:, ::2].requires_grad_(True)  # strided view
    target = torch.randn(2, 3, 3, 400, generator=g).to(DEV)[..., :200].requires_grad_(True)
    mask = (torch.rand(2, 3, 3, generator=g) < 0.5).to(DEV)
    ours = mk.masked_mse(pred, target, mask)
    ref = masked_mse_reference(pred, target, mask)
    assert abs(ours.item() - ref.item()) <= 1e-6 * ref.item()
    ga = torch.autograd.grad(ours, (pred, target))
    gb = torch.autograd.grad(ref, (pred, target))
    assert all(_rel(a, b) <= 1e-6 for a, b in zip(ga, gb))
    none = mk.masked_mse(pred, target, torch.zeros_like(mask))
    assert none.item() == 0.0 and not torch.autograd.grad(none, pred)[0].any()


def test_masked_mse_compiles_fullgraph():
    pred, target, mask, present = _loss_inputs(1, 2, 3)
    fn = torch.compile(lambda p_, t, m, pr: mk.masked_mse(p_, t, m, pr), fullgraph=True, backend="aot_eager")
    got = fn(pred, target, mask, present)
    assert torch.equal(got, mk.masked_mse(pred, target, mask, present))
    assert torch.equal(torch.autograd.grad(got, pred)[0],
                       torch.autograd.grad(mk.masked_mse(pred, target, mask, present), pred)[0])


def test_cpu_generator_and_seed_move_to_the_kernel_device():
    # A CPU generator or seed tensor only seeds the draw; the kernel runs on the device (here "meta").
    meta = torch.device("meta")
    assert mk._seed(torch.Generator().manual_seed(1), meta).device == meta
    assert mk._seed(None, meta, torch.tensor([3], dtype=torch.int32)).device == meta
    assert mk._seed(None, meta, 3).device == meta
    a = mk.dual_mask(3, 5, 7, 0.5, 0.3, generator=torch.Generator().manual_seed(9), device=DEV)
    b = mk.dual_mask(3, 5, 7, 0.5, 0.3, generator=torch.Generator().manual_seed(9), device=DEV)
    assert a.device.type == torch.device(DEV).type and torch.equal(a, b)
    x = torch.randn(3, 5, 7, 8, device=DEV)
    out, m = mk.apply_dual_mask(x, torch.zeros(8), 0.5, 0.3, generator=torch.Generator().manual_seed(9))
    assert out.device == x.device and torch.equal(m, a)  # same seed draw, same mask


def test_bad_input():
    pred, target, mask, present = _loss_inputs(1, 2, 3)
    with pytest.raises(ValueError, match="masked_mse: pred/target"):
        mk.masked_mse(pred, target[..., :100], mask)
    with pytest.raises(ValueError, match="loss_on"):
        mk.masked_mse(pred, target, mask, present, "some")
    with pytest.raises(ValueError, match="present must be"):
        mk.masked_mse(pred, target, mask, present[:, :1])
    with pytest.raises(ValueError, match="mask must be bool"):
        mk.masked_mse(pred, target, mask.float())
    with pytest.raises(ValueError, match="patch_ratio"):
        mk.dual_mask(2, 3, 4, 1.5, 0.1, device=DEV)
    with pytest.raises(ValueError, match="present must be"):
        mk.dual_mask(2, 3, 4, 0.5, 0.1, present=torch.ones(2, 4, dtype=torch.bool, device=DEV), device=DEV)
    with pytest.raises(ValueError, match="mask_encoding"):
        mk.apply_dual_mask(torch.randn(1, 2, 3, 200, device=DEV), torch.zeros(100, device=DEV), 0.5, 0.1)


# -- CUDA only ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_kernel_same_distribution_as_reference():
    b, c, n, p, r = 20000, 12, 10, 0.35, 0.3
    present = torch.rand(b, c, device="cuda") < 0.8
    g = torch.Generator(device="cuda").manual_seed(0)
    m = dual_mask(b, c, n, p, r, generator=g, present=present, backend="triton").cpu()
    assert not (m & ~present.cpu()[:, :, None]).any()
    k = present.sum(dim=1).cpu()
    expected = torch.tensor([expected_mask_ratio(int(i), p, r) * int(i) * n for i in k.tolist()])
    d = m.sum(dim=(1, 2)).double() - expected.double()
    assert abs(d.mean()) <= 5 * d.std() / len(d) ** 0.5 + 1e-12
    m0 = dual_mask(b, c, n, 0.0, r, generator=g, present=present, backend="triton").cpu()
    assert (~m0.all(dim=2) & present.cpu()).any(dim=1)[present.cpu().any(dim=1)].all()


@pytest.mark.gpu
def test_triton_backend_without_device_runs_on_cuda():
    # No device, no generator, CPU inputs: the kernel still runs on the GPU (a GPU cannot read CPU memory).
    m = dual_mask(64, 12, 10, 0.5, 0.3, backend="triton")
    assert m.is_cuda and m.shape == (64, 12, 10)
    m = dual_mask(64, 12, 10, 0.5, 0.3, generator=torch.Generator().manual_seed(0),
                  present=torch.ones(64, 12, dtype=torch.bool), backend="triton")
    assert m.is_cuda
    assert mk.dual_mask(4, 3, 5, 0.5, 0.3, seed=torch.tensor([7], dtype=torch.int32)).is_cuda
    x = torch.randn(4, 3, 5, 200, device="cuda")
    out, mask = mk.apply_dual_mask(x, torch.zeros(200), 0.5, 0.3, generator=torch.Generator().manual_seed(1),
                                   present=torch.ones(4, 3, dtype=torch.bool))
    assert out.is_cuda and torch.equal(out, torch.where(mask[..., None], 0.0, x))


@pytest.mark.gpu
def test_masked_mse_with_inductor_on_cuda():
    pred, target, mask, present = _loss_inputs(8, 12, 10, pred_dtype=torch.bfloat16)
    fn = torch.compile(lambda p_, t, m, pr: mk.masked_mse(p_, t, m, pr), fullgraph=True)
    got = fn(pred, target, mask, present)
    ref = masked_mse_reference(pred, target, mask, present)
    assert abs(got.item() - ref.item()) <= 1e-6 * ref.item()
    (ga,) = torch.autograd.grad(got, pred)
    (gb,) = torch.autograd.grad(ref, pred)
    _check_grad(ga, gb, pred, target, mask, present)
    assert kernels.compiled_kernel_stats()  # the compiled kernels are visible to a GPU check
