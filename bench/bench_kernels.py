"""Kernel benchmarks: Triton criss-cross attention vs PyTorch on the same layout, forward and
forward+backward, the fused dual-masking kernel vs the PyTorch rule, and the masked-MSE loss kernels vs
their PyTorch twin.

    pytest bench/bench_kernels.py --benchmark-only        # CUDA only: timing the interpreter means nothing
    pytest bench/bench_kernels.py --benchmark-only --benchmark-json=bench/results/kernels_<gpu>.json

Attention implementations: ``triton`` (two strided halves), ``triton-packed`` (the encoder's one (2, ...)
tensor), ``torch`` (the bmm + softmax twin the fast model runs without Triton) and ``sdpa``
(``F.scaled_dot_product_attention``, the torch-native fused attention, PyTorch's choice of kernel).

Inputs are the strided layout the encoder produces: one (2, B, C, N, 300) batched-GEMM output sliced into
qkv_s / qkv_t, bf16 unless stated (the training dtype on GPU).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel timings need a CUDA device")

SHAPES = {"ecg12x10": (12, 10), "eeg19x30": (19, 30)}


def _sync(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


@pytest.mark.parametrize("batch", [64, 256])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", ["triton", "triton-packed", "torch", "sdpa"])
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd", "fwd+bwd p=0.1"])  # p: attention dropout, as in training
def test_attention(benchmark, impl, shape, batch, pass_):
    from cbramod_fast.kernels.criss_cross import (
        criss_cross_attention_triton,
        criss_cross_attention_triton_packed,
    )
    from cbramod_fast.kernels.reference import criss_cross_attention, criss_cross_attention_sdpa

    c, n = SHAPES[shape]
    base = torch.randn(2, batch, c, n, 300, device="cuda", dtype=torch.bfloat16, requires_grad=pass_ != "fwd")
    fn = {"triton": criss_cross_attention_triton, "torch": criss_cross_attention, "sdpa": criss_cross_attention_sdpa,
          "triton-packed": lambda qs, _qt, *a: criss_cross_attention_triton_packed(base, *a)}[impl]
    benchmark.group = f"attention {pass_} {shape} B={batch}"

    p = 0.1 if "p=0.1" in pass_ else 0.0

    def step():
        out = fn(base[0], base[1], 4, p, p > 0)
        if pass_ != "fwd":
            out.backward(torch.ones_like(out))
        return out

    for _ in range(3):
        step()
    benchmark.pedantic(_sync(step), rounds=30, warmup_rounds=3)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_dual_mask(benchmark, impl):
    from cbramod_fast.kernels.masking_kernel import apply_dual_mask
    from cbramod_fast.masking import dual_mask_reference

    x = torch.randn(256, 12, 10, 200, device="cuda", dtype=torch.bfloat16)
    enc = torch.zeros(200, device="cuda", dtype=torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(0)
    benchmark.group = "dual mask + masked input, B=256 12x10"

    def step():
        if impl == "triton":
            return apply_dual_mask(x, enc, 0.5, 0.25, generator=gen)
        m = dual_mask_reference(256, 12, 10, 0.5, 0.25, generator=gen)
        return torch.where(m[..., None], enc, x), m

    benchmark.pedantic(_sync(step), rounds=30, warmup_rounds=3)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_masked_mse(benchmark, impl):
    from cbramod_fast.masking import masked_mse

    gen = torch.Generator(device="cuda").manual_seed(0)
    # bf16 prediction, fp32 target: what pretraining under bf16 autocast feeds the loss
    pred = torch.randn(256, 12, 10, 200, device="cuda", generator=gen).bfloat16().requires_grad_(True)
    target = torch.randn(256, 12, 10, 200, device="cuda", generator=gen)
    mask = torch.rand(256, 12, 10, device="cuda", generator=gen) < 0.5
    present = torch.rand(256, 12, device="cuda", generator=gen) < 0.9
    benchmark.group = "masked MSE fwd+bwd, B=256 12x10"

    def step():
        loss = masked_mse(pred, target, mask, present, backend=impl)
        loss.backward()
        return loss

    for _ in range(3):
        step()
    benchmark.pedantic(_sync(step), rounds=30, warmup_rounds=3)
