"""cbramod_fast.signal.patchify (C++): cut (..., T) into (..., T // patch, patch)."""

from __future__ import annotations

import numpy as np
import pytest

from cbramod_fast.signal import patchify


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(450,), (3, 400), (2, 3, 601), (1, 1, 200)])
def test_patchify_matches_reshape(shape, dtype):
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    out = patchify(x, 200)
    n = shape[-1] // 200
    assert out.shape == (*shape[:-1], n, 200) and out.dtype == dtype and out.flags.c_contiguous
    np.testing.assert_array_equal(out, x[..., : n * 200].reshape(*shape[:-1], n, 200))


def test_patchify_strided_and_fortran_input():
    x = np.asfortranarray(np.random.default_rng(1).standard_normal((4, 1000)))
    np.testing.assert_array_equal(patchify(x, 250), x.reshape(4, 4, 250))
    view = np.random.default_rng(2).standard_normal((6, 900))[::2, 50:]
    np.testing.assert_array_equal(patchify(view, 200, threads=2), view[:, :800].reshape(3, 4, 200))


@pytest.mark.parametrize(
    "x, patch, exc, match",
    [
        (np.zeros(199, np.float32), 200, ValueError, r"T=199 is shorter than one patch \(200\)"),
        (np.zeros(400, np.float32), 0, ValueError, "positive integer"),
        (np.zeros(400, np.float32), 2.5, ValueError, "positive integer"),
        (np.zeros(400, np.int16), 200, TypeError, "float32 or float64.*int16"),
        (np.zeros((3, 0), np.float32), 200, ValueError, "empty"),
    ],
)
def test_patchify_bad_input(x, patch, exc, match):
    with pytest.raises(exc, match=match):
        patchify(x, patch)
