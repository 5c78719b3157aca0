"""The C++ CPU inference kernels (criss-cross attention, GEMM with epilogue, LayerNorm, bias + GELU, bf16
rounding, the patch embedding's conv stem) against PyTorch references."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from cbramod_fast.kernels import cpu, reference

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the C++ extension is not built")


def _inputs(b, c, n, d, spatial_bnc=True, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    if spatial_bnc:  # the inference path's layout: spatial rows in (B, N, C) order, viewed as (B, C, N)
        qkv_s = (torch.randn(b, n, c, 3 * d, generator=g) * scale).transpose(1, 2)
    else:
        qkv_s = torch.randn(b, c, n, 3 * d, generator=g) * scale
    qkv_t = torch.randn(b, c, n, 3 * d, generator=g) * scale
    return qkv_s, qkv_t


def _check(qkv_s, qkv_t, heads, got):
    """2x-PyTorch rule: the kernel's error against a float64 reference is at most twice that of the
    PyTorch float32 twin (plus a floor of 1e-6 of the output's scale)."""
    gold = reference.criss_cross_attention_naive(qkv_s.double(), qkv_t.double(), heads)
    torch_err = (reference.criss_cross_attention(qkv_s, qkv_t, heads).double() - gold).abs().max().item()
    err = (got.double() - gold).abs()
    worst = err.max().item()
    idx = tuple(int(i) for i in torch.nonzero(err == err.max())[0])
    floor = 1e-6 * gold.abs().max().item()
    assert worst <= 2 * torch_err + floor, f"max err {worst:.2e} at {idx} > 2 x torch's {torch_err:.2e}"


@pytest.mark.parametrize("c", [1, 2, 12, 14, 19, 22, 64])
@pytest.mark.parametrize("n", [1, 4, 10, 30])
def test_matches_reference_on_usual_shapes(c, n):
    qkv_s, qkv_t = _inputs(2, c, n, 100)
    _check(qkv_s, qkv_t, 4, cpu.criss_cross_attention_cpu(qkv_s, qkv_t, 4))


@pytest.mark.parametrize("heads, d", [(1, 8), (2, 50), (5, 100), (3, 9), (4, 64), (1, 200)])
def test_other_head_sizes(heads, d):
    qkv_s, qkv_t = _inputs(3, 5, 9, d, seed=1)
    _check(qkv_s, qkv_t, heads, cpu.criss_cross_attention_cpu(qkv_s, qkv_t, heads))


def test_long_sequences_and_large_scores():
    qkv_s, qkv_t = _inputs(1, 65, 70, 100, seed=2, scale=6.0)  # peaked softmax, lengths past 64
    _check(qkv_s, qkv_t, 4, cpu.criss_cross_attention_cpu(qkv_s, qkv_t, 4))


def test_strided_views_and_out_buffer():
    g = torch.Generator().manual_seed(3)
    both = torch.randn(2, 6, 7, 700, generator=g)  # q|k|v of both halves side by side, plus padding
    qkv_s, qkv_t = both[..., :300], both[..., 350:650]
    big = torch.full((2, 6, 7, 260), float("nan"))
    out = big[..., 30:230]
    got = cpu.criss_cross_attention_cpu(qkv_s, qkv_t, 4, out=out)
    assert got.data_ptr() == out.data_ptr()
    _check(qkv_s, qkv_t, 4, got)
    assert torch.isnan(big[..., :30]).all() and torch.isnan(big[..., 230:]).all(), "wrote outside out"
    a, b = _inputs(2, 6, 7, 100, spatial_bnc=False)
    _check(a, b, 4, cpu.criss_cross_attention_cpu(a, b, 4))


def test_nan_stays_in_its_sequences():
    qkv_s, qkv_t = _inputs(2, 3, 4, 100)
    qkv_t = qkv_t.clone()
    qkv_t[1, 2, 0, 0] = float("nan")  # a query of temporal sequence (b=1, c=2)
    got = cpu.criss_cross_attention_cpu(qkv_s, qkv_t, 4)
    assert torch.isnan(got[1, 2, 0, 100:125]).all()
    nan = torch.isnan(got)
    nan[1, 2, 0, 100:125] = False
    assert not nan.any(), "a NaN leaked into other sequences or heads"


@pytest.mark.parametrize(
    "args, match",
    [
        (lambda s, t: (s.double(), t.double(), 4), "float32 CPU tensor"),
        (lambda s, t: (s[..., :150], t, 4), "must both be"),
        (lambda s, t: (s, t, 7), "divisible by heads"),
        (lambda s, t: (s.transpose(-1, -2), t, 4), "unit stride"),
        (lambda s, t: (s[0], t[0], 4), "4-D"),
    ],
)
def test_bad_input(args, match):
    qkv_s, qkv_t = _inputs(1, 3, 3, 100)
    with pytest.raises(ValueError, match=match):
        cpu.criss_cross_attention_cpu(*args(qkv_s, qkv_t))


def test_bad_out_and_autograd():
    qkv_s, qkv_t = _inputs(1, 3, 3, 100)
    with pytest.raises(ValueError, match="out must be"):
        cpu.criss_cross_attention_cpu(qkv_s, qkv_t, 4, out=torch.empty(1, 3, 3, 100))
    with pytest.raises(RuntimeError, match="no backward"):
        cpu.criss_cross_attention_cpu(qkv_s.requires_grad_(), qkv_t, 4)


def test_round_bf16_matches_torch():
    g = torch.Generator().manual_seed(4)
    x = torch.cat((torch.randn(10_000, generator=g) * 1e3, torch.randn(1000, generator=g) * 1e-39,
                   torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.4e38, -3.4e38, 1e-45])))
    # exact ties between two bf16 values (round to even)
    ties = (torch.arange(1, 200, dtype=torch.int32) << 16 | 0x8000).view(torch.float32)
    x = torch.cat((x, ties, -ties))
    got = cpu.round_bf16_(x.clone())
    assert torch.equal(got, x.bfloat16().float())
    nan = cpu.round_bf16_(torch.tensor([float("nan"), 1.0]))
    assert torch.isnan(nan[0]) and nan[1] == 1.0
    with pytest.raises(ValueError, match="contiguous float32"):
        cpu.round_bf16_(torch.randn(4, 4).t())


