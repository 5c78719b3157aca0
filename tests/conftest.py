"""Shared test fixtures: data locations and auto-skips for GPU and ../shared tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Deterministic cuBLAS (tests that call torch.use_deterministic_algorithms) needs this set before the first
# cuBLAS handle is created; importing torch creates none.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

if not torch.cuda.is_available():
    # Triton reads TRITON_INTERPRET when @triton.jit runs, for triton.language's own helpers (tl.max, tl.rand)
    # as well as ours, i.e. when triton is first imported. Any test module (or torch.compile) may import it
    # before the kernel tests, so it is set here, first: without CUDA the kernels run under the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"  # small copies shipped with the repo (fresh clones have no ../shared)
SHARED = REPO.parent / "shared"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_shared = pytest.mark.skip(reason=f"needs {SHARED} (absent on this clone)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "shared" in item.keywords and not SHARED.is_dir():
            item.add_marker(skip_shared)


@pytest.fixture(scope="session")
def repo_data() -> Path:
    return DATA


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"needs {SHARED}")
    return SHARED
