"""In-memory windows of shipped recordings: lead layout, rejection, lead names in any spelling."""

from __future__ import annotations

import numpy as np
import pytest

from cbramod_fast.corpus.windows import read_windows
from cbramod_fast.pretrain import DEMO_DATA
from cbramod_fast.readers import STANDARD_LEADS, records_in


def test_demo_windows_lead_layout():
    w = read_windows(records_in(DEMO_DATA))
    assert w.x.shape[1:] == (12, 10, 200) and w.x.dtype == np.float32
    mit = np.asarray([r == "100" for r in w.record])
    # MIT-BIH 100 has MLII (-> II) and V5 only; the CinC records have all 12 leads.
    expected = np.isin(STANDARD_LEADS, ["II", "V5"])
    assert (w.present[mit] == expected).all() and w.present[~mit].all()
    assert (w.x[mit][:, ~expected] == 0).all()
    assert np.abs(w.x).max() <= 80.0 and np.isfinite(w.x).all()


def test_lead_names_case_insensitive(tmp_path):
    wfdb = pytest.importorskip("wfdb")  # writes the test record
    sig = np.random.default_rng(0).normal(size=(2400, 2)) * 0.2
    wfdb.wrsamp("rec", fs=200, units=["mV", "mV"], sig_name=["ii", "v5"], p_signal=sig, fmt=["16", "16"],
                write_dir=str(tmp_path))
    w = read_windows([tmp_path / "rec"], leads=("I", "II", "V5"))
    assert w.present[0].tolist() == [False, True, True]  # PTB spells leads "ii", "v5"
