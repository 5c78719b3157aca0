"""The hand-crafted baseline the learned models are measured against: log EEG band powers and the ECG heart
rate per window, then median imputation, standardisation and class-balanced logistic regression, all fitted
on the training subjects of a fold, with the regularisation chosen by an inner split of those subjects.

Features are computed per window and leave gaps as NaN (a window without two detectable R peaks has no
heart rate): what fills them is a fitted statistic like any other. The fitted state is plain numbers
(:class:`Baseline`), written to each fold's ``baseline.json`` and read back by :meth:`Baseline.from_dict`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from sklearn.linear_model import LogisticRegression

from .datasets import TrialWindows
from .model import rate_logit
from .select import inner_splits, subject_auc

EEG_BANDS = {"delta": (1, 4), "theta": (4, 8), "alpha": (8, 13), "beta": (13, 30), "gamma": (30, 45)}
BASELINE_CS = (0.001, 0.01, 0.1, 1.0)
DEFAULT_C = 0.1  # too few training subjects for an inner split
FALLBACK_HR = 70.0  # bpm: the imputation value when no training window has a heart rate


def heart_rate(ecg: np.ndarray, fs: float = 200.0) -> float:
    """Beats per minute of one window ``(L, N, 200)`` from R peaks of the lead with the largest spread."""
    from scipy.signal import find_peaks

    sig = ecg.reshape(ecg.shape[0], -1)
    lead = sig[np.argmax(sig.std(axis=1))]
    lead = lead - np.median(lead)
    if np.abs(lead.min()) > np.abs(lead.max()):  # inverted QRS
        lead = -lead
    peaks, _ = find_peaks(lead, distance=int(0.33 * fs), height=0.5 * np.percentile(lead, 99))
    if len(peaks) < 2:
        return float("nan")
    return 60.0 * fs / float(np.median(np.diff(peaks)))


def feature_names(n_channels: int) -> list[str]:
    return ([f"ch{c}_{b}" for b in EEG_BANDS for c in range(n_channels)] + [f"mean_{b}" for b in EEG_BANDS]
            + ["heart_rate"])


def handcrafted_features(w: TrialWindows, fs: float = 200.0) -> np.ndarray:
    """Per window: log EEG band powers (per channel, then channel-averaged per band) and the ECG heart rate,
    NaN where no heart rate was found (imputed inside each fold, from its training windows)."""
    from scipy.signal import welch

    eeg = w.eeg.reshape(w.eeg.shape[0], w.eeg.shape[1], -1)
    f, pxx = welch(eeg, fs=fs, nperseg=int(2 * fs), axis=-1)
    bands = [np.log(pxx[..., (f >= lo) & (f < hi)].mean(-1) + 1e-12) for lo, hi in EEG_BANDS.values()]
    hr = np.array([heart_rate(e, fs) for e in w.ecg])
    return np.concatenate([np.concatenate(bands, axis=1), np.stack([b.mean(1) for b in bands], 1), hr[:, None]],
                          axis=1)


@dataclass
class Baseline:
    """One target's fitted baseline: ``p = sigmoid(((impute(x) - mean) / scale) @ coef + intercept)``."""

    C: float
    impute: list[float]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    inner_auc: float | None = None
    grid: dict[str, float] = field(default_factory=dict)

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        x = np.where(np.isnan(x), np.asarray(self.impute), x)
        return ((x - np.asarray(self.mean)) / np.asarray(self.scale)) @ np.asarray(self.coef) + self.intercept

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.decision_function(x)))

    @classmethod
    def constant(cls, p: float, n_features: int) -> Baseline:
        """A target with one class among the training windows: its training rate, whatever the features."""
        zeros = [0.0] * n_features
        return cls(C=float("nan"), impute=zeros, mean=zeros, scale=[1.0] * n_features, coef=zeros,
                   intercept=rate_logit(p))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Baseline:
        return cls(**d)


def _fit_one(x: np.ndarray, y: np.ndarray, c: float) -> Baseline:
    """Impute (training medians), standardise, class-balanced logistic regression: every statistic from ``x``."""
    finite = np.isfinite(x)
    impute = np.array([np.median(x[finite[:, j], j]) if finite[:, j].any() else
                       (FALLBACK_HR if j == x.shape[1] - 1 else 0.0) for j in range(x.shape[1])])
    xi = np.where(finite, x, impute)
    mean, scale = xi.mean(0), xi.std(0)
    scale = np.where(scale > 0, scale, 1.0)  # a constant feature (StandardScaler's convention)
    clf = LogisticRegression(max_iter=2000, C=c, class_weight="balanced").fit((xi - mean) / scale, y)
    return Baseline(C=c, impute=impute.tolist(), mean=mean.tolist(), scale=scale.tolist(),
                    coef=clf.coef_[0].tolist(), intercept=float(clf.intercept_[0]))


def fit_baseline(x: np.ndarray, y: np.ndarray, subjects: np.ndarray, inner_k: int = 4) -> Baseline:
    """The baseline of one target from training windows only; C from ``BASELINE_CS`` by the best
    out-of-fold ``subject_auc`` over an inner split of the training subjects (``DEFAULT_C`` without one)."""
    splits = inner_splits(subjects, inner_k)
    if not splits or any(len(np.unique(y[tr])) < 2 for tr, _ in splits):
        return _fit_one(x, y, DEFAULT_C)
    scores = []
    for c in BASELINE_CS:
        oof = np.empty(len(y))
        for tr, va in splits:
            oof[va] = _fit_one(x[tr], y[tr], c).decision_function(x[va])
        scores.append(subject_auc(y, oof, subjects))
    best = int(np.nanargmax(scores)) if np.isfinite(scores).any() else BASELINE_CS.index(DEFAULT_C)
    fitted = _fit_one(x, y, BASELINE_CS[best])
    fitted.inner_auc = scores[best]
    fitted.grid = {f"C={c:g}": s for c, s in zip(BASELINE_CS, scores)}
    return fitted
