"""The hand-crafted baseline: heart rate, per-window features with gaps left open, imputation and every other
statistic fitted on the training windows only, the regularisation chosen by an inner subject split, and the
fitted state written as plain numbers that predict exactly as the fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fusion_data import clean_ecg
from sklearn.linear_model import LogisticRegression

from cbramod_fast.fusion.baseline import (
    BASELINE_CS,
    DEFAULT_C,
    FALLBACK_HR,
    Baseline,
    fit_baseline,
    heart_rate,
)
from cbramod_fast.fusion.protocol import binary_metrics


@pytest.mark.parametrize("bpm", [55, 75, 120])
@pytest.mark.parametrize("inverted", [False, True])
def test_heart_rate(bpm, inverted):
    x = clean_ecg(200, 10, bpm, np.random.default_rng(bpm))
    x = -x if inverted else x
    assert heart_rate(x.reshape(1, 10, 200)) == pytest.approx(bpm, abs=2)
    assert np.isnan(heart_rate(np.zeros((1, 10, 200))))


def _planted(seed=0, n_subj=6):
    rng = np.random.default_rng(seed)
    subj = np.repeat(np.arange(n_subj), 20).astype(str)
    y = np.tile(np.arange(20) % 2, n_subj)
    x = np.c_[y + 0.5 * rng.standard_normal(len(y)), rng.standard_normal((len(y), 5)), 70 + 20 * y + rng.normal(0, 3, len(y))]
    return x, y, subj


def test_baseline_chooses_regularisation_on_training_subjects_only():
    x, y, subj = _planted()
    clf = fit_baseline(x, y, subj)
    assert clf.C in BASELINE_CS and set(clf.grid) == {f"C={c:g}" for c in BASELINE_CS}
    assert clf.inner_auc > 0.9 and binary_metrics(y, clf.predict_proba(x))["auc"] > 0.9
    one = fit_baseline(x, y, np.zeros(len(y), dtype=str))  # one subject: no inner split
    assert one.C == DEFAULT_C and one.inner_auc is None


def test_missing_heart_rates_are_imputed_from_training_windows_only():
    x, y, subj = _planted()
    x[::7, -1] = np.nan
    clf = fit_baseline(x, y, subj)
    assert clf.impute[-1] == pytest.approx(np.nanmedian(x[:, -1]))
    # the value that fills a test window's gap is the training median, whatever the test windows hold
    test = x[:10].copy()
    test[:, -1] = np.nan
    filled = test.copy()
    filled[:, -1] = clf.impute[-1]
    assert np.allclose(clf.decision_function(test), clf.decision_function(filled))
    x[:, -1] = np.nan  # no heart rate anywhere in training: a fixed value, not a statistic of other windows
    assert fit_baseline(x, y, subj).impute[-1] == FALLBACK_HR


def test_saved_state_predicts_as_the_fit():
    x, y, subj = _planted(seed=1)
    clf = fit_baseline(x, y, subj)
    back = Baseline.from_dict(json.loads(json.dumps(clf.to_dict())))
    assert back == clf
    # the same numbers as scikit-learn's own standardise + logistic regression pipeline
    mean, scale = x.mean(0), x.std(0)
    ref = LogisticRegression(max_iter=2000, C=clf.C, class_weight="balanced").fit((x - mean) / scale, y)
    assert np.allclose(back.predict_proba(x), ref.predict_proba((x - mean) / scale)[:, 1], atol=1e-6)
    const = Baseline.constant(0.25, x.shape[1])
    assert np.allclose(const.predict_proba(x), 0.25)
