"""`cbramod-fast bench`: bad input exits 2 with one line, FLOP count cross-checked against torch's counter,
the shipped input array, a tiny real run writes a complete result file, the original-checkout loader, and
the documents' tables are rendered from the committed result files."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from cbramod_fast import CBraMod, cli, kernels
from cbramod_fast.benchmark import config, device, harness, inputs, report
from cbramod_fast.errors import UsageError
from cbramod_fast.kernels import reference as kref
from cbramod_fast.model import cpu_path
from cbramod_fast.model.config import PRESETS

REPO = Path(__file__).resolve().parents[1]


def _run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["bench", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("args, needle", [
    (["--shapes", "19by30"], "19by30"),
    (["--shapes", "0x30"], "0x30"),
    (["--batch", "1,x"], "'x'"),
    (["--dtype", "fp8"], "fp8"),
    (["--mode", "serve"], "serve"),
    (["--backend", "cudnn"], "cudnn"),
    (["--preset", "huge"], "huge"),
    (["--device", "tpu"], "tpu"),
    (["--warmup", "0"], "--warmup"),
    (["--original", "/nonexistent/CBraMod"], "models/cbramod.py"),
    (["--variants", "triton"], "MODEL:DTYPE"),
    (["--variants", "torch:bf16:jit"], "'jit'"),
    (["--variants", "torch:fp8"], "fp8"),
    (["--variants", "torch:bf16", "--backend", "triton"], "--backend"),
    (["--variants", "torch:bf16", "--compile"], "--compile"),
    (["--variants", "original:fp32"], "--original"),
    (["--variants", "torch:bf16:graph"], "--device cuda"),
    (["--variants", "cudnn:bf16"], "cudnn"),
])
def test_bad_input_one_line_exit_2(capsys, monkeypatch, args, needle):
    monkeypatch.delenv("CBRAMOD_FAST_DEBUG", raising=False)
    code, out, err = _run_cli(capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cbramod-fast bench: error:") and needle in lines[0], err
    assert out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_on_cpu_machine_exit_2(capsys, monkeypatch):
    monkeypatch.delenv("CBRAMOD_FAST_DEBUG", raising=False)
    code, _, err = _run_cli(capsys, "--device", "cuda")
    assert code == 2 and "no CUDA device" in err and len(err.strip().splitlines()) == 1


def test_backend_unavailable_exit_2(capsys, monkeypatch):
    monkeypatch.delenv("CBRAMOD_FAST_DEBUG", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code, _, err = _run_cli(capsys, "--backend", "flash")  # not wired / flash-attn absent / CPU
    assert code == 2 and "flash" in err and len(err.strip().splitlines()) == 1
    if not torch.cuda.is_available():
        code, _, err = _run_cli(capsys, "--backend", "triton")  # CPU without the interpreter
        assert code == 2 and "triton" in err and len(err.strip().splitlines()) == 1


def test_parsers():
    assert config.parse_shapes("12x10, 19X30") == ((12, 10), (19, 30))
    assert config.parse_batches("1,8,64") == (1, 8, 64)
    assert config.parse_dtypes("bfloat16,fp32,bf16") == ("bf16", "fp32")


def test_quantiles_match_numpy():
    xs = list(np.random.default_rng(0).exponential(size=37))
    q = harness.quantiles(xs)
    for k, p in (("p50", 50), ("p90", 90), ("p99", 99)):
        assert q[k] == pytest.approx(np.percentile(xs, p))


def _naive_attention(qkv_s, qkv_t, heads, dropout_p=0.0, training=False):
    return kref.criss_cross_attention_naive(qkv_s, qkv_t, heads)


@pytest.mark.parametrize("preset, c, n, batch", [("tiny", 5, 3, 2), ("small", 19, 4, 1)])
def test_flops_match_torch_counter(monkeypatch, preset, c, n, batch):
    # The counter does not see CPU SDPA, so count with the naive (matmul) attention twin.
    monkeypatch.setattr(kref, "criss_cross_attention", _naive_attention)
    torch.manual_seed(0)
    model = CBraMod.from_config(preset, backend="torch").eval()
    x = torch.randn(batch, c, n, 200)
    # Grad enabled: the CPU inference path uses oneDNN fused ops the counter cannot see; same math.
    with FlopCounterMode(display=False) as fc:
        model(x)
    fwd = device.model_flops(PRESETS[preset], c, n, batch)
    assert fc.get_total_flops() == pytest.approx(fwd, rel=1e-3)
    fwd_counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    with FlopCounterMode(display=False) as fc:
        F.mse_loss(model(x), x).backward()
    counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    # torch's counter counts grouped-conv backward as a dense conv (the depthwise positional conv comes out
    # ~100x too big), so compare the training step without convolutions: backward = 2x forward there.
    conv = ("aten.convolution", "aten.convolution_backward")
    train_noconv = sum(v for k, v in counts.items() if k not in conv)
    fwd_noconv = sum(v for k, v in fwd_counts.items() if k not in conv)
    assert train_noconv == pytest.approx(3 * fwd_noconv, rel=0.05)


def test_base_flops_match_notes():
    # ../shared/notes/cbramod.md "Cost": ~0.82 MFLOP per token per layer, ~5.7 GFLOP per 19x30 sample
    cfg = PRESETS["base"]
    per_layer = (device.model_flops(cfg, 19, 30) - device.model_flops(cfg.with_(n_layer=0), 19, 30)) / 12 / 570
    assert per_layer == pytest.approx(0.82e6, rel=0.01)
    assert device.model_flops(cfg, 19, 30) == pytest.approx(5.7e9, rel=0.02)


def test_cpu_peak_is_positive_and_documented():
    peak = device.cpu_peak()
    assert peak["fp32"] and peak["fp32"] > 1e9 and peak["bf16"] >= peak["fp32"]
    assert "GHz" in peak["method"]
    assert device.gpu_peak("NVIDIA H100 80GB HBM3")["bf16"] == pytest.approx(989.4e12)
    assert device.gpu_peak("NVIDIA H100 PCIe")["fp32"] == pytest.approx(51.2e12)
    assert device.gpu_peak("Some GPU")["fp32"] is None


@pytest.mark.parametrize("family,flags,expected", [
    ("25", "fma avx2 avx512f avx512_bf16", "Zen 4"), ("25", "fma avx2", "Zen 3"), ("26", "avx512f", "Zen 5"),
    ("6", "avx512f", None)])
def test_cpu_generation_names_results(monkeypatch, family, flags, expected):
    vendor = "GenuineIntel" if family == "6" else "AuthenticAMD"
    monkeypatch.setattr(device, "_cpuinfo", lambda: {"vendor_id": vendor, "cpu family": family, "flags": flags,
                                                "model name": "AMD EPYC"})
    assert device.cpu_uarch() == expected
    doc = {"device": {"type": "cpu", "name": "AMD EPYC", "uarch": expected},
           "args": {"shapes": [[19, 30]], "preset": "base", "modes": ["infer"], "original": None}}
    slug = {"Zen 4": "cpu-zen4", "Zen 3": "cpu-zen3", "Zen 5": "cpu-zen5", None: "cpu"}[expected]
    assert report.result_stem(doc) == f"{slug}_base_infer_19x30"
    assert report.device_label(doc["device"]) == ("AMD EPYC" if expected is None else f"AMD EPYC ({expected})")


def test_shipped_input_is_what_the_script_makes():
    # The benchmark reads no records (GPU machines may lack the readers' libraries): its input is a shipped
    # array, rebuilt by bench/make_bench_input.py from the shipped records with the library's own reader.
    shipped = inputs.patch_stream()
    assert shipped.dtype == torch.float32 and shipped.shape == (12, 220, 200)
    np.testing.assert_array_equal(inputs.make_patch_stream(inputs.DEMO_RECORDS), shipped.numpy(),
                                  err_msg="run `python bench/make_bench_input.py`")


def test_make_input_uses_real_leads():
    stream = inputs.patch_stream()
    assert stream.shape[0] == 12 and stream.shape[2] == 200 and stream.abs().sum() > 0
    x = inputs.make_input(stream, 3, 14, 5)
    assert x.shape == (3, 14, 5, 200)
    assert torch.equal(x[:, 12], x[:, 0])  # lead 12 wraps to lead 0
    assert torch.equal(x[1, 0, 0], stream[0, 5])  # sample 1 continues where sample 0 ended


def _cpu_stem(shapes, modes) -> str:
    # The CPU slug names the Zen generation where /proc/cpuinfo tells it (cpu-zen4_...), else "cpu".
    return report.result_stem({"device": {"type": "cpu", "uarch": device.cpu_uarch()},
                          "args": {"shapes": shapes, "preset": "tiny", "modes": modes, "original": None}})


def test_tiny_run_writes_complete_results(tmp_path, capsys):
    stem = _cpu_stem([[4, 3]], ["infer", "train"])
    assert stem.startswith("cpu") and stem.endswith("_tiny_infer-train_4x3")
    code = cli.main(["bench", "--preset", "tiny", "--shapes", "4x3", "--batch", "1,2", "--dtype", "fp32,bf16",
                     "--mode", "infer,train", "--repeats", "3", "--out", str(tmp_path), "--plot"])
    assert code == 0, capsys.readouterr().err
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"{stem}.json", f"{stem}.md", f"{stem}.png"]
    doc = json.loads((tmp_path / f"{stem}.json").read_text())
    assert doc["schema"] == config.SCHEMA
    for key in ("created", "device", "versions", "git", "args", "model_config", "definitions", "results"):
        assert key in doc
    assert doc["device"]["type"] == "cpu" and doc["device"]["cpu_model"] and doc["versions"]["torch"]
    assert "commit" in doc["git"]
    rows = doc["results"]
    assert len(rows) == 2 * 2 * 2 * 2  # modes x batches x (fast, reference) x dtypes
    for r in rows:
        lat = r["latency_s"]
        assert r["repeats"] == 3 and len(r["times_s"]) == 3
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert r["samples_per_s"] == pytest.approx(r["batch"] / lat["p50"])
        assert r["flops"] == device.model_flops(PRESETS["tiny"], 4, 3, r["batch"], r["mode"])
        assert 0 < r["utilisation"] < 1
        assert r["peak_mem_bytes"] is not None and r["peak_mem_bytes"] > 0
        tol = 1e-5 if r["dtype"] == "fp32" else 5e-2  # bf16 autocast: ~3 significant digits per op
        assert r["rel_err_vs_fp32_reference"] < tol
        if r["mode"] == "train":
            assert r["grad_rel_err_vs_fp32_reference"] < tol
        if r["model"] == "reference":
            assert r["speedup_vs_reference"] == 1.0
        assert r["speedup_vs_reference"] > 0 and r["speedup_vs_reference_fp32"] > 0
        assert r["cpu_time_s"]["p50"] > 0 and len(r["cpu_times_s"]) == 3 and r["speedup_vs_reference_cpu_time"] > 0
        rounds = r["speedup_vs_reference_rounds"]
        assert rounds["p10"] <= rounds["p50"] <= rounds["p90"]
    md = (tmp_path / f"{stem}.md").read_text()
    assert "| mode | C×N | batch | variant |" in md and md.count("| cbramod-fast (torch) |") == 8
    printed = capsys.readouterr().out
    assert "| mode | C×N |" in printed and f"{stem}.json" in printed
    # Every variant ran (bf16 included, on CPUs without native bf16 GEMMs too) and each CPU inference row of
    # our model records the path its timed calls took, in its own precision although fp32 and bf16 share
    # the model instance.
    bf16_kind = "bf16-native" if cpu_path.onednn_bf16_available() else "bf16-emulated"
    for r in rows:
        assert not r["failed"]
        if r["model"] == "fast" and r["mode"] == "infer":
            kind = "fp32 " if r["dtype"] == "fp32" else bf16_kind + " "
            assert r["cpu_path"].startswith(kind), r["cpu_path"]
            assert f"`{r['cpu_path']}`" in md and f"`{r['cpu_path']}`" in printed
        else:
            assert r["cpu_path"] is None  # the reference, and training steps (no inference plan)


@pytest.mark.gpu
def test_tiny_run_cuda(tmp_path):
    cfg = config.BenchConfig(device="cuda", preset="tiny", shapes=((4, 3),), batches=(1, 4), dtypes=("fp32", "bf16"),
                        modes=("infer", "train"), repeats=5, out=str(tmp_path), quiet=True)
    doc = harness.run_bench(cfg)
    assert doc["device"]["type"] == "cuda" and doc["device"]["peak_flops"]["method"]
    for r in doc["results"]:
        assert r["latency_s"]["p50"] > 0 and r["peak_mem_bytes"] > 0
        assert r["rel_err_vs_fp32_reference"] < (1e-4 if r["dtype"] == "fp32" else 5e-2)
    assert report.write_results(doc, tmp_path, plot=True)[0].name.startswith("cuda-")


@pytest.mark.gpu
def test_tiny_run_cuda_graph_and_triton_summary(tmp_path):
    cfg = config.BenchConfig(device="cuda", preset="tiny", shapes=((4, 3),), batches=(1, 4), modes=("infer",),
                        repeats=5, out=str(tmp_path), quiet=True, backends=("torch", "triton"),
                        variants=(("reference", "fp32", None), ("fast[torch]", "bf16", None),
                                  ("fast[triton]", "bf16", None), ("fast[triton]", "bf16", "graph"),
                                  ("fast[triton]", "fp32", "graph")))
    doc = harness.run_bench(cfg)
    for r in doc["results"]:
        assert r["latency_s"]["p50"] > 0
        # the replayed graph computes the model: its output is checked like every timed variant's
        assert r["rel_err_vs_fp32_reference"] < (1e-4 if r["dtype"] == "fp32" else 5e-2), r["variant"]
    assert [(s["batch"], s["c"]["variant"].startswith("fast[triton]")) for s in doc["summary"]] == [(1, True),
                                                                                                    (4, True)]
    assert "Summary:" in report.render_markdown(doc)


@pytest.mark.skipif(torch.cuda.is_available() or not kernels.triton_available(),
                    reason="CPU-only check of the Triton interpreter path; needs cbramod_fast.kernels.criss_cross")
def test_triton_under_interpreter_is_checked_not_timed(tmp_path):
    # TRITON_INTERPRET is read when kernels are defined, so the run gets its own process.
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "cbramod_fast", "bench", "--preset", "tiny", "--shapes", "3x2",
                           "--batch", "1", "--dtype", "fp32", "--backend", "torch,triton", "--repeats", "2",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600,
                          check=False, cwd=tmp_path)  # not the checkout: its source tree has no built _ext
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / f"{_cpu_stem([[3, 2]], ['infer'])}.json").read_text())["results"]
    tri = [r for r in rows if r["backend"] == "triton"]
    assert len(tri) == 1 and not tri[0]["timed"] and tri[0]["latency_s"] is None
    assert tri[0]["rel_err_vs_fp32_reference"] < 1e-5


def _fake_original(root: Path) -> None:
    """A stand-in checkout with the original's import structure (models.cbramod imports a sibling module)."""
    (root / "models").mkdir(parents=True)
    (root / "models" / "__init__.py").write_text("")
    (root / "models" / "criss_cross_transformer.py").write_text(
        "from cbramod_fast.model.reference import ReferenceCBraMod as Base\n")
    (root / "models" / "cbramod.py").write_text(
        "from models.criss_cross_transformer import Base\n\nclass CBraMod(Base):\n    pass\n")


