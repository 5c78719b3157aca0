"""cbramod_fast.signal on real recordings vs scipy, and preprocess's per-patch flags.

The shipped snippets (tests/data/signal, no ../shared needed) are a 12-lead 500 Hz CinC 2021 record, 20 s of
MIT-BIH 100 at 360 Hz and 4 s of eegmat EEG (19 channels, 500 Hz). Tests marked `shared` read full records
from ../shared/data. Tolerance: max |ours - scipy| / max |scipy| ≤ 1e-6 (float64), ≤ 1e-4 (float32).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal as ss

from cbramod_fast import signal as S

TOL = {np.float64: 1e-6, np.float32: 1e-4}


def max_rel(ours, ref) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    diff = np.abs(ours.astype(np.float64) - ref)
    return float(diff.max() / np.abs(ref).max())


def scipy_chain(x, fs, band=(0.5, 45.0), notch=None, fs_out=200, scale=0.01, patch=200):
    """The scipy equivalent of S.preprocess's patches."""
    y = ss.sosfiltfilt(ss.butter(4, list(band), "bandpass", fs=fs, output="sos"), x, axis=-1)
    if notch is not None:
        y = ss.filtfilt(*ss.iirnotch(notch, 30.0, fs=fs), y, axis=-1)
    up, down = S.resample_ratio(fs, fs_out)
    if (up, down) != (1, 1):
        y = ss.resample_poly(y, up, down, axis=-1)
    n = y.shape[-1] // patch
    return (y * scale)[..., : n * patch].reshape(*y.shape[:-1], n, patch)


@pytest.fixture(scope="module")
def snippets(repo_data):
    z = np.load(repo_data / "signal" / "real_snippets.npz")
    cinc = (z["cinc_digital"] - z["cinc_baseline"][:, None]) / z["cinc_gain"][:, None] * 1000.0  # µV
    mitdb = (z["mitdb_digital"] - z["mitdb_baseline"][:, None]) / z["mitdb_gain"][:, None] * 1000.0
    eeg = z["eeg_digital"] * z["eeg_gain"][:, None] + z["eeg_offset"][:, None]  # µV
    return {"cinc": (cinc, float(z["cinc_fs"])), "mitdb": (mitdb, float(z["mitdb_fs"])),
            "eeg": (eeg, float(z["eeg_fs"]))}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", ["cinc", "mitdb", "eeg"])