def test_baseline_build_matches():
    """The portable build (what runs on CPUs without AVX2/FMA) gives the same results, in a fresh process
    because the SIMD choice is made once."""
    code = ("import torch; from cbramod_fast.kernels import cpu as k, reference as r;"
            "assert k.simd_path() == 'baseline', k.simd_path();"
            "g = torch.Generator().manual_seed(0);"
            "s = torch.randn(2, 9, 5, 300, generator=g); t = torch.randn(2, 9, 5, 300, generator=g);"
            "gold = r.criss_cross_attention_naive(s.double(), t.double(), 4);"
            "err = (k.criss_cross_attention_cpu(s, t, 4).double() - gold).abs().max().item();"
            "ref = (r.criss_cross_attention(s, t, 4).double() - gold).abs().max().item();"
            "assert err <= 2 * ref + 1e-6, (err, ref);"
            "a = torch.randn(50, 300, generator=g); w = torch.randn(37, 300, generator=g) / 17;"
            "gold = torch.nn.functional.gelu(a.double() @ w.double().t());"
            "err = (k.linear(a, k.pack_weight(w), 37, gelu=True).double() - gold).abs().max().item();"
            "ref = (torch.nn.functional.gelu(a @ w.t()).double() - gold).abs().max().item();"
            "assert err <= 2 * ref + 1e-6, (err, ref);"
            "from cbramod_fast.model.embedding import PatchEmbedding; from cbramod_fast.model.config import "
            "CBraModConfig; pe = PatchEmbedding(CBraModConfig()).eval(); x = torch.randn(2, 3, 4, 200, generator=g);"
            "gold = pe.double().stem(x.double()); pe.float();"
            "err = (k.patch_stem(x, k.stem_params(pe.proj_in), 1e-5, 2).double() - gold).abs().max().item();"
            "ref = (pe.stem(x).double() - gold).abs().max().item();"
            "assert err <= 2 * ref + 1e-6, (err, ref); print('ok')")
    env = dict(os.environ, CBRAMOD_FAST_SIMD="baseline")
    # outside the checkout: `python -c` puts the cwd on sys.path, and the source tree has no built _ext
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd="/", check=False)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


