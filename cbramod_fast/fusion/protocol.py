"""Subject-independent evaluation: folds by subject, frozen-encoder fusion vs single modalities vs a
hand-crafted baseline, window- and trial-level metrics.

Leakage rules, enforced here and tested: folds split *subjects*; every statistic a model learns (head
weights, embedding standardisation, the baseline's scaler) is fitted on the training subjects' windows
only; the frozen encoders see each window on its own (CBraMod's GroupNorm spans one sample), so caching
their embeddings once for all folds leaks nothing.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .datasets import TrialWindows
from .model import FitConfig, FusionModel, embed_all, fit

METRICS = ("auc", "f1", "accuracy", "balanced_accuracy")
MODELS = ("fusion", "eeg", "ecg")
EEG_BANDS = {"delta": (1, 4), "theta": (4, 8), "alpha": (8, 13), "beta": (13, 30), "gamma": (30, 45)}


def subject_folds(subjects: np.ndarray, scheme: str = "loso", k: int = 5, seed: int = 0) -> list[list[str]]:
    """Test-subject groups: one per subject (``loso``) or ``k`` shuffled groups (``kfold``)."""
    uniq = sorted(set(subjects.tolist()))
    if len(uniq) < 2:
        raise ValueError(f"subject-independent evaluation needs >= 2 subjects, got {uniq}")
    if scheme == "loso":
        return [[s] for s in uniq]
    if scheme != "kfold":
        raise ValueError(f"unknown scheme {scheme!r} (loso | kfold)")
    k = min(k, len(uniq))
    order = np.random.default_rng(seed).permutation(len(uniq))
    return [[uniq[i] for i in order[f::k]] for f in range(k)]


# -- hand-crafted baseline --------------------------------------------------------------------------------

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


def handcrafted_features(w: TrialWindows, fs: float = 200.0) -> np.ndarray:
    """Per window: log EEG band powers (channel-averaged per band, plus per channel) and ECG heart rate."""
    from scipy.signal import welch

    eeg = w.eeg.reshape(w.eeg.shape[0], w.eeg.shape[1], -1)
    f, pxx = welch(eeg, fs=fs, nperseg=int(2 * fs), axis=-1)
    bands = [np.log(pxx[..., (f >= lo) & (f < hi)].mean(-1) + 1e-12) for lo, hi in EEG_BANDS.values()]
    per_ch = np.concatenate(bands, axis=1)  # (W, C*5)
    hr = np.array([heart_rate(e, fs) for e in w.ecg])
    hr = np.where(np.isfinite(hr), hr, np.nanmedian(hr) if np.isfinite(hr).any() else 70.0)
    return np.concatenate([per_ch, np.stack([b.mean(1) for b in bands], 1), hr[:, None]], axis=1)


BASELINE_CS = (0.001, 0.01, 0.1, 1.0)


def baseline_classifier(x: np.ndarray, y: np.ndarray, subjects: np.ndarray):
    """Standardise + class-balanced logistic regression, its inverse regularisation C chosen from
    ``BASELINE_CS`` by an inner split of the *training* subjects (group k-fold, AUC) — the held-out subject
    never influences the choice. With too few training subjects or a one-class inner fold, C = 0.1."""
    uniq = np.unique(subjects)
    k = min(5, len(uniq))
    best_c = 0.1
    if k >= 2:
        from sklearn.model_selection import GroupKFold

        splits = list(GroupKFold(n_splits=k).split(x, y, groups=subjects))
        if all(len(set(y[tr_].tolist())) == 2 and len(set(y[va].tolist())) == 2 for tr_, va in splits):
            scores = []
            for c in BASELINE_CS:
                clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=c, class_weight="balanced"))
                scores.append(np.mean([roc_auc_score(y[va], clf.fit(x[tr_], y[tr_]).predict_proba(x[va])[:, 1])
                                       for tr_, va in splits]))
            best_c = BASELINE_CS[int(np.argmax(scores))]
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=best_c, class_weight="balanced"))
    clf.fit(x, y)
    clf.chosen_c = best_c
    return clf


# -- metrics ----------------------------------------------------------------------------------------------

def binary_metrics(y: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    pred = (prob >= 0.5).astype(int)
    auc = roc_auc_score(y, prob) if len(set(y.tolist())) == 2 else float("nan")
    return {"auc": float(auc), "f1": float(f1_score(y, pred, zero_division=0)),
            "accuracy": float(accuracy_score(y, pred)), "balanced_accuracy": float(balanced_accuracy_score(y, pred))}


def summarise(per_fold: list[dict[str, float]], pooled: dict[str, float]) -> dict:
    out = {}
    for m in METRICS:
        vals = np.array([f[m] for f in per_fold], dtype=float)
        ok = vals[np.isfinite(vals)]
        out[m] = {"mean": float(ok.mean()) if len(ok) else float("nan"),
                  "std": float(ok.std()) if len(ok) else float("nan"),
                  "n_folds": len(ok), "pooled": pooled[m]}
    return out


def trial_mean(prob: np.ndarray, trial: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Trial-level aggregation: the mean window probability of each trial."""
    ids = np.unique(trial)
    return ids, np.array([prob[trial == t].mean(0) for t in ids])


