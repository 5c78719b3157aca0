"""The pretraining probe study (experiments/pretrain_probe.py): labels from real annotations, group-held-out
folds, features."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cbramod_fast import CBraMod
from cbramod_fast.corpus.windows import Windows, read_windows
from cbramod_fast.pretrain import DEMO_DATA
from cbramod_fast.readers import STANDARD_LEADS, records_in

pytest.importorskip("wfdb")  # the study's labels come from WFDB annotations


def _load_study():
    path = Path(__file__).resolve().parents[1] / "experiments" / "pretrain_probe.py"
    spec = importlib.util.spec_from_file_location("pretrain_probe", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


study = _load_study()
ECG_SOURCES, EXPERIMENT_LEADS, TASKS = study.ECG_SOURCES, study.EXPERIMENT_LEADS, study.TASKS
beat_samples, encoder_features, heart_rate_labels = study.beat_samples, study.encoder_features, study.heart_rate_labels
linear_probe, load_cpsc2021, load_eegmat_ecg = study.linear_probe, study.load_cpsc2021, study.load_eegmat_ecg
load_heart_rate, pretraining_corpus, raw_features = study.load_heart_rate, study.pretraining_corpus, study.raw_features
rhythm_intervals, ridge_probe = study.rhythm_intervals, study.ridge_probe


def test_command_line_names_missing_sources(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        study.main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and "ecg_cpsc2021" in capsys.readouterr().err


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
    w = read_windows([records_in(DEMO_DATA)[0]])
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


def test_heart_rate_from_annotated_beats():
    rec = DEMO_DATA / "100"
    beats = beat_samples(rec)
    assert len(beats) == 2239 + 33 + 1  # N, A, V beats; the "+" rhythm note is not a beat
    w = read_windows([rec])
    y = heart_rate_labels([rec], w, {"100": 360.0})
    assert np.isfinite(y).all() and 70 < np.median(y) < 80  # record 100: sinus rhythm ~75 bpm
    # the window starting at 20 s: rate from its first and last annotated beat
    one = Windows(w.x[:1], w.present[:1], ["100"], np.asarray([20.0]))
    inside = beats[(beats >= 20 * 360) & (beats < 30 * 360)]
    expected = 60 * 360 * (len(inside) - 1) / (inside[-1] - inside[0])
    assert heart_rate_labels([rec], one, {"100": 360.0})[0] == pytest.approx(expected)


def test_feature_variants_shapes():
    w = read_windows([records_in(DEMO_DATA)[0]], leads=EXPERIMENT_LEADS)  # record 100: II, V5
    torch.manual_seed(0)
    m = CBraMod.from_config("tiny")
    last = encoder_features(m, w.x[:3], w.present[:3], layers="last")
    every = encoder_features(m, w.x[:3], w.present[:3], layers="all")
    assert last.shape == (3, 2 * 400) and every.shape == (3, 2 * 400 * (1 + m.config.n_layer))
    # "all" holds the last layer's features as its last 400 per lead
    assert np.allclose(every.reshape(3, 2, -1)[:, :, -400:], last.reshape(3, 2, 400), atol=1e-5)
    assert raw_features(w.x[:3], w.present[:3]).shape == (3, 2 * 400)
    with pytest.raises(ValueError, match="layers"):
        encoder_features(m, w.x[:1], w.present[:1], layers="middle")


def test_ridge_probe_leaves_each_group_out():
    rng = np.random.default_rng(0)
    groups = np.repeat(["a", "b", "c", "d"], 30)
    x = rng.normal(size=(120, 6))
    y = 70 + 5 * x[:, 0] + rng.normal(size=120) * 0.5
    r = ridge_probe(x, y, groups, "t")
    assert [f["test_groups"] for f in r.folds] == [["a"], ["b"], ["c"], ["d"]]
    assert r.mae < 0.3 * r.mae_mean_predictor and r.r > 0.95
    noise = ridge_probe(rng.normal(size=(120, 6)), y, groups, "noise")
    assert noise.mae > 0.9 * noise.mae_mean_predictor  # no signal: no better than the training mean


@pytest.mark.shared
def test_heart_rate_task_labels(shared_dir):
    w, y, groups = load_heart_rate(shared_dir / "data", EXPERIMENT_LEADS)
    assert sorted(set(groups)) == ["21", "35", "8", "84", "mitdb100"]
    assert (w.present == (np.asarray(EXPERIMENT_LEADS) == "II")).all()  # lead II only, every window
    assert (w.x[:, [0, 2]] == 0).all()
    assert 40 < y[groups == "35"].mean() < 55 and 70 < y[groups == "mitdb100"].mean() < 80


@pytest.mark.shared
def test_pretraining_corpus_excludes_probe_recordings(shared_dir):
    data = shared_dir / "data"
    for task in TASKS.values():
        w, _, _ = task.load(data)
        corpus, sources = pretraining_corpus(data, task.exclude)
        assert not set(sources) & set(task.exclude) and set(sources) | set(task.exclude) == set(ECG_SOURCES)
        assert not set(w.record) & set(corpus.record)  # no probe recording in pretraining
        assert w.x.shape[1:] == corpus.x.shape[1:] == (len(EXPERIMENT_LEADS), 10, 200)
