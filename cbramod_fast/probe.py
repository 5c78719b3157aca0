"""Does pretraining help? A linear probe on a real labelled ECG task.

Task: atrial fibrillation vs normal sinus rhythm per 10-s window of CPSC 2021 (2 leads, I and II, 200 Hz),
labels from the rhythm notes (``(AFIB`` ... ``(N``) of each record's ``.atr``. Splits are by patient
(every record of a patient on one side), so no window of a test patient is ever seen in training.
Features: the frozen encoder's output (B, C, N, 200) averaged over patches, and its standard deviation
over patches, for each present lead; a standardised logistic regression on top.

``read_wfdb_windows`` is also the small in-memory reader the pretraining tests and the probe use:
scipy filtering (the reference for the C++ pipeline), resampling to 200 Hz, µV/100 scaling.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

STANDARD_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
_ALIASES = {"MLII": "II", "ML2": "II", "AVR": "aVR", "AVL": "aVL", "AVF": "aVF"}
_UNIT_TO_UV = {"uv": 1.0, "µv": 1.0, "mv": 1000.0, "v": 1e6}


@dataclass
class Windows:
    x: np.ndarray  # (W, C, N, 200) float32, µV/100
    present: np.ndarray  # (W, C) bool
    record: list[str]  # record name of each window
    start_s: np.ndarray  # (W,) window start in seconds from the record's beginning


def _lead_name(name: str) -> str:
    n = name.strip()
    return _ALIASES.get(n.upper(), _ALIASES.get(n, n))


def read_wfdb_windows(records: list[str | Path], leads: tuple[str, ...] = STANDARD_LEADS, window_s: int = 10,
                      fs: int = 200, band: tuple[float, float] = (0.5, 45.0), scale: float = 0.01,
                      max_abs: float = 80.0) -> Windows:
    """Cut WFDB records into ``window_s`` windows of ``(C, window_s, fs)`` patches in the lead order ``leads``.

    Leads a record lacks are zero with ``present`` False. Windows with a non-finite value, a flat present
    lead or ``|x| > max_abs`` (after scaling) are dropped.
    """
    import wfdb
    from scipy.signal import butter, resample_poly, sosfiltfilt

    xs, pres, names, starts = [], [], [], []
    for rec in records:
        rec = str(rec)
        r = wfdb.rdrecord(rec)
        sig = r.p_signal.T.astype(np.float64)  # (C_rec, T)
        units = [_UNIT_TO_UV.get(str(u).strip().lower(), None) for u in r.units]
        if None in units:
            raise ValueError(f"{rec}: unknown signal units {r.units}")
        sig = sig * np.asarray(units)[:, None]
        fs_rec = round(float(r.fs))
        sos = butter(4, band, btype="bandpass", fs=fs_rec, output="sos")
        sig = sosfiltfilt(sos, np.nan_to_num(sig), axis=-1)
        if fs_rec != fs:
            g = np.gcd(fs, fs_rec)
            sig = resample_poly(sig, fs // g, fs_rec // g, axis=-1)
        sig = sig * scale
        rec_leads = [_lead_name(n) for n in r.sig_name]
        out = np.zeros((len(leads), sig.shape[-1]), np.float32)
        present = np.zeros(len(leads), bool)
        for i, name in enumerate(leads):
            if name in rec_leads:
                out[i] = sig[rec_leads.index(name)]
                present[i] = True
        if not present.any():
            continue
        w = window_s * fs
        for k in range(out.shape[-1] // w):
            seg = out[:, k * w:(k + 1) * w]
            if (not np.isfinite(seg).all() or np.abs(seg).max() > max_abs
                    or (seg[present].std(axis=-1) < 1e-3).any()):
                continue
            xs.append(seg.reshape(len(leads), window_s, fs))
            pres.append(present)
            names.append(Path(rec).name)
            starts.append(k * window_s)
    if not xs:
        raise ValueError(f"no usable {window_s}-s windows in {len(records)} records")
    return Windows(np.stack(xs), np.stack(pres), names, np.asarray(starts, np.float64))


def records_in(folder: str | Path) -> list[Path]:
    """WFDB record paths (without extension) of every ``.hea`` in ``folder``, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    recs = sorted(p.with_suffix("") for p in folder.glob("*.hea"))
    if not recs:
        raise FileNotFoundError(f"{folder}: no WFDB .hea headers")
    return recs