@pytest.mark.parametrize("rows, n", [(1, 1), (3, 13), (120, 800), (37, 200)])
def test_bias_gelu_matches_torch(rows, n):
    """2x-PyTorch rule against float64, with and without a bias, on a row-strided view."""
    g = torch.Generator().manual_seed(rows)
    base = torch.randn(rows, n + 5, generator=g) * 4
    bias = torch.randn(n, generator=g)
    for b in (bias, None):
        x = base[:, 2:2 + n].clone() if b is None else base.clone()[:, 2:2 + n]
        pre = x + (b if b is not None else 0)
        gold = torch.nn.functional.gelu(pre.double())
        torch_err = (torch.nn.functional.gelu(pre).double() - gold).abs().max().item()
        got = cpu.bias_gelu_(x, b)
        assert got.data_ptr() == x.data_ptr()
        err = (got.double() - gold).abs().max().item()
        assert err <= 2 * torch_err + 1e-7, f"max err {err:.2e} > 2 x torch's {torch_err:.2e}"


def test_bias_gelu_special_values_and_bad_input():
    x = torch.tensor([[float("nan"), float("inf"), 0.0, 1e-30, 20.0, -20.0, -3.0, 3.0]])
    got = cpu.bias_gelu_(x.clone())
    ref = torch.nn.functional.gelu(x)
    assert torch.isnan(got[0, 0]) and got[0, 1] == float("inf")
    assert torch.allclose(got[0, 2:], ref[0, 2:], atol=1e-7, rtol=1e-6)
    with pytest.raises(ValueError, match="float32 CPU matrix"):
        cpu.bias_gelu_(torch.randn(4, 4).t())
    with pytest.raises(ValueError, match="bias must be"):
        cpu.bias_gelu_(torch.randn(4, 4), torch.randn(5))


@pytest.mark.parametrize("b, c, n, d", [(1, 1, 1, 200), (2, 19, 30, 200), (3, 5, 7, 14), (1, 2, 3, 9)])
def test_layer_norm_matches_torch(b, c, n, d):
    """Both entry points, 2x-PyTorch rule against float64; the split one scatters the halves into the
    attention inputs' layouts."""
    g = torch.Generator().manual_seed(d)
    x = torch.randn(b, c, n, d, generator=g) * 3 + 1
    w, bias = torch.randn(d, generator=g), torch.randn(d, generator=g)
    gold = torch.nn.functional.layer_norm(x.double(), (d,), w.double(), bias.double(), 1e-5)
    torch_err = (torch.nn.functional.layer_norm(x, (d,), w, bias, 1e-5).double() - gold).abs().max().item()
    out = torch.full_like(x, float("nan"))
    cpu.layer_norm(x, w, bias, 1e-5, out)
    assert (out.double() - gold).abs().max().item() <= 2 * torch_err + 1e-6
    h = d // 2
    out_s, out_t = torch.full((b, n, c, h), float("nan")), torch.full((b, c, n, d - h), float("nan"))
    cpu.layer_norm_split(x, w, bias, 1e-5, out_s, out_t)
    assert (out_s.double() - gold[..., :h].transpose(1, 2)).abs().max().item() <= 2 * torch_err + 1e-6
    assert (out_t.double() - gold[..., h:]).abs().max().item() <= 2 * torch_err + 1e-6


def test_layer_norm_bad_input():
    x, w = torch.randn(2, 3, 4, 8), torch.ones(8)
    with pytest.raises(ValueError, match="out must be"):
        cpu.layer_norm(x, w, w, 1e-5, torch.empty(2, 3, 4, 9))
    with pytest.raises(ValueError, match="contiguous float32"):
        cpu.layer_norm(x.transpose(1, 2), w, w, 1e-5, torch.empty(2, 4, 3, 8))
    with pytest.raises(ValueError, match="weight and bias"):
        cpu.layer_norm_split(x, torch.ones(9), w, 1e-5, torch.empty(2, 4, 3, 4), torch.empty(2, 3, 4, 4))