# -- evaluation -------------------------------------------------------------------------------------------

@dataclass
class EvalConfig:
    scheme: str = "loso"
    k: int = 5
    seed: int = 0
    fit: FitConfig = field(default_factory=FitConfig)
    pooling: str = "mean"
    head: str = "mlp"
    baseline_correction: bool = False


@dataclass
class FoldOutput:
    test_subjects: list[str]
    train_index: np.ndarray
    test_index: np.ndarray
    probs: dict[str, np.ndarray]  # model -> (W_test, T)
    models: dict[str, FusionModel]
    baseline_c: list[float] = field(default_factory=list)  # the baseline's chosen C per target


def cached_embeddings(template: FusionModel, w: TrialWindows, baseline_correction: bool = False,
                      progress: bool = True) -> dict[str, torch.Tensor]:
    from tqdm.auto import tqdm

    embs = {}
    for m in tqdm(("eeg", "ecg"), desc="embed windows (frozen encoders)", disable=not progress):
        x = w.eeg if m == "eeg" else w.ecg
        e = embed_all(template, m, x)
        if baseline_correction:
            for t, (be, bc) in w.baseline_of.items():
                b = be if m == "eeg" else bc
                if len(b):
                    e[w.trial == t] -= embed_all(template, m, b).mean(0)
        embs[m] = e
    return embs


def run_fold(encoders: dict, embs: dict[str, torch.Tensor], feats: np.ndarray, y: np.ndarray, w: TrialWindows,
             test_subjects: list[str], cfg: EvalConfig) -> FoldOutput:
    test = np.isin(w.subject, test_subjects)
    tr, te = np.flatnonzero(~test), np.flatnonzero(test)
    probs, models = {}, {}
    for name, use in (("fusion", ("eeg", "ecg")), ("eeg", ("eeg",)), ("ecg", ("ecg",))):
        torch.manual_seed(cfg.seed)  # head initialisation: the same in every fold and run
        # Fine-tuning changes the encoders: each model gets its own copy, or the next fold would start from
        # encoders that were trained on its test subject.
        enc = encoders if cfg.fit.mode == "frozen" else {m: copy.deepcopy(e) for m, e in encoders.items()}
        model = FusionModel(enc["eeg"], enc["ecg"], num_outputs=y.shape[1], pooling=cfg.pooling,
                            head=cfg.head, use=use)
        if cfg.pooling == "attention" and cfg.fit.mode == "frozen":
            raise ValueError("attention pooling learns from tokens: use --mode finetune (frozen mode caches pooled means)")
        if cfg.fit.mode == "frozen":
            fit(model, y[tr], cfg.fit, embs={m: embs[m][tr] for m in use})
            te_embs = {m: embs[m][te] for m in use}
        else:
            fit(model, y[tr], cfg.fit, windows={m: getattr(w, m)[tr] for m in use})
            te_embs = {m: embed_all(model, m, getattr(w, m)[te]) for m in use}
        with torch.no_grad():
            model.eval()
            probs[name] = torch.sigmoid(model.head_logits(te_embs)).numpy()
            if name == "fusion":  # missing-modality evaluation of the same fusion model
                probs["fusion[eeg only]"] = torch.sigmoid(model.head_logits({"eeg": te_embs["eeg"], "ecg": None})).numpy()
                probs["fusion[ecg only]"] = torch.sigmoid(model.head_logits({"eeg": None, "ecg": te_embs["ecg"]})).numpy()
        models[name] = model
    base, chosen = np.zeros((len(te), y.shape[1])), []
    for j in range(y.shape[1]):
        if len(set(y[tr, j].tolist())) < 2:
            base[:, j] = y[tr, j].mean()
            continue
        clf = baseline_classifier(feats[tr], y[tr, j], w.subject[tr])
        base[:, j] = clf.predict_proba(feats[te])[:, 1]
        chosen.append(clf.chosen_c)
    probs["baseline"] = base
    return FoldOutput(test_subjects, tr, te, probs, models, chosen)


