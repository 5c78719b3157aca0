"""Subject-independent evaluation: folds by subject, frozen-encoder fusion vs single modalities vs a
hand-crafted baseline, window- and trial-level metrics.

Leakage rules, enforced here and tested from the command line: folds split *subjects*; everything a fold
fits (embedding standardisation, heads, the inner selection of their settings and of the late-fusion
weights, the baseline's imputation values, scaler, regularisation and coefficients) is computed from the
training subjects' windows only (``fit_fold``). The frozen encoders see each window on its own (CBraMod's
GroupNorm spans one sample) and are run trial by trial, so caching their embeddings once for all folds
leaks nothing; the hand-crafted features are per window too, with gaps left as NaN for the fold to fill.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from .baseline import Baseline, fit_baseline, handcrafted_features
from .datasets import TrialWindows
from .model import DIM, FitConfig, FusionModel, embed_all, fit
from .select import SelectConfig, fit_models

METRICS = ("auc", "f1", "accuracy", "balanced_accuracy")
MODELS = ("fusion", "eeg", "ecg")


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
    select: SelectConfig = field(default_factory=SelectConfig)
    pooling: str = "mean"
    head: str = "mlp"
    baseline_correction: bool = False


@dataclass
class FoldOutput:
    test_subjects: list[str]
    train_index: np.ndarray
    test_index: np.ndarray
    probs: dict[str, np.ndarray]  # model -> (W_test, T)
    models: dict[str, FusionModel]  # fusion, eeg, ecg
    baselines: list[Baseline]  # one per target
    choices: dict = field(default_factory=dict)  # what the inner selection chose, with its scores


def cached_embeddings(template: FusionModel, w: TrialWindows, baseline_correction: bool = False,
                      progress: bool = True) -> dict[str, torch.Tensor]:
    """Frozen-encoder embeddings of every window, encoded trial by trial: a window's embedding depends on
    its own trial only (batch composition changes the last bits of CPU GEMMs), never on other subjects."""
    from tqdm.auto import tqdm

    embs = {}
    trials = np.unique(w.trial)
    for m in tqdm(("eeg", "ecg"), desc="embed windows (frozen encoders)", disable=not progress):
        x = w.eeg if m == "eeg" else w.ecg
        e = torch.zeros(len(x), DIM)
        for t in trials:
            sel = np.flatnonzero(w.trial == t)
            e[torch.from_numpy(sel)] = embed_all(template, m, x[sel])
            if baseline_correction and t in w.baseline_of:
                b = w.baseline_of[t][0 if m == "eeg" else 1]
                if len(b):
                    e[torch.from_numpy(sel)] -= embed_all(template, m, b).mean(0)
        embs[m] = e
    return embs


def fit_fold(encoders: dict, embs: dict[str, torch.Tensor], feats: np.ndarray, y: np.ndarray, w: TrialWindows,
             train: np.ndarray, cfg: EvalConfig) -> tuple[dict[str, FusionModel], list[Baseline], dict]:
    """Every model of a fold (fusion, EEG-only, ECG-only, the baseline per target) from the windows ``train``
    only, and the choices the inner selection made."""
    subjects = w.subject[train]
    baselines = [fit_baseline(feats[train], y[train, j], subjects, cfg.select.inner_k)
                 if len(np.unique(y[train, j])) == 2 else Baseline.constant(float(y[train, j].mean()), feats.shape[1])
                 for j in range(y.shape[1])]
    if cfg.fit.mode == "frozen":
        if cfg.pooling == "attention":
            raise ValueError("attention pooling learns from tokens: use --mode finetune (frozen mode caches pooled means)")
        models, choices = fit_models({m: e[torch.from_numpy(train)] for m, e in embs.items()}, y[train], subjects,
                                     encoders, cfg.fit, cfg.select, head=cfg.head, pooling=cfg.pooling)
    else:
        models = {}
        choices = {"note": "finetune mode: every model trained once with the given settings, no inner selection"}
        for name, use in (("fusion", ("eeg", "ecg")), ("eeg", ("eeg",)), ("ecg", ("ecg",))):
            torch.manual_seed(cfg.seed)  # head initialisation: the same in every fold and run
            # Each model fine-tunes its own copy of the encoders, or the next fold would start from encoders
            # trained on its test subject.
            enc = {m: copy.deepcopy(e) for m, e in encoders.items()}
            model = FusionModel(enc["eeg"], enc["ecg"], num_outputs=y.shape[1], pooling=cfg.pooling,
                                head=cfg.head, use=use)
            fit(model, y[train], cfg.fit, windows={m: getattr(w, m)[train] for m in use})
            models[name] = model
    choices["baseline"] = [{"C": b.C, "inner_auc": b.inner_auc, "grid": b.grid} for b in baselines]
    return models, baselines, choices


def run_fold(encoders: dict, embs: dict[str, torch.Tensor], feats: np.ndarray, y: np.ndarray, w: TrialWindows,
             test_subjects: list[str], cfg: EvalConfig) -> FoldOutput:
    test = np.isin(w.subject, test_subjects)
    tr, te = np.flatnonzero(~test), np.flatnonzero(test)
    models, baselines, choices = fit_fold(encoders, embs, feats, y, w, tr, cfg)
    probs = {}
    with torch.no_grad():
        for name, model in models.items():
            model.eval()
            use = model.cfg.use
            te_embs = ({m: embs[m][torch.from_numpy(te)] for m in use} if cfg.fit.mode == "frozen"
                       else {m: embed_all(model, m, getattr(w, m)[te]) for m in use})
            probs[name] = torch.sigmoid(model.head_logits(te_embs)).numpy()
            if name == "fusion":  # missing-modality evaluation of the same fusion model
                probs["fusion[eeg only]"] = torch.sigmoid(model.head_logits({"eeg": te_embs["eeg"], "ecg": None})).numpy()
                probs["fusion[ecg only]"] = torch.sigmoid(model.head_logits({"eeg": None, "ecg": te_embs["ecg"]})).numpy()
    probs["baseline"] = np.stack([b.predict_proba(feats[te]) for b in baselines], axis=1)
    order = ("fusion", "fusion[eeg only]", "fusion[ecg only]", "eeg", "ecg", "baseline")
    return FoldOutput(list(test_subjects), tr, te, {k: probs[k] for k in order}, models, baselines, choices)


def evaluate(w: TrialWindows, y: np.ndarray, targets: list[str], encoders: dict, cfg: EvalConfig,
             progress: bool = True, on_fold=None, embs: dict[str, torch.Tensor] | None = None,
             feats: np.ndarray | None = None) -> tuple[dict, dict]:
    """Run every fold; returns (results by model -> target -> metric, pooled predictions for plots).
    ``embs`` / ``feats``: the frozen embeddings and hand-crafted features of every window when already
    computed (``cached_embeddings``, ``handcrafted_features``); neither depends on labels or other windows."""
    from tqdm.auto import tqdm

    if embs is None and cfg.fit.mode == "frozen":
        template = FusionModel(encoders["eeg"], encoders["ecg"], num_outputs=len(targets))
        embs = cached_embeddings(template, w, cfg.baseline_correction, progress)
    embs = embs or {}
    feats = handcrafted_features(w) if feats is None else feats
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
