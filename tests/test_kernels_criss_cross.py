"""Triton criss-cross attention vs the PyTorch twin (reference.py): forward, backward, dropout.

Without CUDA the kernels run under TRITON_INTERPRET=1 (set before Triton is imported), so shapes stay
small. Tolerances: fp32 1e-5 absolute (forward and gradients, relative to the reference's max); fp16/bf16
at most 2x (forward) / 3x (gradients) the error of PyTorch itself in that dtype against fp32. The
gpu-marked tests at the end run only on CUDA (compiled kernels, Inductor, deterministic cuDNN).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")
tl = triton.language

from conftest import DATA

from cbramod_fast import CBraMod, kernels
from cbramod_fast.kernels import criss_cross as cc
from cbramod_fast.kernels import runtime
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


@pytest.fixture
def strict_fp32():
    """fp32 parity on CUDA: cuDNN convolutions (the patch embedding) and cuBLAS matmuls without TF32.
    cuDNN's TF32 default is PyTorch's (and the original's); the library leaves it alone."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def deterministic():
    """Deterministic algorithms (cuDNN's backward included) for bitwise comparisons; state restored."""
    if torch.cuda.is_available() and os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in (":4096:8", ":16:8"):
        pytest.skip("deterministic cuBLAS needs CUBLAS_WORKSPACE_CONFIG=:4096:8 set before CUDA starts "
                    "(tests/conftest.py sets it when it is not set)")
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


def _fixture_model(n_layer=2):
    model = CBraMod(n_layer=n_layer, backend="triton").eval().to(DEV)
    model.load_state_dict(torch.load(DATA / "cbramod_weights_seed3_layers2.pth"), strict=True)
    return model


def _check_fixture_case(model, case, forward=None):
    """Outputs within 1e-4 absolute and gradients within 1e-4 relative of the original's (fixtures)."""
    params = dict(model.named_parameters())
    x = case["x"].to(DEV).requires_grad_(True)
    mask = None if case["mask"] is None else case["mask"].to(DEV)
    out = (forward or model)(x, mask)
    assert (out.detach().cpu() - case["out"]).abs().max().item() <= 1e-4
    model.zero_grad()
    (out * case["probe"].to(DEV)).sum().backward()
    for key, ref in case["grads"].items():
        got = (x.grad if key == "x" else params[key].grad).cpu()
        assert _rel(got, ref) <= 1e-4, key


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


def _graph_nodes(t: torch.Tensor) -> set[str]:
    seen, todo = set(), [t.grad_fn]
    while todo:
        f = todo.pop()
        if f is not None and f not in seen:
            seen.add(f)
            todo.extend(g for g, _ in f.next_functions)
    return {type(f).__name__ for f in seen}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_entry_gradients_equal_two_tensor_op(backend):
    # kernels.criss_cross_attention_packed: the encoder's (2, B, C, N, 3D) GEMM output in one tensor.
    base = _qkv(1, 3, 5)
    g = torch.randn(1, 3, 5, 200, generator=torch.Generator().manual_seed(1)).to(DEV)
    for p in (0.0, 0.2):
        torch.manual_seed(7)  # the same dropout draws for both (torch's RNG or the kernels' seed)
        out = kernels.criss_cross_attention_packed(base, 4, p, training=True, backend=backend)
        (ga,) = torch.autograd.grad(out, base, g)
        torch.manual_seed(7)
        ref = kernels.criss_cross_attention(base[0], base[1], 4, p, training=True, backend=backend)
        (gb,) = torch.autograd.grad(ref, base, g)
        assert torch.equal(out, ref) and torch.equal(ga, gb), p
    # no select backward (a zero-filled (2, ...) buffer per half) between the op and the leaf
    assert "SelectBackward0" in _graph_nodes(ref) and "SelectBackward0" not in _graph_nodes(out)
    with pytest.raises(ValueError, match="2, B, C, N"):
        kernels.criss_cross_attention_packed(base[0], 4, backend=backend)


def test_several_sequences_per_program_give_identical_results(monkeypatch):
    # The GPU launcher groups sequences per program on large grids; 3 per program leaves a partial last group.
    base = _qkv(1, 5, 7)  # 7 spatial and 5 temporal sequences
    seed = torch.tensor([42], dtype=torch.int32, device=DEV)
    g = torch.randn(1, 5, 7, 200, generator=torch.Generator().manual_seed(2)).to(DEV)
    results = []
    for seqs in (1, 3):
        monkeypatch.setattr(cc, "_seqs_per_program", lambda n_seq, device, seqs=seqs: seqs)
        out = criss_cross_attention_triton_packed(base, 4, 0.3, training=True, seed=seed)
        results.append((out, torch.autograd.grad(out, base, g)[0]))
    (o1, g1), (o3, g3) = results
    assert torch.equal(o1, o3) and torch.equal(g1, g3)


def test_launch_configuration(monkeypatch):
    meta = cc._launch(100, 64, 25, 4, torch.float32, torch.device("cpu"), 0.0)[2]
    assert meta["num_warps"] == 8 and meta["BL"] == 64 and meta["BE"] == 32  # 64 x 64 tiles: no spills
    assert cc._launch(100, 30, 25, 4, torch.float32, torch.device("cpu"), 0.0)[2]["num_warps"] == 4
    assert cc._launch(100, 33, 25, 4, torch.float32, torch.device("cpu"), 0.0)[2]["num_warps"] == 8
    monkeypatch.setattr(cc, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    assert [cc._seqs_per_program(n, cuda) for n in (640, 4223, 4224, 7680, 10**6)] == [1, 1, 2, 2, 8]
    assert cc._seqs_per_program(10**6, torch.device("cpu")) == 1
    grid, seqs, _ = cc._launch(7680, 19, 25, 4, torch.bfloat16, cuda, 0.1)
    assert seqs == 2 and grid == (3840,)


@triton.jit
def _offsets_probe(OUT, KEEP, SEED, seq0, L, p_drop, HEADS: tl.constexpr, BL: tl.constexpr):
    seq = tl.program_id(0) + seq0  # an int32 sequence index, as in the kernels
    h = tl.program_id(1)
    offs = tl.arange(0, BL)
    at = (tl.program_id(0) * HEADS + h) * BL * BL + offs[:, None] * BL + offs[None, :]
    tl.store(OUT + at, cc._dropout_offsets(seq, h, L, HEADS, BL))
    tl.store(KEEP + at, cc._keep(tl.load(SEED), seq, h, L, p_drop, HEADS, BL).to(tl.int8))


@triton.jit
def _rand_probe(OUT, SEED, OFFS, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(OUT + i, tl.rand(tl.load(SEED), tl.load(OFFS + i, mask=i < n, other=0)), mask=i < n)


def test_dropout_offsets_are_int64_beyond_2_31():
    # Sequences whose offsets pass 2**32 (B*X ~ 4e5 at L = 64, H = 4), without allocating such a batch:
    # the offsets equal exact integer arithmetic and the keep mask is tl.rand at exactly those offsets.
    heads, l_, p, seq0 = 4, 64, 0.25, 3 * 2**31 // (4 * 64 * 64)
    seed = torch.tensor([1234], dtype=torch.int32, device=DEV)
    offs = torch.empty(2, heads, l_, l_, dtype=torch.int64, device=DEV)
    keep = torch.empty(2, heads, l_, l_, dtype=torch.int8, device=DEV)
    _offsets_probe[(2, heads)](offs, keep, seed, seq0, l_, p, HEADS=heads, BL=l_)
    seq = torch.arange(seq0, seq0 + 2, dtype=torch.int64)[:, None, None, None]
    h = torch.arange(heads, dtype=torch.int64)[None, :, None, None]
    i = torch.arange(l_, dtype=torch.int64)[None, None, :, None]
    j = torch.arange(l_, dtype=torch.int64)[None, None, None, :]
    exact = ((seq * heads + h) * l_ + i) * l_ + j
    assert exact.max().item() > 2**32 and torch.equal(offs.cpu(), exact)
    u = torch.empty(exact.numel(), dtype=torch.float32, device=DEV)
    _rand_probe[(exact.numel() // 1024,)](u, seed, exact.flatten().to(DEV), exact.numel(), BLOCK=1024)
    assert torch.equal(keep.cpu().bool().flatten(), (u >= p).cpu())


def test_backward_reads_grad_out_through_its_own_strides():
    base = _qkv(1, 3, 5)
    seed = torch.zeros(1, dtype=torch.int32, device=DEV)
    out, lse_s, lse_t = cc._fwd_op(base[0], base[1], 4, 0.0, seed)
    ref = criss_cross_attention(base[0], base[1], 4)
    gen = torch.Generator().manual_seed(3)
    grads = {  # all with strides different from out's (contiguous)
        "transposed": torch.randn(1, 5, 3, 200, generator=gen).to(DEV).transpose(1, 2),
        "sliced": torch.randn(1, 3, 5, 400, generator=gen).to(DEV)[..., 100:300],
        "scalar": torch.tensor(0.7, device=DEV).expand(1, 3, 5, 200),  # last-dim stride 0
    }
    for name, go in grads.items():
        assert go.stride() != out.stride()
        strided = cc._bwd_op(go, base[0], base[1], out, lse_s, lse_t, 4, 0.0, seed)
        dense = cc._bwd_op(go.contiguous(), base[0], base[1], out, lse_s, lse_t, 4, 0.0, seed)
        assert all(torch.equal(a, b) for a, b in zip(strided, dense)), name
        (gb,) = torch.autograd.grad(ref, base, go, retain_graph=True)
        assert _rel(torch.stack(strided), gb) <= 1e-5, name


def test_cpu_seed_moves_to_the_kernel_device():
    cpu_seed = torch.tensor([5], dtype=torch.int32)
    p, s = cc._dropout_args(0.1, True, cpu_seed, torch.device("meta"))
    assert p == 0.1 and s.device.type == "meta" and s.shape == (1,)
    assert cc._dropout_args(0.1, True, None, torch.device("meta"))[1].device.type == "meta"
    assert cc._dropout_args(0.1, False, None, torch.device("meta"))[0] == 0.0
    base = _qkv(1, 3, 4)
    a = criss_cross_attention_triton(base[0], base[1], 4, 0.5, True, seed=cpu_seed)
    assert torch.equal(a, criss_cross_attention_triton(base[0], base[1], 4, 0.5, True, seed=cpu_seed.to(DEV)))
    keep_s, _ = dropout_keep_mask(1, 3, 4, 4, 0.5, cpu_seed)
    assert keep_s.device == a.device
    with pytest.raises(ValueError, match="one-element int32"):
        criss_cross_attention_triton(base[0], base[1], 4, 0.5, True, seed=torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="dropout_p"):
        criss_cross_attention_triton(base[0], base[1], 4, 1.0, True)


def test_kernel_device_outside_the_interpreter(monkeypatch):
    # What a GPU machine sees (CUDA present, no interpreter), without one: CPU inputs go to the CUDA device.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(runtime, "triton_interpreting", lambda: False)
    cuda = torch.device("cuda", 0)
    assert kernels.kernel_device(None) == cuda
    assert kernels.kernel_device(None, None, torch.zeros(1), torch.Generator()) == cuda
    assert kernels.kernel_device(None, torch.zeros(1, device="meta")) == torch.device("meta")
    assert kernels.kernel_device("cpu", torch.zeros(1, device="meta")) == torch.device("cpu")
    with pytest.raises(ValueError, match="need CUDA tensors.*backend='torch'"):
        kernels.require_kernel_device(torch.device("cpu"), "criss_cross_attention_triton")


def test_compiled_kernel_stats():
    base = _qkv(1, 2, 3)
    criss_cross_attention_triton(base[0], base[1], 4)
    if not torch.cuda.is_available():
        assert cc.compiled_kernel_stats() == [] and kernels.compiled_kernel_stats() == []  # nothing compiled
    else:
        assert cc.compiled_kernel_stats()

    # The reader against both device-cache layouts of Triton releases: (cache, target, backend, binder)
    # and (cache, key_cache, target, backend, binder); registers are read when the binary is loaded.
    class Meta:
        num_warps, num_stages, shared = 8, 1, 4096

    class Compiled:
        name, metadata = "_cc_bwd_kernel", Meta()

        def _init_handles(self):
            self.n_regs, self.n_spills = 168, 0

    class Fn:
        def __init__(self, entry):
            self.__name__, self.device_caches = "_cc_bwd_kernel", {0: entry}

    rows = runtime.compiled_kernel_stats(Fn(({"k": Compiled()}, "t", "b", "bind")),
                                         Fn(({"k": Compiled()}, {}, "t", "b", "bind")))
    assert rows == [{"kernel": "_cc_bwd_kernel", "name": "_cc_bwd_kernel", "num_warps": 8, "num_stages": 1,
                     "shared": 4096, "n_regs": 168, "n_spills": 0}] * 2


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


def test_encoder_with_triton_backend_matches_fixtures(strict_fp32):
    # On CUDA too (the same test): TF32 off, see strict_fp32.
    model = _fixture_model()
    for case in torch.load(DATA / "cbramod_cases_seed3_layers2.pt"):
        _check_fixture_case(model, case)


def test_custom_op_compiles_fullgraph():
    base = _qkv(1, 3, 4)

    def f(t):
        return criss_cross_attention_triton(t[0], t[1], 4)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert (compiled(base) - f(base)).abs().max().item() <= 1e-6


def test_encoder_training_step_with_dropout_is_reproducible(deterministic):
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


@pytest.mark.gpu
def test_model_compiles_with_inductor_on_cuda(strict_fp32):
    # The default backend (Inductor generates its own Triton kernels around our custom ops), fullgraph,
    # forward and backward, against the original's fixtures at the eager tolerance. One case: one compile.
    model = _fixture_model()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    _check_fixture_case(model, torch.load(DATA / "cbramod_cases_seed3_layers2.pt")[0], forward=compiled)


@pytest.mark.gpu
def test_training_step_is_bitwise_reproducible_on_cuda(deterministic):
    # Train mode (attention dropout in the kernels, dropout elsewhere from torch's RNG), the Triton loss,
    # cuDNN's backward made deterministic: the same seed gives the same bits, another seed does not.
    from cbramod_fast.masking import masked_mse

    torch.manual_seed(0)
    model = CBraMod(n_layer=2, backend="triton").to(DEV).train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 19, 30, 200, generator=gen).to(DEV)
    mask = (torch.rand(4, 19, 30, generator=gen) < 0.5).to(DEV)

    def step(seed):
        torch.manual_seed(seed)
        model.zero_grad()
        loss = masked_mse(model(x, mask), x, mask)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    (l1, g1), (l2, g2), (l3, _) = step(1), step(1), step(2)
    assert torch.isfinite(l1) and all(torch.isfinite(g).all() for g in g1)
    assert torch.equal(l1, l2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert not torch.equal(l1, l3)


@pytest.mark.gpu
def test_register_use_at_l64_on_cuda():
    # Compiles the L = 64 kernels (8 warps) in fp32 and bf16 with dropout, then reports every compiled
    # kernel's registers and spills (pytest's warning summary shows the table).
    for dtype in (torch.float32, torch.bfloat16):
        base = _qkv(2, 64, 64).detach().to(dtype).requires_grad_(True)
        out = criss_cross_attention_triton_packed(base, 4, 0.1, training=True)
        out.backward(torch.ones_like(out))
        assert torch.isfinite(base.grad).all()
    rows = kernels.compiled_kernel_stats()
    table = "\n".join(f"{r['kernel']:<16} warps={r['num_warps']} stages={r['num_stages']} "
                      f"regs={r['n_regs']} spills={r['n_spills']} shared={r['shared']}" for r in rows)
    warnings.warn(f"compiled kernels on {torch.cuda.get_device_name()}:\n{table}", stacklevel=1)
    assert all(r["n_regs"] is not None for r in rows)
    assert 8 in {r["num_warps"] for r in rows if r["kernel"] == "_cc_bwd_kernel"}
