"""bench/gpu_check.sh on CPU: its dry run goes through every stage without wfdb or pyedflib and leaves the
result files; a failed build falls back to the source tree and still runs the kernel tests; the benchmark
and the gpu-marked test modules import without the readers' libraries; its time limits fit its budget."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from test_benchmark import _fake_original

from cbramod_fast.benchmark import pytest_report

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
STAGES = ("install", "import", "test_kernels", "bench_kernels", "train_eager", "train_compile",
          "infer_graphs", "loader", "test_gpu", "compile_more")
READERS = ("wfdb", "pyedflib")


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A check run's environment: the readers' libraries made unimportable (a GPU machine may lack them)."""
    blocked = tmp_path / "blocked"
    for name in READERS:
        (blocked / name).mkdir(parents=True, exist_ok=True)
        # what a missing package raises (pytest.importorskip skips on this one only)
        missing = f"raise ModuleNotFoundError(\"No module named '{name}'\", name={name!r})\n"
        (blocked / name / "__init__.py").write_text(missing)
    env = {k: v for k, v in os.environ.items() if k not in ("GPU_CHECK_ONLY", "CBRAMOD_ORIGINAL", "OUT")}
    # PYTHONSAFEPATH: as in the check itself, the checkout must not shadow the installed package (whose C++
    # extension a non-editable install keeps out of the source tree).
    env.update({"PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "TMPDIR": str(tmp_path),
                "PYTHONPATH": str(blocked), "PYTHONSAFEPATH": "1", **extra})
    return env


def _run_check(env: dict[str, str], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, check=False)


def _summary_lines(out: Path) -> dict[str, str]:
    """Stage name -> its verdict's first word (ok, FAILED, TIMED, skipped) from summary.txt."""
    text = (out / "summary.txt").read_text()
    return {m[1]: m[2] for m in re.finditer(r"^(\w+) +(ok|FAILED|TIMED|skipped)\b", text, re.MULTILINE)}


def test_benchmark_and_gpu_test_modules_import_without_the_readers(tmp_path):
    env = _env(tmp_path)
    code = ("import sys\n"
            "from cbramod_fast.benchmark import cli, harness, inputs\n"
            "assert inputs.patch_stream().shape == (12, 220, 200)\n"
            f"loaded = [m for m in sys.modules if m.split('.')[0] in {READERS!r}]\n"
            "assert not loaded, loaded\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Collection imports every test module; the gpu-marked ones must be among those collected.
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q",
                           "-m", "gpu", "tests/"], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    for name in ("test_kernels_criss_cross.py::test_benchmark_shapes_on_gpu",
                 "test_benchmark.py::test_tiny_run_cuda",
                 "test_kernels_masking.py::test_masked_mse_with_inductor_on_cuda"):
        assert name in proc.stdout


def test_stage_limits_fit_the_budget():
    # The review's complaint: limits adding up to far more than the budget. The core stages (all but the
    # last two, which run on what is left) plus the versions step and the packing reserve fit 420 s.
    text = SCRIPT.read_text()
    limits = {m[1]: int(m[2]) for m in re.finditer(r"^\s*(?:if ! )?stage (\w+) (\d+) ", text, re.MULTILINE)}
    assert set(limits) == set(STAGES)
    core = sum(v for k, v in limits.items() if k not in ("test_gpu", "compile_more"))
    reserve = int(re.search(r"^RESERVE=(\d+)", text, re.MULTILINE)[1])
    assert "420 * SCALE" in text and core + reserve + 10 <= 420, (core, reserve)


@pytest.mark.slow
def test_dry_run_goes_through_every_stage(tmp_path):
    _fake_original(tmp_path / "CBraMod")  # the original's import structure, our reference inside
    env = _env(tmp_path, CBRAMOD_ORIGINAL="CBraMod")  # relative to where the check starts
    proc = _run_check(env, tmp_path, timeout=1200)
    out = tmp_path / "out"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    status = _summary_lines(out)
    for name in STAGES:
        loader_absent = name == "loader" and not (REPO / "bench" / "bench_loader.py").exists()
        assert status.get(name) == ("skipped" if loader_absent else "ok"), (name, status, proc.stdout[-3000:])
    assert {p.name for p in out.iterdir()} == {"summary.txt", "gpu_check.tar.gz", "train_eager.md",
                                               "train_compile.md", "infer_graphs.md", "compile_more.md"}
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = tar.getnames()
        docs = {Path(n).parent.name: json.load(tar.extractfile(n)) for n in names if n.endswith(".json")
                and "/kernels/" not in n}
        gpu_log = tar.extractfile("logs/test_gpu.log").read().decode()
    # The groups of the training table (two batches), complete; the kernel-register section is printed.
    train = docs["train_eager"]
    assert "partial" not in train and sorted({r["batch"] for r in train["results"]}) == [1, 2]
    assert {r["variant"] for r in train["results"]} == {"original", "reference", "fast[torch]",
                                                        "fast[triton]"}
    assert train["original"]["path"] == str(tmp_path / "CBraMod")
    assert "original" in {r["variant"] for r in docs["infer_graphs"]["results"]}
    assert "test_register_use_at_l64_on_cuda" in gpu_log and "compiled Triton kernels" in gpu_log
    # CPU inference rows of our model say which CPU path their timed calls ran.
    fast = [r for r in docs["infer_graphs"]["results"] if r["variant"] == "fast[torch]"]
    assert fast and all(r["cpu_path"].startswith("bf16-") for r in fast)


