"""What the GPU check reads out of its pytest runs: the compiled Triton kernels' registers and spills, and
pytest-benchmark results as one compact table.

    pytest -p cbramod_fast.benchmark.pytest_report [--kernel-stats stats.json] tests/test_kernels_*.py
    pytest -p cbramod_fast.benchmark.pytest_report --benchmark-lines b.jsonl bench/bench_kernels.py ...
    main(["stats.json", "bench.json"])      # what bench/gpu_check.sh calls: print them as tables

As a pytest plugin it adds a "compiled Triton kernels" section to the terminal summary (every kernel this
pytest run compiled: num_warps, stages, shared memory, registers, spills, from
``cbramod_fast.kernels.compiled_kernel_stats``) and, with ``--kernel-stats PATH``, writes those rows as JSON.
Kernels exist only in the process that compiled them, hence a plugin rather than a separate script. With
``--benchmark-lines PATH`` it appends each pytest-benchmark result to PATH (one JSON line) as soon as its
test ends: pytest-benchmark writes its own ``--benchmark-json`` file only when the whole run ends, so a run
stopped at a time limit would leave nothing. ``main`` prints kernel-stats and pytest-benchmark files (JSON or
those lines) as tables: each benchmark's median and its speed against the ``torch`` and ``sdpa``
implementations of the same group (``impl`` parameter of ``bench/bench_kernels.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..atomic import atomic_text

BASELINES = ("torch", "sdpa")  # bench_kernels' PyTorch twin and F.scaled_dot_product_attention


def kernel_stats_table(rows: list[dict]) -> str:
    if not rows:
        return "no compiled Triton kernel in this process (none ran, or only under the interpreter)"
    lines = [f"{'kernel':<18} {'warps':>5} {'stages':>6} {'shared B':>9} {'regs':>5} {'spills':>6}  name"]
    for r in rows:
        lines.append(f"{r['kernel']:<18} {r['num_warps']!s:>5} {r['num_stages']!s:>6} {r['shared']!s:>9} "
                     f"{r['n_regs']!s:>5} {r['n_spills']!s:>6}  {r['name']}")
    return "\n".join(lines)


def kernel_stats_brief(rows: list[dict]) -> str:
    """One line (plus every kernel that spills): for a test run that compiled dozens of specialisations."""
    if not rows:
        return kernel_stats_table(rows)
    regs = [r["n_regs"] for r in rows if r["n_regs"] is not None]
    spilling = [r for r in rows if r["n_spills"]]
    text = (f"{len(rows)} compiled kernels, registers {min(regs, default='?')}-{max(regs, default='?')}, "
            f"{len(spilling)} spilling")
    return text + (":\n" + kernel_stats_table(spilling) if spilling else "")


def _kernel_stats() -> tuple[list[dict], str | None]:
    try:
        from .. import kernels

        return kernels.compiled_kernel_stats(), None
    except ImportError as exc:  # no triton in this environment
        return [], f"Triton kernels not importable: {exc}"


def pytest_addoption(parser) -> None:
    parser.addoption("--kernel-stats", metavar="PATH", default=None,
                     help="write the compiled Triton kernels' registers and spills to PATH (JSON)")
    parser.addoption("--benchmark-lines", metavar="PATH", default=None,
                     help="append each pytest-benchmark result to PATH as one JSON line when its test ends")


def pytest_runtest_teardown(item, nextitem) -> None:
    path = item.config.getoption("benchmark_lines")
    fixture = getattr(item, "funcargs", {}).get("benchmark")
    meta = getattr(fixture, "stats", None)  # pytest-benchmark's Metadata, once the test has timed something
    if path and meta is not None:
        with open(path, "a") as f:
            f.write(json.dumps(meta.as_dict(include_data=False), default=str) + "\n")


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    rows, why = _kernel_stats()
    terminalreporter.section("compiled Triton kernels")
    terminalreporter.write_line(why or kernel_stats_table(rows))
    path = config.getoption("kernel_stats")
    if path:
        atomic_text(Path(path), json.dumps(rows, indent=1) + "\n")


def benchmark_table(doc: dict) -> str:
    """One line per benchmark of a pytest-benchmark JSON document: group, test, median and IQR in ms, and
    the group's ``torch`` / ``sdpa`` median over this one (> 1: faster than that baseline)."""
    benches = doc.get("benchmarks") or []
    if not benches:
        return "no benchmarks in this file"
    base: dict[tuple[str, str], float] = {}
    for b in benches:
        impl = (b.get("params") or {}).get("impl")
        if impl in BASELINES:
            base[(b.get("group") or "", impl)] = b["stats"]["median"]
    lines = [f"{'median ms':>10} {'IQR ms':>8} " + " ".join(f"{'x ' + k:>8}" for k in BASELINES) + "  test"]
    group = None
    for b in sorted(benches, key=lambda b: b.get("group") or ""):
        if b.get("group") != group:
            group = b.get("group")
            lines.append(f"-- {group or '(no group)'}")
        med = b["stats"]["median"]
        ratios = [base.get((group or "", k)) for k in BASELINES]
        cells = " ".join(f"{r / med:8.2f}" if r else f"{'-':>8}" for r in ratios)
        lines.append(f"{med * 1e3:10.3f} {b['stats']['iqr'] * 1e3:8.3f} {cells}  {b['name']}")
    return "\n".join(lines)


def render_file(path: Path, brief: bool = False) -> str:
    text = path.read_text()
    if path.suffix == ".jsonl":
        text = json.dumps({"benchmarks": [json.loads(x) for x in text.splitlines() if x.strip()]})
    doc = json.loads(text)
    if isinstance(doc, list):
        table = kernel_stats_brief(doc) if brief else kernel_stats_table(doc)
        return f"compiled Triton kernels ({path.name}):\n{table}"
    return f"pytest-benchmark results ({path.name}):\n{benchmark_table(doc)}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Print kernel-stats or pytest-benchmark JSON files as tables.")
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--brief", action="store_true", help="kernel stats: one line, plus the kernels that spill")
    args = p.parse_args(argv)
    code = 0
    for f in args.files:
        try:
            print(render_file(f, args.brief))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"{f}: cannot read ({type(exc).__name__}: {exc})", file=sys.stderr)
            code = 1
        print()
    return code
