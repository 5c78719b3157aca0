"""Signal pipeline speed: ``cbramod_fast.signal.preprocess`` vs the scipy equivalent, in one run.

    pytest bench/bench_signal.py          # writes bench/results/signal_cpu.json (about a minute)

Workloads (real recordings, µV):
- ECG: the 25 PhysioNet/CinC 2021 records shipped in ``cbramod_fast/data/ecg_demo`` (12 leads, 500 Hz,
  10 s), tiled 8x = 200 records; band-pass 0.5-45 Hz, notch 50 Hz, 500 -> 200 Hz, x0.01, patches of 200.
  Timed both as one call on the (200, 12, 5000) batch and as a loop of 200 per-record calls (how a corpus
  builder meets records).
- EEG (when ../shared is present): eegmat's 19 EEG channels, brought to 256 Hz once with scipy, cut into
  30-s records; same pipeline, 256 -> 200 Hz.

The scipy equivalent is ``sosfiltfilt(butter)`` -> ``filtfilt(iirnotch)`` -> ``resample_poly`` -> scale ->
float32 -> reshape, filters designed once outside the timing. Variants run interleaved (rotating order) after
a warm-up; medians and quartiles of the repeats; ratio = scipy median / ours median from the same run. Peak
extra memory is tracemalloc's peak over the call (numpy buffers: outputs and any copies) plus the C++
per-thread scratch, which tracemalloc cannot see (reported from its formula).
"""

from __future__ import annotations

import json
import os
import statistics
import time
import tracemalloc
from pathlib import Path

import numpy as np
import scipy
import scipy.signal as ss

from cbramod_fast import _ext
from cbramod_fast import signal as S
from cbramod_fast.atomic import atomic_text
from cbramod_fast.benchmark.device import cpu_model, git_state
from cbramod_fast.readers import read_edf_signals, read_record

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEMO = ROOT / "cbramod_fast" / "data" / "ecg_demo"
EEGMAT = ROOT.parent / "shared" / "data" / "eeg_ecg_eegmat"
BAND, NOTCH, FS_OUT, SCALE, PATCH = (0.5, 45.0), 50.0, 200, 0.01, 200


def load_ecg(copies: int = 8) -> np.ndarray:
    """(25 * copies, 12, 5000) float32 µV from the shipped CinC 2021 demo records."""
    recs = []
    for hea in sorted(DEMO.glob("[EHJ]*.hea")):
        r = read_record(hea)
        assert r.fs == 500 and r.signal.shape == (12, 5000) and r.present.all(), hea
        recs.append(r.signal)
    assert len(recs) == 25, f"expected the 25 CinC demo records in {DEMO}"
    return np.ascontiguousarray(np.stack(recs * copies), dtype=np.float32)


def load_eeg(seconds: int = 30, fs: int = 256) -> np.ndarray | None:
    """(n, 19, seconds * fs) float32 µV: eegmat EEG resampled 500 -> 256 Hz, cut into records; None without
    ../shared."""
    if not EEGMAT.is_dir():
        return None
    out = []
    for edf_path in sorted(EEGMAT.glob("Subject*.edf")):
        x, fs_rec, labels = read_edf_signals(edf_path)
        x = x[[i for i, lab in enumerate(labels) if lab.startswith("EEG ")][:19]]
        up, down = S.resample_ratio(fs_rec, fs)
        y = ss.resample_poly(x, up, down, axis=-1)
        n = y.shape[-1] // (seconds * fs)
        out.extend(np.split(y[:, : n * seconds * fs], n, axis=-1))
    return np.ascontiguousarray(np.stack(out), dtype=np.float32)


class ScipyPipeline:
    """The scipy equivalent of S.preprocess's patches; filters designed once."""

    def __init__(self, fs: float):
        self.sos = ss.butter(4, list(BAND), "bandpass", fs=fs, output="sos")
        self.ba = ss.iirnotch(NOTCH, 30.0, fs=fs)
        self.up, self.down = S.resample_ratio(fs, FS_OUT)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = ss.sosfiltfilt(self.sos, x, axis=-1)
        y = ss.filtfilt(*self.ba, y, axis=-1)
        y = ss.resample_poly(y, self.up, self.down, axis=-1)
        y = (y * SCALE).astype(np.float32)
        n = y.shape[-1] // PATCH
        return y[..., : n * PATCH].reshape(*y.shape[:-1], n, PATCH)


def ours(fs: float, threads: int):
    return lambda x: S.preprocess(x, fs, band=BAND, notch=NOTCH, fs_out=FS_OUT, scale=SCALE, patch=PATCH,
                                  threads=threads).patches


