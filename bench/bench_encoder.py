"""pytest-benchmark suite: encoder forward and training step, fast ``CBraMod`` vs the in-repo reference.

    pytest bench/bench_encoder.py --benchmark-only                    # CPU: preset small, 19x30, batch 4
    CBRAMOD_BENCH_PRESET=base CBRAMOD_BENCH_BATCH=64 pytest bench/bench_encoder.py --benchmark-only  # GPU

Same harness as ``cbramod-fast bench`` (same models, weights, real ECG input and step functions); results
are grouped per (mode, dtype) so pytest-benchmark prints the variants side by side; on CPU the fast model's
``cpu_path`` (what its calls ran) goes into each result's ``extra_info``. The Triton backend is
timed on CUDA only (under the CPU interpreter it is a correctness tool, not a speed). For the interleaved,
quantile-reporting comparison behind the result tables use ``cbramod-fast bench``.
"""

from __future__ import annotations

import os

import pytest
import torch

from cbramod_fast.benchmark.config import BenchConfig, auto_threads
from cbramod_fast.benchmark.device import model_flops
from cbramod_fast.benchmark.harness import Variant, build_models, step_fn, sync
from cbramod_fast.benchmark.inputs import make_input, patch_stream
from cbramod_fast.model.config import PRESETS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PRESET = os.environ.get("CBRAMOD_BENCH_PRESET", "base" if DEVICE == "cuda" else "small")
BATCH = int(os.environ.get("CBRAMOD_BENCH_BATCH", "64" if DEVICE == "cuda" else "4"))
C, N = 19, 30
ROUNDS = 20 if DEVICE == "cuda" else 5
DTYPES = ("fp32", "bf16")
VARIANTS = ["fast[torch]", "reference"] + (["fast[triton]"] if DEVICE == "cuda" else [])


@pytest.fixture(scope="module", autouse=True)
def _threads():
    before = torch.get_num_threads()
    if DEVICE == "cpu":
        torch.set_num_threads(auto_threads())  # see auto_threads: busy cores stall every parallel region
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models():
    backends = tuple(v[5:-1] for v in VARIANTS if v.startswith("fast["))
    return build_models(BenchConfig(device=DEVICE, preset=PRESET, backends=backends))


@pytest.fixture(scope="module")
def inputs():
    x = make_input(patch_stream(), BATCH, C, N).to(DEVICE)
    mask = (torch.rand(x.shape[:3], generator=torch.Generator().manual_seed(1)) < 0.5).long().to(DEVICE)
    return x, mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["infer", "train"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_encoder(benchmark, models, inputs, variant, mode, dtype):
    x, mask = inputs
    model = models[variant]().to(DEVICE).train(mode == "train")
    backend = variant[5:-1] if variant.startswith("fast[") else None
    v = Variant(variant, "fast" if backend else variant, backend, dtype, model)
    if mode == "train":
        v.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    step = step_fn(v, x, mask, mode, DEVICE)

    def timed():
        step()
        sync(DEVICE)  # pytest-benchmark times on the host: wait for the GPU

    benchmark.group = f"encoder {mode} {dtype} {PRESET} {C}x{N} batch {BATCH} ({DEVICE})"
    benchmark.extra_info.update({"flops": model_flops(PRESETS[PRESET], C, N, BATCH, mode),
                                 "batch": BATCH, "threads": torch.get_num_threads()})
    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    if DEVICE == "cpu" and backend:  # what the timed calls of our model ran (None for training steps)
        benchmark.extra_info["cpu_path"] = model.cpu_path
