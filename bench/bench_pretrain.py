"""Pretraining throughput (samples/s): one full training step (dual mask, forward, masked MSE, backward,
clip, AdamW) of the fast ``CBraMod`` vs the in-repo ``ReferenceCBraMod``, same inputs, same process.

    pytest bench/bench_pretrain.py            # writes bench/results/pretrain_<device>.json

Inputs are real windows of the shipped ECG sample (12-lead layout, 10 patches). Variants are interleaved
(fast, reference, fast, ...) after a warm-up, and reported as medians with quartiles.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import pytest
import torch

from cbramod_fast import CBraMod, ReferenceCBraMod
from cbramod_fast.atomic import atomic_text
from cbramod_fast.benchmark.device import cpu_model, git_state
from cbramod_fast.corpus.windows import read_windows
from cbramod_fast.masking import dual_mask, masked_mse
from cbramod_fast.model.config import PRESETS
from cbramod_fast.pretrain import DEMO_DATA
from cbramod_fast.readers import records_in

RESULTS = Path(__file__).parent / "results"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH = {"cpu": 16, "cuda": 128}[DEVICE.type]
WARMUP, REPEATS = 3, 10


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    w = read_windows(records_in(DEMO_DATA))
    idx = torch.arange(BATCH) % len(w.x)
    return torch.from_numpy(w.x)[idx].to(DEVICE), torch.from_numpy(w.present)[idx].to(DEVICE)


def _step_fn(model: torch.nn.Module, x: torch.Tensor, present: torch.Tensor):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if DEVICE.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step() -> None:
        b, c, n, _ = x.shape
        mask = dual_mask(b, c, n, 0.5, 0.25, generator=g, present=present)
        opt.zero_grad(set_to_none=True)
        with amp:
            pred = model(x, mask)
        masked_mse(pred, x, mask, present).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def _time(step) -> float:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_pretrain_throughput(preset, benchmark):
    x, present = _batch()
    cfg = PRESETS[preset].to_dict()
    torch.manual_seed(0)
    fast = CBraMod(**cfg).to(DEVICE).train()
    ref = ReferenceCBraMod(**{k: v for k, v in cfg.items() if k != "dropout"}).to(DEVICE).train()
    ref.load_state_dict(fast.state_dict())
    steps = {"fast": _step_fn(fast, x, present), "reference": _step_fn(ref, x, present)}
    for _ in range(WARMUP):
        for s in steps.values():
            s()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(REPEATS):  # interleaved so load changes hit both variants alike
        for k, s in steps.items():
            times[k].append(_time(s))
    benchmark.pedantic(steps["fast"], rounds=1, iterations=1)  # pytest-benchmark's own record of one step
    row = {}
    for k, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        row[k] = {"median_s": statistics.median(ts), "q1_s": q[0], "q3_s": q[2],
                  "samples_per_s": BATCH / statistics.median(ts)}
    row["speedup_fast_vs_reference"] = row["reference"]["median_s"] / row["fast"]["median_s"]
    _record(preset, row)


def _record(preset: str, row: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"pretrain_{DEVICE.type}.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update({
        "what": "one pretraining step (dual mask 0.5/0.25, forward, masked MSE, backward, clip, AdamW), "
                f"batch {BATCH} x 12 leads x 10 patches of real ECG; fast CBraMod vs ReferenceCBraMod",
        "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else cpu_model(),
        "threads": torch.get_num_threads(), "load_average_1min_at_end": os.getloadavg()[0], "torch": torch.__version__,
        "commit": (git_state(RESULTS)["commit"] or "unknown")[:7],
        "warmup": WARMUP, "repeats": REPEATS, "amp": "bf16" if DEVICE.type == "cuda" else "fp32",
    })
    data.setdefault("presets", {})[preset] = row
    atomic_text(path, json.dumps(data, indent=1) + "\n")
