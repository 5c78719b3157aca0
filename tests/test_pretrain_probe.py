"""The linear-probe experiment's pieces: labels from real annotations, group-held-out folds, features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cbramod_fast import CBraMod
from cbramod_fast.pretrain import DEMO_DATA
from cbramod_fast.probe import (
    STANDARD_LEADS,
    encoder_features,
    linear_probe,
    load_cpsc2021,
    load_eegmat_ecg,
    read_wfdb_windows,
    records_in,
    rhythm_intervals,
)


def test_demo_windows_lead_layout():
    w = read_wfdb_windows(records_in(DEMO_DATA))
    assert w.x.shape[1:] == (12, 10, 200) and w.x.dtype == np.float32
    mit = np.asarray([r == "100" for r in w.record])
    # MIT-BIH 100 has MLII (-> II) and V5 only; the CinC records have all 12 leads.
    expected = np.isin(STANDARD_LEADS, ["II", "V5"])
    assert (w.present[mit] == expected).all() and w.present[~mit].all()
    assert (w.x[mit][:, ~expected] == 0).all()
    assert np.abs(w.x).max() <= 80.0 and np.isfinite(w.x).all()


def test_linear_probe_folds_hold_out_groups():
    rng = np.random.default_rng(0)
    groups = np.repeat(["a", "b", "c", "d"], 20)
    y = np.isin(groups, ["a", "b"]).astype(int)  # one class per group: folds are (pos, neg) pairs
    x = rng.normal(size=(80, 5)) + y[:, None]  # separable signal shared by all groups
    r = linear_probe(x, y, groups, "t")
    assert sorted(tuple(f["test_groups"]) for f in r.folds) == [("a", "c"), ("a", "d"), ("b", "c"), ("b", "d")]
    assert r.auc > 0.9
    y2 = np.tile([0, 1], 40)  # both classes in every group: leave-one-group-out
    r2 = linear_probe(rng.normal(size=(80, 5)), y2, groups, "noise")
    assert [f["test_groups"] for f in r2.folds] == [["a"], ["b"], ["c"], ["d"]]
    assert 0.2 < r2.auc < 0.8  # pure noise stays near chance


def test_encoder_features_shape():
    w = read_wfdb_windows([records_in(DEMO_DATA)[0]])
    torch.manual_seed(0)
    f = encoder_features(CBraMod.from_config("tiny"), w.x[:3], w.present[:3])
    # mean and std over patches of the 200 features, for the present leads only (II and V5 of record 100)
    assert int(w.present[0].sum()) == 2 and f.shape == (3, 2 * 2 * 200) and np.isfinite(f).all()


@pytest.mark.shared
def test_cpsc2021_rhythm_labels(shared_dir):
    folder = shared_dir / "data" / "ecg_cpsc2021"
    # the record is AF throughout; its "(N" note sits on the very last sample
    assert rhythm_intervals(folder / "data_8_2") == [(0, 43091, "AFIB"), (43091, 43092, "N")]
    assert rhythm_intervals(folder / "data_21_7")[0][2] == "N"
    w, y, groups = load_cpsc2021(folder)
    assert set(groups[y == 1]) == {"8", "84"} and set(groups[y == 0]) == {"21", "35"}
    assert (w.present[:, :2]).all() and not w.present[:, 2:].any()


@pytest.mark.shared
def test_eegmat_ecg_labels(shared_dir):
    w, y, groups = load_eegmat_ecg(shared_dir / "data" / "eeg_ecg_eegmat")
    assert len(set(groups)) == 12
    for g in set(groups):  # every subject has rest (about 18 windows) and task (6 windows)
        assert (y[groups == g] == 1).sum() == 6 and (y[groups == g] == 0).sum() >= 17
    assert (w.present[:, STANDARD_LEADS.index("II")]).all() and w.present.sum(axis=1).max() == 1