def test_load_original_restores_sys_modules(tmp_path):
    _fake_original(tmp_path / "CBraMod")
    before_path = list(sys.path)
    cls = harness.load_original(tmp_path / "CBraMod")
    assert cls.__name__ == "CBraMod" and "models" not in sys.modules and sys.path == before_path
    (tmp_path / "broken" / "models").mkdir(parents=True)
    (tmp_path / "broken" / "models" / "cbramod.py").write_text("import no_such_module_xyz\n")
    with pytest.raises(UsageError, match="no_such_module_xyz"):
        harness.load_original(tmp_path / "broken")


def test_original_variant_runs(tmp_path):
    _fake_original(tmp_path / "CBraMod")
    cfg = config.BenchConfig(preset="tiny", shapes=((3, 2),), batches=(1,), dtypes=("fp32",), repeats=2,
                        original=str(tmp_path / "CBraMod"), quiet=True, threads=1)
    doc = harness.run_bench(cfg)
    orig = [r for r in doc["results"] if r["model"] == "original"]
    assert len(orig) == 1 and orig[0]["rel_err_vs_fp32_reference"] == 0.0  # same weights, same math
    assert doc["original"]["path"] == str(tmp_path / "CBraMod") and "commit" in doc["original"]


def test_documents_rendered_from_result_files():
    # README's headline table and docs/benchmarks.md's tables are generated: no number typed by hand.
    spec = importlib.util.spec_from_file_location("bench_report", REPO / "bench" / "report.py")
    bench_report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_report)
    docs = bench_report.load_committed(REPO)
    if docs is None:  # not a git checkout: the files on disk are what was shipped
        docs = bench_report.load_results()
    assert docs, "no result files"
    for path, text in bench_report.expected(docs, REPO).items():
        assert path.read_text() == text, f"{path.name} is stale: run `python bench/report.py`"


