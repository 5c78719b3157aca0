"""Signal pipeline: the Python face of the C++ extension (validation, docstrings, scipy-style names).

Arrays are ``(..., T)``: any leading shape, time last, float32 or float64. The heavy loops run in
``cbramod_fast._ext`` with the GIL released and split across ``threads`` (default: all cores).
"""

from __future__ import annotations

import numpy as np

from . import _ext

__all__ = ["patchify"]

_FLOAT_DTYPES = (np.float32, np.float64)


def _as_float_array(x, name: str = "x") -> np.ndarray:
    """Return ``x`` as a float32/float64 ndarray, rejecting integer, bool and complex input."""
    arr = np.asarray(x)
    if arr.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float32 or float64 array, got dtype {arr.dtype}")
    if arr.ndim == 0:
        raise ValueError(f"{name}: expected an array shaped (..., T), got a scalar")
    if arr.size == 0:
        raise ValueError(f"{name}: empty array (shape {arr.shape})")
    return arr


def patchify(x, patch: int = 200, threads: int = 0) -> np.ndarray:
    """Cut ``(..., T)`` into ``(..., T // patch, patch)`` consecutive patches.

    Trailing samples that do not fill a whole patch are dropped. The result is a new C-contiguous
    array of the input's dtype.
    """
    arr = _as_float_array(x)
    if isinstance(patch, bool) or not isinstance(patch, (int, np.integer)) or patch <= 0:
        raise ValueError(f"patchify: patch must be a positive integer, got {patch!r}")
    t = arr.shape[-1]
    if t < patch:
        raise ValueError(f"patchify: signal length T={t} is shorter than one patch ({patch}); shape {arr.shape}")
    rows = np.ascontiguousarray(arr.reshape(-1, t))
    fn = _ext.patchify_f32 if rows.dtype == np.float32 else _ext.patchify_f64
    out = fn(rows, int(patch), int(threads))
    return out.reshape(*arr.shape[:-1], t // patch, patch)
