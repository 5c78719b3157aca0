"""The CPU inference path: every implementation this CPU can run, forced one by one, against the original's
fixtures (float32) and the float32 model (bf16); what cannot run here is skipped with the reason, and
forcing it raises a clear error."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import DATA, SHARED

from cbramod_fast import CBraMod, ReferenceCBraMod
from cbramod_fast.kernels import cpu
from cbramod_fast.model import cpu_path

FIXTURES = {
    "layers2": (DATA / "cbramod_weights_seed3_layers2.pth", DATA / "cbramod_cases_seed3_layers2.pt", 2),
    "layers12": (SHARED / "fixtures" / "cbramod_weights_seed0.pth", SHARED / "fixtures" / "cbramod_cases_seed0.pt", 12),
}
OUT_ATOL = 1e-4  # as tests/test_model.py: the fixtures' README tolerance for float32
BF16_REL_L2 = 2e-2  # bf16 vs float32, relative L2


def _missing(path: str, attention: str, precision: str = "fp32") -> str | None:
    """Why this CPU cannot run a forced configuration, or None."""
    if path == "onednn" and not cpu_path.onednn_available():
        return "oneDNN's linear ops are not in this torch build"
    if precision == "bf16-native":
        if not cpu_path.onednn_bf16_available():
            return f"no oneDNN bf16 GEMMs on this CPU ({torch.backends.cpu.get_cpu_capability()})"
        if path in ("blas", "cpp") or attention == "cpp":
            return "native bf16 runs oneDNN GEMMs and the PyTorch attention only"
    if (attention == "cpp" or path == "cpp") and not cpu.available():
        return "the C++ extension is not built"
    return None


CONFIGS = [("plain", "auto")] + list(itertools.product(("onednn", "blas", "cpp"), ("cpp", "torch")))


@pytest.fixture
def force(monkeypatch):
    def _force(path, attention="auto", bf16="auto"):
        monkeypatch.setenv("CBRAMOD_FAST_CPU_PATH", path)
        monkeypatch.setenv("CBRAMOD_FAST_CPU_ATTENTION", attention)
        monkeypatch.setenv("CBRAMOD_FAST_CPU_BF16", bf16)
    return _force


def _fixture_model(name):
    weights, cases, n_layer = FIXTURES[name]
    if not weights.exists():
        pytest.skip(f"{weights} not available")
    model = CBraMod(n_layer=n_layer).eval()
    model.load_state_dict(torch.load(weights, map_location="cpu"), strict=True)
    return model, torch.load(cases)


@pytest.mark.parametrize("path, attention", CONFIGS, ids=[f"{p}-{a}" for p, a in CONFIGS])
@pytest.mark.parametrize("fixture", ["layers2", pytest.param("layers12", marks=pytest.mark.shared)])
def test_each_forced_path_matches_fixtures(fixture, path, attention, force):
    why = _missing(path, attention)
    if why:
        pytest.skip(why)
    force(path, attention)
    model, cases = _fixture_model(fixture)
    for case in cases:
        with torch.no_grad():
            feats = model.encode(case["x"], case["mask"])
            out = model(case["x"], case["mask"])
        used = model.cpu_path
        assert used.startswith("plain") if path == "plain" else f"attn={attention}" in used, used
        if path != "plain":
            # oneDNN has no out-projection step; cpp runs the fused feed-forward block instead of ffn1/ffn2
            steps = ("qkv",) + ("out",) * (path != "onednn") + ("ffn1", "ffn2") * (path != "cpp")
            assert all(f"{step}={path}" in used for step in steps), used
            assert ("ffn=fused" in used) == (path == "cpp"), used
        assert used.endswith({"plain": "embed=torch", "cpp": "embed=cpp"}.get(path, "")) and "embed=" in used, used
        for name, got, ref in (("feats", feats, case["feats"]), ("out", out, case["out"])):
            err = (got - ref).abs().max().item()
            assert err <= OUT_ATOL, f"{path}/{attention} {tuple(case['x'].shape)} {name}: max abs err {err:.2e}"


@pytest.mark.parametrize("fixture", ["layers2", pytest.param("layers12", marks=pytest.mark.shared)])
def test_split_cpp_feed_forward_matches_fixtures(fixture, monkeypatch):
    """The C++ GEMM's ffn1 (bias + GELU epilogue) and ffn2 (residual epilogue) steps, which the forced ``cpp``
    path replaces by the fused block: the encoder run with a plan that uses them, against the fixtures."""
    if not cpu.gemm_available():
        pytest.skip("the C++ extension is not built")
    model, cases = _fixture_model(fixture)
    plan = cpu_path.Plan("fp32", qkv="cpp", attn="cpp", out="cpp", ffn1="cpp+gelu", ffn2="cpp+add", ffn="split")
    monkeypatch.setattr(cpu_path, "plan_for", lambda layers, x, path="auto": plan)
    for case in cases:
        with torch.no_grad():
            feats = model.encode(case["x"], case["mask"])
        assert model.encoder.last_cpu_path == plan.describe(), model.cpu_path
        err = (feats - case["feats"]).abs().max().item()
        assert err <= OUT_ATOL, f"{tuple(case['x'].shape)} feats: max abs err {err:.2e}"


def _pair(n_layer=2):
    torch.manual_seed(0)
    ref = ReferenceCBraMod(n_layer=n_layer).eval()
    fast = CBraMod(n_layer=n_layer).eval()
    fast.load_state_dict(ref.state_dict())
    return fast, ref


BF16 = [(p, a, prec) for prec in ("bf16-native", "bf16-emulated") for p, a in
        itertools.product(("onednn", "blas", "cpp", "auto"), ("cpp", "torch"))]


@pytest.mark.parametrize("path, attention, precision", BF16, ids=["-".join(c) for c in BF16])
def test_bf16_paths_close_to_fp32(path, attention, precision, force):
    """Autocast and a bf16 model: within 2 % relative L2 of float32, and no worse than twice the error of
    the reference model under the same autocast (2x-PyTorch rule)."""
    why = _missing(path, attention, precision)
    if why:
        pytest.skip(why)
    force(path, attention, precision.removeprefix("bf16-"))
    fast, ref = _pair()
    x = torch.randn(2, 6, 5, 200, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        gold = ref(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = fast(x).float()
            theirs = ref(x).float()
        assert fast.cpu_path.startswith(precision), fast.cpu_path
        native = fast.to(torch.bfloat16)(x.to(torch.bfloat16))
        assert native.dtype == torch.bfloat16 and fast.cpu_path.startswith(precision), fast.cpu_path
    rel = lambda a: ((a.float() - gold).norm() / gold.norm()).item()
    assert rel(ours) <= BF16_REL_L2, f"autocast rel. L2 error {rel(ours):.3e}"
    assert rel(native) <= BF16_REL_L2, f"bf16 model rel. L2 error {rel(native):.3e}"
    assert rel(ours) <= 2 * rel(theirs), f"autocast error {rel(ours):.3e} > 2x the reference's {rel(theirs):.3e}"


def test_forcing_what_this_cpu_lacks_raises(force):
    fast, _ = _pair()
    x = torch.randn(1, 3, 4, 200)
    if not cpu_path.onednn_bf16_available():
        force("auto", bf16="native")
        with pytest.raises(RuntimeError, match="no oneDNN bf16"), torch.no_grad(), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            fast(x)
    force("blas", bf16="native")
    with pytest.raises(RuntimeError, match="no oneDNN bf16|blas"), torch.no_grad(), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        fast(x)
    force("sideways")
    with pytest.raises(ValueError, match="CBRAMOD_FAST_CPU_PATH.*sideways"), torch.no_grad():
        fast(x)
    with pytest.raises(ValueError, match="unknown cpu_path"):
        CBraMod(n_layer=1, cpu_path="gpu")


def test_auto_measures_once_and_reports(force):
    force("auto")
    fast, ref = _pair()
    x = torch.randn(3, 5, 4, 200)
    assert fast.cpu_path is None
    with torch.no_grad():
        out = fast(x)
        first = fast.cpu_path
        assert torch.equal(fast(x), out), "the measured plan changed between calls"
    assert first == fast.cpu_path and first.startswith(("fp32", "plain")) and "measured" in first
    with torch.no_grad():
        assert (out - ref(x)).abs().max().item() <= OUT_ATOL
    fast.set_cpu_path("plain")
    with torch.no_grad():
        plain = fast(x)
    assert fast.cpu_path.startswith("plain") and (plain - out).abs().max().item() <= OUT_ATOL
    x.requires_grad_(True)
    before = fast.cpu_path
    fast(x).sum().backward()  # autograd: the plain path, the report is about inference only
    assert fast.cpu_path == before and x.grad is not None


def test_big_batches_are_measured_on_a_slice(force, monkeypatch):
    """Plans for batches past TUNE_TOKENS are measured on a slice and shared by every larger batch."""
    force("auto")
    monkeypatch.setattr(cpu_path, "TUNE_TOKENS", 24)
    monkeypatch.setattr(cpu_path, "_PLANS", {})
    seen = []
    real = cpu_path._measure
    monkeypatch.setattr(cpu_path, "_measure",
                        lambda layer, x, opts, plain: seen.append(x.shape[0]) or real(layer, x, opts, plain))
    fast, ref = _pair()
    for b in (9, 17):
        x = torch.randn(b, 3, 4, 200)  # 12 tokens per sample: slices of 2 samples
        with torch.no_grad():
            assert (fast(x) - ref(x)).abs().max().item() <= OUT_ATOL
    assert seen in ([2], []), seen  # [] when one candidate per step leaves nothing to measure


def test_plain_ops_win_when_they_are_faster(force, monkeypatch):
    """The guarantee "never slower than plain PyTorch ops": when the layer's own forward times fastest,
    the plan runs it."""
    force("auto")
    monkeypatch.setattr(cpu_path, "_PLANS", {})
    raced, real_race = [], cpu_path._race

    def fake_race(fns, rounds):  # the finalists: the plain forward first, then the plans
        if rounds == cpu_path.STEP_ROUNDS:  # one step's candidates, not the finalists
            return real_race(fns, rounds)
        raced.append(len(fns))
        for fn in fns:
            fn()
        return [0.0] + [1.0] * (len(fns) - 1)

    monkeypatch.setattr(cpu_path, "_race", fake_race)
    fast, ref = _pair()
    x = torch.randn(2, 3, 4, 200)
    with torch.no_grad():
        out = fast(x)
    assert fast.cpu_path.startswith("plain (measured"), fast.cpu_path
    assert raced and raced[0] >= 2  # the plain forward raced against at least one plan
    assert (out - ref(x)).abs().max().item() <= OUT_ATOL


@pytest.mark.parametrize("split, fused, plain, want", [(1.0, 1.02, 2.0, "fused"), (1.0, 1.05, 2.0, "split"),
                                                        (1.0, 1.02, 1.01, "split"), (1.02, 1.0, 2.0, "fused")])
def test_near_ties_go_to_the_fused_block_but_never_past_plain(force, monkeypatch, split, fused, plain, want):
    """Finalists (the plain forward, then split and fused per thread count): a fused plan within FUSED_TIE of
    the fastest wins, unless the plain forward timed faster than it."""
    if not cpu.gemm_available():
        pytest.skip("the C++ extension is not built")
    force("auto")
    monkeypatch.setattr(cpu_path, "_PLANS", {})
    real_race = cpu_path._race

    def fake_race(fns, rounds):
        if rounds == cpu_path.STEP_ROUNDS:
            return real_race(fns, rounds)
        return [plain, split, fused] + [9.0] * (len(fns) - 3)

    monkeypatch.setattr(cpu_path, "_race", fake_race)
    fast, _ = _pair()
    with torch.no_grad():
        fast(torch.randn(2, 3, 4, 200))
    assert "ffn=fused" in fast.cpu_path if want == "fused" else "ffn1=" in fast.cpu_path, fast.cpu_path


def test_outputs_never_alias_reused_buffers_and_threads_do_not_share_them():
    import threading

    fast, ref = _pair()
    xs = [torch.randn(2, 4, 3, 200, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with torch.no_grad():
        want = [ref(x) for x in xs]
        first = fast(xs[0])
        kept = first.clone()
        fast(xs[1])  # same shape: the kept buffers are reused
        assert torch.equal(first, kept), "a later call overwrote an earlier output"
    got = [None] * len(xs)

    def work(i):
        with torch.no_grad():
            for _ in range(3):
                got[i] = fast(xs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g - w).abs().max().item() <= OUT_ATOL, f"thread {i}: outputs mixed up"


def test_native_embedding_serves_inference_only(force):
    """The patch embedding's native kernels (conv stack, magnitude, positional conv): chosen by measurement in
    auto, never where a gradient is wanted (training, fine-tuning the embedding with frozen layers) or for
    low-precision input."""
    force("auto")
    fast, ref = _pair()
    x = torch.randn(2, 4, 3, 200, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = fast(x)
        assert fast.cpu_path.endswith(("embed=cpp", "embed=torch")), fast.cpu_path
        assert (out - ref(x)).abs().max().item() <= OUT_ATOL
    for p in fast.encoder.parameters():  # fine-tuning only the embedding: its convs need their gradients
        p.requires_grad_(False)
    force("cpp")
    fast.patch_embedding.last_embed = None
    fast(x).sum().backward()
    assert fast.patch_embedding.last_embed is None, "a gradient-wanting call went through the native embedding"
    assert fast.patch_embedding.proj_in[0].weight.grad is not None
    with torch.no_grad():
        fast(x)
        assert fast.cpu_path.endswith("embed=cpp"), fast.cpu_path
        fast.to(torch.bfloat16)(x.to(torch.bfloat16))
        assert fast.cpu_path.endswith("embed=torch"), fast.cpu_path