def test_kernels_run_on_torchs_openmp_team_and_threads_do_not_change_results():
    # With torch on OpenMP the kernels borrow its team (the threads its GEMMs use); a team of 1, 2 or 3
    # gives the same bits, since every row is computed by one thread whatever the split.
    if "ATen parallel backend: OpenMP" in torch.__config__.parallel_info() and sys.platform == "linux":
        assert cpu.thread_team() == "openmp"
    qkv_s, qkv_t = _inputs(3, 19, 30, 200)
    x = torch.randn(3 * 19 * 30, 800)
    bias = torch.randn(800)
    ln_in, w, b = torch.randn(3, 19, 30, 200), torch.randn(200), torch.randn(200)
    a, wl = torch.randn(3 * 19 * 30, 200), cpu.pack_weight(torch.randn(800, 200))
    w2 = cpu.pack_weight(torch.randn(200, 800) / 30)
    results = []
    for threads in (1, 2, 3):
        att = torch.empty(3, 19, 30, 400)
        cpu.attention_raw(cpu.attention_args(qkv_s, qkv_t, att), 8, 25, threads)
        gelu = cpu.bias_gelu_raw(x.clone(), bias, threads)
        ln_s, ln_t = torch.empty(3, 30, 19, 100), torch.empty(3, 19, 30, 100)
        cpu.layer_norm_raw(ln_in, w, b, 1e-5, ln_s, ln_t, True, threads)
        lin = torch.empty(3 * 19 * 30, 800)
        cpu.gemm_raw([cpu.gemm_task(a, wl, lin, bias, x, True)], threads)
        ffn = cpu.ffn_raw(a, torch.empty_like(a), w, b, 1e-5, wl, bias, w2, b, threads)
        results.append((att, gelu, ln_s, ln_t, lin, ffn))
    for other in results[1:]:
        assert all(torch.equal(a, o) for a, o in zip(results[0], other))


@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (7, 100, 300), (960, 100, 100), (13, 800, 200), (120, 200, 800),
                                     (50, 257, 17), (5, 3, 33), (23, 40, 24)])
def test_linear_matches_torch(m, k, n):
    """Every epilogue (bias, residual, GELU) on the tile shapes' edges: rows not a multiple of 6 (or of 12, for
    a last panel of at most 8 columns), columns not a multiple of 16, depth over one k block (256); 2x-PyTorch rule against float64 (plus a floor of 1e-6
    of the output's scale)."""
    g = torch.Generator().manual_seed(m * k + n)
    a = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    bias, res = torch.randn(n, generator=g), torch.randn(m, n, generator=g)
    packed = cpu.pack_weight(w)
    for b, r, gelu in ((None, None, False), (bias, None, True), (bias, res, False), (None, res, True)):
        pre = a @ w.t() + (0 if b is None else b) + (0 if r is None else r)
        pre64 = a.double() @ w.double().t() + (0 if b is None else b.double()) + (0 if r is None else r.double())
        act = torch.nn.functional.gelu
        gold, ref = (act(pre64), act(pre)) if gelu else (pre64, pre)
        torch_err = (ref.double() - gold).abs().max().item()
        got = cpu.linear(a, packed, n, b, r, gelu)
        err = (got.double() - gold).abs().max().item()
        assert err <= 2 * torch_err + 1e-6 * gold.abs().max().item(), (b is None, r is None, gelu, err, torch_err)


def test_linear_on_column_slices_and_in_place():
    """The inference path's use: both attention halves' output projections read column slices of one
    matrix and add into column slices of the residual, in place, in one call; other columns untouched."""
    g = torch.Generator().manual_seed(5)
    a, x = torch.randn(61, 200, generator=g), torch.randn(61, 200, generator=g)
    ws, wt = torch.randn(100, 100, generator=g) / 10, torch.randn(100, 100, generator=g) / 10
    bs, bt = torch.randn(100, generator=g), torch.randn(100, generator=g)
    want = x + torch.cat((a[:, :100] @ ws.t() + bs, a[:, 100:] @ wt.t() + bt), 1)
    ps, pt = cpu.pack_weight(ws), cpu.pack_weight(wt)
    cpu.gemm_raw([cpu.gemm_task(a[:, :100], ps, x[:, :100], bs, x[:, :100]),
                  cpu.gemm_task(a[:, 100:], pt, x[:, 100:], bt, x[:, 100:])], 2)
    assert (x - want).abs().max().item() <= 1e-5
    wide = torch.zeros(61, 120)
    cpu.linear(a[:, 100:], pt, 100, out=wide[:, 10:110])
    assert torch.equal(wide[:, :10], torch.zeros(61, 10)) and torch.equal(wide[:, 110:], torch.zeros(61, 10))
    assert (wide[:, 10:110] - a[:, 100:] @ wt.t()).abs().max().item() <= 1e-5


