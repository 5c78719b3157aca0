"""Triton criss-cross attention vs the PyTorch twin (reference.py): forward, backward, dropout.

Without CUDA the kernels run under TRITON_INTERPRET=1 (set before Triton is imported), so shapes stay
small. Tolerances: fp32 1e-5 absolute (forward and gradients, relative to the reference's max); fp16/bf16
at most 2x (forward) / 3x (gradients) the error of PyTorch itself in that dtype against fp32.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from conftest import DATA

from cbramod_fast import CBraMod
from cbramod_fast.kernels.criss_cross import (
    criss_cross_attention_triton,
    criss_cross_attention_triton_packed,
    dropout_keep_mask,
    new_seed,
)
from cbramod_fast.kernels.reference import criss_cross_attention, criss_cross_attention_sdpa

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1, 1, 1), (2, 1, 5), (1, 4, 1), (3, 3, 7), (1, 64, 2), (2, 19, 6), (1, 5, 33)]


def _qkv(b, c, n, d=100, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # One (2, B, C, N, 3D) tensor sliced in two: the strided layout the encoder's batched GEMM produces.
    base = torch.randn(2, b, c, n, 3 * d, generator=g).to(DEV, dtype).requires_grad_(True)
    return base


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_forward_backward_match_reference(shape):
    base = _qkv(*shape)
    out = criss_cross_attention_triton(base[0], base[1], 4)
    ref = criss_cross_attention(base[0], base[1], 4)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-5
    g = torch.randn_like(ref)
    (ga,) = torch.autograd.grad(out, base, g)
    (gb,) = torch.autograd.grad(ref, base, g)
    assert _rel(ga, gb) <= 1e-5


def test_odd_head_config_and_separate_tensors():
    # 3 heads of dim 7 per half, qkv_s / qkv_t separate contiguous tensors of different widths.
    g = torch.Generator().manual_seed(3)
    qs = torch.randn(2, 3, 4, 3 * 21, generator=g, device=DEV, requires_grad=True)
    qt = torch.randn(2, 3, 4, 3 * 12, generator=g, device=DEV, requires_grad=True)
    out = criss_cross_attention_triton(qs, qt, 3)
    ref = criss_cross_attention(qs, qt, 3)
    assert out.shape == (2, 3, 4, 33) and (out - ref).abs().max().item() <= 1e-5
    ga = torch.autograd.grad(out.sum(), (qs, qt))
    gb = torch.autograd.grad(ref.sum(), (qs, qt))
    assert max(_rel(a, b) for a, b in zip(ga, gb)) <= 1e-5


def test_encoder_layouts_and_gradient_strides():
    # The encoder's CPU path projects the spatial half in (B, N, C) row order: qkv_s is a transposed view.
    # The gradients come back in the input's memory order, so autograd passes them through the views.
    b, c, n = 2, 7, 3
    g = torch.Generator().manual_seed(5)
    qs = torch.randn(b, n, c, 300, generator=g, device=DEV).transpose(1, 2).requires_grad_(True)
    wide = torch.randn(b, c, n, 600, generator=g, device=DEV)  # a last-dim slice: non-dense strides
    qt = wide[..., 150:450].requires_grad_(True)
    out = criss_cross_attention_triton(qs, qt, 4)
    ref = criss_cross_attention(qs, qt, 4)
    assert (out - ref).abs().max().item() <= 1e-5
    w = torch.randn_like(ref)
    ga = torch.autograd.grad(out, (qs, qt), w)
    gb = torch.autograd.grad(ref, (qs, qt), w)
    assert max(_rel(a, r) for a, r in zip(ga, gb)) <= 1e-5
    assert ga[0].stride() == qs.stride() and ga[1].is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_error_within_pytorch_budget(dtype):
    base32 = _qkv(2, 6, 5)
    gold = criss_cross_attention(base32[0], base32[1], 4)
    g = torch.randn_like(gold)
    (ggold,) = torch.autograd.grad(gold, base32, g)
    base = base32.detach().to(dtype).requires_grad_(True)
    ours = criss_cross_attention_triton(base[0], base[1], 4)
    torch_lp = criss_cross_attention(base[0], base[1], 4)
    (gours,) = torch.autograd.grad(ours, base, g.to(dtype))
    (gtorch,) = torch.autograd.grad(torch_lp, base, g.to(dtype))
    assert ours.dtype == dtype
    assert _rel(ours, gold) <= 2 * _rel(torch_lp, gold) + 1e-5
    assert _rel(gours, ggold) <= 3 * _rel(gtorch, ggold) + 1e-5


def test_packed_entry_same_results_one_gradient_buffer():
    base = _qkv(2, 3, 5)
    seed = torch.tensor([99], dtype=torch.int32, device=DEV)
    for p in (0.0, 0.2):
        out = criss_cross_attention_triton_packed(base, 4, p, training=True, seed=seed)
        ref = criss_cross_attention_triton(base[0], base[1], 4, p, training=True, seed=seed)
        assert torch.equal(out, ref)
        g = torch.randn_like(ref)
        assert torch.equal(torch.autograd.grad(out, base, g)[0], torch.autograd.grad(ref, base, g)[0])
    # the packed op's backward feeds the leaf directly: no select backward (zero-filled buffers) between
    assert [type(f).__name__ for f, _ in out.grad_fn.next_functions if f is not None] == ["AccumulateGrad"]
    with pytest.raises(ValueError, match="2, B, C, N"):
        criss_cross_attention_triton_packed(base[0], 4)


def test_gradcheck_float64():
    base = torch.randn(2, 1, 3, 2, 3 * 8, dtype=torch.float64, device=DEV, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: criss_cross_attention_triton(t[0], t[1], 2), (base,),
                                    eps=1e-6, atol=1e-5, fast_mode=True)


def _dropout_reference(base, heads, p, keep_s, keep_t):
    """Attention with explicit keep masks (the kernels' draws), in plain PyTorch."""
    def attend(qkv, keep, perm, inv):
        q, k, v = (t.permute(*perm) for t in qkv.unflatten(-1, (3, heads, -1)).unbind(3))
        s = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        pr = s.softmax(-1) * keep / (1 - p)
        return (pr @ v).permute(*inv).flatten(-2)

    os_ = attend(base[0], keep_s, (0, 2, 3, 1, 4), (0, 3, 1, 2, 4))
    ot = attend(base[1], keep_t, (0, 1, 3, 2, 4), (0, 1, 3, 2, 4))
    return torch.cat((os_, ot), -1)


def test_dropout_matches_explicit_mask_forward_and_backward():
    b, c, n, p = 2, 5, 6, 0.3
    base = _qkv(b, c, n)
    seed = torch.tensor([1234], dtype=torch.int32, device=DEV)
    out = criss_cross_attention_triton(base[0], base[1], 4, p, training=True, seed=seed)
    keep_s, keep_t = dropout_keep_mask(b, c, n, 4, p, seed)
    ref = _dropout_reference(base, 4, p, keep_s, keep_t)
    assert (out - ref).abs().max().item() <= 1e-5
    g = torch.randn_like(ref)
    (ga,) = torch.autograd.grad(out, base, g)
    (gb,) = torch.autograd.grad(ref, base, g)
    assert _rel(ga, gb) <= 1e-5
    # the realised keep rate is 1 - p within 5 binomial standard deviations
    for keep in (keep_s, keep_t):
        k = keep.numel()
        assert abs(keep.float().mean().item() - (1 - p)) <= 5 * (p * (1 - p) / k) ** 0.5


def test_dropout_reproducible_per_seed_and_off_in_eval():
    base = _qkv(1, 4, 4)
    s1 = torch.tensor([7], dtype=torch.int32, device=DEV)
    a = criss_cross_attention_triton(base[0], base[1], 4, 0.5, True, seed=s1)
    b = criss_cross_attention_triton(base[0], base[1], 4, 0.5, True, seed=s1.clone())
    c = criss_cross_attention_triton(base[0], base[1], 4, 0.5, True, seed=s1 + 1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(0)
    d = criss_cross_attention_triton(base[0], base[1], 4, 0.5, True)
    torch.manual_seed(0)
    e = criss_cross_attention_triton(base[0], base[1], 4, 0.5, True)
    assert torch.equal(d, e)
    ev = criss_cross_attention_triton(base[0], base[1], 4, 0.5, training=False)
    assert (ev - criss_cross_attention(base[0], base[1], 4)).abs().max().item() <= 1e-5
    assert new_seed(DEV).dtype == torch.int32


def test_bad_input():
    x = torch.randn(1, 2, 3, 300, device=DEV)
    with pytest.raises(ValueError, match="equal"):
        criss_cross_attention_triton(x, torch.randn(1, 2, 4, 300, device=DEV), 4)
    with pytest.raises(ValueError, match="3 \\* heads"):
        criss_cross_attention_triton(x, x, 7)
    with pytest.raises(ValueError, match="unit stride"):
        y = torch.randn(1, 2, 3, 600, device=DEV)[..., ::2]
        criss_cross_attention_triton(y, y, 4)
    with pytest.raises(ValueError, match="dtype"):
        criss_cross_attention_triton(x.long(), x.long(), 4)


def test_encoder_with_triton_backend_matches_fixtures():
    model = CBraMod(n_layer=2, backend="triton").eval().to(DEV)
    model.load_state_dict(torch.load(DATA / "cbramod_weights_seed3_layers2.pth"), strict=True)
    params = dict(model.named_parameters())
    for case in torch.load(DATA / "cbramod_cases_seed3_layers2.pt"):
        x = case["x"].to(DEV).requires_grad_(True)
        mask = None if case["mask"] is None else case["mask"].to(DEV)
        out = model(x, mask)
        assert (out.cpu() - case["out"]).abs().max().item() <= 1e-4
        model.zero_grad()
        (out * case["probe"].to(DEV)).sum().backward()
        for key, ref in case["grads"].items():
            got = (x.grad if key == "x" else params[key].grad).cpu()
            assert _rel(got, ref) <= 1e-4, key


def test_custom_op_compiles_fullgraph():
    base = _qkv(1, 3, 4)

    def f(t):
        return criss_cross_attention_triton(t[0], t[1], 4)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert (compiled(base) - f(base)).abs().max().item() <= 1e-6


def test_encoder_training_step_with_dropout_is_reproducible():
    # train mode: the attention dropout runs in the kernels (seed drawn from torch's RNG), the rest in torch.
    torch.manual_seed(0)
    model = CBraMod(n_layer=1, backend="triton").to(DEV).train()
    x = torch.randn(1, 2, 3, 200, generator=torch.Generator().manual_seed(8)).to(DEV)

    def step(seed):
        torch.manual_seed(seed)
        model.zero_grad()
        out = model(x)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    (o1, g1), (o2, g2), (o3, _) = step(1), step(1), step(2)
    assert torch.isfinite(o1).all() and all(torch.isfinite(g).all() for g in g1)
    assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert not torch.equal(o1, o3)


def test_model_with_triton_backend_compiles_fullgraph():
    # Dynamo + AOT autograd trace the whole model with the kernels as opaque ops (no graph break);
    # aot_eager keeps the CPU run short (Inductor's codegen is not what is checked here).
    torch.manual_seed(0)
    model = CBraMod(n_layer=1, backend="triton").to(DEV).eval()  # no dropout: compare with eager
    x = torch.randn(1, 2, 3, 200, device=DEV, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    (gc,) = torch.autograd.grad(out.square().sum(), x)
    ref = model(x)
    (ge,) = torch.autograd.grad(ref.square().sum(), x)
    assert (out - ref).abs().max().item() <= 1e-6 and _rel(gc, ge) <= 1e-6


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 5), (1, 19, 30)], ids=lambda s: "x".join(map(str, s)))
def test_sdpa_twin_matches_reference(shape):
    # The kernel benchmarks' "vs SDPA" baseline must compute the same function on the same layout.
    base = _qkv(*shape)
    out = criss_cross_attention_sdpa(base[0], base[1], 4)
    ref = criss_cross_attention(base[0], base[1], 4)
    assert out.shape == ref.shape and (out - ref).abs().max().item() <= 1e-5
    g = torch.randn_like(ref)
    assert _rel(torch.autograd.grad(out, base, g)[0], torch.autograd.grad(ref, base, g)[0]) <= 1e-5


