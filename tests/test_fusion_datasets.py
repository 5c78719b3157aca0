"""Fusion datasets: the DREAMER .mat structure, bad files, eegmat EDFs."""

from __future__ import annotations

import numpy as np
import pytest
from fusion_data import ELECTRODES, write_dreamer
from scipy.io import savemat

from cbramod_fast.fusion import datasets as ds


def test_dreamer_loader_reads_the_real_structure(tmp_path):
    trials = ds.load_dreamer(write_dreamer(tmp_path / "DREAMER.mat", n_subj=2, n_vid=3, secs=12))
    assert len(trials) == 6 and trials[0].subject == "S01" and trials[-1].trial == "S02_T03"
    t = trials[0]
    assert t.eeg.shape == (14, 128 * 12) and t.ecg.shape == (2, 256 * 12) and t.eeg_fs == 128 and t.ecg_fs == 256
    assert t.eeg_channels == ELECTRODES and set(t.labels) == {"valence", "arousal", "dominance"}
    assert t.eeg_baseline.shape == (14, 128 * 4)


def test_dreamer_loader_bad_files(tmp_path):
    (tmp_path / "junk.mat").write_bytes(b"nope")
    with pytest.raises(ValueError, match="junk.mat"):
        ds.load_dreamer(tmp_path / "junk.mat")
    savemat(str(tmp_path / "other.mat"), {"X": 1.0})
    with pytest.raises(ValueError, match="no top-level 'DREAMER'"):
        ds.load_dreamer(tmp_path / "other.mat")
    with pytest.raises(FileNotFoundError):
        ds.load_dreamer(tmp_path / "missing.mat")


@pytest.mark.shared
def test_eegmat_loader_reads_real_edfs(shared_dir):
    pytest.importorskip("pyedflib")
    trials = ds.load_eegmat(shared_dir / "data" / "eeg_ecg_eegmat")
    assert len(trials) == 24 and {t.labels["task"] for t in trials} == {0.0, 1.0}
    t = trials[0]
    assert t.eeg.shape[0] == 19 and t.ecg.shape[0] == 1 and t.eeg_fs == 500
    assert "Fp1" in t.eeg_channels and np.isfinite(t.eeg).all()
    assert 20 < np.abs(t.ecg).max() < 1e5  # µV after unit conversion from the EDF's mV
