"""Corpus-build throughput (records/s) on real 12-lead ECG, with 1 and 2 worker processes.

    pytest bench/bench_corpus.py            # writes bench/results/corpus_build_cpu.json

Input: the 25 PhysioNet/CinC 2021 records shipped in ``cbramod_fast/data/ecg_demo`` (12 leads, 500 Hz,
10 s, WFDB ``.mat``), linked 8× under different folder names = 200 records. Each timed run is a full
``build_corpus`` into a fresh folder (read, µV, band-pass + resample + patch, windows, checks, float16
shards with fsync, manifest). Variants are interleaved after a warm-up; medians with quartiles.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pytest

from cbramod_fast.atomic import atomic_text
from cbramod_fast.benchmark.device import cpu_model, git_state
from cbramod_fast.corpus.build import CorpusConfig, build_corpus

RESULTS = Path(__file__).parent / "results"
DEMO = Path(__file__).resolve().parents[1] / "cbramod_fast" / "data" / "ecg_demo"
COPIES, WARMUP, REPEATS = 8, 1, 5


def _sources(root: Path) -> list[Path]:
    srcs = []
    for k in range(COPIES):
        d = root / f"copy{k}"
        d.mkdir()
        for p in DEMO.glob("[EHJ]*"):  # the 25 CinC records (.hea + .mat), not MIT-BIH 100
            os.symlink(p, d / p.name)
        srcs.append(d)
    return srcs


def test_corpus_build_throughput(benchmark):
    root = Path(tempfile.mkdtemp(prefix="bench_corpus_"))
    try:
        srcs = _sources(root)
        n_records = 25 * COPIES
        cfg = CorpusConfig(shard_windows=32)
        run = 0
        windows = 0

        def build(workers: int) -> float:
            nonlocal run, windows
            run += 1
            t0 = time.perf_counter()
            man = build_corpus(srcs, root / f"out{run}", cfg, workers=workers, progress=False)
            dt = time.perf_counter() - t0
            assert man["counts"]["records"] == n_records
            windows = man["n_windows"]
            return dt

        variants = {"workers=1": 1, "workers=2": 2}
        for _ in range(WARMUP):
            for w in variants.values():
                build(w)
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(REPEATS):
            for k, w in variants.items():
                times[k].append(build(w))
        benchmark.pedantic(lambda: build(1), rounds=1, iterations=1)
        rows = {}
        for k, ts in times.items():
            q = statistics.quantiles(ts, n=4)
            med = statistics.median(ts)
            rows[k] = {"median_s": med, "q1_s": q[0], "q3_s": q[2], "records_per_s": n_records / med,
                       "windows_per_s": windows / med, "raw_Msamples_per_s": n_records * 12 * 5000 / med / 1e6}
        rows["speedup_2_workers_vs_1"] = rows["workers=1"]["median_s"] / rows["workers=2"]["median_s"]
        RESULTS.mkdir(exist_ok=True)
        out = {"what": f"cbramod-fast corpus build of {n_records} real 12-lead 500 Hz 10-s ECG records "
                       "(CinC 2021) -> float16 shards of (12, 10, 200) windows", "cpu": cpu_model(),
               "cores": os.cpu_count(), "commit": (git_state(RESULTS)["commit"] or "unknown")[:7], "warmup": WARMUP,
               "repeats": REPEATS, "results": rows}
        atomic_text(RESULTS / "corpus_build_cpu.json", json.dumps(out, indent=1) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def _quiet_tqdm(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
