"""Is the corpus loader the bottleneck? Windows/s of ``CorpusLoader`` beside a bare memory-mapped gather of the
same shards, and beside the windows/s one GPU training step consumes.

    pytest bench/bench_loader.py            # writes bench/results/loader_<device>.json
    CBRAMOD_BENCH_CORPUS=corpus/ pytest bench/bench_loader.py    # a corpus of your own instead

Corpus: the real ECG shipped in ``cbramod_fast/data/ecg_demo`` through ``corpus build`` with a 1-s stride
(every 10-s window starting on a whole second: 1,820 windows of 12 leads x 10 patches x 200 float16, 87 MB,
more than any CPU cache), read from the page cache. Batch 128 (the pretraining default per rank).

Variants, in one process, interleaved round by round after a warm-up round each, medians of windows/s:
``bare``: per shard ``a[np.sort(rows)]`` on the memory-mapped float16 array + ``torch.from_numpy`` (float32:
then ``.float()``), the batches drawn from the loader's own epoch permutations; ``loader``: ``CorpusLoader``
in-process and with 1, 2 (and 4, where the machine has 5 cores or more) worker processes, float16 and float32
out. The consumer of every variant reads one value per 4 KB page of each batch (as a copy to the GPU or the
model would: memory a worker wrote must be mapped here too). The main process runs one torch thread. Each
round begins with the batches that workers have in flight, untimed (they were read while other variants ran).
On CUDA, two more variants copy each pinned float16 batch to the GPU (``non_blocking``, synchronised at
the end of the round).

GPU demand: ``model_flops`` of one training step of the ``base`` encoder per window of the corpus's shape,
at ``MFU`` of the data-sheet bf16 peak of an H100 SXM (and of this machine's GPU, if any).

Targets (checked after the results are written): in-process float16 >= 0.5x the bare float16 gather (goal
0.8x); 2 workers >= in-process, float16 and float32.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cbramod_fast.atomic import atomic_text
from cbramod_fast.benchmark.device import cpu_model, cpu_uarch, git_state, gpu_peak, model_flops
from cbramod_fast.corpus.build import CorpusConfig, build_corpus
from cbramod_fast.corpus.loader import PREFETCH, CorpusLoader, epoch_permutation
from cbramod_fast.model.config import PRESETS
from cbramod_fast.pretrain import DEMO_DATA

RESULTS = Path(__file__).parent / "results"
BATCH = int(os.environ.get("CBRAMOD_BENCH_LOADER_BATCH", "128"))
ROUNDS, BATCHES_PER_ROUND = 5, 120
MFU = 0.25  # a realistic model FLOP utilisation for this small model's training step
REFERENCE_GPU = "H100 SXM"
PAGE = 4096
TARGET_IN_PROCESS, GOAL_IN_PROCESS = 0.5, 0.8


def _touch(x: torch.Tensor) -> None:
    x.reshape(-1)[::PAGE // x.element_size()].sum()


def _corpus(tmp: Path) -> Path:
    own = os.environ.get("CBRAMOD_BENCH_CORPUS")
    if own:
        return Path(own)
    out = tmp / "corpus"
    build_corpus([DEMO_DATA], out, CorpusConfig(stride_patches=1), workers=min(4, os.cpu_count() or 1),
                 progress=False)
    return out


def _bare(corpus: Path, dtype: torch.dtype, seed: int = 0):
    """The bare gather: what one core can copy out of the memory-mapped shards, nothing else."""
    man = json.loads((corpus / "manifest.json").read_text())
    arrays = [np.asarray(np.load(corpus / s["x"], mmap_mode="r")) for s in man["shards"]]
    bounds = np.cumsum([0] + [s["n"] for s in man["shards"]])
    n = int(bounds[-1])
    perms = (epoch_permutation(n, seed, e) for e in range(10**9))
    batches = (p[i:i + BATCH] for p in perms for i in range(0, n - BATCH + 1, BATCH))

    def step() -> int:
        idx = next(batches)
        shard_of = np.searchsorted(bounds, idx, side="right") - 1
        for s in np.unique(shard_of):
            t = torch.from_numpy(arrays[s][np.sort(idx[shard_of == s] - bounds[s])])
            _touch(t if dtype == torch.float16 else t.float())
        return len(idx)

    return step, 0


def _loader(corpus: Path, dtype: torch.dtype, workers: int, device: str | None = None):
    loader = CorpusLoader(corpus, batch_size=BATCH, seed=0, num_workers=workers, dtype=dtype,
                          pin_memory=device is not None)

    def stream():
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    batches = stream()

    def step() -> int:
        b = next(batches)
        if device is None:
            _touch(b["x"])
        else:
            b["x"].to(device, non_blocking=True)
        return len(b["index"])

    return step, PREFETCH * workers, loader


def _round(step, lead_in: int, device: str | None) -> float:
    for _ in range(lead_in):
        step()
    t0 = time.perf_counter()
    n = sum(step() for _ in range(BATCHES_PER_ROUND))
    if device is not None:
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def _worker_counts() -> list[int]:
    return [1, 2] + ([4] if (os.cpu_count() or 1) >= 5 else [])


def _gpu_demand(shape: tuple[int, ...]) -> dict:
    c, n = shape[0], shape[1]
    flops = model_flops(PRESETS["base"], c, n, batch=1, mode="train")
    gpus = [REFERENCE_GPU] + ([torch.cuda.get_device_name()] if torch.cuda.is_available() else [])
    out = {"flops_per_window_train_step": flops, "preset": "base", "window": [c, n], "mfu": MFU, "gpus": {}}
    for name in gpus:
        peak = gpu_peak(name)["bf16"]
        if peak:
            rate = MFU * peak / flops
            out["gpus"][name] = {"bf16_peak_flops": peak, "windows_per_s_per_gpu": rate,
                                 "windows_per_s_8_gpus": 8 * rate}
    return out


def test_loader_feed_rate(benchmark):
    tmp = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core for the main process: the bare gather's single-core rate is the yardstick
    loaders = []
    try:
        corpus = _corpus(tmp)
        man = json.loads((corpus / "manifest.json").read_text())
        for s in man["shards"]:  # into the page cache: the bench measures the copy, not the disk
            (corpus / s["x"]).read_bytes()
        variants = {}
        for dtype, tag in ((torch.float16, "float16"), (torch.float32, "float32")):
            variants[f"bare {tag}"] = _bare(corpus, dtype)
            for w in [0, *_worker_counts()]:
                step, lead_in, loader = _loader(corpus, dtype, w)
                loaders.append(loader)
                variants[f"loader {tag}, {'in-process' if w == 0 else f'{w} workers'}"] = (step, lead_in)
        if torch.cuda.is_available():
            for w in (0, 2):
                step, lead_in, loader = _loader(corpus, torch.float16, w, device="cuda")
                loaders.append(loader)
                variants[f"loader float16 pinned -> cuda, {'in-process' if w == 0 else f'{w} workers'}"] = (
                    step, lead_in)
        dev = {k: "cuda" if "cuda" in k else None for k in variants}
        for k, (step, lead_in) in variants.items():  # warm-up: maps every page in every process
            _round(step, lead_in, dev[k])
        rates: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(ROUNDS):
            for k, (step, lead_in) in variants.items():
                rates[k].append(_round(step, lead_in, dev[k]))
        fast = variants["loader float16, in-process"][0]
        benchmark.pedantic(lambda: [fast() for _ in range(BATCHES_PER_ROUND)], rounds=1, iterations=1)
        doc = _report(corpus, man, rates)
    finally:
        for loader in loaders:
            loader.close()
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    failed = [f"{k}: {t['value']:.2f} < {t['min']}" for k, t in doc["targets"].items() if not t["met"]]
    assert not failed, "loader targets missed: " + "; ".join(failed)


def _report(corpus: Path, man: dict, rates: dict[str, list[float]]) -> dict:
    rows = {}
    for k, v in rates.items():
        q = statistics.quantiles(v, n=4)
        rows[k] = {"windows_per_s": statistics.median(v), "q1": q[0], "q3": q[2], "rounds": v}
    for k, r in rows.items():
        tag = "float16" if "float16" in k else "float32"
        r["vs_bare"] = r["windows_per_s"] / rows[f"bare {tag}"]["windows_per_s"]
    demand = _gpu_demand(tuple(man["shape"]))
    ref = demand["gpus"][REFERENCE_GPU]["windows_per_s_per_gpu"]
    for r in rows.values():
        r["fraction_of_one_gpu_demand"] = r["windows_per_s"] / ref

    def rate(k: str) -> float:
        return rows[k]["windows_per_s"]

    targets = {"in-process float16 / bare float16": {
        "value": rate("loader float16, in-process") / rate("bare float16"), "min": TARGET_IN_PROCESS,
        "goal": GOAL_IN_PROCESS}}
    for tag in ("float16", "float32"):
        targets[f"2 workers / in-process, {tag}"] = {
            "value": rate(f"loader {tag}, 2 workers") / rate(f"loader {tag}, in-process"), "min": 1.0}
    for t in targets.values():
        t["met"] = t["value"] >= t["min"]
    cuda = torch.cuda.is_available()
    doc = {
        "what": f"windows/s of CorpusLoader (batch {BATCH}) vs a bare memory-mapped float16 gather of the same "
                "shards, consumer reading one value per 4 KB page; and the windows/s a GPU training step consumes",
        "command": "".join(f"{k}={os.environ[k]} " for k in ("CBRAMOD_BENCH_CORPUS", "CBRAMOD_BENCH_LOADER_BATCH")
                           if os.environ.get(k)) + "pytest bench/bench_loader.py",
        "device": {"cpu": cpu_model(), "uarch": cpu_uarch(), "cores": os.cpu_count(), "main_torch_threads": 1,
                   "gpu": torch.cuda.get_device_name() if cuda else None},
        "corpus": {"path": str(corpus) if os.environ.get("CBRAMOD_BENCH_CORPUS") else
                   "cbramod_fast/data/ecg_demo built with CorpusConfig(stride_patches=1)",
                   "n_windows": man["n_windows"], "shape": man["shape"], "dtype": "float16",
                   "bytes": sum((corpus / s["x"]).stat().st_size for s in man["shards"])},
        "batch_size": BATCH, "rounds": ROUNDS, "batches_per_round": BATCHES_PER_ROUND, "prefetch_per_worker": PREFETCH,
        "results": rows, "gpu_demand": demand, "targets": targets,
        "load_average_1min_at_end": os.getloadavg()[0], "torch": torch.__version__, "numpy": np.__version__,
        "commit": (git_state(RESULTS)["commit"] or "unknown")[:7],
    }
    RESULTS.mkdir(exist_ok=True)
    slug = ("cuda-" + torch.cuda.get_device_name().lower().replace(" ", "-") if cuda
            else "cpu" + (f"-{cpu_uarch().lower().replace(' ', '')}" if cpu_uarch() else ""))
    atomic_text(RESULTS / f"loader_{slug}.json", json.dumps(doc, indent=1) + "\n")
    width = max(map(len, rows))
    print(f"\n{'variant':<{width}}  windows/s  (q1-q3)          x bare  x 1 GPU's demand")
    for k, r in rows.items():
        print(f"{k:<{width}}  {r['windows_per_s']:9.0f}  ({r['q1']:.0f}-{r['q3']:.0f})  {r['vs_bare']:6.2f}  "
              f"{r['fraction_of_one_gpu_demand']:6.2f}")
    print(f"one {REFERENCE_GPU} at MFU {MFU:.0%}: {ref:.0f} windows/s; targets: "
          + "; ".join(f"{k} {t['value']:.2f} (min {t['min']})" for k, t in targets.items()))
    return doc


@pytest.fixture(autouse=True)
def _quiet_tqdm(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
