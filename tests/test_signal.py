"""cbramod_fast.signal filters, resampling and preprocess vs scipy.signal (the reference).

Tolerance: max |ours - scipy| / max |scipy| ≤ 1e-6 for float64, ≤ 1e-4 for float32 inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal as ss

from cbramod_fast import signal as S

TOL = {np.float64: 1e-6, np.float32: 1e-4}


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    diff = np.abs(ours.astype(np.float64) - ref)
    worst = np.unravel_index(np.argmax(diff), diff.shape)
    err = float(diff[worst] / np.abs(ref).max())
    rel_err.where = worst  # first worst index, for the assertion message
    return err


def assert_close(ours, ref, dtype):
    err = rel_err(ours, ref)
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]} at index {rel_err.where}"


def scipy_preprocess(x, fs, band=(0.5, 45.0), notch=None, fs_out=200, scale=0.01, patch=200):
    y = ss.sosfiltfilt(ss.butter(4, list(band), "bandpass", fs=fs, output="sos"), x, axis=-1)
    if notch is not None:
        y = ss.filtfilt(*ss.iirnotch(notch, 30.0, fs=fs), y, axis=-1)
    up, down = S.resample_ratio(fs, fs_out)
    if (up, down) != (1, 1):
        y = ss.resample_poly(y, up, down, axis=-1)
    y = y * scale
    n = y.shape[-1] // patch
    return y[..., : n * patch].reshape(*y.shape[:-1], n, patch)


@pytest.fixture(scope="module")
def noise():
    return np.random.default_rng(0).standard_normal((3, 4, 3000)).cumsum(-1)  # drifting, like raw ECG


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(
    "fn, kw, ref",
    [
        (S.bandpass, {"low": 0.5, "high": 45.0}, lambda fs: ss.butter(4, [0.5, 45.0], "bandpass", fs=fs, output="sos")),
        (S.bandpass, {"low": 5.0, "high": 15.0, "order": 2},
         lambda fs: ss.butter(2, [5.0, 15.0], "bandpass", fs=fs, output="sos")),
        (S.bandpass, {"low": 1.0, "high": 30.0, "order": 7},  # 7 sections: the any-count kernel
         lambda fs: ss.butter(7, [1.0, 30.0], "bandpass", fs=fs, output="sos")),
        (S.highpass, {"cutoff": 0.5}, lambda fs: ss.butter(4, 0.5, "highpass", fs=fs, output="sos")),
        (S.lowpass, {"cutoff": 40.0, "order": 5}, lambda fs: ss.butter(5, 40.0, "lowpass", fs=fs, output="sos")),
    ],
)
@pytest.mark.parametrize("fs", [250.0, 500.0])
def test_butter_filters_match_sosfiltfilt(noise, fn, kw, ref, fs, dtype):
    x = noise.astype(dtype)
    assert_close(fn(x, fs, **kw), ss.sosfiltfilt(ref(fs), x, axis=-1), dtype)
    assert fn(x, fs, **kw).dtype == dtype


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("fs, freq, q", [(500.0, 50.0, 30.0), (360.0, 60.0, 10.0), (256.0, 50.0, 35.0)])
def test_notch_matches_filtfilt(noise, fs, freq, q, dtype):
    x = noise.astype(dtype)
    assert_close(S.notch(x, fs, freq, q), ss.filtfilt(*ss.iirnotch(freq, q, fs=fs), x, axis=-1), dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(
    "fs_in, fs_out, ratio",
    [(500, 200, (2, 5)), (360, 200, (5, 9)), (128, 200, (25, 16)), (257, 200, (200, 257)), (1000, 200, (1, 5)),
     (256, 200, (25, 32)), (200, 200, (1, 1)), (250.5, 200, (400, 501))],
)
def test_resample_matches_resample_poly(noise, fs_in, fs_out, ratio, dtype):
    assert S.resample_ratio(fs_in, fs_out) == ratio
    x = noise.astype(dtype)
    assert_close(S.resample(x, fs_in, fs_out), ss.resample_poly(x, *ratio, axis=-1), dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("fs, notch", [(500, 50), (360, 60), (256, None), (200, 50)])
def test_preprocess_matches_scipy_chain(noise, fs, notch, dtype):
    x = noise.astype(dtype) * 100
    out = S.preprocess(x, fs, notch=notch, threads=2)
    ref = scipy_preprocess(x, fs, notch=notch)
    assert out.patches.dtype == np.float32 and out.patches.shape == ref.shape
    assert out.valid.shape == ref.shape[:-1] and out.valid.dtype == bool
    assert_close(out.patches, ref, dtype)
