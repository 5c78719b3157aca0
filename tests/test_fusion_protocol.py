"""The subject-independent protocol: folds, no test subject in any fitted object, shuffled labels at chance
over seeds, metrics and trial aggregation."""

from __future__ import annotations

import functools
import operator

import numpy as np
import pytest
import torch
from fusion_data import WEIGHTS, same, write_dreamer

from cbramod_fast import CBraMod
from cbramod_fast.fusion import datasets as ds
from cbramod_fast.fusion.baseline import handcrafted_features
from cbramod_fast.fusion.model import FusionModel
from cbramod_fast.fusion.protocol import (
    MODELS,
    EvalConfig,
    binary_metrics,
    cached_embeddings,
    evaluate,
    run_fold,
    subject_folds,
    summarise,
    trial_mean,
)
from cbramod_fast.fusion.select import SelectConfig


def _planted_windows(tmp_path, **kw):
    trials = ds.load_dreamer(write_dreamer(tmp_path / "d.mat", **kw))
    w = ds.make_windows(trials, 10, progress=False)
    return w, ds.binarise(w.labels["arousal"], 3.0)[:, None]


QUICK_CFG = EvalConfig(select=SelectConfig(cs=(0.01, 1.0), weight_decays=(0.01,), epochs=(10, 30), inner_k=3))


def _fitted_state(fold) -> dict:
    return {**{n: m.state_dict() for n, m in fold.models.items() if n in MODELS},
            "baseline": [b.to_dict() for b in fold.baselines], "choices": fold.choices}


def test_poisoned_test_subjects_reach_no_fitted_object(tmp_path):
    w, y = _planted_windows(tmp_path, n_subj=4, n_vid=4, secs=10)
    enc = {m: CBraMod.from_pretrained(WEIGHTS) for m in ("eeg", "ecg")}
    embs = cached_embeddings(FusionModel(enc["eeg"], enc["ecg"]), w, progress=False)
    feats = handcrafted_features(w)
    for test in subject_folds(w.subject)[:2]:
        clean = run_fold(enc, embs, feats, y, w, test, QUICK_CFG)
        # Poison the test subject's embeddings and features (NaN heart rates included): any statistic, choice
        # or weight that saw them would move.
        sel = np.isin(w.subject, test)
        poisoned = {m: e.clone() for m, e in embs.items()}
        for e in poisoned.values():
            e[torch.from_numpy(sel)] = 1e6
        bad = feats.copy()
        bad[sel] = 1e6
        bad[sel, -1] = np.nan
        fold = run_fold(enc, poisoned, bad, y, w, test, QUICK_CFG)
        assert not set(w.subject[fold.train_index]) & set(test)
        assert same(_fitted_state(fold), _fitted_state(clean)), test
        assert all(np.isfinite(p).all() for p in fold.probs.values())


def test_shuffled_labels_stay_at_chance_over_seeds(tmp_path):
    # Labels drawn independently of the planted state: whatever the models find in the signals cannot predict
    # them. 8 seeds x 108 trials of one window: the mean pooled AUC of a leak-free pipeline has a standard
    # deviation of about 0.02 around 0.5.
    enc = {m: CBraMod.from_pretrained(WEIGHTS) for m in ("eeg", "ecg")}
    pooled = {}
    for seed in range(8):
        w, y = _planted_windows(tmp_path, n_subj=6, n_vid=18, secs=10, shuffle=True, seed=seed)
        res, _ = evaluate(w, y, ["arousal"], enc, QUICK_CFG, progress=False)
        for model in ("fusion", "eeg", "ecg", "baseline"):
            pooled.setdefault(model, []).append(res[model]["arousal"]["auc"]["pooled"])
    for model, vals in pooled.items():
        assert abs(np.mean(vals) - 0.5) <= 0.05, (model, np.round(vals, 3))


def test_subject_folds():
    subj = np.array(["a", "a", "b", "c", "c", "d"])
    assert subject_folds(subj) == [["a"], ["b"], ["c"], ["d"]]
    k = subject_folds(subj, "kfold", k=2, seed=1)
    assert sorted(functools.reduce(operator.iadd, k, [])) == ["a", "b", "c", "d"] and len(k) == 2
    with pytest.raises(ValueError, match=">= 2 subjects"):
        subject_folds(np.array(["a", "a"]))


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