# -- CUDA only: the benchmark shapes, where the interpreter is too slow --------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(64, 12, 10), (64, 19, 30), (3, 64, 64)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_benchmark_shapes_on_gpu(shape, dtype):
    base32 = _qkv(*shape)
    gold = criss_cross_attention(base32[0], base32[1], 4)
    g = torch.randn_like(gold)
    (ggold,) = torch.autograd.grad(gold, base32, g)
    base = base32.detach().to(dtype).requires_grad_(True)
    ours = criss_cross_attention_triton_packed(base, 4)
    (gours,) = torch.autograd.grad(ours, base, g.to(dtype))
    if dtype == torch.float32:  # fp32 stays ieee in the kernels (no tf32), cuBLAS in the reference may not
        assert _rel(ours, gold) <= 1e-3 and _rel(gours, ggold) <= 1e-3
        return
    torch_lp = criss_cross_attention(base[0], base[1], 4)
    (gtorch,) = torch.autograd.grad(torch_lp, base, g.to(dtype))
    assert _rel(ours, gold) <= 2 * _rel(torch_lp, gold) + 1e-5
    assert _rel(gours, ggold) <= 3 * _rel(gtorch, ggold) + 1e-5


@pytest.mark.gpu
def test_model_forward_replays_in_a_cuda_graph():
    # Inference at B=1 is launch-bound: the benchmark captures the eager Triton model in a CUDA graph.
    torch.manual_seed(0)
    model = CBraMod(n_layer=2, backend="triton").to(DEV).eval()
    x = torch.randn(1, 19, 30, 200, device=DEV)
    with torch.inference_mode():
        ref = model(x)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                model(x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert (static_out - model(x)).abs().max().item() <= 1e-5
        assert not torch.equal(static_out, ref)  # the replay read the new input