def test_parse_variants():
    assert config.parse_variants("reference:fp32, triton:bfloat16:compile,torch:bf16:graph,reference:fp32") == (
        ("reference", "fp32", None), ("fast[triton]", "bf16", "compile"), ("fast[torch]", "bf16", "graph"))
    with pytest.raises(UsageError, match="names no variant"):
        config.parse_variants(" , ")


def _row(variant, backend, dtype, p50, compile=None, mode="train", batch=64, util=0.1):
    model = "fast" if backend else variant
    return {"variant": variant, "model": model, "backend": backend, "compile": compile, "dtype": dtype,
            "mode": mode, "channels": 19, "patches": 30, "batch": batch, "timed": True,
            "latency_s": {"p50": p50}, "samples_per_s": batch / p50, "utilisation": util, "times_s": [p50],
            "cpu_time_s": None}


def test_speedups_and_summary_pick_eager_reference_and_fastest_native():
    rows = [_row("reference", None, "fp32", 0.40), _row("reference+compile", None, "bf16", 0.10, "compile"),
            _row("reference", None, "bf16", 0.20), _row("fast[torch]+compile", "torch", "bf16", 0.08, "compile"),
            _row("fast[triton]", "triton", "bf16", 0.05), _row("fast[triton]+compile", "triton", "bf16", 0.04,
                                                                "compile", util=0.4),
            _row("reference", None, "fp32", 0.01, batch=1)]  # a group without Triton: no summary line
    harness.add_speedups(rows)
    by = {(r["variant"], r["dtype"], r["batch"]): r for r in rows}
    # the baseline is the eager reference, never its compiled twin
    assert by[("reference+compile", "bf16", 64)]["speedup_vs_reference"] == pytest.approx(2.0)
    assert by[("fast[triton]+compile", "bf16", 64)]["speedup_vs_reference_fp32"] == pytest.approx(10.0)
    assert by[("fast[triton]+compile", "bf16", 64)]["speedup_vs_best_native"] == pytest.approx(2.0)
    assert by[("fast[triton]", "bf16", 64)]["best_native_variant"] == "fast[torch]+compile"
    (s,) = harness.kernel_summary(rows)
    assert (s["a"]["variant"], s["b"]["variant"], s["c"]["variant"]) == ("reference", "fast[torch]+compile",
                                                                         "fast[triton]+compile")
    assert s["c_over_a"] == pytest.approx(10.0) and s["c_over_b"] == pytest.approx(2.0)
    table = report.summary_table([s])
    assert ("| train | 19×30 | 64 | reference | 160.0 | fast[torch]+compile bf16 | 800.0 | fast[triton]+compile bf16 "
            "| 1600.0 |") in table and "| 10.00 | 2.00 | 40.0 % |" in table
    # with the original implementation in the run, (a) is the original
    rows.append(_row("original", None, "fp32", 0.5))
    harness.add_speedups(rows)
    assert harness.kernel_summary(rows)[0]["a"]["variant"] == "original"
    assert harness.kernel_summary(rows)[0]["c_over_a"] == pytest.approx(12.5)
    assert report.summary_table([]) == ""