def test_failed_build_falls_back_to_the_source_tree(tmp_path):
    # A python whose pip fails (a C++ build that breaks): the kernel tests still run, from the checkout.
    wrapper = tmp_path / "python"
    wrapper.write_text('#!/bin/bash\n'
                       '[ "$1" = -m ] && [ "$2" = pip ] && { echo "build failed" >&2; exit 1; }\n'
                       f'exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    env = _env(tmp_path, PYTHON=str(wrapper), GPU_CHECK_ONLY="install,import,test_kernels")
    proc = _run_check(env, tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = (tmp_path / "out" / "summary.txt").read_text()
    status = _summary_lines(tmp_path / "out")
    assert status["install"] == "FAILED" and "runs from the source tree" in summary
    assert status["import"] == "ok" and status["test_kernels"] == "ok"
    assert "train_eager" not in status  # not selected
    with tarfile.open(tmp_path / "out" / "gpu_check.tar.gz") as tar:
        log = tar.extractfile("logs/import.log").read().decode()
    assert f"ok {REPO / 'cbramod_fast' / '__init__.py'}" in log


def test_kernel_stats_and_benchmark_tables(tmp_path, capsys):
    rows = [{"kernel": k, "name": k, "num_warps": warps, "num_stages": 2, "shared": shared, "n_regs": regs,
             "n_spills": spills}
            for k, warps, shared, regs, spills in (("_cc_fwd_kernel", 4, 0, 96, 0),
                                                   ("_cc_bwd_kernel", 8, 1024, 255, 12))]
    table = pytest_report.kernel_stats_table(rows)
    assert "_cc_bwd_kernel" in table and "255" in table and table.count("\n") == 2
    brief = pytest_report.kernel_stats_brief(rows)
    assert brief.startswith("2 compiled kernels, registers 96-255, 1 spilling")
    assert "_cc_fwd_kernel" not in brief
    # a pytest-benchmark --benchmark-json document (the fields this reads)
    bench = {"benchmarks": [
        {"group": "attention fwd ecg12x10 B=64", "name": f"test_attention[fwd-{impl}-ecg12x10-64]",
         "params": {"impl": impl}, "stats": {"median": med, "iqr": med / 10}}
        for impl, med in (("triton", 1e-4), ("torch", 3e-4), ("sdpa", 2e-4))]}
    (tmp_path / "b.json").write_text(json.dumps(bench))
    (tmp_path / "s.json").write_text(json.dumps(rows))
    assert pytest_report.main([str(tmp_path / "b.json"), str(tmp_path / "s.json")]) == 0
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if "test_attention[fwd-triton" in x)
    assert line.split()[:4] == ["0.100", "0.010", "3.00", "2.00"]  # median, IQR, x torch, x sdpa
    assert "_cc_bwd_kernel" in printed


def test_benchmark_results_are_appended_as_each_test_ends(tmp_path, capsys):
    # A pytest-benchmark stage stopped at its time limit keeps the results of the tests that finished.
    lines = tmp_path / "bench.jsonl"
    env = {**os.environ, "CBRAMOD_BENCH_PRESET": "tiny", "CBRAMOD_BENCH_BATCH": "1", "PYTHONSAFEPATH": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                           "cbramod_fast.benchmark.pytest_report", "--benchmark-lines", str(lines),
                           "bench/bench_encoder.py", "--benchmark-only", "-k", "infer and fp32"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = [json.loads(x) for x in lines.read_text().splitlines()]
    assert sorted(r["params"]["variant"] for r in rows) == ["fast[torch]", "reference"]
    assert all(r["stats"]["median"] > 0 and r["group"].startswith("encoder infer fp32") for r in rows)
    fast = next(r for r in rows if r["params"]["variant"] == "fast[torch]")
    # what our model's timed calls ran: the measured fp32 steps, or the layers' own forward where that won
    assert re.match(r"(fp32 |plain \()", fast["extra_info"]["cpu_path"]), fast["extra_info"]["cpu_path"]
    assert "compiled Triton kernels" in proc.stdout
    assert pytest_report.main([str(lines)]) == 0
    assert "test_encoder[fast[torch]-infer-fp32]" in capsys.readouterr().out