def test_linear_special_values_and_bad_input():
    a = torch.tensor([[1.0, float("nan")], [1.0, 2.0], [float("inf"), 0.5]])
    got = cpu.linear(a, cpu.pack_weight(torch.ones(3, 2)), 3)
    assert torch.isnan(got[0]).all() and torch.equal(got[1], torch.full((3,), 3.0)) and torch.isinf(got[2]).all()
    packed = cpu.pack_weight(torch.randn(5, 4))
    with pytest.raises(ValueError, match="packed must be"):
        cpu.linear(torch.randn(3, 6), packed, 5)
    with pytest.raises(ValueError, match="packed must be"):
        cpu.linear(torch.randn(3, 4), packed, 17)
    with pytest.raises(ValueError, match="a must be a float32"):
        cpu.linear(torch.randn(4, 3).t(), packed, 5)
    with pytest.raises(ValueError, match="a must be a float32"):
        cpu.linear(torch.randn(3, 4, dtype=torch.float64), packed, 5)
    with pytest.raises(ValueError, match="bias must be"):
        cpu.linear(torch.randn(3, 4), packed, 5, bias=torch.randn(4))
    with pytest.raises(ValueError, match="res must be"):
        cpu.linear(torch.randn(3, 4), packed, 5, res=torch.randn(2, 5))
    with pytest.raises(RuntimeError, match="no backward"):
        cpu.linear(torch.randn(3, 4, requires_grad=True), packed, 5)


def _ffn_reference(x, ln_w, ln_b, w1, b1, w2, b2, double=False):
    if double:
        x, ln_w, ln_b, w1, b1, w2, b2 = (t.double() for t in (x, ln_w, ln_b, w1, b1, w2, b2))
    h = torch.nn.functional.layer_norm(x, (x.shape[1],), ln_w, ln_b, 1e-5)
    return x + torch.nn.functional.gelu(h @ w1.t() + b1) @ w2.t() + b2


@pytest.mark.parametrize("m, d, ff", [(1, 200, 800), (7, 200, 800), (960, 200, 800), (50, 30, 70), (97, 8, 300)])
def test_feed_forward_matches_torch(m, d, ff):
    """LayerNorm + GEMM/GELU + GEMM/residual per block of rows; 2x-PyTorch rule against float64 (plus 1e-6 of
    the output's scale); in place too."""
    g = torch.Generator().manual_seed(m + d + ff)
    x = torch.randn(m, d, generator=g) * 2
    ln_w, ln_b = torch.randn(d, generator=g), torch.randn(d, generator=g)
    w1, b1 = torch.randn(ff, d, generator=g) / d ** 0.5, torch.randn(ff, generator=g)
    w2, b2 = torch.randn(d, ff, generator=g) / ff ** 0.5, torch.randn(d, generator=g)
    gold = _ffn_reference(x, ln_w, ln_b, w1, b1, w2, b2, double=True)
    torch_err = (_ffn_reference(x, ln_w, ln_b, w1, b1, w2, b2).double() - gold).abs().max().item()
    p1, p2 = cpu.pack_weight(w1), cpu.pack_weight(w2)
    got = cpu.feed_forward(x, ln_w, ln_b, 1e-5, p1, b1, p2, b2)
    tol = 2 * torch_err + 1e-6 * gold.abs().max().item()
    assert (got.double() - gold).abs().max().item() <= tol
    y = x.clone()
    assert cpu.feed_forward(y, ln_w, ln_b, 1e-5, p1, b1, p2, b2, out=y).data_ptr() == y.data_ptr()
    assert torch.equal(y, got)