def test_snippet_stages_match_scipy(snippets, name, dtype):
    x, fs = snippets[name]
    x = x.astype(dtype)
    sos = ss.butter(4, [0.5, 45.0], "bandpass", fs=fs, output="sos")
    assert max_rel(S.bandpass(x, fs, 0.5, 45.0), ss.sosfiltfilt(sos, x, axis=-1)) <= TOL[dtype]
    sos = ss.butter(4, 0.67, "highpass", fs=fs, output="sos")
    assert max_rel(S.highpass(x, fs, 0.67), ss.sosfiltfilt(sos, x, axis=-1)) <= TOL[dtype]
    for freq in (50.0, 60.0):
        ref = ss.filtfilt(*ss.iirnotch(freq, 30.0, fs=fs), x, axis=-1)
        assert max_rel(S.notch(x, fs, freq), ref) <= TOL[dtype]
    for fs_out in (200, 256, 128):
        up, down = S.resample_ratio(fs, fs_out)
        assert max_rel(S.resample(x, fs, fs_out), ss.resample_poly(x, up, down, axis=-1)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name, notch", [("cinc", 50.0), ("mitdb", 60.0), ("eeg", 50.0), ("cinc", None)])
def test_snippet_preprocess_matches_scipy_chain(snippets, name, notch, dtype):
    x, fs = snippets[name]
    x = x.astype(dtype)
    out = S.preprocess(x, fs, notch=notch, max_abs=5000.0)
    ref = scipy_chain(x, fs, notch=notch)
    assert max_rel(out.patches, ref) <= TOL[dtype]
    # clean real recordings: nothing flagged
    assert out.valid.all(), np.argwhere(~out.valid)


# --------------------------------------------------------------------------------------------- flags
def test_nonfinite_samples_are_flagged_and_zeroed(snippets):
    x, fs = snippets["cinc"]
    bad = x.copy()
    hits = [(0, 10), (3, 1234), (3, 1499), (7, 4999), (11, 2500)]  # (lead, sample); 500 Hz -> patch = s // 500
    for i, (lead, s) in enumerate(hits):
        bad[lead, s] = [np.nan, np.inf, -np.inf, np.nan, np.inf][i]
    out = S.preprocess(bad, fs, notch=50.0)
    expected = np.zeros(out.valid.shape, bool)
    for lead, s in hits:
        expected[lead, s // 500] = True
    np.testing.assert_array_equal(out.nonfinite, expected)
    assert np.isfinite(out.patches).all()
    # documented behaviour: non-finite samples are filtered as zeros
    zeroed = np.where(np.isfinite(bad), bad, 0.0)
    np.testing.assert_array_equal(out.patches, S.preprocess(zeroed, fs, notch=50.0).patches)
    assert not out.valid[expected].any()


def test_nonfinite_patch_mapping_at_360hz(snippets):
    x, fs = snippets["mitdb"]  # 360 -> 200 Hz: up 5, down 9; sample s lands in patch s*5 // (9*200)
    bad = x.copy()
    samples = [0, 359, 360, 719, 720, 3599, 7199]
    bad[1, samples] = np.nan
    out = S.preprocess(bad, fs)
    expected = np.zeros(out.valid.shape, bool)
    expected[1, [s * 5 // 1800 for s in samples]] = True
    np.testing.assert_array_equal(out.nonfinite, expected)


def test_all_nan_row_does_not_crash(snippets):
    x, fs = snippets["eeg"]
    bad = x.copy()
    bad[4] = np.nan
    out = S.preprocess(bad, fs)
    assert out.nonfinite[4].all() and out.flat[4].all() and not out.nonfinite[[0, 5]].any()
    assert np.isfinite(out.patches).all()


def test_flat_leads(snippets):
    x, fs = snippets["cinc"]
    y = x.copy()
    y[2] = 0.0  # a zeroed lead
    y[5] = 1234.5  # a constant lead with an offset: the band-pass removes it
    y[8, 1000:1600] = y[8, 1000]  # 1.2 s held: patch 2 (samples 1000-1499) is flat, patch 3 only in part
    out = S.preprocess(y, fs, flat_ptp=1e-3)
    assert out.flat[2].all() and out.flat[5].all()
    assert not out.clipped[[2, 5]].any()  # constant rows are flat, not clipped
    others = np.delete(np.arange(12), [2, 5, 8])
    assert not out.flat[others].any()
    # the held stretch: the filter's ringing from the edges keeps a zero-phase output from being exactly flat
    assert not out.flat[8, [0, 1, 4, 5, 6, 7, 8, 9]].any()


def _rail_runs(row: np.ndarray, run: int) -> np.ndarray:
    """Independent numpy version of the clipping rule: samples in runs of >= run equal to the row's max/min."""
    hit = np.zeros(row.size, bool)
    for rail in (row.max(), row.min()):
        at = np.concatenate([[0], (row == rail).astype(np.int8), [0]])
        d = np.diff(at)
        for a, b in zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)):
            if b - a >= run:
                hit[a:b] = True
    return hit


def test_clipped_patches_follow_the_rule(snippets):
    x, fs = snippets["cinc"]
    y = x.copy()
    cap = np.quantile(y[1], 0.95)
    y[1] = np.minimum(y[1], cap)  # a saturating amplifier: the R peaks hit the rail
    y[4, 3200:3205] = y[4].max()  # 5 samples at the max: below the 10-sample (20 ms) run
    out = S.preprocess(y, fs)
    run = max(2, round(0.02 * fs))
    for lead in (1, 4, 0):
        samples = np.flatnonzero(_rail_runs(y[lead], run))
        expected = np.zeros(out.valid.shape[1], bool)
        expected[samples // 500] = True
        np.testing.assert_array_equal(out.clipped[lead], expected, err_msg=f"lead {lead}")
    assert out.clipped[1].any() and not out.clipped[4].any()


def test_over_amplitude_uses_filtered_signal_in_input_units(snippets):
    x, fs = snippets["cinc"]
    ref = scipy_chain(x, fs, notch=50.0, scale=1.0)  # µV, filtered and resampled
    limit = float(np.quantile(np.abs(ref).max(-1), 0.5))
    out = S.preprocess(x, fs, notch=50.0, max_abs=limit, scale=0.01)
    expected = np.abs(ref).max(-1) > limit
    assert 0 < expected.sum() < expected.size
    np.testing.assert_array_equal(out.over_amplitude, expected)
    assert not S.preprocess(x, fs, notch=50.0).over_amplitude.any()  # max_abs=None: never
    np.testing.assert_array_equal(out.valid, ~(out.flat | out.clipped | out.over_amplitude | out.nonfinite))


def test_preprocess_leading_dims(snippets):
    x, fs = snippets["cinc"]
    batch = np.stack([x, x[::-1]]).reshape(2, 3, 4, -1).astype(np.float32)
    out = S.preprocess(batch, fs, notch=50.0)
    assert out.patches.shape == (2, 3, 4, 10, 200) and out.valid.shape == (2, 3, 4, 10)
    flat = S.preprocess(batch.reshape(24, -1), fs, notch=50.0)
    np.testing.assert_array_equal(out.patches.reshape(24, 10, 200), flat.patches)


# ------------------------------------------------------------------------------------ full records (shared)
def _wfdb_uv(path):
    import wfdb

    rec = wfdb.rdrecord(str(path))
    scale = np.array([1000.0 if u.lower() == "mv" else 1.0 for u in rec.units])
    return rec.p_signal.T * scale[:, None], float(rec.fs)


@pytest.mark.shared
@pytest.mark.parametrize("record, fs_expected", [
    ("ecg_mitdb_100/100", 360.0), ("ecg_cinc2021/E07501", 500.0), ("ecg_cinc2021/JS20001", 500.0),
    ("ecg_ptbdb_s0010_re/s0010_re", 1000.0), ("ecg_macecgdb_test01_00s/test01_00s", 500.0),
])
def test_shared_ecg_matches_scipy(shared_dir, record, fs_expected):
    x, fs = _wfdb_uv(shared_dir / "data" / record)
    assert fs == fs_expected
    x = x[:, : int(120 * fs)]  # at most 2 minutes: keeps the test short
    for dtype in (np.float64, np.float32):
        xd = x.astype(dtype)
        sos = ss.butter(4, [0.5, 45.0], "bandpass", fs=fs, output="sos")
        assert max_rel(S.bandpass(xd, fs, 0.5, 45.0), ss.sosfiltfilt(sos, xd, axis=-1)) <= TOL[dtype]
        ref = ss.filtfilt(*ss.iirnotch(60.0, 30.0, fs=fs), xd, axis=-1)
        assert max_rel(S.notch(xd, fs, 60.0), ref) <= TOL[dtype]
        up, down = S.resample_ratio(fs, 200)
        assert max_rel(S.resample(xd, fs, 200), ss.resample_poly(xd, up, down, axis=-1)) <= TOL[dtype]
        out = S.preprocess(xd, fs, notch=50.0)
        assert max_rel(out.patches, scipy_chain(xd, fs, notch=50.0)) <= TOL[dtype]


@pytest.mark.shared
def test_shared_ecg_flags(shared_dir):
    x, fs = _wfdb_uv(shared_dir / "data" / "ecg_cinc2021" / "JS20004")  # leads 8, 10, 12 are all zeros
    out = S.preprocess(x, fs, notch=50.0)
    np.testing.assert_array_equal(np.flatnonzero(out.flat.any(-1)), np.flatnonzero(np.ptp(x, axis=1) == 0))
    x, fs = _wfdb_uv(shared_dir / "data" / "ecg_cpsc2021" / "data_8_3")  # lead II saturates at +10.2 mV
    out = S.preprocess(x, fs)
    run = max(2, round(0.02 * fs))
    for lead in range(x.shape[0]):
        expected = np.zeros(out.valid.shape[1], bool)
        s = np.flatnonzero(_rail_runs(x[lead], run))
        expected[s[s < out.valid.shape[1] * 200] // 200] = True
        np.testing.assert_array_equal(out.clipped[lead], expected)
    assert out.clipped[1].sum() >= 1


@pytest.mark.shared
@pytest.mark.parametrize("subject", ["Subject00_1", "Subject05_2"])
def test_shared_eeg_edf_matches_scipy(shared_dir, subject):
    import pyedflib

    with pyedflib.EdfReader(str(shared_dir / "data" / "eeg_ecg_eegmat" / f"{subject}.edf")) as edf:
        idx = [i for i, lab in enumerate(edf.getSignalLabels()) if lab.startswith("EEG ")][:19]
        fs = edf.getSampleFrequency(idx[0])
        x = np.stack([edf.readSignal(i, 0, int(60 * fs)) for i in idx])
    assert x.shape == (19, int(60 * fs))
    for fs_out in (200, 256):
        up, down = S.resample_ratio(fs, fs_out)
        assert max_rel(S.resample(x, fs, fs_out), ss.resample_poly(x, up, down, axis=-1)) <= 1e-6
    out = S.preprocess(x.astype(np.float32), fs, notch=50.0, max_abs=500.0)
    assert max_rel(out.patches, scipy_chain(x.astype(np.float32), fs, notch=50.0)) <= 1e-4
    assert out.valid.mean() > 0.95
