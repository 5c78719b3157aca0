"""Model selection inside a fold, from its training subjects only: each head's capacity, regularisation and
number of epochs, and the fusion's late-fusion weights.

An inner split of the training subjects (``GroupKFold``) gives every training window an out-of-fold
prediction from heads that never saw its subject; a setting's score is the mean within-subject AUC of those
predictions, which is what the outer leave-one-subject-out window AUC measures. The EEG-only, ECG-only and
joint (concatenated) heads each get the best setting of the grid and are refitted on all training windows.
The fusion model then mixes the joint head with the two single-modality heads; the mixing weights come from a
grid over the simplex that holds each head alone, chosen on the same out-of-fold predictions, so on the inner
split the fusion scores at least as well as its better modality (and as the plain concatenation). Every
choice, with the scores it was made from, is returned for the fold's ``selection.json``; all of it is a
function of the training subjects' windows and labels.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold

from .model import (
    FitConfig,
    FusionConfig,
    FusionModel,
    HeadSpec,
    fit_logistic,
    head_spec,
    load_head,
    stack_logits,
    train_heads,
)


@dataclass
class SelectConfig:
    enabled: bool = True  # False: every head trained once with the FitConfig's settings, fusion = joint head
    inner_k: int = 4  # inner GroupKFold splits of the training subjects (fewer subjects: one per subject)
    heads: tuple[str, ...] = ("linear", "mlp")  # capacity
    cs: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # linear heads: inverse L2 regularisation
    weight_decays: tuple[float, ...] = (1e-2, 1.0)  # MLP heads: AdamW's decoupled decay
    epochs: tuple[int, ...] = (25, 50, 100, 200)  # MLP heads: checkpoints of one run (early stopping)
    mix_step: float = 0.25  # late-fusion weight grid over (joint, eeg, ecg); 0: the joint head alone
    rule: str = "one-se"  # heads: "one-se" (simplest within one standard error of the best) | "best"


@dataclass(frozen=True)
class Setting:
    head: str
    reg: float  # C of a linear head, weight decay of an MLP head
    epochs: int = 0  # MLP heads

    def key(self) -> str:
        return f"linear/C={self.reg:g}" if self.head == "linear" else f"mlp/wd={self.reg:g}/epochs={self.epochs}"


def _complexity(s: Setting) -> tuple:
    """Simplest first: linear before MLP, stronger regularisation first (smaller C; for an MLP fewer epochs,
    then larger decay)."""
    return (0, s.reg, 0) if s.head == "linear" else (1, s.epochs, -s.reg)


def fit_setting(x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor, spec: HeadSpec, regs: list[float],
                fit_cfg: FitConfig, epochs: tuple[int, ...]) -> dict[int, dict[str, torch.Tensor]]:
    """A stack of heads of ``spec.head`` type, head ``g`` on ``masks[g]`` with regularisation ``regs[g]``;
    parameters by epoch checkpoint (a linear head has one: 0)."""
    if spec.head == "linear":
        return {0: fit_logistic(x, y, masks, spec.dims, regs)}
    snaps, _ = train_heads(x, y, masks, spec, fit_cfg.lr, regs, max(epochs), fit_cfg.seed, epochs)
    return snaps


GROUPS = {"eeg": ("eeg",), "ecg": ("ecg",), "joint": ("eeg", "ecg")}


def inner_splits(subjects: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Subject-grouped (train, validation) index pairs over the given (training) windows; [] with < 2 subjects."""
    k = min(k, len(np.unique(subjects)))
    if k < 2:
        return []
    return list(GroupKFold(n_splits=k).split(np.zeros(len(subjects)), groups=subjects))


def subject_aucs(y: np.ndarray, score: np.ndarray, subjects: np.ndarray) -> np.ndarray:
    """Within-subject AUC of each subject (nan where a subject has one class); ``y``, ``score``: (n,) or
    (n, T), the targets averaged per subject."""
    y2, s2 = y.reshape(len(y), -1), score.reshape(len(score), -1)
    out = []
    for s in np.unique(subjects):
        k = subjects == s
        vals = [roc_auc_score(y2[k, j], s2[k, j]) for j in range(y2.shape[1]) if len(np.unique(y2[k, j])) == 2]
        out.append(np.mean(vals) if vals else np.nan)
    return np.array(out)