def test_compile_tags_wrap_the_right_variants(monkeypatch, tmp_path):
    # torch.compile itself is stubbed (Inductor on 2 CPU cores takes minutes); checked: which variants are
    # compiled, how, that compile-layers compiles each encoder layer of its own instance, and the labels.
    calls = []

    def fake_compile(fn, *, mode=None, dynamic=None, **kw):
        calls.append((type(getattr(fn, "__self__", fn)).__name__, mode, dynamic))
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    cfg = config.BenchConfig(preset="tiny", shapes=((3, 2),), batches=(1,), modes=("infer", "train"), repeats=2,
                        quiet=True, threads=1, backends=("torch",),
                        variants=(("reference", "fp32", None), ("reference", "fp32", "compile"),
                                  ("fast[torch]", "fp32", "compile-layers"), ("fast[torch]", "fp32", "compile-ro")))
    doc = harness.run_bench(cfg)
    n_layer = PRESETS["tiny"].n_layer
    per_mode = [("ReferenceCBraMod", None, False)] + [("CrissCrossLayer", None, False)] * n_layer + [
        ("CBraMod", "reduce-overhead", False)]
    assert calls == per_mode * 2
    labels = [report.variant_label(r) for r in doc["results"] if r["mode"] == "train"]
    assert labels == ["reference", "reference + torch.compile", "cbramod-fast (torch) + torch.compile per layer",
                      "cbramod-fast (torch) + compile (reduce-overhead)"]
    for r in doc["results"]:
        assert r["rel_err_vs_fp32_reference"] < 1e-5 and r["speedup_vs_best_native"] > 0
    assert doc["summary"] == []  # no Triton variant timed
    md = report.render_markdown(doc)
    assert "torch.compile (first calls incl. compilation" in md and "Summary:" not in md