def evaluate(w: TrialWindows, y: np.ndarray, targets: list[str], encoders: dict, cfg: EvalConfig,
             progress: bool = True, on_fold=None) -> tuple[dict, dict]:
    """Run every fold; returns (results by model -> target -> metric, pooled predictions for plots)."""
    from tqdm.auto import tqdm

    template = FusionModel(encoders["eeg"], encoders["ecg"], num_outputs=len(targets))
    embs = cached_embeddings(template, w, cfg.baseline_correction, progress) if cfg.fit.mode == "frozen" else {}
    feats = handcrafted_features(w)
    folds = subject_folds(w.subject, cfg.scheme, cfg.k, cfg.seed)
    per_fold: dict = {}
    pooled_prob: dict = {}
    pooled_idx = []
    for i, test_subjects in enumerate(tqdm(folds, desc=f"{cfg.scheme} folds", disable=not progress)):
        out = run_fold(encoders, embs, feats, y, w, test_subjects, cfg)
        if on_fold is not None:
            on_fold(i, out)
        pooled_idx.append(out.test_index)
        for name, p in out.probs.items():
            pooled_prob.setdefault(name, []).append(p)
            for j, t in enumerate(targets):
                yt = y[out.test_index, j]
                ids, tp = trial_mean(p[:, j], w.trial[out.test_index])
                ty = np.array([yt[w.trial[out.test_index] == k][0] for k in ids])
                per_fold.setdefault((name, t, "window"), []).append(binary_metrics(yt, p[:, j]))
                per_fold.setdefault((name, t, "trial"), []).append(binary_metrics(ty, tp))
    idx = np.concatenate(pooled_idx)
    results: dict = {}
    preds = {"y": y[idx], "trial": w.trial[idx]}
    for name, parts in pooled_prob.items():
        p = np.concatenate(parts)
        preds[name] = p
        for j, t in enumerate(targets):
            ids, tp = trial_mean(p[:, j], w.trial[idx])
            ty = np.array([y[idx][w.trial[idx] == k][0, j] for k in ids])
            win = summarise(per_fold[(name, t, "window")], binary_metrics(y[idx, j], p[:, j]))
            tri = summarise(per_fold[(name, t, "trial")], binary_metrics(ty, tp))
            results.setdefault(name, {})[t] = {**win, **{f"trial_{m}": v for m, v in tri.items()}}
    return results, preds


def markdown_table(results: dict, targets: list[str], metrics=("auc", "f1", "balanced_accuracy")) -> str:
    head = "| model | target | " + " | ".join(f"window {m}" for m in metrics) + " | trial auc (pooled) |"
    lines = [head, "|" + "---|" * (len(metrics) + 3)]
    for name, by_t in results.items():
        for t in targets:
            r = by_t[t]
            cells = [f"{r[m]['mean']:.3f} ± {r[m]['std']:.3f}" if math.isfinite(r[m]["mean"]) else "n/a" for m in metrics]
            lines.append(f"| {name} | {t} | " + " | ".join(cells) + f" | {r['trial_auc']['pooled']:.3f} |")
    return "\n".join(lines)