def subject_auc(y: np.ndarray, score: np.ndarray, subjects: np.ndarray) -> float:
    """Mean within-subject AUC over the subjects with both classes; the pooled AUC when none has both."""
    vals = subject_aucs(y, score, subjects)
    if np.isfinite(vals).any():
        return float(np.nanmean(vals))
    return float(roc_auc_score(y, score)) if y.ndim == 1 and len(np.unique(y)) == 2 else float("nan")


def one_se_choice(order: list, per_subject: dict, rule: str = "one-se") -> tuple[object, float, float]:
    """The simplest candidate (first in ``order``) whose mean score is within one standard error (across
    subjects) of the best mean: the one-standard-error rule, which trades a difference the inner split
    cannot resolve for the more regularised model (``rule="best"``: the best mean). Returns (choice, best
    mean, its standard error)."""
    means = {c: float(np.nanmean(v)) if np.isfinite(v).any() else -np.inf for c, v in per_subject.items()}
    best = max(order, key=lambda c: means[c])
    v = per_subject[best][np.isfinite(per_subject[best])]
    se = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
    if rule == "best":
        return best, means[best], se
    return next(c for c in order if means[c] >= means[best] - se), means[best], se


def _oof_grid(x: torch.Tensor, y: torch.Tensor, splits: list, spec: HeadSpec, fit_cfg: FitConfig,
              sel: SelectConfig) -> dict[Setting, np.ndarray]:
    """Out-of-fold logits (n, T) of every setting: per head type one stack of (regularisations x inner folds)
    heads, read at every epoch checkpoint."""
    n, k = len(x), len(splits)
    member = torch.zeros(k, n, dtype=torch.bool)
    for i, (tr, _) in enumerate(splits):
        member[i, torch.from_numpy(tr)] = True
    out = {}
    for head in sel.heads:
        hspec = replace(spec, head=head)
        regs = sel.cs if head == "linear" else sel.weight_decays
        snaps = fit_setting(x, y, member.repeat(len(regs), 1), hspec, [r for r in regs for _ in range(k)], fit_cfg,
                            tuple(sel.epochs))
        for e, params in snaps.items():
            logits = stack_logits(params, x, hspec)
            for ri, r in enumerate(regs):
                oof = torch.empty(n, y.shape[1])
                for si, (_, va) in enumerate(splits):
                    oof[torch.from_numpy(va)] = logits[ri * k + si, torch.from_numpy(va)]
                out[Setting(head, r, e)] = oof.numpy()
    return out


def simplex_grid(n: int, step: float) -> list[tuple[float, ...]]:
    """Weights in multiples of ``step`` summing to 1: each component alone first, then the mixtures."""
    m = round(1 / step)
    pts = [tuple(i / m for i in c) for c in itertools.product(range(m + 1), repeat=n) if sum(c) == m]
    return sorted(pts, key=lambda p: (sum(v > 0 for v in p), [-v for v in p]))


def choose_mix(oof: dict[str, np.ndarray], y: np.ndarray, subjects: np.ndarray, step: float) -> tuple[dict, list]:
    """Late-fusion weights for one target: each component's out-of-fold logits scaled to unit spread, the
    simplex weights with the best ``subject_auc``, then a class-balanced logistic calibration of the mixed
    score. Returns (the record for selection.json, one weight per component in raw-logit units + bias)."""
    names = list(oof)
    sd = {k: float(oof[k].std()) or 1.0 for k in names}
    grid = simplex_grid(len(names), step)
    scores = [subject_auc(y, sum(a * oof[k] / sd[k] for a, k in zip(w, names)), subjects) for w in grid]
    best = int(np.nanargmax(scores)) if np.isfinite(scores).any() else 0
    w = grid[best]
    mixed = sum(a * oof[k] / sd[k] for a, k in zip(w, names))
    cal = LogisticRegression(C=100.0, class_weight="balanced").fit(mixed[:, None], y)
    scale, bias = float(cal.coef_[0, 0]), float(cal.intercept_[0])
    if scale <= 0:  # the mixed score ranks the pooled windows backwards: keep its within-subject order
        scale, bias = 1e-3, 0.0
    record = {"weights": dict(zip(names, w)), "inner_auc": scores[best], "calibration": [scale, bias],
              "grid": {"/".join(f"{k}={a:g}" for k, a in zip(names, g)): s for g, s in zip(grid, scores)}}
    return record, [scale * a / sd[k] for a, k in zip(w, names)] + [bias]