def test_repeated_layers_finds_the_encoder_layers():
    from cbramod_fast import ReferenceCBraMod

    cfg = PRESETS["tiny"]
    assert len(harness.repeated_layers(CBraMod(**cfg.to_dict(), backend="torch"))) == cfg.n_layer
    ref = ReferenceCBraMod(**{k: v for k, v in cfg.to_dict().items() if k != "dropout"})
    assert len(harness.repeated_layers(ref)) == cfg.n_layer
    with pytest.raises(UsageError, match="no list of repeated layers"):
        harness.repeated_layers(torch.nn.Linear(2, 2))


def test_a_failing_variant_is_recorded_and_the_rest_measured(monkeypatch, tmp_path, capsys):
    # E.g. an Inductor or CUDA-graph failure on a first GPU run: the other variants' numbers must survive.
    def broken_compile(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("inductor broke\nsecond line")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    code = cli.main(["bench", "--preset", "tiny", "--shapes", "3x2", "--batch", "1", "--mode", "train",
                     "--variants", "reference:fp32,torch:fp32:compile,torch:fp32", "--repeats", "2",
                     "--threads", "1", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "failed variant: fast[torch]+compile fp32" in err and "inductor broke" in err
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    rows = {r["variant"]: r for r in doc["results"]}
    bad = rows["fast[torch]+compile"]
    assert bad["failed"] == "warm-up: RuntimeError: inductor broke" and not bad["timed"] and bad["latency_s"] is None
    assert rows["reference"]["repeats"] == 2 and rows["fast[torch]"]["repeats"] == 2
    assert "cbramod-fast (torch) + torch.compile, FAILED in warm-up" in next(tmp_path.glob("*.md")).read_text()


def test_each_group_is_written_when_it_finishes(monkeypatch, tmp_path):
    # A run stopped in a later group (a time limit, a crash) keeps the groups it finished, marked partial.
    real, calls = harness.bench_group, []

    def second_group_dies(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("stopped in group 2")
        return real(*a, **kw)

    monkeypatch.setattr(harness, "bench_group", second_group_dies)
    cfg = config.BenchConfig(preset="tiny", shapes=((3, 2),), batches=(1, 2), dtypes=("fp32",), repeats=2,
                             quiet=True, threads=1, out=str(tmp_path))
    with pytest.raises(RuntimeError, match="group 2"):
        harness.run_bench(cfg, on_group=lambda d: report.write_results(d, tmp_path))
    (path,) = tmp_path.glob("*.json")
    doc = json.loads(path.read_text())
    assert doc["partial"] == {"groups_done": 1, "groups": 2}
    assert {r["batch"] for r in doc["results"]} == {1} and all(r["latency_s"] for r in doc["results"])
    assert "**partial run**: 1 of 2 groups" in path.with_suffix(".md").read_text()
    # a complete run: every group handed over but the last, the final document not partial
    monkeypatch.setattr(harness, "bench_group", real)
    seen = []
    doc = harness.run_bench(cfg, on_group=lambda d: seen.append(json.loads(json.dumps(d))))
    assert [d["partial"]["groups_done"] for d in seen] == [1] and "partial" not in doc
    assert {r["batch"] for r in seen[0]["results"]} == {1}
    assert len(doc["results"]) == 2 * len(seen[0]["results"])


def _class_doc(uarch: str, threads: int, created: str, p50: dict, original: bool = True) -> dict:
    """A result document with what the per-CPU-class table reads; p50: (model, C, N, batch, dtype) -> s."""
    rows = [{"model": m, "mode": "infer", "compile": None, "channels": c, "patches": n, "batch": b,
             "dtype": dt, "latency_s": {"p50": v}} for (m, c, n, b, dt), v in p50.items()]
    return {"schema": config.SCHEMA, "created": created, "results": rows,
            "device": {"type": "cpu", "name": "AMD EPYC", "uarch": uarch, "torch_threads": threads},
            "args": {"original": "/src/CBraMod" if original else None}}


def test_cpu_class_table_is_computed_from_the_result_files(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_report", REPO / "bench" / "report.py")
    bench_report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_report)
    full = {("fast", 19, 30, 1, "fp32"): 0.020, ("original", 19, 30, 1, "fp32"): 0.030,
            ("fast", 19, 30, 8, "fp32"): 0.100, ("original", 19, 30, 8, "fp32"): 0.170,
            ("fast", 12, 10, 1, "fp32"): 0.010, ("original", 12, 10, 1, "fp32"): 0.012,
            ("fast", 19, 30, 8, "bf16"): 0.050, ("original", 19, 30, 8, "bf16"): 0.080}  # no 12x10 B=8
    b8_19x30 = {k: v for k, v in full.items() if k[1:4] == (19, 30, 8)}
    docs = [
        (tmp_path / "cpu-zen3_base_infer_19x30-12x10_original.json",
         _class_doc("Zen 3", 2, "2026-01-02", full)),
        # fewer cells (and newer): not the one the row takes
        (tmp_path / "cpu-zen3_base_infer_19x30_original.json", _class_doc("Zen 3", 1, "2026-02-01", b8_19x30)),
        (tmp_path / "cpu-zen4_base_infer_19x30.json",
         _class_doc("Zen 4", 2, "2026-01-01", full, original=False)),
        (tmp_path / "cuda-nvidia-h200_base_train_19x30.json", {**_class_doc(None, 1, "2026-01-01", full),
                                                               "device": {"type": "cuda", "name": "H200"}}),
    ]
    lines = bench_report.render_cpu_classes(docs, tmp_path).splitlines()
    assert len(lines) == 4  # heading, rule, Zen 3, Zen 4; the GPU file is not a CPU class
    zen3 = [c.strip() for c in lines[2].strip("|").split("|")]
    assert zen3 == ["AMD EPYC (Zen 3)", "1.50", "1.70", "1.20", "–", "1.60", "3.40", "2",
                    "[`cpu-zen3_base_infer_19x30-12x10_original`](cpu-zen3_base_infer_19x30-12x10_original.json)"]
    assert lines[3].startswith("| AMD EPYC (Zen 4) | – |") and "no run with `--original` yet" in lines[3]
    assert bench_report.cpu_class(docs[0][0]) == "cpu-zen3" and bench_report.cpu_class(docs[3][0]) is None