def time_interleaved(variants: dict, warmup: int, repeats: int) -> tuple[dict, dict]:
    """Wall and process CPU seconds (all threads) per variant. CPU time is what a busy shared machine
    distorts least; wall time is what matters when cores are free."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    names = list(variants)
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        for k in names[r % len(names):] + names[: r % len(names)]:  # rotate: no variant always goes first
            c0, t0 = time.process_time(), time.perf_counter()
            variants[k]()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return wall, cpu


def peak_numpy_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def cpp_scratch_bytes(t: int, fs: float, threads: int) -> int:
    """Per-thread double buffers of preprocess.cpp: (T + 2 * padlen) x 4 rows, plus the resampled block."""
    up, down = S.resample_ratio(fs, FS_OUT)
    padlen = 3 * (2 * 4 + 1)
    return threads * 8 * 4 * ((t + 2 * padlen) + -(-t * up // down))


def bench_workload(name: str, batch: np.ndarray, fs: float, warmup: int, repeats: int, per_record: bool) -> dict:
    ref = ScipyPipeline(fs)
    err = float(np.abs(ours(fs, 0)(batch) - ref(batch)).max() / np.abs(ref(batch)).max())
    # 1 and 2 threads everywhere; all available cores too on bigger machines
    counts = sorted({1, 2, _ext.default_threads()})
    variants = {"scipy": lambda: ref(batch)}
    variants |= {f"ours threads={n}": (lambda n=n: ours(fs, n)(batch)) for n in counts}
    if per_record:
        variants["scipy per-record loop"] = lambda: [ref(r) for r in batch]
        variants |= {f"ours threads={n} per-record loop": (lambda n=n: [ours(fs, n)(r) for r in batch])
                     for n in counts}
    times, cpu = time_interleaved(variants, warmup, repeats)
    samples = batch.size
    rows = {}
    for k, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        rows[k] = {"median_s": statistics.median(ts), "q1_s": q[0], "q3_s": q[2],
                   "cpu_median_s": statistics.median(cpu[k]),
                   "input_Msamples_per_s": samples / statistics.median(ts) / 1e6}
    ratios, cpu_ratios = {}, {}
    for k in rows:
        if k.startswith("ours"):
            base = "scipy per-record loop" if k.endswith("loop") else "scipy"
            ratios[f"{k} vs {base}"] = rows[base]["median_s"] / rows[k]["median_s"]
            cpu_ratios[f"{k} vs {base}"] = rows[base]["cpu_median_s"] / rows[k]["cpu_median_s"]
    in_bytes = batch.nbytes
    mem = {
        "input_bytes": in_bytes,
        "ours_threads=2_numpy_peak_bytes": peak_numpy_bytes(lambda: ours(fs, 2)(batch)),
        "ours_threads=2_cpp_scratch_bytes": cpp_scratch_bytes(batch.shape[-1], fs, 2),
        "scipy_numpy_peak_bytes": peak_numpy_bytes(lambda: ref(batch)),
    }
    mem["ours_peak_extra_in_input_copies"] = (mem["ours_threads=2_numpy_peak_bytes"]
                                              + mem["ours_threads=2_cpp_scratch_bytes"]) / in_bytes
    mem["scipy_peak_extra_in_input_copies"] = mem["scipy_numpy_peak_bytes"] / in_bytes
    return {"what": name, "shape": list(batch.shape), "dtype": str(batch.dtype), "fs": fs,
            "max_rel_err_vs_scipy": err, "results": rows, "speedups": ratios,
            "cpu_time_ratios": cpu_ratios, "memory": mem}


def run_signal_benchmark(warmup: int = 1, repeats: int = 7, copies: int = 8) -> dict:
    ecg = load_ecg(copies)
    doc = {
        "what": "cbramod_fast.signal.preprocess (band-pass 0.5-45 Hz, notch 50 Hz, resample to 200 Hz, x0.01, "
                "patches of 200) vs the scipy equivalent, same process, same inputs",
        "cpu": cpu_model(), "cores": os.cpu_count(),
        "load_avg_at_start": list(os.getloadavg()),
        "note": "compare ratios within this file: absolute times depend on the load (load averages here)",
        "commit": (git_state(ROOT)["commit"] or "unknown")[:7], "versions": {"numpy": np.__version__, "scipy": scipy.__version__},
        "simd_path": _ext.simd_path(), "default_threads": _ext.default_threads(),
        "warmup": warmup, "repeats": repeats,
        "workloads": {"ecg_12lead_500hz_10s": bench_workload(
            f"{len(ecg)} real 12-lead 10-s 500 Hz ECG records (CinC 2021 demo x{copies})", ecg, 500.0, warmup,
            repeats, per_record=True)},
    }
    eeg = load_eeg()
    if eeg is not None:
        doc["workloads"]["eeg_19ch_256hz_30s"] = bench_workload(
            f"{len(eeg)} real 19-channel 30-s EEG records (eegmat, resampled to 256 Hz)", eeg, 256.0, warmup,
            repeats, per_record=False)
    doc["load_avg_at_end"] = list(os.getloadavg())
    return doc


def write_signal_results(path: Path = RESULTS / "signal_cpu.json", **kw) -> dict:
    doc = run_signal_benchmark(**kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_text(path, json.dumps(doc, indent=1) + "\n")
    return doc


def test_signal_preprocess_vs_scipy(benchmark):
    doc = write_signal_results()
    ecg = doc["workloads"]["ecg_12lead_500hz_10s"]
    assert ecg["max_rel_err_vs_scipy"] <= 1e-4  # float32 input
    batch = load_ecg(1)
    benchmark.group = "signal preprocess, 25 CinC records (12 x 5000 @ 500 Hz)"
    benchmark.extra_info.update({"speedups_200_records": ecg["speedups"]})
    benchmark.pedantic(lambda: ours(500.0, 0)(batch), rounds=5, warmup_rounds=1, iterations=1)
