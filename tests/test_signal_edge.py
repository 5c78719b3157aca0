"""cbramod_fast.signal: bad input (errors matching scipy's), edge shapes and layouts, property tests."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal as ss
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cbramod_fast import signal as S

TOL = {np.float64: 1e-6, np.float32: 1e-4}


def max_rel(ours, ref) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours.astype(np.float64) - ref).max() / np.abs(ref).max())


def sos_bp(fs, low=0.5, high=45.0, order=4):
    return ss.butter(order, [low, high], "bandpass", fs=fs, output="sos")


# ------------------------------------------------------------------------------------------------ errors
X = np.random.default_rng(0).standard_normal((2, 600))


@pytest.mark.parametrize(
    "ours, theirs, match",
    [
        # signal not longer than the padding: 3 * (2 * 4 + 1) = 27 for an order-4 band-pass
        (lambda: S.bandpass(X[:, :27], 500, 1, 40), lambda: ss.sosfiltfilt(sos_bp(500, 1, 40), X[:, :27]),
         "greater than padlen, which is 27"),
        (lambda: S.notch(X[:, :9], 500, 50), lambda: ss.filtfilt(*ss.iirnotch(50, 30, fs=500), X[:, :9]),
         "greater than padlen, which is 9"),
        (lambda: S.bandpass(X, 500, 40, 10), lambda: ss.butter(4, [40, 10], "bandpass", fs=500), "less than"),
        (lambda: S.bandpass(X, 500, 10, 10), lambda: ss.butter(4, [10, 10], "bandpass", fs=500), "less than"),
        (lambda: S.bandpass(X, 500, 1, 250), lambda: ss.butter(4, [1, 250], "bandpass", fs=500), "fs/2"),
        (lambda: S.lowpass(X, 500, 300), lambda: ss.butter(4, 300, "lowpass", fs=500), "fs/2"),
        (lambda: S.highpass(X, 500, 0), lambda: ss.butter(4, 0, "highpass", fs=500), "0 < Wn"),
        (lambda: S.highpass(X, 500, -1), lambda: ss.butter(4, -1, "highpass", fs=500), "0 < Wn"),
        (lambda: S.lowpass(X, 0, 10), lambda: ss.butter(4, 10, "lowpass", fs=0), "fs must be positive"),
        (lambda: S.lowpass(X, -100, 10), lambda: ss.butter(4, 10, "lowpass", fs=-100), "fs must be positive"),
        (lambda: S.notch(X, 500, 260), lambda: ss.iirnotch(260, 30, fs=500), "fs/2"),
    ],
)
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # scipy's butter with fs=0
def test_errors_match_scipy(ours, theirs, match):
    with pytest.raises(ValueError):
        theirs()
    with pytest.raises(ValueError, match=match):
        ours()


@pytest.mark.parametrize("fn", [
    lambda x: S.bandpass(x, 500, 1, 40), lambda x: S.highpass(x, 500, 1), lambda x: S.lowpass(x, 500, 40),
    lambda x: S.notch(x, 500, 50), lambda x: S.resample(x, 500, 200),
])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_input_names_the_index(fn, bad):
    x = np.random.default_rng(1).standard_normal((2, 3, 400)).astype(np.float32)
    x[1, 2, 123] = bad
    x[1, 2, 300] = bad  # only the first is reported
    with pytest.raises(ValueError, match=r"non-finite value .*index \[1, 2, 123\] \(row 5, sample 123\)"):
        fn(x)


@pytest.mark.parametrize("fn", [
    lambda x: S.bandpass(x, 500, 1, 40), lambda x: S.notch(x, 500, 50), lambda x: S.resample(x, 500, 200),
    lambda x: S.preprocess(x, 500), lambda x: S.lowpass(x, 500, 40),
])
def test_bad_dtype_and_empty(fn):
    with pytest.raises(TypeError, match="float32 or float64.*int16"):
        fn(np.zeros((2, 1000), np.int16))
    with pytest.raises(TypeError, match="float32 or float64.*complex"):
        fn(np.zeros((2, 1000), np.complex64))
    with pytest.raises(ValueError, match="empty"):
        fn(np.zeros((2, 0)))
    with pytest.raises(ValueError, match="empty"):
        fn(np.zeros((0, 1000)))


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="fs/2"):
        S.notch(X, 500, 250)  # stricter than scipy, whose iirnotch accepts a notch at exactly Nyquist
    with pytest.raises(ValueError, match="order"):
        S.bandpass(X, 500, 1, 40, order=0)
    with pytest.raises(ValueError, match="threads"):
        S.bandpass(X, 500, 1, 40, threads=-1)
    with pytest.raises(ValueError, match="q must be positive"):
        S.notch(X, 500, 50, q=0)
    with pytest.raises(ValueError, match="fs_out must be positive"):
        S.resample(X, 500, 0)
    with pytest.raises(ValueError, match="max\\(up, down\\) must"):
        S.resample(X, 500, 200.001)
    with pytest.raises(ValueError, match="fewer than one patch"):
        S.preprocess(X[:, :497], 500)  # ceil(497 * 2 / 5) = 199 samples at 200 Hz
    with pytest.raises(ValueError, match="band low .* less than high"):
        S.preprocess(X, 500, band=(40.0, 1.0))
    with pytest.raises(ValueError, match="max_abs"):
        S.preprocess(X, 500, max_abs=-1.0)


# ------------------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_length_just_above_padlen(dtype):
    x = np.random.default_rng(2).standard_normal((3, 28)).astype(dtype)
    assert max_rel(S.bandpass(x, 500, 1, 40), ss.sosfiltfilt(sos_bp(500, 1, 40), x)) <= TOL[dtype]
    x10 = x[:, :10]
    ref = ss.filtfilt(*ss.iirnotch(50, 30, fs=500), x10)
    assert max_rel(S.notch(x10, 500, 50), ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_one_dimensional_and_single_sample(dtype):
    x = np.random.default_rng(3).standard_normal(1000).astype(dtype)
    out = S.bandpass(x, 250, 1, 40)
    assert out.shape == x.shape and out.dtype == dtype
    assert max_rel(out, ss.sosfiltfilt(sos_bp(250, 1, 40), x)) <= TOL[dtype]
    assert max_rel(S.resample(x, 250, 200), ss.resample_poly(x, 4, 5)) <= TOL[dtype]
    one = np.array([2.5], dtype)  # resample_poly of one sample: a scaled tap
    np.testing.assert_allclose(S.resample(one, 1, 3), ss.resample_poly(one, 3, 1), rtol=TOL[dtype])


def test_many_leading_dims_and_row_tail():
    # 2*3*5*7 = 210 rows: not a multiple of the 4-row kernel block; each row must stay its own
    x = np.random.default_rng(4).standard_normal((2, 3, 5, 7, 120))
    out = S.bandpass(x, 200, 2, 30, threads=2)
    assert out.shape == x.shape
    assert max_rel(out, ss.sosfiltfilt(sos_bp(200, 2, 30), x, axis=-1)) <= 1e-6
    one = S.bandpass(x[1, 2, 4, 6], 200, 2, 30)
    np.testing.assert_allclose(out[1, 2, 4, 6], one, rtol=0, atol=1e-12)


def test_huge_leading_dims_short_rows():
    x = np.random.default_rng(9).standard_normal((16, 64, 64, 30)).astype(np.float32)  # 65536 rows of 30
    out = S.bandpass(x, 250, 1, 40)
    assert max_rel(out, ss.sosfiltfilt(sos_bp(250, 1, 40), x, axis=-1)) <= TOL[np.float32]
    pre = S.preprocess(x, 250, fs_out=250, patch=10)
    assert pre.patches.shape == (16, 64, 64, 3, 10) and pre.valid.shape == (16, 64, 64, 3)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_strided_fortran_and_reversed_views(dtype):
    base = np.random.default_rng(5).standard_normal((6, 8, 900)).astype(dtype)
    views = {
        "fortran": np.asfortranarray(base[0]),
        "every-other-row": base[:, ::2, 50:],
        "time-strided": base[1, :, ::3],
        "reversed": base[2, ::-1, ::-1],
        "transposed": np.ascontiguousarray(base[3].T).T,
    }
    for name, v in views.items():
        ref = ss.sosfiltfilt(sos_bp(250, 1, 40), v, axis=-1)
        assert max_rel(S.bandpass(v, 250, 1, 40), ref) <= TOL[dtype], name
        assert max_rel(S.resample(v, 250, 200), ss.resample_poly(v, 4, 5, axis=-1)) <= TOL[dtype], name
        pre = S.preprocess(v, 250, fs_out=200, patch=50)
        full = S.preprocess(np.ascontiguousarray(v), 250, fs_out=200, patch=50)
        np.testing.assert_array_equal(pre.patches, full.patches, err_msg=name)


def test_read_only_memmap_and_big_endian_input(tmp_path):
    x = np.random.default_rng(10).standard_normal((3, 1000))
    ref = ss.sosfiltfilt(sos_bp(500, 1, 40), x, axis=-1)
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert max_rel(S.bandpass(mm, 500, 1, 40), ref) <= 1e-6
    big = x.astype(">f8")
    out = S.bandpass(big, 500, 1, 40)
    assert out.dtype == np.float64 and max_rel(out, ref) <= 1e-6
    assert S.preprocess(x.astype(">f4"), 500).patches.dtype == np.float32


def test_up_equals_down_is_a_copy():
    x = np.random.default_rng(6).standard_normal((3, 500))
    for fs_in, fs_out in [(200, 200), (250.0, 250)]:
        out = S.resample(x, fs_in, fs_out)
        np.testing.assert_array_equal(out, ss.resample_poly(x, 1, 1, axis=-1))
        assert not np.shares_memory(out, x)
    # fs == fs_out in preprocess skips resampling: equals the filters alone
    pre = S.preprocess(x, 200, notch=50, scale=1.0)
    ref = ss.filtfilt(*ss.iirnotch(50, 30, fs=200), ss.sosfiltfilt(sos_bp(200), x, axis=-1), axis=-1)
    assert max_rel(pre.patches.reshape(3, -1), ref[:, :400]) <= 1e-6  # 2 whole patches of 200


def test_threads_do_not_change_results():
    x = np.random.default_rng(7).standard_normal((13, 3000)).astype(np.float32)
    a = S.preprocess(x, 500, notch=50, threads=1)
    for t in (2, 3, 0):
        b = S.preprocess(x, 500, notch=50, threads=t)
        np.testing.assert_array_equal(a.patches, b.patches)
        np.testing.assert_array_equal(a.valid, b.valid)


# ------------------------------------------------------------------------------------------ properties
_PROP = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_PROP
@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    t_extra=st.integers(1, 700),
    fs=st.sampled_from([128.0, 200.0, 250.0, 256.0, 360.0, 500.0, 1000.0]),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**16),
)
def test_property_bandpass_matches_scipy(lead, t_extra, fs, dtype, seed):
    x = np.random.default_rng(seed).standard_normal((*lead, 27 + t_extra)).astype(dtype)
    ref = ss.sosfiltfilt(sos_bp(fs, 0.5, min(45.0, fs / 2 - 1)), x, axis=-1)
    assert max_rel(S.bandpass(x, fs, 0.5, min(45.0, fs / 2 - 1)), ref) <= TOL[dtype]


@_PROP
@given(
    lead=st.lists(st.integers(1, 5), min_size=0, max_size=2),
    t=st.integers(1, 900),
    fs_in=st.sampled_from([100, 128, 200, 250, 256, 257, 360, 500, 512, 1000]),
    fs_out=st.sampled_from([100, 200, 250, 256]),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**16),
)
def test_property_resample_matches_scipy(lead, t, fs_in, fs_out, dtype, seed):
    x = np.random.default_rng(seed).standard_normal((*lead, t)).astype(dtype)
    up, down = S.resample_ratio(fs_in, fs_out)
    assert up / down == pytest.approx(fs_out / fs_in) and np.gcd(up, down) == 1
    ref = ss.resample_poly(x, up, down, axis=-1)
    out = S.resample(x, fs_in, fs_out)
    assert out.dtype == dtype
    assert max_rel(out, ref) <= TOL[dtype]


def test_concurrent_python_threads_get_their_own_results():
    # the GIL is released inside: calls from several Python threads run together and must not mix state
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(8)
    xs = [rng.standard_normal((5, 2000)) * (i + 1) for i in range(6)]
    expected = [S.preprocess(x, 500, notch=50, threads=1).patches for x in xs]
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda x: S.preprocess(x, 500, notch=50, threads=2).patches, xs))
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(e, g)


@_PROP
@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    seconds=st.floats(1.0, 4.0),
    fs=st.sampled_from([128.0, 200.0, 250.0, 256.0, 360.0, 500.0, 512.0]),
    notch=st.sampled_from([None, 50.0, 60.0]),
    patch=st.sampled_from([50, 100, 200]),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**16),
)
def test_property_preprocess_matches_scipy_chain(lead, seconds, fs, notch, patch, dtype, seed):
    x = (np.random.default_rng(seed).standard_normal((*lead, int(seconds * fs))).cumsum(-1) * 30).astype(dtype)
    y = ss.sosfiltfilt(sos_bp(fs), x, axis=-1)
    if notch is not None:
        y = ss.filtfilt(*ss.iirnotch(notch, 30.0, fs=fs), y, axis=-1)
    y = ss.resample_poly(y, *S.resample_ratio(fs, 200), axis=-1) * 0.01
    n = y.shape[-1] // patch
    out = S.preprocess(x, fs, notch=notch, patch=patch)
    assert out.patches.shape == (*lead, n, patch) and out.valid.shape == (*lead, n)
    assert max_rel(out.patches, y[..., : n * patch].reshape(*lead, n, patch)) <= TOL[dtype]
    assert out.valid.all()


def test_baseline_simd_path_matches_scipy(tmp_path):
    # the AVX2+FMA kernels run here when the CPU has them; the baseline build is what other CPUs get
    import os
    import subprocess
    import sys

    code = (
        "import numpy as np, scipy.signal as ss\n"
        "from cbramod_fast import signal as S, _ext\n"
        "assert _ext.simd_path() == 'baseline', _ext.simd_path()\n"
        "x = np.random.default_rng(0).standard_normal((5, 3000)).cumsum(-1)\n"
        "ref = ss.resample_poly(ss.filtfilt(*ss.iirnotch(50, 30, fs=500), ss.sosfiltfilt("
        "ss.butter(4, [0.5, 45], 'bandpass', fs=500, output='sos'), x)), 2, 5, axis=-1)\n"
        "out = S.preprocess(x, 500, notch=50, scale=1.0).patches.reshape(5, -1)\n"
        "err = np.abs(out - ref[:, :1200]).max() / np.abs(ref).max()\n"
        "assert err < 1e-6, err\n"
        "print('ok', err)\n"
    )
    env = {**os.environ, "CBRAMOD_FAST_SIMD": "baseline"}
    # cwd outside the checkout: `-c` puts the cwd first on sys.path, and the source tree has no built _ext
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         check=False, cwd=tmp_path)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]


def test_default_threads_follow_the_affinity_mask():
    import os

    from cbramod_fast import _ext

    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert _ext.default_threads() == expected
