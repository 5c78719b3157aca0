"""The benchmark's input: real 12-lead ECG patches shipped as one array, so timing needs no record reader.

``cbramod_fast/data/ecg_demo_patches.npz`` holds the CinC 2021 demo records (``data/ecg_demo``) preprocessed
as pretraining sees them (0.5-45 Hz, 200 Hz, µV/100, 10-s windows with all 12 leads) as a ``(12, P, 200)``
stream of 1-s patches. ``python bench/make_bench_input.py`` rebuilds it with :func:`make_patch_stream`;
``tests/test_benchmark.py`` checks the shipped file still equals what that makes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parents[1] / "data"
DEMO_RECORDS = DATA / "ecg_demo"
PATCHES = DATA / "ecg_demo_patches.npz"


def make_patch_stream(records_dir: str | Path = DEMO_RECORDS) -> np.ndarray:
    """``(12, P, 200)`` float32: the 12-lead windows of the WFDB records in ``records_dir``, patch after patch."""
    from ..corpus.windows import read_windows
    from ..readers import records_in

    w = read_windows(records_in(records_dir))
    x = w.x[w.present.all(axis=1)]  # windows with all 12 leads (the CinC 2021 records)
    return np.ascontiguousarray(x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1, x.shape[-1]))


def patch_stream(path: str | Path = PATCHES) -> torch.Tensor:
    """The shipped ``(12, P, 200)`` stream of real ECG patches (µV/100)."""
    with np.load(path, allow_pickle=False) as z:
        return torch.from_numpy(z["patches"])


def make_input(stream: torch.Tensor, batch: int, c: int, n: int) -> torch.Tensor:
    """(batch, c, n, 200): channel j is lead j % 12, sample b takes consecutive patches from b*n on."""
    leads, p = stream.shape[0], stream.shape[1]
    ci = torch.arange(c) % leads
    pi = (torch.arange(batch).view(-1, 1) * n + torch.arange(n)) % p  # (batch, n)
    return stream[ci.view(1, -1, 1), pi.view(batch, 1, n)]
