"""The subject-independent protocol: folds, no test subject in any fitted statistic, heart rate, the
hand-crafted baseline, metrics and trial aggregation."""

from __future__ import annotations

import functools
import operator

import numpy as np
import pytest
import torch
from fusion_data import WEIGHTS, clean_ecg, write_dreamer

from cbramod_fast import CBraMod
from cbramod_fast.fusion import datasets as ds
from cbramod_fast.fusion.model import FitConfig, FusionModel
from cbramod_fast.fusion.protocol import (
    BASELINE_CS,
    EvalConfig,
    baseline_classifier,
    binary_metrics,
    cached_embeddings,
    heart_rate,
    run_fold,
    subject_folds,
    summarise,
    trial_mean,
)


def test_no_test_subject_reaches_training_or_normalisation(tmp_path):
    trials = ds.load_dreamer(write_dreamer(tmp_path / "d.mat", n_subj=3, n_vid=4, secs=10))
    w = ds.make_windows(trials, 10, progress=False)
    y = ds.binarise(w.labels["arousal"], 3.0)[:, None]
    enc = {m: CBraMod.from_pretrained(WEIGHTS) for m in ("eeg", "ecg")}
    embs = cached_embeddings(FusionModel(enc["eeg"], enc["ecg"]), w, progress=False)
    # Poison the test subject's embeddings: if any statistic saw them, the model's means would move.
    for test in subject_folds(w.subject):
        poisoned = {m: e.clone() for m, e in embs.items()}
        sel = torch.from_numpy(np.isin(w.subject, test))
        for e in poisoned.values():
            e[sel] = 1e6
        fold = run_fold(enc, poisoned, np.zeros((len(y), 3)), y, w, test, EvalConfig(fit=FitConfig(epochs=2)))
        assert not set(w.subject[fold.train_index]) & set(test)
        for name, model in fold.models.items():
            for i, m in enumerate(model.cfg.use):
                expected = embs[m][fold.train_index].mean(0)
                assert torch.allclose(model.emb_mean[i], expected, atol=1e-4), (name, m)
        assert all(np.isfinite(p).all() for p in fold.probs.values())


def test_subject_folds():
    subj = np.array(["a", "a", "b", "c", "c", "d"])
    assert subject_folds(subj) == [["a"], ["b"], ["c"], ["d"]]
    k = subject_folds(subj, "kfold", k=2, seed=1)
    assert sorted(functools.reduce(operator.iadd, k, [])) == ["a", "b", "c", "d"] and len(k) == 2
    with pytest.raises(ValueError, match=">= 2 subjects"):
        subject_folds(np.array(["a", "a"]))


@pytest.mark.parametrize("bpm", [55, 75, 120])
@pytest.mark.parametrize("inverted", [False, True])
def test_heart_rate(bpm, inverted):
    x = clean_ecg(200, 10, bpm, np.random.default_rng(bpm))
    x = -x if inverted else x
    assert heart_rate(x.reshape(1, 10, 200)) == pytest.approx(bpm, abs=2)
    assert np.isnan(heart_rate(np.zeros((1, 10, 200))))


def test_baseline_chooses_regularisation_on_training_subjects_only():
    rng = np.random.default_rng(0)
    subj = np.repeat(np.arange(6), 20).astype(str)
    y = np.tile(np.arange(20) % 2, 6)
    x = np.c_[y + 0.5 * rng.standard_normal(len(y)), rng.standard_normal((len(y), 30))]
    clf = baseline_classifier(x, y, subj)
    assert clf.chosen_c in BASELINE_CS
    assert binary_metrics(y, clf.predict_proba(x)[:, 1])["auc"] > 0.9
    one = baseline_classifier(x, y, np.zeros(len(y), dtype=str))  # one subject: no inner split
    assert one.chosen_c == 0.1


def test_trial_aggregation_metrics_and_binarise():
    ids, p = trial_mean(np.array([0.2, 0.4, 0.9, 0.7]), np.array([3, 3, 5, 5]))
    assert ids.tolist() == [3, 5] and np.allclose(p, [0.3, 0.8])
    m = binary_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.7, 0.9]))
    assert m == {"auc": 1.0, "f1": pytest.approx(0.8), "accuracy": 0.75, "balanced_accuracy": 0.75}
    assert np.isnan(binary_metrics(np.array([1, 1]), np.array([0.2, 0.9]))["auc"])
    s = summarise([{"auc": 0.6, "f1": 0, "accuracy": 1, "balanced_accuracy": 1},
                   {"auc": float("nan"), "f1": 1, "accuracy": 0, "balanced_accuracy": 0}], m)
    assert s["auc"] == {"mean": 0.6, "std": 0.0, "n_folds": 1, "pooled": 1.0} and s["f1"]["mean"] == 0.5
    assert ds.binarise(np.array([1, 3, 3.5, 5]), 3.0).tolist() == [0, 0, 1, 1]
    assert ds.binarise(np.array([0.0, 1.0]), None).tolist() == [0, 1]