def test_feed_forward_bad_input():
    x, w = torch.randn(4, 8), torch.ones(8)
    p1, b1, p2 = cpu.pack_weight(torch.randn(16, 8)), torch.zeros(16), cpu.pack_weight(torch.randn(8, 16))
    cpu.feed_forward(x, w, w, 1e-5, p1, b1, p2, w)
    with pytest.raises(ValueError, match="w2_packed must be"):
        cpu.feed_forward(x, w, w, 1e-5, p1, b1, p1, w)
    with pytest.raises(ValueError, match=r"w2_packed must be \(1, 15, 16\) .* b1 \(15,\)"):  # ff is b1's length
        cpu.feed_forward(x, w, w, 1e-5, p1, torch.zeros(15), p2, w)
    with pytest.raises(ValueError, match="x must be a contiguous float32"):
        cpu.feed_forward(x.t().contiguous().t(), w, w, 1e-5, p1, b1, p2, w)
    with pytest.raises(ValueError, match="out must be"):
        cpu.feed_forward(x, w, w, 1e-5, p1, b1, p2, w, out=torch.empty(3, 8))
    with pytest.raises(RuntimeError, match="no backward"):
        cpu.feed_forward(x.requires_grad_(), w, w, 1e-5, p1, b1, p2, w)


# -- patch embedding stem -------------------------------------------------------------------------------------
def _stem_module(seed):
    """A patch embedding's conv stack with non-trivial GroupNorm affine parameters."""
    from cbramod_fast.model.config import CBraModConfig
    from cbramod_fast.model.embedding import PatchEmbedding

    torch.manual_seed(seed)
    pe = PatchEmbedding(CBraModConfig()).eval()
    with torch.no_grad():
        for gn in pe.proj_in[1::3]:
            gn.weight.normal_(1.0, 0.3)
            gn.bias.normal_(0.0, 0.3)
    return pe


@pytest.mark.parametrize("b, c, n, length", [(1, 1, 1, 200), (2, 19, 30, 200), (3, 5, 7, 176), (1, 12, 10, 200),
                                             (2, 3, 2, 187)])
def test_patch_stem_matches_torch(b, c, n, length):
    """The native conv stack against the modules in float64 (2x-PyTorch rule plus 1e-6 of the output's scale),
    with samples of very different scales (GroupNorm statistics are per sample)."""
    pe = _stem_module(b + c + n)
    g = torch.Generator().manual_seed(length)
    x = torch.randn(b, c, n, length, generator=g) * torch.logspace(-2, 3, b).view(b, 1, 1, 1)
    with torch.no_grad():
        got = cpu.patch_stem(x, cpu.stem_params(pe.proj_in), pe.proj_in[1].eps, 2)
        mine = pe.stem(x)
        gold = pe.double().stem(x.double())
    torch_err = (mine.double() - gold).abs().max().item()
    err = (got.double() - gold).abs().max().item()
    assert got.shape == (b, c, n, 200)
    assert err <= 2 * torch_err + 1e-6 * gold.abs().max().item(), f"max err {err:.2e} vs torch's {torch_err:.2e}"


