"""Dual masking: invariants exactly, realised ratios statistically (CLT bounds at 5 standard errors); the
masked-patch loss: the dispatcher computes what pretraining's loss computes. (The Triton kernels' own
tests, CUDA ones included, are in test_kernels_masking.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from cbramod_fast.kernels import triton_available
from cbramod_fast.masking import dual_mask, expected_lead_masked, expected_mask_ratio, masked_mse

Z = 5.0  # a correct sampler fails a 5-sigma bound with probability ~6e-7 per check


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _within(values: torch.Tensor, expected: torch.Tensor | float, what: str) -> None:
    """Mean of i.i.d. per-sample ``values - expected`` is 0 within Z standard errors."""
    d = (values.double() - (expected.double() if torch.is_tensor(expected) else expected))
    se = d.std(unbiased=True) / math.sqrt(d.numel())
    assert abs(d.mean()) <= Z * se + 1e-12, f"{what}: mean deviation {d.mean():.5f} > {Z} x SE {se:.5f}"


@pytest.mark.parametrize("c,n", [(1, 10), (2, 4), (12, 10), (12, 1), (19, 30)])
def test_shape_dtype_and_reproducible(c, n):
    a = dual_mask(8, c, n, 0.5, 0.3, generator=_gen(1))
    b = dual_mask(8, c, n, 0.5, 0.3, generator=_gen(1))
    assert a.shape == (8, c, n) and a.dtype == torch.bool
    assert torch.equal(a, b)
    big = [dual_mask(64, c, n, 0.5, 0.3, generator=_gen(s)) for s in (1, 2)]
    assert not torch.equal(*big), "different seeds gave the same mask"


def test_never_all_leads_masked_and_rescue_is_largest_u():
    # lead_ratio=1 masks every lead's draw; exactly one present lead per sample must stay visible.
    present = torch.rand(3000, 12, generator=_gen(3)) < 0.6
    m = dual_mask(3000, 12, 10, 0.0, 1.0, generator=_gen(4), present=present)
    visible = (~m.all(dim=2)) & present
    has_any = present.any(dim=1)
    assert torch.equal(visible.sum(dim=1), has_any.long()), "not exactly one visible lead per sample"
    # The visible one is the present lead with the largest u (same draw order as the implementation).
    u = torch.rand(3000, 12, generator=_gen(4))
    keep = torch.where(present, u, torch.full_like(u, -1.0)).argmax(dim=1)
    rows = has_any.nonzero().squeeze(1)
    assert torch.equal(visible[rows, keep[rows]], torch.ones_like(rows, dtype=torch.bool))


def test_patch_ratio_zero_keeps_a_lead_for_any_lead_ratio():
    for r in (0.3, 0.7, 0.95):
        m = dual_mask(2000, 12, 10, 0.0, r, generator=_gen(5))
        assert (~m.all(dim=2)).any(dim=1).all(), f"lead_ratio={r}: a sample had every lead masked"


def test_single_lead_never_lead_masked():
    m = dual_mask(500, 1, 10, 0.0, 1.0, generator=_gen(6))
    assert not m.any()


def test_absent_leads_never_masked():
    present = torch.rand(500, 12, generator=_gen(7)) < 0.5
    m = dual_mask(500, 12, 10, 0.9, 0.9, generator=_gen(8), present=present, span=3)
    assert not (m & ~present[:, :, None]).any()
    none = dual_mask(10, 12, 10, 1.0, 1.0, present=torch.zeros(10, 12, dtype=torch.bool))
    assert not none.any()


@pytest.mark.parametrize("k", [1, 2, 3, 12])
def test_lead_masked_count_matches_expectation(k):
    r = 0.4
    m = dual_mask(6000, k, 10, 0.0, r, generator=_gen(10 + k))
    counts = m.all(dim=2).sum(dim=1)
    _within(counts, expected_lead_masked(k, r), f"lead-masked count, k={k}")


def test_patch_only_ratio_and_independence():
    p = 0.3
    m = dual_mask(4000, 12, 10, p, 0.0, generator=_gen(20))
    _within(m.float().mean(dim=(1, 2)), p, "patch ratio")
    # Independence of neighbours: P(m[n+1] & m[n]) = p^2.
    _within((m[..., 1:] & m[..., :-1]).float().mean(dim=(1, 2)), p * p, "adjacent pair rate")


@pytest.mark.parametrize("p,r", [(0.5, 0.25), (0.3, 0.6), (0.0, 0.5), (0.8, 0.1)])
def test_dual_ratio_with_random_presence(p, r):
    b, c, n = 4000, 12, 10
    present = torch.rand(b, c, generator=_gen(30)) < 0.7
    m = dual_mask(b, c, n, p, r, generator=_gen(31), present=present)
    k = present.sum(dim=1)
    expected = torch.tensor([expected_mask_ratio(int(i), p, r) * int(i) * n for i in k.tolist()])
    _within(m.sum(dim=(1, 2)), expected, f"masked cells, p={p} r={r}")


@pytest.mark.parametrize("span", [2, 3, 5])
def test_span_marginals_and_contiguity(span):
    p, b, c, n = 0.4, 3000, 4, 30
    m = dual_mask(b, c, n, p, 0.0, generator=_gen(40 + span), span=span)
    for pos in (0, n // 2, n - 1):  # every position keeps the marginal ratio, edges included
        _within(m[:, :, pos].float().mean(dim=1), p, f"span={span} position {pos}")
    # Interior masked runs are whole blocks: their lengths are multiples of span.
    rows = m.reshape(-1, n).int()
    edges = torch.diff(torch.nn.functional.pad(rows, (1, 1)), dim=1)
    for row, e in zip(rows[:300], edges[:300]):
        starts, ends = (e == 1).nonzero().squeeze(1), (e == -1).nonzero().squeeze(1)
        for s, t in zip(starts.tolist(), ends.tolist()):
            if s > 0 and t < n:
                assert (t - s) % span == 0, f"run [{s}, {t}) of length {t - s} with span={span}: {row.tolist()}"
    # Spans make neighbours correlated: P(m[n+1] | m[n]) is far above p.
    pair = (m[..., 1:] & m[..., :-1]).float().sum() / m[..., :-1].float().sum()
    assert pair > p + 0.2


def test_compiles_without_graph_breaks():
    fn = torch.compile(lambda present: dual_mask(4, 12, 10, 0.5, 0.3, present=present, span=2),
                       fullgraph=True, backend="eager")
    present = torch.ones(4, 12, dtype=torch.bool)
    assert fn(present).shape == (4, 12, 10)


@pytest.mark.parametrize("kw,msg", [({"patch_ratio": 1.5}, "patch_ratio"), ({"lead_ratio": -0.1}, "lead_ratio"),
                                    ({"span": 0}, "span"), ({"channels": 0}, "channels"),
                                    ({"present": torch.ones(3, 3, dtype=torch.bool)}, "present")])
def test_bad_arguments(kw, msg):
    args = {"batch": 2, "channels": 12, "patches": 10, "patch_ratio": 0.5, "lead_ratio": 0.2} | kw
    with pytest.raises(ValueError, match=msg):
        dual_mask(**args)


def _loss_case(seed: int = 0, b: int = 3, c: int = 4, n: int = 6):
    g = _gen(seed)
    pred = torch.randn(b, c, n, 200, generator=g).requires_grad_(True)
    target = torch.randn(b, c, n, 200, generator=g)
    mask = torch.rand(b, c, n, generator=g) < 0.5
    present = torch.rand(b, c, generator=g) < 0.75
    return pred, target, mask, present


def test_pretraining_loss_is_masked_mse():
    # The training loop calls this very function (no copy of the loss of its own), on CPU the PyTorch twin.
    from cbramod_fast.pretrain import loop

    assert loop.masked_mse is masked_mse
    pred, target, mask, present = _loss_case()
    for loss_on in ("masked", "all"):
        auto = masked_mse(pred, target, mask, present, loss_on)
        assert torch.equal(auto, masked_mse(pred, target, mask, present, loss_on, backend="torch"))


@pytest.mark.parametrize("loss_on", ["masked", "all"])
def test_masked_mse_definition(loss_on):
    # Stated independently: the mean over counted patches of each patch's mean squared error.
    pred, target, mask, present = _loss_case(1)
    w = (mask if loss_on == "masked" else torch.ones_like(mask)) & present[:, :, None]
    expected = ((pred.detach() - target) ** 2).mean(-1)[w].mean()
    got = masked_mse(pred, target, mask, present, loss_on)
    assert got.dtype == torch.float32 and abs(got.item() - expected.item()) <= 1e-6 * expected.item()
    nothing = masked_mse(pred, target, torch.zeros_like(mask), present)
    assert nothing.item() == 0.0 and not torch.autograd.grad(nothing, pred)[0].any()
    default_present = masked_mse(pred, target, mask, None, loss_on)
    assert torch.equal(default_present, masked_mse(pred, target, mask, torch.ones_like(present), loss_on))


@pytest.mark.skipif(not triton_available(), reason="needs triton (the kernel runs under TRITON_INTERPRET=1)")
def test_masked_mse_triton_backend_agrees_with_torch():
    pred, target, mask, present = _loss_case(2, b=2, c=3, n=4)
    a = masked_mse(pred, target, mask, present, backend="triton")
    b = masked_mse(pred, target, mask, present, backend="torch")
    assert abs(a.item() - b.item()) <= 1e-6 * b.item()
    ga, gb = torch.autograd.grad(a, pred)[0], torch.autograd.grad(b, pred)[0]
    assert (ga - gb).abs().max().item() <= 1e-6 * gb.abs().max().item()


def test_masked_mse_bad_arguments():
    pred, target, mask, present = _loss_case(3)
    with pytest.raises(ValueError, match="backend"):
        masked_mse(pred, target, mask, present, backend="cuda")
    with pytest.raises(ValueError, match="loss_on"):
        masked_mse(pred, target, mask, present, loss_on="visible")
    with pytest.raises(ValueError, match="mask"):
        masked_mse(pred, target, mask[:, :2], present)