def fit_models(embs: dict[str, torch.Tensor], y: np.ndarray, subjects: np.ndarray, encoders: dict,
               fit_cfg: FitConfig, sel: SelectConfig, head: str = "mlp", **model_kw) -> tuple[dict, dict]:
    """The fusion (late), EEG-only and ECG-only models of one fold from its training windows' embeddings
    ``embs`` (modality -> (n, 200)), labels ``y`` (n, T) and ``subjects``; and the choices made."""
    yt = torch.as_tensor(y, dtype=torch.float32).reshape(len(y), -1)
    n, t = yt.shape
    splits = inner_splits(subjects, sel.inner_k) if sel.enabled else []
    default = Setting(head, fit_cfg.C, 0) if head == "linear" else Setting(head, fit_cfg.weight_decay, fit_cfg.epochs)
    choices: dict = {"inner_folds": [sorted(set(subjects[va].tolist())) for _, va in splits]}
    if not splits:
        why = "selection off" if not sel.enabled else "fewer than 2 training subjects"
        choices["note"] = (f"{why}: every head trained with the given settings, without inner selection; "
                           "the fusion is the joint head alone")
    template = FusionConfig(num_outputs=t, head=head, **model_kw)
    fitted, oof = {}, {}
    for name, use in GROUPS.items():
        x = torch.cat([embs[m] for m in use], 1)
        spec = head_spec(template, head, len(use))
        best, record = default, {}
        if splits:
            grid = _oof_grid(x, yt, splits, spec, fit_cfg, sel)
            per_subject = {s: subject_aucs(y, o, subjects) for s, o in grid.items()}
            if any(np.isfinite(v).any() for v in per_subject.values()):
                best, top, se = one_se_choice(sorted(grid, key=_complexity), per_subject, sel.rule)
                oof[name] = grid[best]
                record = {"inner_auc": float(np.nanmean(per_subject[best])), "best_inner_auc": top, "best_se": se,
                          "grid": {s.key(): float(np.nanmean(v)) for s, v in per_subject.items()}}
        spec = replace(spec, head=best.head)
        snaps = fit_setting(x, yt, torch.ones(1, n, dtype=torch.bool), spec, [best.reg], fit_cfg, (best.epochs,))
        fitted[name] = (snaps[best.epochs], spec)
        choices[name] = {"setting": best.key(), **record}

    models = {}
    for m in ("eeg", "ecg"):
        model = FusionModel(encoders["eeg"], encoders["ecg"], t, head=fitted[m][1].head, use=(m,), **model_kw)
        load_head(model, fitted[m][0], 0, fitted[m][1])
        models[m] = model.eval()
    fusion = FusionModel(encoders["eeg"], encoders["ecg"], t, head=fitted["joint"][1].head, late=True,
                         branch_heads=(fitted["eeg"][1].head, fitted["ecg"][1].head), **model_kw)
    load_head(fusion, fitted["joint"][0], 0, fitted["joint"][1])
    for m in ("eeg", "ecg"):
        load_head(fusion, fitted[m][0], 0, fitted[m][1], branch=m)
    joint_only = {"weights": {"joint": 1.0, "eeg": 0.0, "ecg": 0.0}}
    mix = []
    if len(oof) == len(GROUPS) and sel.mix_step > 0:
        for j in range(t):
            if len(np.unique(y[:, j])) < 2:
                mix.append(({**joint_only, "note": "one class"}, [1.0, 0.0, 0.0, 0.0]))
                continue
            mix.append(choose_mix({k: oof[k][:, j] for k in ("joint", "eeg", "ecg")}, y[:, j], subjects, sel.mix_step))
        with torch.no_grad():
            fusion.mix.copy_(torch.tensor([row for _, row in mix], dtype=fusion.mix.dtype))
    choices["fusion"] = [rec for rec, _ in mix] or [joint_only] * t
    models["fusion"] = fusion.eval()
    return models, choices