def test_patch_stem_threads_do_not_change_results():
    pe = _stem_module(0)
    x = torch.randn(3, 7, 11, 200)
    params = cpu.stem_params(pe.proj_in)
    runs = [cpu.patch_stem(x, params, 1e-5, t) for t in (1, 2, 3)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_patch_stem_bad_input():
    pe = _stem_module(0)
    params = cpu.stem_params(pe.proj_in)
    x = torch.randn(1, 2, 3, 200)
    with pytest.raises(ValueError, match="176 <= len <= 200"):
        cpu.patch_stem(torch.randn(1, 2, 3, 175), params, 1e-5, 1)
    with pytest.raises(ValueError, match="176 <= len <= 200"):
        cpu.patch_stem(x.double(), params, 1e-5, 1)
    with pytest.raises(ValueError, match="x must be a contiguous float32"):
        cpu.patch_stem(torch.randn(1, 3, 2, 200).transpose(1, 2), params, 1e-5, 1)
    with pytest.raises(ValueError, match="params must be stem_params"):
        cpu.patch_stem(x, params[:8], 1e-5, 1)
    with pytest.raises(ValueError, match="params must be stem_params"):
        cpu.patch_stem(x, params[4:8] + params[:4] + params[8:], 1e-5, 1)
    with pytest.raises(RuntimeError, match="no backward"):
        cpu.patch_stem(x.requires_grad_(), params, 1e-5, 1)


# -- patch embedding: spectrum magnitude, positional conv -------------------------------------------------------
def test_magnitude_matches_abs():
    """sqrt(re^2 + im^2) against float64 |z|: within twice Tensor.abs's error plus an ulp, on the patch spectra's
    sizes (4-wide blocks and a tail), zeros and magnitudes whose squares overflow or underflow float32."""
    g = torch.Generator().manual_seed(5)
    z = torch.complex(torch.randn(3, 7, 101, generator=g), torch.randn(3, 7, 101, generator=g))
    z = z * torch.logspace(-20, 20, 101).view(1, 1, 101)
    z[0, 0, :5] = 0
    gold = torch.view_as_real(z).double().square().sum(-1).sqrt()
    for threads in (1, 2):
        got = cpu.magnitude(z.contiguous(), threads)
        rel = ((got.double() - gold).abs() / gold.clamp_min(1e-300)).max().item()
        torch_rel = ((z.abs().double() - gold).abs() / gold.clamp_min(1e-300)).max().item()
        assert got.shape == z.shape and rel <= 2 * torch_rel + 2 ** -24, (rel, torch_rel)
    with pytest.raises(ValueError, match="complex64"):
        cpu.magnitude(z.to(torch.complex128), 1)
    with pytest.raises(ValueError, match="contiguous"):
        cpu.magnitude(z.transpose(1, 2), 1)


def _pos_conv(seed, d=200):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(d, d, kernel_size=(19, 7), padding=(9, 3), groups=d)
    with torch.no_grad():
        conv.bias.normal_()
    return conv


@pytest.mark.parametrize("b, c, n, d", [(1, 1, 1, 200), (8, 12, 10, 200), (1, 19, 30, 200), (2, 25, 5, 200),
                                        (3, 2, 7, 16), (1, 4, 3, 8)])
def test_positional_conv_matches_torch(b, c, n, d):
    """h + depthwise conv(h) against the module in float64 (2x-PyTorch rule plus 1e-6 of the output's scale):
    grids smaller than the kernel (every tap clipped), position counts not a multiple of 4, channel counts
    with and without a 24-channel block."""
    conv = _pos_conv(b + c + n, d)
    h = torch.randn(b, c, n, d, generator=torch.Generator().manual_seed(d))
    with torch.no_grad():
        mine = h + conv(h.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        gold = h.double() + conv.double()(h.double().permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        conv.float()
        runs = [cpu.positional_conv(h, conv, t) for t in (1, 2, 3)]
    torch_err = (mine.double() - gold).abs().max().item()
    err = (runs[0].double() - gold).abs().max().item()
    assert err <= 2 * torch_err + 1e-6 * gold.abs().max().item(), f"max err {err:.2e} vs torch's {torch_err:.2e}"
    assert all(torch.equal(runs[0], r) for r in runs[1:]), "the thread count changed the result"


def test_positional_conv_bad_input():
    conv = _pos_conv(0)
    h = torch.randn(1, 2, 3, 200)
    assert cpu.pos_conv_supports(h, conv) and not cpu.pos_conv_supports(h.double(), conv)
    with pytest.raises(ValueError, match="multiple of 8"):
        cpu.positional_conv(torch.randn(1, 2, 3, 12), _pos_conv(0, 12), 1)
    with pytest.raises(ValueError, match="depthwise"):
        cpu.positional_conv(h, torch.nn.Conv2d(200, 200, 3, padding=1), 1)
    with pytest.raises(ValueError, match="float32"):
        cpu.positional_conv(h.to(torch.bfloat16), conv, 1)
    with pytest.raises(RuntimeError, match="no backward"):
        cpu.positional_conv(h, conv, 1)  # the conv's weights want gradients