# -- labels ----------------------------------------------------------------------------------------------
def rhythm_intervals(record: str | Path) -> list[tuple[int, int, str]]:
    """``(start, end, rhythm)`` sample intervals from the ``(XXX`` rhythm notes of ``record.atr``."""
    import wfdb

    ann = wfdb.rdann(str(record), "atr")
    sig_len = wfdb.rdheader(str(record)).sig_len
    marks = [(int(s), n[1:]) for s, n in zip(ann.sample, ann.aux_note) if n.startswith("(")]
    if not marks:
        return [(0, sig_len, "N")]  # CPSC 2021 records without rhythm notes are sinus rhythm throughout
    out = [(0, marks[0][0], "N")] if marks[0][0] > 0 else []
    for (s, name), nxt in zip(marks, marks[1:] + [(sig_len, "")]):
        if nxt[0] > s:
            out.append((s, nxt[0], name))
    return out


def af_labels(records: list[Path], windows: Windows, fs_rec: dict[str, float], window_s: int = 10) -> np.ndarray:
    """1 = the window lies wholly in AF, 0 = wholly in normal rhythm, -1 = mixed (dropped by the caller)."""
    by_name = {Path(r).name: rhythm_intervals(r) for r in records}
    y = np.full(len(windows.record), -1, np.int64)
    for i, (name, t0) in enumerate(zip(windows.record, windows.start_s)):
        fs = fs_rec[name]
        a, b = t0 * fs, (t0 + window_s) * fs
        kinds = {k for s, e, k in by_name[name] if s < b and e > a}
        if kinds == {"AFIB"}:
            y[i] = 1
        elif kinds == {"N"}:
            y[i] = 0
    return y


def patient_of(record: str) -> str:
    """CPSC 2021 record names are ``data_<patient>_<segment>``."""
    return record.split("_")[1]


# -- features and the probe --------------------------------------------------------------------------------
@torch.no_grad()
def encoder_features(model: torch.nn.Module, x: np.ndarray, present: np.ndarray, batch: int = 32) -> np.ndarray:
    """Frozen-encoder features: per present lead, the mean and std over patches of ``encode`` (eval mode)."""
    model.eval()
    feats = []
    for i in range(0, len(x), batch):
        xb = torch.from_numpy(x[i:i + batch])
        h = model.encode(xb)  # (B, C, N, D)
        f = torch.cat([h.mean(dim=2), h.std(dim=2)], dim=-1)  # (B, C, 2D)
        feats.append(f.numpy())
    f = np.concatenate(feats)
    keep = present[0]  # the probe's windows all have the same present leads
    if not (present == keep).all():
        raise ValueError("encoder_features: windows with different lead sets")
    return f[:, keep].reshape(len(f), -1)


@dataclass
class ProbeResult:
    name: str
    balanced_accuracy: float
    auc: float
    folds: list[dict]


def linear_probe(features: np.ndarray, y: np.ndarray, groups: np.ndarray, name: str) -> ProbeResult:
    """Leave-one-AF-patient-and-one-normal-patient-out logistic regression (every such pair is a fold)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pos = sorted({g for g, t in zip(groups, y) if t == 1})
    neg = sorted({g for g, t in zip(groups, y) if t == 0})
    folds, bal, aucs = [], [], []
    for p in pos:
        for n in neg:
            test = np.isin(groups, [p, n])
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
            clf.fit(features[~test], y[~test])
            score = clf.predict_proba(features[test])[:, 1]
            b = balanced_accuracy_score(y[test], score > 0.5)
            a = roc_auc_score(y[test], score)
            folds.append({"test_patients": [p, n], "balanced_accuracy": float(b), "auc": float(a),
                          "n_test": int(test.sum())})
            bal.append(b)
            aucs.append(a)
    return ProbeResult(name, float(np.mean(bal)), float(np.mean(aucs)), folds)


def save_results(results: list[ProbeResult], path: str | Path, extra: dict | None = None) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"results": [asdict(r) for r in results], **(extra or {})}, indent=1))
    tmp.replace(path)
